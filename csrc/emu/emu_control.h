// Controls of the CPU emulator for the Python tests, bound into mdkernels._cuda_emu (controls.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace mdk_emu {

// The order in which the threads of a block run between barriers.
enum class Schedule { kForward, kReverse, kShuffle };
void set_schedule(Schedule s, uint64_t seed);

// set_schedule, and selftest(name): tiny kernels that show the emulator's checks fire.
void bind_controls(pybind11::module_& m);

}  // namespace mdk_emu
