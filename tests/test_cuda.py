"""The CUDA kernels against the reference.

The raw ops run over the whole optimizer × averaging × dtype matrix on segment tables (``fastavg._segments``):
one tensor of each size, and several tensors in one launch (sizes below a pack, rows split at 65536 elements,
an unaligned view with a storage offset, an aligned view inside a larger storage, a channels_last tensor);
then flat state at misaligned offsets, more rows than the kernel's grid, an empty launch, a CUDA-graph capture
whose replays read new lr, step and decays, and the fused optimizers end to end. Every buffer is compared in
full, so memory outside the table's rows must stay as it was. Needs a GPU and an extension built with CUDA
kernels.
"""
import pytest
import torch
from helpers import AVERAGERS, OPTIMIZERS, SIZES, assert_close, run_against_reference

import fastavg
from fastavg import _backends, _segments
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
    "belay_switch": (RULE_BELAY, (0.05,), True, 0.5, 0.3),
    "lawa": (RULE_LAWA, (), False, 0.0, 0.0),
    "sema_switch": (RULE_EMA, (0.1,), True, 0.0, 0.0),
    "switch_alone": (RULE_NONE, (), True, 0.0, 0.0),
}

# The tensors of one launch. ("dense", shape); ("view", numel, param_offset, grad_offset): elements
# [offset, offset + numel) of a larger 1-D storage; ("channels_last", shape): dense, not contiguous.
ROW = _segments.ROW_NUMEL
LAYOUTS = {f"one_{n}": [("dense", (n,))] for n in SIZES}
LAYOUTS["mixed"] = [
    ("dense", (1,)), ("dense", (7,)), ("dense", (33, 31)),
    ("dense", (ROW,)), ("dense", (ROW + 1,)), ("dense", (3, 70001)),  # one row, two rows, four rows
    ("view", 4097, 3, 1),  # misaligned param and grad: the scalar path
    ("view", 1000, 8, 8),  # 32 (fp32) or 16 (bf16/fp16) bytes into its storage: still the vector path
    ("channels_last", (4, 6, 9, 7)),
    ("dense", (5,)),
]


def _round_up(n, multiple):
    return (n + multiple - 1) // multiple * multiple


def _tensor(spec, which, dtype, randn):
    """The param or grad (``which``) of ``spec``, and the tensor that owns its memory."""
    kind = spec[0]
    if kind == "dense":
        tensor = randn(spec[1], dtype=dtype)
        return tensor, tensor
    if kind == "view":
        _, numel, param_offset, grad_offset = spec
        offset = param_offset if which == "param" else grad_offset
        base = randn((offset + numel + 5,), dtype=dtype)
        return base[offset:offset + numel], base
    if kind == "channels_last":
        tensor = randn(spec[1], dtype=dtype).contiguous(memory_format=torch.channels_last)
        assert not tensor.is_contiguous() and _segments.is_dense(tensor)
        return tensor, tensor
    raise ValueError(spec)


def _case(optimizer, averaging, dtype, layout, skew=0, seed=0):
    """Realistic inputs of one raw-op call on ``DEVICE``, the same for the same arguments: params, grads and
    their table; flat state with each tensor's segment 128-byte aligned, then ``skew`` elements further;
    averages near θ, LAWA's sum near 3θ; random values in the gaps between segments."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype)

    specs = LAYOUTS[layout] if isinstance(layout, str) else layout
    params, grads, bases = [], [], []
    for spec in specs:
        param, param_base = _tensor(spec, "param", dtype, randn)
        grad, grad_base = _tensor(spec, "grad", dtype, randn)
        params.append(param)
        grads.append(grad)
        bases += [param_base, grad_base]
    offsets, end = [], 0
    for p in params:
        offsets.append(_round_up(end, 32) + skew)
        end = offsets[-1] + p.numel()
    flat_numel = _round_up(end, 32) + 32

    def flat(scale=1.0):
        return randn((flat_numel,), scale)

    def near_param(times=1.0, dtype=torch.float32):
        result = flat()
        for p, offset in zip(params, offsets):
            result[offset:offset + p.numel()] = times * _segments.memory_view(p).float() + randn((p.numel(),), 0.1)
        return result.to(dtype)

    optimizer_state, average_state = [], []
    if optimizer is not None:
        op_name, hyper, _ = OP_OPTIMIZERS[optimizer]
        if op_name == "adam_step_":
            exp_avg_sq = flat().abs() * 0.01 + 1e-4
            optimizer_state = [flat(0.1), exp_avg_sq]
            if hyper["amsgrad"]:  # about half of the elements keep their max, half take the new exp_avg_sq
                optimizer_state.append(exp_avg_sq * (flat(0.2) + 1.0).abs())
        elif hyper["momentum"] != 0:
            optimizer_state = [flat(0.1)]
    rule, weights, switch, _, inertia = OP_AVERAGINGS[averaging]
    if rule == RULE_LAWA:
        average_state = [near_param(3.0), near_param(dtype=dtype)]
    elif rule == RULE_BELAY:
        average_state = [near_param()] + ([flat(0.01)] if inertia > 0 else [])
    elif rule == RULE_EMA:
        average_state = [near_param() for _ in weights]
    elif switch:
        average_state = [near_param()]
    segments = _segments.build(params, grads if optimizer is not None else None, offsets, DEVICE)
    assert segments.shape[1] == 4 and segments.device.type == "cuda"
    return dict(params=params, grads=grads, segments=segments, optimizer_state=optimizer_state,
                average_state=average_state, bases=bases)


def _call(backend, optimizer, averaging, case, lr, step, average_weights):
    """One raw op on ``backend`` (torch.ops.fastavg or the reference) with the inputs of :func:`_case`."""
    rule, _, switch, reaction, inertia = OP_AVERAGINGS[averaging]
    averaging_args = dict(average_rule=rule, reaction=reaction, inertia=inertia, switch_to_average=switch)
    if optimizer is None:
        backend.average_(case["params"], case["segments"], case["average_state"], average_weights, **averaging_args)
        return
    op_name, hyper, _ = OP_OPTIMIZERS[optimizer]
    getattr(backend, op_name)(case["params"], case["grads"], case["segments"], case["optimizer_state"],
                              case["average_state"], lr, step, average_weights, **hyper, **averaging_args)


def _scalars(optimizer, averaging):
    step = OP_OPTIMIZERS[optimizer][2] if optimizer is not None else 0.0
    weights = OP_AVERAGINGS[averaging][1] or (0.0,)
    return (torch.tensor([LR], device=DEVICE), torch.tensor([step], device=DEVICE),
            torch.tensor(weights, device=DEVICE))


def _assert_same(actual, expected, dtype):
    """The memory of every param within the parameter dtype's tolerance (what lies outside the table's rows
    too), grads untouched, the optimizer state (computed from the same inputs in fp32 by both) within fp32's,
    the averages (fed from θ) within the parameter dtype's. Whole flat buffers: the gaps must not move."""
    for i, (a, e) in enumerate(zip(actual["bases"], expected["bases"])):
        if i % 2 == 0:
            assert_close(a, e, dtype)
        else:
            assert torch.equal(a, e)
    for a, e in zip(actual["optimizer_state"], expected["optimizer_state"]):
        assert_close(a, e, torch.float32)
    for a, e in zip(actual["average_state"], expected["average_state"]):
        assert_close(a, e, dtype)


def _check_op(optimizer, averaging, dtype, layout, skew=0):
    actual = _case(optimizer, averaging, dtype, layout, skew)
    expected = _case(optimizer, averaging, dtype, layout, skew)
    scalars = _scalars(optimizer, averaging)
    _call(torch.ops.fastavg, optimizer, averaging, actual, *scalars)
    _call(_backends.REFERENCE, optimizer, averaging, expected, *scalars)
    _assert_same(actual, expected, dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("averaging", list(OP_AVERAGINGS))
@pytest.mark.parametrize("optimizer", list(OP_OPTIMIZERS))
def test_step_op_matches_reference(optimizer, averaging, dtype, layout):
    _check_op(optimizer, averaging, dtype, layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("averaging", list(OP_AVERAGINGS))
def test_average_op_matches_reference(averaging, dtype, layout):
    _check_op(None, averaging, dtype, layout)


# Flat offsets 1, 3, 4 or 8 elements past a 128-byte boundary: fp32 state 4-, 12-, 16- or 32-byte aligned, a
# 16-bit LAWA ring slot 2-, 6-, 8- or 16-byte aligned. Rows whose buffers are not all 16-byte aligned take the
# scalar path.
@pytest.mark.parametrize("skew", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optimizer, averaging", [("adamw_amsgrad", "ema"), ("sgd_nesterov", "lawa"),
                                                  ("sgd_heavy_ball", "belay_inertia"), (None, "sema_switch"),
                                                  (None, "lawa")])
def test_misaligned_state_offsets_match_reference(optimizer, averaging, dtype, skew):
    _check_op(optimizer, averaging, dtype, "mixed", skew)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_more_rows_than_the_grid_match_reference(dtype):
    """At most one wave of resident blocks runs; with more rows than that, blocks stride over the rows."""
    props = torch.cuda.get_device_properties(DEVICE)
    resident_bound = props.multi_processor_count * (getattr(props, "max_threads_per_multi_processor", 2048) // 256)
    layout = [("dense", (1 + i % 9,)) for i in range(resident_bound + 37)] + [("dense", (2 * ROW + 3,))]
    _check_op("adamw", "ema", dtype, layout)


def test_empty_launch_is_a_no_op():
    lr, step, weights = _scalars("adamw", "ema")
    table = torch.empty((0, 4), dtype=torch.int64, device=DEVICE)
    state = [torch.empty(0, device=DEVICE) for _ in range(2)]
    torch.ops.fastavg.adam_step_([], [], table, state, [torch.empty(0, device=DEVICE)], lr, step, weights,
                                 **OP_OPTIMIZERS["adamw"][1], average_rule=RULE_EMA, reaction=0.0, inertia=0.0,
                                 switch_to_average=False)
    torch.cuda.synchronize()


def test_cuda_graph_replays_read_lr_step_and_decays_from_memory():
    """Capture adam_step_ once over a mixed table; each replay runs with the lr, step and EMA weights then in
    device memory."""
    dtype, optimizer, averaging = torch.bfloat16, "adamw_amsgrad", "ema"
    op_name, hyper, _ = OP_OPTIMIZERS[optimizer]
    case = _case(optimizer, averaging, dtype, "mixed")
    lr = torch.tensor([1e-2], device=DEVICE)
    step = torch.tensor([1.0], device=DEVICE)
    weights = torch.tensor([1.0, 1.0, 1.0], device=DEVICE)
    averaging_args = dict(average_rule=RULE_EMA, reaction=0.0, inertia=0.0, switch_to_average=False)

    def adam_step(backend, c):
        getattr(backend, op_name)(c["params"], c["grads"], c["segments"], c["optimizer_state"], c["average_state"],
                                  lr, step, weights, **hyper, **averaging_args)

    # Warm up on a side stream (as torch.cuda.graphs asks) and on a twin, so that replays start from `case`.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        adam_step(torch.ops.fastavg, _case(optimizer, averaging, dtype, "mixed"))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        adam_step(torch.ops.fastavg, case)

    expected = _case(optimizer, averaging, dtype, "mixed")
    g = torch.Generator().manual_seed(1)
    replays = [(1e-2, 1.0, (1.0, 1.0, 1.0)), (3e-3, 2.0, (0.5, 0.1, 0.01)), (0.0, 3.0, (0.2, 0.02, 0.002)),
               (2e-2, 10.0, (0.05, 0.005, 0.0005))]
    for lr_value, step_value, decay_weights in replays:
        lr.fill_(lr_value)
        step.fill_(step_value)
        weights.copy_(torch.tensor(decay_weights))
        for grad in case["grads"]:
            grad.copy_(torch.randn(grad.shape, generator=g).to(DEVICE, dtype))
        # The reference starts from the state the replay starts from.
        for name in ("bases", "optimizer_state", "average_state"):
            for e, a in zip(expected[name], case[name]):
                e.copy_(a)
        graph.replay()
        adam_step(_backends.REFERENCE, expected)
        _assert_same(case, expected, dtype)


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
