// One fused step over one flat buffer, as raw pointers: what the op registration hands to a device's
// kernels. Torch-free, like fastavg_rules.h, so that the CUDA sources compile with nvcc alone.
#pragma once

#include <cstdint>

#include "fastavg_rules.h"

namespace fastavg {

enum class DType : int { float32 = 0, bfloat16 = 1, float16 = 2 };

struct StepBuffers {
  int64_t numel = 0;
  void* param = nullptr;       // parameter dtype
  const void* grad = nullptr;  // parameter dtype; unused by Optimizer::none
  // Adam: exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad); SGD: momentum buffer / velocity. fp32.
  float* optimizer_state[3] = {nullptr, nullptr, nullptr};
  // EMA: the averages; BELAY: average; switch alone: average. fp32.
  float* averages[kMaxAverages] = {};
  int num_averages = 0;
  float* average_velocity = nullptr;  // BELAY with inertia > 0
  float* lawa_sum = nullptr;          // LAWA, fp32
  void* lawa_ring_slot = nullptr;     // LAWA, parameter dtype
  // One-element fp32 values in the same memory as the buffers, read by the kernel.
  const float* lr = nullptr;
  const float* step = nullptr;
  const float* average_weights = nullptr;  // num_averages values (EMA) or one (BELAY)
};

void step_cpu(Optimizer optimizer, AverageRule rule, DType dtype, const StepBuffers& buffers,
              const StepConfig& config);

// Launches on `stream` (a cudaStream_t); defined only when the CUDA kernels are built.
void step_cuda(Optimizer optimizer, AverageRule rule, DType dtype, const StepBuffers& buffers,
               const StepConfig& config, void* stream);

}  // namespace fastavg
