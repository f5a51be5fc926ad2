"""Bad input: a clear ValueError/TypeError/RuntimeError naming the argument, and nothing modified."""
import pytest
import torch

import fastavg
from fastavg import reference

from helpers import make_params, set_grads

IMPLEMENTATIONS = [fastavg, reference]


@pytest.fixture(params=IMPLEMENTATIONS, ids=["fused", "reference"])
def impl(request):
    return request.param


@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        ("SGD", dict(lr=-0.1), ValueError, "lr"),
        ("SGD", dict(momentum=-0.5), ValueError, "momentum"),
        ("SGD", dict(nesterov=True), ValueError, "nesterov"),
        ("SGD", dict(momentum=0.9, dampening=0.1, momentum_style="heavy_ball"), ValueError, "dampening"),
        ("SGD", dict(momentum_style="polyak"), ValueError, "momentum_style"),
        ("SGD", dict(weight_decay=-1.0), ValueError, "weight_decay"),
        ("Adam", dict(lr=-1e-3), ValueError, "lr"),
        ("Adam", dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        ("Adam", dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        ("AdamW", dict(eps=-1e-8), ValueError, "eps"),
        ("AdamW", dict(betas=0.9), TypeError, "betas"),
        ("AdamW", dict(average="ema"), TypeError, "average"),
    ],
)
def test_bad_hyperparameters(impl, name, kwargs, error, match):
    params = make_params(7, torch.float32)
    before = params[0].detach().clone()
    with pytest.raises(error, match=match):
        getattr(impl, name)(params, **kwargs)
    assert torch.equal(params[0].detach(), before)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: fastavg.EMA(1.0), ValueError, "decay"),
        (lambda: fastavg.EMA(-0.1), ValueError, "decay"),
        (lambda: fastavg.EMA((0.9, 1.5)), ValueError, "decay"),
        (lambda: fastavg.EMA((0.9,) * 9), ValueError, "decay"),
        (lambda: fastavg.EMA(0.9, every=0), ValueError, "every"),
        (lambda: fastavg.EMA(0.9, start=-1), ValueError, "start"),
        (lambda: fastavg.EMA(0.9, warmup="linear"), ValueError, "warmup"),
        (lambda: fastavg.SWA(every=0), ValueError, "every"),
        (lambda: fastavg.LAWA(0), ValueError, "k"),
        (lambda: fastavg.LAWA(5, every=1.5), TypeError, "every"),
        (lambda: fastavg.SEMA(0.9, switch_every=0), ValueError, "switch_every"),
        (lambda: fastavg.SEMA((0.9, 0.99), switch_every=1), TypeError, "decay"),
        (lambda: fastavg.BELAY(0.9, inertia=1.0), ValueError, "inertia"),
        (lambda: fastavg.BELAY(0.9, reaction=-1.0), ValueError, "reaction"),
    ],
)
def test_bad_averager_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_empty_parameter_list(impl):
    with pytest.raises(ValueError, match="empty parameter list"):
        impl.AdamW([])


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: torch.zeros(3, dtype=torch.complex64, requires_grad=True), ValueError, "complex"),
        (lambda: torch.zeros(3, 3).to_sparse().requires_grad_(), ValueError, "sparse"),
        (lambda: torch.zeros(3, dtype=torch.int64), TypeError, "floating point"),
    ],
)
def test_unsupported_parameters(impl, make, error, match):
    good = make_params(7, torch.float32)
    before = good[0].detach().clone()
    with pytest.raises(error, match=match):
        impl.SGD(good + [make()], lr=0.1)
    assert torch.equal(good[0].detach(), before)


def test_same_parameter_in_two_groups(impl):
    a, b = make_params(7, torch.float32), make_params(3, torch.float32)
    with pytest.raises(ValueError, match="more than one parameter group"):
        impl.SGD([{"params": a + b}, {"params": b}], lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        impl.SGD(a + a, lr=0.1)


def test_add_param_group_that_raises_leaves_optimizer_as_it_was(impl):
    a, b = make_params(7, torch.float32), make_params(3, torch.float32)
    opt = impl.AdamW(a, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": b, "lr": -1.0})
    assert len(opt.param_groups) == 1
    assert all(p not in opt.state for p in b)


def test_negative_lr_from_a_scheduler_is_caught_at_step(impl):
    params = make_params(7, torch.float32)
    opt = impl.SGD(params, lr=0.1, average=fastavg.EMA(0.9))
    set_grads(params, 0)
    before = params[0].detach().clone()
    opt.param_groups[0]["lr"] = -0.1
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(params[0].detach(), before)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unavailable_explicit_backend(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    params = make_params(7, torch.float32)
    with pytest.raises(RuntimeError, match=f"backend='{backend}'"):
        fastavg.AdamW(params, backend=backend)


def test_unknown_backend_and_env(monkeypatch):
    params = make_params(7, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        fastavg.AdamW(params, backend="gpu")
    monkeypatch.setenv("FASTAVG_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTAVG_BACKEND"):
        fastavg.AdamW(params)
    monkeypatch.setenv("FASTAVG_BACKEND", "reference")
    assert fastavg.AdamW(params).backends() == ["reference"]


def test_reference_module_runs_only_the_reference_backend():
    with pytest.raises(ValueError, match="backend"):
        reference.AdamW(make_params(7, torch.float32), backend="cpu")


def test_kernel_backend_rejects_float64():
    if fastavg.backend_status()["cpu"]:
        pytest.skip(fastavg.backend_status()["cpu"])
    with pytest.raises(ValueError, match="float64"):
        fastavg.AdamW(make_params(7, torch.float64), backend="cpu")
    assert fastavg.AdamW(make_params(7, torch.float64)).backends() == ["reference"]


def test_averaging_api_without_average(impl):
    opt = impl.AdamW(make_params(7, torch.float32))
    with pytest.raises(RuntimeError, match="average="):
        opt.averaged_parameters()
    with pytest.raises(RuntimeError, match="average="):
        with opt.swap_average():
            pass
    opt_multi = impl.AdamW(make_params(7, torch.float32), average=fastavg.EMA((0.9, 0.99)))
    with pytest.raises(IndexError, match="index"):
        opt_multi.averaged_parameters(2)


def test_direct_op_call_with_wrong_buffers_raises_not_crashes():
    if fastavg.backend_status()["cpu"]:
        pytest.skip(fastavg.backend_status()["cpu"])
    from fastavg import _segments

    p, g = torch.zeros(8), torch.zeros(8)
    segments = _segments.build([p], [g], [0], p.device)
    lr, step, w = torch.ones(1), torch.ones(1), torch.ones(1)
    adam = torch.ops.fastavg.adam_step_
    with pytest.raises(RuntimeError, match="optimizer_state"):
        adam([p], [g], segments, [torch.zeros(8)], [], lr, step, w, 0.9, 0.99, 1e-8, 0.0, True, False, False, 0, 0.0,
             0.0, False)
    with pytest.raises(RuntimeError, match="reaches past the flat buffers"):
        adam([p], [g], segments, [torch.zeros(8), torch.zeros(4)], [], lr, step, w, 0.9, 0.99, 1e-8, 0.0, True,
             False, False, 0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="does not point inside params"):
        adam([torch.zeros(8)], [g], segments, [torch.zeros(8), torch.zeros(8)], [], lr, step, w, 0.9, 0.99, 1e-8,
             0.0, True, False, False, 0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="does not point inside grads"):
        adam([p], [torch.zeros(8)], segments, [torch.zeros(8), torch.zeros(8)], [], lr, step, w, 0.9, 0.99, 1e-8,
             0.0, True, False, False, 0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="segments must be a contiguous int64"):
        adam([p], [g], segments.int(), [torch.zeros(8), torch.zeros(8)], [], lr, step, w, 0.9, 0.99, 1e-8, 0.0, True,
             False, False, 0, 0.0, 0.0, False)
    p64 = torch.zeros(8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.fastavg.average_([p64], _segments.build([p64], None, [0], p.device), [torch.zeros(8)], w, 1, 0.0,
                                   0.0, False)
