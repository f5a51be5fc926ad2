"""The Triton backend: the fused step as one Triton kernel over a segment table, registered as torch ops.

``torch.ops.fastavg_triton.{adam_step_, sgd_step_, average_}`` take the arguments of the C++ ops
``torch.ops.fastavg.*`` (the signatures are in :mod:`fastavg._backends`, the table in :mod:`fastavg._segments`)
and are defined with ``torch.library.triton_op``, so ``torch.compile`` traces into the kernel.

``_step_kernel`` runs one program per table row (a segment of at most ``_segments.ROW_NUMEL`` elements). A
program reads its row (param address, grad address, numel, offset), turns the addresses into pointers of the
parameter dtype (a ``tl.constexpr``) and the flat state buffers' base pointers into ``base + offset``, then
walks the row in ``BLOCK``-sized pieces through ``_blocks``: the full blocks of an aligned row unmasked, then the
rest of the row masked, each block through ``_step_block``, which mirrors ``step_kernel`` in
csrc/fastavg_cpu_kernel.inc: it reads every buffer once and writes it once (θ only when the step can change it),
running the element-wise rules below (the reference's names and order of operations) behind ``tl.constexpr``
switches.

Vector accesses: a mask against a numel read from memory makes every access scalar, hence the unmasked full
blocks; and a pointer made from an integer is only known to be 16-byte aligned through ``tl.multiple_of`` on
the pointer itself. Rows are not all aligned (a parameter may be a view with a storage offset), and a wrong
hint faults on a GPU, so each program checks at run time whether every address it will use (param, grad and
each ``base + offset``) is 16-byte aligned: if so, its full blocks take the hinted path (``_blocks(...,
ALIGNED=True)``), 16-byte vector accesses; the tail of the row, or the whole of a row that is not aligned, takes
the masked path without hints (scalar accesses, as rows of 128 elements so that loads and stores share one
layout). tests/test_triton_compile.py and .ci/triton_aot.py check the compiled code.

Only the structure of a step is a compile-time constant (the parameter dtype, which optimizer, which averaging
rule, which buffers exist, the block size); lr, step and the averaging weights are read from device memory and
every other hyperparameter is a runtime argument (the optimizer's flags as int 0/1, unspecialized), so changing
them never recompiles and a step can be captured in a CUDA graph. Parameters and gradients reach the kernel only
through the table's addresses, not as kernel arguments: ``torch.compile``, which traces into the kernel rather
than the op, sees the writes to the state and average buffers but not those to the parameters.

Floating-point contraction is off: every launch passes ``enable_fp_fusion=False`` (``_LAUNCH_OPTIONS``), so each
multiply and each add of the rules is rounded on its own (``mul.rn.f32``/``add.rn.f32`` in the PTX, which ptxas
never fuses, and ptxas runs with ``--fmad=false``), as the reference's torch ops round them and as the C++ and CUDA
kernels are built (``-ffp-contract=off``, ``--fmad=false``). Triton itself contracts a*b+c into an FMA unless told
not to (the default up to 3.9, which warns that 3.10 will not). With contraction off, a compiled kernel performs the
same fp32 operations in the same order as Triton's interpreter (which never contracts), so the interpreter tests see
the GPU's rounding; what remains is libdevice's float64 ``exp2`` for Adam's bias corrections (once per program). The
option reaches the launches fastavg makes; under ``torch.compile``, Inductor launches the kernel with options of its
own and torch 2.13 does not forward this one, so a compiled step contracts on Triton < 3.10 unless
``TRITON_DEFAULT_FP_FUSION=0`` is set. .ci/triton_aot.py compiles with the option and asserts the PTX has no FMA.

With ``TRITON_INTERPRET=1`` set before Triton is imported, the kernels run on CPU tensors in Triton's
interpreter (which dereferences the table's addresses in host memory); that is how CI without a GPU tests them.
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
# The masked blocks' rows: one element per thread of Triton's default 4 warps.
_MASKED_COLUMNS = tl.constexpr(128)

_RULE_EMA = tl.constexpr(RULE_EMA)
_RULE_BELAY = tl.constexpr(RULE_BELAY)
_RULE_LAWA = tl.constexpr(RULE_LAWA)

# The optimizer's flags choose a branch, not the kernel's structure: int 0/1 runtime arguments, unspecialized (Triton
# would otherwise compile another kernel when one is 1). Not bool: Triton 3.7's interpreter rejects bool arguments.
_FLAGS = ["nesterov", "maximize", "decoupled_weight_decay"]
# GradScaler's tensors are always passed (a stand-in when absent) with a 0/1 flag saying whether they are real, and not
# specialized on alignment either: with or without a GradScaler, a step runs the same compiled kernel.
_UNSPECIALIZED = _FLAGS + ["has_grad_scale", "has_found_inf", "grad_scale_ptr", "found_inf_ptr"]


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
    if maximize != 0:
        d = -d
    if weight_decay != 0.0:
        d = d + weight_decay * param
    if HAS_MOMENTUM_BUFFER:
        momentum_buffer = tl.where(first_step, d, momentum * momentum_buffer + one_minus_dampening * d)
        if nesterov != 0:
            d = d + momentum * momentum_buffer
        else:
            d = momentum_buffer
    return param - lr * d, momentum_buffer


@triton.jit
def sgd_heavy_ball_rule(param, grad, velocity, lr, momentum, weight_decay, nesterov, maximize,
                        HAS_VELOCITY: tl.constexpr):
    """Polyak's heavy ball, η inside the velocity: v ← μv − η(±g + λθ); θ ← θ + v (nesterov: θ + μv − η(…))."""
    d = grad
    if maximize != 0:
        d = -d
    if weight_decay != 0.0:
        d = d + weight_decay * param
    if HAS_VELOCITY:
        velocity = momentum * velocity - lr * d
        if nesterov != 0:
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
    if maximize != 0:
        g = -g
    if weight_decay != 0.0:
        if decoupled_weight_decay != 0:
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
def _ema_update(average_ptr, index, mask, theta, weight):
    average = ema_rule(tl.load(average_ptr + index, mask=mask), theta, weight)
    tl.store(average_ptr + index, average, mask=mask)
    return average


# --- the fused step ---------------------------------------------------------------------------------
@triton.jit
def _step_block(param_ptr, grad_ptr, state_0_ptr, state_1_ptr, state_2_ptr,
                average_0_ptr, average_1_ptr, average_2_ptr, average_3_ptr,
                average_4_ptr, average_5_ptr, average_6_ptr, average_7_ptr,
                average_velocity_ptr, lawa_sum_ptr, lawa_ring_slot_ptr, index, mask,
                lr, first_step, step_size, bias_correction2_sqrt, decoupled_decay, inv_grad_scale,
                weight_0, weight_1, weight_2, weight_3, weight_4, weight_5, weight_6, weight_7,
                momentum, one_minus_dampening, weight_decay, beta2, one_minus_beta1, one_minus_beta2, eps,
                reaction, inertia, nesterov, maximize, decoupled_weight_decay,
                DTYPE: tl.constexpr, OPTIMIZER: tl.constexpr, HAS_MOMENTUM_BUFFER: tl.constexpr,
                AMSGRAD: tl.constexpr, AVERAGE_RULE: tl.constexpr, NUM_AVERAGES: tl.constexpr,
                HAS_VELOCITY: tl.constexpr, SWITCH: tl.constexpr):
    """One block of a row: elements ``index`` of every row pointer (``mask``: None for a full block)."""
    theta = tl.load(param_ptr + index, mask=mask).to(tl.float32)

    if OPTIMIZER != _NO_OPTIMIZER:
        grad = tl.load(grad_ptr + index, mask=mask).to(tl.float32) * inv_grad_scale  # GradScaler: unscaled here
        if OPTIMIZER == _ADAM:
            exp_avg = tl.load(state_0_ptr + index, mask=mask)
            exp_avg_sq = tl.load(state_1_ptr + index, mask=mask)
            max_exp_avg_sq = exp_avg_sq  # any value: adam_rule ignores it without amsgrad
            if AMSGRAD:
                max_exp_avg_sq = tl.load(state_2_ptr + index, mask=mask)
            theta, exp_avg, exp_avg_sq, max_exp_avg_sq = adam_rule(
                theta, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, decoupled_decay, step_size, bias_correction2_sqrt,
                beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decoupled_weight_decay, maximize, AMSGRAD)
            tl.store(state_0_ptr + index, exp_avg, mask=mask)
            tl.store(state_1_ptr + index, exp_avg_sq, mask=mask)
            if AMSGRAD:
                tl.store(state_2_ptr + index, max_exp_avg_sq, mask=mask)
        else:
            momentum_buffer = theta  # any value: the rules ignore it without a buffer
            if HAS_MOMENTUM_BUFFER:
                momentum_buffer = tl.load(state_0_ptr + index, mask=mask)
            if OPTIMIZER == _SGD_TORCH:
                theta, momentum_buffer = sgd_torch_rule(theta, grad, momentum_buffer, lr, momentum, one_minus_dampening,
                                                        weight_decay, nesterov, maximize, first_step,
                                                        HAS_MOMENTUM_BUFFER)
            else:
                theta, momentum_buffer = sgd_heavy_ball_rule(theta, grad, momentum_buffer, lr, momentum,
                                                             weight_decay, nesterov, maximize, HAS_MOMENTUM_BUFFER)
            if HAS_MOMENTUM_BUFFER:
                tl.store(state_0_ptr + index, momentum_buffer, mask=mask)
        theta = round_to(theta, DTYPE)

    if AVERAGE_RULE == _RULE_EMA:
        average_0 = _ema_update(average_0_ptr, index, mask, theta, weight_0)
        if NUM_AVERAGES > 1:
            _ema_update(average_1_ptr, index, mask, theta, weight_1)
        if NUM_AVERAGES > 2:
            _ema_update(average_2_ptr, index, mask, theta, weight_2)
        if NUM_AVERAGES > 3:
            _ema_update(average_3_ptr, index, mask, theta, weight_3)
        if NUM_AVERAGES > 4:
            _ema_update(average_4_ptr, index, mask, theta, weight_4)
        if NUM_AVERAGES > 5:
            _ema_update(average_5_ptr, index, mask, theta, weight_5)
        if NUM_AVERAGES > 6:
            _ema_update(average_6_ptr, index, mask, theta, weight_6)
        if NUM_AVERAGES > 7:
            _ema_update(average_7_ptr, index, mask, theta, weight_7)
    elif AVERAGE_RULE == _RULE_BELAY:
        average_0 = tl.load(average_0_ptr + index, mask=mask)
        velocity = average_0  # any value: belay_rule ignores it without a velocity
        if HAS_VELOCITY:
            velocity = tl.load(average_velocity_ptr + index, mask=mask)
        theta, average_0, velocity = belay_rule(theta, average_0, velocity, weight_0, reaction, inertia, HAS_VELOCITY)
        tl.store(average_0_ptr + index, average_0, mask=mask)
        if HAS_VELOCITY:
            tl.store(average_velocity_ptr + index, velocity, mask=mask)
    elif AVERAGE_RULE == _RULE_LAWA:
        lawa_sum = tl.load(lawa_sum_ptr + index, mask=mask)
        ring_slot = tl.load(lawa_ring_slot_ptr + index, mask=mask).to(tl.float32)
        tl.store(lawa_sum_ptr + index, lawa_rule(theta, lawa_sum, ring_slot), mask=mask)
        tl.store(lawa_ring_slot_ptr + index, _to_param_dtype(theta, DTYPE), mask=mask)
    elif SWITCH:
        average_0 = tl.load(average_0_ptr + index, mask=mask)
    if SWITCH:
        theta = switch_rule(average_0)
    # θ is stored only when the step can change it (csrc/fastavg_rules.h writes_param): averaging alone with EMA,
    # SWA, LAWA or no rule leaves the parameter's memory unwritten. All constexpr: no store compiled in.
    if OPTIMIZER != _NO_OPTIMIZER or AVERAGE_RULE == _RULE_BELAY or SWITCH:
        tl.store(param_ptr + index, _to_param_dtype(theta, DTYPE), mask=mask)


@triton.jit
def _address_pointer(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The table's integer ``address`` as a pointer to ``DTYPE``, hinted 16-byte aligned on the aligned path
    (the hint only works on the pointer, after the cast)."""
    pointer = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _row_pointer(base, offset, ALIGNED: tl.constexpr):
    """``base + offset`` (None stays None: a buffer the step does not use), hinted on the aligned path."""
    pointer = base
    if base is not None:
        pointer = base + offset
        if ALIGNED:
            pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _or_address(addresses, base, offset):
    """``addresses`` ORed with the address of ``base + offset`` (unchanged for an unused buffer): the bits that
    decide whether a row is 16-byte aligned."""
    if base is not None:
        addresses = addresses | (base + offset).to(tl.int64)
    return addresses


@triton.jit
def _blocks(start, end, param_address, grad_address, offset, state_0_ptr, state_1_ptr, state_2_ptr,
            average_0_ptr, average_1_ptr, average_2_ptr, average_3_ptr,
            average_4_ptr, average_5_ptr, average_6_ptr, average_7_ptr,
            average_velocity_ptr, lawa_sum_ptr, lawa_ring_slot_ptr,
            lr, first_step, step_size, bias_correction2_sqrt, decoupled_decay, inv_grad_scale,
            weight_0, weight_1, weight_2, weight_3, weight_4, weight_5, weight_6, weight_7,
            momentum, one_minus_dampening, weight_decay, beta2, one_minus_beta1, one_minus_beta2, eps,
            reaction, inertia, nesterov, maximize, decoupled_weight_decay,
            DTYPE: tl.constexpr, OPTIMIZER: tl.constexpr, HAS_MOMENTUM_BUFFER: tl.constexpr,
            AMSGRAD: tl.constexpr, AVERAGE_RULE: tl.constexpr, NUM_AVERAGES: tl.constexpr,
            HAS_VELOCITY: tl.constexpr, SWITCH: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Elements ``start`` to ``end`` of a row, in ``BLOCK``-sized blocks. ``ALIGNED``: every pointer of the row is
    16-byte aligned (checked by the caller) and ``end - start`` a multiple of ``BLOCK``, so the blocks are unmasked
    and compile to 16-byte vector accesses; otherwise each block is masked against ``end`` (scalar accesses)."""
    param_ptr = _address_pointer(param_address, DTYPE, ALIGNED)
    grad_ptr = None
    if OPTIMIZER != _NO_OPTIMIZER:
        grad_ptr = _address_pointer(grad_address, DTYPE, ALIGNED)
    state_0_ptr = _row_pointer(state_0_ptr, offset, ALIGNED)
    state_1_ptr = _row_pointer(state_1_ptr, offset, ALIGNED)
    state_2_ptr = _row_pointer(state_2_ptr, offset, ALIGNED)
    average_0_ptr = _row_pointer(average_0_ptr, offset, ALIGNED)
    average_1_ptr = _row_pointer(average_1_ptr, offset, ALIGNED)
    average_2_ptr = _row_pointer(average_2_ptr, offset, ALIGNED)
    average_3_ptr = _row_pointer(average_3_ptr, offset, ALIGNED)
    average_4_ptr = _row_pointer(average_4_ptr, offset, ALIGNED)
    average_5_ptr = _row_pointer(average_5_ptr, offset, ALIGNED)
    average_6_ptr = _row_pointer(average_6_ptr, offset, ALIGNED)
    average_7_ptr = _row_pointer(average_7_ptr, offset, ALIGNED)
    average_velocity_ptr = _row_pointer(average_velocity_ptr, offset, ALIGNED)
    lawa_sum_ptr = _row_pointer(lawa_sum_ptr, offset, ALIGNED)
    lawa_ring_slot_ptr = _row_pointer(lawa_ring_slot_ptr, offset, ALIGNED)

    for block_start in range(start, end, BLOCK):
        if ALIGNED:
            index = block_start + tl.arange(0, BLOCK)
            mask = None
        else:
            # Masked blocks as rows of _MASKED_COLUMNS elements. In one dimension, they would load in the layout of the
            # aligned blocks (several elements per thread) but store in their own (one per thread: a store is never
            # wider than its vector), and every value would cross shared memory between the two.
            index = (block_start + tl.arange(0, BLOCK // _MASKED_COLUMNS)[:, None] * _MASKED_COLUMNS
                     + tl.arange(0, _MASKED_COLUMNS)[None, :])
            mask = index < end
        _step_block(param_ptr, grad_ptr, state_0_ptr, state_1_ptr, state_2_ptr,
                    average_0_ptr, average_1_ptr, average_2_ptr, average_3_ptr,
                    average_4_ptr, average_5_ptr, average_6_ptr, average_7_ptr,
                    average_velocity_ptr, lawa_sum_ptr, lawa_ring_slot_ptr, index, mask,
                    lr, first_step, step_size, bias_correction2_sqrt, decoupled_decay, inv_grad_scale,
                    weight_0, weight_1, weight_2, weight_3, weight_4, weight_5, weight_6, weight_7,
                    momentum, one_minus_dampening, weight_decay, beta2, one_minus_beta1, one_minus_beta2, eps,
                    reaction, inertia, nesterov, maximize, decoupled_weight_decay,
                    DTYPE, OPTIMIZER, HAS_MOMENTUM_BUFFER, AMSGRAD, AVERAGE_RULE, NUM_AVERAGES, HAS_VELOCITY, SWITCH)


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _step_kernel(segments_ptr, state_0_ptr, state_1_ptr, state_2_ptr,
                 average_0_ptr, average_1_ptr, average_2_ptr, average_3_ptr,
                 average_4_ptr, average_5_ptr, average_6_ptr, average_7_ptr,
                 average_velocity_ptr, lawa_sum_ptr, lawa_ring_slot_ptr,
                 lr_ptr, step_ptr, average_weights_ptr, grad_scale_ptr, found_inf_ptr,
                 momentum, one_minus_dampening, weight_decay, log2_beta1, log2_beta2, beta2, one_minus_beta1,
                 one_minus_beta2, eps, reaction, inertia,
                 nesterov, maximize, decoupled_weight_decay, has_grad_scale, has_found_inf,
                 DTYPE: tl.constexpr, OPTIMIZER: tl.constexpr, HAS_MOMENTUM_BUFFER: tl.constexpr,
                 AMSGRAD: tl.constexpr, AVERAGE_RULE: tl.constexpr, NUM_AVERAGES: tl.constexpr,
                 HAS_VELOCITY: tl.constexpr, SWITCH: tl.constexpr, BLOCK: tl.constexpr):
    # This program's row of the (n, 4) table: param address, grad address, numel (<= 65536), offset.
    row_ptr = segments_ptr + tl.program_id(0).to(tl.int64) * 4
    param_address = tl.load(row_ptr)
    grad_address = tl.load(row_ptr + 1)
    numel = tl.load(row_ptr + 2).to(tl.int32)
    offset = tl.load(row_ptr + 3)
    # GradScaler found an inf or NaN (read once per program): no block of the row runs, nothing changes.
    found_inf = tl.load(found_inf_ptr)
    numel = tl.where((has_found_inf != 0) & (found_inf != 0.0), 0, numel)

    # The step's scalars, once per program. On GPUs float arguments arrive as fp32; the interpreter passes
    # Python floats (float64) through, so cast those a rule reads to compute in fp32, as the C++ kernels do.
    lr = 0.0
    first_step = False
    step_size = 0.0
    bias_correction2_sqrt = 1.0
    decoupled_decay = 1.0
    inv_grad_scale = 1.0
    if OPTIMIZER == _ADAM:
        weight_decay = tl.cast(weight_decay, tl.float32)
        beta2 = tl.cast(beta2, tl.float32)
        one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
        one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
        eps = tl.cast(eps, tl.float32)
    elif OPTIMIZER != _NO_OPTIMIZER:
        momentum = tl.cast(momentum, tl.float32)
        one_minus_dampening = tl.cast(one_minus_dampening, tl.float32)
        weight_decay = tl.cast(weight_decay, tl.float32)
    if AVERAGE_RULE == _RULE_BELAY:
        reaction = tl.cast(reaction, tl.float32)
        inertia = tl.cast(inertia, tl.float32)
    if OPTIMIZER != _NO_OPTIMIZER:
        lr = tl.load(lr_ptr)
        step = tl.load(step_ptr)
        first_step = step == 1.0
        if OPTIMIZER == _ADAM:
            # Bias corrections in float64 from the step count, as in C++ (fastavg::step_scalars).
            step64 = step.to(tl.float64)
            bias_correction1 = 1.0 - tl.exp2(step64 * tl.cast(log2_beta1, tl.float64))
            bias_correction2 = 1.0 - tl.exp2(step64 * tl.cast(log2_beta2, tl.float64))
            step_size = (lr.to(tl.float64) / bias_correction1).to(tl.float32)
            bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
            decoupled_decay = (1.0 - lr.to(tl.float64) * weight_decay.to(tl.float64)).to(tl.float32)
        # GradScaler's unscaling factor, 1/scale (the wrapper computes it as GradScaler.unscale_ does; 1 without a
        # scale: exact). The gradients are multiplied by it in registers, never written back.
        inv_grad_scale = tl.where(has_grad_scale != 0, tl.load(grad_scale_ptr), 1.0)
    weight_0 = 0.0
    weight_1 = 0.0
    weight_2 = 0.0
    weight_3 = 0.0
    weight_4 = 0.0
    weight_5 = 0.0
    weight_6 = 0.0
    weight_7 = 0.0
    if AVERAGE_RULE == _RULE_EMA or AVERAGE_RULE == _RULE_BELAY:
        weight_0 = tl.load(average_weights_ptr)
    if AVERAGE_RULE == _RULE_EMA:
        if NUM_AVERAGES > 1:
            weight_1 = tl.load(average_weights_ptr + 1)
        if NUM_AVERAGES > 2:
            weight_2 = tl.load(average_weights_ptr + 2)
        if NUM_AVERAGES > 3:
            weight_3 = tl.load(average_weights_ptr + 3)
        if NUM_AVERAGES > 4:
            weight_4 = tl.load(average_weights_ptr + 4)
        if NUM_AVERAGES > 5:
            weight_5 = tl.load(average_weights_ptr + 5)
        if NUM_AVERAGES > 6:
            weight_6 = tl.load(average_weights_ptr + 6)
        if NUM_AVERAGES > 7:
            weight_7 = tl.load(average_weights_ptr + 7)

    # The bits that decide whether a row is 16-byte aligned.
    addresses = param_address | grad_address  # grad_address is 0 for average_
    addresses = _or_address(addresses, state_0_ptr, offset)
    addresses = _or_address(addresses, state_1_ptr, offset)
    addresses = _or_address(addresses, state_2_ptr, offset)
    addresses = _or_address(addresses, average_0_ptr, offset)
    addresses = _or_address(addresses, average_1_ptr, offset)
    addresses = _or_address(addresses, average_2_ptr, offset)
    addresses = _or_address(addresses, average_3_ptr, offset)
    addresses = _or_address(addresses, average_4_ptr, offset)
    addresses = _or_address(addresses, average_5_ptr, offset)
    addresses = _or_address(addresses, average_6_ptr, offset)
    addresses = _or_address(addresses, average_7_ptr, offset)
    addresses = _or_address(addresses, average_velocity_ptr, offset)
    addresses = _or_address(addresses, lawa_sum_ptr, offset)
    addresses = _or_address(addresses, lawa_ring_slot_ptr, offset)
    # Full blocks on the hinted path only where every address of the row is 16-byte aligned; the rest of the row
    # (its tail, or the whole row where an address is not aligned: a view with a storage offset, a buffer whose
    # base or offset is not aligned) in masked blocks without hints.
    full = 0
    if (addresses & 15) == 0:
        full = numel - numel % BLOCK
    _blocks(0, full, param_address, grad_address, offset, state_0_ptr, state_1_ptr, state_2_ptr,
            average_0_ptr, average_1_ptr, average_2_ptr, average_3_ptr,
            average_4_ptr, average_5_ptr, average_6_ptr, average_7_ptr,
            average_velocity_ptr, lawa_sum_ptr, lawa_ring_slot_ptr,
            lr, first_step, step_size, bias_correction2_sqrt, decoupled_decay, inv_grad_scale,
            weight_0, weight_1, weight_2, weight_3, weight_4, weight_5, weight_6, weight_7,
            momentum, one_minus_dampening, weight_decay, beta2, one_minus_beta1, one_minus_beta2, eps,
            reaction, inertia, nesterov, maximize, decoupled_weight_decay,
            DTYPE, OPTIMIZER, HAS_MOMENTUM_BUFFER, AMSGRAD, AVERAGE_RULE, NUM_AVERAGES, HAS_VELOCITY, SWITCH,
            True, BLOCK)
    _blocks(full, numel, param_address, grad_address, offset, state_0_ptr, state_1_ptr, state_2_ptr,
            average_0_ptr, average_1_ptr, average_2_ptr, average_3_ptr,
            average_4_ptr, average_5_ptr, average_6_ptr, average_7_ptr,
            average_velocity_ptr, lawa_sum_ptr, lawa_ring_slot_ptr,
            lr, first_step, step_size, bias_correction2_sqrt, decoupled_decay, inv_grad_scale,
            weight_0, weight_1, weight_2, weight_3, weight_4, weight_5, weight_6, weight_7,
            momentum, one_minus_dampening, weight_decay, beta2, one_minus_beta1, one_minus_beta2, eps,
            reaction, inertia, nesterov, maximize, decoupled_weight_decay,
            DTYPE, OPTIMIZER, HAS_MOMENTUM_BUFFER, AMSGRAD, AVERAGE_RULE, NUM_AVERAGES, HAS_VELOCITY, SWITCH,
            False, BLOCK)


# --- the ops ----------------------------------------------------------------------------------------
_INTERPRETED = not isinstance(_step_kernel, triton.runtime.jit.JITFunction)
_INTERPRETER_HINT = ("to run the Triton kernels on CPU tensors in Triton's interpreter, set TRITON_INTERPRET=1 "
                     "before fastavg first looks for its backends (the first optimizer built or "
                     "fastavg.backend_status() call): Triton picks the interpreter when it defines the kernels")
_BLOCK = 1024
# Compile options of every launch (the interpreter ignores them). No floating-point contraction: see the module
# docstring.
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _call_helpers_without_repatching() -> None:
    """Interpreter only: calls between this module's ``@triton.jit`` functions skip Triton's re-patching.

    Triton's interpreter re-patches ``triton.language`` (a walk over every member of the module, some ms) at
    each call of one ``@triton.jit`` function from another, although the launch has patched it already for this
    module's globals, which every helper shares. With a program per segment and the helpers it calls per row and
    per block, that re-patching was ~95% of the interpreter's time. The helpers become instances of a subclass
    whose call runs the rewritten function directly; the kernel's launch is untouched. A Triton whose interpreter
    looks different keeps its own behaviour.
    """
    interpreted = type(_step_kernel)
    if not hasattr(interpreted, "rewrite"):
        return

    class _Helper(interpreted):
        def __call__(self, *args, **kwargs):
            return self.rewrite()(*args, **kwargs)

    for value in list(globals().values()):
        if type(value) is interpreted and value is not _step_kernel:
            value.__class__ = _Helper


if _INTERPRETED:
    _call_helpers_without_repatching()


def _check_params(params: list[torch.Tensor], grads: list[torch.Tensor] | None, segments: torch.Tensor) -> None:
    """The tensors the table points into and the table, checked as the C++ ops check them on a GPU (the rows
    themselves stay in device memory, unread)."""
    first = params[0]
    dtype, device = first.dtype, first.device
    if dtype not in KERNEL_DTYPES:
        raise RuntimeError(f"fastavg: param must be float32, bfloat16 or float16, got {dtype}")
    if device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError(f"fastavg: params are on the CPU; {_INTERPRETER_HINT}")
    if (segments.dtype != torch.int64 or segments.dim() != 2 or segments.size(1) != 4
            or not segments.is_contiguous() or segments.device != device):
        raise RuntimeError(f"fastavg: segments must be a contiguous int64 (n, 4) tensor on {device}")
    for p in params:
        if p.dtype != dtype or p.device != device:
            raise RuntimeError(f"fastavg: params must share one dtype and device, got {p.dtype} on {p.device} "
                               f"beside {dtype} on {device}")
    if grads is not None:
        if len(grads) != len(params):
            raise RuntimeError(f"fastavg: grads must hold one tensor per param, got {len(grads)} for {len(params)}")
        for i, (g, p) in enumerate(zip(grads, params)):
            if g.dtype != dtype or g.device != device or g.numel() != p.numel():
                raise RuntimeError(f"fastavg: grads[{i}] must match params[{i}] in dtype, device and size")


def _check_buffer(t: torch.Tensor, device: torch.device, dtype: torch.dtype, name: str) -> None:
    """A flat state or average buffer: on the parameters' device, of ``dtype``, contiguous and 1-D."""
    if t.device != device:
        raise RuntimeError(f"fastavg: {name} is on {t.device}, params on {device}")
    if t.dtype != dtype:
        raise RuntimeError(f"fastavg: {name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous() or t.dim() != 1:
        raise RuntimeError(f"fastavg: {name} must be a contiguous 1-D (flat) buffer")


def _check_scalars(t: torch.Tensor, device: torch.device, count: int, name: str) -> None:
    if t.device != device or t.dtype != torch.float32 or not t.is_contiguous() or t.numel() < count:
        raise RuntimeError(f"fastavg: {name} must be a contiguous float32 tensor of at least {count} value(s) on "
                           f"{device}")


def _check_optimizer_state(state: list[torch.Tensor], device: torch.device, min_size: int, max_size: int) -> None:
    if not min_size <= len(state) <= max_size:
        raise RuntimeError(f"fastavg: optimizer_state must hold {min_size} to {max_size} tensors, got {len(state)}")
    for t in state:
        _check_buffer(t, device, torch.float32, "optimizer_state")


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
    device = param.device
    args = dict(AVERAGE_RULE=average_rule, SWITCH=switch_to_average)
    if average_rule == RULE_LAWA:
        _check_buffer(average_state[0], device, torch.float32, "lawa_sum")
        _check_buffer(average_state[1], device, param.dtype, "lawa_ring_slot")
        return dict(args, lawa_sum_ptr=average_state[0], lawa_ring_slot_ptr=average_state[1])
    for t in average_state:
        _check_buffer(t, device, torch.float32, "average_state")
    averages = average_state[:1] if average_rule == RULE_BELAY else average_state
    args.update({f"average_{k}_ptr": t for k, t in enumerate(averages)}, NUM_AVERAGES=len(averages))
    if average_rule == RULE_BELAY and len(average_state) == 2:
        args.update(average_velocity_ptr=average_state[1], HAS_VELOCITY=True)
    if average_rule != RULE_NONE:
        _check_scalars(average_weights, device, len(averages), "average_weights")
        args.update(average_weights_ptr=average_weights)
    return args


# What an op leaves out of _step_kernel's arguments, it never uses: pointers that no branch of its
# compiled kernel dereferences (None), hyperparameters it never reads.
_UNUSED_ARGS = dict(
    {name: None for name in _step_kernel.arg_names if name.endswith("_ptr")},
    momentum=0.0, one_minus_dampening=1.0, weight_decay=0.0, log2_beta1=0.0, log2_beta2=0.0, beta2=0.0,
    one_minus_beta1=1.0,
    one_minus_beta2=1.0, eps=0.0, reaction=0.0, inertia=0.0,
    nesterov=0, maximize=0, decoupled_weight_decay=0, HAS_MOMENTUM_BUFFER=False, AMSGRAD=False,
    NUM_AVERAGES=0, HAS_VELOCITY=False,
)


def _grad_scaler_args(segments: torch.Tensor, device: torch.device, grad_scale=None, found_inf=None) -> dict:
    """GradScaler's ``grad_scale`` and ``found_inf`` (optional one-value fp32 tensors on the params' device) as kernel
    arguments: each with a 0/1 flag, and where absent a stand-in pointer to valid memory (the table's first row, as
    fp32) that the kernel reads and ignores, so that the same compiled kernel serves steps with and without them."""
    args = {}
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            _check_scalars(t, device, 1, name)
            if name == "grad_scale":
                # The kernel multiplies by 1/scale, computed here as GradScaler.unscale_ computes it (float64
                # reciprocal rounded to fp32), by torch ops queued on the device: the kernel divides nothing.
                t = t.reshape(-1)[:1].double().reciprocal().float()
        args[f"{name}_ptr"] = t if t is not None else segments.view(torch.float32)
        args[f"has_{name}"] = int(t is not None)
    return args


def _launch(params: list[torch.Tensor], segments: torch.Tensor, grad_scale=None, found_inf=None, **args) -> None:
    """One ``_step_kernel`` launch: a program per row of ``segments``."""
    rows = segments.size(0)
    if rows == 0:
        return
    scaler = _grad_scaler_args(segments, params[0].device, grad_scale, found_inf)
    wrap_triton(_step_kernel)[(rows,)](**{**_UNUSED_ARGS, **args, **scaler, "segments_ptr": segments,
                                          "DTYPE": _TL_DTYPES[params[0].dtype], "BLOCK": _BLOCK}, **_LAUNCH_OPTIONS)


def _log2(beta: float) -> float:
    """log2 β in double on the host: the kernel forms 1 − βᵗ as 1 − 2^(t·log2 β), like the C++ kernels."""
    return math.log2(beta) if beta > 0 else -math.inf


def _adam_step_(params: list[torch.Tensor], grads: list[torch.Tensor], segments: torch.Tensor,
                optimizer_state: list[torch.Tensor], average_state: list[torch.Tensor], lr: torch.Tensor,
                step: torch.Tensor, average_weights: torch.Tensor, beta1: float, beta2: float, eps: float,
                weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool, average_rule: int,
                reaction: float, inertia: float, switch_to_average: bool, grad_scale: torch.Tensor | None = None,
                found_inf: torch.Tensor | None = None) -> None:
    if not params:
        return
    _check_params(params, grads, segments)
    device = params[0].device
    size = 3 if amsgrad else 2
    _check_optimizer_state(optimizer_state, device, size, size)
    _check_scalars(lr, device, 1, "lr")
    _check_scalars(step, device, 1, "step")
    averaging = _averaging_args(params[0], average_state, average_weights, average_rule, switch_to_average)
    _launch(params, segments, OPTIMIZER=_ADAM.value, state_0_ptr=optimizer_state[0],
            state_1_ptr=optimizer_state[1], state_2_ptr=optimizer_state[2] if amsgrad else None, lr_ptr=lr,
            step_ptr=step, log2_beta1=_log2(beta1), log2_beta2=_log2(beta2), beta2=beta2,
            one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2,
            eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=int(decoupled_weight_decay), AMSGRAD=amsgrad, maximize=int(maximize),
            reaction=reaction, inertia=inertia, grad_scale=grad_scale, found_inf=found_inf, **averaging)


def _sgd_step_(params: list[torch.Tensor], grads: list[torch.Tensor], segments: torch.Tensor,
               optimizer_state: list[torch.Tensor], average_state: list[torch.Tensor], lr: torch.Tensor,
               step: torch.Tensor, average_weights: torch.Tensor, momentum: float, dampening: float,
               weight_decay: float, nesterov: bool, maximize: bool, heavy_ball: bool, average_rule: int,
               reaction: float, inertia: float, switch_to_average: bool, grad_scale: torch.Tensor | None = None,
               found_inf: torch.Tensor | None = None) -> None:
    if not params:
        return
    _check_params(params, grads, segments)
    device = params[0].device
    _check_optimizer_state(optimizer_state, device, 0, 1)
    if (momentum != 0) != (len(optimizer_state) == 1):
        raise RuntimeError("fastavg: optimizer_state must hold the momentum buffer exactly when momentum != 0")
    _check_scalars(lr, device, 1, "lr")
    _check_scalars(step, device, 1, "step")
    averaging = _averaging_args(params[0], average_state, average_weights, average_rule, switch_to_average)
    _launch(params, segments, OPTIMIZER=(_SGD_HEAVY_BALL if heavy_ball else _SGD_TORCH).value,
            state_0_ptr=optimizer_state[0] if optimizer_state else None, HAS_MOMENTUM_BUFFER=bool(optimizer_state),
            lr_ptr=lr, step_ptr=step, momentum=momentum, one_minus_dampening=1.0 - dampening, weight_decay=weight_decay,
            nesterov=int(nesterov), maximize=int(maximize), reaction=reaction, inertia=inertia, grad_scale=grad_scale,
            found_inf=found_inf, **averaging)


def _average_(params: list[torch.Tensor], segments: torch.Tensor, average_state: list[torch.Tensor],
              average_weights: torch.Tensor, average_rule: int, reaction: float, inertia: float,
              switch_to_average: bool, found_inf: torch.Tensor | None = None) -> None:
    if not params:
        return
    _check_params(params, None, segments)
    averaging = _averaging_args(params[0], average_state, average_weights, average_rule, switch_to_average)
    if average_rule == RULE_NONE and not switch_to_average:
        return  # no rule, no switch: θ would only be read (it is written only when it changes), nothing to launch
    _launch(params, segments, OPTIMIZER=_NO_OPTIMIZER.value, reaction=reaction, inertia=inertia, found_inf=found_inf,
            **averaging)


_OPS = {
    "adam_step_": (_adam_step_, {"params", "optimizer_state", "average_state"}),
    "sgd_step_": (_sgd_step_, {"params", "optimizer_state", "average_state"}),
    "average_": (_average_, {"params", "average_state"}),
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
