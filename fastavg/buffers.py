"""Flat buffers: the parameters of one (param group, device, dtype) packed into contiguous memory.

A :class:`Bucket` owns one contiguous buffer each for the data, the gradients, every optimizer state
and every average. Each parameter's segment starts on a 128-byte boundary; ``p.data`` and ``p.grad``
become views of their segments, keeping the parameter's strides when its layout is dense and
non-overlapping (channels_last, transposes), so that element ``i`` of every buffer belongs to the same
weight. Padding is zero and stays zero: every rule maps zeros to zeros.

Gradients follow torch: a gradient that is our view is used in place; a gradient that is another
tensor (``p.grad`` set by hand, or allocated by backward after ``zero_grad(set_to_none=True)``) is
copied into the segment and ``p.grad`` is made the view again; a parameter whose grad is None is
skipped by the optimizer rule. A parameter that no longer lives in its segment (``p.data`` replaced)
is copied back in when its shape, dtype and device still match; otherwise the step raises.
"""
from __future__ import annotations

import torch

from ._common import compute_dtype
from .reference import init_average_state

ALIGN_BYTES = 128


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides if its layout is dense and non-overlapping, else contiguous strides."""
    if t.is_contiguous():
        return t.stride()
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), -d))
    expected = 1
    for d in order:
        if t.size(d) != 1 and t.stride(d) != expected:
            return torch.empty(t.shape, device="meta").stride()
        expected *= t.size(d)
    return t.stride()


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


class Bucket:
    """The flat buffers of one (param group, device, dtype) and the parameters living in them."""

    def __init__(self, params: list[torch.Tensor], optimizer_state: tuple[str, ...], average, state: dict,
                 group_index: int, backend):
        self.params = params
        self.backend = backend
        self.group_index = group_index
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.state_dtype = compute_dtype(self.dtype)
        align = max(ALIGN_BYTES // params[0].element_size(), 1)
        self.offsets, self.strides, offset = [], [], 0
        for p in params:
            self.offsets.append(offset)
            self.strides.append(_dense_strides(p))
            offset += -(-p.numel() // align) * align
        self.numel = offset
        self.data = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.grad = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.data_views = [self._view(self.data, i) for i in range(len(params))]
        self.grad_views = [self._view(self.grad, i) for i in range(len(params))]
        for p, view in zip(params, self.data_views):
            view.copy_(p.detach())
        self.buffers: dict[str, torch.Tensor] = {}
        for name in optimizer_state:
            self.add_buffer(name, state)
        self._init_average_buffers(average, state)
        self.steps = torch.zeros(len(params), dtype=torch.float32)
        for i, (p, view) in enumerate(zip(params, self.data_views)):
            p.data = view
            state[p]["step"] = self.steps[i]
        self._data_ptrs = [v.data_ptr() for v in self.data_views]
        self._uniform_steps = True
        # The per-launch scalars (lr, step, averaging weights) the kernels read: on the CPU lr lives
        # here and step in ``steps``; on a GPU all of them travel in ``scalars``, made at the first step.
        self.lr_cpu = torch.zeros(1) if self.device.type == "cpu" else None
        self.scalars = None

    def _view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return flat.as_strided(p.shape, self.strides[i], self.offsets[i])

    def add_buffer(self, name: str, state: dict) -> None:
        """A zeroed fp32 state buffer, with per-parameter views in ``state``."""
        flat = torch.zeros(self.numel, dtype=self.state_dtype, device=self.device)
        self.buffers[name] = flat
        for i, p in enumerate(self.params):
            state[p][name] = self._view(flat, i)

    def _init_average_buffers(self, average, state: dict) -> None:
        """The averaging buffers, flat: averages start as a copy of the data, the rest as zeros."""
        kinds: dict = {}
        init_average_state(kinds, average, self.params[0], lambda kind: kind)
        for name, kind in kinds.items():
            if kind == "copy":
                flat = self.data.to(self.state_dtype, copy=True)
            elif kind == "zeros":
                flat = torch.zeros(self.numel, dtype=self.state_dtype, device=self.device)
            else:
                flat = torch.zeros((kind[1], self.numel), dtype=self.dtype, device=self.device)
            self.buffers[name] = flat
            for i, p in enumerate(self.params):
                if flat.dim() == 2:
                    size, stride = (flat.shape[0], *p.shape), (self.numel, *self.strides[i])
                    state[p][name] = flat.as_strided(size, stride, self.offsets[i])
                else:
                    state[p][name] = self._view(flat, i)

    # --- per step ---------------------------------------------------------------------------------
    def inspect(self) -> tuple[list[bool], list[int]]:
        """Check every parameter and gradient, changing nothing; raise if one cannot be brought back.

        Returns, per parameter, whether it has a gradient, and the indices that :meth:`gather` must fix.
        """
        has_grad, fixups = [], []
        for i, p in enumerate(self.params):
            grad = p.grad
            has_grad.append(grad is not None)
            data_moved = p.data_ptr() != self._data_ptrs[i]
            if not data_moved and (grad is None or grad is self.grad_views[i]):
                continue
            fixups.append(i)
            view = self.data_views[i]
            if data_moved and (p.shape != view.shape or p.dtype != self.dtype or p.device != self.device):
                raise RuntimeError(
                    f"parameter {i} of param group {self.group_index} changed from {_describe(view)} to "
                    f"{_describe(p)} after the optimizer was built; fastavg keeps parameters in flat buffers, so "
                    "build the optimizer after moving or casting the model (or build a new one now)"
                )
            if grad is not None and grad is not self.grad_views[i]:
                if grad.layout != torch.strided or grad.shape != view.shape or grad.device != self.device:
                    raise RuntimeError(
                        f"grad of parameter {i} of param group {self.group_index} has {_describe(grad)} "
                        f"(layout {grad.layout}); expected a dense gradient of shape {tuple(view.shape)} "
                        f"on {self.device}"
                    )
        return has_grad, fixups

    def gather(self, fixups: list[int]) -> None:
        """Copy relocated parameters and separate gradients back into their segments, restoring the views."""
        for i in fixups:
            p = self.params[i]
            if p.data_ptr() != self._data_ptrs[i]:
                self.data_views[i].copy_(p.detach())
                p.data = self.data_views[i]
            grad = p.grad
            if grad is not None and grad is not self.grad_views[i]:
                self.grad_views[i].copy_(grad)
                p.grad = self.grad_views[i]

    def runs_and_advance(self, has_grad: list[bool]) -> list[tuple[int, int, bool, int]]:
        """Count this step for every parameter with a gradient; return the launches it takes.

        Each launch is ``(begin, end, has_grad, first_param)`` over elements ``[begin, end)`` of the
        flat buffers: maximal runs of neighbouring parameters that share whether they have a gradient
        and, if they do, their step count.
        """
        if all(has_grad) and self._uniform_steps:
            self.steps.add_(1)
            return [(0, self.numel, True, 0)]
        steps = self.steps.tolist()
        runs: list[list] = []
        for i, g in enumerate(has_grad):
            key = (g, steps[i] if g else None)
            if runs and runs[-1][0] == key:
                runs[-1][2] = i
            else:
                runs.append([key, i, i])
        self.steps.add_(torch.tensor(has_grad, dtype=torch.float32))
        self.refresh_steps()
        launches = []
        for (g, _), first, last in runs:
            end = self.offsets[last + 1] if last + 1 < len(self.params) else self.numel
            launches.append((self.offsets[first], end, g, first))
        return launches

    def refresh_steps(self) -> None:
        """Note whether all parameters share one step count (then a step is a single launch)."""
        self._uniform_steps = bool((self.steps == self.steps[0]).all())

    def zero_grad(self, set_to_none: bool) -> None:
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        self.grad.zero_()
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not None and p.grad is not view:
                p.grad = view
