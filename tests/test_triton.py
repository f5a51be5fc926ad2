"""The Triton backend against the reference: every op of the kernel matrix, then whole optimizers.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before fastavg defines its Triton kernels), so CI exercises every kernel; with a GPU the same tests
run compiled, and the torch.compile and CUDA-graph tests run too.
"""
import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

from helpers import AVERAGERS, make_params, run_against_reference, tolerance  # noqa: E402
from helpers import OPTIMIZERS as HELPER_OPTIMIZERS  # noqa: E402

import fastavg  # noqa: E402
from fastavg import _backends, _triton  # noqa: E402
from fastavg.averaging import RULE_BELAY, RULE_EMA, RULE_LAWA, RULE_NONE  # noqa: E402

TRITON, _UNAVAILABLE = _triton.backend()
if TRITON is None:
    pytest.skip(f"the Triton backend is unavailable: {_UNAVAILABLE}", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: torch.compile, CUDA graphs and backend='auto' use Triton's compiled kernels, "
           "which the interpreter does not",
)


def _assert_close(actual, expected, name, param_dtype=torch.float32, param_scale=0.0, in_param_units=False):
    """``actual`` matches the reference's ``expected``, within ``helpers.tolerance`` of the dtypes involved.

    Any value may differ by fp32 rounding: fp32's rtol, and for values that cancel to near zero fp32's atol times
    the scale they were computed at: the buffer's largest value, or the parameters' (``param_scale``) for
    buffers in the parameters' units (averages, BELAY's velocity, LAWA's sums). A bf16/fp16 value may differ by
    one ulp of its dtype: the kernel's fp32 θ and the reference's (torch's CPU kernels fuse multiply-adds) may
    round to it in different directions. On the rare elements where that happened, the fp32 values computed
    from θ differ by up to one parameter ulp at the parameters' scale; everywhere else they match at fp32 level.
    """
    fp32 = tolerance(torch.float32)
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    if in_param_units:
        scale = max(scale, param_scale)
    rtol, atol = fp32["rtol"], fp32["atol"] * scale + 1e-30
    if actual.dtype != torch.float32:
        rtol = tolerance(actual.dtype)["rtol"]
    elif param_dtype != torch.float32:
        beyond = int((~torch.isclose(actual, expected, rtol=rtol, atol=atol)).sum())
        assert beyond <= actual.numel() // 100 + 1, f"{name}: {beyond} of {actual.numel()} elements beyond fp32 level"
        ulp = tolerance(param_dtype)
        rtol, atol = ulp["rtol"], atol + ulp["atol"] * param_scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# --- op level: one flat buffer, the Triton op and the reference op on the same inputs ----------------
# Dyadic hyperparameters (0.875, 2**-4, ...) make products like lr·λ and differences like 1 − β exact in
# fp32 and float64 alike: the kernels take them as fp32 as the C++ ones do, the reference as Python floats.
OPTIMIZERS = {
    "sgd": dict(op="sgd", momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                heavy_ball=False),
    "sgd_momentum_dampening_decay": dict(op="sgd", momentum=0.875, dampening=0.25, weight_decay=0.0625,
                                         nesterov=False, maximize=False, heavy_ball=False),
    "sgd_nesterov_maximize": dict(op="sgd", momentum=0.875, dampening=0.0, weight_decay=0.0, nesterov=True,
                                  maximize=True, heavy_ball=False),
    "heavy_ball_decay_maximize": dict(op="sgd", momentum=0.0, dampening=0.0, weight_decay=0.0625, nesterov=False,
                                      maximize=True, heavy_ball=True),
    "heavy_ball_momentum": dict(op="sgd", momentum=0.875, dampening=0.0, weight_decay=0.0, nesterov=False,
                                maximize=False, heavy_ball=True),
    "heavy_ball_nesterov_decay": dict(op="sgd", momentum=0.875, dampening=0.0, weight_decay=0.0625, nesterov=True,
                                      maximize=False, heavy_ball=True),
    "adam": dict(op="adam", beta1=0.875, beta2=0.984375, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                 amsgrad=False, maximize=False),
    "adam_l2_amsgrad_maximize": dict(op="adam", beta1=0.875, beta2=0.984375, eps=1e-8, weight_decay=0.0625,
                                     decoupled_weight_decay=False, amsgrad=True, maximize=True),
    "adamw": dict(op="adam", beta1=0.875, beta2=0.984375, eps=1e-8, weight_decay=0.0625,
                  decoupled_weight_decay=True, amsgrad=False, maximize=False),
    "adamw_amsgrad": dict(op="adam", beta1=0.75, beta2=0.9375, eps=1e-6, weight_decay=0.0625,
                          decoupled_weight_decay=True, amsgrad=True, maximize=False),
}

# What one step's averaging does, as fastavg.averaging's plans hand it to the ops. ``state`` names the
# buffers of average_state; ``weights`` are the first step's (the second step halves them).
AVERAGES = {
    "none": dict(rule=RULE_NONE, state=[], weights=[]),
    "ema": dict(rule=RULE_EMA, state=["average"], weights=[0.01]),
    "ema_8_decays": dict(rule=RULE_EMA, state=["average"] * 8,
                         weights=[1.0, 0.75, 0.5, 0.4999, 1 / 3, 0.1, 0.01, 0.001]),
    "swa": dict(rule=RULE_EMA, state=["average"], weights=[1 / 3]),
    "belay": dict(rule=RULE_BELAY, state=["average"], weights=[0.125], reaction=0.5),
    "belay_inertia": dict(rule=RULE_BELAY, state=["average", "velocity"], weights=[0.125], reaction=0.5,
                          inertia=0.75),
    "lawa": dict(rule=RULE_LAWA, state=["lawa_sum", "ring_slot"], weights=[]),
    "sema_switch": dict(rule=RULE_EMA, state=["average"], weights=[0.01], switch=True),
    "switch": dict(rule=RULE_NONE, state=["average"], weights=[], switch=True),
}

STEPS = [(0.01, 1.0), (0.003, 2.0)]  # (lr, step): the first step and a later one


def _make_buffers(optimizer, average, numel, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(scale=1.0, dtype=torch.float32):
        return (torch.randn(numel, generator=g) * scale).to(dtype).to(DEVICE)

    param = randn(dtype=dtype)
    buffers = {"param": param, "grad": randn(dtype=dtype), "optimizer_state": [], "average_state": []}
    if optimizer is not None and optimizer["op"] == "adam":
        count = 3 if optimizer["amsgrad"] else 2
        buffers["optimizer_state"] = [randn(0.1), randn(0.01).abs(), randn(0.01).abs()][:count]
    elif optimizer is not None and optimizer["momentum"] != 0:
        buffers["optimizer_state"] = [randn(0.1)]
    make = {
        "average": lambda: param.float() + randn(0.1),
        "velocity": lambda: randn(0.01),
        "lawa_sum": lambda: randn(3.0),
        "ring_slot": lambda: randn(dtype=dtype),
    }
    buffers["average_state"] = [make[kind]() for kind in average["state"]]
    return buffers


def _clone(buffers):
    return {name: [t.clone() for t in value] if isinstance(value, list) else value.clone()
            for name, value in buffers.items()}


def _call(backend, optimizer, average, buffers, lr, step, weights):
    b = buffers
    averaging = (average["rule"], average.get("reaction", 0.0), average.get("inertia", 0.0),
                 average.get("switch", False))
    if optimizer is None:
        backend.average_(b["param"], b["average_state"], weights, *averaging)
    elif optimizer["op"] == "adam":
        backend.adam_step_(b["param"], b["grad"], b["optimizer_state"], b["average_state"], lr, step, weights,
                           optimizer["beta1"], optimizer["beta2"], optimizer["eps"], optimizer["weight_decay"],
                           optimizer["decoupled_weight_decay"], optimizer["amsgrad"], optimizer["maximize"],
                           *averaging)
    else:
        backend.sgd_step_(b["param"], b["grad"], b["optimizer_state"], b["average_state"], lr, step, weights,
                          optimizer["momentum"], optimizer["dampening"], optimizer["weight_decay"],
                          optimizer["nesterov"], optimizer["maximize"], optimizer["heavy_ball"], *averaging)


def _assert_buffers_close(ours, theirs, where):
    param = theirs["param"]
    param_scale = float(param.abs().max()) if param.numel() else 0.0
    for name, value in ours.items():
        tensors = value if isinstance(value, list) else [value]
        expected = theirs[name] if isinstance(value, list) else [theirs[name]]
        for i, (actual, wanted) in enumerate(zip(tensors, expected)):
            _assert_close(actual, wanted, f"{where}: {name}[{i}]", param.dtype, param_scale,
                          in_param_units=name != "optimizer_state")


def _check_against_reference(optimizer, average, dtype, numel, seed=0):
    ours = _make_buffers(optimizer, average, numel, dtype, seed)
    theirs = _clone(ours)
    for i, (lr, step) in enumerate(STEPS):
        weights = torch.tensor([w / (1 + i) for w in average["weights"]] or [0.0], device=DEVICE)
        scalars = (torch.tensor([lr], device=DEVICE), torch.tensor([step], device=DEVICE), weights)
        _call(TRITON, optimizer, average, ours, *scalars)
        _call(_backends.REFERENCE, optimizer, average, theirs, *scalars)
        _assert_buffers_close(ours, theirs, f"step {i + 1}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fused_step_matches_reference(optimizer, average, dtype):
    _check_against_reference(OPTIMIZERS[optimizer], AVERAGES[average], dtype, numel=1025)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("average", AVERAGES)
def test_average_matches_reference(average, dtype):
    _check_against_reference(None, AVERAGES[average], dtype, numel=1025)


@pytest.mark.parametrize("numel", [0, 1, 7, 1023, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optimizer, average", [("adamw_amsgrad", "ema_8_decays"), ("heavy_ball_momentum", "lawa"),
                                                ("sgd_momentum_dampening_decay", "belay_inertia")])
def test_odd_sizes(optimizer, average, dtype, numel):
    _check_against_reference(OPTIMIZERS[optimizer], AVERAGES[average], dtype, numel, seed=numel)


def test_ops_check_their_arguments():
    b = _make_buffers(OPTIMIZERS["adam"], AVERAGES["ema"], 7, torch.float32)
    lr, step, weights = (torch.ones(1, device=DEVICE) for _ in range(3))
    with pytest.raises(RuntimeError, match="optimizer_state must hold 2 to 2"):
        TRITON.adam_step_(b["param"], b["grad"], b["optimizer_state"][:1], b["average_state"], lr, step, weights,
                          0.9, 0.999, 1e-8, 0.0, False, False, False, RULE_EMA, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="grad must be"):
        TRITON.adam_step_(b["param"], b["grad"].double(), b["optimizer_state"], b["average_state"], lr, step,
                          weights, 0.9, 0.999, 1e-8, 0.0, False, False, False, RULE_EMA, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="cannot also switch"):
        TRITON.average_(b["param"], [b["average_state"][0], b["param"].clone()], weights, RULE_LAWA, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="momentum buffer exactly when momentum != 0"):
        TRITON.sgd_step_(b["param"], b["grad"], [], [], lr, step, weights, 0.9, 0.0, 0.0, False, False, False,
                         RULE_NONE, 0.0, 0.0, False)


def _arguments(schema):
    # triton_op writes Python's int as SymInt where TORCH_LIBRARY's schema says int.
    return [(a.name, str(a.type).replace("SymInt", "int"), a.alias_info is not None and a.alias_info.is_write)
            for a in schema.arguments]


@pytest.mark.parametrize("name, written", [("adam_step_", {"param", "optimizer_state", "average_state"}),
                                           ("sgd_step_", {"param", "optimizer_state", "average_state"}),
                                           ("average_", {"param", "average_state"})])
def test_ops_have_the_schemas_of_the_cpp_ops(name, written):
    arguments = _arguments(getattr(torch.ops.fastavg_triton, name).default._schema)
    assert {arg for arg, _, is_written in arguments if is_written} == written
    if _backends._EXTENSION is not None:
        assert arguments == _arguments(getattr(torch.ops.fastavg, name).default._schema)


# --- end to end: the fused optimizers on the Triton backend against fastavg.reference -----------------
# helpers' optimizers and averagers on 300 tensors of mixed shapes, as for the other backends.
@pytest.mark.parametrize("averager", list(AVERAGERS))
@pytest.mark.parametrize("optimizer", list(HELPER_OPTIMIZERS))
def test_optimizer_matches_reference(optimizer, averager):
    run_against_reference("triton", optimizer, averager, "many", torch.float32, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("averager", ["ema", "belay", "lawa", "sema"])
def test_half_precision_adamw_matches_reference(averager, dtype):
    run_against_reference("triton", "adamw", averager, "many", dtype, device=DEVICE)


@pytest.mark.parametrize("averager", ["ema_every", "lawa", "sema"])
def test_missing_grads_split_launches_like_reference(averager):
    # Parameters without a gradient split a bucket into several launches, some of them averaging alone.
    run_against_reference("triton", "adamw", averager, "many", torch.float32, device=DEVICE,
                          skip=lambda i, step: (i // 7 + step) % 3 == 0)


# --- GPU only: the compiled kernels under torch.compile and in CUDA graphs --------------------------
def _adam_ema_call(backend, buffers, lr, step, weights):
    _call(backend, OPTIMIZERS["adamw_amsgrad"], AVERAGES["ema_8_decays"], buffers, lr, step, weights)


def _scalars(lr, step, i):
    weights = [w / (1 + i) for w in AVERAGES["ema_8_decays"]["weights"]]
    return (torch.tensor([lr], device=DEVICE), torch.tensor([step], device=DEVICE),
            torch.tensor(weights, device=DEVICE))


@requires_cuda
def test_auto_picks_triton_for_cuda_parameters():
    params = [p.detach().cuda().requires_grad_() for p in make_params(7, torch.float32)]
    assert fastavg.AdamW(params, average=fastavg.EMA(0.9), backend="auto").backends() == ["triton"]


@requires_cuda
def test_torch_compile_fullgraph_matches_reference():
    ours = _make_buffers(OPTIMIZERS["adamw_amsgrad"], AVERAGES["ema_8_decays"], 4097, torch.bfloat16)
    theirs = _clone(ours)

    @torch.compile(fullgraph=True)
    def compiled_step(param, grad, optimizer_state, average_state, lr, step, weights):
        buffers = dict(param=param, grad=grad, optimizer_state=optimizer_state, average_state=average_state)
        _adam_ema_call(TRITON, buffers, lr, step, weights)

    def check_step(i, lr, step):
        scalars = _scalars(lr, step, i)
        compiled_step(ours["param"], ours["grad"], ours["optimizer_state"], ours["average_state"], *scalars)
        _adam_ema_call(_backends.REFERENCE, theirs, *scalars)
        _assert_buffers_close(ours, theirs, f"step {i + 1}")

    check_step(0, *STEPS[0])
    with torch.compiler.set_stance("fail_on_recompile"):  # a new lr, step and weights are values, not graphs
        check_step(1, *STEPS[1])


@requires_cuda
def test_cuda_graph_replay_reads_new_scalars():
    ours = _make_buffers(OPTIMIZERS["adamw_amsgrad"], AVERAGES["ema_8_decays"], 4097, torch.float32)
    theirs = _clone(ours)
    lr, step, weights = _scalars(0.0, 1.0, 0)
    warmup = torch.cuda.Stream()
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):  # compiles the kernel outside the capture
        _adam_ema_call(TRITON, _clone(ours), lr, step, weights)
    torch.cuda.current_stream().wait_stream(warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _adam_ema_call(TRITON, ours, lr, step, weights)
    for i, (lr_value, step_value) in enumerate(STEPS + [(0.001, 3.0)]):
        new_lr, new_step, new_weights = _scalars(lr_value, step_value, i)
        lr.copy_(new_lr)
        step.copy_(new_step)
        weights.copy_(new_weights)
        graph.replay()
        _adam_ema_call(_backends.REFERENCE, theirs, new_lr, new_step, new_weights)
        _assert_buffers_close(ours, theirs, f"replay {i + 1}")
