// The CUDA registration of the fastavg ops: the shared checks of fastavg_ops.h, then the CUDA kernels of
// fastavg_cuda.cu on raw pointers (and the segment table, in device memory), on the current stream of the
// parameters' device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <stdexcept>

#include "fastavg_ops.h"

namespace {

// The device of the launch: that of params[0] (the shared checks put every other tensor there too); none
// for an empty list, which is a no-op. A guard on it makes it current, which is the device the kernels and
// the current stream belong to.
std::optional<c10::Device> launch_device(at::TensorList params) {
  if (params.empty()) return std::nullopt;
  TORCH_CHECK(params[0].is_cuda(), "fastavg: the CUDA kernels need params on a CUDA device, got ",
              params[0].device());
  return params[0].device();
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

void adam_step_cuda(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
                    at::TensorList optimizer_state, at::TensorList average_state, const at::Tensor& lr,
                    const at::Tensor& step, const at::Tensor& average_weights, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                    int64_t average_rule, double reaction, double inertia, bool switch_to_average,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const c10::cuda::OptionalCUDAGuard device_guard(launch_device(params));
  fastavg::adam_step(launch_cuda, params, grads, segments, optimizer_state, average_state, lr, step, average_weights,
                     beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, average_rule,
                     reaction, inertia, switch_to_average, grad_scale, found_inf);
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
                   at::TensorList optimizer_state, at::TensorList average_state, const at::Tensor& lr,
                   const at::Tensor& step, const at::Tensor& average_weights, double momentum, double dampening,
                   double weight_decay, bool nesterov, bool maximize, bool heavy_ball, int64_t average_rule,
                   double reaction, double inertia, bool switch_to_average,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const c10::cuda::OptionalCUDAGuard device_guard(launch_device(params));
  fastavg::sgd_step(launch_cuda, params, grads, segments, optimizer_state, average_state, lr, step, average_weights,
                    momentum, dampening, weight_decay, nesterov, maximize, heavy_ball, average_rule, reaction,
                    inertia, switch_to_average, grad_scale, found_inf);
}

void average_cuda(at::TensorList params, const at::Tensor& segments, at::TensorList average_state,
                  const at::Tensor& average_weights, int64_t average_rule, double reaction, double inertia,
                  bool switch_to_average, const std::optional<at::Tensor>& found_inf) {
  const c10::cuda::OptionalCUDAGuard device_guard(launch_device(params));
  fastavg::average(launch_cuda, params, segments, average_state, average_weights, average_rule, reaction, inertia,
                   switch_to_average, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastavg, CUDA, m) {
  m.impl("adam_step_", adam_step_cuda);
  m.impl("sgd_step_", sgd_step_cuda);
  m.impl("average_", average_cuda);
}
