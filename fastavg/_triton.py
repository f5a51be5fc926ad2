"""The Triton backend: the fused step as one Triton kernel per flat buffer, registered as torch ops.

``torch.ops.fastavg_triton.{adam_step_, sgd_step_, average_}`` take the arguments of the C++ ops
``torch.ops.fastavg.*`` (the signatures are in :mod:`fastavg._backends`) and are defined with
``torch.library.triton_op``, so ``torch.compile`` traces into the kernel. ``_step_kernel`` mirrors
``step_kernel`` in csrc/fastavg_cpu.cpp: it reads every buffer once and writes it once, running the
element-wise rules below (the reference's names and order of operations) behind ``tl.constexpr``
switches. Only the structure of a step is a compile-time constant (which optimizer, which averaging
rule, which buffers exist, the block size); lr, step and the averaging weights are read from device
memory and every other hyperparameter is a runtime argument, so changing them never recompiles and
a step can be captured in a CUDA graph.

With ``TRITON_INTERPRET=1`` set before Triton is imported, the kernels run on CPU tensors in Triton's
interpreter; that is how CI without a GPU tests them.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from ._backends import KERNEL_DTYPES
from .averaging import MAX_AVERAGES, RULE_BELAY, RULE_EMA, RULE_LAWA, RULE_NONE

try:
    from torch.library import triton_op, wrap_triton
except ImportError:  # torch < 2.6
    triton_op = wrap_triton = None

# Which optimizer rule _step_kernel runs; mirrors fastavg::Optimizer in csrc/fastavg_rules.h.
_NO_OPTIMIZER = tl.constexpr(0)
_SGD_TORCH = tl.constexpr(1)
_SGD_HEAVY_BALL = tl.constexpr(2)
_ADAM = tl.constexpr(3)

_RULE_EMA = tl.constexpr(RULE_EMA)
_RULE_BELAY = tl.constexpr(RULE_BELAY)
_RULE_LAWA = tl.constexpr(RULE_LAWA)


# --- element-wise rules (fp32 values in, fp32 values out) -------------------------------------------
@triton.jit
def ema_rule(average, param, weight):
    """e ← lerp(e, θ, w), in torch.lerp's two-sided form so that w = 1 copies θ exactly."""
    diff = param - average
    return tl.where(weight < 0.5, average + weight * diff, param - diff * (1.0 - weight))


@triton.jit
def sgd_torch_rule(param, grad, momentum_buffer, lr, momentum, one_minus_dampening, weight_decay, nesterov,
                   maximize, first_step, HAS_MOMENTUM_BUFFER: tl.constexpr):
    """torch.optim.SGD: d = ±g + λθ; b ← d on the first step, else μb + (1−τ)d; θ ← θ − η(d + μb | b)."""
    d = grad
    if maximize:
        d = -d
    if weight_decay != 0.0:
        d = d + weight_decay * param
    if HAS_MOMENTUM_BUFFER:
        momentum_buffer = tl.where(first_step, d, momentum * momentum_buffer + one_minus_dampening * d)
        if nesterov:
            d = d + momentum * momentum_buffer
        else:
            d = momentum_buffer
    return param - lr * d, momentum_buffer


@triton.jit
def sgd_heavy_ball_rule(param, grad, velocity, lr, momentum, weight_decay, nesterov, maximize,
                        HAS_VELOCITY: tl.constexpr):
    """Polyak's heavy ball, η inside the velocity: v ← μv − η(±g + λθ); θ ← θ + v (nesterov: θ + μv − η(…))."""
    d = grad
    if maximize:
        d = -d
    if weight_decay != 0.0:
        d = d + weight_decay * param
    if HAS_VELOCITY:
        velocity = momentum * velocity - lr * d
        if nesterov:
            param = param + momentum * velocity - lr * d
        else:
            param = param + velocity
    else:
        param = param - lr * d
    return param, velocity


@triton.jit
def adam_rule(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, decoupled_decay, step_size, bias_correction2_sqrt,
              beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decoupled_weight_decay, maximize,
              AMSGRAD: tl.constexpr):
    """torch.optim.Adam (L2) / AdamW (decoupled), in torch's order; step_size = lr / (1 − β₁ᵗ),
    decoupled_decay = 1 − lr·λ."""
    g = grad
    if maximize:
        g = -g
    if weight_decay != 0.0:
        if decoupled_weight_decay:
            param = param * decoupled_decay
        else:
            g = g + weight_decay * param
    exp_avg = ema_rule(exp_avg, g, one_minus_beta1)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    second_moment = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)  # as torch.maximum
        second_moment = max_exp_avg_sq
    # Correctly rounded sqrt and division, as in C++: Triton's defaults are approximate on GPUs.
    denom = tl.div_rn(tl.sqrt_rn(second_moment), bias_correction2_sqrt) + eps
    return param - step_size * tl.div_rn(exp_avg, denom), exp_avg, exp_avg_sq, max_exp_avg_sq


@triton.jit
def belay_rule(param, average, velocity, weight, reaction, inertia, HAS_VELOCITY: tl.constexpr):
    """The BELAY spring: d = θ − e; v ← μv + αd, e ← e + v (no velocity: e ← lerp(e, θ, α)); θ ← θ − ραd."""
    diff = param - average
    if HAS_VELOCITY:
        velocity = inertia * velocity + weight * diff
        average = average + velocity
    else:
        average = ema_rule(average, param, weight)
    return param - reaction * weight * diff, average, velocity


@triton.jit
def lawa_rule(param, lawa_sum, ring_slot):
    """LAWA snapshot: S ← S + (θ − ring[j]); the caller stores θ into ring[j]."""
    return lawa_sum + (param - ring_slot)


@triton.jit
def switch_rule(average):
    """Switch EMA: θ ← e."""
    return average


@triton.jit
def _to_param_dtype(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ``dtype``."""
    if dtype == tl.bfloat16:
        # By hand: Triton's interpreter truncates fp32 -> bf16 where GPUs round to nearest even.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """θ as the parameter dtype holds it, in fp32."""
    return _to_param_dtype(x, dtype).to(tl.float32)


@triton.jit
def _ema_update(average_ptr, offsets, mask, theta, weight):
    average = ema_rule(tl.load(average_ptr + offsets, mask=mask), theta, weight)
    tl.store(average_ptr + offsets, average, mask=mask)
    return average


# --- the fused step ---------------------------------------------------------------------------------
@triton.jit
def _step_kernel(param_ptr, grad_ptr, state_0_ptr, state_1_ptr, state_2_ptr,
                 average_0_ptr, average_1_ptr, average_2_ptr, average_3_ptr,
                 average_4_ptr, average_5_ptr, average_6_ptr, average_7_ptr,
                 average_velocity_ptr, lawa_sum_ptr, lawa_ring_slot_ptr,
                 lr_ptr, step_ptr, average_weights_ptr, numel,
                 momentum, one_minus_dampening, weight_decay, log2_beta1, log2_beta2, beta2, one_minus_beta1,
                 one_minus_beta2, eps, reaction, inertia,
                 nesterov, maximize, decoupled_weight_decay,
                 OPTIMIZER: tl.constexpr, HAS_MOMENTUM_BUFFER: tl.constexpr, AMSGRAD: tl.constexpr,
                 AVERAGE_RULE: tl.constexpr, NUM_AVERAGES: tl.constexpr, HAS_VELOCITY: tl.constexpr,
                 SWITCH: tl.constexpr, BLOCK: tl.constexpr):
    # On GPUs float arguments arrive as fp32; the interpreter passes Python floats (float64) through,
    # so cast them for both to compute in fp32, as the C++ kernels do.
    momentum = tl.cast(momentum, tl.float32)
    one_minus_dampening = tl.cast(one_minus_dampening, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    reaction = tl.cast(reaction, tl.float32)
    inertia = tl.cast(inertia, tl.float32)

    dtype: tl.constexpr = param_ptr.dtype.element_ty
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    theta = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)

    if OPTIMIZER != _NO_OPTIMIZER:
        lr = tl.load(lr_ptr)
        step = tl.load(step_ptr)
        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        if OPTIMIZER == _ADAM:
            # Bias corrections in float64 from the step count, as in C++ (fastavg::step_scalars).
            step64 = step.to(tl.float64)
            bias_correction1 = 1.0 - tl.exp2(step64 * tl.cast(log2_beta1, tl.float64))
            bias_correction2 = 1.0 - tl.exp2(step64 * tl.cast(log2_beta2, tl.float64))
            step_size = (lr.to(tl.float64) / bias_correction1).to(tl.float32)
            bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
            decoupled_decay = (1.0 - lr.to(tl.float64) * weight_decay.to(tl.float64)).to(tl.float32)
            exp_avg = tl.load(state_0_ptr + offsets, mask=mask)
            exp_avg_sq = tl.load(state_1_ptr + offsets, mask=mask)
            max_exp_avg_sq = exp_avg_sq  # any value: adam_rule ignores it without amsgrad
            if AMSGRAD:
                max_exp_avg_sq = tl.load(state_2_ptr + offsets, mask=mask)
            theta, exp_avg, exp_avg_sq, max_exp_avg_sq = adam_rule(
                theta, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, decoupled_decay, step_size, bias_correction2_sqrt,
                beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decoupled_weight_decay, maximize, AMSGRAD)
            tl.store(state_0_ptr + offsets, exp_avg, mask=mask)
            tl.store(state_1_ptr + offsets, exp_avg_sq, mask=mask)
            if AMSGRAD:
                tl.store(state_2_ptr + offsets, max_exp_avg_sq, mask=mask)
        else:
            momentum_buffer = theta  # any value: the rules ignore it without a buffer
            if HAS_MOMENTUM_BUFFER:
                momentum_buffer = tl.load(state_0_ptr + offsets, mask=mask)
            if OPTIMIZER == _SGD_TORCH:
                theta, momentum_buffer = sgd_torch_rule(theta, grad, momentum_buffer, lr, momentum, one_minus_dampening,
                                                        weight_decay, nesterov, maximize, step == 1.0,
                                                        HAS_MOMENTUM_BUFFER)
            else:
                theta, momentum_buffer = sgd_heavy_ball_rule(theta, grad, momentum_buffer, lr, momentum,
                                                             weight_decay, nesterov, maximize, HAS_MOMENTUM_BUFFER)
            if HAS_MOMENTUM_BUFFER:
                tl.store(state_0_ptr + offsets, momentum_buffer, mask=mask)
        theta = round_to(theta, dtype)

    if AVERAGE_RULE == _RULE_EMA:
        average_0 = _ema_update(average_0_ptr, offsets, mask, theta, tl.load(average_weights_ptr))
        if NUM_AVERAGES > 1:
            _ema_update(average_1_ptr, offsets, mask, theta, tl.load(average_weights_ptr + 1))
        if NUM_AVERAGES > 2:
            _ema_update(average_2_ptr, offsets, mask, theta, tl.load(average_weights_ptr + 2))
        if NUM_AVERAGES > 3:
            _ema_update(average_3_ptr, offsets, mask, theta, tl.load(average_weights_ptr + 3))
        if NUM_AVERAGES > 4:
            _ema_update(average_4_ptr, offsets, mask, theta, tl.load(average_weights_ptr + 4))
        if NUM_AVERAGES > 5:
            _ema_update(average_5_ptr, offsets, mask, theta, tl.load(average_weights_ptr + 5))
        if NUM_AVERAGES > 6:
            _ema_update(average_6_ptr, offsets, mask, theta, tl.load(average_weights_ptr + 6))
        if NUM_AVERAGES > 7:
            _ema_update(average_7_ptr, offsets, mask, theta, tl.load(average_weights_ptr + 7))
    elif AVERAGE_RULE == _RULE_BELAY:
        average_0 = tl.load(average_0_ptr + offsets, mask=mask)
        velocity = average_0  # any value: belay_rule ignores it without a velocity
        if HAS_VELOCITY:
            velocity = tl.load(average_velocity_ptr + offsets, mask=mask)
        theta, average_0, velocity = belay_rule(theta, average_0, velocity, tl.load(average_weights_ptr), reaction,
                                                inertia, HAS_VELOCITY)
        tl.store(average_0_ptr + offsets, average_0, mask=mask)
        if HAS_VELOCITY:
            tl.store(average_velocity_ptr + offsets, velocity, mask=mask)
    elif AVERAGE_RULE == _RULE_LAWA:
        lawa_sum = tl.load(lawa_sum_ptr + offsets, mask=mask)
        ring_slot = tl.load(lawa_ring_slot_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(lawa_sum_ptr + offsets, lawa_rule(theta, lawa_sum, ring_slot), mask=mask)
        tl.store(lawa_ring_slot_ptr + offsets, _to_param_dtype(theta, dtype), mask=mask)
    elif SWITCH:
        average_0 = tl.load(average_0_ptr + offsets, mask=mask)
    if SWITCH:
        theta = switch_rule(average_0)
    tl.store(param_ptr + offsets, _to_param_dtype(theta, dtype), mask=mask)


# --- the ops ----------------------------------------------------------------------------------------
_INTERPRETED = not isinstance(_step_kernel, triton.runtime.jit.JITFunction)
_INTERPRETER_HINT = ("to run the Triton kernels on CPU tensors in Triton's interpreter, set TRITON_INTERPRET=1 "
                     "before fastavg first looks for its backends (the first optimizer built or "
                     "fastavg.backend_status() call): Triton picks the interpreter when it defines the kernels")
_BLOCK = 1024


def _check_param(param: torch.Tensor) -> None:
    if param.dtype not in KERNEL_DTYPES:
        raise RuntimeError(f"fastavg: param must be float32, bfloat16 or float16, got {param.dtype}")
    if not param.is_contiguous():
        raise RuntimeError("fastavg: param must be contiguous (a flat buffer)")
    if param.device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError(f"fastavg: param is on the CPU; {_INTERPRETER_HINT}")


def _check_buffer(t: torch.Tensor, param: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if t.device != param.device:
        raise RuntimeError(f"fastavg: {name} is on {t.device}, param on {param.device}")
    if t.dtype != dtype:
        raise RuntimeError(f"fastavg: {name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous() or t.numel() != param.numel():
        raise RuntimeError(f"fastavg: {name} must be contiguous with as many elements as param ({param.numel()})")


def _check_scalars(t: torch.Tensor, param: torch.Tensor, count: int, name: str) -> None:
    if t.device != param.device or t.dtype != torch.float32 or not t.is_contiguous() or t.numel() < count:
        raise RuntimeError(f"fastavg: {name} must be a contiguous float32 tensor of at least {count} value(s) on "
                           f"{param.device}")


def _check_optimizer_state(state: list[torch.Tensor], param: torch.Tensor, min_size: int, max_size: int) -> None:
    if not min_size <= len(state) <= max_size:
        raise RuntimeError(f"fastavg: optimizer_state must hold {min_size} to {max_size} tensors, got {len(state)}")
    for t in state:
        _check_buffer(t, param, torch.float32, "optimizer_state")


def _averaging_args(param, average_state, average_weights, average_rule, switch_to_average) -> dict:
    """Checks the averaging arguments as the C++ ops do; returns them as ``_step_kernel``'s arguments."""
    if average_rule not in (RULE_NONE, RULE_EMA, RULE_BELAY, RULE_LAWA):
        raise RuntimeError(f"fastavg: average_rule must be 0..3, got {average_rule}")
    if average_rule == RULE_LAWA and switch_to_average:
        raise RuntimeError("fastavg: a LAWA snapshot step cannot also switch")
    low, high = {RULE_NONE: (int(switch_to_average),) * 2, RULE_EMA: (1, MAX_AVERAGES), RULE_BELAY: (1, 2),
                 RULE_LAWA: (2, 2)}[average_rule]
    if not low <= len(average_state) <= high:
        raise RuntimeError(f"fastavg: average_state for rule {average_rule} must hold {low} to {high} tensors, got "
                           f"{len(average_state)}")
    args = dict(AVERAGE_RULE=average_rule, SWITCH=switch_to_average)
    if average_rule == RULE_LAWA:
        _check_buffer(average_state[0], param, torch.float32, "lawa_sum")
        _check_buffer(average_state[1], param, param.dtype, "lawa_ring_slot")
        return dict(args, lawa_sum_ptr=average_state[0], lawa_ring_slot_ptr=average_state[1])
    for t in average_state:
        _check_buffer(t, param, torch.float32, "average_state")
    averages = average_state[:1] if average_rule == RULE_BELAY else average_state
    args.update({f"average_{k}_ptr": t for k, t in enumerate(averages)}, NUM_AVERAGES=len(averages))
    if average_rule == RULE_BELAY and len(average_state) == 2:
        args.update(average_velocity_ptr=average_state[1], HAS_VELOCITY=True)
    if average_rule != RULE_NONE:
        _check_scalars(average_weights, param, len(averages), "average_weights")
        args.update(average_weights_ptr=average_weights)
    return args


# What an op leaves out of _step_kernel's arguments, it never uses: pointers that no branch of its
# compiled kernel dereferences (None), hyperparameters it never reads.
_UNUSED_ARGS = dict(
    {name: None for name in _step_kernel.arg_names if name.endswith("_ptr")},
    momentum=0.0, one_minus_dampening=1.0, weight_decay=0.0, log2_beta1=0.0, log2_beta2=0.0, beta2=0.0,
    one_minus_beta1=1.0,
    one_minus_beta2=1.0, eps=0.0, reaction=0.0, inertia=0.0,
    nesterov=False, maximize=False, decoupled_weight_decay=False, HAS_MOMENTUM_BUFFER=False, AMSGRAD=False,
    NUM_AVERAGES=0, HAS_VELOCITY=False,
)


def _launch(param: torch.Tensor, **args) -> None:
    """One ``_step_kernel`` launch over the flat buffer ``param``."""
    numel = param.numel()
    if numel == 0:
        return
    grid = (triton.cdiv(numel, _BLOCK),)
    wrap_triton(_step_kernel)[grid](**{**_UNUSED_ARGS, **args, "param_ptr": param, "numel": numel, "BLOCK": _BLOCK})


def _log2(beta: float) -> float:
    """log2 β in double on the host: the kernel forms 1 − βᵗ as 1 − 2^(t·log2 β), like the C++ kernels."""
    return math.log2(beta) if beta > 0 else -math.inf


def _adam_step_(param: torch.Tensor, grad: torch.Tensor, optimizer_state: list[torch.Tensor],
                average_state: list[torch.Tensor], lr: torch.Tensor, step: torch.Tensor,
                average_weights: torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                decoupled_weight_decay: bool, amsgrad: bool, maximize: bool, average_rule: int, reaction: float,
                inertia: float, switch_to_average: bool) -> None:
    _check_param(param)
    _check_buffer(grad, param, param.dtype, "grad")
    size = 3 if amsgrad else 2
    _check_optimizer_state(optimizer_state, param, size, size)
    _check_scalars(lr, param, 1, "lr")
    _check_scalars(step, param, 1, "step")
    averaging = _averaging_args(param, average_state, average_weights, average_rule, switch_to_average)
    _launch(param, OPTIMIZER=_ADAM.value, grad_ptr=grad, state_0_ptr=optimizer_state[0],
            state_1_ptr=optimizer_state[1], state_2_ptr=optimizer_state[2] if amsgrad else None, lr_ptr=lr,
            step_ptr=step, log2_beta1=_log2(beta1), log2_beta2=_log2(beta2), beta2=beta2,
            one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2,
            eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, AMSGRAD=amsgrad, maximize=maximize, reaction=reaction,
            inertia=inertia, **averaging)


def _sgd_step_(param: torch.Tensor, grad: torch.Tensor, optimizer_state: list[torch.Tensor],
               average_state: list[torch.Tensor], lr: torch.Tensor, step: torch.Tensor, average_weights: torch.Tensor,
               momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
               heavy_ball: bool, average_rule: int, reaction: float, inertia: float,
               switch_to_average: bool) -> None:
    _check_param(param)
    _check_buffer(grad, param, param.dtype, "grad")
    _check_optimizer_state(optimizer_state, param, 0, 1)
    if (momentum != 0) != (len(optimizer_state) == 1):
        raise RuntimeError("fastavg: optimizer_state must hold the momentum buffer exactly when momentum != 0")
    _check_scalars(lr, param, 1, "lr")
    _check_scalars(step, param, 1, "step")
    averaging = _averaging_args(param, average_state, average_weights, average_rule, switch_to_average)
    _launch(param, OPTIMIZER=(_SGD_HEAVY_BALL if heavy_ball else _SGD_TORCH).value, grad_ptr=grad,
            state_0_ptr=optimizer_state[0] if optimizer_state else None, HAS_MOMENTUM_BUFFER=bool(optimizer_state),
            lr_ptr=lr, step_ptr=step, momentum=momentum, one_minus_dampening=1.0 - dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, reaction=reaction, inertia=inertia, **averaging)


def _average_(param: torch.Tensor, average_state: list[torch.Tensor], average_weights: torch.Tensor,
              average_rule: int, reaction: float, inertia: float, switch_to_average: bool) -> None:
    _check_param(param)
    averaging = _averaging_args(param, average_state, average_weights, average_rule, switch_to_average)
    _launch(param, OPTIMIZER=_NO_OPTIMIZER.value, reaction=reaction, inertia=inertia, **averaging)


_OPS = {
    "adam_step_": (_adam_step_, {"param", "optimizer_state", "average_state"}),
    "sgd_step_": (_sgd_step_, {"param", "optimizer_state", "average_state"}),
    "average_": (_average_, {"param", "average_state"}),
}


@functools.cache
def _register() -> tuple[SimpleNamespace | None, str]:
    if triton_op is None:
        return None, f"torch {torch.__version__} lacks torch.library.triton_op (added in torch 2.6)"
    try:
        for name, (fn, mutates_args) in _OPS.items():
            triton_op(f"fastavg_triton::{name}", fn, mutates_args=mutates_args)
    except Exception as error:  # an incompatible torch or Triton must not break fastavg
        return None, f"registering the Triton ops failed ({type(error).__name__}: {error})"
    ops = torch.ops.fastavg_triton
    return SimpleNamespace(name="triton", adam_step_=ops.adam_step_, sgd_step_=ops.sgd_step_,
                           average_=ops.average_), ""


def backend() -> tuple[SimpleNamespace | None, str]:
    """``(the Triton backend, "")``, or ``(None, why Triton cannot run fastavg's kernels here)``."""
    if not _INTERPRETED and not torch.cuda.is_available():
        return None, f"no CUDA device is visible ({_INTERPRETER_HINT})"
    return _register()
