"""state_dict: torch's layout, every averaging buffer and counter, bit-identical resume."""
import copy
import io

import pytest
import torch

import fastavg
from fastavg import reference

from helpers import AVERAGERS, OPTIMIZERS, make_params, set_grads

N = 5


def _build(impl, optimizer, averager, backend):
    name, kwargs = OPTIMIZERS[optimizer]
    params = make_params("many", torch.float32)[:40]
    extra = {} if impl is reference else {"backend": backend}
    opt = getattr(impl, name)(params, average=AVERAGERS[averager](), **extra, **kwargs)
    return params, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def _train(params, opt, sched, steps, offset=0):
    for step in range(offset, offset + steps):
        set_grads(params, step, skip=lambda i, s: (i + s) % 11 == 0)
        opt.step()
        sched.step()


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


IMPLS = [pytest.param(fastavg, "cpu", id="cpu"), pytest.param(fastavg, "reference", id="fused-reference"),
         pytest.param(reference, None, id="reference")]


@pytest.mark.parametrize("averager", list(AVERAGERS))
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_torch", "sgd_heavy_ball"])
@pytest.mark.parametrize("impl, backend", IMPLS)
def test_resume_is_bit_identical(impl, backend, optimizer, averager):
    if backend == "cpu" and fastavg.backend_status()["cpu"]:
        pytest.skip(fastavg.backend_status()["cpu"])
    straight_params, straight, straight_sched = _build(impl, optimizer, averager, backend)
    _train(straight_params, straight, straight_sched, 2 * N)

    first_params, first, first_sched = _build(impl, optimizer, averager, backend)
    _train(first_params, first, first_sched, N)
    saved = _roundtrip({"params": [p.detach().clone() for p in first_params], "opt": first.state_dict(),
                        "sched": first_sched.state_dict()})

    resumed_params, resumed, resumed_sched = _build(impl, optimizer, averager, backend)
    with torch.no_grad():
        for p, value in zip(resumed_params, saved["params"]):
            p.mul_(0.5).copy_(value)
    resumed.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    _train(resumed_params, resumed, resumed_sched, N, offset=N)

    for p, q in zip(straight_params, resumed_params):
        assert torch.equal(p.detach(), q.detach())
    for p, q in zip(straight_params, resumed_params):
        for key, value in straight.state[p].items():
            assert torch.equal(resumed.state[q][key], value), key
    if straight.average is not None:
        for a, b in zip(straight.averaged_parameters(), resumed.averaged_parameters()):
            assert torch.equal(a, b)


def test_state_dict_has_torch_layout_and_averaging_counters():
    params = make_params(7, torch.float32)
    opt = fastavg.AdamW(params, lr=0.1, average=fastavg.EMA((0.9, 0.99)))
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "fastavg"}
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "average_0", "average_1"}
    assert sd["fastavg"]["step"] == 1
    assert sd["fastavg"]["averager"]["name"] == "EMA"
    assert sd["param_groups"][0]["params"] == [0]


def test_torch_adamw_state_dict_loads_into_fastavg_and_back():
    ours, theirs = make_params("many", torch.float32)[:20], make_params("many", torch.float32)[:20]
    torch_opt = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1)
    for step in range(3):
        set_grads(theirs, step)
        torch_opt.step()
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    opt = fastavg.AdamW(ours, lr=0.5, average=fastavg.EMA(0.9))
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    assert opt.param_groups[0]["lr"] == 0.01
    for step in range(3, 6):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)

    back_params = make_params("many", torch.float32)[:20]
    back = torch.optim.AdamW(back_params, lr=0.01, weight_decay=0.1)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(back_params, ours):
        torch.testing.assert_close(back.state[p]["exp_avg"], opt.state[q]["exp_avg"])
        assert float(back.state[p]["step"]) == 6


def test_torch_sgd_momentum_state_loads():
    ours, theirs = make_params(7, torch.float32), make_params(7, torch.float32)
    torch_opt = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    set_grads(theirs, 0)
    torch_opt.step()
    with torch.no_grad():
        ours[0].copy_(theirs[0])
    opt = fastavg.SGD(ours, lr=0.1, momentum=0.9)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    set_grads(ours, 1)
    set_grads(theirs, 1)
    opt.step()
    torch_opt.step()
    torch.testing.assert_close(ours[0].detach(), theirs[0].detach())


@pytest.mark.parametrize("impl", [fastavg, reference], ids=["fused", "reference"])
def test_mismatched_state_dict_raises_and_changes_nothing(impl):
    params = make_params(7, torch.float32)
    opt = impl.AdamW(params, lr=0.1, average=fastavg.EMA(0.9))
    set_grads(params, 0)
    opt.step()
    before = opt.state_dict()
    snapshot = copy.deepcopy(before)
    other = impl.AdamW(make_params(7, torch.float32), lr=0.1, average=fastavg.EMA(0.5))
    with pytest.raises(ValueError, match="average="):
        opt.load_state_dict(other.state_dict())
    wrong_params = make_params(5, torch.float32)
    wrong_size = impl.AdamW(wrong_params, lr=0.1, average=fastavg.EMA(0.9))
    set_grads(wrong_params, 0)
    wrong_size.step()
    with pytest.raises(ValueError, match="elements"):
        opt.load_state_dict(wrong_size.state_dict())
    two_groups = impl.AdamW([{"params": make_params(7, torch.float32)}, {"params": make_params(3, torch.float32)}])
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(two_groups.state_dict())
    after = opt.state_dict()
    assert after["fastavg"] == snapshot["fastavg"]
    for key, value in snapshot["state"][0].items():
        assert torch.equal(after["state"][0][key], value)
