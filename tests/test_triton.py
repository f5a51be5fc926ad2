"""The Triton backend against the reference: every op of the kernel matrix, then whole optimizers.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before fastavg defines its Triton kernels), so CI exercises every kernel; with a GPU the same tests
run compiled, and the torch.compile and CUDA-graph tests run too. The interpreter ignores pointer hints and vector
widths: test_triton_compile.py checks the compiled code.
"""
import math

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

from helpers import AVERAGERS, make_params, run_against_reference, tolerance  # noqa: E402
from helpers import OPTIMIZERS as HELPER_OPTIMIZERS  # noqa: E402

import fastavg  # noqa: E402
from fastavg import _backends, _segments, _triton  # noqa: E402
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


# --- op level: the Triton op and the reference op on the same inputs -----------------------------------
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

# The parameters of one op call, as a bucket hands them over: several tensors that stay in their own memory,
# reached through the segment table. ``aligned``/``unaligned``: 16-byte aligned or not (a view with a storage
# offset), which decides the kernel's path per row; ``channels_last`` is dense but not contiguous.
# (numel, kind of param, kind of grad)
MIXED = [(1, "aligned", "aligned"), (7, "aligned", "aligned"), (1025, "aligned", "aligned"),
         (300, "unaligned", "aligned"), ((2, 3, 5, 4), "channels_last", "channels_last"),
         (33, "aligned", "unaligned")]
OFFSET_ALIGNMENT = 32  # elements: each segment's state starts on a 128-byte boundary, zero padding in between


def _tensor(shape, kind, values):
    """A tensor of ``shape`` laid out as ``kind`` whose memory holds ``values`` (1-D, in memory order)."""
    numel = values.numel()
    if kind == "unaligned":  # storage offset 1: 4 or 2 bytes past a 16-byte boundary
        t = torch.zeros(numel + 1, dtype=values.dtype, device=values.device)[1:]
    elif kind == "channels_last":
        t = torch.zeros(shape, dtype=values.dtype, device=values.device).to(memory_format=torch.channels_last)
    else:
        t = torch.zeros(shape, dtype=values.dtype, device=values.device)
    _segments.memory_view(t).copy_(values)
    return t


def _twin(t):
    """A copy of ``t`` in memory of its own, with ``t``'s shape, strides and storage offset."""
    storage = torch.zeros(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device=t.device)
    twin = storage.as_strided(t.shape, t.stride(), t.storage_offset())
    twin.copy_(t)
    return twin


def _make_buffers(optimizer, average, layout, dtype, seed=0, packed=False):
    """A call's inputs for the tensors of ``layout`` (``MIXED``'s form); state offsets 32-element aligned with
    zero padding between segments, or back to back if ``packed``."""
    g = torch.Generator().manual_seed(seed)

    def randn(numel, scale=1.0, dtype=torch.float32):
        return (torch.randn(numel, generator=g) * scale).to(dtype).to(DEVICE)

    params, grads, offsets, used = [], [], [], []
    offset = 0
    for shape, param_kind, grad_kind in layout:
        numel = math.prod(shape) if isinstance(shape, tuple) else shape
        params.append(_tensor(shape, param_kind, randn(numel, dtype=dtype)))
        grads.append(_tensor(shape, grad_kind, randn(numel, dtype=dtype)))
        offsets.append(offset)
        used.append((offset, numel))
        offset += numel if packed else -(-numel // OFFSET_ALIGNMENT) * OFFSET_ALIGNMENT
    flat_numel = offset + OFFSET_ALIGNMENT  # padding after the last segment too
    padding = torch.ones(flat_numel, dtype=torch.bool, device=DEVICE)
    for start, numel in used:
        padding[start:start + numel] = False

    def flat(make, dtype=torch.float32):
        """A flat buffer: ``make(i, numel)`` in each segment, zero in the padding."""
        buffer = torch.zeros(flat_numel, dtype=dtype, device=DEVICE)
        for i, (start, numel) in enumerate(used):
            buffer[start:start + numel] = make(i, numel)
        return buffer

    buffers = {"params": params, "grads": grads, "optimizer_state": [], "average_state": []}
    if optimizer is not None and optimizer["op"] == "adam":
        count = 3 if optimizer["amsgrad"] else 2
        makers = [lambda i, n: randn(n, 0.1), lambda i, n: randn(n, 0.01).abs(), lambda i, n: randn(n, 0.01).abs()]
        buffers["optimizer_state"] = [flat(make) for make in makers[:count]]
    elif optimizer is not None and optimizer["momentum"] != 0:
        buffers["optimizer_state"] = [flat(lambda i, n: randn(n, 0.1))]
    make = {
        "average": lambda: flat(lambda i, n: _segments.memory_view(params[i]).float() + randn(n, 0.1)),
        "velocity": lambda: flat(lambda i, n: randn(n, 0.01)),
        "lawa_sum": lambda: flat(lambda i, n: randn(n, 3.0)),
        "ring_slot": lambda: flat(lambda i, n: randn(n, dtype=dtype), dtype),
    }
    buffers["average_state"] = [make[kind]() for kind in average["state"]]
    return _with_tables(buffers, offsets), padding


def _with_tables(buffers, offsets):
    """``buffers`` with the segment tables of its tensors: with gradients, and without for ``average_``."""
    return dict(buffers, offsets=offsets,
                segments=_segments.build(buffers["params"], buffers["grads"], offsets, DEVICE),
                average_segments=_segments.build(buffers["params"], None, offsets, DEVICE))


def _clone(buffers):
    """The same inputs in memory of their own (same layouts, so the same paths), with tables to match."""
    clone = {name: [_twin(t) for t in buffers[name]] for name in ("params", "grads")}
    clone.update({name: [t.clone() for t in buffers[name]] for name in ("optimizer_state", "average_state")})
    return _with_tables(clone, buffers["offsets"])


def _call(backend, optimizer, average, buffers, lr, step, weights):
    b = buffers
    averaging = (average["rule"], average.get("reaction", 0.0), average.get("inertia", 0.0),
                 average.get("switch", False))
    if optimizer is None:
        backend.average_(b["params"], b["average_segments"], b["average_state"], weights, *averaging)
    elif optimizer["op"] == "adam":
        backend.adam_step_(b["params"], b["grads"], b["segments"], b["optimizer_state"], b["average_state"], lr,
                           step, weights, optimizer["beta1"], optimizer["beta2"], optimizer["eps"],
                           optimizer["weight_decay"], optimizer["decoupled_weight_decay"], optimizer["amsgrad"],
                           optimizer["maximize"], *averaging)
    else:
        backend.sgd_step_(b["params"], b["grads"], b["segments"], b["optimizer_state"], b["average_state"], lr,
                          step, weights, optimizer["momentum"], optimizer["dampening"], optimizer["weight_decay"],
                          optimizer["nesterov"], optimizer["maximize"], optimizer["heavy_ball"], *averaging)


def _assert_buffers_close(ours, theirs, where):
    params = theirs["params"]
    dtype = params[0].dtype
    param_scale = max(float(p.abs().max()) for p in params)
    for name in ("params", "grads", "optimizer_state", "average_state"):
        for i, (actual, wanted) in enumerate(zip(ours[name], theirs[name])):
            _assert_close(actual, wanted, f"{where}: {name}[{i}]", dtype, param_scale,
                          in_param_units=name != "optimizer_state")


def _assert_padding_zero(buffers, padding, where):
    for name in ("optimizer_state", "average_state"):
        for i, t in enumerate(buffers[name]):
            assert not t[padding].any(), f"{where}: {name}[{i}] was written outside its segments"


def _check_against_reference(optimizer, average, dtype, layout=MIXED, seed=0, packed=False):
    ours, padding = _make_buffers(optimizer, average, layout, dtype, seed, packed)
    theirs = _clone(ours)
    for i, (lr, step) in enumerate(STEPS):
        weights = torch.tensor([w / (1 + i) for w in average["weights"]] or [0.0], device=DEVICE)
        scalars = (torch.tensor([lr], device=DEVICE), torch.tensor([step], device=DEVICE), weights)
        _call(TRITON, optimizer, average, ours, *scalars)
        _call(_backends.REFERENCE, optimizer, average, theirs, *scalars)
        _assert_buffers_close(ours, theirs, f"step {i + 1}")
        _assert_padding_zero(ours, padding, f"step {i + 1}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fused_step_matches_reference(optimizer, average, dtype):
    _check_against_reference(OPTIMIZERS[optimizer], AVERAGES[average], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("average", AVERAGES)
def test_average_matches_reference(average, dtype):
    _check_against_reference(None, AVERAGES[average], dtype)


@pytest.mark.parametrize("numel", [1, 7, 1023, 1024, 4097, _segments.ROW_NUMEL + 1027])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optimizer, average", [("adamw_amsgrad", "ema_8_decays"), ("heavy_ball_momentum", "lawa"),
                                                ("sgd_momentum_dampening_decay", "belay_inertia")])
def test_odd_sizes(optimizer, average, dtype, numel):
    # One tensor: a lone tail, whole blocks with and without a tail, and one that spans two table rows.
    _check_against_reference(OPTIMIZERS[optimizer], AVERAGES[average], dtype, [(numel, "aligned", "aligned")],
                             seed=numel)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optimizer, average", [("adamw_amsgrad", "ema_8_decays"), ("heavy_ball_momentum", "lawa"),
                                                (None, "belay_inertia")])
def test_state_offsets_need_not_be_aligned(optimizer, average, dtype):
    # Segments back to back in the flat buffers: most rows' state is not 16-byte aligned (the unhinted path).
    _check_against_reference(OPTIMIZERS[optimizer] if optimizer else None, AVERAGES[average], dtype, packed=True)


def test_no_rows_is_a_no_op():
    ours, _ = _make_buffers(OPTIMIZERS["adamw"], AVERAGES["ema"], MIXED[:2], torch.float32)
    before = _clone(ours)
    lr, step, weights = (torch.ones(1, device=DEVICE) for _ in range(3))
    empty = torch.empty(0, 4, dtype=torch.int64, device=DEVICE)
    _call(TRITON, OPTIMIZERS["adamw"], AVERAGES["ema"], dict(ours, segments=empty), lr, step, weights)
    _call(TRITON, None, AVERAGES["ema"], dict(ours, average_segments=empty), lr, step, weights)
    _call(TRITON, OPTIMIZERS["adamw"], AVERAGES["ema"], dict(ours, params=[], grads=[], segments=empty), lr, step,
          weights)
    for name in ("params", "optimizer_state", "average_state"):
        for actual, wanted in zip(ours[name], before[name]):
            assert torch.equal(actual, wanted)


def test_ops_check_their_arguments():
    b, _ = _make_buffers(OPTIMIZERS["adam"], AVERAGES["ema"], MIXED[:2], torch.float32)
    lr, step, weights = (torch.ones(1, device=DEVICE) for _ in range(3))
    hyper = (0.9, 0.999, 1e-8, 0.0, False, False, False, RULE_EMA, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="optimizer_state must hold 2 to 2"):
        TRITON.adam_step_(b["params"], b["grads"], b["segments"], b["optimizer_state"][:1], b["average_state"], lr,
                          step, weights, *hyper)
    with pytest.raises(RuntimeError, match=r"grads\[1\] must match params\[1\] in dtype, device and size"):
        TRITON.adam_step_(b["params"], [b["grads"][0], b["grads"][1].double()], b["segments"], b["optimizer_state"],
                          b["average_state"], lr, step, weights, *hyper)
    with pytest.raises(RuntimeError, match="grads must hold one tensor per param"):
        TRITON.adam_step_(b["params"], b["grads"][:1], b["segments"], b["optimizer_state"], b["average_state"], lr,
                          step, weights, *hyper)
    with pytest.raises(RuntimeError, match="params must share one dtype and device"):
        TRITON.adam_step_([b["params"][0], b["params"][1].half()], b["grads"], b["segments"], b["optimizer_state"],
                          b["average_state"], lr, step, weights, *hyper)
    with pytest.raises(RuntimeError, match="param must be float32, bfloat16 or float16"):
        TRITON.average_([p.double() for p in b["params"]], b["average_segments"], b["average_state"], weights,
                        RULE_EMA, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"segments must be a contiguous int64 \(n, 4\) tensor"):
        TRITON.average_(b["params"], b["average_segments"].int(), b["average_state"], weights, RULE_EMA, 0.0, 0.0,
                        False)
    with pytest.raises(RuntimeError, match=r"segments must be a contiguous int64 \(n, 4\) tensor"):
        TRITON.average_(b["params"], b["average_segments"][:, :3], b["average_state"], weights, RULE_EMA, 0.0, 0.0,
                        False)
    with pytest.raises(RuntimeError, match=r"average_state must be a contiguous 1-D \(flat\) buffer"):
        TRITON.average_(b["params"], b["average_segments"], [b["average_state"][0].view(-1, 2)], weights, RULE_EMA,
                        0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="lawa_ring_slot must be torch.float32"):
        TRITON.average_(b["params"], b["average_segments"], [b["average_state"][0], b["average_state"][0].double()],
                        weights, RULE_LAWA, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="cannot also switch"):
        TRITON.average_(b["params"], b["average_segments"], [b["average_state"][0], b["average_state"][0].clone()],
                        weights, RULE_LAWA, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="momentum buffer exactly when momentum != 0"):
        TRITON.sgd_step_(b["params"], b["grads"], b["segments"], [], [], lr, step, weights, 0.9, 0.0, 0.0, False,
                         False, False, RULE_NONE, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="average_weights must be a contiguous float32 tensor of at least 2"):
        TRITON.average_(b["params"], b["average_segments"], b["average_state"] * 2, weights, RULE_EMA, 0.0, 0.0,
                        False)


@pytest.mark.parametrize("optimizer", ["sgd_nesterov_maximize", "adam_l2_amsgrad_maximize", "adamw", None])
def test_launches_pin_contraction_and_pass_flags_as_ints(optimizer, monkeypatch):
    """Every launch turns floating-point contraction off (the interpreter ignores the option: only a compiled kernel
    would contract), and passes the optimizer's flags as int 0/1: Triton 3.7's interpreter rejects bool kernel
    arguments, and ints the kernel does not specialize on keep one compiled kernel for either value."""
    launches = []

    class Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda **kwargs: launches.append(kwargs)

    monkeypatch.setattr(_triton, "wrap_triton", Capture)
    b, _ = _make_buffers(OPTIMIZERS[optimizer] if optimizer else None, AVERAGES["ema"], MIXED[:2], torch.float32)
    lr, step, weights = (torch.ones(1, device=DEVICE) for _ in range(3))
    _call(TRITON, OPTIMIZERS[optimizer] if optimizer else None, AVERAGES["ema"], b, lr, step, weights)
    assert len(launches) == 1
    assert launches[0]["enable_fp_fusion"] is False
    for flag in _triton._FLAGS:
        assert type(launches[0][flag]) is int and launches[0][flag] in (0, 1), flag
    if optimizer:
        expected = {k: int(OPTIMIZERS[optimizer].get(k, False)) for k in _triton._FLAGS}
        assert {k: launches[0][k] for k in _triton._FLAGS} == expected


def _arguments(schema):
    # triton_op writes Python's int as SymInt where TORCH_LIBRARY's schema says int.
    return [(a.name, str(a.type).replace("SymInt", "int"), a.alias_info is not None and a.alias_info.is_write)
            for a in schema.arguments]


@pytest.mark.parametrize("name, written", [("adam_step_", {"params", "optimizer_state", "average_state"}),
                                           ("sgd_step_", {"params", "optimizer_state", "average_state"}),
                                           ("average_", {"params", "average_state"})])
def test_ops_have_the_schemas_of_the_cpp_ops(name, written):
    arguments = _arguments(getattr(torch.ops.fastavg_triton, name).default._schema)
    assert {arg for arg, _, is_written in arguments if is_written} == written
    if _backends._EXTENSION is not None:
        assert arguments == _arguments(getattr(torch.ops.fastavg, name).default._schema)


# --- end to end: the fused optimizers on the Triton backend against fastavg.reference -----------------
# helpers' optimizers and averagers, as for the other backends. Compiled on a GPU, everything runs on "many" (300
# parameters of mixed shapes). Triton's interpreter runs a program per table row, some ms each whatever the row's
# size, so a 300-row step takes seconds there: without a GPU the optimizer x averager matrix runs on one
# 4097-element parameter (full blocks and a tail), and the layouts that shape the table run for a few
# combinations: "views" (unaligned, transposed, channels_last, staged, shared storage, several rows) with and
# without flat_params, and "many" with gradients missing.
INTERPRETED = DEVICE.type == "cpu"
MATRIX_LAYOUT = 4097 if INTERPRETED else "many"
LAYOUT_CASES = [("views", "adamw", "ema", False), ("views", "sgd_heavy_ball", "lawa", False),
                ("views", "sgd_torch", "belay", True), ("many", "adam", "swa", False)]
if not INTERPRETED:
    LAYOUT_CASES += [("views", optimizer, averager, flat) for optimizer in HELPER_OPTIMIZERS for averager in AVERAGERS
                     for flat in (False, True)]
MISSING_GRAD_AVERAGERS = ["sema"] if INTERPRETED else ["ema_every", "lawa", "sema"]


@pytest.mark.parametrize("averager", list(AVERAGERS))
@pytest.mark.parametrize("optimizer", list(HELPER_OPTIMIZERS))
def test_optimizer_matches_reference(optimizer, averager):
    run_against_reference("triton", optimizer, averager, MATRIX_LAYOUT, torch.float32, device=DEVICE)


@pytest.mark.parametrize("layout, optimizer, averager, flat_params", sorted(set(LAYOUT_CASES), key=str), ids=str)
def test_layouts_match_reference(layout, optimizer, averager, flat_params):
    run_against_reference("triton", optimizer, averager, layout, torch.float32, device=DEVICE,
                          flat_params=flat_params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("averager", ["ema", "belay", "lawa", "sema"])
def test_half_precision_adamw_matches_reference(averager, dtype):
    run_against_reference("triton", "adamw", averager, MATRIX_LAYOUT, dtype, device=DEVICE)


@pytest.mark.parametrize("averager", MISSING_GRAD_AVERAGERS)
def test_missing_grads_split_launches_like_reference(averager):
    # Parameters without a gradient split a bucket into several launches, some of them averaging alone.
    run_against_reference("triton", "adamw", averager, "many", torch.float32, device=DEVICE,
                          skip=lambda i, step: (i // 7 + step) % 3 == 0)


# --- GPU only: the compiled kernels under torch.compile and in CUDA graphs --------------------------
# The mixed layout and a parameter of several blocks: rows on the hinted and the plain path.
GPU_LAYOUT = MIXED + [(4097, "aligned", "aligned")]


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
    ours, _ = _make_buffers(OPTIMIZERS["adamw_amsgrad"], AVERAGES["ema_8_decays"], GPU_LAYOUT, torch.bfloat16)
    theirs = _clone(ours)

    @torch.compile(fullgraph=True)
    def compiled_step(params, grads, segments, optimizer_state, average_state, lr, step, weights):
        buffers = dict(params=params, grads=grads, segments=segments, optimizer_state=optimizer_state,
                       average_state=average_state)
        _adam_ema_call(TRITON, buffers, lr, step, weights)

    def check_step(i, lr, step):
        scalars = _scalars(lr, step, i)
        compiled_step(ours["params"], ours["grads"], ours["segments"], ours["optimizer_state"],
                      ours["average_state"], *scalars)
        _adam_ema_call(_backends.REFERENCE, theirs, *scalars)
        _assert_buffers_close(ours, theirs, f"step {i + 1}")

    check_step(0, *STEPS[0])
    with torch.compiler.set_stance("fail_on_recompile"):  # a new lr, step and weights are values, not graphs
        check_step(1, *STEPS[1])


@requires_cuda
def test_cuda_graph_replay_reads_new_scalars():
    ours, padding = _make_buffers(OPTIMIZERS["adamw_amsgrad"], AVERAGES["ema_8_decays"], GPU_LAYOUT, torch.float32)
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
        _assert_padding_zero(ours, padding, f"replay {i + 1}")
