"""fastavg under the distributed engines: FSDP2, distributed checkpoints (DCP), ZeroRedundancyOptimizer, DDP.

Two ranks over gloo on the CPU, spawned once for the whole module (process start-up dominates): every check runs in
that one group and rank 0 records what it measured; the tests below assert on the records. Each case is compared
with one process on the full batch (each rank trains on its half; the loss is a mean, so the engines' averaged
gradients are the full batch's), and, where torch has one, with torch.optim under the same engine.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

import fastavg

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
STEPS = 4
FP32_TOLERANCE = 1e-5
DEADLINE_S = 300  # the whole group; it takes about 30 s on 2 cores


# --- the model, the data, one process ------------------------------------------------------------------
class _Net(torch.nn.Module):
    """Uneven shards on two ranks (7 and 3 rows, a 3-element bias) and a 1-element parameter that leaves
    rank 1 an empty shard."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(6, 7)
        self.second = torch.nn.Linear(7, 3)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.second(torch.tanh(self.first(x))) * self.scale


def _model() -> _Net:
    torch.manual_seed(0)
    return _Net()


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _half(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(WORLD)[rank]


def _loss(model, x, y):
    return (model(x) - y).square().mean()


def _train(model, opt, steps, rank=None, start=0, set_to_none=True):
    """``steps`` steps from step ``start``; ``rank`` None: the full batch, else that rank's half."""
    for step in range(start, start + steps):
        x, y = _batch(step)
        if rank is not None:
            x, y = _half(x, rank), _half(y, rank)
        opt.zero_grad(set_to_none=set_to_none)
        _loss(model, x, y).backward()
        opt.step()


def _one_process(make_opt, steps=STEPS):
    model = _model()
    opt = make_opt(model.parameters())
    _train(model, opt, steps)
    return model, opt


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _max_diff(ours, theirs) -> float:
    """Max |difference| over two lists of tensors (DTensors gathered; a collective on every rank)."""
    return max(float((_full(a).detach().float() - _full(b).detach().float()).abs().max()) for a, b in zip(
        list(ours), list(theirs)))


def _fsdp2(model, reshard_after_forward=True, mp_policy=None, mesh=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if mesh is not None:
        kwargs["mesh"] = mesh
    fully_shard(model.first, **kwargs)
    fully_shard(model.second, **kwargs)
    fully_shard(model, **kwargs)
    return model


# --- cases: each returns what rank 0 records ------------------------------------------------------------
def _adamw_ema(params):
    return fastavg.AdamW(params, lr=0.05, weight_decay=0.1, average=fastavg.EMA((0.9, 0.99)))


FSDP2_OPTIMIZERS = {
    "adamw_ema": _adamw_ema,
    "sgd_lawa": lambda params: fastavg.SGD(params, lr=0.1, momentum=0.9, nesterov=True,
                                           average=fastavg.LAWA(k=2, every=1)),
    "adam_belay": lambda params: fastavg.Adam(params, lr=0.05, amsgrad=True,
                                              average=fastavg.BELAY(0.9, reaction=0.5, inertia=0.5)),
    "sgd_sema": lambda params: fastavg.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01,
                                           average=fastavg.SEMA(0.5, switch_every=2)),
    "adamw_bema": lambda params: fastavg.AdamW(params, lr=0.05, average=fastavg.BEMA(update_freq=1, lag=1)),
    "adamw_power_ema": lambda params: fastavg.AdamW(params, lr=0.05, average=fastavg.PowerEMA((0.05, 0.2))),
}


def case_fsdp2(rank, tmp):
    from torch.distributed.tensor import DTensor

    record = {}
    for name, make_opt in FSDP2_OPTIMIZERS.items():
        for reshard in (True, False):
            model = _fsdp2(_model(), reshard_after_forward=reshard)
            opt = make_opt(model.parameters())
            _train(model, opt, STEPS, rank)
            ref_model, ref_opt = _one_process(make_opt)
            averages = opt.averaged_parameters()
            record[f"{name}/reshard={reshard}"] = {
                "params": _max_diff(model.parameters(), ref_model.parameters()),
                "averages": _max_diff(averages, ref_opt.averaged_parameters()),
                "dtensor_averages": all(isinstance(a, DTensor) and a.placements == p.placements
                                        for a, p in zip(averages, model.parameters())),
                "dtensor_state": all(isinstance(v, DTensor) for p in model.parameters()
                                     for k, v in opt.state[p].items() if k != "step"),
                "backends": opt.backends(),
            }
    # HSDP (a 2-D mesh: Replicate and Shard(0) placements), and gradients kept between steps
    # (zero_grad(set_to_none=False): the same addresses every step, so the cached segment tables are reused).
    from torch.distributed.device_mesh import init_device_mesh

    hsdp_mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    ref_model, ref_opt = _one_process(_adamw_ema)
    for label, mesh, set_to_none in (("hsdp", hsdp_mesh, True), ("kept_grads", None, False)):
        model = _fsdp2(_model(), mesh=mesh)
        opt = _adamw_ema(model.parameters())
        _train(model, opt, STEPS, rank, set_to_none=set_to_none)
        record[label] = {"params": _max_diff(model.parameters(), ref_model.parameters()),
                         "averages": _max_diff(opt.averaged_parameters(), ref_opt.averaged_parameters()),
                         "placements": str(next(model.parameters()).placements)}
    return record


def case_fsdp2_against_torch(rank, tmp):
    """fastavg.AdamW + EMA against torch.optim.AdamW with the EMA written out, both under FSDP2, in fp32 and with
    bf16 compute (MixedPrecisionPolicy, fp32 sharded parameters): the gradients are the same, so the steps are."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    record = {}
    for label, policy in (("fp32", None), ("bf16", MixedPrecisionPolicy(param_dtype=torch.bfloat16))):
        ours = _fsdp2(_model(), mp_policy=policy)
        opt = fastavg.AdamW(ours.parameters(), lr=0.05, weight_decay=0.1, average=fastavg.EMA(0.9))
        theirs = _fsdp2(_model(), mp_policy=policy)
        torch_opt = torch.optim.AdamW(theirs.parameters(), lr=0.05, weight_decay=0.1)
        ema = [p.detach().clone() for p in theirs.parameters()]
        for step in range(STEPS):
            for model, optimizer in ((ours, opt), (theirs, torch_opt)):
                _train(model, optimizer, 1, rank, start=step)
            with torch.no_grad():
                for e, p in zip(ema, theirs.parameters()):
                    e.lerp_(p, 0.1)
        ours_state, torch_state = opt.state_dict()["state"], torch_opt.state_dict()["state"]
        pairs = [(entry[k], torch_entry[k]) for entry, torch_entry in zip(ours_state.values(), torch_state.values())
                 for k in torch_entry]
        record[label] = {"params": _max_diff(ours.parameters(), theirs.parameters()),
                         "averages": _max_diff(opt.averaged_parameters(), ema),
                         "state_like_torch": _state_layout(ours_state) == _state_layout(torch_state),
                         "state_values": _max_diff(*zip(*pairs))}
    return record


def _state_layout(state: dict) -> list:
    """Per entry, torch.optim.AdamW's keys with their kind: DTensor placements, or a plain tensor's shape."""
    def kind(value):
        return str(value.placements) if hasattr(value, "placements") else f"plain {tuple(value.shape)}"

    return [{k: kind(v) for k, v in entry.items() if k in ("step", "exp_avg", "exp_avg_sq")}
            for entry in state.values()]


def _load_weights(model, tensors) -> torch.nn.Module:
    with torch.no_grad():
        for p, t in zip(model.parameters(), tensors):
            p.copy_(t)
    return model


def case_fsdp2_evaluation(rank, tmp):
    """swap_average for sharded evaluation (an evaluation forward leaves the root's parameters unsharded: training
    after the swap must still start from the raw weights), switch_to_average, and the full averaged weights
    gathered on rank 0 inside the swap."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = _fsdp2(_model())
    opt = _adamw_ema(model.parameters())
    ref_model, ref_opt = _one_process(_adamw_ema, STEPS)
    _train(model, opt, STEPS, rank)
    x, _ = _batch(99)
    with opt.swap_average(), torch.no_grad():
        output = model(_half(x, rank))
    with torch.no_grad():
        expected = _half(_load_weights(_model(), ref_opt.averaged_parameters())(x), rank)
    record = {"swap_output": float((output - expected).abs().max())}
    _train(model, opt, 2, rank, start=STEPS)
    _train(ref_model, ref_opt, 2, start=STEPS)
    record["after_swap_params"] = _max_diff(model.parameters(), ref_model.parameters())
    record["after_swap_averages"] = _max_diff(opt.averaged_parameters(), ref_opt.averaged_parameters())
    opt.switch_to_average()
    ref_opt.switch_to_average()
    _train(model, opt, 1, rank, start=STEPS + 2)
    _train(ref_model, ref_opt, 1, start=STEPS + 2)
    record["after_switch_params"] = _max_diff(model.parameters(), ref_model.parameters())
    # The README's recipe: the full averaged weights on rank 0's CPU, for save_pretrained.
    with opt.swap_average():
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        averaged = _load_weights(_model(), ref_opt.averaged_parameters()).state_dict()
        record["gathered"] = max(float((full[k] - v).abs().max()) for k, v in averaged.items())
        record["gathered_on_cpu"] = all(t.device.type == "cpu" and not hasattr(t, "placements") for t in full.values())
    sizes = [None] * WORLD
    dist.all_gather_object(sizes, len(full))
    record["gathered_sizes"] = sizes
    record["raw_after_gather"] = _max_diff(model.parameters(), ref_model.parameters())
    return record


def _dcp_state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _dcp_load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def case_dcp(rank, tmp):
    """Save after 2 steps with DCP, load into a fresh model and optimizer, 2 more steps: bit-exact with 4 steps in a
    row; the same through a full state dict on rank 0; a checkpoint written by one rank (its own 1-rank mesh) loads
    exactly on two."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import DeviceMesh

    record = {}
    make_opt = FSDP2_OPTIMIZERS["adamw_ema"]
    straight = _fsdp2(_model())
    straight_opt = make_opt(straight.parameters())
    _train(straight, straight_opt, STEPS, rank)

    path = os.path.join(tmp, "dcp_2_ranks")
    saved = _fsdp2(_model())
    saved_opt = make_opt(saved.parameters())
    _train(saved, saved_opt, 2, rank)
    dcp.save(_dcp_state(saved, saved_opt), checkpoint_id=path)
    resumed = _fsdp2(_model())
    resumed_opt = make_opt(resumed.parameters())
    _dcp_load(resumed, resumed_opt, path)
    _train(resumed, resumed_opt, 2, rank, start=2)
    record["2_to_2_params"] = _max_diff(resumed.parameters(), straight.parameters())
    record["2_to_2_averages"] = _max_diff(resumed_opt.averaged_parameters(), straight_opt.averaged_parameters())

    # A full state dict on rank 0 (cpu_offload), broadcast back into sharded state; a plain load_state_dict of it
    # is refused, naming the way that shards it.
    full_options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model = get_model_state_dict(saved, options=full_options)
    full_optim = get_optimizer_state_dict(saved, saved_opt, options=full_options)
    resumed = _fsdp2(_model())
    resumed_opt = make_opt(resumed.parameters())
    if rank == 0:
        try:
            resumed_opt.load_state_dict(full_optim)
        except ValueError as error:
            record["full_plain_load_error"] = str(error)
    broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(resumed, full_model, options=broadcast)
    set_optimizer_state_dict(resumed, resumed_opt, full_optim, options=broadcast)
    _train(resumed, resumed_opt, 2, rank, start=2)
    record["full_params"] = _max_diff(resumed.parameters(), straight.parameters())
    record["full_averages"] = _max_diff(resumed_opt.averaged_parameters(), straight_opt.averaged_parameters())

    # One rank trains on the full batch on a mesh of its own and saves; both ranks load: what they load is exactly
    # what was saved, and two more steps match the straight run (whose gradients were summed from two halves, so
    # to rounding).
    path = os.path.join(tmp, "dcp_1_rank")
    alone = dist.new_group([0])
    if rank == 0:
        single = _fsdp2(_model(), mesh=DeviceMesh.from_group(alone, "cpu"))
        single_opt = make_opt(single.parameters())
        _train(single, single_opt, 2)
        dcp.save(_dcp_state(single, single_opt), checkpoint_id=path, process_group=alone)
        saved = _everything(single, single_opt)
    dist.barrier()
    resumed = _fsdp2(_model())
    resumed_opt = make_opt(resumed.parameters())
    _dcp_load(resumed, resumed_opt, path)
    loaded = _everything(resumed, resumed_opt)
    if rank == 0:
        record["1_to_2_loaded"] = _max_diff(loaded, saved)
    _train(resumed, resumed_opt, 2, rank, start=2)
    record["1_to_2_then_2_steps_params"] = _max_diff(resumed.parameters(), straight.parameters())
    record["1_to_2_then_2_steps_averages"] = _max_diff(resumed_opt.averaged_parameters(),
                                                       straight_opt.averaged_parameters())
    return record


def _everything(model, opt) -> list[torch.Tensor]:
    """Parameters, optimizer state and averages, gathered (a collective), and the averaging step."""
    tensors = [_full(p) for p in model.parameters()]
    tensors += [_full(value) for p in model.parameters() for value in opt.state[p].values()]
    return tensors + [torch.tensor(float(opt.state_dict()["fastavg"]["step"]))]


def _flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _replicas_differ(model) -> float:
    """Max |difference| between this rank's weights and rank 0's (a collective)."""
    mine = _flat_weights(model)
    theirs = mine.clone()
    dist.broadcast(theirs, 0)
    difference = (mine - theirs).abs().max()
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    return float(difference)


def _zero(model, bucket_view, **kwargs):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fastavg.AdamW,
                                   parameters_as_bucket_view=bucket_view, lr=0.05, weight_decay=0.1, **kwargs)


def case_zero(rank, tmp):
    DDP = torch.nn.parallel.DistributedDataParallel
    record = {}
    ref_model, ref_opt = _one_process(_adamw_ema)
    ref_params = list(ref_model.parameters())
    for bucket_view in (False, True):
        model = _model()
        opt = _zero(model, bucket_view, average=fastavg.EMA((0.9, 0.99)))
        _train(DDP(model), opt, STEPS, rank)
        opt.consolidate_state_dict(to=0)
        entry = {"replicas": _replicas_differ(model),
                 "params": _max_diff(model.parameters(), ref_params)}
        if rank == 0:
            state = opt.state_dict()["state"]
            for k in (0, 1):
                entry[f"consolidated_average_{k}"] = _max_diff([state[i][f"average_{k}"] for i in range(len(ref_params))],
                                                               [ref_opt.state[p][f"average_{k}"] for p in ref_params])
        record[f"bucket_view={bucket_view}"] = entry
    record["resume"] = _zero_resume(rank, tmp)
    # flat_params=True: without bucket views it is exact; with them ZeRO and fastavg would both own the storage,
    # which is refused where a rank's partition puts two or more parameters in one of ZeRO's buckets (four equal
    # weights: two per rank, so that both ranks refuse).
    model = _model()
    opt = _zero(model, False, average=fastavg.EMA((0.9, 0.99)), flat_params=True)
    _train(DDP(model), opt, STEPS, rank)
    record["flat_params/bucket_view=False"] = {"replicas": _replicas_differ(model),
                                               "params": _max_diff(model.parameters(), ref_params)}
    weights = torch.nn.ParameterList(torch.nn.Parameter(torch.ones(5)) for _ in range(4))
    opt = _zero(weights, True, flat_params=True)
    for p in weights:
        p.grad = torch.ones(5)
    try:
        opt.step()
        record["flat_params/bucket_view=True"] = {"error": None}
    except RuntimeError as error:
        record["flat_params/bucket_view=True"] = {"error": str(error)}
    return record


def _zero_resume(rank, tmp):
    """ZeRO's own state dict resumes the optimizer rule exactly and refuses averages (it drops the averaging step);
    each rank's own optimizer state dict resumes everything."""
    DDP = torch.nn.parallel.DistributedDataParallel
    record = {}
    for average in (None, fastavg.EMA(0.9)):
        straight = _model()
        straight_opt = _zero(straight, True, average=average)
        _train(DDP(straight), straight_opt, STEPS, rank)
        saved = _model()
        saved_opt = _zero(saved, True, average=average)
        _train(DDP(saved), saved_opt, 2, rank)
        saved_opt.consolidate_state_dict(to=0)
        path = os.path.join(tmp, "zero.pt")
        if rank == 0:
            torch.save(saved_opt.state_dict(), path)
        dist.barrier()
        resumed = _load_weights(_model(), saved.parameters())
        resumed_opt = _zero(resumed, True, average=average)
        label = "ema" if average else "no_average"
        try:
            resumed_opt.load_state_dict(torch.load(path, weights_only=False))
        except RuntimeError as error:
            record[f"{label}/zero_load_error"] = str(error)
            resumed_opt.optim.load_state_dict(saved_opt.optim.state_dict())
        _train(DDP(resumed), resumed_opt, 2, rank, start=2)
        record[f"{label}/params"] = _max_diff(resumed.parameters(), straight.parameters())
        if average is not None:
            record[f"{label}/averages"] = _max_diff(resumed_opt.optim.averaged_parameters(),
                                                    straight_opt.optim.averaged_parameters())
        dist.barrier()
    return record


def case_ddp(rank, tmp):
    """Optimizer built before or after wrapping × gradient_as_bucket_view, and no_sync gradient accumulation."""
    DDP = torch.nn.parallel.DistributedDataParallel
    record = {}
    ref_model, ref_opt = _one_process(_adamw_ema)
    for built_before in (True, False):
        for bucket_view in (False, True):
            model = _model()
            opt = _adamw_ema(model.parameters()) if built_before else None
            ddp = DDP(model, gradient_as_bucket_view=bucket_view)
            opt = opt or _adamw_ema(ddp.parameters())
            _train(ddp, opt, STEPS, rank)
            record[f"built_before={built_before}/bucket_view={bucket_view}"] = {
                "params": _max_diff(model.parameters(), ref_model.parameters()),
                "averages": _max_diff(opt.averaged_parameters(), ref_opt.averaged_parameters()),
                "replicas": _replicas_differ(model)}
    # no_sync: two micro-batches per step, the first accumulated locally; the loss of each is halved, so a step's
    # gradient is the mean over the full batch, as in one process.
    model = _model()
    ddp = DDP(model)
    opt = _adamw_ema(ddp.parameters())
    for step in range(STEPS):
        x, y = (_half(t, rank) for t in _batch(step))
        opt.zero_grad()
        with ddp.no_sync():
            (_loss(ddp, x[:2], y[:2]) / 2).backward()
        (_loss(ddp, x[2:], y[2:]) / 2).backward()
        opt.step()
    record["no_sync"] = {"params": _max_diff(model.parameters(), ref_model.parameters()),
                         "averages": _max_diff(opt.averaged_parameters(), ref_opt.averaged_parameters()),
                         "replicas": _replicas_differ(model)}
    return record


def case_tensor_parallel_placements(rank, tmp):
    """DTensor parameters sharded on dim 1 and replicated (tensor parallelism's layouts), gradients placed like them:
    each rank steps its local part, as one process steps the whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(1)
    full = [torch.randn(3, 8, generator=g), torch.randn(5, generator=g)]
    placements = [(Shard(1),), (Replicate(),)]
    ours = [torch.nn.Parameter(distribute_tensor(t, mesh, pl)) for t, pl in zip(full, placements)]
    theirs = [torch.nn.Parameter(t.clone()) for t in full]
    opt, ref_opt = _adamw_ema(ours), _adamw_ema(theirs)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(200 + step)
        grads = [torch.randn(t.shape, generator=g) for t in full]
        for p, q, grad, pl in zip(ours, theirs, grads, placements):
            p.grad, q.grad = distribute_tensor(grad, mesh, pl), grad
        opt.step()
        ref_opt.step()
    return {"params": _max_diff(ours, theirs), "averages": _max_diff(opt.averaged_parameters(),
                                                                     ref_opt.averaged_parameters())}


# --- fastavg.AveragedModel on sharded models: oracles are the same model in one process, averaged by fastavg and,
# where it has the averager, by torch's AveragedModel; the model is trained by torch.optim.AdamW ----------------------
AVERAGED_MODEL_AVERAGERS = {
    "swa": {},
    "torch_ema": {"multi_avg_fn": get_ema_multi_avg_fn(0.9)},
    "ema_decays": {"average": fastavg.EMA((0.9, 0.99))},
    "belay": {"average": fastavg.BELAY(0.9, reaction=0.5, inertia=0.5)},
    "sema": {"average": fastavg.SEMA(0.5, switch_every=2)},
}


def _torch_adamw(params):
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


def _averaged_training(model, kwargs, rank=None, steps=STEPS):
    """``model`` trained by torch.optim.AdamW with an attached fastavg.AveragedModel; returns (opt, ema)."""
    opt = _torch_adamw(model.parameters())
    ema = fastavg.AveragedModel(model, **kwargs)
    ema.attach(opt)
    _train(model, opt, steps, rank)
    return opt, ema


def _all_averages(ema) -> list[torch.Tensor]:
    return [a for k in range(ema.average.num_outputs) for a in ema.averaged_parameters(k)]


def case_averaged_model(rank, tmp):
    """Shard-local averages under FSDP2 (per layer and root), HSDP and tensor parallelism, against one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    record = {}
    hsdp_mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    runs = [(name, kwargs, None) for name, kwargs in AVERAGED_MODEL_AVERAGERS.items()]
    runs.append(("hsdp", AVERAGED_MODEL_AVERAGERS["ema_decays"], hsdp_mesh))
    for name, kwargs, mesh in runs:
        model = _fsdp2(_model(), mesh=mesh)
        _, ema = _averaged_training(model, kwargs, rank)
        one = _model()
        one_opt = _torch_adamw(one.parameters())
        one_ema = fastavg.AveragedModel(one, **kwargs)
        one_ema.attach(one_opt)
        theirs = None
        if "average" not in kwargs:
            theirs = torch.optim.swa_utils.AveragedModel(one, **kwargs)
            one_opt.register_step_post_hook(lambda *args, theirs=theirs, one=one: theirs.update_parameters(one))
        _train(one, one_opt, STEPS)
        averages = ema.averaged_parameters()
        record[name] = {
            "averages": _max_diff(_all_averages(ema), _all_averages(one_ema)),
            "params": _max_diff(model.parameters(), one.parameters()),
            "torch": None if theirs is None else _max_diff(averages, theirs.module.parameters()),
            "dtensor_averages": all(isinstance(a, DTensor) and a.placements == p.placements
                                    and a.device_mesh == p.device_mesh for a, p in zip(averages, model.parameters())),
            "n_averaged": int(ema.n_averaged),
        }
    # Tensor parallelism: parameters sharded on dim 1 and replicated, moved by the same steps as in one process.
    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(1)
    full = [torch.randn(3, 8, generator=g), torch.randn(5, generator=g)]
    placements = [(Shard(1),), (Replicate(),)]
    sharded, one = torch.nn.Module(), torch.nn.Module()
    for k, (t, pl) in enumerate(zip(full, placements)):
        sharded.register_parameter(f"p{k}", torch.nn.Parameter(distribute_tensor(t, mesh, pl)))
        one.register_parameter(f"p{k}", torch.nn.Parameter(t.clone()))
    ema, one_ema = (fastavg.AveragedModel(m, average=fastavg.EMA((0.9, 0.99))) for m in (sharded, one))
    for step in range(STEPS):
        g = torch.Generator().manual_seed(200 + step)
        with torch.no_grad():
            for p, q, pl in zip(sharded.parameters(), one.parameters(), placements):
                delta = torch.randn(q.shape, generator=g)
                p.add_(distribute_tensor(delta, mesh, pl))
                q.add_(delta)
        ema.update_parameters(sharded)
        one_ema.update_parameters(one)
    record["tensor_parallel"] = {
        "averages": _max_diff(_all_averages(ema), _all_averages(one_ema)),
        "placements": [tuple(a.placements) == pl for a, pl in zip(ema.averaged_parameters(), placements)]}
    return record


def case_averaged_model_evaluation(rank, tmp):
    """swap_average and ema(...) on a model whose forward leaves unsharded parameters (reshard_after_forward=False),
    the full averages gathered on rank 0 inside the swap, and training on after the swap."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    kwargs = AVERAGED_MODEL_AVERAGERS["torch_ema"]
    model = _fsdp2(_model(), reshard_after_forward=False)
    opt, ema = _averaged_training(model, kwargs, rank)
    one = _model()
    one_opt, one_ema = _averaged_training(one, kwargs)
    x = _batch(99)[0]
    with torch.no_grad():
        expected = _half(one_ema.module(x), rank)
        model(_half(x, rank))  # leaves every FSDP module unsharded, holding the raw weights
    with ema.swap_average(model), torch.no_grad():
        swapped = model(_half(x, rank))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    record = {"swap_output": float((swapped - expected).abs().max())}
    if rank == 0:
        record["gathered"] = max(float((full[k] - v).abs().max()) for k, v in one_ema.module.state_dict().items())
        record["gathered_on_cpu"] = all(t.device.type == "cpu" and not hasattr(t, "placements") for t in full.values())
    modes = []
    hook = model.first.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    ema.eval()
    with torch.no_grad():
        record["forward_output"] = float((ema(_half(x, rank)) - expected).abs().max())
    hook.remove()
    record["forward_modes"] = (modes, model.training)
    _train(model, opt, 2, rank, start=STEPS)
    _train(one, one_opt, 2, start=STEPS)
    record["after_swap_params"] = _max_diff(model.parameters(), one.parameters())
    record["after_swap_averages"] = _max_diff(ema.averaged_parameters(), one_ema.averaged_parameters())
    try:
        record["module"] = type(ema.module).__name__
    except AttributeError as error:
        record["module"] = str(error)
    return record


def case_averaged_model_dcp(rank, tmp):
    """ema.state_dict() through dcp.save and dcp.load into a fresh AveragedModel (with the model and torch.optim.AdamW):
    two more updates equal four in a row, bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    def state(model, opt, ema):
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                "ema": ema.state_dict()}

    record = {}
    for name, average in (("ema_decays", fastavg.EMA((0.9, 0.99))), ("lawa", fastavg.LAWA(k=2, every=1))):
        straight = _fsdp2(_model())
        _, straight_ema = _averaged_training(straight, {"average": average}, rank)
        path = os.path.join(tmp, f"averaged_model_{name}")
        saved = _fsdp2(_model())
        saved_opt, saved_ema = _averaged_training(saved, {"average": average}, rank, steps=2)
        dcp.save(state(saved, saved_opt, saved_ema), checkpoint_id=path)
        resumed = _fsdp2(_model())
        resumed_opt = _torch_adamw(resumed.parameters())
        resumed_ema = fastavg.AveragedModel(resumed, average=average)
        resumed_ema.attach(resumed_opt)
        loaded = state(resumed, resumed_opt, resumed_ema)
        dcp.load(loaded, checkpoint_id=path)
        set_model_state_dict(resumed, loaded["model"])
        set_optimizer_state_dict(resumed, resumed_opt, loaded["optim"])
        resumed_ema.load_state_dict(loaded["ema"])
        _train(resumed, resumed_opt, 2, rank, start=2)
        averages = loaded["ema"]["fastavg_state"]["averages"]
        record[name] = {
            "params": _max_diff(resumed.parameters(), straight.parameters()),
            "averages": _max_diff(resumed_ema.averaged_parameters(), straight_ema.averaged_parameters()),
            "state": _max_diff(*zip(*[(entry[k], straight_ema.state_dict()["fastavg_state"]["averages"][n][k])
                                      for n, entry in averages.items() for k in entry])),
            "n_averaged": int(resumed_ema.n_averaged),
            "dtensor_state": all(isinstance(v, DTensor) for entry in averages.values() for v in entry.values()),
        }
    return record


def case_refusals(rank, tmp):
    """Parameters fastavg cannot step in place are refused at construction, naming the wrapper."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    record = {}
    mesh = init_device_mesh("cpu", (WORLD,))
    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(3), mesh, (Partial(),), run_check=False))
    fsdp1 = torch.nn.Parameter(torch.ones(3))
    fsdp1._fsdp_flattened = True  # what FSDP1 marks its FlatParameter and use_orig_params views with
    deepspeed = torch.nn.Parameter(torch.ones(3))
    deepspeed.ds_id = 0  # what DeepSpeed ZeRO-3 gives every parameter it partitions
    for name, p in (("partial", partial), ("fsdp1", fsdp1), ("deepspeed", deepspeed)):
        try:
            fastavg.AdamW([p])
            record[name] = None
        except NotImplementedError as error:
            record[name] = str(error)
    try:
        fastavg.AdamW(_fsdp2(_model()).parameters(), flat_params=True)
        record["flat_params"] = None
    except ValueError as error:
        record["flat_params"] = str(error)
    try:
        fastavg.AdamW(_fsdp2(_model()).parameters(), average=fastavg.PowerEMA(snapshot_every=1, snapshot_dir=tmp))
        record["power_ema_snapshots"] = None
    except NotImplementedError as error:
        record["power_ema_snapshots"] = str(error)
    averaged_model_arguments = {
        "use_buffers": {"use_buffers": True},
        "device": {"device": "meta"},
        "avg_fn": {"avg_fn": lambda average, p, n: average},
        "power_ema_snapshots": {"average": fastavg.PowerEMA(snapshot_every=1, snapshot_dir=tmp)},
    }
    for name, kwargs in averaged_model_arguments.items():
        try:
            fastavg.AveragedModel(_fsdp2(_model()), **kwargs)
            record[f"averaged_model/{name}"] = None
        except NotImplementedError as error:
            record[f"averaged_model/{name}"] = str(error)
    try:
        fastavg.AveragedModel(torch.nn.ParameterList([fsdp1]))
        record["averaged_model/fsdp1"] = None
    except NotImplementedError as error:
        record["averaged_model/fsdp1"] = str(error)
    # A model sharded otherwise (here: not at all) is refused at the update, before the average moves.
    ema = fastavg.AveragedModel(_fsdp2(_model()), average=fastavg.EMA(0.9))
    before = [_full(a).clone() for a in ema.averaged_parameters()]
    try:
        ema.update_parameters(_model())
        record["averaged_model/unsharded_update"] = None
    except ValueError as error:
        record["averaged_model/unsharded_update"] = str(error)
    try:
        ema.load_state_dict({"n_averaged": torch.tensor(3)})
        record["averaged_model/plain_load"] = None
    except ValueError as error:
        record["averaged_model/plain_load"] = str(error)
    record["averaged_model/unchanged"] = (int(ema.n_averaged), _max_diff(ema.averaged_parameters(), before))
    # A gradient sharded unlike its parameter holds other elements on this rank: refused at the step.
    sharded = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, (Shard(0),)))
    opt = fastavg.AdamW([sharded])
    sharded.grad = distribute_tensor(torch.ones(4, 2), mesh, (Replicate(),))
    try:
        opt.step()
        record["gradient_placements"] = None
    except RuntimeError as error:
        record["gradient_placements"] = str(error)
    return record


CASES = [case_fsdp2, case_fsdp2_against_torch, case_fsdp2_evaluation, case_dcp, case_zero, case_ddp,
         case_tensor_parallel_placements, case_averaged_model, case_averaged_model_evaluation, case_averaged_model_dcp,
         case_refusals]


def _worker(rank, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    records = {}
    try:
        for case in CASES:
            try:
                records[case.__name__] = case(rank, tmp)
            except Exception:  # noqa: BLE001 -- recorded: the other cases still run, the test shows the traceback
                records[case.__name__] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        if rank == 0:
            torch.save(records, os.path.join(tmp, "records.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def records():
    """Every case's record, from one spawned group. A rank stuck in a collective that the other never reaches
    (a case raising on one rank only) would wait for gloo's timeout case after case: the group gets a deadline."""
    with tempfile.TemporaryDirectory() as tmp:
        context = torch.multiprocessing.spawn(_worker, args=(_free_port(), tmp), nprocs=WORLD, join=False)
        deadline = time.monotonic() + DEADLINE_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the distributed cases did not finish in {DEADLINE_S} s: a rank is waiting in a "
                            "collective that another rank never reached")
        return torch.load(os.path.join(tmp, "records.pt"), weights_only=False)


def _case(records, name):
    record = records[name]
    assert "error" not in record, record.get("error")
    return record


# --- the tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FSDP2_OPTIMIZERS)
@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp2_steps_shards_like_one_process(records, name, reshard):
    record = _case(records, "case_fsdp2")[f"{name}/reshard={reshard}"]
    assert record["params"] <= FP32_TOLERANCE and record["averages"] <= FP32_TOLERANCE, record
    assert record["dtensor_averages"] and record["dtensor_state"], record
    assert record["backends"] == ["cpu"], record


@pytest.mark.parametrize("variant", ["hsdp", "kept_grads"])
def test_fsdp2_hsdp_and_kept_gradients(records, variant):
    record = _case(records, "case_fsdp2")[variant]
    assert record["params"] <= FP32_TOLERANCE and record["averages"] <= FP32_TOLERANCE, record
    expected = "(Replicate(), Shard(dim=0))" if variant == "hsdp" else "(Shard(dim=0),)"
    assert record["placements"] == expected, record


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp2_matches_torch_adamw_and_ema(records, precision):
    record = _case(records, "case_fsdp2_against_torch")[precision]
    assert record["params"] <= FP32_TOLERANCE and record["averages"] <= FP32_TOLERANCE, record
    assert record["state_like_torch"] and record["state_values"] <= FP32_TOLERANCE, record


def test_fsdp2_swap_average_gather_and_switch(records):
    record = _case(records, "case_fsdp2_evaluation")
    assert record["swap_output"] <= FP32_TOLERANCE, record
    assert record["gathered"] <= FP32_TOLERANCE and record["gathered_on_cpu"], record
    assert record["after_swap_params"] <= FP32_TOLERANCE and record["after_swap_averages"] <= FP32_TOLERANCE, record
    assert record["after_switch_params"] <= FP32_TOLERANCE, record
    assert record["gathered_sizes"] == [5, 0], record  # rank 0 alone gets the 5 tensors
    assert record["raw_after_gather"] <= FP32_TOLERANCE, record


def test_dcp_resumes_bit_exactly_on_two_ranks_and_from_one(records):
    record = _case(records, "case_dcp")
    assert record["2_to_2_params"] == 0.0 and record["2_to_2_averages"] == 0.0, record
    assert record["full_params"] == 0.0 and record["full_averages"] == 0.0, record
    assert "set_optimizer_state_dict" in record["full_plain_load_error"], record
    assert record["1_to_2_loaded"] == 0.0, record
    assert record["1_to_2_then_2_steps_params"] <= FP32_TOLERANCE, record
    assert record["1_to_2_then_2_steps_averages"] <= FP32_TOLERANCE, record


@pytest.mark.parametrize("bucket_view", [False, True])
def test_zero_redundancy_optimizer(records, bucket_view):
    record = _case(records, "case_zero")[f"bucket_view={bucket_view}"]
    assert record["replicas"] == 0.0, record
    assert record["params"] <= FP32_TOLERANCE, record
    assert record["consolidated_average_0"] <= FP32_TOLERANCE and record["consolidated_average_1"] <= FP32_TOLERANCE


def test_zero_flat_params(records):
    record = _case(records, "case_zero")
    exact = record["flat_params/bucket_view=False"]
    assert exact.get("replicas") == 0.0 and exact["params"] <= FP32_TOLERANCE, exact
    refused = record["flat_params/bucket_view=True"]["error"]
    assert refused is not None and "parameters_as_bucket_view" in refused and "flat_params=False" in refused, refused


def test_zero_resume(records):
    record = _case(records, "case_zero")["resume"]
    assert "no_average/zero_load_error" not in record, record
    assert record["no_average/params"] == 0.0, record
    assert "zero.optim.state_dict()" in record["ema/zero_load_error"], record
    assert record["ema/params"] == 0.0 and record["ema/averages"] == 0.0, record


@pytest.mark.parametrize("variant", ["built_before=True/bucket_view=False", "built_before=True/bucket_view=True",
                                     "built_before=False/bucket_view=False", "built_before=False/bucket_view=True",
                                     "no_sync"])
def test_ddp(records, variant):
    record = _case(records, "case_ddp")[variant]
    assert record["replicas"] == 0.0, record
    assert record["params"] <= FP32_TOLERANCE and record["averages"] <= FP32_TOLERANCE, record


def test_tensor_parallel_placements_step_their_local_parts(records):
    record = _case(records, "case_tensor_parallel_placements")
    assert record["params"] <= FP32_TOLERANCE and record["averages"] <= FP32_TOLERANCE, record


@pytest.mark.parametrize("name", [*AVERAGED_MODEL_AVERAGERS, "hsdp"])
def test_averaged_model_averages_shards_like_one_process(records, name):
    record = _case(records, "case_averaged_model")[name]
    assert record["averages"] <= FP32_TOLERANCE and record["params"] <= FP32_TOLERANCE, record
    assert record["torch"] is None or record["torch"] <= FP32_TOLERANCE, record
    assert record["dtensor_averages"] and record["n_averaged"] == STEPS, record


def test_averaged_model_tensor_parallel(records):
    record = _case(records, "case_averaged_model")["tensor_parallel"]
    assert record["averages"] <= FP32_TOLERANCE and record["placements"] == [True, True], record


def test_averaged_model_swap_average_forward_and_gather(records):
    record = _case(records, "case_averaged_model_evaluation")
    assert record["swap_output"] <= FP32_TOLERANCE and record["forward_output"] <= FP32_TOLERANCE, record
    assert record["forward_modes"] == ([False], True), record  # ema.eval() applies inside ema(...) only
    assert record["gathered"] <= FP32_TOLERANCE and record["gathered_on_cpu"], record
    assert record["after_swap_params"] <= FP32_TOLERANCE and record["after_swap_averages"] <= FP32_TOLERANCE, record
    assert "swap_average" in record["module"] and "deep-copied" in record["module"], record


@pytest.mark.parametrize("average", ["ema_decays", "lawa"])
def test_averaged_model_dcp_resumes_bit_exactly(records, average):
    record = _case(records, "case_averaged_model_dcp")[average]
    assert record["params"] == 0.0 and record["averages"] == 0.0 and record["state"] == 0.0, record
    assert record["n_averaged"] == STEPS and record["dtensor_state"], record


@pytest.mark.parametrize("name, words", [("partial", ["Partial", "tensor parallelism"]),
                                         ("fsdp1", ["FSDP1", "fully_shard"]),
                                         ("deepspeed", ["DeepSpeed"]),
                                         ("flat_params", ["flat_params", "fully_shard"]),
                                         ("averaged_model/use_buffers", ["use_buffers=False", "update_bn"]),
                                         ("averaged_model/device", ["device=", "drop"]),
                                         ("averaged_model/avg_fn", ["avg_fn", "average=fastavg.EMA"]),
                                         ("averaged_model/power_ema_snapshots", ["snapshot_every"]),
                                         ("averaged_model/fsdp1", ["FSDP1", "fully_shard"]),
                                         ("averaged_model/unsharded_update", ["update_parameters", "DTensor"]),
                                         ("averaged_model/plain_load", ["fastavg_state", "dcp.load"]),
                                         ("power_ema_snapshots", ["snapshot_every", "shards"]),
                                         ("gradient_placements", ["Replicate", "Shard(dim=0)"])])
def test_unsupported_wrappers_are_refused_at_construction(records, name, words):
    message = _case(records, "case_refusals")[name]
    assert message is not None and all(word in message for word in words), message


def test_averaged_model_refusal_changes_nothing(records):
    assert _case(records, "case_refusals")["averaged_model/unchanged"] == (0, 0.0)
