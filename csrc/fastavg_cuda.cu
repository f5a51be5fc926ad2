// CUDA kernels: one launch per op call, one pass over each flat buffer.
//
// A grid-stride loop hands each thread a pack of elements: 16 bytes of parameters when every buffer of
// the launch is 16-byte aligned (flat buffers always are; a sub-range launch may not be), else a single
// element. The thread loads the pack of every buffer it touches with vector loads, runs the rules of
// fastavg_rules.h on each element in registers, in the CPU kernel's order, and stores each pack once.
//
// This file is torch-free: the registration (fastavg_cuda_ops.cpp) hands over raw pointers and the
// stream, so that it compiles with nvcc alone (CI compile-checks it without a CUDA build of torch).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastavg_step.h"

namespace fastavg {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kVectorBytes = 16;
// Devices whose launch geometry is cached; a device beyond this is still served, only without the cache.
constexpr int kMaxCachedDevices = 64;

void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("fastavg: ") + what + ": " + cudaGetErrorString(error));
  }
}

// Parameter dtype <-> fp32, rounding to nearest even as c10::BFloat16 and c10::Half do in the CPU kernel.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}

template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// N consecutive elements of one buffer. Aligned to 16 bytes when it spans 16 bytes or more, so that
// loading or storing it compiles to 16-byte vector accesses.
template <typename T, int N>
struct alignas(N * sizeof(T) >= kVectorBytes ? kVectorBytes : alignof(T)) Pack {
  T value[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load(const T* buffer, int64_t first) {
  return *reinterpret_cast<const Pack<T, N>*>(buffer + first);
}

template <int N, typename T>
__device__ __forceinline__ void store(T* buffer, int64_t first, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(buffer + first) = pack;
}

template <Optimizer O>
__device__ __forceinline__ float sgd_rule(float param, float grad, float* momentum_buffer, const StepConfig& c,
                                          const StepScalars& s) {
  if constexpr (O == Optimizer::sgd_torch) {
    return sgd_torch_rule(param, grad, momentum_buffer, c, s);
  } else {
    return sgd_heavy_ball_rule(param, grad, momentum_buffer, c, s);
  }
}

// The optimizer rule on N elements from `first`: their new θ, rounded to the parameter dtype. Optional
// state (momentum buffer; max_exp_avg_sq, which turns amsgrad on) is chosen by a branch around the loop
// rather than a per-element null pointer, so that every pack stays in registers.
template <Optimizer O, typename T, int N>
__device__ __forceinline__ void optimizer_pack(float (&theta)[N], const Pack<T, N>& param, const StepBuffers& b,
                                               const StepConfig& c, const StepScalars& s, int64_t first) {
  if constexpr (O == Optimizer::none) {
#pragma unroll
    for (int j = 0; j < N; ++j) theta[j] = to_float(param.value[j]);
  } else {
    const Pack<T, N> grad = load<N>(static_cast<const T*>(b.grad), first);
    if constexpr (O == Optimizer::adam) {
      Pack<float, N> exp_avg = load<N>(b.optimizer_state[0], first);
      Pack<float, N> exp_avg_sq = load<N>(b.optimizer_state[1], first);
      if (b.optimizer_state[2] != nullptr) {
        Pack<float, N> max_exp_avg_sq = load<N>(b.optimizer_state[2], first);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          theta[j] = round_to<T>(adam_rule(to_float(param.value[j]), to_float(grad.value[j]), &exp_avg.value[j],
                                           &exp_avg_sq.value[j], &max_exp_avg_sq.value[j], c, s));
        }
        store(b.optimizer_state[2], first, max_exp_avg_sq);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          theta[j] = round_to<T>(adam_rule(to_float(param.value[j]), to_float(grad.value[j]), &exp_avg.value[j],
                                           &exp_avg_sq.value[j], nullptr, c, s));
        }
      }
      store(b.optimizer_state[0], first, exp_avg);
      store(b.optimizer_state[1], first, exp_avg_sq);
    } else if (b.optimizer_state[0] == nullptr) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        theta[j] = round_to<T>(sgd_rule<O>(to_float(param.value[j]), to_float(grad.value[j]), nullptr, c, s));
      }
    } else {
      Pack<float, N> momentum_buffer = load<N>(b.optimizer_state[0], first);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        theta[j] = round_to<T>(
            sgd_rule<O>(to_float(param.value[j]), to_float(grad.value[j]), &momentum_buffer.value[j], c, s));
      }
      store(b.optimizer_state[0], first, momentum_buffer);
    }
  }
}

// The averaging rule on N elements from `first`, given their θ; BELAY also moves θ.
template <AverageRule R, typename T, int N>
__device__ __forceinline__ void average_pack(float (&theta)[N], const StepBuffers& b, const StepConfig& c,
                                             const float (&weights)[kMaxAverages], int64_t first) {
  if constexpr (R == AverageRule::ema) {
#pragma unroll
    for (int k = 0; k < kMaxAverages; ++k) {
      if (k == b.num_averages) break;
      Pack<float, N> average = load<N>(b.averages[k], first);
#pragma unroll
      for (int j = 0; j < N; ++j) average.value[j] = ema_rule(average.value[j], theta[j], weights[k]);
      store(b.averages[k], first, average);
    }
  } else if constexpr (R == AverageRule::belay) {
    Pack<float, N> average = load<N>(b.averages[0], first);
    if (b.average_velocity != nullptr) {
      Pack<float, N> velocity = load<N>(b.average_velocity, first);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        theta[j] = belay_rule(theta[j], &average.value[j], &velocity.value[j], weights[0], c);
      }
      store(b.average_velocity, first, velocity);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) theta[j] = belay_rule(theta[j], &average.value[j], nullptr, weights[0], c);
    }
    store(b.averages[0], first, average);
  } else if constexpr (R == AverageRule::lawa) {
    T* ring_buffer = static_cast<T*>(b.lawa_ring_slot);
    Pack<float, N> lawa_sum = load<N>(b.lawa_sum, first);
    Pack<T, N> ring_slot = load<N>(ring_buffer, first);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      lawa_sum.value[j] = lawa_rule(theta[j], lawa_sum.value[j], to_float(ring_slot.value[j]));
      ring_slot.value[j] = from_float<T>(theta[j]);
    }
    store(b.lawa_sum, first, lawa_sum);
    store(ring_buffer, first, ring_slot);
  }
}

// One step on N elements from `first`: optimizer rule, averaging, optional switch, θ stored once.
template <Optimizer O, AverageRule R, typename T, int N>
__device__ __forceinline__ void step_pack(const StepBuffers& b, const StepConfig& c, const StepScalars& s,
                                          const float (&weights)[kMaxAverages], int64_t first) {
  T* param_buffer = static_cast<T*>(b.param);
  Pack<T, N> param = load<N>(param_buffer, first);
  float theta[N];
  optimizer_pack<O>(theta, param, b, c, s, first);
  average_pack<R, T>(theta, b, c, weights, first);
  if (c.switch_to_average) {
    // Read back from memory: an EMA step has just stored this thread's new average there.
    const Pack<float, N> average = load<N>(b.averages[0], first);
#pragma unroll
    for (int j = 0; j < N; ++j) theta[j] = switch_rule(average.value[j]);
  }
#pragma unroll
  for (int j = 0; j < N; ++j) param.value[j] = from_float<T>(theta[j]);
  store(param_buffer, first, param);
}

template <Optimizer O, AverageRule R, typename T, int N>
__global__ void __launch_bounds__(kThreadsPerBlock) step_kernel(const StepBuffers b, const StepConfig c) {
  // lr, step and the averaging weights are read here, when the kernel runs, so that a captured CUDA graph
  // sees their values at replay. One thread per block derives the step scalars (fp64 pow) for all.
  __shared__ StepScalars shared_scalars;
  __shared__ float shared_weights[kMaxAverages];
  if (threadIdx.x == 0) {
    if constexpr (O == Optimizer::none) {
      shared_scalars = StepScalars{};
    } else {
      shared_scalars = step_scalars(*b.lr, *b.step, c);
    }
    const int num_weights = R == AverageRule::ema ? b.num_averages : (R == AverageRule::belay ? 1 : 0);
    for (int k = 0; k < kMaxAverages; ++k) shared_weights[k] = k < num_weights ? b.average_weights[k] : 0.f;
  }
  __syncthreads();
  const StepScalars s = shared_scalars;
  float weights[kMaxAverages];
#pragma unroll
  for (int k = 0; k < kMaxAverages; ++k) weights[k] = shared_weights[k];

  // Work items: the whole packs, then one item per element of the tail that does not fill a pack.
  const int64_t num_packs = b.numel / N;
  const int64_t num_items = num_packs + b.numel % N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < num_items;
       item += stride) {
    if (item < num_packs) {
      step_pack<O, R, T, N>(b, c, s, weights, item * N);
    } else {
      step_pack<O, R, T, 1>(b, c, s, weights, num_packs * N + (item - num_packs));
    }
  }
}

// How many blocks of `kernel` the device can hold at once: the grid of a grid-stride loop, so that every
// block runs in the first wave. Queried once per kernel and device; the queries do not synchronize.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, std::atomic<int64_t> (&cache)[kMaxCachedDevices]) {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  if (device < kMaxCachedDevices) {
    const int64_t cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sm_count = 0;
  check(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  int blocks_per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreadsPerBlock, 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const int64_t blocks = static_cast<int64_t>(sm_count) * std::max(blocks_per_sm, 1);
  if (device < kMaxCachedDevices) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <Optimizer O, AverageRule R, typename T, int N>
void launch(const StepBuffers& b, const StepConfig& c, cudaStream_t stream) {
  static std::atomic<int64_t> resident_blocks_cache[kMaxCachedDevices];  // zero (not yet queried): static storage
  const int64_t num_items = b.numel / N + b.numel % N;
  const int64_t blocks_needed = (num_items + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const int64_t blocks = std::min(blocks_needed, resident_blocks(step_kernel<O, R, T, N>, resident_blocks_cache));
  step_kernel<O, R, T, N><<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(b, c);
  check(cudaGetLastError(), "launching the step kernel failed");
}

bool is_vector_aligned(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % kVectorBytes == 0; }

// Whether every buffer of the launch starts on a 16-byte boundary (absent buffers are null, which is).
bool all_vector_aligned(const StepBuffers& b) {
  bool aligned = is_vector_aligned(b.param) && is_vector_aligned(b.grad) && is_vector_aligned(b.average_velocity) &&
                 is_vector_aligned(b.lawa_sum) && is_vector_aligned(b.lawa_ring_slot);
  for (const float* state : b.optimizer_state) aligned = aligned && is_vector_aligned(state);
  for (const float* average : b.averages) aligned = aligned && is_vector_aligned(average);
  return aligned;
}

template <Optimizer O, AverageRule R, typename T>
void dispatch_alignment(const StepBuffers& b, const StepConfig& c, cudaStream_t stream) {
  constexpr int kElementsPerVector = kVectorBytes / sizeof(T);
  if (all_vector_aligned(b)) {
    launch<O, R, T, kElementsPerVector>(b, c, stream);
  } else {
    launch<O, R, T, 1>(b, c, stream);
  }
}

template <Optimizer O, AverageRule R>
void dispatch_dtype(DType dtype, const StepBuffers& b, const StepConfig& c, cudaStream_t stream) {
  switch (dtype) {
    case DType::float32: return dispatch_alignment<O, R, float>(b, c, stream);
    case DType::bfloat16: return dispatch_alignment<O, R, __nv_bfloat16>(b, c, stream);
    case DType::float16: return dispatch_alignment<O, R, __half>(b, c, stream);
  }
  throw std::invalid_argument("fastavg: unknown parameter dtype");
}

template <Optimizer O>
void dispatch_rule(AverageRule rule, DType dtype, const StepBuffers& b, const StepConfig& c, cudaStream_t stream) {
  switch (rule) {
    case AverageRule::none: return dispatch_dtype<O, AverageRule::none>(dtype, b, c, stream);
    case AverageRule::ema: return dispatch_dtype<O, AverageRule::ema>(dtype, b, c, stream);
    case AverageRule::belay: return dispatch_dtype<O, AverageRule::belay>(dtype, b, c, stream);
    case AverageRule::lawa: return dispatch_dtype<O, AverageRule::lawa>(dtype, b, c, stream);
  }
  throw std::invalid_argument("fastavg: unknown averaging rule");
}

}  // namespace

void step_cuda(Optimizer optimizer, AverageRule rule, DType dtype, const StepBuffers& buffers,
               const StepConfig& config, void* stream) {
  if (buffers.numel == 0) return;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (optimizer) {
    case Optimizer::none: return dispatch_rule<Optimizer::none>(rule, dtype, buffers, config, cuda_stream);
    case Optimizer::sgd_torch: return dispatch_rule<Optimizer::sgd_torch>(rule, dtype, buffers, config, cuda_stream);
    case Optimizer::sgd_heavy_ball:
      return dispatch_rule<Optimizer::sgd_heavy_ball>(rule, dtype, buffers, config, cuda_stream);
    case Optimizer::adam: return dispatch_rule<Optimizer::adam>(rule, dtype, buffers, config, cuda_stream);
  }
  throw std::invalid_argument("fastavg: unknown optimizer");
}

}  // namespace fastavg
