// l2norm.cu compiled by the host compiler into the CPU emulator (see cuda_emu.h).
#include "../l2norm.cu"
