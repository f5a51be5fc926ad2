// Op schemas, argument checks and the CPU registration.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "fastavg_ops.h"

namespace fastavg {
namespace {

DType dtype_of(const at::Tensor& param) {
  switch (param.scalar_type()) {
    case at::kFloat: return DType::float32;
    case at::kBFloat16: return DType::bfloat16;
    case at::kHalf: return DType::float16;
    default: TORCH_CHECK(false, "fastavg: param must be float32, bfloat16 or float16, got ", param.scalar_type());
  }
}

// A flat state or average buffer: on the parameters' device, of `dtype`, contiguous and 1-D.
void check_buffer(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device() == param.device(), "fastavg: ", name, " is on ", t.device(), ", params on ", param.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fastavg: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.dim() == 1, "fastavg: ", name, " must be a contiguous 1-D (flat) buffer");
}

const float* scalars(const at::Tensor& t, const at::Tensor& param, int64_t count, const char* name) {
  TORCH_CHECK(t.device() == param.device() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() >= count,
              "fastavg: ", name, " must be a contiguous float32 tensor of at least ", count, " value(s) on ",
              param.device());
  return t.data_ptr<float>();
}

// The parameter and gradient lists and the segment table. On the CPU the table is in host memory, so
// every row is checked against the lists and the flat buffers' sizes (`flat_numel`); on a GPU the
// table stays in device memory and only its shape is checked.
StepBuffers segment_buffers(at::TensorList params, const at::TensorList* grads, const at::Tensor& segments) {
  const at::Tensor& first = params[0];
  dtype_of(first);
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(1) == 4 &&
                  segments.is_contiguous() && segments.device() == first.device(),
              "fastavg: segments must be a contiguous int64 (n, 4) tensor on ", first.device());
  for (const at::Tensor& p : params) {
    TORCH_CHECK(p.scalar_type() == first.scalar_type() && p.device() == first.device(),
                "fastavg: params must share one dtype and device, got ", p.scalar_type(), " on ", p.device(),
                " beside ", first.scalar_type(), " on ", first.device());
  }
  if (grads != nullptr) {
    TORCH_CHECK(grads->size() == params.size(), "fastavg: grads must hold one tensor per param, got ", grads->size(),
                " for ", params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& g = (*grads)[i];
      TORCH_CHECK(g.scalar_type() == first.scalar_type() && g.device() == first.device() &&
                      g.numel() == params[i].numel(),
                  "fastavg: grads[", i, "] must match params[", i, "] in dtype, device and size");
    }
  }
  StepBuffers b;
  b.segments = reinterpret_cast<const Segment*>(segments.data_ptr<int64_t>());
  b.num_segments = segments.size(0);
  return b;
}

// The memory [address, address + bytes) lies inside `t`'s elements.
bool inside(int64_t address, int64_t bytes, const at::Tensor& t) {
  const auto begin = reinterpret_cast<int64_t>(t.data_ptr());
  return address >= begin && address + bytes <= begin + t.numel() * static_cast<int64_t>(t.element_size());
}

// CPU only: every row points inside its tensors and its flat-buffer range exists, so that a wrong table
// raises here instead of corrupting memory in the kernel.
void check_rows_cpu(const StepBuffers& b, at::TensorList params, const at::TensorList* grads, int64_t flat_numel) {
  const int64_t size = static_cast<int64_t>(params[0].element_size());
  size_t i = 0;
  for (int64_t r = 0; r < b.num_segments; ++r) {
    const Segment& s = b.segments[r];
    while (i < params.size() && !inside(s.param, s.numel * size, params[i])) ++i;
    TORCH_CHECK(s.numel >= 1 && i < params.size(), "fastavg: segment row ", r,
                " does not point inside params (rows must follow the params' order)");
    TORCH_CHECK(grads == nullptr || inside(s.grad, s.numel * size, (*grads)[i]), "fastavg: segment row ", r,
                " does not point inside grads[", i, "]");
    TORCH_CHECK(s.offset >= 0 && s.offset + s.numel <= flat_numel, "fastavg: segment row ", r,
                " reaches past the flat buffers (", flat_numel, " elements)");
  }
}

// The smallest size among the flat buffers a launch touches: every row must fit inside it.
int64_t min_flat_numel(at::TensorList optimizer_state, at::TensorList average_state) {
  int64_t numel = std::numeric_limits<int64_t>::max();
  for (const at::Tensor& t : optimizer_state) numel = std::min(numel, t.numel());
  for (const at::Tensor& t : average_state) numel = std::min(numel, t.numel());
  return numel;
}

void set_optimizer_state(StepBuffers& b, at::TensorList state, const at::Tensor& param, size_t min_size,
                         size_t max_size) {
  TORCH_CHECK(state.size() >= min_size && state.size() <= max_size, "fastavg: optimizer_state must hold ",
              min_size, " to ", max_size, " tensors, got ", state.size());
  for (size_t i = 0; i < state.size(); ++i) {
    check_buffer(state[i], param, at::kFloat, "optimizer_state");
    b.optimizer_state[i] = state[i].data_ptr<float>();
  }
}

AverageRule set_average_state(StepBuffers& b, StepConfig& c, at::TensorList state, const at::Tensor& param,
                              const at::Tensor& weights, int64_t average_rule, double reaction, double inertia,
                              bool switch_to_average) {
  TORCH_CHECK(average_rule >= 0 && average_rule <= 3, "fastavg: average_rule must be 0..3, got ", average_rule);
  const auto rule = static_cast<AverageRule>(average_rule);
  c.reaction = static_cast<float>(reaction);
  c.inertia = static_cast<float>(inertia);
  c.switch_to_average = switch_to_average;
  size_t expected_min = 0, expected_max = 0;
  switch (rule) {
    case AverageRule::none: expected_min = expected_max = switch_to_average ? 1 : 0; break;
    case AverageRule::ema: expected_min = 1; expected_max = kMaxAverages; break;
    case AverageRule::belay: expected_min = 1; expected_max = 2; break;
    case AverageRule::lawa:
      TORCH_CHECK(!switch_to_average, "fastavg: a LAWA snapshot step cannot also switch");
      expected_min = expected_max = 2;
      break;
  }
  TORCH_CHECK(state.size() >= expected_min && state.size() <= expected_max, "fastavg: average_state for rule ",
              average_rule, " must hold ", expected_min, " to ", expected_max, " tensors, got ", state.size());
  if (rule == AverageRule::lawa) {
    check_buffer(state[0], param, at::kFloat, "lawa_sum");
    check_buffer(state[1], param, param.scalar_type(), "lawa_ring_slot");
    b.lawa_sum = state[0].data_ptr<float>();
    b.lawa_ring_slot = state[1].data_ptr();
    return rule;
  }
  const size_t num_averages = rule == AverageRule::belay ? 1 : state.size();
  for (size_t i = 0; i < state.size(); ++i) check_buffer(state[i], param, at::kFloat, "average_state");
  for (size_t i = 0; i < num_averages; ++i) b.averages[i] = state[i].data_ptr<float>();
  b.num_averages = static_cast<int>(num_averages);
  if (rule == AverageRule::belay && state.size() == 2) b.average_velocity = state[1].data_ptr<float>();
  const int64_t num_weights = rule == AverageRule::none ? 0 : static_cast<int64_t>(num_averages);
  b.average_weights = scalars(weights, param, num_weights, "average_weights");
  return rule;
}

// GradScaler's optional one-value tensors (grad_scale, found_inf), checked like lr; null when absent.
const float* optional_scalar(const std::optional<at::Tensor>& t, const at::Tensor& param, const char* name) {
  return t.has_value() ? scalars(*t, param, 1, name) : nullptr;
}

// 1/grad_scale as GradScaler.unscale_ computes it (float64 reciprocal rounded to fp32), by torch ops on the scale's
// device (queued, no host read), into `inverse`, which the caller keeps alive through the launch; null without a
// scale. The kernels then only multiply.
const float* inverse_scale(const std::optional<at::Tensor>& grad_scale, const at::Tensor& param, at::Tensor& inverse) {
  if (!grad_scale.has_value()) return nullptr;
  optional_scalar(grad_scale, param, "grad_scale");
  inverse = grad_scale->reshape({-1}).slice(0, 0, 1).to(at::kDouble).reciprocal().to(at::kFloat).contiguous();
  return inverse.data_ptr<float>();
}

// Runs `launch` after the CPU-only row checks; nothing to do for an empty launch.
void checked_launch(const Launcher& launch, Optimizer o, AverageRule r, at::TensorList params,
                    const at::TensorList* grads, const StepBuffers& b, const StepConfig& c,
                    at::TensorList optimizer_state, at::TensorList average_state) {
  if (params[0].device().is_cpu()) {
    check_rows_cpu(b, params, grads, min_flat_numel(optimizer_state, average_state));
  }
  if (b.num_segments == 0) return;
  launch(o, r, dtype_of(params[0]), b, c);
}

}  // namespace

void adam_step(const Launcher& launch, at::TensorList params, at::TensorList grads, const at::Tensor& segments,
               at::TensorList optimizer_state, at::TensorList average_state, const at::Tensor& lr,
               const at::Tensor& step, const at::Tensor& average_weights, double beta1, double beta2, double eps,
               double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize, int64_t average_rule,
               double reaction, double inertia, bool switch_to_average, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const at::Tensor& param = params[0];
  StepBuffers b = segment_buffers(params, &grads, segments);
  set_optimizer_state(b, optimizer_state, param, amsgrad ? 3 : 2, amsgrad ? 3 : 2);
  StepConfig c;
  c.beta2 = static_cast<float>(beta2);
  c.log2_beta1 = std::log2(beta1);  // -inf for β = 0: then βᵗ = 0 and there is nothing to correct
  c.log2_beta2 = std::log2(beta2);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  c.weight_decay = static_cast<float>(weight_decay);
  c.decoupled_weight_decay = decoupled_weight_decay;
  c.maximize = maximize;
  const AverageRule rule = set_average_state(b, c, average_state, param, average_weights, average_rule, reaction,
                                             inertia, switch_to_average);
  b.lr = scalars(lr, param, 1, "lr");
  b.step = scalars(step, param, 1, "step");
  at::Tensor inverse;  // alive through the launch
  b.inv_grad_scale = inverse_scale(grad_scale, param, inverse);
  b.found_inf = optional_scalar(found_inf, param, "found_inf");
  checked_launch(launch, Optimizer::adam, rule, params, &grads, b, c, optimizer_state, average_state);
}

void sgd_step(const Launcher& launch, at::TensorList params, at::TensorList grads, const at::Tensor& segments,
              at::TensorList optimizer_state, at::TensorList average_state, const at::Tensor& lr,
              const at::Tensor& step, const at::Tensor& average_weights, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, bool heavy_ball, int64_t average_rule,
              double reaction, double inertia, bool switch_to_average, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const at::Tensor& param = params[0];
  StepBuffers b = segment_buffers(params, &grads, segments);
  set_optimizer_state(b, optimizer_state, param, 0, 1);
  TORCH_CHECK((momentum != 0) == (optimizer_state.size() == 1),
              "fastavg: optimizer_state must hold the momentum buffer exactly when momentum != 0");
  StepConfig c;
  c.momentum = static_cast<float>(momentum);
  c.one_minus_dampening = static_cast<float>(1.0 - dampening);
  c.weight_decay = static_cast<float>(weight_decay);
  c.nesterov = nesterov;
  c.maximize = maximize;
  const AverageRule rule = set_average_state(b, c, average_state, param, average_weights, average_rule, reaction,
                                             inertia, switch_to_average);
  b.lr = scalars(lr, param, 1, "lr");
  b.step = scalars(step, param, 1, "step");
  at::Tensor inverse;  // alive through the launch
  b.inv_grad_scale = inverse_scale(grad_scale, param, inverse);
  b.found_inf = optional_scalar(found_inf, param, "found_inf");
  checked_launch(launch, heavy_ball ? Optimizer::sgd_heavy_ball : Optimizer::sgd_torch, rule, params, &grads, b, c,
                 optimizer_state, average_state);
}

void average(const Launcher& launch, at::TensorList params, const at::Tensor& segments, at::TensorList average_state,
             const at::Tensor& average_weights, int64_t average_rule, double reaction, double inertia,
             bool switch_to_average, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  StepBuffers b = segment_buffers(params, nullptr, segments);
  StepConfig c;
  const AverageRule rule = set_average_state(b, c, average_state, params[0], average_weights, average_rule, reaction,
                                             inertia, switch_to_average);
  b.found_inf = optional_scalar(found_inf, params[0], "found_inf");
  // No rule and no switch: θ would only be read (it is written only when it changes), so nothing to launch.
  if (rule == AverageRule::none && !switch_to_average) return;
  checked_launch(launch, Optimizer::none, rule, params, nullptr, b, c, {}, average_state);
}

}  // namespace fastavg

TORCH_LIBRARY(fastavg, m) {
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor segments, Tensor(b!)[] optimizer_state, Tensor(c!)[] average_state, "
      "Tensor lr, Tensor step, Tensor average_weights, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled_weight_decay, bool amsgrad, bool maximize, int average_rule, float reaction, float inertia, "
      "bool switch_to_average, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor segments, Tensor(b!)[] optimizer_state, Tensor(c!)[] average_state, "
      "Tensor lr, Tensor step, Tensor average_weights, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool heavy_ball, int average_rule, float reaction, float inertia, "
      "bool switch_to_average, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "average_(Tensor(a!)[] params, Tensor segments, Tensor(c!)[] average_state, Tensor average_weights, int average_rule, "
      "float reaction, float inertia, bool switch_to_average, Tensor? found_inf=None) -> ()");
}

namespace {

void launch_cpu(fastavg::Optimizer o, fastavg::AverageRule r, fastavg::DType d, const fastavg::StepBuffers& b,
                const fastavg::StepConfig& c) {
  fastavg::step_cpu(o, r, d, b, c);
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
                   at::TensorList optimizer_state, at::TensorList average_state, const at::Tensor& lr,
                   const at::Tensor& step, const at::Tensor& average_weights, double beta1, double beta2, double eps,
                   double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                   int64_t average_rule, double reaction, double inertia, bool switch_to_average,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  fastavg::adam_step(launch_cpu, params, grads, segments, optimizer_state, average_state, lr, step, average_weights,
                     beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, average_rule,
                     reaction, inertia, switch_to_average, grad_scale, found_inf);
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
                  at::TensorList optimizer_state, at::TensorList average_state, const at::Tensor& lr,
                  const at::Tensor& step, const at::Tensor& average_weights, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, bool heavy_ball, int64_t average_rule,
                  double reaction, double inertia, bool switch_to_average,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  fastavg::sgd_step(launch_cpu, params, grads, segments, optimizer_state, average_state, lr, step, average_weights,
                    momentum, dampening, weight_decay, nesterov, maximize, heavy_ball, average_rule, reaction, inertia,
                    switch_to_average, grad_scale, found_inf);
}

void average_cpu(at::TensorList params, const at::Tensor& segments, at::TensorList average_state,
                 const at::Tensor& average_weights, int64_t average_rule, double reaction, double inertia,
                 bool switch_to_average, const std::optional<at::Tensor>& found_inf) {
  fastavg::average(launch_cpu, params, segments, average_state, average_weights, average_rule, reaction, inertia,
                   switch_to_average, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastavg, CPU, m) {
  m.impl("adam_step_", adam_step_cpu);
  m.impl("sgd_step_", sgd_step_cpu);
  m.impl("average_", average_cpu);
}
