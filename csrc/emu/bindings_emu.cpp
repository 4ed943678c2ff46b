// The pybind11 module of the CPU emulator: bindings.cpp again, named _cuda_emu (see cuda_emu.h).
#include "../bindings.cpp"
