"""Every compiled backend against the reference, for the whole optimizer × averager × dtype × size matrix."""
import pytest
import torch

import fastavg

from helpers import AVERAGERS, OPTIMIZERS, SIZES, run_against_reference

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
