// One fused step over a segment table, as raw pointers: what the op registration hands to a device's
// kernels. Torch-free, like fastavg_rules.h, so that the CUDA sources compile with nvcc alone.
//
// Parameters and gradients stay where their owners put them; the optimizer state and the averages live
// in flat buffers. A segment is a run of parameter elements that is contiguous in memory (a whole dense
// parameter, or a slice of one) together with the place of its state: element j of the segment is
// param[j] / grad[j] and flat_buffer[offset + j] of every state and average buffer.
#pragma once

#include <cstdint>

#include "fastavg_rules.h"

namespace fastavg {

enum class DType : int { float32 = 0, bfloat16 = 1, float16 = 2 };

// One row of the segment table: an int64 tensor of shape (num_segments, 4) in the device's memory, whose
// columns are these fields in this order. Pointers are stored as integers.
struct Segment {
  int64_t param;   // address of the first element (parameter dtype)
  int64_t grad;    // address of the first gradient element (parameter dtype); 0 for average_
  int64_t numel;   // elements in the segment, >= 1
  int64_t offset;  // element index of the segment's first element in the flat state and average buffers
};
static_assert(sizeof(Segment) == 4 * sizeof(int64_t), "Segment is one row of an int64 (n, 4) tensor");

struct StepBuffers {
  const Segment* segments = nullptr;  // device memory for the CUDA kernels, host memory for the CPU ones
  int64_t num_segments = 0;
  // Flat fp32 buffers indexed by Segment::offset.
  // Adam: exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad); SGD: momentum buffer / velocity.
  float* optimizer_state[3] = {nullptr, nullptr, nullptr};
  // EMA: the averages; BELAY: average; switch alone: average.
  float* averages[kMaxAverages] = {};
  int num_averages = 0;
  float* average_velocity = nullptr;  // BELAY with inertia > 0
  float* lawa_sum = nullptr;          // LAWA, fp32
  void* lawa_ring_slot = nullptr;     // LAWA, parameter dtype, indexed by Segment::offset too
  // One-element fp32 values in the same memory as the buffers, read by the kernel.
  const float* lr = nullptr;
  const float* step = nullptr;
  const float* average_weights = nullptr;  // num_averages values (EMA) or one (BELAY)
  // torch.amp.GradScaler's (one fp32 value each, optional, in the same memory): the gradients are multiplied
  // by inv_grad_scale in registers (never written back), and a nonzero found_inf makes the launch change nothing
  // at all. inv_grad_scale is 1/scale as GradScaler.unscale_ computes it (in float64, rounded to fp32), which the
  // op computes from its grad_scale argument with torch ops (the kernels divide nothing). Read once per launch
  // (CPU) or per block (CUDA).
  const float* inv_grad_scale = nullptr;
  const float* found_inf = nullptr;
};

void step_cpu(Optimizer optimizer, AverageRule rule, DType dtype, const StepBuffers& buffers,
              const StepConfig& config);

// Launches on `stream` (a cudaStream_t); defined only when the CUDA kernels are built.
void step_cuda(Optimizer optimizer, AverageRule rule, DType dtype, const StepBuffers& buffers,
               const StepConfig& config, void* stream);

}  // namespace fastavg
