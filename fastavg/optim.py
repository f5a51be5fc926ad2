"""The fused optimizers: one kernel launch per bucket does the optimizer step and the averaging.

``fastavg.SGD``, ``fastavg.Adam`` and ``fastavg.AdamW`` take the same arguments as their twins in
:mod:`fastavg.reference` (the spec), plus ``backend`` and ``flat_params``. Parameters and gradients stay
where they are (see :mod:`fastavg.buffers`); differences from ``torch.optim`` a user sees:

- optimizer state is fp32 for fp32, bf16 and fp16 parameters (torch keeps it in the parameter dtype);
- state entries and averages are views of flat buffers, so ``torch.save`` of one of them alone writes
  its whole buffer (``.clone()`` it first); a whole state dict is saved at its true size;
- ``flat_params=True`` moves the parameters (and gradients) into flat buffers (see the README).

``capturable=True`` (Adam, AdamW; as torch's keyword) keeps everything a step reads on the parameters' device: the
step counts (``state[p]["step"]`` are device tensors, as in torch), the averaging step, lr (a device tensor lr is read
where it is; a number is filled into a device buffer) and the averaging weights, computed there from the averaging
step by the averager's :meth:`~fastavg.averaging._Averager.device_weights`. A step then makes no host read of a device
value, so ``opt.step()`` can be captured in a CUDA graph with the rest of a training step and replayed; under
GradScaler a skipped step takes its counts back on the device. The averager must run one rule on every step
(:meth:`~fastavg.averaging._Averager.capturable_plan`): EMA (an ``every=k`` EMA or SWA updates with weight 0 on the
steps between), BELAY with ``start=0, every=1``, SWA, PowerEMA without snapshots.
"""
from __future__ import annotations

import warnings

import torch

from . import _backends, _distributed
from ._common import AdamArguments, AdamWArguments, AveragingOptimizer, SGDArguments
from .averaging import RULE_NONE, AveragePlan, _Averager, check_averager
from .buffers import Bucket, _Launch
from .reference import average_kwargs, average_state

__all__ = ["SGD", "Adam", "AdamW"]


class _FusedOptimizer(AveragingOptimizer):
    def __init__(self, params, defaults, average, backend, flat_params):
        self._backend_request = _backends.default_request(backend)
        if not isinstance(flat_params, bool):
            raise TypeError(f"flat_params must be True or False, got {flat_params!r}")
        self._flat_params = flat_params
        self._capturable = defaults.get("capturable", False)
        if self._capturable and check_averager(average) is not None:
            average.capturable_plan()
        # capturable=True: the averaging step on each bucket device (float64), the truth that graph replays advance.
        self._average_step_on: dict = {}
        self._buckets: list[list[Bucket]] = []
        super().__init__(params, defaults, average)
        # The averaging weights of the current step: float64 for float64 buckets, an fp32 copy for the others.
        count = max(self.average.num_averages if self.average else 0, 1)
        self._weights_float64 = torch.zeros(count, dtype=torch.float64)
        self._weights_cpu = torch.zeros(count)

    def _init_group_state(self, group: dict) -> None:
        """Buckets per (device, dtype, sharded): DTensor parameters (FSDP2, tensor parallelism) get buckets of
        their own, over their local shards (see :mod:`fastavg._distributed`)."""
        if group.get("capturable", False) != self._capturable:
            raise ValueError(
                f"param group capturable={group.get('capturable')!r} beside capturable={self._capturable!r}: fastavg "
                "keeps one averaging step for the whole optimizer, so every group must agree; set it in the "
                "constructor")
        by_key: dict = {}
        for p in group["params"]:
            _distributed.check_parameter(p, f"fastavg.{type(self).__name__}")
            sharded = _distributed.is_dtensor(p)
            if sharded:
                _distributed.check_averager_on_shards(self.average, f"fastavg.{type(self).__name__}")
            if sharded and self._flat_params:
                raise ValueError(
                    "flat_params=True moves parameters into fastavg's buffers, which a DTensor parameter (FSDP2's "
                    "fully_shard, tensor parallelism) cannot follow: its engine owns its storage; leave flat_params "
                    "False (the default)")
            by_key.setdefault((p.device, p.dtype, sharded), []).append(p)
        backends = {key: _backends.resolve(self._backend_request, *key[:2]) for key in by_key}
        buckets = []
        for key, params in by_key.items():
            buckets.append(Bucket(params, self._optimizer_state(group), self.average, self.state,
                                  len(self.param_groups), backends[key], self._flat_params, self._capturable))
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
        """One fused optimizer step and averaging; see :mod:`fastavg.reference` for the exact order.

        Under ``torch.amp.GradScaler`` (see ``_step_supports_amp_scaling``) the kernels unscale the gradients and,
        when GradScaler found an inf or NaN, change nothing: the step counts then end as if the step never happened.
        """
        self._settle_amp_step()
        loss = self._begin_step(closure)
        buckets = self._all_buckets()
        if self._on_gpu and torch.cuda.is_current_stream_capturing():
            self._check_capture(buckets)
        elif self._capturable:
            for bucket in buckets:
                bucket.prepare_capture()
        holds = [bucket.current(_backends.addresses_match) for bucket in buckets]
        for bucket, cache_holds in zip(buckets, holds):
            if not cache_holds:
                bucket.check()
        if self._average_step == 0 and self.average is not None:
            for bucket in buckets:
                bucket.seed_averages()
        plan = self._advance_average_step()
        if self._capturable:
            self._device_weights = self._advance_device_average_step(buckets, plan.rule != RULE_NONE)
        elif plan.rule != RULE_NONE:
            for k, weight in enumerate(plan.weights):
                self._weights_float64[k] = weight
            self._weights_cpu.copy_(self._weights_float64)
        holds = iter(holds)
        # GradScaler's tensors, set on the optimizer by GradScaler.step (grad_scale is None when the gradients were
        # unscaled already by scaler.unscale_(opt)); with them, the parameters each launch stepped.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        self._amp = _AmpStep(grad_scale, found_inf) if grad_scale is not None or found_inf is not None else None
        try:
            for group, group_buckets in zip(self.param_groups, self._buckets):
                for name in self._optimizer_state(group):
                    for bucket in group_buckets:
                        if name not in bucket.buffers:
                            bucket.add_buffer(name)
                for bucket in group_buckets:
                    for has_grad, launch in bucket.launches(next(holds)):
                        self._launch(group, bucket, plan, has_grad, launch)
        finally:
            amp, self._amp = self._amp, None
        if amp is not None and amp.found_inf is not None and self._amp_step_skipped(amp):
            return loss  # nothing changed; the counters are back where they were
        self._finish_average_step()
        return loss

    def _plan_of(self, t: int):
        return self.average.capturable_plan() if self._capturable else super()._plan_of(t)

    def _check_capture(self, buckets) -> None:
        """Raise, before anything changes, if this step cannot be captured in a CUDA graph."""
        if not self._capturable:
            raise RuntimeError(
                "opt.step() cannot be captured in a CUDA graph with capturable=False: it copies lr, step and the "
                "averaging weights from the host each step. Build the optimizer with capturable=True")
        if self._average_step == 0:
            raise RuntimeError(
                "the first opt.step() cannot be captured: it prepares the launches (and seeds the averages from the "
                "parameters, which a graph would repeat on every replay); run a few warm-up steps eagerly (on a side "
                "stream, as torch.cuda.graphs recipes do) before capturing")
        devices = {bucket.device for bucket in buckets}
        for group in self.param_groups:
            lr = group["lr"]
            if not (isinstance(lr, torch.Tensor) and lr.device in devices):
                warnings.warn(
                    f"lr={lr!r} is captured as a constant: a CUDA graph replays the value it had at capture. Pass lr as "
                    "a tensor on the parameters' device (lr=torch.tensor(0.001, device='cuda')) to change it between "
                    "replays", stacklevel=3)
        for bucket in buckets:
            if bucket.backend.name == "reference":
                raise RuntimeError(
                    f"parameters of {bucket.dtype} run on the reference backend, which reads lr and the step on the "
                    "host and cannot be captured: capture float32, bfloat16 or float16 parameters on the cuda or "
                    "triton backend")
            if not bucket._uniform_steps or len({p.grad is None for p in bucket.params}) > 1:
                raise RuntimeError(
                    f"param group {bucket.group_index}: some parameters have a gradient and others not, or their step "
                    "counts differ; a captured step needs one launch per bucket: give every parameter a gradient "
                    "(or none) in the captured step")

    def _advance_device_average_step(self, buckets, averaging: bool) -> dict:
        """capturable=True: the averaging step advanced on each bucket device (kept without an averager too: it is
        the state dict's step after graph replays), and this step's averaging weights computed there, by (device,
        dtype)."""
        weights = {}
        for device in dict.fromkeys(bucket.device for bucket in buckets):
            counter = self._average_step_on.get(device)
            if counter is None:  # from the host's count, one behind it now, at a step that runs eagerly
                counter = self._average_step_on[device] = torch.full(
                    (), float(self._average_step - 1), dtype=torch.float64, device=device)
            counter.add_(1)
            if not averaging:
                continue
            device_weights = self.average.device_weights(counter)
            for dtype in {bucket.state_dtype for bucket in buckets if bucket.device == device}:
                weights[(device, dtype)] = device_weights.to(dtype)
        return weights

    def _sync_host_average_step(self) -> None:
        """capturable=True: graph replays advance (and GradScaler skips take back) only the device's count."""
        if self._average_step_on:
            self._average_step = int(next(iter(self._average_step_on.values())))

    def _capturable_scalars(self, bucket: Bucket, lr, first: int):
        """capturable=True: lr, step and weights already on the device, no host read (see the module docstring)."""
        if isinstance(lr, torch.Tensor) and lr.device == bucket.device:
            lr = lr.reshape(1).to(bucket.state_dtype)
        else:
            lr = bucket.lr_device.fill_(float(lr))
        weights = self._device_weights.get((bucket.device, bucket.state_dtype))
        if weights is None:  # no averaging this step: the kernels read no weight
            weights = bucket.lr_device
        return lr, bucket.steps[first:first + 1], weights

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
        if self._capturable:
            lr, step, weights = self._capturable_scalars(bucket, group["lr"], launch.indices[0])
        else:
            lr, step, weights = self._scalars(bucket, float(group["lr"]) if has_grad else 0.0, launch.indices[0])
        # The extension's eager path takes the parameters alone (it reads their gradients in C++); other
        # backends, staged and flat launches take this step's (params, grads) lists.
        eager = getattr(bucket.backend, "eager", None)
        if launch.direct and eager is not None:
            ops, tensors = eager, (launch.params,)
        else:
            params, grads = launch.tensors()
            ops, tensors = bucket.backend, ((params, grads) if has_grad else (params,))
        grad_scale = found_inf = None
        amp = getattr(self, "_amp", None)
        if amp is not None:
            grad_scale, found_inf = amp.on(bucket.device)
            if has_grad:
                amp.stepped.append((bucket, launch.indices))
        if has_grad:
            state = [bucket.buffers[name] for name in self._optimizer_state(group)]
            self._fused_step(ops, group, tensors, launch.table, state, averages, lr, step, weights, plan.rule,
                             kwargs["reaction"], kwargs["inertia"], plan.switch, grad_scale=grad_scale,
                             found_inf=found_inf)
        else:
            ops.average_(*tensors, launch.table, averages, weights, plan.rule, kwargs["reaction"], kwargs["inertia"],
                         plan.switch, found_inf=found_inf)
            if not _backends.average_writes_params(plan.rule, plan.switch):
                return  # θ only read: nothing to copy back from a staged parameter
        launch.finish()

    def _fused_step(self, ops, group, tensors, segments, state, averages, lr, step, weights, rule, reaction, inertia,
                    switch, grad_scale=None, found_inf=None):
        """``ops.<optimizer>_step_(*tensors, segments, ...)``: ``tensors`` is ``(params, grads)`` or ``(params,)``."""
        raise NotImplementedError

    # --- torch.amp.GradScaler in the kernel -------------------------------------------------------------
    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether ``GradScaler.step`` hands this optimizer its scale and found_inf (``opt.grad_scale``,
        ``opt.found_inf``) and calls ``step()`` directly, as for torch's fused optimizers: the kernels then unscale
        the gradients in registers (``p.grad`` keeps the scaled values, where torch's fused kernels write the
        unscaled ones back) and on found_inf change nothing, with no host synchronisation on a GPU.

        False where the averager acts on the host right after a step (PowerEMA writing snapshots,
        ``snapshot_every``): the host would have to know at once whether the step happened, so GradScaler takes its
        usual path (unscale the gradients, skip ``step()`` on an inf)."""
        average = self.average
        if average is None or type(average).after_step is _Averager.after_step:
            return True
        return getattr(average, "snapshot_every", 1) is None

    def _amp_step_skipped(self, amp: "_AmpStep") -> bool:
        """After a step's launches under GradScaler: on the CPU, read found_inf (free) and, if the step was skipped,
        take its counts back now; on a GPU, queue a copy of found_inf to pinned host memory and an event, and settle
        at the next step, state_dict, load_state_dict, averaged_parameters or swap_average (waiting only for this
        step's kernels). Returns whether the step is known to be skipped now."""
        found_inf = amp.found_inf
        if self._capturable:
            self._undo_step_on_device(amp)
            return False
        if found_inf.device.type != "cuda":
            skipped = float(found_inf.reshape(-1)[0]) != 0.0
            if skipped:
                self._undo_step(amp.stepped)
            return skipped
        # One pinned value per optimizer: the previous step's is settled before this step launches.
        host = getattr(self, "_amp_host", None)
        if host is None or host.dtype != found_inf.dtype:
            host = self._amp_host = torch.empty((), dtype=found_inf.dtype, pin_memory=True)
        host.copy_(found_inf.reshape(()), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(found_inf.device))
        self._pending_amp = (host, event, amp.stepped)
        return False

    def _settle_amp_step(self) -> None:
        """Apply a pending GradScaler skip of the last step (GPU): its counts are taken back if it was skipped."""
        pending = getattr(self, "_pending_amp", None)
        if pending is None:
            return
        self._pending_amp = None
        host, event, stepped = pending
        event.synchronize()
        if float(host) != 0.0:
            self._undo_step(stepped)

    def _undo_step_on_device(self, amp: _AmpStep) -> None:
        """capturable=True: the step's counts less found_inf (1 if the step was skipped), on the device."""
        for bucket, indices in amp.stepped:
            found_inf = amp.on(bucket.device)[1]
            if len(indices) == len(bucket.params):
                bucket.steps.sub_(found_inf)
            else:
                index = torch.tensor(indices, dtype=torch.long).to(bucket.device)
                bucket.steps.index_add_(0, index, -found_inf.expand(len(indices)))
        for device, counter in self._average_step_on.items():
            counter.sub_(amp.on(device)[1].reshape(()))

    def _undo_step(self, stepped) -> None:
        """The step's counts back where they were: the stepped parameters' steps and the averaging step."""
        for bucket, indices in stepped:
            bucket.steps[torch.tensor(indices, dtype=torch.long)] -= 1
            bucket.refresh_steps()
        self._average_step -= 1

    def __getstate__(self) -> dict:
        self._settle_counts()
        state = super().__getstate__()
        for name in ("_pending_amp", "_amp_host", "_amp", "_device_weights"):
            state.pop(name, None)
        return state

    def _settle_counts(self) -> None:
        """The host's counts brought up to date: a pending GradScaler skip, the device's averaging step."""
        self._settle_amp_step()
        self._sync_host_average_step()

    def state_dict(self):
        self._settle_counts()
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        self._settle_counts()
        return super().load_state_dict(state_dict)

    def averaged_parameters(self, index: int = 0) -> list[torch.Tensor]:
        self._settle_counts()
        return super().averaged_parameters(index)

    def swap_average(self, *args, **kwargs):
        self._settle_counts()
        return super().swap_average(*args, **kwargs)

    def switch_to_average(self, index: int = 0) -> None:
        self._settle_counts()
        return super().switch_to_average(index)

    def _after_load(self) -> None:
        for bucket in self._all_buckets():
            bucket.refresh_steps()
            bucket._cache = None
        # Filled, not replaced: a captured graph keeps reading these tensors.
        for counter in self._average_step_on.values():
            counter.fill_(float(self._average_step))


class _AmpStep:
    """GradScaler's tensors for one step, moved to each bucket's device once, and the (bucket, indices) of the
    parameters the step counted."""

    def __init__(self, grad_scale, found_inf):
        self.grad_scale, self.found_inf = grad_scale, found_inf
        self._on: dict = {}
        self.stepped: list = []

    def on(self, device: torch.device):
        if device not in self._on:
            # Asynchronous only towards a GPU: a CPU kernel reads its copy at once.
            self._on[device] = tuple(
                None if t is None else t.to(device, torch.float32, non_blocking=device.type == "cuda").reshape(1)
                for t in (self.grad_scale, self.found_inf))
        return self._on[device]


class SGD(SGDArguments, _FusedOptimizer):
    """Fused SGD; ``momentum_style="torch"`` is exactly ``torch.optim.SGD``, ``"heavy_ball"`` Polyak's form."""

    def _fused_step(self, ops, group, tensors, segments, state, averages, lr, step, weights, rule, reaction, inertia,
                    switch, grad_scale=None, found_inf=None):
        ops.sgd_step_(*tensors, segments, state, averages, lr, step, weights, float(group["momentum"]),
                          float(group["dampening"]), float(group["weight_decay"]), bool(group["nesterov"]),
                          bool(group["maximize"]), group["momentum_style"] == "heavy_ball", rule, reaction, inertia,
                          switch, grad_scale=grad_scale, found_inf=found_inf)


class Adam(AdamArguments, _FusedOptimizer):
    """Fused Adam (L2 weight decay), exactly ``torch.optim.Adam`` including amsgrad and maximize."""

    def _fused_step(self, ops, group, tensors, segments, state, averages, lr, step, weights, rule, reaction, inertia,
                    switch, grad_scale=None, found_inf=None):
        beta1, beta2 = group["betas"]
        ops.adam_step_(*tensors, segments, state, averages, lr, step, weights, float(beta1), float(beta2),
                           float(group["eps"]), float(group["weight_decay"]), bool(group["decoupled_weight_decay"]),
                           bool(group["amsgrad"]), bool(group["maximize"]), rule, reaction, inertia, switch,
                           grad_scale=grad_scale, found_inf=found_inf)


class AdamW(AdamWArguments, Adam):
    """Fused AdamW (decoupled weight decay), exactly ``torch.optim.AdamW``."""
