// The CUDA kernels of csrc/fastavg_cuda.cu, run by the CPU emulation, as CPU implementations of the ops
// fastavg_cuda_emulation::adam_step_, sgd_step_ and average_, which test_ops.py defines with the schemas of
// fastavg's own ops before it loads this library. Like the CUDA registration (csrc/fastavg_cuda_ops.cpp),
// each goes through the shared checks and configuration of fastavg_ops.h (fastavg::adam_step etc., which
// this library takes from fastavg._C) and then fastavg::step_cuda, here on host memory.
#include <torch/library.h>

#include "fastavg_ops.h"

namespace {

void launch_emulated(fastavg::Optimizer o, fastavg::AverageRule r, fastavg::DType d, const fastavg::StepBuffers& b,
                     const fastavg::StepConfig& c) {
  fastavg::step_cuda(o, r, d, b, c, nullptr);
}

void adam_step_emulated(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
                        at::TensorList optimizer_state, at::TensorList average_state, const at::Tensor& lr,
                        const at::Tensor& step, const at::Tensor& average_weights, double beta1, double beta2,
                        double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                        int64_t average_rule, double reaction, double inertia, bool switch_to_average,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  fastavg::adam_step(launch_emulated, params, grads, segments, optimizer_state, average_state, lr, step,
                     average_weights, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
                     average_rule, reaction, inertia, switch_to_average, grad_scale, found_inf);
}

void sgd_step_emulated(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
                       at::TensorList optimizer_state, at::TensorList average_state, const at::Tensor& lr,
                       const at::Tensor& step, const at::Tensor& average_weights, double momentum, double dampening,
                       double weight_decay, bool nesterov, bool maximize, bool heavy_ball, int64_t average_rule,
                       double reaction, double inertia, bool switch_to_average,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  fastavg::sgd_step(launch_emulated, params, grads, segments, optimizer_state, average_state, lr, step,
                    average_weights, momentum, dampening, weight_decay, nesterov, maximize, heavy_ball, average_rule,
                    reaction, inertia, switch_to_average, grad_scale, found_inf);
}

void average_emulated(at::TensorList params, const at::Tensor& segments, at::TensorList average_state,
                      const at::Tensor& average_weights, int64_t average_rule, double reaction, double inertia,
                      bool switch_to_average, const std::optional<at::Tensor>& found_inf) {
  fastavg::average(launch_emulated, params, segments, average_state, average_weights, average_rule, reaction,
                   inertia, switch_to_average, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastavg_cuda_emulation, CPU, m) {
  m.impl("adam_step_", adam_step_emulated);
  m.impl("sgd_step_", sgd_step_emulated);
  m.impl("average_", average_emulated);
}
