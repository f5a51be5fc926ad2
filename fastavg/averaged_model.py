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
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from collections import defaultdict

import torch
from torch.optim.swa_utils import AveragedModel as _TorchAveragedModel

from . import _backends, _segments
from ._distributed import check_parameter, is_dtensor
from .averaging import BELAY, BEMA, EMA, LAWA, RULE_NONE, SEMA, SWA, PowerEMA, check_averager
from .buffers import Bucket
from .reference import average_kwargs, average_state

__all__ = ["AveragedModel"]

_TORCH_FUNCTIONS = "torch.optim.swa_utils"
# AveragedModel keeps a deep copy of the model as .module; FSDP2 modules refuse deepcopy, and so does torch's
# AveragedModel on them. The optimizer's own averages work on the shards.
_DTENSOR_REFUSAL = (
    "fastavg.AveragedModel cannot average DTensor parameters (FSDP2's fully_shard, tensor parallelism): it keeps a "
    "deep copy of the model as .module, and FSDP2 modules cannot be deep-copied (torch.optim.swa_utils.AveragedModel "
    "fails the same way). Keep the average in the optimizer instead: fastavg.AdamW(..., average=fastavg.EMA(...)), "
    "and evaluate inside `with opt.swap_average():` (see the README's section on distributed engines)")


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
        tensors = list(model.parameters()) + (list(model.buffers()) if use_buffers else [])
        if fused is not None:
            _check_model_tensors(tensors, fused, device)
        super().__init__(model, device, avg_fn, multi_avg_fn, use_buffers)
        self.average = fused
        self._source = weakref.ref(model)
        self._backend_request = request
        self._groups: list[_Group] = []
        self._dirty = False
        self._versions = []
        self._t = 0
        if fused is None:
            warnings.warn(
                "fastavg.AveragedModel runs this averaging function unfused, as torch does, in the model's dtype; "
                "pass average=fastavg.EMA(...) (or torch's get_ema_multi_avg_fn) for the fused fp32 path",
                stacklevel=2)
            return
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
        source_devices = [t.device for t in self._source_tensors()]
        by_key: dict = {}
        for i in self._averaged_index:
            t = self._all[i]
            by_key.setdefault((t.device, t.dtype, source_devices[i]), []).append(i)
        self._groups = []
        for (device, dtype, source_device), entries in by_key.items():
            backend = _backends.resolve(self._backend_request, device, dtype)
            bucket = Bucket([self._all[i] for i in entries], (), self.average, defaultdict(dict), 0, backend)
            bucket.seed_averages()
            self._groups.append(_Group(entries, bucket, source_device))
        self._where = {i: (group, k) for group in self._groups for k, i in enumerate(group.entries)}
        self._record_versions()

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

    # --- updating -------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        """Average ``model``'s current weights in: one fused launch per bucket (torch's code when unfused)."""
        if self.average is None:
            return super().update_parameters(model)
        params = list(model.parameters())
        buffers = list(model.buffers())
        sources = params + (buffers if self.use_buffers else [])
        copied_buffers = [] if self.use_buffers else buffers
        self._check_sources(sources, copied_buffers)
        self._flush()
        if not self._dirty:
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
        if isinstance(self.average, LAWA) and self.average.snapshot_count(self._t) == 0:
            # Before its first snapshot LAWA's average is θ itself, as it is now.
            for i in self._averaged_index:
                self._all[i].copy_(sources[i])
            self._dirty = False
            self._record_versions()
        else:
            self._dirty = True
        self.average.after_step(self._t, self.averaged_parameters)

    def _check_sources(self, sources, copied_buffers) -> None:
        """Raise, changing nothing, if ``model`` is not shaped like the averaged one."""
        if len(sources) != len(self._all) or len(copied_buffers) != len(self._buffers_copied):
            raise ValueError(
                f"update_parameters got a model with {len(sources)} parameters{' and buffers' * self.use_buffers}, "
                f"the averaged model has {len(self._all)}; pass the model this AveragedModel was built from")
        for group in self._groups:
            if [sources[i].data_ptr() for i in group.entries] == group.addresses:
                continue
            for i in group.entries:
                theirs, ours = sources[i], self._all[i]
                if is_dtensor(theirs):
                    raise NotImplementedError(_DTENSOR_REFUSAL)
                if theirs.shape != ours.shape or theirs.dtype != ours.dtype or theirs.device != group.source_device:
                    raise ValueError(
                        f"tensor {i} of the model passed to update_parameters is {tuple(theirs.shape)}, {theirs.dtype} "
                        f"on {theirs.device}; it was {tuple(ours.shape)}, {ours.dtype} on {group.source_device} when "
                        "this AveragedModel was built: build it after moving or casting the model")
            # Checked: the launch is rebuilt for these tensors at this update.
            group.addresses = None

    def _launch(self, group: _Group, sources, plan) -> None:
        if group.addresses is None:
            group.addresses = [t.data_ptr() for t in sources]
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
    @torch.no_grad()
    def averaged_parameters(self, index: int = 0) -> list[torch.Tensor]:
        """The average of every parameter, in ``module.parameters()`` order, fp32 (float64 for float64).

        Views of the average for EMA/BELAY/SWA/SEMA/PowerEMA, computed for LAWA (θ at the last update before its
        first snapshot) and BEMA. ``index`` picks one decay of a multi-decay EMA or one PowerEMA profile.
        Unfused: ``.module``'s parameters.
        """
        if self.average is None:
            return [p.detach() for p in self.module.parameters()]
        count = self.average.num_outputs
        if not 0 <= index < count:
            raise IndexError(f"index must be in [0, {count}), got {index}")
        self._flush()
        result = {}
        for group, flat in zip(self._groups, self._flat_averages(index)):
            for k, i in enumerate(group.entries):
                if i < self._num_params:
                    result[i] = (group.bucket.view(flat, k) if flat is not None
                                 else self._all[i].detach().to(group.bucket.state_dtype))
        return [result[i] for i in sorted(result)]

    def attach(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None):
        """Update from ``model`` (default: the model this was built from) after every ``optimizer.step()``.

        Returns the hook's handle: ``handle.remove()`` detaches.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if model is None:
            model = self._source()
            if model is None:
                raise ValueError("the model this AveragedModel was built from is gone; pass attach(optimizer, model)")
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.update_parameters(model))

    # --- state dict and device moves -------------------------------------------------------------
    def _needs_fastavg_state(self) -> bool:
        """Whether ``.module`` in the model's dtype loses something: fp32 averages of lower-precision
        tensors, averages beyond the first, LAWA's ring, BELAY's velocity."""
        return any(group.bucket.dtype != group.bucket.state_dtype or set(group.bucket.buffers) != {"average_0"}
                   for group in self._groups)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._refresh()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.average is not None and self._needs_fastavg_state():
            destination[prefix + "fastavg_state"] = {
                "averager": self.average.config(),
                "buffers": [{name: flat if keep_vars else flat.detach() for name, flat in group.bucket.buffers.items()}
                            for group in self._groups],
            }

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        extra = state_dict.pop(prefix + "fastavg_state", None)
        if extra is not None:
            self._check_fastavg_state(extra)
        elif isinstance(self.average, LAWA):
            raise ValueError("state_dict has no fastavg_state: LAWA's snapshots cannot be rebuilt from .module; load "
                             "a state_dict saved by a fastavg.AveragedModel with the same LAWA")
        self.__dict__["_loaded"] = extra
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_fastavg_state(self, extra) -> None:
        ours = None if self.average is None else self.average.config()
        if extra.get("averager") != ours:
            raise ValueError(f"state_dict was saved with average={extra.get('averager')}, this AveragedModel has {ours}")
        saved = extra["buffers"]
        if len(saved) != len(self._groups) or any(
                {name: t.numel() for name, t in buffers.items()}
                != {name: t.numel() for name, t in group.bucket.buffers.items()}
                for buffers, group in zip(saved, self._groups)):
            raise ValueError("state_dict's fastavg_state was saved from a model with other tensors; load it into an "
                             "AveragedModel of the same model")

    def _apply(self, fn, recurse=True):
        if self.__dict__.get("average") is None or not self.__dict__.get("_groups"):
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
    """
    extra = model.__dict__.pop("_loaded", None)
    if model.average is None:
        return
    model._build()
    if extra is not None:
        for group, saved in zip(model._groups, extra["buffers"]):
            for name, flat in group.bucket.buffers.items():
                flat.copy_(saved[name].reshape(flat.shape))
    model._t = int(model.n_averaged)
    model._dirty = False


def _check_model_tensors(tensors, average, device) -> None:
    """Raise before anything is built if the fused path cannot average these tensors."""
    for t in tensors:
        check_parameter(t, "fastavg.AveragedModel")
        if is_dtensor(t):
            raise NotImplementedError(_DTENSOR_REFUSAL)
        if t.is_complex():
            raise ValueError("fastavg.AveragedModel cannot average complex tensors; use "
                             "torch.optim.swa_utils.AveragedModel for this model")
    if device is not None and _writes_back(average):
        target = torch.device(device)
        if any(t.device != target for t in tensors):
            raise ValueError(
                f"average={average!r} writes the average back into the model, which device={device!r} (averages "
                "on another device than the model) does not do; drop device= or average with EMA/SWA/LAWA")
