// The element-wise rules of fastavg, one definition each, shared by the CPU loop and the CUDA kernel.
//
// Names and order of operations follow fastavg/reference.py (the spec). Every rule works on fp32
// values; loading and storing parameters of other dtypes is the caller's job. This header includes
// nothing from torch so that the CUDA sources compile with nvcc alone.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTAVG_HD __host__ __device__ __forceinline__
#else
#define FASTAVG_HD inline __attribute__((always_inline))
#endif

namespace fastavg {

// Which optimizer rule a fused step runs; `none` is averaging alone (the average_ op).
enum class Optimizer : int { none = 0, sgd_torch = 1, sgd_heavy_ball = 2, adam = 3 };

// Mirrors fastavg.averaging.RULE_*: what the averaging part of a step does.
enum class AverageRule : int { none = 0, ema = 1, belay = 2, lawa = 3 };

constexpr int kMaxAverages = 8;

// Hyperparameters that are plain runtime values (never compiled in). lr, step and the averaging
// weights are read from memory by the kernels instead, so that they can change under a CUDA graph.
//
// 1 − β and 1 − τ are rounded to fp32 from double on the host, as torch rounds its Python-float
// factors: computed in fp32 from an fp32 β they would be off by up to 5e-5 relative (β = 0.999).
// For the same reason the bias corrections 1 − βᵗ = 1 − 2^(t·log2 β) start from log2 β in double.
struct StepConfig {
  float momentum = 0.f, one_minus_dampening = 1.f, weight_decay = 0.f;
  float beta2 = 0.f, one_minus_beta1 = 1.f, one_minus_beta2 = 1.f, eps = 0.f;
  double log2_beta1 = 0.0, log2_beta2 = 0.0;
  float reaction = 0.f, inertia = 0.f;
  bool nesterov = false, maximize = false, decoupled_weight_decay = false;
  bool switch_to_average = false;
};

// Per-launch values derived once from the scalars in memory (lr, step).
struct StepScalars {
  float lr;
  float decoupled_decay;            // 1 - lr * weight_decay (AdamW)
  float adam_step_size;             // lr / (1 - beta1^step)
  float adam_bias_correction2_sqrt; // sqrt(1 - beta2^step)
  bool first_step;                  // torch SGD: the momentum buffer starts as the gradient
};

// GradScaler's unscaling factor, the inv_scale torch.amp.GradScaler.unscale_ multiplies the gradients by (1/scale
// in float64, rounded to fp32; for GradScaler's power-of-two scales g * (1/scale) is exactly g / scale, as
// torch's fused optimizers divide); 1 without a scale, which multiplies exactly.
FASTAVG_HD float inverse_grad_scale(const float* inv_grad_scale) {
  return inv_grad_scale == nullptr ? 1.f : *inv_grad_scale;
}

// Whether GradScaler found an inf or NaN in the gradients: then the launch changes nothing.
FASTAVG_HD bool skip_step(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.f; }

FASTAVG_HD StepScalars step_scalars(float lr, float step, const StepConfig& c) {
  StepScalars s;
  s.lr = lr;
  s.decoupled_decay = static_cast<float>(1.0 - static_cast<double>(lr) * static_cast<double>(c.weight_decay));
  const double bias_correction1 = 1.0 - exp2(static_cast<double>(step) * c.log2_beta1);
  const double bias_correction2 = 1.0 - exp2(static_cast<double>(step) * c.log2_beta2);
  s.adam_step_size = static_cast<float>(static_cast<double>(lr) / bias_correction1);
  s.adam_bias_correction2_sqrt = static_cast<float>(sqrt(bias_correction2));
  s.first_step = step == 1.f;
  return s;
}

// e ← lerp(e, θ, w), with torch.lerp's two-sided form so that w = 1 copies θ exactly.
// EMA (w = 1 − β_u), SWA (w = 1/n) and the copy phase before an averager's start (w = 1).
FASTAVG_HD float ema_rule(float average, float param, float weight) {
  const float diff = param - average;
  return weight < 0.5f ? average + weight * diff : param - diff * (1.f - weight);
}

// The rules are written as selects on runtime flags, with stores decided only by which buffers are
// passed (nullptr or not), so that once inlined into a loop with fixed buffers they have no branches
// and the CPU loop vectorizes.

// torch.optim.SGD: d = ±g + λθ; b ← d on the first step, else μb + (1−τ)d; θ ← θ − η(d + μb | b).
FASTAVG_HD float sgd_torch_rule(float param, float grad, float* momentum_buffer, const StepConfig& c,
                                const StepScalars& s) {
  float d = c.maximize ? -grad : grad;
  d = c.weight_decay != 0.f ? d + c.weight_decay * param : d;
  if (momentum_buffer != nullptr) {
    const float b = s.first_step ? d : c.momentum * *momentum_buffer + c.one_minus_dampening * d;
    *momentum_buffer = b;
    d = c.nesterov ? d + c.momentum * b : b;
  }
  return param - s.lr * d;
}

// Polyak's heavy ball, η inside the velocity: v ← μv − η(±g + λθ); θ ← θ + v (nesterov: θ + μv − η(…)).
FASTAVG_HD float sgd_heavy_ball_rule(float param, float grad, float* velocity, const StepConfig& c,
                                     const StepScalars& s) {
  float d = c.maximize ? -grad : grad;
  d = c.weight_decay != 0.f ? d + c.weight_decay * param : d;
  if (velocity == nullptr) return param - s.lr * d;
  const float v = c.momentum * *velocity - s.lr * d;
  *velocity = v;
  return c.nesterov ? param + c.momentum * v - s.lr * d : param + v;
}

// torch.optim.Adam (L2) / AdamW (decoupled), in torch's order of operations. amsgrad is on exactly
// when max_exp_avg_sq is passed.
FASTAVG_HD float adam_rule(float param, float grad, float* exp_avg, float* exp_avg_sq, float* max_exp_avg_sq,
                           const StepConfig& c, const StepScalars& s) {
  float g = c.maximize ? -grad : grad;
  const bool decay = c.weight_decay != 0.f;
  g = decay && !c.decoupled_weight_decay ? g + c.weight_decay * param : g;
  param = decay && c.decoupled_weight_decay ? param * s.decoupled_decay : param;
  const float m = ema_rule(*exp_avg, g, c.one_minus_beta1);
  const float v = c.beta2 * *exp_avg_sq + c.one_minus_beta2 * g * g;
  *exp_avg = m;
  *exp_avg_sq = v;
  float second_moment = v;
  if (max_exp_avg_sq != nullptr) {
    // torch.maximum: NaN wins (fmaxf would drop it).
    second_moment = ((v > *max_exp_avg_sq) | (v != v)) ? v : *max_exp_avg_sq;
    *max_exp_avg_sq = second_moment;
  }
  const float denom = sqrtf(second_moment) / s.adam_bias_correction2_sqrt + c.eps;
  return param - s.adam_step_size * (m / denom);
}

// The BELAY spring: d = θ − e; v ← μv + αd, e ← e + v (no velocity: e ← lerp(e, θ, α)); θ ← θ − ραd.
// Returns the new θ.
FASTAVG_HD float belay_rule(float param, float* average, float* velocity, float weight, const StepConfig& c) {
  const float diff = param - *average;
  if (velocity == nullptr) {
    *average = ema_rule(*average, param, weight);
  } else {
    const float v = c.inertia * *velocity + weight * diff;
    *velocity = v;
    *average += v;
  }
  return param - c.reaction * weight * diff;
}

// LAWA snapshot: S ← S + (θ − ring[j]); the caller stores θ into ring[j]. Returns the new S.
FASTAVG_HD float lawa_rule(float param, float lawa_sum, float ring_slot) {
  return lawa_sum + (param - ring_slot);
}

// Switch EMA: θ ← e.
FASTAVG_HD float switch_rule(float average) { return average; }

// Whether a step writes θ: the optimizer rule moves it, BELAY's reaction pulls it toward the average, a
// switch copies the average into it. Averaging alone otherwise (EMA, multi-EMA, SWA, PowerEMA, BEMA, the copy
// phase, a LAWA snapshot, no rule) only reads θ, and every kernel then skips its store: the parameter's memory
// is not written at all (bit for bit untouched, NaN payloads included), and averaging moves 12 bytes per fp32
// element instead of 16.
FASTAVG_HD constexpr bool writes_param(Optimizer optimizer, AverageRule rule, bool switch_to_average) {
  return optimizer != Optimizer::none || rule == AverageRule::belay || switch_to_average;
}
FASTAVG_HD constexpr bool writes_param(Optimizer optimizer, AverageRule rule, const StepConfig& c) {
  return writes_param(optimizer, rule, c.switch_to_average);
}

}  // namespace fastavg
