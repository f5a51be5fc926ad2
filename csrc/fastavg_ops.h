// The fastavg ops on at::Tensor arguments: checks, then a device's launcher on raw pointers.
// Shared by the CPU registration (fastavg_ops.cpp) and the CUDA one.
//
// `params` (and `grads`) are the tensors the segment table points into, `segments` the int64 (n, 4) table
// of fastavg_step.h in their memory; state and average buffers are flat and indexed by the table's offsets.
// An empty `params` list is a no-op. `grad_scale` and `found_inf` are torch.amp.GradScaler's (optional, one fp32
// value each on the params' device): gradients are unscaled in the kernel and a nonzero found_inf changes nothing.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>

#include "fastavg_step.h"

namespace fastavg {

using Launcher = std::function<void(Optimizer, AverageRule, DType, const StepBuffers&, const StepConfig&)>;

void adam_step(const Launcher& launch, at::TensorList params, at::TensorList grads, const at::Tensor& segments,
               at::TensorList optimizer_state, at::TensorList average_state, const at::Tensor& lr,
               const at::Tensor& step, const at::Tensor& average_weights, double beta1, double beta2, double eps,
               double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize, int64_t average_rule,
               double reaction, double inertia, bool switch_to_average, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf);

void sgd_step(const Launcher& launch, at::TensorList params, at::TensorList grads, const at::Tensor& segments,
              at::TensorList optimizer_state, at::TensorList average_state, const at::Tensor& lr,
              const at::Tensor& step, const at::Tensor& average_weights, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, bool heavy_ball, int64_t average_rule,
              double reaction, double inertia, bool switch_to_average, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf);

void average(const Launcher& launch, at::TensorList params, const at::Tensor& segments, at::TensorList average_state,
             const at::Tensor& average_weights, int64_t average_rule, double reaction, double inertia,
             bool switch_to_average, const std::optional<at::Tensor>& found_inf);

}  // namespace fastavg
