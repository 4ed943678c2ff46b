// margin_target.cu compiled by the host compiler into the CPU emulator (see cuda_emu.h).
#include "../margin_target.cu"
