"""The segment table: where the parameters of one launch are, and where their state is.

Every op takes the parameters (and gradients) of a launch as tensor lists plus an int64 table of shape
``(n, 4)`` in the parameters' memory, one row per segment: ``(param address, grad address, numel, offset)``.
A segment is a run of elements that is contiguous in memory; element ``j`` of it is ``param[j]``,
``grad[j]`` and element ``offset + j`` of every flat state and average buffer. The rows of ``params[i]``
follow one another and cover its memory in order; a tensor longer than :data:`ROW_NUMEL` elements takes
several rows, so that a GPU kernel can give each row to one program. Row starts keep the alignment of
their tensor: a 16-byte aligned tensor yields 16-byte aligned rows (``ROW_NUMEL`` is a multiple of 16).
"""
from __future__ import annotations

import torch

ROW_NUMEL = 1 << 16
COLUMNS = ("param", "grad", "numel", "offset")


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one run of memory without gaps or overlaps (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for d in sorted(range(t.dim()), key=lambda d: t.stride(d)):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def memory_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory as a 1-D tensor, in address order (``t`` must be dense); writes go to ``t``."""
    return t.as_strided((t.numel(),), (1,))


def rows(param: torch.Tensor, grad: torch.Tensor | None, offset: int) -> list[tuple[int, int, int, int]]:
    """The table rows of one dense tensor whose state starts at ``offset`` of the flat buffers."""
    numel, size = param.numel(), param.element_size()
    param_address = param.data_ptr()
    grad_address = grad.data_ptr() if grad is not None else 0
    result = []
    for start in range(0, numel, ROW_NUMEL):
        count = min(ROW_NUMEL, numel - start)
        result.append((param_address + start * size, grad_address + start * size if grad_address else 0, count,
                       offset + start))
    return result


# The pinned host tables that captured CUDA graphs copy from: each replay copies its table from there again, so
# they live as long as the process (a few bytes per parameter, once per capture).
_CAPTURED_TABLE_SOURCES: list[torch.Tensor] = []


def table(row_list: list[tuple[int, int, int, int]], device: torch.device) -> torch.Tensor:
    """The ``(n, 4)`` int64 table of ``row_list`` in ``device``'s memory."""
    host = torch.tensor(row_list, dtype=torch.int64).reshape(-1, len(COLUMNS))
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def captured_table(row_list: list[tuple[int, int, int, int]], pinned: torch.Tensor,
                   device: torch.device) -> torch.Tensor:
    """:func:`table` while a CUDA graph is captured, through ``pinned``, pinned host memory of at least as many rows,
    allocated before the capture: a graph can copy only from pinned memory, and pinning memory during a capture is
    not allowed. ``pinned`` is kept for the graph's replays and must not be used again."""
    host = pinned[:len(row_list)]
    host.copy_(torch.tensor(row_list, dtype=torch.int64).reshape(-1, len(COLUMNS)))
    _CAPTURED_TABLE_SOURCES.append(pinned)
    return host.to(device, non_blocking=True)


def build(params: list[torch.Tensor], grads: list[torch.Tensor] | None, offsets: list[int],
          device: torch.device) -> torch.Tensor:
    """The table of dense ``params`` (and ``grads``, or none for ``average_``) with state at ``offsets``."""
    row_list = []
    for i, (p, offset) in enumerate(zip(params, offsets)):
        row_list += rows(p, grads[i] if grads is not None else None, offset)
    return table(row_list, device)


def row_spans(segments: torch.Tensor, params: list[torch.Tensor]):
    """For the reference backend: ``(i, start, numel, offset)`` per row, ``start`` counted in ``params[i]``."""
    i, start = 0, 0
    for _, _, numel, offset in segments.cpu().tolist():
        while i < len(params) and start == params[i].numel():
            i, start = i + 1, 0
        yield i, start, numel, offset
        start += numel
