"""Every compiled backend against the reference, for the whole optimizer × averager × dtype × size matrix."""
import pytest
import torch

import fastavg

from helpers import AVERAGERS, OPTIMIZERS, SIZES, run_against_reference, tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEPS = 4


def _available(backend):
    reason = fastavg.backend_status()[backend]
    return pytest.param(backend, marks=pytest.mark.skipif(bool(reason), reason=reason))


BACKENDS = [_available("cpu"), "reference"]


# The largest size runs for fp32 with and without EMA only, to keep CI fast. PowerEMA and BEMA run the
# EMA rule with their own weights (on a subset of the averages for BEMA), which "ema" checks on every
# layout: a small size and the two table-shaping layouts show their weights and buffer choice.
MATRIX = [
    (averager, dtype, layout)
    for averager in AVERAGERS
    for dtype in DTYPES
    for layout in SIZES + ["many", "views"]
    if layout != SIZES[-1] or (dtype == torch.float32 and averager in ("none", "ema"))
    if averager not in ("power_ema", "bema") or layout in (7, "many", "views")
]
# Both layouts: parameters where they are (default) and parameters moved into flat buffers.
LAYOUTS = [pytest.param(False, id="in_place"), pytest.param(True, id="flat_params")]


@pytest.mark.parametrize("averager, dtype, layout", MATRIX, ids=str)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat_params", LAYOUTS)
def test_backend_matches_reference(flat_params, backend, optimizer, averager, dtype, layout):
    run_against_reference(backend, optimizer, averager, layout, dtype, steps=STEPS, flat_params=flat_params)


@pytest.mark.parametrize("averager", list(AVERAGERS))
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_torch", "sgd_heavy_ball"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat_params", LAYOUTS)
def test_missing_grads_split_launches_like_reference(flat_params, backend, optimizer, averager):
    run_against_reference(backend, optimizer, averager, "many", torch.float32, steps=STEPS,
                          skip=lambda i, step: (i // 7 + step) % 3 == 0, flat_params=flat_params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_kernel_converts_every_half_precision_value_like_torch(dtype):
    """The CPU kernels convert bf16/fp16 with their own branch-free code: check it against torch on every
    16-bit pattern (load) and on floats around every rounding boundary, subnormals, inf and NaN (store)."""
    if fastavg.backend_status()["cpu"]:
        pytest.skip(fastavg.backend_status()["cpu"])
    from fastavg import _segments
    from fastavg.averaging import RULE_LAWA, RULE_NONE

    def table(t):
        return _segments.build([t], None, [0], t.device)

    # A LAWA snapshot into a zero sum and ring: S = 0 + (θ − 0) loads θ, the ring slot stores it back.
    every_value = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).contiguous()
    loaded, ring_slot = torch.zeros(every_value.numel()), torch.zeros_like(every_value)
    weights = torch.ones(1)
    params = every_value.clone()
    torch.ops.fastavg.average_([params], table(params), [loaded, ring_slot], weights, RULE_LAWA, 0.0, 0.0, False)
    expected = every_value.float()
    assert torch.equal(loaded.isnan(), expected.isnan())
    assert torch.equal(loaded[~expected.isnan()], expected[~expected.isnan()])
    assert torch.equal(ring_slot.isnan(), every_value.isnan())

    finite = expected[expected.isfinite()].unique()
    midpoints = (finite[1:] + finite[:-1]) / 2
    floats = torch.cat([finite, midpoints, midpoints.nextafter(finite[1:]), midpoints.nextafter(finite[:-1]),
                        torch.randn(100_000) * 1e3, torch.tensor([float("inf"), -float("inf"), float("nan"),
                                                                  3.4e38, -3.4e38, 1e-45, -1e-45])])
    stored = torch.zeros(floats.numel(), dtype=dtype)
    torch.ops.fastavg.average_([stored], table(stored), [floats.clone()], weights, RULE_NONE, 0.0, 0.0, True)
    expected = floats.to(dtype)
    assert torch.equal(stored.isnan(), expected.isnan())
    assert torch.equal(stored[~expected.isnan()].view(torch.int16), expected[~expected.isnan()].view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_propagates_nan_like_torch(backend):
    ours = torch.randn(37, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_()
    opt = fastavg.Adam([ours], amsgrad=True, backend=backend)
    ref = torch.optim.Adam([theirs], amsgrad=True)
    for step in range(2):
        grad = torch.randn(37)
        grad[5 + step] = float("nan")
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    expected = ref.state[theirs]["max_exp_avg_sq"].isnan()
    assert expected[5] and expected[6]
    assert torch.equal(opt.state[ours]["max_exp_avg_sq"].isnan(), expected)
    assert torch.equal(ours.detach().isnan(), theirs.detach().isnan())


# --- averaging alone reads θ and writes it only when it changes it ----------------------------------------
# Every backend with an average_ op here: the compiled CPU kernels, the reference op, and Triton (its interpreter
# on CPU tensors, TRITON_INTERPRET=1 from conftest.py).
def _average_backend(name):
    from fastavg import _backends

    backend, reason = _backends._status()[name]
    return pytest.param(name, marks=pytest.mark.skipif(backend is None, reason=reason or ""))


AVERAGE_BACKENDS = [_average_backend("cpu"), _average_backend("reference"), _average_backend("triton")]
# (name, rule, number of fp32 averages, weights, switch): what AveragedModel and a step without gradients launch.
# PowerEMA, BEMA and SWA launch the EMA rule with weights of their own (BEMA's θ₀ snapshot and copy phase: w = 1).
READ_ONLY_AVERAGINGS = [
    ("ema", 1, 1, [0.1], False),
    ("multi_ema", 1, 3, [0.1, 0.01, 0.001], False),
    ("copy_phase", 1, 2, [1.0, 1.0], False),
    ("swa", 1, 1, [1.0 / 3.0], False),
    ("lawa", 3, 0, [], False),
    ("none", 0, 0, [], False),
]
WRITING_AVERAGINGS = [
    ("belay", 2, 1, [0.05], False),
    ("belay_inertia", 2, 2, [0.05], False),
    ("sema_switch", 1, 1, [0.1], True),
    ("switch_alone", 0, 1, [], True),
]
# Non-canonical NaNs: a store of θ after a round trip through fp32 writes the canonical quiet NaN instead (bf16,
# fp16), so these bits show whether the parameter was written.
_NAN_PAYLOADS = {torch.bfloat16: (0xFF81, 0x7F81), torch.float16: (0x7C01, 0xFE01),
                 torch.float32: (0x7F800001, 0xFFC00123)}
_INT_VIEWS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _average_case(dtype, rule, num_averages, seed=0):
    """Parameters (dense tensors, a multi-row one, an unaligned view) with NaN payloads, their table and state."""
    from fastavg import _segments

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3000, generator=g).to(dtype)
    params = [torch.randn(n, generator=g).to(dtype) for n in (1, 7, 1023, 2100, 70001)] + [base[1:1030]]
    width = 8 * params[0].element_size()
    for p in params[2:]:
        for k, payload in enumerate(_NAN_PAYLOADS[dtype]):  # as a signed integer of the dtype's width
            p.view(_INT_VIEWS[dtype])[5 + 17 * k] = payload - (1 << width) if payload >> (width - 1) else payload
    offsets, numel = [], 0
    for p in params:
        offsets.append(numel)
        numel += -(-p.numel() // 32) * 32
    table = _segments.build(params, None, offsets, torch.device("cpu"))
    state = []
    if rule == 3:  # LAWA: the fp32 running sum and a ring slot in the parameter dtype
        state = [torch.randn(numel, generator=g), torch.randn(numel, generator=g).to(dtype)]
    else:
        state = [torch.randn(numel, generator=g) for _ in range(num_averages)]
    return params, table, state


def _run_average(backend_name, params, table, state, rule, weights, switch, reaction=0.5, inertia=0.3):
    from fastavg import _backends

    backend = _backends._status()[backend_name][0]
    backend.average_(params, table, state, torch.tensor(weights or [0.0], dtype=torch.float32), rule, reaction,
                     inertia, switch)


def _bits(tensors):
    return [t.view(_INT_VIEWS[t.dtype]).clone() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, rule, num_averages, weights, switch", READ_ONLY_AVERAGINGS,
                         ids=[a[0] for a in READ_ONLY_AVERAGINGS])
@pytest.mark.parametrize("backend", AVERAGE_BACKENDS)
def test_average_alone_leaves_params_bit_identical(backend, name, rule, num_averages, weights, switch, dtype):
    """EMA, multi-EMA, the copy phase, SWA, LAWA snapshots: θ is read, never stored. Stored after a round trip
    through fp32 its NaN payloads would become the canonical NaN (bf16, fp16); and the averages still match the
    reference op's."""
    params, table, state = _average_case(dtype, rule, num_averages)
    before = _bits(params)
    _run_average(backend, params, table, state, rule, weights, switch)
    for p, bits in zip(params, before):
        assert torch.equal(p.view(bits.dtype), bits)
    expected_params, expected_table, expected_state = _average_case(dtype, rule, num_averages)
    _run_average("reference", expected_params, expected_table, expected_state, rule, weights, switch)
    for actual, expected in zip(state, expected_state):
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, rule, num_averages, weights, switch", WRITING_AVERAGINGS,
                         ids=[a[0] for a in WRITING_AVERAGINGS])
@pytest.mark.parametrize("backend", AVERAGE_BACKENDS)
def test_average_alone_writes_params_for_belay_and_switch(backend, name, rule, num_averages, weights, switch, dtype):
    """BELAY's spring pulls θ and a switch copies the average into it: there θ is written, as the reference does."""
    params, table, state = _average_case(dtype, rule, num_averages, seed=1)
    before = [p.clone() for p in params]
    _run_average(backend, params, table, state, rule, weights, switch)
    expected_params, expected_table, expected_state = _average_case(dtype, rule, num_averages, seed=1)
    _run_average("reference", expected_params, expected_table, expected_state, rule, weights, switch)
    for p, old, expected in zip(params, before, expected_params):
        moved = ~torch.eq(p, old) & ~old.isnan()
        assert moved.any(), "θ was not written"
        torch.testing.assert_close(p.float(), expected.float(), equal_nan=True, **tolerance(dtype))


# The training model's parameters in read-only file mappings: any store into them faults (SIGSEGV/SIGBUS), so a run
# that ends shows that AveragedModel's updates never wrote θ, whatever the value written.
_READ_ONLY_SCRIPT = r"""
import mmap, os, sys, tempfile, warnings
import torch
import fastavg

backend, averagers = sys.argv[1], sys.argv[2]
warnings.simplefilter("ignore")  # torch.frombuffer of a read-only buffer warns
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(300, 70), torch.nn.Linear(70, 5), torch.nn.Linear(5, 3))
directory = tempfile.mkdtemp()
for k, p in enumerate(model.parameters()):
    path = os.path.join(directory, str(k))
    with open(path, "wb") as f:
        f.write(p.detach().contiguous().numpy().tobytes())
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    p.data = torch.frombuffer(mapping, dtype=torch.float32).view_as(p)
for spec in averagers.split(";"):
    averaged = fastavg.AveragedModel(model, average=eval(spec, vars(fastavg)), backend=backend)
    for _ in range(4):
        averaged.update_parameters(model)
    averaged.averaged_parameters()
    print("ok", spec, flush=True)
"""
_READ_ONLY_AVERAGERS = ("EMA(0.9);EMA((0.9, 0.99, 0.999));EMA(0.9, warmup='tf', start=1);SWA();LAWA(k=2, every=1);"
                        "PowerEMA((0.05, 0.1));BEMA(update_after=1, update_freq=1)")


def _run_read_only(backend, averagers):
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", _READ_ONLY_SCRIPT, backend, averagers], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.parametrize("backend", AVERAGE_BACKENDS)
def test_averaged_model_never_writes_the_model(backend):
    """fastavg.AveragedModel with EMA, multi-EMA, SWA, LAWA, PowerEMA, BEMA on a model whose parameters are
    read-only memory: every update runs; BELAY (whose spring pulls θ) faults there, which shows the check bites."""
    run = _run_read_only(backend, _READ_ONLY_AVERAGERS)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok ") == len(_READ_ONLY_AVERAGERS.split(";"))
    control = _run_read_only(backend, "BELAY(0.9, reaction=1.0)")
    assert control.returncode != 0 and "ok " not in control.stdout, control.stdout + control.stderr
