// CPU kernels: one pass over each flat buffer, multithreaded with at::parallel_for, compiled for
// AVX-512, AVX2 and baseline x86-64 and picked at run time (the extension is built once for any CPU).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fastavg_step.h"

namespace fastavg {
namespace {

constexpr int64_t kChunk = 256;
constexpr int64_t kGrain = 32 * 1024;

// bfloat16 as raw bits, converted without branches (round to nearest even, NaN kept quiet) so that
// the loops that load and store it vectorize; float16 uses the compiler's _Float16.
struct BFloat16Bits {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(_Float16 x) { return static_cast<float>(x); }
inline float to_float(BFloat16Bits x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline _Float16 from_float<_Float16>(float x) { return static_cast<_Float16>(x); }
template <>
inline BFloat16Bits from_float<BFloat16Bits>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return BFloat16Bits{static_cast<uint16_t>(x != x ? 0x7FC0u : rounded)};
}

template <typename T>
inline float round_to(float x) {
  return to_float(from_float<T>(x));
}

}  // namespace

namespace cpu_baseline {
#include "fastavg_cpu_kernel.inc"
}  // namespace cpu_baseline

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace cpu_avx2 {
#include "fastavg_cpu_kernel.inc"
}  // namespace cpu_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
namespace cpu_avx512 {
#include "fastavg_cpu_kernel.inc"
}  // namespace cpu_avx512
#pragma GCC pop_options

using StepFunction = void (*)(Optimizer, AverageRule, DType, const StepBuffers&, const StepConfig&);

static StepFunction best_step_for_this_cpu() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    return cpu_avx512::step;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return cpu_avx2::step;
  }
  return cpu_baseline::step;
}

void step_cpu(Optimizer optimizer, AverageRule rule, DType dtype, const StepBuffers& buffers,
              const StepConfig& config) {
  static const StepFunction step = best_step_for_this_cpu();
  step(optimizer, rule, dtype, buffers, config);
}

}  // namespace fastavg
