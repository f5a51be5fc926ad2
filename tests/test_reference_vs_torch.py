"""The reference against independent oracles: torch.optim and torch.optim.swa_utils, in float64."""
import itertools

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fastavg import reference

STEPS = 20


def _make_params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (1,), (4, 2, 3)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _grads(params, step, skip=None):
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        p.grad = None if skip is not None and skip(i, step) else torch.randn(p.shape, generator=g, dtype=p.dtype)


def _run_pair(ours_cls, torch_cls, kwargs, torch_kwargs=None, steps=STEPS, skip=None):
    a, b = _make_params(), _make_params()
    ours = ours_cls(a, **kwargs)
    theirs = torch_cls(b, **(torch_kwargs if torch_kwargs is not None else kwargs))
    sched_a = torch.optim.lr_scheduler.LambdaLR(ours, lambda s: 1.0 / (1 + 0.3 * s) + 0.1 * (s % 3))
    sched_b = torch.optim.lr_scheduler.LambdaLR(theirs, lambda s: 1.0 / (1 + 0.3 * s) + 0.1 * (s % 3))
    for step in range(steps):
        _grads(a, step, skip)
        _grads(b, step, skip)
        ours.step()
        theirs.step()
        sched_a.step()
        sched_b.step()
    return a, b, ours, theirs


def _assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


SGD_FLAGS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.1], [False, True])
    if not (n and (m == 0 or d != 0))
]


@pytest.mark.parametrize("flags", SGD_FLAGS, ids=str)
def test_sgd_matches_torch(flags):
    a, b, _, _ = _run_pair(reference.SGD, torch.optim.SGD, dict(lr=0.05, **flags))
    _assert_same(a, b)


ADAM_FLAGS = [
    dict(weight_decay=wd, amsgrad=ams, maximize=mx, betas=betas)
    for wd, ams, mx, betas in itertools.product([0.0, 0.1], [False, True], [False, True], [(0.9, 0.999), (0.5, 0.9)])
]


@pytest.mark.parametrize("flags", ADAM_FLAGS, ids=str)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_matches_torch(name, flags):
    a, b, _, _ = _run_pair(getattr(reference, name), getattr(torch.optim, name), dict(lr=0.01, **flags))
    _assert_same(a, b)


def test_none_grad_skips_parameter_like_torch():
    skip = lambda i, step: i == 1 and step % 3 == 0  # noqa: E731
    a, b, ours, theirs = _run_pair(reference.AdamW, torch.optim.AdamW, dict(lr=0.01), skip=skip)
    _assert_same(a, b)
    for p, q in zip(a, b):
        assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"])


def test_heavy_ball_equals_torch_sgd_at_constant_lr():
    a, b = _make_params(), _make_params()
    ours = reference.SGD(a, lr=0.05, momentum=0.9, momentum_style="heavy_ball")
    theirs = torch.optim.SGD(b, lr=0.05, momentum=0.9)
    for step in range(STEPS):
        _grads(a, step)
        _grads(b, step)
        ours.step()
        theirs.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_heavy_ball_keeps_lr_inside_velocity():
    (p,) = _make_params()[:1]
    opt = reference.SGD([p], lr=1.0, momentum=0.5, momentum_style="heavy_ball")
    theta0 = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()  # v = -1, θ = θ0 - 1
    opt.param_groups[0]["lr"] = 2.0
    opt.step()  # v = 0.5 * -1 - 2 = -2.5, θ = θ0 - 3.5
    torch.testing.assert_close(p.detach(), theta0 - 3.5)


def _model_and_params():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    return model, list(model.parameters())


def _train_with_averaged_model(average, averaged_model, steps=STEPS):
    model, params = _model_and_params()
    twin, twin_params = _model_and_params()
    twin.load_state_dict(model.state_dict())
    ours = reference.SGD(params, lr=0.1, momentum=0.9, average=average)
    theirs = torch.optim.SGD(twin_params, lr=0.1, momentum=0.9)
    swa = averaged_model(twin)
    for step in range(steps):
        _grads(params, step)
        _grads(twin_params, step)
        ours.step()
        theirs.step()
        swa.update_parameters(twin)
    return ours, list(swa.module.parameters())


@pytest.mark.parametrize("decay", [0.9, 0.5, 0.0])
def test_ema_matches_averaged_model(decay):
    ours, expected = _train_with_averaged_model(
        reference.EMA(decay, start=1), lambda m: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(decay))
    )
    _assert_same(ours.averaged_parameters(), expected)


def test_multi_decay_ema_matches_one_averaged_model_per_decay():
    decays = (0.9, 0.99)
    ours, _ = _train_with_averaged_model(reference.EMA(decays, start=1), AveragedModel)
    for k, decay in enumerate(decays):
        _, expected = _train_with_averaged_model(
            reference.EMA(decay, start=1), lambda m, d=decay: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(d))
        )
        _assert_same(ours.averaged_parameters(k), expected)


def test_swa_matches_averaged_model():
    ours, expected = _train_with_averaged_model(reference.SWA(), AveragedModel)
    _assert_same(ours.averaged_parameters(), expected)


def test_lawa_is_mean_of_last_k_snapshots():
    k, every, start = 3, 2, 1
    params = _make_params()
    opt = reference.SGD(params, lr=0.1, momentum=0.9, average=reference.LAWA(k, every=every, start=start))
    snapshots = []
    for step in range(1, STEPS + 1):
        _grads(params, step)
        opt.step()
        if step > start and (step - start) % every == 0:
            snapshots.append([p.detach().clone() for p in params])
        expected = (
            [p.detach() for p in params] if not snapshots
            else [torch.stack(s).mean(0) for s in zip(*snapshots[-k:])]
        )
        _assert_same(opt.averaged_parameters(), expected)


def test_ema_warmups_follow_documented_decay():
    ema = reference.EMA(0.999, warmup="tf")
    assert ema.decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema.decay_at(0.999, 10**6) == 0.999
    power = reference.EMA(0.9999, warmup="power", min_decay=0.1)
    assert power.decay_at(0.9999, 1) == pytest.approx(1 - 2 ** (-2 / 3))
    assert reference.EMA(0.9, warmup="power", min_decay=0.5).decay_at(0.9, 1) == 0.5


def test_ema_start_and_every_schedule():
    (p,) = _make_params()[:1]
    ema = reference.EMA(0.5, start=2, every=3)
    opt = reference.SGD([p], lr=0.1, average=ema)
    expected = p.detach().clone()
    for step in range(1, 12):
        _grads([p], step)
        opt.step()
        if step <= 2:
            expected = p.detach().clone()
        elif (step - 2) % 3 == 0:
            expected = expected + 0.5 * (p.detach() - expected)
        _assert_same(opt.averaged_parameters(), [expected])


def test_sema_switches_on_documented_steps_and_keeps_optimizer_state():
    params = _make_params()
    twin = _make_params()
    opt = reference.AdamW(params, lr=0.01, average=reference.SEMA(0.9, switch_every=4, switch_start=2))
    plain = reference.AdamW(twin, lr=0.01, average=reference.EMA(0.9))
    for step in range(1, 13):
        _grads(params, step)
        _grads(twin, step)
        opt.step()
        plain.step()
        switched = step > 2 and (step - 2) % 4 == 0
        for p, e in zip(params, opt.averaged_parameters()):
            assert torch.equal(p.detach(), e) == switched
        if switched:
            for p, q in zip(params, twin):
                for name in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(opt.state[p][name], plain.state[q][name])
                assert torch.equal(opt.state[p]["average_0"], plain.state[q]["average_0"])
            for p, q in zip(twin, plain.averaged_parameters()):
                p.data.copy_(q)
    assert [s for s in range(1, 13) if s > 2 and (s - 2) % 4 == 0] == [6, 10]


def test_belay_without_spring_forces_is_ema():
    a, b = _make_params(), _make_params()
    belay = reference.SGD(a, lr=0.1, momentum=0.9, average=reference.BELAY(0.9, reaction=0.0, inertia=0.0))
    ema = reference.SGD(b, lr=0.1, momentum=0.9, average=reference.EMA(0.9))
    for step in range(STEPS):
        _grads(a, step)
        _grads(b, step)
        belay.step()
        ema.step()
    _assert_same(a, b)
    _assert_same(belay.averaged_parameters(), ema.averaged_parameters())


@pytest.mark.parametrize("reaction", [0.1, 1.0, 3.0])
def test_belay_spring_conserves_mass_weighted_centre(reaction):
    params = _make_params()
    opt = reference.SGD(params, lr=0.0, average=reference.BELAY(0.9, reaction=reaction))
    for step in range(STEPS):
        _grads(params, step)
        before = [reaction * e + p.detach() for p, e in zip(params, opt.averaged_parameters())]
        opt.step()
        after = [reaction * e + p.detach() for p, e in zip(params, opt.averaged_parameters())]
        _assert_same(after, before)
