"""BEMA (Block & Zhang, arXiv 2508.00180) as TRL's ``BEMACallback`` runs it.

Every backend against a float64 transcription of TRL's rule on the same trajectory of θ, read at every
step (before ``update_after``, between it and the first update, after updates), and against TRL's callback
itself where TRL installs. The backends against the reference on every layout, and the bit-exact resume,
run with helpers' ``bema`` averager in test_backends_vs_reference.py, test_triton.py, test_cuda.py and
test_state_dict.py.
"""
import types

import pytest
import torch

import fastavg
from fastavg import reference
from fastavg.averaging import RULE_EMA, RULE_NONE

from helpers import IMPLS, impl_device, impl_params, make_params, set_grads

TOL = dict(rtol=1e-5, atol=1e-5)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# TRL's defaults but a short update_freq; with update_after > 0 (θ₀ taken mid-run) and with a floor on β.
CONFIGS = {
    "defaults": dict(update_freq=4),
    "update_after": dict(update_freq=3, update_after=5, lag=2, multiplier=0.5, ema_power=0.7, bias_power=0.3),
    "min_ema": dict(update_freq=2, update_after=1, min_ema_multiplier=0.3),
}
STEPS = 20


class _Transcription:
    """TRL's ``BEMACallback`` in float64, written from its source: ``on_train_begin`` then ``on_step_end``."""

    def __init__(self, thetas, update_freq=400, ema_power=0.5, bias_power=0.2, lag=10, update_after=0,
                 multiplier=1.0, min_ema_multiplier=0.0):
        self.__dict__.update(locals())
        self.theta0 = [p.double().clone() for p in thetas]
        self.ema = [p.double().clone() for p in thetas]
        self.running = [p.double().clone() for p in thetas]

    def on_step_end(self, step, thetas):
        if step < self.update_after:
            return
        if step == self.update_after:
            self.theta0 = [p.double().clone() for p in thetas]
            self.ema = [p.double().clone() for p in thetas]
        elif (step - self.update_after) % self.update_freq == 0:
            beta = max((self.lag + self.multiplier * step) ** (-self.ema_power), self.min_ema_multiplier)
            alpha = (self.lag + self.multiplier * step) ** (-self.bias_power)
            for i, theta in enumerate(thetas):
                self.ema[i] = (1 - beta) * self.ema[i] + beta * theta.double()
                self.running[i] = self.ema[i] + alpha * (theta.double() - self.theta0[i])


def _build(impl, params, average):
    if impl == "spec":
        return reference.AdamW(params, lr=0.05, weight_decay=0.1, average=average)
    return fastavg.AdamW(params, lr=0.05, weight_decay=0.1, average=average, backend=impl)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_a_float64_transcription_of_trls_rule(impl, dtype, config):
    params = impl_params(impl, 33, dtype) + impl_params(impl, 7, dtype, seed=1)
    opt = _build(impl, params, fastavg.BEMA(**CONFIGS[config]))
    spec = _Transcription([p.detach() for p in params], **CONFIGS[config])
    for step in range(1, STEPS + 1):
        set_grads(params, step)
        opt.step()
        spec.on_step_end(step, [p.detach() for p in params])
        for ours, theirs in zip(opt.averaged_parameters(), spec.running):
            torch.testing.assert_close(ours.double(), theirs, **TOL)
    with opt.swap_average():
        for p, theirs in zip(params, spec.running):
            torch.testing.assert_close(p.detach().double(), theirs, rtol=torch.finfo(dtype).eps, atol=1e-5)


class _Tiny(torch.nn.Module):
    """Built from a config, as TRL's callback rebuilds its running model: ``type(model)(model.config)``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.first = torch.nn.Linear(13, 9)
        self.second = torch.nn.Linear(9, 3)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_trls_bema_callback(impl, config):
    callbacks = pytest.importorskip("trl.trainer.callbacks")
    torch.manual_seed(0)
    model = _Tiny(types.SimpleNamespace()).to(impl_device(impl))
    opt = _build(impl, list(model.parameters()), fastavg.BEMA(**CONFIGS[config]))
    callback = callbacks.BEMACallback(**CONFIGS[config])
    callback.on_train_begin(None, None, None, model=model)
    x = torch.randn(32, 13, device=impl_device(impl))
    for step in range(1, STEPS + 1):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        callback.on_step_end(None, types.SimpleNamespace(global_step=step), None, model=model)
        for ours, theirs in zip(opt.averaged_parameters(), callback.running_model.parameters()):
            torch.testing.assert_close(ours.cpu(), theirs.detach(), **TOL)


def test_plan_follows_trls_steps():
    bema = fastavg.BEMA(update_freq=3, update_after=2, lag=4.0, multiplier=2.0)
    plans = {t: bema.plan(t) for t in range(1, 10)}
    assert [t for t, plan in plans.items() if plan.rule == RULE_NONE] == [1, 3, 4, 6, 7, 9]
    assert plans[2].weights == (1.0, 1.0) and plans[2].averages == (0, 2)  # EMA ← θ, θ₀ ← θ
    for t in (5, 8):
        assert plans[t].rule == RULE_EMA and plans[t].averages == ()
        assert plans[t].weights == ((4.0 + 2.0 * t) ** -0.5, 1.0)  # EMA ← lerp(EMA, θ, β_t), θ_u ← θ
    assert [bema.last_update(t) for t in range(1, 10)] == [0, 0, 0, 0, 5, 5, 5, 8, 8]


def test_only_the_bema_weights_are_served():
    params = make_params(7, torch.float32)
    opt = fastavg.AdamW(params, average=fastavg.BEMA())
    with pytest.raises(IndexError, match=r"index must be in \[0, 1\)"):
        opt.averaged_parameters(1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(update_freq=0), ValueError, "update_freq must be >= 1"),
    (dict(update_freq=2.5), TypeError, "update_freq must be an int"),
    (dict(update_after=-1), ValueError, "update_after must be >= 0"),
    (dict(ema_power=-0.5), ValueError, "ema_power must be >= 0"),
    (dict(bias_power=float("inf")), ValueError, "bias_power must be >= 0 and finite"),
    (dict(lag="10"), TypeError, "lag must be a number"),
    (dict(min_ema_multiplier=1.5), ValueError, r"min_ema_multiplier must be in \[0, 1\]"),
    (dict(min_ema_multiplier=None), TypeError, "min_ema_multiplier must be a number"),
    (dict(lag=0, multiplier=0), ValueError, "set lag > 0 or multiplier > 0"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastavg.BEMA(**kwargs)
