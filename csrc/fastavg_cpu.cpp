// CPU kernels: one pass over each flat buffer, multithreaded with at::parallel_for.
//
// Each thread walks its range in chunks that stay in L1: the optimizer rule writes the new θ of a
// chunk into a small fp32 array, the averaging rule reads it from there, and θ is stored once. The
// inner loops are plain element-wise loops over restrict pointers so that the compiler vectorizes them.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "fastavg_step.h"

namespace fastavg {
namespace {

constexpr int64_t kChunk = 1024;
constexpr int64_t kGrain = 32 * 1024;

template <typename T>
inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

template <Optimizer O, AverageRule R, typename T>
void step_kernel(const StepBuffers& b, const StepConfig& config) {
  const StepScalars scalars = O == Optimizer::none ? StepScalars{} : step_scalars(*b.lr, *b.step, config);
  float weights[kMaxAverages] = {};
  const int num_weights = R == AverageRule::ema ? b.num_averages : (R == AverageRule::belay ? 1 : 0);
  for (int k = 0; k < num_weights; ++k) weights[k] = b.average_weights[k];

  at::parallel_for(0, b.numel, kGrain, [&](int64_t begin, int64_t end) {
    // Private copies: stores through the buffer pointers cannot alias them, so they stay in registers.
    const StepConfig c = config;
    const StepScalars s = scalars;
    alignas(64) float theta[kChunk];
    for (int64_t start = begin; start < end; start += kChunk) {
      const int64_t n = std::min(kChunk, end - start);
      T* __restrict param = static_cast<T*>(b.param) + start;

      if constexpr (O == Optimizer::none) {
        for (int64_t i = 0; i < n; ++i) theta[i] = static_cast<float>(param[i]);
      } else {
        const T* __restrict grad = static_cast<const T*>(b.grad) + start;
        float* __restrict state0 = b.optimizer_state[0] ? b.optimizer_state[0] + start : nullptr;
        if constexpr (O == Optimizer::adam) {
          float* __restrict exp_avg_sq = b.optimizer_state[1] + start;
          float* __restrict max_exp_avg_sq = b.optimizer_state[2] ? b.optimizer_state[2] + start : nullptr;
          if (max_exp_avg_sq != nullptr) {
            for (int64_t i = 0; i < n; ++i) {
              theta[i] = round_to<T>(adam_rule(static_cast<float>(param[i]), static_cast<float>(grad[i]),
                                               state0 + i, exp_avg_sq + i, max_exp_avg_sq + i, c, s));
            }
          } else {
            for (int64_t i = 0; i < n; ++i) {
              theta[i] = round_to<T>(adam_rule(static_cast<float>(param[i]), static_cast<float>(grad[i]),
                                               state0 + i, exp_avg_sq + i, nullptr, c, s));
            }
          }
        } else if (state0 == nullptr) {
          for (int64_t i = 0; i < n; ++i) {
            const float p = static_cast<float>(param[i]), g = static_cast<float>(grad[i]);
            theta[i] = round_to<T>(O == Optimizer::sgd_torch ? sgd_torch_rule(p, g, nullptr, c, s)
                                                             : sgd_heavy_ball_rule(p, g, nullptr, c, s));
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const float p = static_cast<float>(param[i]), g = static_cast<float>(grad[i]);
            theta[i] = round_to<T>(O == Optimizer::sgd_torch ? sgd_torch_rule(p, g, state0 + i, c, s)
                                                             : sgd_heavy_ball_rule(p, g, state0 + i, c, s));
          }
        }
      }

      if constexpr (R == AverageRule::ema) {
        for (int k = 0; k < b.num_averages; ++k) {
          float* __restrict average = b.averages[k] + start;
          const float w = weights[k];
          for (int64_t i = 0; i < n; ++i) average[i] = ema_rule(average[i], theta[i], w);
        }
      } else if constexpr (R == AverageRule::belay) {
        float* __restrict average = b.averages[0] + start;
        if (b.average_velocity != nullptr) {
          float* __restrict velocity = b.average_velocity + start;
          for (int64_t i = 0; i < n; ++i) theta[i] = belay_rule(theta[i], average + i, velocity + i, weights[0], c);
        } else {
          for (int64_t i = 0; i < n; ++i) theta[i] = belay_rule(theta[i], average + i, nullptr, weights[0], c);
        }
      } else if constexpr (R == AverageRule::lawa) {
        float* __restrict lawa_sum = b.lawa_sum + start;
        T* __restrict ring_slot = static_cast<T*>(b.lawa_ring_slot) + start;
        for (int64_t i = 0; i < n; ++i) {
          lawa_sum[i] = lawa_rule(theta[i], lawa_sum[i], static_cast<float>(ring_slot[i]));
          ring_slot[i] = static_cast<T>(theta[i]);
        }
      }
      if (c.switch_to_average) {
        const float* __restrict average = b.averages[0] + start;
        for (int64_t i = 0; i < n; ++i) theta[i] = switch_rule(average[i]);
      }
      for (int64_t i = 0; i < n; ++i) param[i] = static_cast<T>(theta[i]);
    }
  });
}

template <Optimizer O, AverageRule R>
void dispatch_dtype(DType dtype, const StepBuffers& b, const StepConfig& c) {
  switch (dtype) {
    case DType::float32: return step_kernel<O, R, float>(b, c);
    case DType::bfloat16: return step_kernel<O, R, c10::BFloat16>(b, c);
    case DType::float16: return step_kernel<O, R, c10::Half>(b, c);
  }
}

template <Optimizer O>
void dispatch_rule(AverageRule rule, DType dtype, const StepBuffers& b, const StepConfig& c) {
  switch (rule) {
    case AverageRule::none: return dispatch_dtype<O, AverageRule::none>(dtype, b, c);
    case AverageRule::ema: return dispatch_dtype<O, AverageRule::ema>(dtype, b, c);
    case AverageRule::belay: return dispatch_dtype<O, AverageRule::belay>(dtype, b, c);
    case AverageRule::lawa: return dispatch_dtype<O, AverageRule::lawa>(dtype, b, c);
  }
}

}  // namespace

void step_cpu(Optimizer optimizer, AverageRule rule, DType dtype, const StepBuffers& buffers,
              const StepConfig& config) {
  switch (optimizer) {
    case Optimizer::none: return dispatch_rule<Optimizer::none>(rule, dtype, buffers, config);
    case Optimizer::sgd_torch: return dispatch_rule<Optimizer::sgd_torch>(rule, dtype, buffers, config);
    case Optimizer::sgd_heavy_ball: return dispatch_rule<Optimizer::sgd_heavy_ball>(rule, dtype, buffers, config);
    case Optimizer::adam: return dispatch_rule<Optimizer::adam>(rule, dtype, buffers, config);
  }
}

}  // namespace fastavg
