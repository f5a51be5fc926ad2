// CUDA on the CPU: what csrc/fastavg_cuda.cu needs of the CUDA language and runtime, so that the file itself
// compiles as host C++ and its kernels run, thread by thread, on the CPU.
//
//   g++ -x c++ -include .ci/cuda_emulation/cuda_emulation.h -isystem <toolkit>/include csrc/fastavg_cuda.cu
//
// - Types, enums and API prototypes are the toolkit's (cuda_runtime_api.h, vector_types.h), and so are the
//   bfloat16/half conversions: cuda_bf16.h and cuda_fp16.h take their host paths (no __CUDACC__, no
//   __CUDA_ARCH__). This header stands in for cuda_runtime.h (the CUDA language part of it).
// - __global__, __device__ and __host__ are the toolkit's host definitions (nothing); __launch_bounds__ is
//   dropped (a launch of more than kMaxThreadsPerBlock threads per block is refused, as on a GPU).
// - A launch runs every block of the grid, one after another in the order of `set_schedule`, each on an OS
//   thread of its own, and every CUDA thread of a block as a fiber on that OS thread (a stack of its own,
//   switched by a few instructions on x86-64, by swapcontext elsewhere or with -DCUDA_EMULATION_UCONTEXT). A
//   fiber runs until it reaches __syncthreads() or returns; __syncthreads() is a real barrier: the block's
//   threads are resumed, in the schedule's order again, only when all of them have reached it. A barrier
//   that some threads reach while others have exited or wait at another __syncthreads() call is an error.
// - __shared__ variables are thread_local statics: one instance per block, since a block's fibers share
//   their OS thread and each block gets a new OS thread, where they start zeroed (a GPU leaves whatever the
//   previous block wrote; either way a thread that reads them before the barrier reads a wrong value).
// - threadIdx, blockIdx, blockDim and gridDim are the running fiber's and block's.
// - The launch: fastavg_cuda.cu launches through FASTAVG_CUDA_LAUNCH(kernel, grid, block, stream)(args...),
//   which is kernel<<<grid, block, 0, stream>>>(args...) under nvcc and an emulated launch here. Arguments
//   are copied once per launch, like a kernel's parameters; errors are reported by cudaGetLastError().
// - Devices: cudaGetDevice/cudaSetDevice choose among the emulated devices of `set_devices` (by default one,
//   an H100's 132 SMs of 2048 threads), whose SM count and blocks per SM (cudaDeviceGetAttribute,
//   cudaOccupancyMaxActiveBlocksPerMultiprocessor) decide the grid of a kernel that sizes its grid by
//   occupancy. The schedule starts as $CUDA_EMULATION_ORDER (forward, reverse, shuffled; default forward)
//   and $CUDA_EMULATION_SEED, for programs that do not call `set_schedule`.
// - Memory: cudaMalloc returns host memory of exactly the requested size (so that AddressSanitizer's
//   redzones border it), 256-byte aligned like the CUDA allocator. __isGlobal(p) is true when the whole
//   object *p lies inside such an allocation; __builtin_assume(c) fails the run when c is false (g++ has no
//   such builtin). fastavg_cuda.cu asserts __builtin_assume(__isGlobal(p)) at every access when CUDA_EMULATION
//   is defined, which this header does: so every access of a launch run with `set_access_log` is checked
//   and logged with its width.
#pragma once

#ifdef __CUDACC__
#error "cuda_emulation.h is for compiling CUDA sources with a host compiler, not with nvcc"
#endif

#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// cuda_runtime.h is the CUDA language part of the runtime header; this file replaces it.
#define __CUDA_RUNTIME_H__
#define CUDA_EMULATION 1

#undef __shared__
#define __shared__ static thread_local
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace cuda_emulation {

constexpr unsigned kMaxThreadsPerBlock = 1024;

// --- settings of the emulation, for the harness ----------------------------------------------------------

// The order in which the blocks of a grid run, and the threads of a block start and leave each barrier.
// `shuffled` draws a new permutation per launch, block and barrier phase from `seed`.
enum class Order { forward, reverse, shuffled };
void set_schedule(Order order, uint64_t seed);

struct Device {
  const char* name;
  int multiprocessors;
  int max_threads_per_multiprocessor;  // occupancy: this / block size, at least 1
};
void set_devices(const Device* devices, int count);

struct Counters {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0;
};
Counters counters();

// While a log is set, __isGlobal checks the object it is given, and appends the access to the log when it is
// `min_bytes` wide or wider; else it answers true without looking, which keeps launches fast.
struct Access {
  uintptr_t address;
  size_t bytes;
};
void set_access_log(std::vector<Access>* log, size_t min_bytes = 1);
extern bool checking_accesses;

// --- the CUDA language -----------------------------------------------------------------------------------

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads();
bool is_global(const void* pointer, size_t bytes);
[[noreturn]] void fail(const char* message, const char* file, int line);

inline void assume(bool condition, const char* text, const char* file, int line) {
  if (!condition) fail(text, file, line);
}

// Runs `body(context)` as every thread of every block of the grid; false (with cudaGetLastError set) when
// the configuration is invalid.
bool run_grid(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, void (*body)(const void*),
              const void* context);

template <typename... Params>
class Launch {
 public:
  using Kernel = void (*)(Params...);
  Launch(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream)
      : kernel_(kernel), grid_(grid), block_(block), shared_bytes_(shared_bytes), stream_(stream) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "a kernel launch passes every parameter");
    // The kernel's parameters, copied once for the launch: every thread reads the same values.
    const Call call{kernel_, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    run_grid(grid_, block_, shared_bytes_, stream_, &Launch::run, &call);
  }

 private:
  struct Call {
    Kernel kernel;
    std::tuple<std::decay_t<Params>...> parameters;
  };
  static void run(const void* context) {
    const Call& call = *static_cast<const Call*>(context);
    std::apply(call.kernel, call.parameters);
  }
  Kernel kernel_;
  dim3 grid_, block_;
  size_t shared_bytes_;
  cudaStream_t stream_;
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream) {
  return Launch<Params...>(kernel, grid, block, shared_bytes, stream);
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::thread_idx())
#define blockIdx (::cuda_emulation::block_idx())
#define blockDim (::cuda_emulation::block_dim())
#define gridDim (::cuda_emulation::grid_dim())
#define __syncthreads() ::cuda_emulation::syncthreads()

inline bool __isGlobal(const void* pointer) {
  return !::cuda_emulation::checking_accesses || ::cuda_emulation::is_global(pointer, 1);
}
template <typename T>
bool __isGlobal(const T* pointer) {
  return !::cuda_emulation::checking_accesses || ::cuda_emulation::is_global(pointer, sizeof(T));
}
#if !defined(__has_builtin) || !__has_builtin(__builtin_assume)
#define __builtin_assume(condition) \
  ::cuda_emulation::assume(static_cast<bool>(condition), #condition, __FILE__, __LINE__)
#endif

// What cuda_runtime.h adds to the C API for C++ callers.
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel kernel, int block_size,
                                                           size_t dynamic_shared_bytes) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
      blocks, reinterpret_cast<const void*>(kernel), block_size, dynamic_shared_bytes, cudaOccupancyDefault);
}

#define FASTAVG_CUDA_LAUNCH(kernel, grid, block, stream) ::cuda_emulation::launch(kernel, grid, block, 0, stream)
