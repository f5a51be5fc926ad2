"""``fastavg.AveragedModel``: a drop-in for ``torch.optim.swa_utils.AveragedModel`` on fastavg's kernels.

It averages a model trained by any optimizer. The averages live in the flat fp32 buffers of
:class:`fastavg.buffers.Bucket` (float64 for float64 tensors), one bucket per (device, dtype), and an
update is one ``average_`` launch per bucket over a segment table that points at the training model's
tensors where they are. ``.module`` (a copy of the model, as in torch) holds the average in the model's
dtype; it is refreshed from the fp32 buffers only when it is used, so that an update moves only the
bytes of the average itself.

How the averages start. ``multi_avg_fn=get_ema_multi_avg_fn(β)`` (and ``get_ema_avg_fn``) run as
``EMA(β, start=1)`` and the default (no function) as ``SWA()``: the first update copies the model, as in
torch. An explicit ``average=`` starts from ``.module`` as it is at that first update (the model at
construction unless something was loaded into ``.module``), so that ``EMA(β)`` is timm's ``ModelEmaV3``
updated without a step.

A model with DTensor parameters (FSDP2's ``fully_shard``, HSDP, tensor parallelism) cannot be deep-copied, and each
rank holds only its shards: the averages are then shard-local, as in the fused optimizers. There is no ``.module``;
the buckets' segments are the local shards, an update averages each rank's shards (no collective), and evaluation
swaps the averages into the training model's shards (:meth:`AveragedModel.swap_average`).
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections import defaultdict

import torch
from torch.optim.swa_utils import AveragedModel as _TorchAveragedModel

from . import _backends, _distributed, _segments
from ._distributed import check_averager_on_shards, check_parameter, is_dtensor, local
from .averaging import BELAY, BEMA, EMA, LAWA, RULE_NONE, SEMA, SWA, PowerEMA, check_averager
from .buffers import Bucket
from .reference import average_kwargs, average_state

__all__ = ["AveragedModel"]

_TORCH_FUNCTIONS = "torch.optim.swa_utils"
_NO_MODULE = (
    "fastavg.AveragedModel of a model with DTensor parameters (FSDP2's fully_shard, tensor parallelism) has no "
    ".module: FSDP2 modules cannot be deep-copied, and each rank holds only its shards of the averages. Evaluate "
    "inside `with ema.swap_average(model):` (or call ema(...), which runs the model with the averages swapped in); "
    "ema.averaged_parameters() are the averages as DTensors")


def _recognise(avg_fn, multi_avg_fn):
    """The fastavg averager that does what torch's own averaging function does, or None for any other callable."""
    fn = inspect.unwrap(multi_avg_fn if multi_avg_fn is not None else avg_fn)
    if getattr(fn, "__module__", None) != _TORCH_FUNCTIONS:
        return None
    name = getattr(fn, "__qualname__", "")
    if name in ("get_swa_multi_avg_fn.<locals>.swa_update", "get_swa_avg_fn.<locals>.swa_update"):
        return SWA()
    if name in ("get_ema_multi_avg_fn.<locals>.ema_update", "get_ema_avg_fn.<locals>.ema_update"):
        decay = inspect.getclosurevars(fn).nonlocals.get("decay")
        # torch accepts decay = 1 (the average never moves after the first copy); EMA needs β < 1.
        if isinstance(decay, (int, float)) and 0.0 <= decay < 1.0:
            return EMA(decay, start=1)
    return None


def _writes_back(average) -> bool:
    return isinstance(average, SEMA) or (isinstance(average, BELAY) and average.reaction > 0)


class _Group:
    """One bucket of averages and what feeds it: the entries (indices into the module's averaged tensors)
    and, per update, the training model's tensors at those entries.

    When the averages live on another device than the model (``device="cpu"`` for a GPU model), θ is
    first copied into ``staging`` (a flat buffer in the bucket's layout, pinned host memory for a GPU
    model) on a side stream, and averaged at the next update or read, so that the copy overlaps the step.
    """

    def __init__(self, entries, bucket: Bucket, source_device: torch.device):
        self.entries = entries
        self.bucket = bucket
        self.source_device = source_device
        self.addresses = None
        self.launch = None
        self.staging = self.stream = self.event = None
        self.pending = None  # the plan of a staged θ not averaged yet
        if source_device != bucket.device:
            pin = bucket.device.type == "cpu" and source_device.type == "cuda"
            self.staging = torch.zeros(bucket.numel, dtype=bucket.dtype, device=bucket.device, pin_memory=pin)
            self.table = _segments.table(_segments.rows(self.staging, None, 0), bucket.device)
            if pin:
                self.stream = torch.cuda.Stream(source_device)
                self.event = torch.cuda.Event()
        self.weights = torch.zeros(max(len(bucket.average_names), 1), dtype=torch.float32, device=bucket.device)


class AveragedModel(_TorchAveragedModel):
    """``torch.optim.swa_utils.AveragedModel`` with fused fp32 averages; any optimizer trains the model.

    Same constructor and behaviour as torch's (``update_parameters``, ``.module``, ``forward``,
    ``n_averaged``, ``state_dict``, ``update_bn``, ``SWALR``), plus:

    - ``average=``: any fastavg averager (EMA with decay tuples and warmups, SWA, LAWA, SEMA, BELAY, PowerEMA
      with its snapshots, BEMA).
      SEMA's switch and BELAY's reaction write into the model passed to ``update_parameters``.
    - ``averaged_parameters(index=0)``: the fp32 averages of the parameters; ``.module`` holds average
      ``0`` in the model's dtype.
    - ``swap_average(model=None, index=0)``: a context manager in which the training model holds the average.
    - ``attach(optimizer)``: update after every ``optimizer.step()``.
    - ``backend``: as for the fused optimizers.

    No ``average`` and no function is SWA, as in torch; ``get_ema_multi_avg_fn(β)``/``get_ema_avg_fn(β)``
    are ``EMA(β, start=1)`` and ``get_swa_*`` are ``SWA()``, all fused. Any other callable runs torch's
    own code, unfused, in the model's dtype (a warning says so once).

    ``device`` keeps the averages (and ``.module``) on that device; ``device="cpu"`` for a GPU model
    keeps them in pinned host memory and copies θ there on a side stream that overlaps the next step.
    To bound that traffic, update every ``k`` steps with the decay adjusted:
    ``average=fastavg.EMA(β**k, every=k)`` (or call ``update_parameters`` every ``k`` steps).

    ``use_buffers=True`` averages the floating buffers (BatchNorm running statistics) in the same launch
    and copies the others (``num_batches_tracked``) from the model; torch runs its averaging function on
    those integer counters too, which truncates them to meaningless values.

    A model with DTensor parameters (FSDP2's ``fully_shard``, HSDP, tensor parallelism; build this after
    ``fully_shard``) keeps shard-local averages, as the fused optimizers do: each rank averages its shards, with
    no collective, and ``averaged_parameters()`` are DTensors laid out like the parameters. There is no
    ``.module`` (accessing it raises, naming the alternatives): ``ema(...)`` runs the training model, in the
    AveragedModel's train/eval mode and without autograd, with the averages swapped in for that call; to
    evaluate many batches, swap once: ``with ema.swap_average(model): ...``. ``state_dict()`` holds the averages
    as DTensors (``fastavg_state``) for ``torch.distributed.checkpoint``. Refused, before anything is built:
    ``use_buffers=True`` (FSDP2 does not shard buffers: each rank's are its own, and a checkpoint keeps
    rank 0's), ``device=`` another device than the shards', an averaging function other than torch's EMA/SWA
    ones (they run on ``.module``), PowerEMA's snapshots.
    """

    def __init__(self, model: torch.nn.Module, device=None, avg_fn=None, multi_avg_fn=None, use_buffers=False, *,
                 average=None, backend=None):
        if avg_fn is not None and multi_avg_fn is not None:
            raise ValueError("pass avg_fn or multi_avg_fn, not both")
        if average is not None and (avg_fn is not None or multi_avg_fn is not None):
            raise ValueError("pass average= (a fastavg averager) or avg_fn/multi_avg_fn (a function), not both")
        if not isinstance(use_buffers, bool):
            raise TypeError(f"use_buffers must be True or False, got {use_buffers!r}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        average = check_averager(average)
        if average is not None and not isinstance(average, (EMA, SWA, LAWA, PowerEMA, BEMA)):
            # EMA covers BELAY and SEMA; averagers added later are checked against this class before use here.
            raise NotImplementedError(
                f"fastavg.AveragedModel does not support average={type(average).__name__} yet; use it with fastavg's "
                "optimizers, or pass EMA, BELAY, SWA, LAWA, SEMA, PowerEMA or BEMA")
        request = _backends.default_request(backend)
        if average is None:
            functions = avg_fn is not None or multi_avg_fn is not None
            fused = _recognise(avg_fn, multi_avg_fn) if functions else SWA()
        else:
            fused = average
        # After a forward with reshard_after_forward=False, FSDP2 modules hold unsharded parameters: resharding
        # changes no value and shows the sharded parameters, which are what is averaged.
        _reshard(model)
        sharded = any(is_dtensor(p) for p in model.parameters())
        tensors = list(model.parameters()) + (list(model.buffers()) if use_buffers else [])
        if fused is not None or sharded:
            _check_model_tensors(tensors, fused, device)
        if sharded:
            _check_sharded(tensors, fused, device, use_buffers)
            torch.nn.Module.__init__(self)
            self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
            self.avg_fn, self.multi_avg_fn, self.use_buffers = avg_fn, multi_avg_fn, use_buffers
        else:
            super().__init__(model, device, avg_fn, multi_avg_fn, use_buffers)
        self._sharded = sharded
        self.average = fused
        self._source = weakref.ref(model)
        self._backend_request = request
        self._groups: list[_Group] = []
        self._dirty = False
        self._inside_swap = False
        self._versions = []
        self._t = 0
        if fused is None:
            warnings.warn(
                "fastavg.AveragedModel runs this averaging function unfused, as torch does, in the model's dtype; "
                "pass average=fastavg.EMA(...) (or torch's get_ema_multi_avg_fn) for the fused fp32 path",
                stacklevel=2)
            return
        if sharded:
            self._build_shards(model)
        else:
            self._build()
        self.register_load_state_dict_post_hook(_after_load)

    # --- layout -----------------------------------------------------------------------------------
    def _build(self) -> None:
        """Buckets for the module's averaged tensors, seeded from them."""
        module = self._modules["module"]
        params, buffers = list(module.parameters()), list(module.buffers())
        self._all = params + (buffers if self.use_buffers else [])
        self._averaged_index = [i for i, t in enumerate(self._all) if t.is_floating_point()]
        self._copied_index = [i for i, t in enumerate(self._all) if not t.is_floating_point()]
        self._num_params = len(params)
        self._buffers_copied = [] if self.use_buffers else buffers
        self._make_groups([t.device for t in self._source_tensors()])
        self._record_versions()

    def _build_shards(self, model: torch.nn.Module) -> None:
        """Buckets over the local shards of the training model's parameters, seeded from them. Nothing is copied
        into the model at an update: its other tensors are its own, current ones."""
        named = list(model.named_parameters())
        self._names = [name for name, _ in named]
        self._all = [p for _, p in named]
        self._averaged_index = [i for i, p in enumerate(self._all) if p.is_floating_point()]
        self._copied_index = []
        self._num_params = len(self._all)
        self._buffers_copied = []
        self._make_groups([local(p).device for p in self._all])

    def _make_groups(self, source_devices) -> None:
        by_key: dict = {}
        for i in self._averaged_index:
            t = self._all[i]
            # A sharded bucket holds DTensors only: plain parameters of a partly sharded model get their own.
            by_key.setdefault((local(t).device, t.dtype, source_devices[i], is_dtensor(t)), []).append(i)
        self._groups = []
        for (device, dtype, source_device, _), entries in by_key.items():
            backend = _backends.resolve(self._backend_request, device, dtype)
            bucket = Bucket([self._all[i] for i in entries], (), self.average, defaultdict(dict), 0, backend)
            bucket.seed_averages()
            self._groups.append(_Group(entries, bucket, source_device))
        self._where = {i: (group, k) for group in self._groups for k, i in enumerate(group.entries)}

    def _source_tensors(self):
        """The constructing model's tensors in the module's order (only their devices are used here)."""
        model = self._source()
        if model is None:
            return self._all
        return list(model.parameters()) + (list(model.buffers()) if self.use_buffers else [])

    # --- keeping .module current ---------------------------------------------------------------------
    def _record_versions(self) -> None:
        self._versions = [self._all[i]._version for i in self._averaged_index]

    def _flush(self) -> None:
        """Average a staged θ whose copy to the averages' device was still in flight."""
        for group in self.__dict__.get("_groups", ()):
            if group.pending is not None:
                if group.event is not None:
                    group.event.synchronize()
                plan, group.pending = group.pending, None
                self._average(group.bucket.backend, group, plan, [group.staging], group.table)

    @torch.no_grad()
    def _refresh(self) -> None:
        """``.module`` ← average 0, in the module's dtype, if an update happened since the last refresh."""
        if not self.__dict__.get("_dirty", False):
            return
        self._flush()
        averages = self._flat_averages(0)
        for group, flat in zip(self._groups, averages):
            if flat is not None:
                torch._foreach_copy_([self._all[i] for i in group.entries],
                                     [group.bucket.view(flat, k) for k in range(len(group.entries))])
        self._dirty = False
        self._record_versions()

    def _pull_module_writes(self) -> None:
        """Tensors of ``.module`` written since the last refresh (a load, ``update_bn``) become the average."""
        for position, i in enumerate(self._averaged_index):
            if self._all[i]._version != self._versions[position]:
                group, k = self._where[i]
                for name in group.bucket.average_names:
                    group.bucket.view(group.bucket.buffers[name], k).copy_(self._all[i])

    def _flat_averages(self, index: int):
        """Per group, the flat fp32 average ``index`` (computed for LAWA and BEMA; None while LAWA has no
        snapshot)."""
        if isinstance(self.average, BEMA):
            return [self.average.bema_weights(group.bucket.buffers, self._t) for group in self._groups]
        if isinstance(self.average, LAWA):
            count = min(self.average.snapshot_count(self._t), self.average.k)
            return [group.bucket.buffers["lawa_sum"] / count if count else None for group in self._groups]
        return [group.bucket.buffers[f"average_{index}"] for group in self._groups]

    def __getattr__(self, name: str):
        if name == "module":
            if self.__dict__.get("_sharded"):
                raise AttributeError(_NO_MODULE)
            self._refresh()
        return super().__getattr__(name)

    def named_children(self):
        self._refresh()
        return super().named_children()

    def named_modules(self, *args, **kwargs):
        self._refresh()
        return super().named_modules(*args, **kwargs)

    def _named_members(self, *args, **kwargs):
        self._refresh()
        return super()._named_members(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """``.module(...)``; for a model with DTensor parameters, the training model with the averages swapped in
        for this call, in this AveragedModel's train/eval mode and without autograd (gradients would reach the
        training model's parameters). Every rank calls it, as every rank runs an FSDP2 forward."""
        if not self._sharded:
            return super().forward(*args, **kwargs)
        model = self._model_argument(None, "evaluate a model inside `with ema.swap_average(model):`")
        modes = [(module, module.training) for module in model.modules()]
        with self.swap_average(model), torch.no_grad():
            model.train(self.training)
            try:
                return model(*args, **kwargs)
            finally:
                for module, training in modes:
                    module.training = training

    # --- updating -------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        """Average ``model``'s current weights in: one fused launch per bucket (torch's code when unfused)."""
        self._refuse_inside_swap("update_parameters()")
        if self.average is None:
            return super().update_parameters(model)
        if self._sharded:
            # BELAY and SEMA write into the shards: unsharded parameters left by a forward would be stale.
            _reshard(model)
        sources, copied_buffers = self._sources_of(model)
        self._check_sources(sources, copied_buffers, "update_parameters")
        self._flush()
        if not self._dirty and not self._sharded:
            self._pull_module_writes()
        self._t += 1
        plan = self.average.plan(self._t)
        if plan.rule != RULE_NONE or plan.switch:
            for group in self._groups:
                self._launch(group, [sources[i] for i in group.entries], plan)
        copies = [(self._all[i], sources[i]) for i in self._copied_index]
        copies += list(zip(self._buffers_copied, copied_buffers))
        for target, value in copies:
            target.copy_(value)
        self.n_averaged += 1
        if isinstance(self.average, LAWA) and self.average.snapshot_count(self._t) == 0 and not self._sharded:
            # Before its first snapshot LAWA's average is θ itself, as it is now.
            for i in self._averaged_index:
                self._all[i].copy_(sources[i])
            self._dirty = False
            self._record_versions()
        else:
            self._dirty = not self._sharded  # a sharded model has no .module to refresh
        self.average.after_step(self._t, self.averaged_parameters)

    def _sources_of(self, model: torch.nn.Module):
        """``model``'s tensors in the order of the averaged ones, and its buffers copied at an update."""
        params, buffers = list(model.parameters()), list(model.buffers())
        sources = params + (buffers if self.use_buffers else [])
        return sources, ([] if self.use_buffers or self._sharded else buffers)

    def _check_sources(self, sources, copied_buffers, what: str) -> None:
        """Raise, changing nothing, if ``model`` is not shaped (and sharded) like the averaged one."""
        if len(sources) != len(self._all) or len(copied_buffers) != len(self._buffers_copied):
            raise ValueError(
                f"{what} got a model with {len(sources)} parameters{' and buffers' * self.use_buffers}, "
                f"the averaged model has {len(self._all)}; pass the model this AveragedModel was built from")
        for group in self._groups:
            if [local(sources[i]).data_ptr() for i in group.entries] == group.addresses:
                continue
            for i in group.entries:
                theirs, ours = sources[i], self._all[i]
                if (theirs.shape != ours.shape or theirs.dtype != ours.dtype or _sharding(theirs) != _sharding(ours)
                        or local(theirs).shape != local(ours).shape or local(theirs).device != group.source_device):
                    raise ValueError(
                        f"tensor {i} of the model passed to {what} is {_describe(theirs)}; it was {_describe(ours)} "
                        "when this AveragedModel was built: pass the model it was built from, and build it after "
                        "moving, casting or sharding the model")
            # Checked: the launch is rebuilt for these tensors at this update.
            group.addresses = None

    def _launch(self, group: _Group, sources, plan) -> None:
        if group.addresses is None:
            group.addresses = [local(t).data_ptr() for t in sources]
            if group.staging is None:
                group.bucket.params = sources
                group.launch = group.bucket._launch_for(list(range(len(sources))), with_grads=False)
        if group.staging is None:
            launch = group.launch
            eager = getattr(group.bucket.backend, "eager", None)
            if launch.direct and eager is not None:
                self._average(eager, group, plan, launch.params, launch.table)
            else:
                params, _ = launch.tensors()
                self._average(group.bucket.backend, group, plan, params, launch.table)
                if _backends.average_writes_params(plan.rule, plan.switch):
                    launch.finish()  # BELAY or a switch changed the staged θ: copy it back
            return
        copies = [(group.bucket.view(group.staging, k), t) for k, t in enumerate(sources)]
        if group.stream is None:
            for target, value in copies:
                target.copy_(value)
            self._average(group.bucket.backend, group, plan, [group.staging], group.table)
            return
        # The copy to pinned host memory runs on a side stream after the step that made θ; it is averaged
        # at the next update (or read), so that the transfer overlaps the next step.
        group.stream.wait_stream(torch.cuda.current_stream(group.source_device))
        with torch.cuda.stream(group.stream):
            for target, value in copies:
                target.copy_(value, non_blocking=True)
                value.record_stream(group.stream)
            group.event.record(group.stream)
        group.pending = plan

    def _average(self, ops, group: _Group, plan, params, table) -> None:
        for k, weight in enumerate(plan.weights):
            group.weights[k] = weight
        kwargs = average_kwargs(self.average)
        ops.average_(params, table, average_state(plan, group.bucket.buffers), group.weights, plan.rule,
                     kwargs["reaction"], kwargs["inertia"], plan.switch)

    # --- the averaging API ---------------------------------------------------------------------------
    def _require_index(self, index: int) -> None:
        count = self.average.num_outputs
        if not 0 <= index < count:
            raise IndexError(f"index must be in [0, {count}), got {index}")

    def _averages(self, index: int) -> dict:
        """Per averaged tensor, its average ``index`` in fp32: a view (computed for LAWA and BEMA), a DTensor for a
        DTensor parameter; None while LAWA has no snapshot (the average is θ)."""
        self._flush()
        result = {}
        for group, flat in zip(self._groups, self._flat_averages(index)):
            for k, i in enumerate(group.entries):
                if flat is None:
                    result[i] = None
                elif group.bucket.sharded:
                    result[i] = _distributed.like(group.bucket.params[k], group.bucket.view(flat, k))
                else:
                    result[i] = group.bucket.view(flat, k)
        return result

    @torch.no_grad()
    def averaged_parameters(self, index: int = 0) -> list[torch.Tensor]:
        """The average of every parameter, in ``module.parameters()`` order, fp32 (float64 for float64).

        Views of the average for EMA/BELAY/SWA/SEMA/PowerEMA, computed for LAWA (θ at the last update before its
        first snapshot; for a sharded model θ now, as in the fused optimizers) and BEMA. ``index`` picks one decay
        of a multi-decay EMA or one PowerEMA profile. DTensors laid out like the parameters for DTensor
        parameters. Unfused: ``.module``'s parameters.
        """
        if self.average is None:
            return [p.detach() for p in self.module.parameters()]
        self._require_index(index)
        averages = self._averages(index)
        result = []
        for i in self._averaged_index:
            if i >= self._num_params:
                continue
            if averages[i] is None:
                group, k = self._where[i]
                theta = group.bucket.params[k] if self._sharded else self._all[i]
                result.append(theta.detach().to(group.bucket.state_dtype))
            else:
                result.append(averages[i])
        return result

    @contextlib.contextmanager
    def swap_average(self, model: torch.nn.Module | None = None, index: int = 0):
        """Inside the block ``model`` (default: the model this was built from) holds average ``index``; its
        parameters and buffers come back on exit, always.

        The averages are copied into the model's tensors where they are (the local shards of DTensor parameters);
        the raw ones are kept meanwhile (one copy of what this rank holds). FSDP2 modules are resharded on entry
        and on exit, so that no forward runs on unsharded parameters gathered before the swap or from the
        averages. ``update_parameters``, ``load_state_dict``, ``ema(...)`` of a sharded model and a nested swap
        raise inside the block: their work would be averaged from, or restored over, the swapped weights.
        """
        self._refuse_inside_swap("swap_average()")
        if self.average is None:
            raise RuntimeError(
                "swap_average() needs fastavg's fused averages, and this AveragedModel runs an unrecognised averaging "
                "function unfused: evaluate .module, or pass average=fastavg.EMA(...) (or torch's "
                "get_ema_multi_avg_fn)")
        if isinstance(model, int):
            raise TypeError(f"swap_average's first argument is the model, got {model!r}: pass the average's index as "
                            f"index={model}")
        model = self._model_argument(model, "pass swap_average(model)")
        self._require_index(index)
        if self._sharded:
            _reshard(model)
        sources, copied_buffers = self._sources_of(model)
        self._check_sources(sources, copied_buffers, "swap_average")
        averages = self._averages(index)
        kept = list(model.parameters()) + list(model.buffers())
        with torch.no_grad():
            raw = [local(t).clone() for t in kept]
            for i, average in averages.items():
                if average is None and not self._sharded:
                    average = self._all[i]  # LAWA before its first snapshot: .module holds θ
                if average is not None:
                    local(sources[i]).copy_(local(average))
        self._inside_swap = True
        try:
            yield model
        finally:
            self._inside_swap = False
            with torch.no_grad():
                for t, saved in zip(kept, raw):
                    local(t).copy_(saved)
                _reshard(model)

    def _refuse_inside_swap(self, what: str) -> None:
        if self.__dict__.get("_inside_swap", False):
            raise RuntimeError(
                f"{what} was called inside `with ema.swap_average():`, where the model holds the average and its raw "
                "weights come back on exit; leave the block first (inside it, run the model itself)")

    def _model_argument(self, model, fix: str) -> torch.nn.Module:
        """``model``, or the model this was built from; ``fix`` says how to pass one when that is gone."""
        if model is None:
            model = self._source()
            if model is None:
                raise ValueError(f"the model this AveragedModel was built from is gone; {fix}")
        elif not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        return model

    def attach(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None):
        """Update from ``model`` (default: the model this was built from) after every ``optimizer.step()``.

        Returns a handle: ``handle.remove()`` detaches. A step inside ``swap_average()`` raises before the
        optimizer changes anything (it would step the averaged weights, which the block then restores over).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        model = self._model_argument(model, "pass attach(optimizer, model)")
        return _Handles(
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._refuse_inside_swap("optimizer.step()")),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self.update_parameters(model)))

    # --- state dict and device moves -------------------------------------------------------------
    def _needs_fastavg_state(self) -> bool:
        """Whether ``.module`` in the model's dtype loses something: fp32 averages of lower-precision
        tensors, averages beyond the first, LAWA's ring, BELAY's velocity."""
        return any(group.bucket.dtype != group.bucket.state_dtype or set(group.bucket.buffers) != {"average_0"}
                   for group in self._groups)

    def _shard_state(self) -> dict:
        """Per parameter name, its averaging state by name: DTensors over the segments, laid out like the
        parameter (LAWA's ring with one leading dimension more)."""
        state = {}
        for group in self._groups:
            for k, i in enumerate(group.entries):
                p = group.bucket.params[k]
                entry = {}
                for name, flat in group.bucket.buffers.items():
                    view = group.bucket._state_view(flat, k)
                    if group.bucket.sharded:
                        view = _distributed.like(p, view, tuple(view.shape[:view.dim() - p.dim()]))
                    entry[name] = view
                state[self._names[i]] = entry
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._refresh()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.average is None:
            return
        if self._sharded:
            destination[prefix + "fastavg_state"] = {"averager": self.average.config(),
                                                     "averages": self._shard_state()}
        elif self._needs_fastavg_state():
            destination[prefix + "fastavg_state"] = {
                "averager": self.average.config(),
                "buffers": [{name: flat if keep_vars else flat.detach() for name, flat in group.bucket.buffers.items()}
                            for group in self._groups],
            }

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._refuse_inside_swap("load_state_dict()")
        extra = state_dict.pop(prefix + "fastavg_state", None)
        if self._sharded:
            extra = self._check_shard_state(extra)
        elif extra is not None:
            self._check_fastavg_state(extra)
        elif isinstance(self.average, LAWA):
            raise ValueError("state_dict has no fastavg_state: LAWA's snapshots cannot be rebuilt from .module; load "
                             "a state_dict saved by a fastavg.AveragedModel with the same LAWA")
        self.__dict__["_loaded"] = extra
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_averager(self, extra) -> None:
        ours = None if self.average is None else self.average.config()
        if extra.get("averager") != ours:
            raise ValueError(f"state_dict was saved with average={extra.get('averager')}, this AveragedModel has {ours}")

    def _check_fastavg_state(self, extra) -> None:
        self._check_averager(extra)
        saved = extra.get("buffers")
        if saved is None:
            raise ValueError("state_dict's fastavg_state holds sharded averages (saved from a model with DTensor "
                             "parameters); load it into an AveragedModel of the sharded model")
        if len(saved) != len(self._groups) or any(
                {name: t.numel() for name, t in buffers.items()}
                != {name: t.numel() for name, t in group.bucket.buffers.items()}
                for buffers, group in zip(saved, self._groups)):
            raise ValueError("state_dict's fastavg_state was saved from a model with other tensors; load it into an "
                             "AveragedModel of the same model")

    def _check_shard_state(self, extra) -> list:
        """The (target, value) local copies that load ``extra``, checked; raises, changing nothing."""
        if extra is None or "averages" not in extra:
            raise ValueError(
                "state_dict has no sharded averages (fastavg_state['averages']): load what ema.state_dict() of a "
                "fastavg.AveragedModel of this sharded model saved, e.g. with torch.distributed.checkpoint: state = "
                "{'ema': ema.state_dict()}; dcp.load(state, checkpoint_id=...); ema.load_state_dict(state['ema'])")
        self._check_averager(extra)
        saved, ours = extra["averages"], self._shard_state()
        if set(saved) != set(ours):
            raise ValueError(f"state_dict's averages are of parameters {sorted(saved)}, this AveragedModel averages "
                             f"{sorted(ours)}; load it into an AveragedModel of the same model")
        copies = []
        for name, entry in ours.items():
            if set(saved[name]) != set(entry):
                raise ValueError(f"state_dict's averages of {name} are {sorted(saved[name])}, expected {sorted(entry)}")
            for state_name, target in entry.items():
                value = saved[name][state_name]
                if _sharding(value) != _sharding(target) or value.shape != target.shape or (
                        local(value).shape != local(target).shape):
                    raise ValueError(
                        f"state_dict's {state_name} of {name} is {_describe(value)}, this AveragedModel's is "
                        f"{_describe(target)}: load sharded averages with torch.distributed.checkpoint "
                        "(dcp.load into ema.state_dict()), which reshards them")
                copies.append((local(target), local(value)))
        return copies

    def _apply(self, fn, recurse=True):
        if self.__dict__.get("average") is None or not self.__dict__.get("_groups") or self._sharded:
            # A sharded model's averages stay with its shards.
            return super()._apply(fn, recurse)
        self._refresh()
        old = [(group.entries, group.bucket) for group in self._groups]
        result = super()._apply(fn, recurse)
        self._build()
        new = {}
        for group in self._groups:
            for k, i in enumerate(group.entries):
                new[i] = (group.bucket, k)
        # The fp32 averages and averaging state follow the module, keeping their precision.
        with torch.no_grad():
            for entries, bucket in old:
                for k, i in enumerate(entries):
                    target, j = new[i]
                    for name, flat in bucket.buffers.items():
                        target._state_view(target.buffers[name], j).copy_(bucket._state_view(flat, k))
        self._dirty = False
        return result


@torch.no_grad()
def _after_load(model: AveragedModel, incompatible_keys) -> None:
    """The fp32 averages after a load: exact when saved by fastavg, else ``.module``'s loaded values.

    Rebuilt from ``.module``, whose tensors ``load_state_dict(assign=True)`` replaces; a staged θ is dropped.
    A sharded model's averages are copied in (``dcp.load`` into ``ema.state_dict()`` already wrote them).
    """
    extra = model.__dict__.pop("_loaded", None)
    if model.average is None:
        return
    if model._sharded:
        for target, value in extra:
            target.copy_(value)
    else:
        model._build()
        if extra is not None:
            for group, saved in zip(model._groups, extra["buffers"]):
                for name, flat in group.bucket.buffers.items():
                    flat.copy_(saved[name].reshape(flat.shape))
    model._t = int(model.n_averaged)
    model._dirty = False


class _Handles:
    """The hooks ``attach`` registers, removed together (``remove()``, or as a context manager)."""

    def __init__(self, *handles):
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _fsdp_modules(model: torch.nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def _reshard(model: torch.nn.Module) -> None:
    """Free FSDP2's unsharded parameters (no-op where there are none): the next forward gathers the shards as they
    are then, not parameters a forward with reshard_after_forward=False left from other values."""
    for module in _fsdp_modules(model):
        module.reshard()


def _sharding(t: torch.Tensor):
    """A DTensor's mesh and placements; None for a plain tensor."""
    return (t.device_mesh, tuple(t.placements)) if is_dtensor(t) else None


def _describe(t: torch.Tensor) -> str:
    if is_dtensor(t):
        return (f"a DTensor {tuple(t.shape)}, {t.dtype}, placements {tuple(t.placements)}, local shard "
                f"{tuple(local(t).shape)} on {local(t).device}")
    return f"{tuple(t.shape)}, {t.dtype} on {t.device}"


def _check_model_tensors(tensors, average, device) -> None:
    """Raise before anything is built if the fused path cannot average these tensors."""
    for t in tensors:
        check_parameter(t, "fastavg.AveragedModel")
        if t.is_complex():
            raise ValueError("fastavg.AveragedModel cannot average complex tensors; use "
                             "torch.optim.swa_utils.AveragedModel for this model")
    if device is not None and _writes_back(average):
        target = torch.device(device)
        if any(t.device != target for t in tensors):
            raise ValueError(
                f"average={average!r} writes the average back into the model, which device={device!r} (averages "
                "on another device than the model) does not do; drop device= or average with EMA/SWA/LAWA")


def _check_sharded(tensors, average, device, use_buffers) -> None:
    """Raise before anything is built for what shard-local averages of DTensor parameters cannot do."""
    what = "fastavg.AveragedModel of a model with DTensor parameters (FSDP2's fully_shard, tensor parallelism)"
    if average is None:
        raise NotImplementedError(
            f"{what} cannot run this avg_fn/multi_avg_fn: an averaging function other than torch's EMA and SWA ones "
            "runs as torch's code on a copy of the model (.module), and FSDP2 modules cannot be deep-copied. Pass "
            "average=fastavg.EMA(...) (or another fastavg averager), or torch's get_ema_multi_avg_fn/"
            "get_swa_multi_avg_fn, which run fused on the shards")
    check_averager_on_shards(average, "fastavg.AveragedModel")
    if use_buffers:
        raise NotImplementedError(
            f"{what} cannot average buffers (use_buffers=True): FSDP2 does not shard them, each rank's BatchNorm "
            "statistics are its own and a distributed checkpoint keeps rank 0's. Pass use_buffers=False (inside "
            "`with ema.swap_average(model):` the model's buffers are its own; recompute BatchNorm statistics there "
            "with torch.optim.swa_utils.update_bn(loader, model), and the block restores them on exit)")
    if device is not None:
        target = torch.device(device)
        if any(local(t).device.type != target.type or target.index not in (None, local(t).device.index)
               for t in tensors):
            raise NotImplementedError(
                f"{what} keeps the averages next to the local shards; device={device!r} (another device) is not "
                "supported for it: drop device=")
