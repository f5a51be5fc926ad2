"""The spec: fastavg's optimizers and averagers in plain torch, one parameter at a time.

Every kernel backend is tested against this module, and this module is tested against ``torch.optim``
and ``torch.optim.swa_utils``. The element-wise rules below carry the same names in the Triton, C++
and CUDA kernels; the fused optimizers' ``backend="reference"`` runs these same functions on the flat
buffers.

One step, for every parameter θ (arithmetic in fp32, or float64 for float64 parameters):

1. ``t ← t + 1`` (the optimizer's step count, which drives every averaging schedule).
2. If θ has a gradient: its ``step`` count grows by one and the optimizer rule updates θ and its
   state (``sgd_torch_rule``, ``sgd_heavy_ball_rule`` or ``adam_rule``); θ is rounded to its dtype.
   A parameter whose ``grad`` is None keeps θ and its optimizer state, as in torch.
   Before the first step every average is seeded with θ (so weights loaded after the optimizer was
   built are what it starts from).
3. The averager's plan for ``t`` runs on every parameter, gradient or not (the average is an
   average of the model's weights): ``ema_rule`` on each average (PowerEMA's profiles and BEMA's
   buffers too, with their per-step weights), or ``belay_rule``, or ``lawa_rule``.
4. On a switch step, ``switch_rule``: θ ← e. θ is rounded to its dtype and stored.
5. The averager's ``after_step`` hook (PowerEMA's snapshots for post-hoc synthesis).
"""
from __future__ import annotations

import torch

from ._common import AdamArguments, AdamWArguments, AveragingOptimizer, SGDArguments, compute_dtype
from .averaging import BELAY, BEMA, EMA, LAWA, RULE_BELAY, RULE_EMA, RULE_LAWA, SEMA, SWA, AveragePlan, PowerEMA

__all__ = ["SGD", "Adam", "AdamW", "EMA", "BELAY", "SWA", "LAWA", "SEMA", "PowerEMA", "BEMA"]


# --- element-wise rules (in place on compute-dtype tensors) ----------------------------------------
def sgd_torch_rule(param, grad, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov,
                   maximize, first_step):
    """``torch.optim.SGD``: d = ±g + λθ; b ← d on the first step, else μb + (1−τ)d; θ ← θ − η(d + μb | b)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        if first_step:
            momentum_buffer.copy_(grad)
        else:
            momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(grad, alpha=-lr)


def sgd_heavy_ball_rule(param, grad, velocity, *, lr, momentum, weight_decay, nesterov, maximize):
    """Polyak's heavy ball, η inside the velocity: v ← μv − η(±g + λθ); θ ← θ + v (nesterov: θ + μv − η(…))."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum == 0:
        param.add_(grad, alpha=-lr)
        return
    velocity.mul_(momentum).add_(grad, alpha=-lr)
    if nesterov:
        param.add_(velocity, alpha=momentum).add_(grad, alpha=-lr)
    else:
        param.add_(velocity)


def adam_rule(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, lr, step, beta1, beta2, eps,
              weight_decay, decoupled_weight_decay, amsgrad, maximize):
    """``torch.optim.Adam`` (L2) / ``AdamW`` (decoupled), bias corrections from ``step``, in torch's order."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def ema_rule(average, param, weight):
    """e ← lerp(e, θ, w) = e + w(θ − e). EMA (w = 1 − β_u), SWA (w = 1/n) and the copy phase (w = 1)."""
    average.lerp_(param, weight)


def belay_rule(param, average, velocity, *, weight, reaction, inertia):
    """The BELAY spring: d = θ − e; v ← μv + αd, e ← e + v (μ = 0: e ← lerp(e, θ, α)); θ ← θ − ραd."""
    diff = param - average
    if velocity is None:
        average.lerp_(param, weight)
    else:
        velocity.mul_(inertia).add_(diff, alpha=weight)
        average.add_(velocity)
    param.sub_(diff, alpha=reaction * weight)


def lawa_rule(param, lawa_sum, ring_slot):
    """LAWA snapshot: S ← S + (θ − ring[j]); ring[j] ← θ."""
    lawa_sum.add_(param - ring_slot.to(param.dtype))
    ring_slot.copy_(param)


def switch_rule(param, average):
    """Switch EMA: θ ← e."""
    param.copy_(average)


def round_to(work: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """θ as the parameter dtype will hold it, in the compute dtype."""
    return work if work.dtype == dtype else work.to(dtype).to(work.dtype)


def average_state(plan: AveragePlan, buffers: dict) -> list:
    """The buffers one step's averaging touches, in the order the ops take them.

    ``buffers`` maps the state names (``average_0`` …, ``average_velocity``, ``lawa_sum``, ``lawa_ring``)
    to tensors: a parameter's state, or a flat bucket's buffers.
    """
    if plan.rule == RULE_LAWA:
        return [buffers["lawa_sum"], buffers["lawa_ring"][plan.lawa_slot]]
    if plan.rule == RULE_EMA:
        return [buffers[f"average_{k}"] for k in (plan.averages or range(len(plan.weights)))]
    if plan.rule == RULE_BELAY:
        velocity = buffers.get("average_velocity")
        return [buffers["average_0"]] + ([velocity] if velocity is not None else [])
    return [buffers["average_0"]] if plan.switch else []


def apply_average(work, rule, average_state, weights, *, reaction, inertia, switch_to_average, param_dtype):
    """Run one step's averaging on θ (``work``, compute dtype, already rounded); returns the new θ.

    ``average_state`` is what :func:`average_state` returns; ``weights`` the plan's weights.
    """
    if rule == RULE_EMA:
        for average, weight in zip(average_state, weights):
            ema_rule(average, work, weight)
    elif rule == RULE_BELAY:
        velocity = average_state[1] if len(average_state) > 1 else None
        belay_rule(work, average_state[0], velocity, weight=weights[0], reaction=reaction, inertia=inertia)
        work = round_to(work, param_dtype)
    elif rule == RULE_LAWA:
        lawa_rule(work, average_state[0], average_state[1])
    if switch_to_average:
        switch_rule(work, average_state[0])
        work = round_to(work, param_dtype)
    return work


def init_average_state(state: dict, average, p: torch.Tensor, make) -> None:
    """Add the averaging buffers of ``average`` for ``p`` to ``state``; ``make(kind)`` allocates one.

    ``kind`` is ``"average"`` (fp32, seeded from θ at the first step), ``"zeros"`` (fp32 zeros), or
    ``("ring", k)`` (k zeroed snapshots in the parameter dtype).
    """
    if average is None:
        return
    for k in range(average.num_averages):
        state[f"average_{k}"] = make("average")
    if average.uses_velocity:
        state["average_velocity"] = make("zeros")
    if average.lawa_k:
        state["lawa_sum"] = make("zeros")
        state["lawa_ring"] = make(("ring", average.lawa_k))


def average_kwargs(average) -> dict:
    return {"reaction": getattr(average, "reaction", 0.0), "inertia": getattr(average, "inertia", 0.0)}


class _ReferenceOptimizer(AveragingOptimizer):
    """``flat_params`` and ``capturable`` are accepted for the same signatures as the fused optimizers and change
    nothing here: the reference keeps its counts on the host."""

    def __init__(self, params, defaults, average, backend, flat_params):
        if backend not in (None, "auto", "reference"):
            raise ValueError(f"fastavg.reference runs only the reference backend, got backend={backend!r}")
        super().__init__(params, defaults, average)

    def _init_group_state(self, group: dict) -> None:
        for p in group["params"]:
            state = self.state[p]
            dtype = compute_dtype(p.dtype)

            def make(kind, p=p, dtype=dtype):
                if kind in ("average", "zeros"):
                    return torch.zeros_like(p, dtype=dtype)
                return torch.zeros((kind[1], *p.shape), dtype=p.dtype, device=p.device)

            state["step"] = torch.zeros((), dtype=torch.float32)
            for name in self._optimizer_state(group):
                state[name] = make("zeros")
            init_average_state(state, self.average, p, make)

    def _update(self, work, grad, state, group) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step and the averaging that goes with it (the module docstring gives the order)."""
        loss = self._begin_step(closure)
        if self._average_step == 0:
            self._seed_averages(self._params())
        plan = self._advance_average_step()
        kwargs = average_kwargs(self.average)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                dtype = compute_dtype(p.dtype)
                work = p.detach().to(dtype, copy=True)
                if p.grad is not None:
                    state["step"] += 1
                    self._update(work, p.grad.detach().to(dtype), state, group)
                    work = round_to(work, p.dtype)
                work = apply_average(work, plan.rule, average_state(plan, state), plan.weights,
                                     switch_to_average=plan.switch, param_dtype=p.dtype, **kwargs)
                p.copy_(work)
        self._finish_average_step()
        return loss


class SGD(SGDArguments, _ReferenceOptimizer):
    """SGD with ``momentum_style="torch"`` (exactly ``torch.optim.SGD``) or ``"heavy_ball"`` (Polyak)."""

    def _update(self, work, grad, state, group):
        lr = float(group["lr"])
        if group["momentum"] != 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(work)
        if group["momentum_style"] == "heavy_ball":
            sgd_heavy_ball_rule(work, grad, state.get("momentum_buffer"), lr=lr, momentum=group["momentum"],
                                weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                                maximize=group["maximize"])
        else:
            sgd_torch_rule(work, grad, state.get("momentum_buffer"), lr=lr, momentum=group["momentum"],
                           dampening=group["dampening"], weight_decay=group["weight_decay"],
                           nesterov=group["nesterov"], maximize=group["maximize"],
                           first_step=int(state["step"]) == 1)


class Adam(AdamArguments, _ReferenceOptimizer):
    """Adam with L2 weight decay, exactly ``torch.optim.Adam`` (amsgrad, maximize)."""

    def _update(self, work, grad, state, group):
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(work)
        beta1, beta2 = group["betas"]
        adam_rule(work, grad, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
                  lr=float(group["lr"]), step=float(state["step"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                  weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
                  amsgrad=group["amsgrad"], maximize=group["maximize"])


class AdamW(AdamWArguments, Adam):
    """Adam with decoupled weight decay, exactly ``torch.optim.AdamW``."""
