"""Parameters owned by distributed engines: what fastavg steps in place, and what it refuses.

fastavg's rules are element-wise, so a rank can step whatever part of a parameter it holds, provided that its
gradient holds the same elements. That is the case for:

- DDP and ZeroRedundancyOptimizer: plain tensors (ZeRO's ``parameters_as_bucket_view`` re-points ``p.data`` at
  its buckets; the segment table follows the new addresses);
- DTensor parameters (FSDP2's ``fully_shard``, HSDP, tensor parallelism) whose placements are ``Shard``/``Replicate``
  (FSDP2 + TP's strided shards too, which take 4 ranks and are not tested here): the kernels run on the local
  shard ``p._local_tensor`` and its gradient's
  local shard, and every state and average is published as a DTensor with the parameter's mesh and placements,
  as ``torch.optim`` keeps it, so that ``torch.distributed.checkpoint`` saves and reshards it.

Refused at construction, naming the wrapper: FSDP1 (``FlatParameter`` and the views of ``use_orig_params``: FSDP1
moves them in and out of its flat buffers), DeepSpeed ZeRO (its partitioned parameters hold no data outside its own
optimizer) and DTensors with a ``Partial`` placement (a pending sum, not the parameter's values).
"""
from __future__ import annotations

import torch

# (what the parameter is, why fastavg cannot step it and what to use instead)
_FSDP1 = ("an FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel) parameter",
          ("its flat parameters are moved in and out of FSDP1's buffers; use FSDP2 "
           "(torch.distributed.fsdp.fully_shard), which fastavg supports"))
_DEEPSPEED = ("a DeepSpeed ZeRO parameter",
              ("DeepSpeed partitions and owns it; use DeepSpeed's own optimizer, or FSDP2 "
               "(torch.distributed.fsdp.fully_shard) or ZeroRedundancyOptimizer with fastavg"))


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def check_parameter(p: torch.Tensor, what: str) -> None:
    """Raise if ``p`` belongs to an engine whose parameters fastavg cannot step in place; ``what`` names the user
    (``"fastavg.AdamW"``)."""
    if getattr(p, "_fsdp_flattened", False):
        wrapper, reason = _FSDP1
    elif hasattr(p, "ds_id"):  # every parameter DeepSpeed's ZeRO stage 3 partitions carries ds_id/ds_status
        wrapper, reason = _DEEPSPEED
    elif is_dtensor(p) and any(placement.is_partial() for placement in p.placements):
        wrapper = f"a DTensor parameter with placements {tuple(p.placements)} (tensor parallelism)"
        reason = ("a Partial placement holds a pending sum, not the parameter's values; redistribute it to Shard or "
                  "Replicate placements before building the optimizer")
    else:
        return
    raise NotImplementedError(f"{what} cannot step or average {wrapper}: {reason}")


def check_averager_on_shards(average, what: str) -> None:
    """Raise for what an averager cannot do on a rank's shards: PowerEMA's snapshot files would hold one rank's
    shards each, written by every rank into the same files."""
    if getattr(average, "snapshot_every", None) is not None:
        raise NotImplementedError(
            f"{what} with PowerEMA(snapshot_every={average.snapshot_every}) cannot write post-hoc snapshots of DTensor "
            "parameters (FSDP2's fully_shard, tensor parallelism): each rank holds only its shards. Drop "
            "snapshot_every (the PowerEMA averages themselves work on the shards; gather them inside "
            "`with opt.swap_average(k):` (an AveragedModel: `with ema.swap_average(model, index=k):`) with "
            "get_model_state_dict(..., full_state_dict=True))")


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor the kernels address for ``t``: a DTensor's local shard (no copy), else ``t``."""
    if t is None or not is_dtensor(t):
        return t
    return t._local_tensor


def _shifted(placement, by: int):
    """``placement`` for a tensor with ``by`` more leading dimensions (LAWA's ring of snapshots)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(placement, _StridedShard):
        return _StridedShard(placement.dim + by, split_factor=placement.split_factor)
    if isinstance(placement, Shard):
        return Shard(placement.dim + by)
    return placement


def like(p: torch.Tensor, local_tensor: torch.Tensor, leading: tuple[int, ...] = ()) -> torch.Tensor:
    """``local_tensor`` (this rank's part of a state of ``p``) as a DTensor laid out like the DTensor ``p``;
    ``leading`` dimensions (LAWA's ring) come before ``p``'s. The DTensor shares ``local_tensor``'s memory."""
    from torch.distributed.tensor import DTensor

    shape = torch.Size((*leading, *p.shape))
    stride = torch.empty(shape, device="meta").stride() if leading else p.stride()
    placements = tuple(_shifted(placement, len(leading)) for placement in p.placements)
    return DTensor.from_local(local_tensor, p.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def check_gradient(p: torch.Tensor, grad: torch.Tensor, where: str) -> None:
    """A DTensor parameter's gradient must hold the same elements on this rank (same placements)."""
    if not is_dtensor(grad) or tuple(grad.placements) != tuple(p.placements):
        got = (f"a DTensor with placements {tuple(grad.placements)}" if is_dtensor(grad)
               else f"a plain {type(grad).__name__}")
        raise RuntimeError(
            f"grad of {where} is {got}, but the parameter is a DTensor with placements {tuple(p.placements)}: "
            "fastavg steps each rank's local shard, so the gradient must be sharded like the parameter "
            "(redistribute it, or let FSDP2/tensor parallelism reduce it before opt.step())")
