// The runtime of cuda_emulation.h: blocks on OS threads, CUDA threads as fibers, barriers, devices, memory,
// errors. See the header for what is emulated and how.
#include "cuda_emulation.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMULATION_ASAN 1
#endif

#if defined(__x86_64__) && !defined(CUDA_EMULATION_UCONTEXT)
// cuda_emulation_switch(&from, to): saves the callee-saved registers on the current stack and its stack
// pointer in *from, then resumes the context whose stack pointer is `to`. No system call (swapcontext
// saves the signal mask with one), and no sanitizer interceptor clearing a whole stack's shadow on each
// switch: about 20 times faster than swapcontext, which matters at 256 fibers per block.
extern "C" void cuda_emulation_switch(void** from, void* to);
asm(R"(
  .text
  .globl cuda_emulation_switch
  .type cuda_emulation_switch, @function
cuda_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emulation_switch, .-cuda_emulation_switch
)");

namespace cuda_emulation {
namespace {

struct Context {
  void* stack_pointer = nullptr;
};

// A context that starts `entry` (which must never return) on the stack [stack, stack + size).
void make_context(Context& context, void* stack, size_t size, void (*entry)()) {
  auto* top = reinterpret_cast<uintptr_t*>((reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15});
  *--top = 0;                                    // entry's return address: none (and the ABI's alignment)
  *--top = reinterpret_cast<uintptr_t>(entry);  // where cuda_emulation_switch returns to
  for (int i = 0; i < 6; ++i) *--top = 0;        // rbp (0 ends a frame-pointer backtrace), rbx, r12-r15
  context.stack_pointer = top;
}

void switch_context(Context& from, Context& to) { cuda_emulation_switch(&from.stack_pointer, to.stack_pointer); }

}  // namespace
}  // namespace cuda_emulation
#else
#include <ucontext.h>

namespace cuda_emulation {
namespace {

struct Context {
  ucontext_t context;
};

void make_context(Context& context, void* stack, size_t size, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = size;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }

}  // namespace
}  // namespace cuda_emulation
#endif

namespace cuda_emulation {
namespace {

// Enough for the kernels' frames and for a sanitizer's report printed from inside a fiber.
constexpr size_t kStackBytes = 256 * 1024;
// The top of a stack that a finished fiber leaves poisoned under AddressSanitizer: fiber_main's frame, which
// never returns (every frame the kernel called returned).
constexpr size_t kUnpoisonBytes = 16 * 1024;

// The schedule starts as $CUDA_EMULATION_ORDER (forward, reverse or shuffled) with $CUDA_EMULATION_SEED, for
// programs that do not call set_schedule (the torch ops of torch_ops.cpp).
Order order_from_environment() {
  const char* order = std::getenv("CUDA_EMULATION_ORDER");
  if (order == nullptr || std::strcmp(order, "forward") == 0) return Order::forward;
  if (std::strcmp(order, "reverse") == 0) return Order::reverse;
  if (std::strcmp(order, "shuffled") == 0) return Order::shuffled;
  std::fprintf(stderr, "cuda_emulation: CUDA_EMULATION_ORDER must be forward, reverse or shuffled, got %s\n", order);
  std::abort();
}
uint64_t seed_from_environment() {
  const char* seed = std::getenv("CUDA_EMULATION_SEED");
  return seed == nullptr ? 0 : std::strtoull(seed, nullptr, 10);
}

Order schedule_order = order_from_environment();
uint64_t schedule_seed = seed_from_environment();
// An H100's 132 SMs of 2048 threads until set_devices says otherwise.
std::vector<Device> devices = {{"132 SMs", 132, 2048}};
int current_device = 0;
cudaError_t last_error = cudaSuccess;
Counters totals;

struct Fiber {
  enum State { ready, at_barrier, done };
  Context context;
  void* stack = nullptr;
  uint3 index{};
  State state = ready;
  const void* barrier = nullptr;  // where it called __syncthreads(), while it waits there
  void* fake_stack = nullptr;     // AddressSanitizer's, while the fiber is switched out
};

// The block an OS thread runs: its fibers and the scheduler's context.
struct Block {
  uint3 index{};
  dim3 dim, grid;
  std::vector<Fiber>* fibers = nullptr;
  Fiber* current = nullptr;
  Context scheduler;
  void (*body)(const void*) = nullptr;
  const void* context = nullptr;
  // AddressSanitizer: the scheduler's stack, learnt by the first fiber it switches to.
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  void* scheduler_fake_stack = nullptr;
};
thread_local Block* running_block = nullptr;

// Fiber stacks, shared by the blocks (which run one at a time), each above a guard page.
std::vector<void*> stack_pool;

void* fiber_stack(size_t i) {
  while (stack_pool.size() <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) fail("mmap of a fiber stack failed", __FILE__, __LINE__);
    mprotect(memory, page, PROT_NONE);
    stack_pool.push_back(static_cast<char*>(memory) + page);
  }
  return stack_pool[i];
}

// AddressSanitizer must be told when the stack changes under it (fake stacks, stack bounds).
void start_switch(void** fake_stack, const void* bottom, size_t size) {
#ifdef CUDA_EMULATION_ASAN
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}
void finish_switch(void* fake_stack, const void** bottom, size_t* size) {
#ifdef CUDA_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}

void fiber_main() {
  Block& block = *running_block;
  finish_switch(nullptr, &block.scheduler_stack, &block.scheduler_stack_size);
  block.body(block.context);
  block.current->state = Fiber::done;
  start_switch(nullptr, block.scheduler_stack, block.scheduler_stack_size);  // this fiber's fake stack dies
  Context finished;
  switch_context(finished, block.scheduler);
  fail("a finished fiber was resumed", __FILE__, __LINE__);
}

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::vector<unsigned> order_of(size_t n, uint64_t launch, uint64_t block, uint64_t phase) {
  std::vector<unsigned> order(n);
  std::iota(order.begin(), order.end(), 0u);
  if (schedule_order == Order::reverse) {
    std::reverse(order.begin(), order.end());
  } else if (schedule_order == Order::shuffled) {
    uint64_t state = mix(schedule_seed ^ mix(launch ^ mix(block ^ mix(phase))));
    for (size_t i = n; i > 1; --i) {
      state = mix(state);
      std::swap(order[i - 1], order[state % i]);
    }
  }
  return order;
}

void run_block(Block& block, uint64_t launch, uint64_t linear_block) {
  running_block = &block;
  const unsigned n = block.dim.x * block.dim.y * block.dim.z;
  std::vector<Fiber> fibers(n);
  block.fibers = &fibers;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
    f.index = uint3{t % block.dim.x, t / block.dim.x % block.dim.y, t / (block.dim.x * block.dim.y)};
    f.stack = fiber_stack(t);
#ifdef CUDA_EMULATION_ASAN
    // The frames that never returned on this stack (a finished fiber's fiber_main) stay poisoned.
    __asan_unpoison_memory_region(static_cast<char*>(f.stack) + kStackBytes - kUnpoisonBytes, kUnpoisonBytes);
#endif
    make_context(f.context, f.stack, kStackBytes, fiber_main);
  }
  for (uint64_t phase = 0;; ++phase) {
    for (const unsigned t : order_of(n, launch, linear_block, phase)) {
      Fiber& f = fibers[t];
      if (f.state == Fiber::done) continue;
      f.state = Fiber::ready;
      block.current = &f;
      start_switch(&block.scheduler_fake_stack, f.stack, kStackBytes);
      switch_context(block.scheduler, f.context);
      finish_switch(block.scheduler_fake_stack, nullptr, nullptr);
    }
    block.current = nullptr;
    unsigned waiting = 0, exited = 0, elsewhere = 0;
    const void* barrier = nullptr;
    for (const Fiber& f : fibers) {
      if (f.state != Fiber::at_barrier) {
        exited += 1;
        continue;
      }
      waiting += 1;
      if (barrier == nullptr) barrier = f.barrier;
      elsewhere += f.barrier != barrier;
    }
    if (waiting == 0) break;
    if (exited != 0 || elsewhere != 0) {
      std::fprintf(stderr,
                   "cuda_emulation: block (%u,%u,%u): %u threads wait at a __syncthreads() while %u threads have "
                   "exited and %u wait at another one (a barrier in divergent code)\n",
                   block.index.x, block.index.y, block.index.z, waiting - elsewhere, exited, elsewhere);
      std::abort();
    }
    totals.barriers += 1;
  }
  running_block = nullptr;
}

Block& current_block(const char* what) {
  if (running_block == nullptr || running_block->current == nullptr) {
    std::fprintf(stderr, "cuda_emulation: %s outside a kernel\n", what);
    std::abort();
  }
  return *running_block;
}

// "Device" allocations, sorted by address: [first, second). Changed by cudaMalloc/cudaFree, which a kernel
// does not call (and which the host does not call while a launch runs: launches are synchronous here).
std::vector<std::pair<uintptr_t, uintptr_t>> allocations;
std::pair<uintptr_t, uintptr_t> recent_allocations[16] = {};  // a cache of `allocations`, emptied by cudaFree
unsigned next_recent = 0;
std::vector<Access>* access_log = nullptr;
size_t access_log_min_bytes = 1;

}  // namespace

void set_schedule(Order order, uint64_t seed) {
  schedule_order = order;
  schedule_seed = seed;
}

void set_devices(const Device* list, int count) {
  devices.assign(list, list + count);
  current_device = 0;
}

Counters counters() { return totals; }

const uint3& thread_idx() { return current_block("threadIdx").current->index; }
const uint3& block_idx() { return current_block("blockIdx").index; }
const dim3& block_dim() { return current_block("blockDim").dim; }
const dim3& grid_dim() { return current_block("gridDim").grid; }

void syncthreads() {
  Block& block = current_block("__syncthreads()");
  Fiber& f = *block.current;
  f.state = Fiber::at_barrier;
  f.barrier = __builtin_return_address(0);
  start_switch(&f.fake_stack, block.scheduler_stack, block.scheduler_stack_size);
  switch_context(f.context, block.scheduler);
  finish_switch(f.fake_stack, nullptr, nullptr);
}

bool checking_accesses = false;

void set_access_log(std::vector<Access>* log, size_t min_bytes) {
  access_log = log;
  access_log_min_bytes = min_bytes;
  checking_accesses = log != nullptr;
}

bool is_global(const void* pointer, size_t bytes) {
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  if (access_log != nullptr && bytes >= access_log_min_bytes) access_log->push_back(Access{address, bytes});
  // The buffers a kernel touches are few: the last ones found answer almost every access.
  for (const auto& range : recent_allocations) {
    if (address >= range.first && address + bytes <= range.second) return true;
  }
  auto it = std::upper_bound(allocations.begin(), allocations.end(), std::make_pair(address, ~uintptr_t{0}));
  if (it != allocations.begin() && address + bytes <= (--it)->second) {
    recent_allocations[next_recent++ % std::size(recent_allocations)] = *it;
    return true;
  }
  std::fprintf(stderr, "cuda_emulation: an access of %zu bytes at %p is outside every device allocation\n", bytes,
               pointer);
  return false;
}

void fail(const char* message, const char* file, int line) {
  if (running_block != nullptr && running_block->current != nullptr) {
    const uint3 t = running_block->current->index, b = running_block->index;
    std::fprintf(stderr, "cuda_emulation: %s:%d: block (%u,%u,%u), thread (%u,%u,%u): failed: %s\n", file, line,
                 b.x, b.y, b.z, t.x, t.y, t.z, message);
  } else {
    std::fprintf(stderr, "cuda_emulation: %s:%d: failed: %s\n", file, line, message);
  }
  std::abort();
}

bool run_grid(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, void (*body)(const void*),
              const void* context) {
  (void)shared_bytes, (void)stream;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || blocks == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535u ||
      grid.z > 65535u) {
    last_error = cudaErrorInvalidConfiguration;
    return false;
  }
  const uint64_t launch = static_cast<uint64_t>(totals.launches++);
  for (const unsigned b : order_of(blocks, launch, ~uint64_t{0}, 0)) {
    Block state;
    state.index = uint3{b % grid.x, b / grid.x % grid.y, static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    state.dim = block;
    state.grid = grid;
    state.body = body;
    state.context = context;
    // A new OS thread per block: its __shared__ variables (thread_local) start afresh.
    std::thread worker(run_block, std::ref(state), launch, static_cast<uint64_t>(b));
    worker.join();
    totals.blocks += 1;
    totals.threads += static_cast<int64_t>(threads);
  }
  return true;
}

}  // namespace cuda_emulation

using cuda_emulation::devices;

// --- the runtime API -------------------------------------------------------------------------------------

cudaError_t cudaGetDevice(int* device) {
  *device = cuda_emulation::current_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= static_cast<int>(devices.size())) return cudaErrorInvalidDevice;
  cuda_emulation::current_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = static_cast<int>(devices.size());
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device < 0 || device >= static_cast<int>(devices.size())) return cudaErrorInvalidDevice;
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = devices[device].multiprocessors; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = devices[device].max_threads_per_multiprocessor; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = static_cast<int>(cuda_emulation::kMaxThreadsPerBlock); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void* kernel, int block_size,
                                                                   size_t dynamic_shared_bytes, unsigned int flags) {
  (void)dynamic_shared_bytes, (void)flags;
  if (kernel == nullptr || block_size <= 0 || block_size > static_cast<int>(cuda_emulation::kMaxThreadsPerBlock)) {
    return cudaErrorInvalidValue;
  }
  *blocks = std::max(1, devices[cuda_emulation::current_device].max_threads_per_multiprocessor / block_size);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t error = cuda_emulation::last_error;
  cuda_emulation::last_error = cudaSuccess;
  return error;
}

cudaError_t cudaPeekAtLastError(void) { return cuda_emulation::last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    default: return "cudaError (emulated)";
  }
}

const char* cudaGetErrorString(cudaError_t error) { return cudaGetErrorName(error); }

cudaError_t cudaMalloc(void** pointer, size_t bytes) {
  *pointer = nullptr;
  if (bytes == 0) return cudaSuccess;
  // Exactly `bytes`: a sanitizer's redzone starts right after the last byte.
  if (posix_memalign(pointer, 256, bytes) != 0) return cudaErrorMemoryAllocation;
  auto& allocations = cuda_emulation::allocations;
  const auto start = reinterpret_cast<uintptr_t>(*pointer);
  allocations.insert(std::upper_bound(allocations.begin(), allocations.end(), std::make_pair(start, start)),
                     std::make_pair(start, start + bytes));
  return cudaSuccess;
}

cudaError_t cudaFree(void* pointer) {
  if (pointer == nullptr) return cudaSuccess;
  auto& allocations = cuda_emulation::allocations;
  const auto start = reinterpret_cast<uintptr_t>(pointer);
  const auto it = std::find_if(allocations.begin(), allocations.end(), [&](const auto& a) { return a.first == start; });
  if (it == allocations.end()) return cudaErrorInvalidValue;
  allocations.erase(it);
  for (auto& range : cuda_emulation::recent_allocations) range = {};
  std::free(pointer);
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }  // launches run to completion when made
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  (void)stream;
  return cudaSuccess;
}
