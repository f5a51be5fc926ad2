"""Every compiled backend against the reference, for the whole optimizer × averager × dtype × size matrix."""
import pytest
import torch

import fastavg

from helpers import AVERAGERS, OPTIMIZERS, SIZES, assert_same_state, make_pair, set_grads

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEPS = 4


def _available(backend):
    reason = fastavg.backend_status()[backend]
    return pytest.param(backend, marks=pytest.mark.skipif(bool(reason), reason=reason))


BACKENDS = [_available("cpu"), "reference"]


def _run(backend, optimizer, averager, layout, dtype, skip=None):
    ours, ref, fused, spec = make_pair(optimizer, averager, layout, dtype, backend)
    assert set(fused.backends()) == {backend}
    for step in range(STEPS):
        set_grads(ours, step, skip)
        set_grads(ref, step, skip)
        fused.step()
        spec.step()
    assert_same_state(fused, spec, ours, ref, dtype)


# The largest size runs for fp32 with and without EMA only, to keep CI fast.
MATRIX = [
    (averager, dtype, layout)
    for averager in AVERAGERS
    for dtype in DTYPES
    for layout in SIZES + ["many"]
    if layout != SIZES[-1] or (dtype == torch.float32 and averager in ("none", "ema"))
]


@pytest.mark.parametrize("averager, dtype, layout", MATRIX, ids=str)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, optimizer, averager, dtype, layout):
    _run(backend, optimizer, averager, layout, dtype)


@pytest.mark.parametrize("averager", list(AVERAGERS))
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_torch", "sgd_heavy_ball"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_grads_split_launches_like_reference(backend, optimizer, averager):
    _run(backend, optimizer, averager, "many", torch.float32, skip=lambda i, step: (i // 7 + step) % 3 == 0)
