// CPU kernels: one pass over each flat buffer, multithreaded with at::parallel_for. On x86-64 they are
// compiled for AVX-512, AVX2 and the baseline and picked at run time (one build serves any x86 CPU);
// elsewhere the baseline build is the compiler's default for the target. This unit holds the baseline and
// the choice; the other variants are units of their own so that they compile in parallel.
#include "fastavg_cpu.h"

namespace fastavg {

namespace cpu_baseline {
#include "fastavg_cpu_kernel.inc"
}  // namespace cpu_baseline

using StepFunction = void (*)(Optimizer, AverageRule, DType, const StepBuffers&, const StepConfig&);

#if defined(__x86_64__) && defined(__GNUC__)
// Defined in fastavg_cpu_avx2.cpp and fastavg_cpu_avx512.cpp. Declared here only: a declaration seen before
// their `#pragma GCC target` would make the target-specific definitions versions of it.
namespace cpu_avx2 {
void step(Optimizer optimizer, AverageRule rule, DType dtype, const StepBuffers& buffers, const StepConfig& config);
}  // namespace cpu_avx2
namespace cpu_avx512 {
void step(Optimizer optimizer, AverageRule rule, DType dtype, const StepBuffers& buffers, const StepConfig& config);
}  // namespace cpu_avx512
#endif

static StepFunction best_step_for_this_cpu() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    return cpu_avx512::step;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return cpu_avx2::step;
  }
#endif
  return cpu_baseline::step;
}

void step_cpu(Optimizer optimizer, AverageRule rule, DType dtype, const StepBuffers& buffers,
              const StepConfig& config) {
  static const StepFunction step = best_step_for_this_cpu();
  step(optimizer, rule, dtype, buffers, config);
}

}  // namespace fastavg
