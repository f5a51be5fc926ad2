// The Python module fastavg._C: the eager path of a step, for lists of thousands of parameters.
//
// Calling torch.ops.fastavg.* from Python converts every element of the parameter and gradient lists
// through the schema (with a __torch_function__ check per nn.Parameter): about a microsecond per tensor,
// more than the kernel itself for many small tensors. These functions take the parameter list through
// pybind11's tensor caster instead, check in one C++ loop that every parameter and its gradient are
// still at the addresses the cached segment table was built from, and call the same dispatcher ops
// from C++ (the ADInplaceOrView fallback bumps the parameters' version counters, as for torch.optim).
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace {

// `addresses` is the host int64 (n, 2) tensor of (parameter address, gradient address or 0) that the
// launch's segment table was built from.
bool addresses_match(const std::vector<at::Tensor>& params, const at::Tensor& addresses) {
  TORCH_CHECK(addresses.device().is_cpu() && addresses.scalar_type() == at::kLong && addresses.dim() == 2 &&
                  addresses.size(1) == 2 && addresses.is_contiguous(),
              "fastavg: addresses must be a contiguous int64 (n, 2) CPU tensor");
  if (addresses.size(0) != static_cast<int64_t>(params.size())) return false;
  const int64_t* expected = addresses.data_ptr<int64_t>();
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& grad = params[i].grad();
    const int64_t grad_address = grad.defined() ? reinterpret_cast<int64_t>(grad.data_ptr()) : 0;
    if (reinterpret_cast<int64_t>(params[i].data_ptr()) != expected[2 * i] || grad_address != expected[2 * i + 1]) {
      return false;
    }
  }
  return true;
}

std::vector<at::Tensor> grads_of(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (const at::Tensor& p : params) {
    TORCH_CHECK(p.grad().defined(), "fastavg: a parameter of a step launch has no gradient");
    grads.push_back(p.grad());
  }
  return grads;
}

void adam_step(const std::vector<at::Tensor>& params, const at::Tensor& segments,
               const std::vector<at::Tensor>& optimizer_state, const std::vector<at::Tensor>& average_state,
               const at::Tensor& lr, const at::Tensor& step, const at::Tensor& average_weights, double beta1,
               double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
               bool maximize, int64_t average_rule, double reaction, double inertia, bool switch_to_average,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastavg::adam_step_", "").typed<void(
      at::TensorList, at::TensorList, const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, double, double, double, double, bool, bool, bool, int64_t, double,
      double, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  op.call(params, grads_of(params), segments, optimizer_state, average_state, lr, step, average_weights, beta1, beta2,
          eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, average_rule, reaction, inertia,
          switch_to_average, grad_scale, found_inf);
}

void sgd_step(const std::vector<at::Tensor>& params, const at::Tensor& segments,
              const std::vector<at::Tensor>& optimizer_state, const std::vector<at::Tensor>& average_state,
              const at::Tensor& lr, const at::Tensor& step, const at::Tensor& average_weights, double momentum,
              double dampening, double weight_decay, bool nesterov, bool maximize, bool heavy_ball,
              int64_t average_rule, double reaction, double inertia, bool switch_to_average,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastavg::sgd_step_", "").typed<void(
      at::TensorList, at::TensorList, const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, double, double, double, bool, bool, bool, int64_t, double, double,
      bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  op.call(params, grads_of(params), segments, optimizer_state, average_state, lr, step, average_weights, momentum,
          dampening, weight_decay, nesterov, maximize, heavy_ball, average_rule, reaction, inertia, switch_to_average,
          grad_scale, found_inf);
}

void average(const std::vector<at::Tensor>& params, const at::Tensor& segments,
             const std::vector<at::Tensor>& average_state, const at::Tensor& average_weights, int64_t average_rule,
             double reaction, double inertia, bool switch_to_average, const std::optional<at::Tensor>& found_inf) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastavg::average_", "").typed<void(
      at::TensorList, const at::Tensor&, at::TensorList, const at::Tensor&, int64_t, double, double, bool,
      const std::optional<at::Tensor>&)>();
  op.call(params, segments, average_state, average_weights, average_rule, reaction, inertia, switch_to_average,
          found_inf);
}

}  // namespace

// The torch this library was compiled against, as bytes that fastavg reads from the file before loading it
// (fastavg._extension.built_against): a library built against another torch must not be loaded at all, since
// loading it registers the ops. setup.py and the just-in-time build pass -DFASTAVG_TORCH_VERSION=<version>.
#define FASTAVG_STRINGIFY_(x) #x
#define FASTAVG_STRINGIFY(x) FASTAVG_STRINGIFY_(x)
#ifdef FASTAVG_TORCH_VERSION
#define FASTAVG_TORCH_VERSION_STRING FASTAVG_STRINGIFY(FASTAVG_TORCH_VERSION)
#else
#define FASTAVG_TORCH_VERSION_STRING "unknown"
#endif
extern "C" __attribute__((used, visibility("default"))) const char fastavg_built_against_torch[] =
    "fastavg-built-against-torch:" FASTAVG_TORCH_VERSION_STRING "\n";

// TORCH_EXTENSION_NAME: _C when setup.py builds fastavg._C, the just-in-time build's own name otherwise.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastavg's compiled kernels (registered as torch.ops.fastavg) and the eager step path";
  m.attr("built_against_torch") = FASTAVG_TORCH_VERSION_STRING;
  m.def("addresses_match", &addresses_match);
  // grad_scale and found_inf (GradScaler's, optional) are keyword arguments with None defaults, as in the ops.
  m.def("adam_step_", &adam_step, py::arg("params"), py::arg("segments"), py::arg("optimizer_state"),
        py::arg("average_state"), py::arg("lr"), py::arg("step"), py::arg("average_weights"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled_weight_decay"),
        py::arg("amsgrad"), py::arg("maximize"), py::arg("average_rule"), py::arg("reaction"), py::arg("inertia"),
        py::arg("switch_to_average"), py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none());
  m.def("sgd_step_", &sgd_step, py::arg("params"), py::arg("segments"), py::arg("optimizer_state"),
        py::arg("average_state"), py::arg("lr"), py::arg("step"), py::arg("average_weights"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"), py::arg("heavy_ball"),
        py::arg("average_rule"), py::arg("reaction"), py::arg("inertia"), py::arg("switch_to_average"),
        py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none());
  m.def("average_", &average, py::arg("params"), py::arg("segments"), py::arg("average_state"),
        py::arg("average_weights"), py::arg("average_rule"), py::arg("reaction"), py::arg("inertia"),
        py::arg("switch_to_average"), py::arg("found_inf") = py::none());
}
