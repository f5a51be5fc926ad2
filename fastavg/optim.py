"""The fused optimizers: one kernel launch per flat buffer does the optimizer step and the averaging.

``fastavg.SGD``, ``fastavg.Adam`` and ``fastavg.AdamW`` take the same arguments as their twins in
:mod:`fastavg.reference` (the spec), plus ``backend``. Differences from ``torch.optim`` a user sees:

- parameters are moved into flat buffers when the optimizer is built (``p.data`` becomes a view);
- ``zero_grad()`` defaults to ``set_to_none=False``: it zeroes the gradient buffer in one call and keeps
  ``p.grad`` a view of it, so that backward accumulates straight into the flat buffer;
- optimizer state is fp32 for fp32, bf16 and fp16 parameters (torch keeps it in the parameter dtype).
"""
from __future__ import annotations

import torch

from . import _backends
from ._common import AdamArguments, AdamWArguments, AveragingOptimizer, SGDArguments
from .averaging import LAWA, RULE_NONE, AveragePlan
from .buffers import Bucket
from .reference import average_kwargs, average_state

__all__ = ["SGD", "Adam", "AdamW"]


class _FusedOptimizer(AveragingOptimizer):
    def __init__(self, params, defaults, average, backend):
        self._backend_request = _backends.default_request(backend)
        self._buckets: list[list[Bucket]] = []
        super().__init__(params, defaults, average)
        self._weights_cpu = torch.zeros(max(self.average.num_averages if self.average else 0, 1))

    def _init_group_state(self, group: dict) -> None:
        by_key: dict = {}
        for p in group["params"]:
            by_key.setdefault((p.device, p.dtype), []).append(p)
        backends = {key: _backends.resolve(self._backend_request, *key) for key in by_key}
        buckets = []
        for key, params in by_key.items():
            buckets.append(Bucket(params, self._optimizer_state(group), self.average, self.state,
                                  len(self.param_groups), backends[key]))
        self._buckets.append(buckets)

    @property
    def _on_gpu(self) -> bool:
        return any(bucket.device.type == "cuda" for bucket in self._all_buckets())

    def backends(self) -> list[str]:
        """The backend running each bucket (one per param group, device and dtype), in order."""
        return [bucket.backend.name for buckets in self._buckets for bucket in buckets]

    def _all_buckets(self):
        return [bucket for buckets in self._buckets for bucket in buckets]

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
        inspected = [bucket.inspect() for bucket in self._all_buckets()]
        plan = self._advance_average_step()
        if plan.rule != RULE_NONE:
            for k, weight in enumerate(plan.weights):
                self._weights_cpu[k] = weight
        inspected = iter(inspected)
        for group, buckets in zip(self.param_groups, self._buckets):
            for name in self._optimizer_state(group):
                for bucket in buckets:
                    if name not in bucket.buffers:
                        bucket.add_buffer(name, self.state)
            for bucket in buckets:
                has_grad, fixups = next(inspected)
                bucket.gather(fixups)
                for run in bucket.runs_and_advance(has_grad):
                    self._launch(group, bucket, plan, *run)
        return loss

    def _scalars(self, bucket: Bucket, lr: float, first: int):
        """lr, step and averaging weights as fp32 tensors in the bucket's memory.

        On a GPU they travel in one small copy into a persistent buffer; the copy is queued on the
        stream like the kernels, so nothing waits and a later launch cannot overtake it.
        """
        if bucket.device.type == "cpu":
            bucket.lr_cpu.fill_(lr)
            return bucket.lr_cpu, bucket.steps[first:first + 1], self._weights_cpu
        host = torch.tensor([lr, float(bucket.steps[first]), *self._weights_cpu.tolist()], dtype=torch.float32)
        if bucket.scalars is None:
            bucket.scalars = torch.empty_like(host, device=bucket.device)
        bucket.scalars.copy_(host, non_blocking=True)
        return bucket.scalars[0:1], bucket.scalars[1:2], bucket.scalars[2:]

    def _launch(self, group, bucket: Bucket, plan: AveragePlan, begin: int, end: int, has_grad: bool, first: int):
        whole = begin == 0 and end == bucket.numel

        def part(t):
            return t if whole else t[begin:end]

        averages = [part(t) for t in average_state(plan, bucket.buffers)]
        kwargs = average_kwargs(self.average)
        if has_grad:
            lr, step, weights = self._scalars(bucket, float(group["lr"]), first)
            state = [part(bucket.buffers[name]) for name in self._optimizer_state(group)]
            self._fused_step(bucket.backend, group, part(bucket.data), part(bucket.grad), state, averages, lr, step,
                             weights, plan.rule, kwargs["reaction"], kwargs["inertia"], plan.switch)
        elif plan.rule != RULE_NONE or plan.switch:
            _, _, weights = self._scalars(bucket, 0.0, first)
            bucket.backend.average_(part(bucket.data), averages, weights, plan.rule, kwargs["reaction"],
                                    kwargs["inertia"], plan.switch)

    def _fused_step(self, backend, group, data, grad, state, averages, lr, step, weights, rule, reaction, inertia,
                    switch):
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every gradient buffer in one call per bucket, keeping ``p.grad`` views of it.

        ``set_to_none=True`` sets the gradients to None as torch does; the next step then copies the
        gradients that backward allocates into the flat buffers.
        """
        for bucket in self._all_buckets():
            bucket.zero_grad(set_to_none)

    # Whole-bucket versions of the averaging API: one copy per bucket instead of one per parameter.
    def _save_weights(self):
        buckets = self._all_buckets()
        for bucket in buckets:
            bucket.gather(bucket.inspect()[1])
        return [bucket.data.clone() for bucket in buckets]

    def _restore_weights(self, raw) -> None:
        for bucket, saved in zip(self._all_buckets(), raw):
            bucket.data.copy_(saved)

    def _load_average(self, index: int) -> None:
        for bucket in self._all_buckets():
            bucket.gather(bucket.inspect()[1])
            if isinstance(self.average, LAWA):
                count = min(self.average.snapshot_count(self._average_step), self.average.k)
                if count:
                    bucket.data.copy_(bucket.buffers["lawa_sum"] / count)
            else:
                bucket.data.copy_(bucket.buffers[f"average_{index}"])

    def _after_load(self) -> None:
        for bucket in self._all_buckets():
            bucket.refresh_steps()


class SGD(SGDArguments, _FusedOptimizer):
    """Fused SGD; ``momentum_style="torch"`` is exactly ``torch.optim.SGD``, ``"heavy_ball"`` Polyak's form."""

    def _fused_step(self, backend, group, data, grad, state, averages, lr, step, weights, rule, reaction, inertia,
                    switch):
        backend.sgd_step_(data, grad, state, averages, lr, step, weights, float(group["momentum"]),
                          float(group["dampening"]), float(group["weight_decay"]), bool(group["nesterov"]),
                          bool(group["maximize"]), group["momentum_style"] == "heavy_ball", rule, reaction, inertia,
                          switch)


class Adam(AdamArguments, _FusedOptimizer):
    """Fused Adam (L2 weight decay), exactly ``torch.optim.Adam`` including amsgrad and maximize."""

    def _fused_step(self, backend, group, data, grad, state, averages, lr, step, weights, rule, reaction, inertia,
                    switch):
        beta1, beta2 = group["betas"]
        backend.adam_step_(data, grad, state, averages, lr, step, weights, float(beta1), float(beta2),
                           float(group["eps"]), float(group["weight_decay"]), self._decoupled_weight_decay,
                           bool(group["amsgrad"]), bool(group["maximize"]), rule, reaction, inertia, switch)


class AdamW(AdamWArguments, Adam):
    """Fused AdamW (decoupled weight decay), exactly ``torch.optim.AdamW``."""
