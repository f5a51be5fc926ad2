// Runs the CUDA kernel's work on each row (step_row of fastavg_cuda.cu) on the CPU, lane by lane as the
// 256 threads of a block would, over a segment table whose rows take the vector path or the scalar one
// (misaligned params, grads or flat offsets; tails; tensors split into several rows), and compares every
// buffer, gaps included, bit for bit with a plain element-by-element loop over the same rules.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "fastavg_cuda.cu"

using namespace fastavg;

namespace {

// Rows shorter than fastavg._segments.ROW_NUMEL (65536), so that tensors of a few thousand elements take
// several rows: the kernel works on rows of any length.
constexpr int64_t kRowNumel = 2048;
constexpr int kLanes = 256;

struct Tensor {
  int64_t numel;
  int64_t param_shift, grad_shift;  // elements off a 16-byte boundary
};
// Sizes below one pack, with tails, exactly one row, several rows; misaligned params and grads.
const Tensor kTensors[] = {{1, 0, 0},    {7, 0, 0},      {1023, 0, 0},  {kRowNumel, 0, 0}, {2 * kRowNumel + 5, 0, 0},
                           {4097, 1, 0}, {4097, 0, 3},   {64, 8, 8},    {33, 0, 0}};

// One arena per buffer: random values everywhere, gaps included, 256-byte aligned.
struct alignas(256) Block {
  unsigned char bytes[256];
};
struct Arena {
  std::vector<Block> blocks;
  size_t bytes = 0;
  Arena() = default;
  Arena(size_t size, std::mt19937& rng, bool positive_floats) : blocks(size / sizeof(Block) + 1), bytes(size) {
    std::uniform_real_distribution<float> uniform(positive_floats ? 0.01f : -1.f, 1.f);
    for (size_t i = 0; i + sizeof(float) <= size; i += sizeof(float)) {
      const float value = uniform(rng);
      std::memcpy(base() + i, &value, sizeof(float));
    }
  }
  unsigned char* base() { return blocks.data()->bytes; }
  const unsigned char* base() const { return blocks.data()->bytes; }
};

template <typename T>
using RowFunction = void (*)(const Segment&, const StepBuffers&, const StepConfig&, const StepScalars&,
                             const float (&)[kMaxAverages], int64_t, int64_t);

struct Setup {
  Optimizer optimizer;
  AverageRule rule;
  int num_averages;  // EMA: averages; BELAY: 1; switch alone: 1
  bool amsgrad_or_momentum, velocity, switch_to_average;
  const char* name;
  RowFunction<float> row_float32;
  RowFunction<__nv_bfloat16> row_bfloat16;
  RowFunction<__half> row_float16;
  RowFunction<float> row(float) const { return row_float32; }
  RowFunction<__nv_bfloat16> row(__nv_bfloat16) const { return row_bfloat16; }
  RowFunction<__half> row(__half) const { return row_float16; }
};

#define FASTAVG_ROWS(O, R) &step_row<O, R, float>, &step_row<O, R, __nv_bfloat16>, &step_row<O, R, __half>
const Setup kSetups[] = {
    {Optimizer::adam, AverageRule::ema, 3, true, false, true, "adam amsgrad + 3 EMAs + switch",
     FASTAVG_ROWS(Optimizer::adam, AverageRule::ema)},
    {Optimizer::adam, AverageRule::belay, 1, false, true, false, "adamw + BELAY with velocity",
     FASTAVG_ROWS(Optimizer::adam, AverageRule::belay)},
    {Optimizer::adam, AverageRule::none, 0, false, false, false, "adam alone",
     FASTAVG_ROWS(Optimizer::adam, AverageRule::none)},
    {Optimizer::sgd_torch, AverageRule::lawa, 0, true, false, false, "sgd momentum nesterov + LAWA",
     FASTAVG_ROWS(Optimizer::sgd_torch, AverageRule::lawa)},
    {Optimizer::sgd_torch, AverageRule::none, 0, false, false, false, "sgd without momentum",
     FASTAVG_ROWS(Optimizer::sgd_torch, AverageRule::none)},
    {Optimizer::sgd_heavy_ball, AverageRule::ema, 1, true, false, false, "heavy ball + EMA",
     FASTAVG_ROWS(Optimizer::sgd_heavy_ball, AverageRule::ema)},
    {Optimizer::none, AverageRule::none, 1, false, false, true, "switch alone",
     FASTAVG_ROWS(Optimizer::none, AverageRule::none)},
    {Optimizer::none, AverageRule::ema, 2, false, false, false, "average_: 2 EMAs",
     FASTAVG_ROWS(Optimizer::none, AverageRule::ema)},
    {Optimizer::none, AverageRule::belay, 1, false, false, true, "average_: BELAY + switch",
     FASTAVG_ROWS(Optimizer::none, AverageRule::belay)},
    {Optimizer::none, AverageRule::lawa, 0, false, false, false, "average_: LAWA",
     FASTAVG_ROWS(Optimizer::none, AverageRule::lawa)},
};
#undef FASTAVG_ROWS

struct Buffers {
  Arena param, grad, state[3], averages[kMaxAverages], velocity, lawa_sum, ring;
};

template <typename T>
void oracle_row(const Segment& segment, const Setup& setup, const StepBuffers& b, const StepConfig& c,
                const StepScalars& s, const float (&weights)[kMaxAverages]) {
  T* param = reinterpret_cast<T*>(static_cast<uintptr_t>(segment.param));
  const T* grad = reinterpret_cast<const T*>(static_cast<uintptr_t>(segment.grad));
  for (int64_t j = 0; j < segment.numel; ++j) {
    const int64_t at = segment.offset + j;
    float theta = to_float(param[j]);
    if (setup.optimizer != Optimizer::none) {
      const float g = to_float(grad[j]);
      float* s0 = b.optimizer_state[0] ? b.optimizer_state[0] + at : nullptr;
      if (setup.optimizer == Optimizer::adam) {
        float* s2 = b.optimizer_state[2] ? b.optimizer_state[2] + at : nullptr;
        theta = adam_rule(theta, g, s0, b.optimizer_state[1] + at, s2, c, s);
      } else if (setup.optimizer == Optimizer::sgd_torch) {
        theta = sgd_torch_rule(theta, g, s0, c, s);
      } else {
        theta = sgd_heavy_ball_rule(theta, g, s0, c, s);
      }
      theta = round_to<T>(theta);
    }
    if (setup.rule == AverageRule::ema) {
      for (int k = 0; k < b.num_averages; ++k) b.averages[k][at] = ema_rule(b.averages[k][at], theta, weights[k]);
    } else if (setup.rule == AverageRule::belay) {
      theta = belay_rule(theta, b.averages[0] + at, b.average_velocity ? b.average_velocity + at : nullptr,
                         weights[0], c);
    } else if (setup.rule == AverageRule::lawa) {
      T* ring = static_cast<T*>(b.lawa_ring_slot);
      b.lawa_sum[at] = lawa_rule(theta, b.lawa_sum[at], to_float(ring[at]));
      ring[at] = from_float<T>(theta);
    }
    if (c.switch_to_average) theta = switch_rule(b.averages[0][at]);
    param[j] = from_float<T>(theta);
  }
}

StepBuffers pointers(Buffers& x, const Setup& setup, const std::vector<Segment>& table) {
  StepBuffers b;
  b.segments = table.data();
  b.num_segments = static_cast<int64_t>(table.size());
  const int num_state = setup.optimizer == Optimizer::adam ? (setup.amsgrad_or_momentum ? 3 : 2)
                        : setup.optimizer == Optimizer::none ? 0
                                                             : (setup.amsgrad_or_momentum ? 1 : 0);
  for (int i = 0; i < num_state; ++i) b.optimizer_state[i] = reinterpret_cast<float*>(x.state[i].base());
  if (setup.rule == AverageRule::lawa) {
    b.lawa_sum = reinterpret_cast<float*>(x.lawa_sum.base());
    b.lawa_ring_slot = x.ring.base();
  } else {
    for (int k = 0; k < setup.num_averages; ++k) b.averages[k] = reinterpret_cast<float*>(x.averages[k].base());
    b.num_averages = setup.num_averages;
    if (setup.velocity) b.average_velocity = reinterpret_cast<float*>(x.velocity.base());
  }
  return b;
}

// The table of kTensors in `x` (addresses in its param and grad arenas), state offsets skewed by `skew`.
template <typename T>
std::vector<Segment> table_of(Buffers& x, bool with_grad, int64_t skew, int64_t* flat_numel) {
  std::vector<Segment> table;
  int64_t element = 0, offset = 0;
  for (const Tensor& t : kTensors) {
    element = (element + 63) / 64 * 64 + 64;  // a gap before every tensor
    offset = (offset + 31) / 32 * 32;
    for (int64_t start = 0; start < t.numel; start += kRowNumel) {
      const int64_t count = std::min(kRowNumel, t.numel - start);
      const auto address = [&](Arena& arena, int64_t shift) {
        return static_cast<int64_t>(reinterpret_cast<uintptr_t>(arena.base() + (element + shift + start) * sizeof(T)));
      };
      table.push_back(Segment{address(x.param, t.param_shift), with_grad ? address(x.grad, t.grad_shift) : 0, count,
                              offset + skew + start});
    }
    element += t.numel + 16;
    offset += t.numel + skew;
  }
  *flat_numel = offset + 64;
  return table;
}

int64_t param_arena_numel() {
  int64_t element = 0;
  for (const Tensor& t : kTensors) element = (element + 63) / 64 * 64 + 64 + t.numel + 16;
  return element + 64;
}

// The path a row must take, worked out from the table instead of the addresses of every buffer.
bool expect_vector(const Segment& segment, const Setup& setup, const StepBuffers& b, size_t element_size) {
  const bool flat_fp32 = b.optimizer_state[0] || b.averages[0] || b.lawa_sum;
  return segment.param % 16 == 0 && segment.grad % 16 == 0 && (!flat_fp32 || segment.offset % 4 == 0) &&
         (setup.rule != AverageRule::lawa || segment.offset * element_size % 16 == 0);
}

template <typename T>
bool run(const Setup& setup, int64_t skew, const char* dtype, int64_t* vector_rows, int64_t* scalar_rows) {
  std::mt19937 rng(1234);
  Buffers original;
  const size_t param_bytes = param_arena_numel() * sizeof(T);
  original.param = Arena(param_bytes, rng, false);
  original.grad = Arena(param_bytes, rng, false);
  int64_t flat_numel = 0;
  table_of<T>(original, true, skew, &flat_numel);
  const size_t flat_bytes = flat_numel * sizeof(float);
  for (int i = 0; i < 3; ++i) original.state[i] = Arena(flat_bytes, rng, i > 0);  // exp_avg_sq > 0
  for (auto& average : original.averages) average = Arena(flat_bytes, rng, false);
  original.velocity = Arena(flat_bytes, rng, false);
  original.lawa_sum = Arena(flat_bytes, rng, false);
  original.ring = Arena(flat_numel * sizeof(T), rng, false);
  if (!std::is_same<T, float>::value) {  // parameter-dtype arenas hold valid values of T
    for (Arena* arena : {&original.param, &original.grad, &original.ring}) {
      T* values = reinterpret_cast<T*>(arena->base());
      std::uniform_real_distribution<float> uniform(-1.f, 1.f);
      for (size_t i = 0; i < arena->bytes / sizeof(T); ++i) values[i] = from_float<T>(uniform(rng));
    }
  }

  StepConfig c;
  c.momentum = 0.9f;
  c.one_minus_dampening = 0.9f;
  c.weight_decay = 0.01f;
  c.beta2 = 0.999f;
  c.one_minus_beta1 = 0.1f;
  c.one_minus_beta2 = 0.001f;
  c.eps = 1e-8f;
  c.log2_beta1 = std::log2(0.9);
  c.log2_beta2 = std::log2(0.999);
  c.reaction = 0.5f;
  c.inertia = 0.3f;
  c.nesterov = setup.optimizer == Optimizer::sgd_torch;
  c.maximize = setup.optimizer == Optimizer::sgd_heavy_ball;
  c.decoupled_weight_decay = setup.rule == AverageRule::belay;
  c.switch_to_average = setup.switch_to_average;
  const StepScalars s = setup.optimizer == Optimizer::none ? StepScalars{} : step_scalars(0.01f, 3.f, c);
  const float weights[kMaxAverages] = {0.1f, 0.01f, 0.5f, 0.f, 0.f, 0.f, 0.f, 0.f};

  Buffers kernel = original, oracle = original;
  const bool with_grad = setup.optimizer != Optimizer::none;
  const std::vector<Segment> kernel_table = table_of<T>(kernel, with_grad, skew, &flat_numel);
  const std::vector<Segment> oracle_table = table_of<T>(oracle, with_grad, skew, &flat_numel);
  const StepBuffers kernel_buffers = pointers(kernel, setup, kernel_table);
  const StepBuffers oracle_buffers = pointers(oracle, setup, oracle_table);

  for (const Segment& segment : kernel_table) {
    const bool vector = is_vector_aligned(row_of<T>(segment), kernel_buffers);
    if (vector != expect_vector(segment, setup, kernel_buffers, sizeof(T))) {
      std::fprintf(stderr, "row emulation: %s %s, skew %lld: a row of offset %lld takes the wrong path\n", setup.name,
                   dtype, static_cast<long long>(skew), static_cast<long long>(segment.offset));
      return false;
    }
    (vector ? *vector_rows : *scalar_rows) += 1;
    for (int lane = 0; lane < kLanes; ++lane) {
      setup.row(T())(segment, kernel_buffers, c, s, weights, lane, kLanes);
    }
  }
  for (const Segment& segment : oracle_table) oracle_row<T>(segment, setup, oracle_buffers, c, s, weights);

  bool same = true;
  const auto compare = [&](const Arena& a, const Arena& e, const char* what) {
    if (std::memcmp(a.base(), e.base(), a.bytes) != 0) {
      std::fprintf(stderr, "row emulation: %s %s, skew %lld: %s differs from the element loop\n", setup.name, dtype,
                   static_cast<long long>(skew), what);
      same = false;
    }
  };
  compare(kernel.param, oracle.param, "param");
  compare(kernel.grad, oracle.grad, "grad");
  for (int i = 0; i < 3; ++i) compare(kernel.state[i], oracle.state[i], "optimizer state");
  for (int k = 0; k < kMaxAverages; ++k) compare(kernel.averages[k], oracle.averages[k], "an average");
  compare(kernel.velocity, oracle.velocity, "the velocity");
  compare(kernel.lawa_sum, oracle.lawa_sum, "the LAWA sum");
  compare(kernel.ring, oracle.ring, "the LAWA ring slot");
  // Sanity: the step changed something (else the comparison proves nothing).
  bool changed = false;
  const auto differs = [&](const Arena& a, const Arena& o) { changed |= std::memcmp(a.base(), o.base(), a.bytes) != 0; };
  differs(oracle.param, original.param);
  for (int i = 0; i < 3; ++i) differs(oracle.state[i], original.state[i]);
  for (int k = 0; k < kMaxAverages; ++k) differs(oracle.averages[k], original.averages[k]);
  differs(oracle.lawa_sum, original.lawa_sum);
  if (!changed) std::fprintf(stderr, "row emulation: %s %s: the step changed nothing\n", setup.name, dtype);
  return same && changed;
}

}  // namespace

int main() {
  int failures = 0;
  int64_t vector_rows = 0, scalar_rows = 0, cases = 0;
  for (const Setup& setup : kSetups) {
    for (const int64_t skew : {0, 1, 4, 8}) {
      failures += !run<float>(setup, skew, "float32", &vector_rows, &scalar_rows);
      failures += !run<__nv_bfloat16>(setup, skew, "bfloat16", &vector_rows, &scalar_rows);
      failures += !run<__half>(setup, skew, "float16", &vector_rows, &scalar_rows);
      cases += 3;
    }
  }
  std::printf("row emulation: %lld cases, %lld rows on the vector path, %lld on the scalar path, %d failure(s)\n",
              static_cast<long long>(cases), static_cast<long long>(vector_rows), static_cast<long long>(scalar_rows),
              failures);
  return failures == 0 && vector_rows > 0 && scalar_rows > 0 ? 0 : 1;
}
