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


@pytest.mark.parametrize("averager", [a for a in AVERAGERS if a != "none"])
@pytest.mark.parametrize("impl, backend", IMPLS)
def test_a_param_group_added_later_starts_its_averages_from_its_weights(impl, backend, averager):
    """As if the new parameters had been there all along with these weights; the fused optimizer as the reference."""
    if backend == "cpu" and fastavg.backend_status()["cpu"]:
        pytest.skip(fastavg.backend_status()["cpu"])
    params, opt, _ = _build(impl, "adamw", averager, backend)
    spec_params, spec, _ = _build(reference, "adamw", averager, None)
    late, spec_late = make_params(9, torch.float32, seed=3), make_params(9, torch.float32, seed=3)
    for step in range(3):
        for ps, o in ((params, opt), (spec_params, spec)):
            set_grads(ps, step)
            o.step()
    opt.add_param_group({"params": late})
    spec.add_param_group({"params": spec_late})
    torch.testing.assert_close(opt.averaged_parameters()[-1], late[0].detach(), rtol=1e-7, atol=0)  # LAWA: nθ/n
    for step in range(3, 6):
        for ps, o in ((params + late, opt), (spec_params + spec_late, spec)):
            set_grads(ps, step)
            o.step()
    for ours, theirs in zip(opt.averaged_parameters(), spec.averaged_parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl, backend", IMPLS)
@pytest.mark.parametrize("averager", ["none", "ema", "lawa", "belay"])
def test_pickle_and_deepcopy_keep_everything(impl, backend, averager):
    """torch.optim pickles only state and param groups; a fastavg optimizer keeps its averages and counts, and the
    copy's state entries are views of the copy's own buffers."""
    if backend == "cpu" and fastavg.backend_status()["cpu"]:
        pytest.skip(fastavg.backend_status()["cpu"])
    params, opt, _ = _build(impl, "adamw", averager, backend)
    for step in range(3):
        set_grads(params, step)
        opt.step()
    copies = [copy.deepcopy((params, opt)), _roundtrip((params, opt))]
    for step in range(3, 5):
        for ps, o in copies + [(params, opt)]:
            set_grads(ps, step)
            o.step()
    for ps, o in copies:
        assert o.state_dict()["fastavg"] == opt.state_dict()["fastavg"]
        for p, q in zip(ps, params):
            assert torch.equal(p, q)
            for name, value in opt.state[q].items():
                assert torch.equal(o.state[p][name], value), name
        if averager != "none":
            for a, b in zip(o.averaged_parameters(), opt.averaged_parameters()):
                assert torch.equal(a, b)
        assert o.state.averaging == (averager != "none")


def test_averages_missing_from_a_state_dict_start_from_the_weights():
    """A frozen parameter is never stepped: torch.optim keeps no entry for it, so a round trip through torch (or
    torch.distributed.checkpoint) carries no averages for it; they start from θ again, and capturable stays."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    opt = fastavg.AdamW(model.parameters(), lr=0.01, average=fastavg.EMA(0.9), capturable=True)
    for step in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    through_torch = torch.optim.AdamW(model.parameters())
    through_torch.load_state_dict(copy.deepcopy(opt.state_dict()))
    back = fastavg.AdamW(model.parameters(), average=fastavg.EMA(0.9))
    back.load_state_dict(copy.deepcopy(through_torch.state_dict()))
    assert back.state_dict()["fastavg"]["step"] == 3
    assert back.param_groups[0]["capturable"] is False
    for ours, theirs in zip(back.averaged_parameters(), opt.averaged_parameters()):
        assert torch.equal(ours, theirs)


def test_dcp_resumes_with_a_frozen_parameter(tmp_path):
    """torch.distributed.checkpoint in one process: a fresh optimizer lists what DCP would step (the parameters that
    require grad), so a checkpoint without the frozen parameter's entry loads, and its average is θ."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        model[1].bias.requires_grad_(False)
        return model, fastavg.AdamW(model.parameters(), lr=0.01, average=fastavg.EMA(0.9))

    saved_model, saved = build()
    for step in range(3):
        saved_model(torch.randn(2, 4)).sum().backward()
        saved.step()
        saved.zero_grad()
    dcp.save({"optim": get_optimizer_state_dict(saved_model, saved)}, checkpoint_id=str(tmp_path))
    model, resumed = build()
    model.load_state_dict(saved_model.state_dict())
    state = {"optim": get_optimizer_state_dict(model, resumed)}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(model, resumed, state["optim"])
    assert resumed.state_dict()["fastavg"]["step"] == 3
    for ours, theirs in zip(resumed.averaged_parameters(), saved.averaged_parameters()):
        assert torch.equal(ours, theirs)
