// The fiber scheduler behind cuda_emu.h: blocks one after another, the threads of a block as ucontext
// fibers on the calling thread, barriers that resume a fiber only when all the threads it waits for
// have arrived, and a deadlock report when none can. See cuda_emu.h for what it checks.
#include "cuda_emu.h"

#include <ucontext.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "emu_control.h"

#if defined(__SANITIZE_ADDRESS__)  // the AddressSanitizer build (_cuda_emu_asan): tell ASan about stack switches
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define MDK_ASAN_FIBERS 1
#endif

namespace mdk_emu {
namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr int kDefaultSmem = 48 * 1024;   // dynamic shared memory without cudaFuncSetAttribute
constexpr int kMaxSmem = 227 * 1024;      // H100 / H200 opt-in maximum per block (A100: 163 KiB)

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  State state = State::kReady;
  uint64_t wait_gen = 0;
  uint3 tid{};
};

struct Block {
  dim3 grid, block;
  uint3 bid{};
  int n = 0;
  std::vector<Fiber> fibers;
  ucontext_t main_ctx;
  int cur = 0;
  int done = 0;
  int arrived = 0;  // block barrier
  uint64_t gen = 0;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_gen;
  std::vector<uint64_t> exchange;
  std::vector<unsigned char> smem;
  const std::function<void()>* body = nullptr;
  std::string error;
};

thread_local Block* g_block = nullptr;
const void* g_main_bottom = nullptr;  // the scheduler's stack, for ASan's fiber annotations
size_t g_main_size = 0;
std::vector<char> g_stacks;
// cudaFuncAttributeMaxDynamicSharedMemorySize per (kernel, device): the attribute is per device on a GPU
std::map<std::pair<const void*, int>, int> g_max_smem;
int g_device = 0;                   // the emulated current device (cudaGetDevice)
std::map<int, int> g_optin;         // each emulated device's opt-in shared memory per block (default: an H100's)
Schedule g_schedule = Schedule::kForward;
uint64_t g_seed = 0;
uint64_t g_launches = 0;

Block& cur_block() {
  if (g_block == nullptr) throw std::logic_error("mdk_emu: a device function was called outside a kernel launch");
  return *g_block;
}

// From a fiber back to the scheduler; a finished fiber is never resumed.
void switch_to_scheduler(bool finished) {
  Block& b = *g_block;
#ifdef MDK_ASAN_FIBERS
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, g_main_bottom, g_main_size);
#else
  (void)finished;
#endif
  swapcontext(&b.fibers[b.cur].ctx, &b.main_ctx);
#ifdef MDK_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(fake, &g_main_bottom, &g_main_size);
#endif
}

void yield_to_scheduler() { switch_to_scheduler(false); }

char* stack_of(int i) { return g_stacks.data() + static_cast<size_t>(i) * kStackBytes; }

// From the scheduler into fiber i, until it yields, finishes or fails.
void switch_to_fiber(Block& b, int i) {
#ifdef MDK_ASAN_FIBERS
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, stack_of(i), kStackBytes);
#endif
  swapcontext(&b.main_ctx, &b.fibers[i].ctx);
#ifdef MDK_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

void fiber_entry() {
#ifdef MDK_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(nullptr, &g_main_bottom, &g_main_size);
#endif
  Block& b = *g_block;
  (*b.body)();
  b.fibers[b.cur].state = State::kDone;
  ++b.done;
  switch_to_scheduler(true);  // never resumed
}

int warp_size_of(const Block& b, int warp) { return std::min(32, b.n - 32 * warp); }

bool waiting(const Block& b, int i) {
  const Fiber& f = b.fibers[i];
  switch (f.state) {
    case State::kDone: return true;
    case State::kAtBlockBarrier: return b.gen == f.wait_gen;
    case State::kAtWarpBarrier: return b.warp_gen[i / 32] == f.wait_gen;
    case State::kReady: return false;
  }
  return false;
}

std::string census(const Block& b) {
  int at_block = 0, at_warp = 0;
  for (const Fiber& f : b.fibers) {
    at_block += f.state == State::kAtBlockBarrier;
    at_warp += f.state == State::kAtWarpBarrier;
  }
  return std::to_string(at_block) + " at __syncthreads, " + std::to_string(at_warp) +
         " at a warp collective, " + std::to_string(b.done) + " returned, of " + std::to_string(b.n) + " threads";
}

std::string where(const Block& b) {
  return "block (" + std::to_string(b.bid.x) + "," + std::to_string(b.bid.y) + "," + std::to_string(b.bid.z) + ")";
}

void run_block(Block& b, const std::vector<int>& order) {
  const size_t need = static_cast<size_t>(b.n) * kStackBytes;
  if (g_stacks.size() < need) g_stacks.assign(need, 0);
  for (int i = 0; i < b.n; ++i) {
    Fiber& f = b.fibers[i];
    f = Fiber{};
    f.tid = uint3{static_cast<unsigned>(i % b.block.x), static_cast<unsigned>((i / b.block.x) % b.block.y),
                  static_cast<unsigned>(i / (b.block.x * b.block.y))};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack_of(i);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.main_ctx;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  while (b.done < b.n) {
    bool progressed = false;
    for (int i : order) {
      if (waiting(b, i)) continue;
      b.cur = i;
      b.fibers[i].state = State::kReady;
      switch_to_fiber(b, i);
      progressed = true;
      if (!b.error.empty()) throw std::runtime_error("mdk_emu: " + where(b) + ", thread " + std::to_string(i) + ": " + b.error);
    }
    if (!progressed) {
      throw std::runtime_error("mdk_emu: deadlock in " + where(b) + ": " + census(b) +
                               " (a barrier or warp collective not reached by every thread)");
    }
  }
}

}  // namespace

const uint3& thread_idx() {
  Block& b = cur_block();
  return b.fibers[b.cur].tid;
}
const uint3& block_idx() { return cur_block().bid; }
const dim3& block_dim() { return cur_block().block; }
const dim3& grid_dim() { return cur_block().grid; }
int linear_thread() { return cur_block().cur; }
int lane_id() { return cur_block().cur % 32; }
namespace {

// Dynamic shared memory, aligned like the GPU's (WMMA needs 32 bytes; CUDA gives at least 128). The
// buffer has 128 spare bytes for the alignment; the ASan build poisons them on both sides.
unsigned char* smem_start(std::vector<unsigned char>& buf) {
  auto p = reinterpret_cast<std::uintptr_t>(buf.data());
  return reinterpret_cast<unsigned char*>((p + 127) & ~std::uintptr_t(127));
}

void prepare_smem(std::vector<unsigned char>& buf, size_t bytes) {
#ifdef MDK_ASAN_FIBERS
  if (!buf.empty()) ASAN_UNPOISON_MEMORY_REGION(buf.data(), buf.size());
#endif
  buf.assign(bytes + 128, 0xFF);  // NaN in every float format: reads before writes show up
#ifdef MDK_ASAN_FIBERS
  unsigned char* start = smem_start(buf);
  ASAN_POISON_MEMORY_REGION(buf.data(), static_cast<size_t>(start - buf.data()));
  ASAN_POISON_MEMORY_REGION(start + bytes, static_cast<size_t>(buf.data() + buf.size() - (start + bytes)));
#endif
}

}  // namespace

unsigned char* dynamic_smem() { return smem_start(cur_block().smem); }
void* warp_exchange_slot(int linear) { return &cur_block().exchange.at(static_cast<size_t>(linear)); }

void syncthreads() {
  Block& b = cur_block();
  const uint64_t gen = b.gen;
  if (++b.arrived == b.n - b.done) {
    if (b.done > 0) fail("__syncthreads after " + std::to_string(b.done) + " threads of the block returned");
    b.arrived = 0;
    ++b.gen;
    return;
  }
  b.fibers[b.cur].state = State::kAtBlockBarrier;
  b.fibers[b.cur].wait_gen = gen;
  yield_to_scheduler();
}

void warp_barrier() {
  Block& b = cur_block();
  const int warp = b.cur / 32;
  const uint64_t gen = b.warp_gen[warp];
  if (++b.warp_arrived[warp] == warp_size_of(b, warp)) {
    b.warp_arrived[warp] = 0;
    ++b.warp_gen[warp];
    return;
  }
  b.fibers[b.cur].state = State::kAtWarpBarrier;
  b.fibers[b.cur].wait_gen = gen;
  yield_to_scheduler();
}

void fail(const std::string& what) {
  Block& b = cur_block();
  b.error = what;
  b.fibers[b.cur].state = State::kDone;
  switch_to_scheduler(true);  // never resumed: the launch is abandoned
  throw std::logic_error("unreachable");
}

int smem_optin(int device) {
  const auto it = g_optin.find(device);
  return it == g_optin.end() ? kMaxSmem : it->second;
}

cudaError_t func_set_attribute(const void* kernel, int attr, int value) {
  if (attr != static_cast<int>(cudaFuncAttributeMaxDynamicSharedMemorySize)) return cudaSuccess;
  if (value > smem_optin(g_device)) return cudaErrorInvalidValue;  // as a GPU refuses more than its opt-in
  g_max_smem[{kernel, g_device}] = value;
  return cudaSuccess;
}

void set_device(int device, int smem_optin_bytes) {
  g_device = device;
  if (smem_optin_bytes > 0) g_optin[device] = smem_optin_bytes;
}

void reset_devices() {  // the attributes set so far stay: a process never loses them
  g_device = 0;
  g_optin.clear();
}

int current_device() { return g_device; }

void run(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  if (g_block != nullptr) throw std::runtime_error("mdk_emu: a kernel launched another kernel");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024) throw std::runtime_error("mdk_emu: launch with " + std::to_string(threads) + " threads per block (1..1024)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("mdk_emu: launch with an empty grid");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("mdk_emu: grid.y and grid.z are limited to 65535");
  const auto it = g_max_smem.find({kernel, g_device});
  const int allowed = it == g_max_smem.end() ? kDefaultSmem : it->second;
  if (smem > static_cast<size_t>(allowed)) {
    throw std::runtime_error("mdk_emu: " + std::to_string(smem) + " bytes of dynamic shared memory, above the " +
                             std::to_string(allowed) + " allowed on device " + std::to_string(g_device) +
                             " (call cudaFuncSetAttribute first, on this device)");
  }
  Block b;
  b.grid = grid;
  b.block = block;
  b.n = static_cast<int>(threads);
  b.fibers.resize(b.n);
  b.exchange.assign(b.n, 0);
  b.body = &body;
  const int warps = (b.n + 31) / 32;
  std::vector<int> order(b.n);
  std::iota(order.begin(), order.end(), 0);
  if (g_schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
  std::mt19937_64 rng(g_seed + 7919 * g_launches++);
  g_block = &b;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          b.bid = uint3{x, y, z};
          b.done = b.arrived = 0;
          b.gen = 0;
          b.error.clear();
          b.warp_arrived.assign(warps, 0);
          b.warp_gen.assign(warps, 0);
          prepare_smem(b.smem, smem);
          if (g_schedule == Schedule::kShuffle) std::shuffle(order.begin(), order.end(), rng);
          run_block(b, order);
        }
  } catch (...) {
    g_block = nullptr;
    throw;
  }
  g_block = nullptr;
}

void set_schedule(Schedule s, uint64_t seed) {
  g_schedule = s;
  g_seed = seed;
}

}  // namespace mdk_emu

// The few runtime API calls the host code makes (bindings.cpp, common.h, the launchers): no real device,
// no driver, no errors pending; the current device and its opt-in shared memory are the emulator's
// (set_device in Python).
extern "C" {
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 0;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* version) {
  *version = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = mdk_emu::current_device();
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = mdk_emu::smem_optin(device);
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "(emulated)"; }
}
