// The CUDA registration of the fastavg ops: the shared checks of fastavg_ops.h, then the CUDA kernels of
// fastavg_cuda.cu on raw pointers, on the current stream of the parameter's device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <stdexcept>

#include "fastavg_ops.h"

namespace {

// The checks run before any launch, so every buffer is on the parameter's device; the guard makes that
// device current, which is the device the kernels and the current stream belong to.
c10::cuda::CUDAGuard guard_param_device(const at::Tensor& param) {
  TORCH_CHECK(param.is_cuda(), "fastavg: the CUDA kernels need param on a CUDA device, got ", param.device());
  return c10::cuda::CUDAGuard(param.device());
}

void launch_cuda(fastavg::Optimizer o, fastavg::AverageRule r, fastavg::DType d, const fastavg::StepBuffers& b,
                 const fastavg::StepConfig& c) {
  try {
    fastavg::step_cuda(o, r, d, b, c, c10::cuda::getCurrentCUDAStream().stream());
  } catch (const std::runtime_error& error) {
    // fastavg_cuda.cu is torch-free and reports CUDA errors as std::runtime_error; re-raise as a c10::Error.
    TORCH_CHECK(false, error.what());
  }
}

void adam_step_cuda(at::Tensor& param, const at::Tensor& grad, at::TensorList optimizer_state,
                    at::TensorList average_state, const at::Tensor& lr, const at::Tensor& step,
                    const at::Tensor& average_weights, double beta1, double beta2, double eps, double weight_decay,
                    bool decoupled_weight_decay, bool amsgrad, bool maximize, int64_t average_rule, double reaction,
                    double inertia, bool switch_to_average) {
  const auto device_guard = guard_param_device(param);
  fastavg::adam_step(launch_cuda, param, grad, optimizer_state, average_state, lr, step, average_weights, beta1,
                     beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, average_rule, reaction,
                     inertia, switch_to_average);
}

void sgd_step_cuda(at::Tensor& param, const at::Tensor& grad, at::TensorList optimizer_state,
                   at::TensorList average_state, const at::Tensor& lr, const at::Tensor& step,
                   const at::Tensor& average_weights, double momentum, double dampening, double weight_decay,
                   bool nesterov, bool maximize, bool heavy_ball, int64_t average_rule, double reaction, double inertia,
                   bool switch_to_average) {
  const auto device_guard = guard_param_device(param);
  fastavg::sgd_step(launch_cuda, param, grad, optimizer_state, average_state, lr, step, average_weights, momentum,
                    dampening, weight_decay, nesterov, maximize, heavy_ball, average_rule, reaction, inertia,
                    switch_to_average);
}

void average_cuda(at::Tensor& param, at::TensorList average_state, const at::Tensor& average_weights,
                  int64_t average_rule, double reaction, double inertia, bool switch_to_average) {
  const auto device_guard = guard_param_device(param);
  fastavg::average(launch_cuda, param, average_state, average_weights, average_rule, reaction, inertia,
                   switch_to_average);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastavg, CUDA, m) {
  m.impl("adam_step_", adam_step_cuda);
  m.impl("sgd_step_", sgd_step_cuda);
  m.impl("average_", average_cuda);
}
