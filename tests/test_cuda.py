"""The CUDA kernels against the reference: the raw ops over the whole optimizer × averaging × dtype × size
matrix (aligned flat buffers and unaligned sub-ranges), the fused optimizers end to end, and a CUDA-graph
capture whose replays read new lr, step and decays. Needs a GPU and an extension built with CUDA kernels."""
import pytest
import torch
from helpers import AVERAGERS, OPTIMIZERS, SIZES, assert_close, run_against_reference

import fastavg
from fastavg import _backends
from fastavg.averaging import RULE_BELAY, RULE_EMA, RULE_LAWA, RULE_NONE

if not torch.cuda.is_available():
    pytest.skip("no CUDA device is visible (torch.cuda.is_available() is False)", allow_module_level=True)
if fastavg.backend_status()["cuda"]:
    pytest.skip(f"the CUDA backend is unavailable: {fastavg.backend_status()['cuda']}", allow_module_level=True)

DEVICE = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LR = 0.01

# Raw-op optimizers: the op, its hyperparameters (schema names) and the step count it runs at.
OP_OPTIMIZERS = {
    "sgd": ("sgd_step_", dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                              heavy_ball=False), 3.0),
    "sgd_first_step": ("sgd_step_", dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
                                         maximize=False, heavy_ball=False), 1.0),
    "sgd_nesterov": ("sgd_step_", dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=True,
                                       heavy_ball=False), 5.0),
    "sgd_heavy_ball": ("sgd_step_", dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False,
                                         maximize=False, heavy_ball=True), 5.0),
    "sgd_heavy_ball_nesterov": ("sgd_step_", dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True,
                                                  maximize=True, heavy_ball=True), 5.0),
    "adam": ("adam_step_", dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled_weight_decay=False,
                                amsgrad=False, maximize=False), 3.0),
    "adam_amsgrad": ("adam_step_", dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01,
                                        decoupled_weight_decay=False, amsgrad=True, maximize=True), 7.0),
    "adamw": ("adam_step_", dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                                 amsgrad=False, maximize=False), 3.0),
    "adamw_amsgrad": ("adam_step_", dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                                         decoupled_weight_decay=True, amsgrad=True, maximize=False), 2.0),
}

# Raw-op averaging: (average_rule, weights, switch_to_average, reaction, inertia). EMA's rule also runs SWA
# (w = 1/n) and the copy phase before an averager's start (w = 1); SEMA is EMA plus the switch.
OP_AVERAGINGS = {
    "none": (RULE_NONE, (), False, 0.0, 0.0),
    "ema": (RULE_EMA, (0.1, 0.01, 0.001), False, 0.0, 0.0),
    "ema_8_decays": (RULE_EMA, tuple(0.5**k for k in range(1, 9)), False, 0.0, 0.0),
    "copy_phase": (RULE_EMA, (1.0,), False, 0.0, 0.0),
    "swa": (RULE_EMA, (1.0 / 3.0,), False, 0.0, 0.0),
    "belay": (RULE_BELAY, (0.05,), False, 1.0, 0.0),
    "belay_inertia": (RULE_BELAY, (0.05,), False, 0.5, 0.3),
    "lawa": (RULE_LAWA, (), False, 0.0, 0.0),
    "sema_switch": (RULE_EMA, (0.1,), True, 0.0, 0.0),
    "switch_alone": (RULE_NONE, (), True, 0.0, 0.0),
}


def _op_tensors(optimizer, averaging, numel, dtype, seed=0):
    """Realistic inputs of one raw-op call on ``DEVICE``: averages near θ, LAWA's sum near k·θ."""
    g = torch.Generator().manual_seed(seed)

    def randn(scale=1.0, dtype=torch.float32):
        return (torch.randn(numel, generator=g) * scale).to(DEVICE, dtype)

    param = randn(dtype=dtype)

    def near_param():
        return param.float() + randn(0.1)

    tensors = {"param": param, "grad": randn(dtype=dtype), "optimizer_state": [], "average_state": []}
    if optimizer is not None:
        op_name, hyper, _ = OP_OPTIMIZERS[optimizer]
        if op_name == "adam_step_":
            exp_avg_sq = randn().abs() * 0.01 + 1e-4
            tensors["optimizer_state"] = [randn(0.1), exp_avg_sq]
            if hyper["amsgrad"]:  # about half of the elements keep their max, half take the new exp_avg_sq
                tensors["optimizer_state"].append(exp_avg_sq * (randn(0.2) + 1.0).abs())
        elif hyper["momentum"] != 0:
            tensors["optimizer_state"] = [randn(0.1)]
    rule, weights, switch, _, inertia = OP_AVERAGINGS[averaging]
    if rule == RULE_LAWA:
        tensors["average_state"] = [3 * param.float() + randn(0.1), near_param().to(dtype)]
    elif rule == RULE_BELAY:
        tensors["average_state"] = [near_param()] + ([randn(0.01)] if inertia > 0 else [])
    elif rule == RULE_EMA:
        tensors["average_state"] = [near_param() for _ in weights]
    elif switch:
        tensors["average_state"] = [near_param()]
    return tensors


def _clone(tensors):
    return {name: [t.clone() for t in value] if isinstance(value, list) else value.clone()
            for name, value in tensors.items()}


def _sub_range(tensors, offset):
    return {name: [t[offset:] for t in value] if isinstance(value, list) else value[offset:]
            for name, value in tensors.items()}


def _call(backend, optimizer, averaging, tensors, lr, step, average_weights):
    """One raw op on ``backend`` (torch.ops.fastavg or the reference), with tensors from :func:`_op_tensors`."""
    rule, _, switch, reaction, inertia = OP_AVERAGINGS[averaging]
    averaging_args = dict(average_rule=rule, reaction=reaction, inertia=inertia, switch_to_average=switch)
    if optimizer is None:
        backend.average_(tensors["param"], tensors["average_state"], average_weights, **averaging_args)
        return
    op_name, hyper, _ = OP_OPTIMIZERS[optimizer]
    getattr(backend, op_name)(tensors["param"], tensors["grad"], tensors["optimizer_state"],
                              tensors["average_state"], lr, step, average_weights, **hyper, **averaging_args)


def _scalars(optimizer, averaging):
    step = OP_OPTIMIZERS[optimizer][2] if optimizer is not None else 0.0
    weights = OP_AVERAGINGS[averaging][1] or (0.0,)
    return (torch.tensor([LR], device=DEVICE), torch.tensor([step], device=DEVICE),
            torch.tensor(weights, device=DEVICE))


def _assert_op_results(actual, expected, dtype):
    """θ and everything fed from it within the parameter dtype's tolerance; the optimizer state, computed
    from the same inputs in fp32 by both, within fp32's."""
    assert_close(actual["param"], expected["param"], dtype)
    for a, e in zip(actual["optimizer_state"], expected["optimizer_state"]):
        assert_close(a, e, torch.float32)
    for a, e in zip(actual["average_state"], expected["average_state"]):
        assert_close(a, e, dtype)
    assert torch.equal(actual["grad"], expected["grad"])


def _check_op(optimizer, averaging, dtype, numel, offset=0):
    """The op on elements [offset, offset + numel) of fresh buffers; the elements before must stay as they were."""
    actual = _op_tensors(optimizer, averaging, numel + offset, dtype)
    expected = _clone(actual)
    scalars = _scalars(optimizer, averaging)
    _call(torch.ops.fastavg, optimizer, averaging, _sub_range(actual, offset), *scalars)
    _call(_backends.REFERENCE, optimizer, averaging, _sub_range(expected, offset), *scalars)
    _assert_op_results(actual, expected, dtype)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("averaging", list(OP_AVERAGINGS))
@pytest.mark.parametrize("optimizer", list(OP_OPTIMIZERS))
def test_step_op_matches_reference(optimizer, averaging, dtype, numel):
    _check_op(optimizer, averaging, dtype, numel)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("averaging", list(OP_AVERAGINGS))
def test_average_op_matches_reference(averaging, dtype, numel):
    _check_op(None, averaging, dtype, numel)


# Offsets that leave the buffers 2-, 6-, 8- or 16-byte aligned instead of 128: the kernels must take their
# scalar path where a 16-byte vector access would be misaligned, and touch nothing outside the range.
@pytest.mark.parametrize("offset", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optimizer, averaging", [("adamw_amsgrad", "ema"), ("sgd_nesterov", "lawa"),
                                                  ("sgd_heavy_ball", "belay_inertia"), (None, "sema_switch")])
def test_unaligned_sub_range_matches_reference(optimizer, averaging, dtype, offset):
    _check_op(optimizer, averaging, dtype, 4097, offset)


def test_cuda_graph_replays_read_lr_step_and_decays_from_memory():
    """Capture adam_step_ once; each replay runs with the lr, step and EMA weights then in device memory."""
    dtype, numel, optimizer, averaging = torch.bfloat16, 4097, "adamw_amsgrad", "ema"
    op_name, hyper, _ = OP_OPTIMIZERS[optimizer]
    tensors = _op_tensors(optimizer, averaging, numel, dtype)
    lr = torch.tensor([1e-2], device=DEVICE)
    step = torch.tensor([1.0], device=DEVICE)
    weights = torch.tensor([1.0, 1.0, 1.0], device=DEVICE)

    def adam_step(t):
        torch.ops.fastavg.adam_step_(t["param"], t["grad"], t["optimizer_state"], t["average_state"], lr, step,
                                     weights, **hyper, average_rule=RULE_EMA, reaction=0.0, inertia=0.0,
                                     switch_to_average=False)

    # Warm up on a side stream (as torch.cuda.graphs asks) and on copies, so that replays start from `tensors`.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        adam_step(_clone(tensors))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        adam_step(tensors)

    g = torch.Generator().manual_seed(1)
    replays = [(1e-2, 1.0, (1.0, 1.0, 1.0)), (3e-3, 2.0, (0.5, 0.1, 0.01)), (0.0, 3.0, (0.2, 0.02, 0.002)),
               (2e-2, 10.0, (0.05, 0.005, 0.0005))]
    for lr_value, step_value, decay_weights in replays:
        lr.fill_(lr_value)
        step.fill_(step_value)
        weights.copy_(torch.tensor(decay_weights))
        tensors["grad"].copy_(torch.randn(numel, generator=g).to(dtype))
        expected = _clone(tensors)
        graph.replay()
        getattr(_backends.REFERENCE, op_name)(
            expected["param"], expected["grad"], expected["optimizer_state"], expected["average_state"], lr, step,
            weights, **hyper, average_rule=RULE_EMA, reaction=0.0, inertia=0.0, switch_to_average=False)
        _assert_op_results(tensors, expected, dtype)


# --- the fused optimizers end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", SIZES + ["many"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("averager", list(AVERAGERS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fused_optimizer_matches_reference(optimizer, averager, dtype, layout):
    run_against_reference("cuda", optimizer, averager, layout, dtype, device=DEVICE)


@pytest.mark.parametrize("averager", list(AVERAGERS))
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_torch", "sgd_heavy_ball"])
def test_missing_grads_split_launches_like_reference(optimizer, averager):
    run_against_reference("cuda", optimizer, averager, "many", torch.float32, device=DEVICE,
                          skip=lambda i, step: (i // 7 + step) % 3 == 0)


def test_auto_picks_cuda_kernels_when_triton_is_unavailable():
    triton_reason = fastavg.backend_status()["triton"]
    if not triton_reason:
        pytest.skip("Triton is available, so backend='auto' picks it on CUDA tensors")
    params = [torch.randn(7, device=DEVICE, requires_grad=True)]
    assert fastavg.AdamW(params, backend="auto").backends() == ["cuda"]


def test_capturing_the_optimizer_step_raises_clearly():
    params = [torch.randn(7, device=DEVICE, requires_grad=True)]
    opt = fastavg.AdamW(params, average=fastavg.EMA(0.9), backend="cuda")
    params[0].grad = torch.randn_like(params[0])
    opt.step()  # warm up outside the graph, as torch advises before any capture
    before = params[0].detach().clone()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    assert torch.equal(params[0].detach(), before)
