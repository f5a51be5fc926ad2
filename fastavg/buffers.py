"""Buckets: the optimizer state and averages of one (param group, device, dtype) in flat buffers.

A :class:`Bucket` owns one contiguous buffer for every optimizer state and every average. Each
parameter has a segment in them that starts on a 128-byte boundary and is laid out like the parameter
in memory (channels_last, transposes), so that element ``j`` of the parameter's memory is element
``offset + j`` of every buffer; ``optimizer.state[p]`` holds views of the segments, shaped and strided
like ``p``. Padding is zero and stays zero: every rule maps zeros to zeros.

Parameters and gradients stay where their owners put them: a step hands the kernels a segment table
(:mod:`fastavg._segments`) of the parameters' and gradients' addresses, cached on the device and
rebuilt only when an address or the set of parameters with a gradient changes. A parameter whose grad
is None is skipped by the optimizer rule, as in torch. Tensors the kernels cannot address directly
(a parameter with gaps or overlaps in memory, a gradient laid out unlike its parameter) go through a
staging copy. A parameter given a new layout (``model.to(memory_format=torch.channels_last)``) keeps its
state: the segments are re-laid out to match.

DTensor parameters (FSDP2, tensor parallelism) make a sharded bucket: its segments are the local shards
(``p._local_tensor`` and ``p.grad._local_tensor``, addresses checked in Python each step) and its state entries
are DTensors over the segments with the parameters' mesh and placements (:mod:`fastavg._distributed`).

``flat_params=True`` is the opt-in layout where the parameters and gradients themselves become views of
a flat data and gradient buffer (``p.data`` and ``p.grad`` are assigned): with every gradient a view
(``zero_grad(set_to_none=False)``) and one step count, a step is a single segment per bucket.
"""
from __future__ import annotations

import torch

from . import _backends, _distributed, _segments
from ._common import compute_dtype
from .reference import init_average_state

ALIGN_BYTES = 128


def _memory_order_strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides if its layout is dense, else contiguous strides: the layout of its segments."""
    if _segments.is_dense(t):
        return t.stride()
    return torch.empty(t.shape, device="meta").stride()


def _same_layout(t: torch.Tensor, strides: tuple[int, ...]) -> bool:
    """Whether ``t`` is dense and laid out in memory as ``strides`` say (size-1 dimensions aside)."""
    return _segments.is_dense(t) and all(n == 1 or s == e for n, s, e in zip(t.shape, t.stride(), strides))


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def _address_rows(params, grads) -> list[list[int]]:
    """(address, gradient address or 0) per parameter; ``grads`` None: no gradients."""
    if grads is None:
        return [[p.data_ptr(), 0] for p in params]
    return [[p.data_ptr(), 0 if g is None else g.data_ptr()] for p, g in zip(params, grads)]


def _addresses(params, grads) -> torch.Tensor:
    """The host int64 ``(n, 2)`` table of (address, gradient address or 0) that a launch is built from."""
    return torch.tensor(_address_rows(params, grads), dtype=torch.int64).reshape(-1, 2)


def _addresses_match_in_python(params, addresses: torch.Tensor) -> bool:
    expected = addresses.tolist()
    return len(expected) == len(params) and all(
        [p.data_ptr(), 0 if p.grad is None else p.grad.data_ptr()] == row for p, row in zip(params, expected))


class _Launch:
    """One kernel launch: its parameters, the segment table, and staging copies around it.

    A launch keeps the parameters (as the optimizer does) but never a gradient, so that a cached launch
    holds no memory alive; :meth:`tensors` gathers this step's gradients with ``grads()``. ``addresses`` is
    what the table was built from: while every parameter and gradient is still there, the launch is reused.
    ``params`` are the tensors the kernels address (a sharded bucket's local shards); ``direct=False`` keeps
    the extension's eager path, which reads ``p.grad`` of ``params`` itself, away from them.
    """

    def __init__(self, indices, params, with_grads, table, param_staging, grad_staging, flat=None, grads=None,
                 direct=True):
        self.indices = indices
        self.params = params
        self.with_grads = with_grads
        self.grads = grads if grads is not None else (lambda: [p.grad for p in self.params])
        self.addresses = _addresses(params, self.grads() if with_grads else None)
        self.table = table
        self.param_staging = param_staging  # {position in the launch: staging tensor} for undense parameters
        self.grad_staging = grad_staging  # {position: staging tensor} for gradients laid out unlike θ
        self.flat = flat  # flat_params with every gradient a view: (data, grad), the whole bucket
        # The kernels address the parameters and gradients themselves: the extension's eager path applies.
        self.direct = direct and flat is None and not param_staging and not grad_staging

    def tensors(self):
        """This step's ``(params, grads)`` lists for the launch, staged; ``grads`` None for averaging alone."""
        if self.flat is not None:
            return [self.flat[0]], [self.flat[1]]
        ps = list(self.params)
        gs = self.grads() if self.with_grads else None
        for k, staging in self.param_staging.items():
            staging.copy_(ps[k])
            ps[k] = staging
        for k, staging in self.grad_staging.items():
            staging.copy_(gs[k])
            gs[k] = staging
        return ps, gs

    def finish(self) -> None:
        """Copy staged parameters back."""
        for k, staging in self.param_staging.items():
            self.params[k].copy_(staging)


class Bucket:
    """The flat state and average buffers of one (param group, device, dtype), and how to launch on them."""

    def __init__(self, params: list[torch.Tensor], optimizer_state: tuple[str, ...], average, state: dict,
                 group_index: int, backend, flat_params: bool = False, capturable: bool = False):
        self.params = params  # what optimizer.state is keyed by: the user's parameters (DTensors when sharded)
        # Sharded: the kernels run on the DTensors' local shards (see local_param() and local_grad()).
        self.sharded = _distributed.is_dtensor(params[0])
        self.backend = backend
        self.group_index = group_index
        local = [self.local_param(i) for i in range(len(params))]
        self.dtype = local[0].dtype
        self.device = local[0].device
        self.state_dtype = compute_dtype(self.dtype)
        self.flat_params = flat_params
        self.state = state
        align = max(ALIGN_BYTES // local[0].element_size(), 1)
        self.shapes = [t.shape for t in local]
        self.offsets, self.strides, offset = [], [], 0
        for t in local:
            self.offsets.append(offset)
            self.strides.append(_memory_order_strides(t))
            offset += -(-t.numel() // align) * align
        self.numel = offset
        self.buffers: dict[str, torch.Tensor] = {}
        for name in optimizer_state:
            self.add_buffer(name)
        self._init_average_buffers(average)
        # Step counts live on the host, or on the device with capturable=True (a CUDA graph replays their increment).
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device if capturable else "cpu")
        self._empty = [i for i, t in enumerate(local) if t.numel() == 0]
        for i, p in enumerate(params):
            state[p]["step"] = self.steps[i]
        self._uniform_steps = True
        self.data = self.grad = None
        if flat_params:
            self._init_flat_params()
        self._cache = None
        # The per-launch scalars (lr, step, averaging weights) the kernels read: on the CPU lr lives
        # here and step in ``steps``; on a GPU all of them travel in ``scalars``, made at the first step.
        # With capturable=True lr (a number) is filled into ``lr_device`` and the rest never leaves the device.
        self.lr_cpu = torch.zeros(1, dtype=self.state_dtype) if self.device.type == "cpu" else None
        self.scalars = None
        self.lr_device = torch.zeros(1, dtype=self.state_dtype, device=self.device) if capturable else None
        # capturable on a GPU: pinned memory for a segment table built during a CUDA graph capture (new gradients
        # after zero_grad(set_to_none=True)); made by prepare_capture() at the eager steps before it.
        self._capture_rows = max(sum(-(-t.numel() // _segments.ROW_NUMEL) for t in local),
                                 -(-self.numel // _segments.ROW_NUMEL)) if capturable else 0
        self._capture_table = None

    def prepare_capture(self) -> None:
        """capturable=True on a GPU: pinned memory for the segment table of a step captured later."""
        if self._capture_table is None and self.device.type == "cuda":
            self._capture_table = torch.empty((self._capture_rows, len(_segments.COLUMNS)), dtype=torch.int64,
                                              pin_memory=True)

    def _table(self, rows) -> torch.Tensor:
        if self._capture_table is not None and torch.cuda.is_current_stream_capturing():
            pinned, self._capture_table = self._capture_table, None
            return _segments.captured_table(rows, pinned, self.device)
        return _segments.table(rows, self.device)

    # Pickled (and deep-copied) without what belongs to this process: the backend's ops, found again by name; the
    # cached launches (addresses); pinned memory for a capture.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "backend": self.backend.name, "_cache": None, "_capture_table": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.backend = _backends.resolve(state["backend"], self.device, self.dtype)

    # --- what the kernels address ------------------------------------------------------------------
    def local_param(self, i: int) -> torch.Tensor:
        """Parameter ``i`` as the kernels address it: itself, or its local shard in a sharded bucket."""
        return _distributed.local(self.params[i]) if self.sharded else self.params[i]

    def local_grad(self, i: int):
        """This step's gradient of parameter ``i`` as the kernels address it (None: none)."""
        grad = self.params[i].grad
        return _distributed.local(grad) if self.sharded else grad

    def _publish(self, i: int, name: str, view: torch.Tensor) -> None:
        """``optimizer.state[p][name]`` ← parameter ``i``'s segment ``view``: itself, or, in a sharded bucket, a
        DTensor over it laid out like ``p`` (LAWA's ring has one leading dimension more)."""
        if self.sharded:
            leading = tuple(view.shape[:view.dim() - len(self.shapes[i])])
            view = _distributed.like(self.params[i], view, leading)
        self.state[self.params[i]][name] = view

    # --- layout -----------------------------------------------------------------------------------
    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter ``i``'s segment of a flat buffer, shaped and strided like the parameter."""
        return flat.as_strided(self.shapes[i], self.strides[i], self.offsets[i])

    def _state_view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        if flat.dim() == 2:  # LAWA's ring: k snapshots
            return flat.as_strided((flat.shape[0], *self.shapes[i]), (self.numel, *self.strides[i]), self.offsets[i])
        return self.view(flat, i)

    def add_buffer(self, name: str) -> None:
        """A zeroed state buffer, with per-parameter views in ``state``."""
        flat = torch.zeros(self.numel, dtype=self.state_dtype, device=self.device)
        self.buffers[name] = flat
        for i in range(len(self.params)):
            self._publish(i, name, self.view(flat, i))

    def _init_average_buffers(self, average) -> None:
        """The averaging buffers, zeroed: averages are seeded from θ at the first step (:meth:`seed_averages`)."""
        kinds: dict = {}
        init_average_state(kinds, average, self.params[0], lambda kind: kind)
        for name, kind in kinds.items():
            if isinstance(kind, tuple):
                flat = torch.zeros((kind[1], self.numel), dtype=self.dtype, device=self.device)
            else:
                flat = torch.zeros(self.numel, dtype=self.state_dtype, device=self.device)
            self.buffers[name] = flat
            for i in range(len(self.params)):
                self._publish(i, name, self._state_view(flat, i))
        self.average_names = [name for name, kind in kinds.items() if kind == "average"]

    def _init_flat_params(self) -> None:
        self.data = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.grad = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        for i, p in enumerate(self.params):
            self.view(self.data, i).copy_(p.detach())
            p.data = self.view(self.data, i)
            if p.grad is not None:
                self.view(self.grad, i).copy_(p.grad)
                p.grad = self.view(self.grad, i)
        self._flat_grad_addresses = [self.view(self.grad, i).data_ptr() for i in range(len(self.params))]

    def _relayout(self, i: int, strides: tuple[int, ...]) -> None:
        """Lay parameter ``i``'s segments out as ``strides`` (its new memory layout), keeping their values."""
        old = {name: self._state_view(flat, i).clone() for name, flat in self.buffers.items()}
        self.strides[i] = strides
        for name, flat in self.buffers.items():
            view = self._state_view(flat, i)
            view.copy_(old[name])
            self._publish(i, name, view)

    def seed_averages(self) -> None:
        """Every average ← θ: averages start from the weights as they are at the first step."""
        for name in self.average_names:
            flat = self.buffers[name]
            torch._foreach_copy_([self.view(flat, i) for i in range(len(self.params))],
                                 [self.local_param(i).detach() for i in range(len(self.params))])

    # --- per step ---------------------------------------------------------------------------------
    def current(self, addresses_match) -> bool:
        """Whether the cached launches still hold: every parameter and gradient is where their tables say.

        An empty tensor's address is 0 with or without a gradient, so the tables cannot tell whether it has
        one: that is checked here (the cache holds one launch, for parameters all with or all without one).
        A sharded bucket compares its local shards' addresses in Python: ``addresses_match`` reads ``p.grad``
        of the tensors it is given, and a local shard's gradient is its DTensor's.
        """
        if self._cache is None:
            return False
        has_grad = self._cache[0][0]
        if any((self.params[i].grad is not None) != has_grad for i in self._empty):
            return False
        if self.sharded:
            return all(launch.addresses.tolist() == _address_rows(
                [self.local_param(i) for i in launch.indices], launch.grads() if launch.with_grads else None)
                for _, launch in self._cache)
        return all(addresses_match(launch.params, launch.addresses) for _, launch in self._cache)

    def _check(self, i: int, p: torch.Tensor, grad) -> None:
        """Raise, changing nothing, if parameter ``i`` or its gradient can no longer be stepped here."""
        if p.shape != self.shapes[i] or p.dtype != self.dtype or p.device != self.device:
            raise RuntimeError(
                f"parameter {i} of param group {self.group_index} is now {_describe(p)}, but the optimizer was "
                f"built for {self.dtype} on {self.device}; build the optimizer after moving or casting the model "
                "(or build a new one now)"
            )
        if grad is not None and (grad.layout != torch.strided or grad.shape != p.shape or grad.device != p.device
                                 or grad.dtype != p.dtype):
            raise RuntimeError(
                f"grad of parameter {i} of param group {self.group_index} has {_describe(grad)} "
                f"(layout {grad.layout}); expected a dense gradient of shape {tuple(p.shape)}, {p.dtype}, "
                f"on {p.device}"
            )

    def check(self) -> None:
        """Check every parameter and gradient, changing nothing (the cache did not hold)."""
        for i, p in enumerate(self.params):
            if self.sharded and p.grad is not None:
                _distributed.check_gradient(p, p.grad, f"parameter {i} of param group {self.group_index}")
            self._check(i, self.local_param(i), self.local_grad(i))

    def launches(self, cache_holds: bool) -> list[tuple[bool, _Launch]]:
        """Count this step for every parameter with a gradient; return ``(has_grad, launch)`` pairs.

        One launch per distinct step count among the parameters with a gradient (one, unless some
        parameters skipped steps), and one averaging-only launch for those without. The launches are
        cached while every parameter has a gradient (or none has) and all share one step count.
        """
        if cache_holds:
            if self._cache[0][0]:
                self.steps.add_(1)
            return self._cache
        if self.flat_params:
            self._flat_refresh()
        has_grad = [p.grad is not None for p in self.params]
        if all(has_grad):
            self.steps.add_(1)
        else:
            self.steps.add_(torch.tensor(has_grad, dtype=torch.float32).to(self.steps.device))
            self.refresh_steps()
        self._cache = None
        if self._uniform_steps:
            groups = [0 if g else None for g in has_grad]
        else:  # parameters at different step counts (some skipped steps): grouped afresh every step
            steps = self.steps.tolist()
            groups = [steps[i] if g else None for i, g in enumerate(has_grad)]
        launches = self._plan(groups)
        if self._uniform_steps and len(launches) == 1:
            self._cache = launches
        return launches

    def _flat_refresh(self) -> None:
        """flat_params: bring relocated parameters and separate gradients back into the flat buffers."""
        self._refuse_foreign_flat_buffer()
        for i, p in enumerate(self.params):
            view = self.view(self.data, i)
            if p.data_ptr() != view.data_ptr():
                view.copy_(p.detach())
                p.data = view
            if p.grad is not None and p.grad.data_ptr() != self._flat_grad_addresses[i]:
                self.view(self.grad, i).copy_(p.grad)
                p.grad = self.view(self.grad, i)

    def _refuse_foreign_flat_buffer(self) -> None:
        """Raise, changing nothing, if parameters were moved into one storage that is not fastavg's.

        That is another engine's flat buffer (ZeroRedundancyOptimizer(parameters_as_bucket_view=True) re-points
        ``p.data`` at its buckets): copying them back would leave its buffer stale, and it broadcasts that buffer.
        A single parameter given a tensor of its own is brought back as usual.
        """
        owners: dict = {}
        for i, p in enumerate(self.params):
            if p.numel() and p.data_ptr() != self.view(self.data, i).data_ptr():
                owners.setdefault(p.untyped_storage().data_ptr(), []).append(i)
        shared = next((indices for indices in owners.values() if len(indices) > 1), None)
        if shared is not None:
            raise RuntimeError(
                f"parameters {shared} of param group {self.group_index} were moved into one storage that is not "
                "fastavg's: another engine keeps them in a flat buffer of its own (ZeroRedundancyOptimizer with "
                "parameters_as_bucket_view=True does). flat_params=True would move them back and leave that buffer "
                "stale, and the replicas would diverge: build the optimizer with flat_params=False (the default), "
                "which steps the parameters where the engine keeps them")

    def _plan(self, groups) -> list[tuple[bool, _Launch]]:
        """The launches for parameters grouped by ``groups[i]`` (a step count, or None: no gradient)."""
        members: dict = {}
        for i, group in enumerate(groups):
            members.setdefault(group, []).append(i)
        if self.flat_params and list(members) == [0] and all(
                p.grad.data_ptr() == address for p, address in zip(self.params, self._flat_grad_addresses)):
            table = self._table(_segments.rows(self.data, self.grad, 0))
            return [(True, _Launch(list(range(len(self.params))), self.params, True, table, {}, {},
                                   flat=(self.data, self.grad)))]
        return [(group is not None, self._launch_for(indices, group is not None))
                for group, indices in members.items()]

    def _launch_for(self, indices: list[int], with_grads: bool) -> _Launch:
        rows, param_staging, grad_staging = [], {}, {}
        for k, i in enumerate(indices):
            p = self.local_param(i)
            if not _same_layout(p, self.strides[i]):
                if _segments.is_dense(p):
                    self._relayout(i, p.stride())
                else:
                    p = param_staging[k] = torch.empty_strided(p.shape, self.strides[i], dtype=p.dtype,
                                                                device=p.device)
            g = None
            if with_grads:
                g = self.local_grad(i)
                if not _same_layout(g, self.strides[i]):
                    g = grad_staging[k] = torch.empty_strided(g.shape, self.strides[i], dtype=g.dtype,
                                                               device=g.device)
            rows += _segments.rows(p, g, self.offsets[i])
        grads = (lambda: [self.local_grad(i) for i in indices]) if self.sharded else None
        return _Launch(indices, [self.local_param(i) for i in indices], with_grads, self._table(rows),
                       param_staging, grad_staging, grads=grads, direct=not self.sharded)

    def refresh_steps(self) -> None:
        """Note whether all parameters share one step count (then a step needs one launch)."""
        self._uniform_steps = bool((self.steps == self.steps[0]).all())
        if not self._uniform_steps:
            self._cache = None
