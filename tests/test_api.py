"""The public API around the step: averages, swap, switch, schedulers, param groups, the CLI."""
import os
import subprocess
import sys

import pytest
import torch

import fastavg
from fastavg import reference

from helpers import assert_close, make_params, set_grads


@pytest.fixture(params=[fastavg, reference], ids=["fused", "reference"])
def impl(request):
    return request.param


def test_public_names_match_reference():
    import inspect

    for name in ("SGD", "Adam", "AdamW"):
        assert inspect.signature(getattr(fastavg, name)) == inspect.signature(getattr(reference, name))
    for name in ("EMA", "BELAY", "SWA", "LAWA", "SEMA"):
        assert getattr(fastavg, name) is getattr(reference, name)


def test_swap_average_restores_raw_weights_even_when_the_block_raises(impl):
    params = make_params("many", torch.bfloat16)[:30]
    opt = impl.AdamW(params, lr=0.1, average=fastavg.EMA((0.5, 0.9)))
    for step in range(3):
        set_grads(params, step)
        opt.step()
    raw = [p.detach().clone() for p in params]
    with pytest.raises(KeyError):
        with opt.swap_average(1):
            for p, e in zip(params, opt.averaged_parameters(1)):
                assert torch.equal(p.detach(), e.to(p.dtype))
            raise KeyError("evaluation failed")
    for p, r in zip(params, raw):
        assert torch.equal(p.detach(), r)


def test_averaged_parameters_are_live_views_after_the_first_step(impl):
    params = make_params(7, torch.float32)
    opt = impl.SGD(params, lr=0.1, average=fastavg.EMA(0.5))
    (before_any_step,) = opt.averaged_parameters()  # no average yet: θ itself
    assert torch.equal(before_any_step, params[0].detach())
    set_grads(params, 0)
    opt.step()
    (average,) = opt.averaged_parameters()
    assert average.shape == params[0].shape and average.dtype == torch.float32
    before = average.clone()
    set_grads(params, 1)
    opt.step()
    assert not torch.equal(average, before)


def test_switch_to_average_on_demand_keeps_average_and_state(impl):
    params = make_params(9, torch.float32)
    opt = impl.AdamW(params, lr=0.1, average=fastavg.EMA(0.9))
    for step in range(3):
        set_grads(params, step)
        opt.step()
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.switch_to_average()
    assert torch.equal(params[0].detach(), opt.averaged_parameters()[0])
    for k, v in state.items():
        assert torch.equal(opt.state[params[0]][k], v)


def test_lawa_swap_before_and_after_first_snapshot(impl):
    params = make_params(9, torch.float32)
    opt = impl.SGD(params, lr=0.1, average=fastavg.LAWA(2, every=2))
    set_grads(params, 0)
    opt.step()
    raw = params[0].detach().clone()
    with opt.swap_average():
        assert torch.equal(params[0].detach(), raw)
    snapshots = []
    for step in range(1, 6):
        set_grads(params, step)
        opt.step()
        if (step + 1) % 2 == 0:
            snapshots.append(params[0].detach().clone())
    with opt.swap_average():
        assert_close(params[0].detach(), torch.stack(snapshots[-2:]).mean(0), torch.float32)


def test_param_groups_with_different_hyperparameters_and_scheduler(impl):
    a, b = make_params(7, torch.float32), make_params(5, torch.float32, seed=1)
    ta, tb = make_params(7, torch.float32), make_params(5, torch.float32, seed=1)
    opt = impl.SGD([{"params": a}, {"params": b, "lr": 0.5, "momentum": 0.5, "nesterov": True}], lr=0.1,
                   momentum=0.9, weight_decay=0.01)
    ref = torch.optim.SGD([{"params": ta}, {"params": tb, "lr": 0.5, "momentum": 0.5, "nesterov": True}], lr=0.1,
                          momentum=0.9, weight_decay=0.01)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5) for o in (opt, ref)]
    for step in range(6):
        set_grads(a + b, step)
        set_grads(ta + tb, step)
        opt.step()
        ref.step()
        for s in schedulers:
            s.step()
    for p, q in zip(a + b, ta + tb):
        assert_close(p.detach(), q.detach(), torch.float32)


def test_closure_is_called_with_grad_enabled(impl):
    model = torch.nn.Linear(3, 1)
    opt = impl.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.requires_grad


def test_cli_reports_backends():
    out = subprocess.run([sys.executable, "-m", "fastavg"], capture_output=True, text=True, check=True).stdout
    for name in ("reference", "cpu", "cuda", "triton"):
        assert name in out
    assert "available" in out


def test_import_and_step_work_without_the_extension():
    script = """
import fastavg._extension
fastavg._extension._installed = lambda: (None, "no extension for the test")
import torch, fastavg
assert "no extension for the test" in fastavg.backend_status()["cpu"]
p = torch.nn.Parameter(torch.ones(3))
opt = fastavg.AdamW([p], average=fastavg.EMA(0.9))
assert opt.backends() == ["reference"]
p.grad = torch.ones(3)
opt.step()
print("ok", p.detach().tolist())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "FASTAVG_JIT": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_work_that_a_swap_would_throw_away_raises_inside_it(impl):
    params = make_params(9, torch.float32)
    opt = impl.AdamW(params, lr=0.1, average=fastavg.EMA(0.5))
    set_grads(params, 0)
    opt.step()
    state = opt.state_dict()
    with opt.swap_average():
        averaged = [p.detach().clone() for p in params]
        for call in (opt.step, opt.switch_to_average, lambda: opt.load_state_dict(state),
                     lambda: opt.swap_average().__enter__()):
            with pytest.raises(RuntimeError, match="leave the block first"):
                call()
        assert all(torch.equal(p.detach(), a) for p, a in zip(params, averaged))
    assert opt._average_step == 1
    opt.step()
    assert opt._average_step == 2
