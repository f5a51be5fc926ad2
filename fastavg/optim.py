"""The fused optimizers: one kernel launch per bucket does the optimizer step and the averaging.

``fastavg.SGD``, ``fastavg.Adam`` and ``fastavg.AdamW`` take the same arguments as their twins in
:mod:`fastavg.reference` (the spec), plus ``backend`` and ``flat_params``. Parameters and gradients stay
where they are (see :mod:`fastavg.buffers`); differences from ``torch.optim`` a user sees:

- optimizer state is fp32 for fp32, bf16 and fp16 parameters (torch keeps it in the parameter dtype);
- state entries and averages are views of flat buffers, so ``torch.save`` of one of them alone writes
  its whole buffer (``.clone()`` it first); a whole state dict is saved at its true size;
- ``flat_params=True`` moves the parameters (and gradients) into flat buffers (see the README).
"""
from __future__ import annotations

import torch

from . import _backends
from ._common import AdamArguments, AdamWArguments, AveragingOptimizer, SGDArguments
from .averaging import RULE_NONE, AveragePlan
from .buffers import Bucket, _Launch
from .reference import average_kwargs, average_state

__all__ = ["SGD", "Adam", "AdamW"]


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(p, DTensor)


class _FusedOptimizer(AveragingOptimizer):
    def __init__(self, params, defaults, average, backend, flat_params):
        self._backend_request = _backends.default_request(backend)
        if not isinstance(flat_params, bool):
            raise TypeError(f"flat_params must be True or False, got {flat_params!r}")
        self._flat_params = flat_params
        self._buckets: list[list[Bucket]] = []
        super().__init__(params, defaults, average)
        # The averaging weights of the current step: float64 for float64 buckets, an fp32 copy for the others.
        count = max(self.average.num_averages if self.average else 0, 1)
        self._weights_float64 = torch.zeros(count, dtype=torch.float64)
        self._weights_cpu = torch.zeros(count)

    def _init_group_state(self, group: dict) -> None:
        by_key: dict = {}
        for p in group["params"]:
            if _is_dtensor(p):
                raise NotImplementedError(
                    "fastavg's fused optimizers do not support DTensor parameters yet (FSDP2's fully_shard, tensor "
                    "parallelism); use torch.optim for sharded models for now"
                )
            by_key.setdefault((p.device, p.dtype), []).append(p)
        backends = {key: _backends.resolve(self._backend_request, *key) for key in by_key}
        buckets = []
        for key, params in by_key.items():
            buckets.append(Bucket(params, self._optimizer_state(group), self.average, self.state,
                                  len(self.param_groups), backends[key], self._flat_params))
        self._buckets.append(buckets)

    @property
    def _on_gpu(self) -> bool:
        return any(bucket.device.type == "cuda" for bucket in self._all_buckets())

    def backends(self) -> list[str]:
        """The backend running each bucket (one per param group, device and dtype), in order."""
        return [bucket.backend.name for buckets in self._buckets for bucket in buckets]

    def _all_buckets(self):
        return [bucket for buckets in self._buckets for bucket in buckets]

    # Under torch.compile the step runs eagerly: it is host-side planning around one fused op per bucket, which
    # Dynamo cannot trace through the C++ fast path; that costs one graph break, and the model's graphs stay whole.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One fused optimizer step and averaging; see :mod:`fastavg.reference` for the exact order."""
        loss = self._begin_step(closure)
        if self._on_gpu and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "opt.step() cannot be captured in a CUDA graph: it copies lr, step and the averaging weights from "
                "the host each step. Capture the ops (torch.ops.fastavg.adam_step_ etc.), which read them from "
                "device tensors, or run the step outside the graph"
            )
        buckets = self._all_buckets()
        holds = [bucket.current(_backends.addresses_match) for bucket in buckets]
        for bucket, cache_holds in zip(buckets, holds):
            if not cache_holds:
                bucket.check()
        if self._average_step == 0 and self.average is not None:
            for bucket in buckets:
                bucket.seed_averages()
        plan = self._advance_average_step()
        if plan.rule != RULE_NONE:
            for k, weight in enumerate(plan.weights):
                self._weights_float64[k] = weight
            self._weights_cpu.copy_(self._weights_float64)
        holds = iter(holds)
        for group, group_buckets in zip(self.param_groups, self._buckets):
            for name in self._optimizer_state(group):
                for bucket in group_buckets:
                    if name not in bucket.buffers:
                        bucket.add_buffer(name)
            for bucket in group_buckets:
                for has_grad, launch in bucket.launches(next(holds)):
                    self._launch(group, bucket, plan, has_grad, launch)
        self._finish_average_step()
        return loss

    def _scalars(self, bucket: Bucket, lr: float, first: int):
        """lr, step and averaging weights as tensors in the bucket's memory: fp32, or float64 (lr and weights) for
        float64 parameters, so that they reach the step unrounded as in torch.optim.

        On a GPU they travel in one small copy into a persistent buffer; the copy is queued on the
        stream like the kernels, so nothing waits and a later launch cannot overtake it.
        """
        weights = self._weights_float64 if bucket.state_dtype == torch.float64 else self._weights_cpu
        if bucket.device.type == "cpu":
            bucket.lr_cpu.fill_(lr)
            return bucket.lr_cpu, bucket.steps[first:first + 1], weights
        host = torch.tensor([lr, float(bucket.steps[first]), *weights.tolist()], dtype=bucket.state_dtype)
        if bucket.scalars is None:
            bucket.scalars = torch.empty_like(host, device=bucket.device)
        bucket.scalars.copy_(host, non_blocking=True)
        return bucket.scalars[0:1], bucket.scalars[1:2], bucket.scalars[2:]

    def _launch(self, group, bucket: Bucket, plan: AveragePlan, has_grad: bool, launch: _Launch) -> None:
        averaging = plan.rule != RULE_NONE or plan.switch
        if not has_grad and not averaging:
            return
        averages = average_state(plan, bucket.buffers)
        kwargs = average_kwargs(self.average)
        lr, step, weights = self._scalars(bucket, float(group["lr"]) if has_grad else 0.0, launch.indices[0])
        # The extension's eager path takes the parameters alone (it reads their gradients in C++); other
        # backends, staged and flat launches take this step's (params, grads) lists.
        eager = getattr(bucket.backend, "eager", None)
        if launch.direct and eager is not None:
            ops, tensors = eager, (launch.params,)
        else:
            params, grads = launch.tensors()
            ops, tensors = bucket.backend, ((params, grads) if has_grad else (params,))
        if has_grad:
            state = [bucket.buffers[name] for name in self._optimizer_state(group)]
            self._fused_step(ops, group, tensors, launch.table, state, averages, lr, step, weights, plan.rule,
                             kwargs["reaction"], kwargs["inertia"], plan.switch)
        else:
            ops.average_(*tensors, launch.table, averages, weights, plan.rule, kwargs["reaction"], kwargs["inertia"],
                         plan.switch)
        launch.finish()

    def _fused_step(self, ops, group, tensors, segments, state, averages, lr, step, weights, rule, reaction, inertia,
                    switch):
        """``ops.<optimizer>_step_(*tensors, segments, ...)``: ``tensors`` is ``(params, grads)`` or ``(params,)``."""
        raise NotImplementedError

    def _after_load(self) -> None:
        for bucket in self._all_buckets():
            bucket.refresh_steps()
            bucket._cache = None


class SGD(SGDArguments, _FusedOptimizer):
    """Fused SGD; ``momentum_style="torch"`` is exactly ``torch.optim.SGD``, ``"heavy_ball"`` Polyak's form."""

    def _fused_step(self, ops, group, tensors, segments, state, averages, lr, step, weights, rule, reaction, inertia,
                    switch):
        ops.sgd_step_(*tensors, segments, state, averages, lr, step, weights, float(group["momentum"]),
                          float(group["dampening"]), float(group["weight_decay"]), bool(group["nesterov"]),
                          bool(group["maximize"]), group["momentum_style"] == "heavy_ball", rule, reaction, inertia,
                          switch)


class Adam(AdamArguments, _FusedOptimizer):
    """Fused Adam (L2 weight decay), exactly ``torch.optim.Adam`` including amsgrad and maximize."""

    def _fused_step(self, ops, group, tensors, segments, state, averages, lr, step, weights, rule, reaction, inertia,
                    switch):
        beta1, beta2 = group["betas"]
        ops.adam_step_(*tensors, segments, state, averages, lr, step, weights, float(beta1), float(beta2),
                           float(group["eps"]), float(group["weight_decay"]), bool(group["decoupled_weight_decay"]),
                           bool(group["amsgrad"]), bool(group["maximize"]), rule, reaction, inertia, switch)


class AdamW(AdamWArguments, Adam):
    """Fused AdamW (decoupled weight decay), exactly ``torch.optim.AdamW``."""
