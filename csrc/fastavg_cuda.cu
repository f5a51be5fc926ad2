// CUDA kernels: one launch per op call, over the segment table of fastavg_step.h.
//
// A block takes one row of the table (a run of at most 65536 contiguous parameter elements and the same
// run of every flat state and average buffer, from the row's offset); when the table has more rows than
// the grid, blocks stride over the rows. Per row, one uniform check picks the vector path, when the
// param, grad and every state and average pointer (base + offset) of the row are 16-byte aligned, or the
// scalar path. On the vector path each thread takes packs of 16 bytes of parameters (4 fp32 or 8
// bf16/fp16 elements) and the elements of the row's tail that do not fill a pack go one at a time; on the
// scalar path every element goes one at a time. A thread loads the pack of every buffer it touches once,
// runs the rules of fastavg_rules.h on each element in registers, in the CPU kernel's order, and stores
// each pack once.
//
// This file is torch-free: the registration (fastavg_cuda_ops.cpp) hands over raw pointers and the
// stream, so that it compiles with nvcc alone (CI compile-checks it without a CUDA build of torch). CI also
// compiles it as host C++ against the CUDA emulation of .ci/cuda_emulation/ and runs the kernels on the CPU:
// hence the launch macro below, and nothing here may assume nvcc beyond what that emulation provides.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastavg_step.h"

#define FASTAVG_CUDA_HD __host__ __device__ __forceinline__

// kernel<<<grid, block, 0, stream>>>(arguments...), written FASTAVG_CUDA_LAUNCH(kernel, grid, block,
// stream)(arguments...) so that the CPU emulation (.ci/cuda_emulation/cuda_emulation.h) can run it.
#ifndef FASTAVG_CUDA_LAUNCH
#define FASTAVG_CUDA_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#endif

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
FASTAVG_CUDA_HD float to_float(float x) { return x; }
FASTAVG_CUDA_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
FASTAVG_CUDA_HD float to_float(__half x) { return __half2float(x); }

template <typename T>
FASTAVG_CUDA_HD T from_float(float x);
template <>
FASTAVG_CUDA_HD float from_float<float>(float x) {
  return x;
}
template <>
FASTAVG_CUDA_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
FASTAVG_CUDA_HD __half from_float<__half>(float x) {
  return __float2half(x);
}

template <typename T>
FASTAVG_CUDA_HD float round_to(float x) {
  return to_float(from_float<T>(x));
}

// N consecutive elements of one buffer. Aligned to 16 bytes when it spans 16 bytes or more, so that
// loading or storing it compiles to 16-byte vector accesses.
template <typename T, int N>
struct alignas(N * sizeof(T) >= kVectorBytes ? kVectorBytes : alignof(T)) Pack {
  T value[N];
};

// Every buffer is a tensor in global memory. Telling the compiler so at each access turns it into a
// global one (LDG/STG): for the addresses that come from the table, which it reads from memory, it could
// not infer that and would emit generic accesses (LD/ST). The CPU emulation checks the same claim at every
// access, and records each access's width (a pack's), which shows the path each row takes.
template <typename T>
FASTAVG_CUDA_HD T* assume_global(T* pointer) {
#if defined(__CUDA_ARCH__) || defined(CUDA_EMULATION)
  __builtin_assume(__isGlobal(pointer));
#endif
  return pointer;
}

template <int N, typename T>
FASTAVG_CUDA_HD Pack<T, N> load(const T* buffer, int64_t first) {
  return *assume_global(reinterpret_cast<const Pack<T, N>*>(buffer + first));
}

template <int N, typename T>
FASTAVG_CUDA_HD void store(T* buffer, int64_t first, const Pack<T, N>& pack) {
  *assume_global(reinterpret_cast<Pack<T, N>*>(buffer + first)) = pack;
}

// One row of the table with its pointers typed: element j is param[j], grad[j] and element offset + j of
// every flat buffer.
template <typename T>
struct Row {
  T* param;
  const T* grad;  // null for average_
  int64_t numel;
  int64_t offset;
};

template <typename T>
FASTAVG_CUDA_HD T* pointer_at(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

template <typename T>
FASTAVG_CUDA_HD Row<T> row_of(const Segment& segment) {
  return Row<T>{pointer_at<T>(segment.param), pointer_at<const T>(segment.grad), segment.numel, segment.offset};
}

template <Optimizer O>
FASTAVG_CUDA_HD float sgd_rule(float param, float grad, float* momentum_buffer, const StepConfig& c,
                               const StepScalars& s) {
  if constexpr (O == Optimizer::sgd_torch) {
    return sgd_torch_rule(param, grad, momentum_buffer, c, s);
  } else {
    return sgd_heavy_ball_rule(param, grad, momentum_buffer, c, s);
  }
}

// A gradient element in fp32, unscaled: times 1/GradScaler's scale (1 without one, which is exact).
template <typename T>
FASTAVG_CUDA_HD float unscaled(T grad, float inv_grad_scale) {
  return to_float(grad) * inv_grad_scale;
}

// The optimizer rule on the N elements of a pack: their new θ, rounded to the parameter dtype (the gradient is
// unscaled in registers, never written back). `first` indexes the row's param and grad, `at` the flat buffers.
// Optional state (momentum buffer; max_exp_avg_sq, which turns amsgrad on) is chosen by a branch around the loop
// rather than a per-element null pointer, so that every pack stays in registers.
template <Optimizer O, typename T, int N>
FASTAVG_CUDA_HD void optimizer_pack(float (&theta)[N], const Pack<T, N>& param, const Row<T>& row,
                                    const StepBuffers& b, const StepConfig& c, const StepScalars& s,
                                    float inv_grad_scale, int64_t first, int64_t at) {
  if constexpr (O == Optimizer::none) {
#pragma unroll
    for (int j = 0; j < N; ++j) theta[j] = to_float(param.value[j]);
  } else {
    const Pack<T, N> grad = load<N>(row.grad, first);
    if constexpr (O == Optimizer::adam) {
      Pack<float, N> exp_avg = load<N>(b.optimizer_state[0], at);
      Pack<float, N> exp_avg_sq = load<N>(b.optimizer_state[1], at);
      if (b.optimizer_state[2] != nullptr) {
        Pack<float, N> max_exp_avg_sq = load<N>(b.optimizer_state[2], at);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          theta[j] = round_to<T>(adam_rule(to_float(param.value[j]), unscaled(grad.value[j], inv_grad_scale),
                                           &exp_avg.value[j], &exp_avg_sq.value[j], &max_exp_avg_sq.value[j], c, s));
        }
        store(b.optimizer_state[2], at, max_exp_avg_sq);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          theta[j] = round_to<T>(adam_rule(to_float(param.value[j]), unscaled(grad.value[j], inv_grad_scale),
                                           &exp_avg.value[j], &exp_avg_sq.value[j], nullptr, c, s));
        }
      }
      store(b.optimizer_state[0], at, exp_avg);
      store(b.optimizer_state[1], at, exp_avg_sq);
    } else if (b.optimizer_state[0] == nullptr) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        theta[j] = round_to<T>(
            sgd_rule<O>(to_float(param.value[j]), unscaled(grad.value[j], inv_grad_scale), nullptr, c, s));
      }
    } else {
      Pack<float, N> momentum_buffer = load<N>(b.optimizer_state[0], at);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        theta[j] = round_to<T>(sgd_rule<O>(to_float(param.value[j]), unscaled(grad.value[j], inv_grad_scale),
                                           &momentum_buffer.value[j], c, s));
      }
      store(b.optimizer_state[0], at, momentum_buffer);
    }
  }
}

// One EMA on the N elements of a pack at `at` of the flat buffers, given their θ; returns the new average.
template <int N>
FASTAVG_CUDA_HD Pack<float, N> ema_pack(float* averages, const float (&theta)[N], float weight, int64_t at) {
  Pack<float, N> average = load<N>(averages, at);
#pragma unroll
  for (int j = 0; j < N; ++j) average.value[j] = ema_rule(average.value[j], theta[j], weight);
  store(averages, at, average);
  return average;
}

// The averaging rule on the N elements of a pack at `at` of the flat buffers, given their θ; BELAY also
// moves θ. `average0` receives the new value of averages[0] (EMA, BELAY), which a switch copies into θ.
template <AverageRule R, typename T, int N>
FASTAVG_CUDA_HD void average_pack(float (&theta)[N], float (&average0)[N], const StepBuffers& b, const StepConfig& c,
                                  const float (&weights)[kMaxAverages], int64_t at) {
  if constexpr (R == AverageRule::ema) {
    // averages[0] always exists: EMA updates 1 to kMaxAverages of them.
    const Pack<float, N> first_average = ema_pack(b.averages[0], theta, weights[0], at);
#pragma unroll
    for (int j = 0; j < N; ++j) average0[j] = first_average.value[j];
#pragma unroll
    for (int k = 1; k < kMaxAverages; ++k) {
      if (k == b.num_averages) break;
      ema_pack(b.averages[k], theta, weights[k], at);
    }
  } else if constexpr (R == AverageRule::belay) {
    Pack<float, N> average = load<N>(b.averages[0], at);
    if (b.average_velocity != nullptr) {
      Pack<float, N> velocity = load<N>(b.average_velocity, at);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        theta[j] = belay_rule(theta[j], &average.value[j], &velocity.value[j], weights[0], c);
      }
      store(b.average_velocity, at, velocity);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) theta[j] = belay_rule(theta[j], &average.value[j], nullptr, weights[0], c);
    }
    store(b.averages[0], at, average);
#pragma unroll
    for (int j = 0; j < N; ++j) average0[j] = average.value[j];
  } else if constexpr (R == AverageRule::lawa) {
    T* ring_buffer = static_cast<T*>(b.lawa_ring_slot);
    Pack<float, N> lawa_sum = load<N>(b.lawa_sum, at);
    Pack<T, N> ring_slot = load<N>(ring_buffer, at);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      lawa_sum.value[j] = lawa_rule(theta[j], lawa_sum.value[j], to_float(ring_slot.value[j]));
      ring_slot.value[j] = from_float<T>(theta[j]);
    }
    store(b.lawa_sum, at, lawa_sum);
    store(ring_buffer, at, ring_slot);
  }
}

// One step on the N elements of a row from `first`: optimizer rule, averaging, optional switch, θ stored
// once (or not at all when nothing changes it: writes_param).
template <Optimizer O, AverageRule R, typename T, int N>
FASTAVG_CUDA_HD void step_pack(const Row<T>& row, const StepBuffers& b, const StepConfig& c, const StepScalars& s,
                               float inv_grad_scale, const float (&weights)[kMaxAverages], int64_t first) {
  const int64_t at = row.offset + first;
  Pack<T, N> param = load<N>(row.param, first);
  float theta[N];
  float average0[N];
  optimizer_pack<O>(theta, param, row, b, c, s, inv_grad_scale, first, at);
  average_pack<R, T>(theta, average0, b, c, weights, at);
  // A LAWA snapshot step never switches (the op refuses it).
  if constexpr (R != AverageRule::lawa) {
    if (c.switch_to_average) {
      if constexpr (R == AverageRule::none) {
        // Switch alone: the average is read here, the only time this step touches it.
        const Pack<float, N> average = load<N>(b.averages[0], at);
#pragma unroll
        for (int j = 0; j < N; ++j) average0[j] = average.value[j];
      }
      // EMA and BELAY: the average this step has just computed, still in registers.
#pragma unroll
      for (int j = 0; j < N; ++j) theta[j] = switch_rule(average0[j]);
    }
  }
  // θ is stored only when the step can change it: averaging alone (EMA, SWA, LAWA, no rule, without a switch)
  // leaves the parameter's memory unwritten. Uniform per launch (a template argument or c.switch_to_average);
  // for a LAWA snapshot, which never switches, there is no parameter store in the kernel at all.
  if (writes_param(O, R, R != AverageRule::lawa && c.switch_to_average)) {
#pragma unroll
    for (int j = 0; j < N; ++j) param.value[j] = from_float<T>(theta[j]);
    store(row.param, first, param);
  }
}

FASTAVG_CUDA_HD uintptr_t address_bits(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer); }

// The address of element `at` of a flat buffer (0 for an absent buffer).
FASTAVG_CUDA_HD uintptr_t flat_address(const void* base, int64_t at, size_t element_size) {
  return base == nullptr ? 0 : address_bits(base) + static_cast<uintptr_t>(at) * element_size;
}

// Whether every buffer of the row starts on a 16-byte boundary: param, grad and each state and average
// buffer at the row's offset (absent buffers are null, which is). The same for every thread of a block.
template <typename T>
FASTAVG_CUDA_HD bool is_vector_aligned(const Row<T>& row, const StepBuffers& b) {
  uintptr_t bits = address_bits(row.param) | address_bits(row.grad);
  for (const float* state : b.optimizer_state) bits |= flat_address(state, row.offset, sizeof(float));
  for (const float* average : b.averages) bits |= flat_address(average, row.offset, sizeof(float));
  bits |= flat_address(b.average_velocity, row.offset, sizeof(float));
  bits |= flat_address(b.lawa_sum, row.offset, sizeof(float));
  bits |= flat_address(b.lawa_ring_slot, row.offset, sizeof(T));
  return bits % kVectorBytes == 0;
}

// The work of one row, shared by the `lanes` threads of a block; this thread is `lane`. Consecutive lanes
// take consecutive packs (then elements), so that a warp's accesses coalesce.
template <Optimizer O, AverageRule R, typename T>
FASTAVG_CUDA_HD void step_row(const Segment& segment, const StepBuffers& b, const StepConfig& c,
                              const StepScalars& s, float inv_grad_scale, const float (&weights)[kMaxAverages],
                              int64_t lane, int64_t lanes) {
  constexpr int kPackElements = kVectorBytes / sizeof(T);
  const Row<T> row = row_of<T>(segment);
  int64_t scalar_first = 0;  // where the elements taken one at a time begin
  if (is_vector_aligned(row, b)) {
    const int64_t num_packs = row.numel / kPackElements;
    for (int64_t pack = lane; pack < num_packs; pack += lanes) {
      step_pack<O, R, T, kPackElements>(row, b, c, s, inv_grad_scale, weights, pack * kPackElements);
    }
    scalar_first = num_packs * kPackElements;
  }
  for (int64_t element = scalar_first + lane; element < row.numel; element += lanes) {
    step_pack<O, R, T, 1>(row, b, c, s, inv_grad_scale, weights, element);
  }
}

// The averaging weights this launch reads: num_averages (EMA), one (BELAY) or none.
template <AverageRule R>
FASTAVG_CUDA_HD int num_weights(const StepBuffers& b) {
  return R == AverageRule::ema ? b.num_averages : (R == AverageRule::belay ? 1 : 0);
}

template <Optimizer O, AverageRule R, typename T>
__global__ void __launch_bounds__(kThreadsPerBlock) step_kernel(const StepBuffers b, const StepConfig c) {
  // lr, step and the averaging weights are read here, when the kernel runs, so that a captured CUDA graph
  // sees their values at replay. One thread per block derives the step scalars (fp64 pow) for all.
  __shared__ StepScalars shared_scalars;
  __shared__ float shared_weights[kMaxAverages];
  __shared__ bool shared_skip;
  if (threadIdx.x == 0) {
    // GradScaler found an inf or NaN: the whole block returns below, having changed nothing.
    shared_skip = skip_step(b.found_inf);
    if constexpr (O == Optimizer::none) {
      shared_scalars = StepScalars{};
    } else {
      shared_scalars = step_scalars(*b.lr, *b.step, c);
    }
    const int count = num_weights<R>(b);
    for (int k = 0; k < kMaxAverages; ++k) shared_weights[k] = k < count ? b.average_weights[k] : 0.f;
  }
  __syncthreads();
  if (shared_skip) return;  // uniform across the block, after the barrier
  const StepScalars s = shared_scalars;
  // GradScaler's 1/scale: every thread reads the same value (one broadcast load per warp), none without a scale.
  const float inv_grad_scale = O == Optimizer::none ? 1.f : inverse_grad_scale(b.inv_grad_scale);
  float weights[kMaxAverages];
#pragma unroll
  for (int k = 0; k < kMaxAverages; ++k) weights[k] = shared_weights[k];

  for (int64_t index = blockIdx.x; index < b.num_segments; index += gridDim.x) {
    // Every thread of the block reads the same 32 bytes: one broadcast load per warp.
    const Segment segment = b.segments[index];
    step_row<O, R, T>(segment, b, c, s, inv_grad_scale, weights, threadIdx.x, blockDim.x);
  }
}

// How many blocks of `kernel` the device can hold at once: the grid of a grid-stride loop over rows, so
// that every block runs in the first wave. Queried once per kernel and device; the queries do not
// synchronize.
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

template <Optimizer O, AverageRule R, typename T>
void launch(const StepBuffers& b, const StepConfig& c, cudaStream_t stream) {
  static std::atomic<int64_t> resident_blocks_cache[kMaxCachedDevices];  // zero (not yet queried): static storage
  // The number of rows is all the host knows of the table (which is in device memory): one block per row,
  // up to one wave of resident blocks, which then stride over the rows.
  const auto kernel = step_kernel<O, R, T>;
  const int64_t blocks = std::min(b.num_segments, resident_blocks(kernel, resident_blocks_cache));
  FASTAVG_CUDA_LAUNCH(kernel, static_cast<unsigned int>(blocks), kThreadsPerBlock, stream)(b, c);
  check(cudaGetLastError(), "launching the step kernel failed");
}

template <Optimizer O, AverageRule R>
void dispatch_dtype(DType dtype, const StepBuffers& b, const StepConfig& c, cudaStream_t stream) {
  switch (dtype) {
    case DType::float32: return launch<O, R, float>(b, c, stream);
    case DType::bfloat16: return launch<O, R, __nv_bfloat16>(b, c, stream);
    case DType::float16: return launch<O, R, __half>(b, c, stream);
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
  if (buffers.num_segments <= 0) return;
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
