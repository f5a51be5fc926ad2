// The CUDA op matrix on the CPU: fastavg::step_cuda (csrc/fastavg_cuda.cu compiled against
// cuda_emulation.h) on segment tables in emulated device memory, against a scalar loop over the rules of
// fastavg_rules.h, bit for bit.
//
// Every optimizer configuration of tests/test_cuda.py (plus average_ alone and heavy ball without momentum)
// × every averaging configuration × float32, bfloat16, float16, on one launch of several tensors: sizes below
// a pack, tails, a 65537-element tensor split into rows as fastavg/_segments.py splits it, a view whose param
// and grad are both off a 16-byte boundary, one whose grad alone is, an aligned view inside a larger storage;
// flat state at offsets 0, 1, 3, 4 and 8 elements past a 128-byte boundary. Each case runs under every
// schedule asked for (thread and block orders) on two emulated devices whose grids differ (a block per row;
// 3 blocks striding over the rows), from the same inputs each time. Every byte of every buffer is compared
// with the scalar loop's: whole storages (what lies outside the rows must not move), grads, the table and
// the scalars (untouched). A case also fails if the step changed nothing, if a row did not take the path
// its alignment calls for (the vector path when the param, grad and every flat buffer of the row start on a
// 16-byte boundary), or if it stored θ when the step cannot change it (averaging alone without BELAY or a
// switch) or did not when it can: the emulation checks that every access is inside a buffer and logs its width.
//
// Every buffer is its own allocation of exactly its size (cudaMalloc of the emulation), so that under
// AddressSanitizer an access one element past any buffer is reported.
//
//   harness [--orders=forward,reverse,shuffled] [--skews=0,1,3,4,8] [--seed=N] [--fail-fast]
// Exit status: 0 when every case matches, 1 otherwise.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_emulation.h"
#include "fastavg_step.h"

using namespace fastavg;

namespace {

// --- parameter dtypes, converted independently of the toolkit headers the kernels use -------------------

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

struct Float32 {
  using Bits = float;
  static constexpr DType dtype = DType::float32;
  static constexpr const char* name = "float32";
  static float to_float(Bits x) { return x; }
  static Bits from_float(float x) { return x; }
};
struct BFloat16 {  // round to nearest even; NaN to the quiet NaN 0x7FC0, as c10::BFloat16
  using Bits = uint16_t;
  static constexpr DType dtype = DType::bfloat16;
  static constexpr const char* name = "bfloat16";
  static float to_float(Bits x) { return float_of(static_cast<uint32_t>(x) << 16); }
  static Bits from_float(float x) {
    if (x != x) return 0x7FC0;
    const uint32_t u = bits_of(x);
    return static_cast<Bits>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};
struct Float16 {  // IEEE binary16, round to nearest even (the compiler's _Float16 conversion)
  using Bits = uint16_t;
  static constexpr DType dtype = DType::float16;
  static constexpr const char* name = "float16";
  static float to_float(Bits x) {
    _Float16 h;
    std::memcpy(&h, &x, sizeof h);
    return static_cast<float>(h);
  }
  static Bits from_float(float x) {
    const _Float16 h = static_cast<_Float16>(x);
    Bits bits;
    std::memcpy(&bits, &h, sizeof bits);
    return bits;
  }
};

// Uniform floats from splitmix64: fast (the inputs of every case are drawn afresh), and the same everywhere.
class Random {
 public:
  explicit Random(uint64_t seed) : state_(seed) {}
  float uniform(float low, float high) {
    state_ += 0x9E3779B97F4A7C15ull;
    uint64_t x = state_;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    return low + (high - low) * (static_cast<float>(x >> 40) * 0x1.0p-24f);
  }

 private:
  uint64_t state_;
};

// --- the matrix --------------------------------------------------------------------------------------------

// tests/test_cuda.py's OP_OPTIMIZERS (same names and values), average_ alone, heavy ball without momentum, and
// GradScaler's tensors: a scale the gradients are unscaled by, a found_inf that makes the launch change nothing.
struct OptimizerCase {
  const char* name;
  Optimizer optimizer;
  double momentum, dampening, weight_decay;
  bool nesterov, maximize;
  double beta1, beta2, eps;
  bool decoupled_weight_decay, amsgrad;
  float step;
  float grad_scale;  // 0: none
  float found_inf;   // 0: none (a nonzero value: the launch changes nothing)
};
constexpr Optimizer kSgd = Optimizer::sgd_torch, kHeavyBall = Optimizer::sgd_heavy_ball, kAdam = Optimizer::adam;
const OptimizerCase kOptimizers[] = {
    {"average_", Optimizer::none, 0, 0, 0, false, false, 0, 0, 0, false, false, 0.f, 0.f, 0.f},
    {"sgd", kSgd, 0.0, 0.0, 0.0, false, false, 0, 0, 0, false, false, 3.f, 0.f, 0.f},
    {"sgd_first_step", kSgd, 0.9, 0.1, 0.01, false, false, 0, 0, 0, false, false, 1.f, 0.f, 0.f},
    {"sgd_nesterov", kSgd, 0.9, 0.0, 0.01, true, true, 0, 0, 0, false, false, 5.f, 0.f, 0.f},
    {"sgd_heavy_ball", kHeavyBall, 0.9, 0.0, 0.01, false, false, 0, 0, 0, false, false, 5.f, 0.f, 0.f},
    {"sgd_heavy_ball_nesterov", kHeavyBall, 0.9, 0.0, 0.0, true, true, 0, 0, 0, false, false, 5.f, 0.f, 0.f},
    {"sgd_heavy_ball_no_momentum", kHeavyBall, 0.0, 0.0, 0.01, false, true, 0, 0, 0, false, false, 2.f, 0.f, 0.f},
    {"adam", kAdam, 0, 0, 0.01, false, false, 0.9, 0.999, 1e-8, false, false, 3.f, 0.f, 0.f},
    {"adam_amsgrad", kAdam, 0, 0, 0.01, false, true, 0.8, 0.99, 1e-6, false, true, 7.f, 0.f, 0.f},
    {"adamw", kAdam, 0, 0, 0.1, false, false, 0.9, 0.999, 1e-8, true, false, 3.f, 0.f, 0.f},
    {"adamw_amsgrad", kAdam, 0, 0, 0.1, false, false, 0.9, 0.999, 1e-8, true, true, 2.f, 0.f, 0.f},
    {"adamw_grad_scale", kAdam, 0, 0, 0.1, false, false, 0.9, 0.999, 1e-8, true, false, 3.f, 3.f, 0.f},
    {"sgd_found_inf", kSgd, 0.9, 0.1, 0.01, true, false, 0, 0, 0, false, false, 4.f, 1024.f, 1.f},
};

// tests/test_cuda.py's OP_AVERAGINGS.
struct AveragingCase {
  const char* name;
  AverageRule rule;
  std::vector<float> weights;
  bool switch_to_average;
  double reaction, inertia;
};
const AveragingCase kAveragings[] = {
    {"none", AverageRule::none, {}, false, 0.0, 0.0},
    {"ema", AverageRule::ema, {0.1f, 0.01f, 0.001f}, false, 0.0, 0.0},
    {"ema_8_decays", AverageRule::ema, {0.5f, 0.25f, 0.125f, 0.0625f, 0.03125f, 0.015625f, 0.0078125f, 0.00390625f},
     false, 0.0, 0.0},
    {"copy_phase", AverageRule::ema, {1.f}, false, 0.0, 0.0},
    {"swa", AverageRule::ema, {static_cast<float>(1.0 / 3.0)}, false, 0.0, 0.0},
    {"belay", AverageRule::belay, {0.05f}, false, 1.0, 0.0},
    {"belay_inertia", AverageRule::belay, {0.05f}, false, 0.5, 0.3},
    {"belay_switch", AverageRule::belay, {0.05f}, true, 0.5, 0.3},
    {"lawa", AverageRule::lawa, {}, false, 0.0, 0.0},
    {"sema_switch", AverageRule::ema, {0.1f}, true, 0.0, 0.0},
    {"switch_alone", AverageRule::none, {}, true, 0.0, 0.0},
};

// The tensors of the launch: `numel` elements `param_shift` (`grad_shift`) elements into a storage of their
// own; a shifted view's storage has 5 more elements after it, a dense tensor's storage is the tensor.
struct TensorSpec {
  int64_t numel, param_shift, grad_shift;
};
const TensorSpec kTensors[] = {
    {1, 0, 0},       {3, 0, 0},    {7, 0, 0},     {33, 0, 0},
    {1023, 0, 0},    // tails
    {65537, 0, 0},   // two rows: 65536 + 1
    {1000, 1, 1},    // param and grad off a 16-byte boundary: the scalar path
    {515, 0, 3},     // the grad alone off it: the scalar path
    {1000, 8, 8},    // 32 (fp32) or 16 (bf16/fp16) bytes into its storage: the vector path
    {4097, 0, 0},    {5, 0, 0},
};
constexpr int64_t kRowNumel = 65536;  // fastavg._segments.ROW_NUMEL

constexpr float kLr = 0.01f;

// --- one case's buffers --------------------------------------------------------------------------------------

// One allocation of emulated device memory, with its initial contents and what the scalar loop makes of them.
struct Buffer {
  std::string name;
  size_t bytes = 0;
  void* device = nullptr;
  std::vector<unsigned char> initial, expected;
  template <typename T>
  T* expected_as() {
    return reinterpret_cast<T*>(expected.data());
  }
};

struct Row {
  int tensor;
  int64_t start, numel, offset;
};

struct Case {
  const OptimizerCase* optimizer;
  const AveragingCase* averaging;
  int64_t skew;
  std::vector<Buffer> buffers;  // owned by `free_case`
  // Indexes into `buffers`: -1 when absent.
  std::vector<int> param, grad;
  int state[3] = {-1, -1, -1}, averages[kMaxAverages] = {-1, -1, -1, -1, -1, -1, -1, -1};
  int num_averages = 0, velocity = -1, lawa_sum = -1, ring = -1, lr = -1, step = -1, weights = -1, table = -1;
  int grad_scale = -1, found_inf = -1;
  std::vector<Row> rows;
  std::vector<int64_t> offsets;
  StepConfig config;
  StepBuffers pointers;
  int64_t elements = 0, vector_rows = 0, scalar_rows = 0;
  std::vector<bool> vector_path;  // per row: whether it must take the vector path
};

int add_buffer(Case& c, const std::string& name, size_t bytes) {
  Buffer buffer;
  buffer.name = name;
  buffer.bytes = bytes;
  if (cudaMalloc(&buffer.device, bytes) != cudaSuccess) {
    std::fprintf(stderr, "harness: cudaMalloc(%zu) failed\n", bytes);
    std::exit(2);
  }
  buffer.initial.resize(bytes);
  c.buffers.push_back(std::move(buffer));
  return static_cast<int>(c.buffers.size()) - 1;
}

void free_case(Case& c) {
  for (Buffer& b : c.buffers) cudaFree(b.device);
  c.buffers.clear();
}

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// The step configuration as fastavg_ops.cpp derives it from the op's arguments.
StepConfig config_of(const OptimizerCase& o, const AveragingCase& a) {
  StepConfig c;
  if (o.optimizer == Optimizer::adam) {
    c.beta2 = static_cast<float>(o.beta2);
    c.log2_beta1 = std::log2(o.beta1);
    c.log2_beta2 = std::log2(o.beta2);
    c.one_minus_beta1 = static_cast<float>(1.0 - o.beta1);
    c.one_minus_beta2 = static_cast<float>(1.0 - o.beta2);
    c.eps = static_cast<float>(o.eps);
    c.weight_decay = static_cast<float>(o.weight_decay);
    c.decoupled_weight_decay = o.decoupled_weight_decay;
    c.maximize = o.maximize;
  } else if (o.optimizer != Optimizer::none) {
    c.momentum = static_cast<float>(o.momentum);
    c.one_minus_dampening = static_cast<float>(1.0 - o.dampening);
    c.weight_decay = static_cast<float>(o.weight_decay);
    c.nesterov = o.nesterov;
    c.maximize = o.maximize;
  }
  c.reaction = static_cast<float>(a.reaction);
  c.inertia = static_cast<float>(a.inertia);
  c.switch_to_average = a.switch_to_average;
  return c;
}

template <typename D>
void fill_dtype(Buffer& b, Random& rng, float low, float high) {
  auto* values = reinterpret_cast<typename D::Bits*>(b.initial.data());
  for (size_t i = 0; i < b.bytes / sizeof(typename D::Bits); ++i) values[i] = D::from_float(rng.uniform(low, high));
}

void fill_float(Buffer& b, Random& rng, float low, float high) { fill_dtype<Float32>(b, rng, low, high); }

// The inputs of one case, in emulated device memory, from a seed: random values everywhere (gaps included);
// averages near θ, the LAWA sum near 3θ, exp_avg_sq > 0, max_exp_avg_sq above or below it about half the time.
template <typename D>
Case make_case(const OptimizerCase& o, const AveragingCase& a, int64_t skew, uint64_t seed) {
  using Bits = typename D::Bits;
  Case c;
  c.optimizer = &o;
  c.averaging = &a;
  c.skew = skew;
  c.config = config_of(o, a);
  Random rng(seed);
  const bool with_grad = o.optimizer != Optimizer::none;
  int64_t end = 0;
  for (size_t i = 0; i < std::size(kTensors); ++i) {
    const TensorSpec& t = kTensors[i];
    const auto storage = [&](int64_t shift) { return (shift ? shift + t.numel + 5 : t.numel) * sizeof(Bits); };
    c.param.push_back(add_buffer(c, "param[" + std::to_string(i) + "]", storage(t.param_shift)));
    fill_dtype<D>(c.buffers.back(), rng, -1.f, 1.f);
    if (with_grad) {
      c.grad.push_back(add_buffer(c, "grad[" + std::to_string(i) + "]", storage(t.grad_shift)));
      fill_dtype<D>(c.buffers.back(), rng, -1.f, 1.f);
    }
    c.offsets.push_back(round_up(end, 32) + skew);
    end = c.offsets.back() + t.numel;
    for (int64_t start = 0; start < t.numel; start += kRowNumel) {
      c.rows.push_back(Row{static_cast<int>(i), start, std::min(kRowNumel, t.numel - start), c.offsets.back() + start});
    }
    c.elements += t.numel;
  }
  const int64_t flat_numel = round_up(end, 32) + 32;
  const size_t flat_bytes = flat_numel * sizeof(float);

  // Values of θ (as fp32) at flat index `at`, for state seeded near θ.
  std::vector<float> theta_at(flat_numel, 0.f);
  std::vector<bool> in_row(flat_numel, false);
  for (size_t i = 0; i < std::size(kTensors); ++i) {
    const auto* p = reinterpret_cast<const Bits*>(c.buffers[c.param[i]].initial.data()) + kTensors[i].param_shift;
    for (int64_t j = 0; j < kTensors[i].numel; ++j) {
      theta_at[c.offsets[i] + j] = D::to_float(p[j]);
      in_row[c.offsets[i] + j] = true;
    }
  }
  const auto near_theta = [&](Buffer& b, float times, float noise) {
    auto* values = reinterpret_cast<float*>(b.initial.data());
    for (int64_t k = 0; k < flat_numel; ++k) {
      if (in_row[k]) values[k] = times * theta_at[k] + rng.uniform(-noise, noise);
    }
  };

  if (o.optimizer == Optimizer::adam) {
    c.state[0] = add_buffer(c, "exp_avg", flat_bytes);
    fill_float(c.buffers.back(), rng, -0.1f, 0.1f);
    c.state[1] = add_buffer(c, "exp_avg_sq", flat_bytes);
    fill_float(c.buffers.back(), rng, 1e-4f, 1e-2f);
    if (o.amsgrad) {
      c.state[2] = add_buffer(c, "max_exp_avg_sq", flat_bytes);
      const auto* v = reinterpret_cast<const float*>(c.buffers[c.state[1]].initial.data());
      auto* m = reinterpret_cast<float*>(c.buffers.back().initial.data());
      for (int64_t k = 0; k < flat_numel; ++k) m[k] = v[k] * rng.uniform(0.7f, 1.3f);
    }
  } else if (o.optimizer != Optimizer::none && o.momentum != 0) {
    c.state[0] = add_buffer(c, "momentum_buffer", flat_bytes);
    fill_float(c.buffers.back(), rng, -0.1f, 0.1f);
  }
  if (a.rule == AverageRule::lawa) {
    c.lawa_sum = add_buffer(c, "lawa_sum", flat_bytes);
    fill_float(c.buffers.back(), rng, -3.f, 3.f);
    near_theta(c.buffers.back(), 3.f, 0.3f);
    c.ring = add_buffer(c, "lawa_ring_slot", flat_numel * sizeof(Bits));
    fill_dtype<D>(c.buffers.back(), rng, -1.f, 1.f);
    auto* ring = reinterpret_cast<Bits*>(c.buffers.back().initial.data());
    for (int64_t k = 0; k < flat_numel; ++k) {
      if (in_row[k]) ring[k] = D::from_float(theta_at[k] + rng.uniform(-0.1f, 0.1f));
    }
  } else {
    const int n = a.rule == AverageRule::ema ? static_cast<int>(a.weights.size())
                  : (a.rule == AverageRule::belay || a.switch_to_average) ? 1
                                                                         : 0;
    for (int k = 0; k < n; ++k) {
      c.averages[k] = add_buffer(c, "averages[" + std::to_string(k) + "]", flat_bytes);
      fill_float(c.buffers.back(), rng, -1.f, 1.f);
      near_theta(c.buffers.back(), 1.f, 0.1f);
    }
    c.num_averages = n;
    if (a.rule == AverageRule::belay && a.inertia > 0) {
      c.velocity = add_buffer(c, "average_velocity", flat_bytes);
      fill_float(c.buffers.back(), rng, -0.01f, 0.01f);
    }
  }
  if (with_grad) {
    c.lr = add_buffer(c, "lr", sizeof(float));
    std::memcpy(c.buffers.back().initial.data(), &kLr, sizeof(float));
    c.step = add_buffer(c, "step", sizeof(float));
    std::memcpy(c.buffers.back().initial.data(), &o.step, sizeof(float));
  }
  if (o.grad_scale != 0.f) {
    // What the op hands the kernel: 1/scale, as GradScaler.unscale_ computes it.
    const float inverse = static_cast<float>(1.0 / static_cast<double>(o.grad_scale));
    c.grad_scale = add_buffer(c, "inv_grad_scale", sizeof(float));
    std::memcpy(c.buffers.back().initial.data(), &inverse, sizeof(float));
  }
  if (o.found_inf != 0.f) {
    c.found_inf = add_buffer(c, "found_inf", sizeof(float));
    std::memcpy(c.buffers.back().initial.data(), &o.found_inf, sizeof(float));
  }
  if (a.rule != AverageRule::lawa) {
    // Exactly the weights of the rule (one unused value when it has none, as the tests pass).
    const std::vector<float> weights = a.weights.empty() ? std::vector<float>{0.f} : a.weights;
    c.weights = add_buffer(c, "average_weights", weights.size() * sizeof(float));
    std::memcpy(c.buffers.back().initial.data(), weights.data(), weights.size() * sizeof(float));
  }

  // The segment table, in device memory, and the pointers of the launch.
  std::vector<Segment> table;
  for (const Row& r : c.rows) {
    const TensorSpec& t = kTensors[r.tensor];
    const auto address = [&](int index, int64_t shift) {
      const Bits* first = static_cast<Bits*>(c.buffers[index].device) + shift + r.start;
      return static_cast<int64_t>(reinterpret_cast<uintptr_t>(first));
    };
    table.push_back(Segment{address(c.param[r.tensor], t.param_shift),
                            with_grad ? address(c.grad[r.tensor], t.grad_shift) : 0, r.numel, r.offset});
  }
  c.table = add_buffer(c, "segments", table.size() * sizeof(Segment));
  std::memcpy(c.buffers.back().initial.data(), table.data(), c.buffers.back().bytes);

  StepBuffers& b = c.pointers;
  const auto device = [&](int index) { return index < 0 ? nullptr : static_cast<float*>(c.buffers[index].device); };
  b.segments = static_cast<const Segment*>(c.buffers[c.table].device);
  b.num_segments = static_cast<int64_t>(table.size());
  for (int i = 0; i < 3; ++i) b.optimizer_state[i] = device(c.state[i]);
  for (int k = 0; k < kMaxAverages; ++k) b.averages[k] = device(c.averages[k]);
  b.num_averages = c.num_averages;
  b.average_velocity = device(c.velocity);
  b.lawa_sum = device(c.lawa_sum);
  b.lawa_ring_slot = c.ring < 0 ? nullptr : c.buffers[c.ring].device;
  b.lr = device(c.lr);
  b.step = device(c.step);
  b.average_weights = device(c.weights);
  b.inv_grad_scale = device(c.grad_scale);
  b.found_inf = device(c.found_inf);

  // Which path each row takes: the vector one when all its buffers start on a 16-byte boundary.
  for (const Segment& s : table) {
    uintptr_t bits = static_cast<uintptr_t>(s.param) | static_cast<uintptr_t>(s.grad);
    for (float* flat : {b.optimizer_state[0], b.optimizer_state[1], b.optimizer_state[2], b.averages[0],
                        b.average_velocity, b.lawa_sum}) {
      if (flat) bits |= reinterpret_cast<uintptr_t>(flat + s.offset);
    }
    if (b.lawa_ring_slot) bits |= reinterpret_cast<uintptr_t>(static_cast<Bits*>(b.lawa_ring_slot) + s.offset);
    c.vector_path.push_back(bits % 16 == 0);
    (bits % 16 == 0 ? c.vector_rows : c.scalar_rows) += 1;
  }
  return c;
}

// --- the scalar loop ---------------------------------------------------------------------------------------

template <typename D>
void reference_step(Case& c) {
  using Bits = typename D::Bits;
  for (Buffer& b : c.buffers) b.expected = b.initial;
  const Optimizer optimizer = c.optimizer->optimizer;
  const AverageRule rule = c.averaging->rule;
  const StepConfig& cfg = c.config;
  const auto flat = [&](int index) { return index < 0 ? nullptr : c.buffers[index].expected_as<float>(); };
  float* state[3] = {flat(c.state[0]), flat(c.state[1]), flat(c.state[2])};
  float* averages[kMaxAverages];
  for (int k = 0; k < kMaxAverages; ++k) averages[k] = flat(c.averages[k]);
  float* velocity = flat(c.velocity);
  float* lawa_sum = flat(c.lawa_sum);
  Bits* ring = c.ring < 0 ? nullptr : c.buffers[c.ring].expected_as<Bits>();
  const std::vector<float>& weights = c.averaging->weights;
  if (c.optimizer->found_inf != 0.f) return;  // GradScaler found an inf: nothing changes
  const StepScalars s = optimizer == Optimizer::none ? StepScalars{} : step_scalars(kLr, c.optimizer->step, cfg);
  const float inv_grad_scale =
      c.optimizer->grad_scale != 0.f ? static_cast<float>(1.0 / c.optimizer->grad_scale) : 1.f;
  const auto at_or_null = [](float* buffer, int64_t at) { return buffer ? buffer + at : nullptr; };

  for (const Row& r : c.rows) {
    const TensorSpec& t = kTensors[r.tensor];
    Bits* param = c.buffers[c.param[r.tensor]].expected_as<Bits>() + t.param_shift + r.start;
    const Bits* grad = optimizer == Optimizer::none
                           ? nullptr
                           : c.buffers[c.grad[r.tensor]].expected_as<Bits>() + t.grad_shift + r.start;
    for (int64_t j = 0; j < r.numel; ++j) {
      const int64_t at = r.offset + j;
      float theta = D::to_float(param[j]);
      if (optimizer != Optimizer::none) {
        const float g = D::to_float(grad[j]) * inv_grad_scale;
        switch (optimizer) {
          case Optimizer::adam:
            theta = adam_rule(theta, g, state[0] + at, state[1] + at, at_or_null(state[2], at), cfg, s);
            break;
          case Optimizer::sgd_torch: theta = sgd_torch_rule(theta, g, at_or_null(state[0], at), cfg, s); break;
          case Optimizer::sgd_heavy_ball:
            theta = sgd_heavy_ball_rule(theta, g, at_or_null(state[0], at), cfg, s);
            break;
          case Optimizer::none: break;
        }
        theta = D::to_float(D::from_float(theta));
      }
      switch (rule) {
        case AverageRule::ema:
          for (size_t k = 0; k < weights.size(); ++k) averages[k][at] = ema_rule(averages[k][at], theta, weights[k]);
          break;
        case AverageRule::belay:
          theta = belay_rule(theta, averages[0] + at, at_or_null(velocity, at), weights[0], cfg);
          break;
        case AverageRule::lawa:
          lawa_sum[at] = lawa_rule(theta, lawa_sum[at], D::to_float(ring[at]));
          ring[at] = D::from_float(theta);
          break;
        case AverageRule::none: break;
      }
      if (cfg.switch_to_average) theta = switch_rule(averages[0][at]);
      if (writes_param(optimizer, rule, cfg)) param[j] = D::from_float(theta);
    }
  }
}

// Each row took its path, and θ was stored only where the step can change it: from the log of every access of
// the launch, the ones inside a row's params are, on the vector path, one 16-byte load per whole pack and one
// element-wide load per element of the tail, on the scalar path one element-wide load per element; plus as many
// stores again when the step writes θ (writes_param), none when it does not (averaging alone without BELAY or a
// switch). No other width touches a param.
template <typename D>
std::string path_errors(const Case& c, const std::vector<cuda_emulation::Access>& log) {
  constexpr int64_t kPack = 16 / sizeof(typename D::Bits);
  const Segment* table = reinterpret_cast<const Segment*>(c.buffers[c.table].initial.data());
  std::vector<std::pair<uintptr_t, size_t>> starts;  // param address of each row -> row
  for (size_t r = 0; r < c.rows.size(); ++r) starts.emplace_back(static_cast<uintptr_t>(table[r].param), r);
  std::sort(starts.begin(), starts.end());
  std::vector<int64_t> packs(c.rows.size(), 0), elements(c.rows.size(), 0);
  std::ostringstream errors;
  for (const cuda_emulation::Access& a : log) {
    auto it = std::upper_bound(starts.begin(), starts.end(), std::make_pair(a.address, ~size_t{0}));
    if (it == starts.begin()) continue;
    --it;
    const size_t r = it->second;
    if (a.address >= it->first + c.rows[r].numel * sizeof(typename D::Bits)) continue;  // not a param
    if (a.bytes == 16) {
      packs[r] += 1;
    } else if (a.bytes == sizeof(typename D::Bits)) {
      elements[r] += 1;
    } else {
      errors << " row " << r << " has a " << a.bytes << "-byte param access;";
    }
  }
  const int64_t accesses = c.optimizer->found_inf != 0.f                                          ? 0
                           : writes_param(c.optimizer->optimizer, c.averaging->rule, c.config) ? 2
                                                                                                : 1;
  for (size_t r = 0; r < c.rows.size(); ++r) {
    const int64_t numel = c.rows[r].numel;
    const int64_t whole_packs = c.vector_path[r] ? numel / kPack : 0;
    const int64_t expected_packs = accesses * whole_packs;
    const int64_t expected_elements = accesses * (numel - whole_packs * kPack);
    if (packs[r] != expected_packs || elements[r] != expected_elements) {
      errors << " row " << r << " (" << numel << " elements, " << (c.vector_path[r] ? "aligned" : "not aligned")
             << ") made " << packs[r] << " 16-byte and " << elements[r] << " element-wide param accesses instead of "
             << expected_packs << " and " << expected_elements << ";";
    }
  }
  return errors.str();
}

// --- running and comparing --------------------------------------------------------------------------------

struct Schedule {
  const char* name;
  cuda_emulation::Order order;
};
const Schedule kSchedules[] = {{"forward", cuda_emulation::Order::forward},
                               {"reverse", cuda_emulation::Order::reverse},
                               {"shuffled", cuda_emulation::Order::shuffled}};

// Two emulated devices: device 0's grid has a block per row (132 SMs × 8 blocks of 256 threads), device 1's
// has 3 blocks, which stride over the rows.
const cuda_emulation::Device kDevices[] = {{"132 SMs", 132, 2048}, {"3 SMs, 1 block each", 3, 256}};

struct Options {
  std::vector<int> schedules = {0, 1, 2};
  std::vector<int64_t> skews = {0, 1, 3, 4, 8};
  uint64_t seed = 1;
  bool fail_fast = false;
};

int failures = 0;
constexpr int kMaxReports = 30;

void report(const std::string& message) {
  ++failures;
  if (failures <= kMaxReports) std::fprintf(stderr, "harness: %s\n", message.c_str());
  if (failures == kMaxReports + 1) std::fprintf(stderr, "harness: (more failures not shown)\n");
}

template <typename D>
std::string describe(const Case& c) {
  std::ostringstream out;
  out << c.optimizer->name << " + " << c.averaging->name << ", " << D::name << ", state offset skew " << c.skew;
  return out.str();
}

// The first differing element of `actual` against `expected` in buffer b, as text; empty when equal.
template <typename D>
std::string first_difference(const Buffer& b, const unsigned char* actual, const std::vector<unsigned char>& expected) {
  if (std::memcmp(actual, expected.data(), b.bytes) == 0) return "";
  const bool param_dtype = b.name.rfind("param", 0) == 0 || b.name.rfind("grad", 0) == 0 || b.name == "lawa_ring_slot";
  const size_t size = b.name == "segments" ? sizeof(int64_t) : param_dtype ? sizeof(typename D::Bits) : sizeof(float);
  size_t count = 0, first = 0;
  for (size_t i = 0; i < b.bytes / size; ++i) {
    if (std::memcmp(actual + i * size, expected.data() + i * size, size) != 0 && count++ == 0) first = i;
  }
  const auto value = [&](const unsigned char* p) {
    char text[64];
    if (size == sizeof(float) && b.name != "segments") {
      std::snprintf(text, sizeof text, "%.9g", *reinterpret_cast<const float*>(p));
    } else if (size == 2) {
      typename D::Bits bits;
      std::memcpy(&bits, p, sizeof bits);
      std::snprintf(text, sizeof text, "%.6g (0x%04x)", static_cast<double>(D::to_float(bits)),
                    static_cast<unsigned>(bits));
    } else {
      std::snprintf(text, sizeof text, "%lld", *reinterpret_cast<const long long*>(p));
    }
    return std::string(text);
  };
  std::ostringstream out;
  out << b.name << ": " << count << " element(s) differ, first at " << first << ": " << value(actual + first * size)
      << " instead of " << value(expected.data() + first * size);
  return out.str();
}

struct Totals {
  int64_t cases = 0, runs = 0, elements = 0, vector_rows = 0, scalar_rows = 0;
};

template <typename D>
void run_case(const OptimizerCase& o, const AveragingCase& a, int64_t skew, const Options& options, Totals& totals) {
  const uint64_t seed = options.seed * 1000003u + static_cast<uint64_t>(totals.cases);
  Case c = make_case<D>(o, a, skew, seed);
  reference_step<D>(c);
  bool changes = false;
  for (const Buffer& b : c.buffers) changes |= b.expected != b.initial;
  const bool no_op =
      (o.optimizer == Optimizer::none && a.rule == AverageRule::none && !a.switch_to_average) || o.found_inf != 0.f;
  if (!changes && !no_op) report(describe<D>(c) + ": the scalar loop changed nothing, so the case proves nothing");

  std::vector<std::vector<unsigned char>> first_run;
  for (int device = 0; device < static_cast<int>(std::size(kDevices)); ++device) {
    for (const int schedule : options.schedules) {
      for (Buffer& b : c.buffers) std::memcpy(b.device, b.initial.data(), b.bytes);
      cuda_emulation::set_schedule(kSchedules[schedule].order, options.seed + 7919u * totals.runs);
      cudaSetDevice(device);
      std::vector<cuda_emulation::Access> log;
      // The first run of a case checks and logs every access (the packs, and the param's loads and stores).
      cuda_emulation::set_access_log(first_run.empty() ? &log : nullptr, 1);
      step_cuda(o.optimizer, a.rule, D::dtype, c.pointers, c.config, nullptr);
      cuda_emulation::set_access_log(nullptr);
      totals.runs += 1;
      const std::string where = describe<D>(c) + ", " + kSchedules[schedule].name + " order, device " +
                                std::to_string(device) + " (" + kDevices[device].name + ")";
      if (first_run.empty()) {
        const std::string errors = path_errors<D>(c, log);
        if (!errors.empty()) report(where + ": a row took the wrong path:" + errors);
      }
      bool same_as_first = true;
      for (size_t i = 0; i < c.buffers.size(); ++i) {
        const Buffer& b = c.buffers[i];
        const auto* result = static_cast<const unsigned char*>(b.device);
        const std::string difference = first_difference<D>(b, result, b.expected);
        if (!difference.empty()) report(where + ": differs from the scalar loop: " + difference);
        if (first_run.size() < c.buffers.size()) {
          first_run.emplace_back(result, result + b.bytes);
        } else {
          same_as_first &= std::memcmp(result, first_run[i].data(), b.bytes) == 0;
        }
      }
      if (!same_as_first) {
        report(where + ": differs from the first schedule's result (the result depends on the order of threads or "
                       "blocks)");
      }
      if (options.fail_fast && failures) {
        free_case(c);
        return;
      }
    }
  }
  totals.cases += 1;
  totals.elements += c.elements;
  totals.vector_rows += c.vector_rows;
  totals.scalar_rows += c.scalar_rows;
  free_case(c);
}

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');) parts.push_back(part);
  return parts;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&](const char* prefix) { return arg.substr(std::strlen(prefix)); };
    if (arg.rfind("--orders=", 0) == 0) {
      options.schedules.clear();
      for (const std::string& name : split(value("--orders="))) {
        int found = -1;
        for (int s = 0; s < static_cast<int>(std::size(kSchedules)); ++s) {
          if (name == kSchedules[s].name) found = s;
        }
        if (found < 0) {
          std::fprintf(stderr, "harness: unknown order %s (forward, reverse, shuffled)\n", name.c_str());
          return 2;
        }
        options.schedules.push_back(found);
      }
    } else if (arg.rfind("--skews=", 0) == 0) {
      options.skews.clear();
      for (const std::string& skew : split(value("--skews="))) options.skews.push_back(std::stoll(skew));
    } else if (arg.rfind("--seed=", 0) == 0) {
      options.seed = std::stoull(value("--seed="));
    } else if (arg == "--fail-fast") {
      options.fail_fast = true;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--orders=forward,reverse,shuffled] [--skews=0,1,3,4,8] [--seed=N] [--fail-fast]\n",
                   argv[0]);
      return 2;
    }
  }
  cuda_emulation::set_devices(kDevices, static_cast<int>(std::size(kDevices)));

  Totals totals;
  for (const int64_t skew : options.skews) {
    for (const OptimizerCase& o : kOptimizers) {
      for (const AveragingCase& a : kAveragings) {
        run_case<Float32>(o, a, skew, options, totals);
        run_case<BFloat16>(o, a, skew, options, totals);
        run_case<Float16>(o, a, skew, options, totals);
        if (options.fail_fast && failures) break;
      }
      if (options.fail_fast && failures) break;
    }
    if (options.fail_fast && failures) break;
  }
  const cuda_emulation::Counters counters = cuda_emulation::counters();
  std::printf(
      "harness: %lld cases (%zu optimizers x %zu averagings x 3 dtypes x %zu state offsets), %lld runs "
      "(%zu thread/block orders x %zu grids); %lld launches, %lld blocks, %lld threads, %lld barriers; "
      "%lld rows on the vector path, %lld on the scalar path, %lld elements per run set; %d failure(s)\n",
      static_cast<long long>(totals.cases), std::size(kOptimizers), std::size(kAveragings), options.skews.size(),
      static_cast<long long>(totals.runs), options.schedules.size(), std::size(kDevices),
      static_cast<long long>(counters.launches), static_cast<long long>(counters.blocks),
      static_cast<long long>(counters.threads), static_cast<long long>(counters.barriers),
      static_cast<long long>(totals.vector_rows), static_cast<long long>(totals.scalar_rows),
      static_cast<long long>(totals.elements), failures);
  return failures == 0 && totals.vector_rows > 0 && totals.scalar_rows > 0 ? 0 : 1;
}
