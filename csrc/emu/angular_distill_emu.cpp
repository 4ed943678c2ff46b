// angular_distill.cu compiled by the host compiler into the CPU emulator (see cuda_emu.h).
#include "../angular_distill.cu"
