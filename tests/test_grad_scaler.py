"""torch.amp.GradScaler in the kernels: fastavg's fused optimizers take GradScaler's scale and found_inf
(``_step_supports_amp_scaling``), unscale the gradients in registers and, on an inf or NaN, change nothing:
parameters, optimizer state, averages and every counter end as if the step never happened.

Against torch.optim (fused and not) under its own GradScaler for the optimizer's numbers and the scale's
growth and backoff, and against fastavg.reference's optimizers, which GradScaler drives the usual way (unscale the
gradients, skip ``step()`` on an inf), for the averages and counters. Infs are injected into a gradient on chosen
steps. Every backend that runs here: cpu, reference, triton (its interpreter, TRITON_INTERPRET=1 from conftest.py).
"""
import pytest
import torch

import fastavg
from fastavg import _backends, reference
from fastavg.averaging import RULE_BELAY, RULE_EMA, RULE_NONE

from helpers import tolerance


def _backend(name):
    backend, reason = _backends._status()[name]
    return pytest.param(name, marks=pytest.mark.skipif(backend is None, reason=reason or ""))


BACKENDS = [_backend("cpu"), _backend("reference"), _backend("triton")]
STEPS = 10
INF_STEPS = (2, 3, 7)  # 0-based steps whose gradients hold an inf (3 skipped steps, two of them in a row)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5)).to(dtype)


def _scaler():
    # A power-of-two scale that grows every 2 clean steps and backs off on each inf.
    return torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)


def _train(model, opt, scaler, steps=STEPS, unscale_first=False, after_step=None):
    """``steps`` GradScaler steps; returns the scale after each."""
    g = torch.Generator().manual_seed(1)
    scales = []
    dtype = next(model.parameters()).dtype
    for step in range(steps):
        x = torch.randn(8, 13, generator=g).to(dtype)
        loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        if step in INF_STEPS:
            first = next(model.parameters())
            first.grad.view(-1)[3] = float("inf") if step % 2 else float("nan")
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
        if after_step is not None:
            after_step(step)
    return scales


def _assert_same_params(ours, theirs, dtype=torch.float32):
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), **tolerance(dtype))


@pytest.mark.parametrize("fused", [True, False], ids=["torch_fused", "torch_foreach"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_under_grad_scaler_matches_torch(backend, fused):
    ours, theirs = _model(), _model()
    opt = fastavg.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1, fused=fused, foreach=not fused)
    assert opt._step_supports_amp_scaling
    our_scales = _train(ours, opt, _scaler())
    their_scales = _train(theirs, ref, _scaler())
    assert our_scales == their_scales  # growth and backoff identical
    assert len(set(our_scales)) > 2
    _assert_same_params(ours, theirs)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        ours_state, theirs_state = opt.state[p], ref.state[q]
        assert float(ours_state["step"]) == float(theirs_state["step"]) == STEPS - len(INF_STEPS)
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours_state[name], theirs_state[name], **tolerance(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_momentum_under_grad_scaler_matches_torch(backend):
    ours, theirs = _model(), _model()
    opt = fastavg.SGD(ours.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, backend=backend)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    assert _train(ours, opt, _scaler()) == _train(theirs, ref, _scaler())
    _assert_same_params(ours, theirs)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                   **tolerance(torch.float32))


AVERAGERS = {
    "ema": lambda: fastavg.EMA(0.8),
    "ema_tf_multi": lambda: fastavg.EMA((0.8, 0.95), warmup="tf"),
    "swa": lambda: fastavg.SWA(start=1),
    "lawa": lambda: fastavg.LAWA(k=2, every=2),
    "sema": lambda: fastavg.SEMA(0.8, switch_every=3),
    "belay": lambda: fastavg.BELAY(0.8, reaction=0.5, inertia=0.2),
    "power_ema": lambda: fastavg.PowerEMA((0.05, 0.1)),
    "bema": lambda: fastavg.BEMA(update_after=2, update_freq=2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("averager", list(AVERAGERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_averages_and_counters_skip_inf_steps_like_the_reference(backend, averager, dtype):
    """fastavg (GradScaler in the kernel) against fastavg.reference (GradScaler's usual path: no step() on an inf):
    the same parameters, state, averages and counters after every step."""
    ours, theirs = _model(dtype), _model(dtype)
    opt = fastavg.AdamW(ours.parameters(), lr=1e-2, average=AVERAGERS[averager](), backend=backend)
    ref = reference.AdamW(theirs.parameters(), lr=1e-2, average=AVERAGERS[averager]())
    assert opt._step_supports_amp_scaling and not getattr(ref, "_step_supports_amp_scaling", False)
    our_scaler, their_scaler = _scaler(), _scaler()
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randn(8, 13, generator=g).to(dtype)
        for model, optimizer, scaler in ((ours, opt, our_scaler), (theirs, ref, their_scaler)):
            scaler.scale(model(x).float().square().mean()).backward()
            if step in INF_STEPS:
                next(model.parameters()).grad.view(-1)[3] = float("inf")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        assert our_scaler.get_scale() == their_scaler.get_scale()
        assert opt._average_step == ref._average_step
        _assert_same_params(ours, theirs, dtype)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])
        for index in range(opt.average.num_outputs):
            for a, b in zip(opt.averaged_parameters(index), ref.averaged_parameters(index)):
                torch.testing.assert_close(a, b, **tolerance(dtype))
    assert opt._average_step == STEPS - len(INF_STEPS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_already_unscaled_gradients(backend):
    """scaler.unscale_(opt) before scaler.step(opt): GradScaler passes no scale (grad_scale None), only found_inf."""
    ours, theirs = _model(), _model()
    opt = fastavg.Adam(ours.parameters(), lr=1e-2, amsgrad=True, backend=backend)
    ref = torch.optim.Adam(theirs.parameters(), lr=1e-2, amsgrad=True, fused=True)
    seen = []
    step_of = opt.step

    def spy(*args, **kwargs):
        seen.append((getattr(opt, "grad_scale", "unset"), getattr(opt, "found_inf", "unset")))
        return step_of(*args, **kwargs)

    opt.step = spy
    assert _train(ours, opt, _scaler(), unscale_first=True) == _train(theirs, ref, _scaler(), unscale_first=True)
    assert all(grad_scale is None and isinstance(found_inf, torch.Tensor) for grad_scale, found_inf in seen)
    _assert_same_params(ours, theirs)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])
        torch.testing.assert_close(opt.state[p]["max_exp_avg_sq"], ref.state[q]["max_exp_avg_sq"],
                                   **tolerance(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_unscaled_in_registers_not_written_back(backend):
    model = _model()
    opt = fastavg.AdamW(model.parameters(), backend=backend)
    scaler = _scaler()
    scaler.scale(model(torch.randn(4, 13)).square().mean()).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    for p, grad in zip(model.parameters(), scaled):
        assert torch.equal(p.grad, grad)  # torch's fused kernels leave p.grad unscaled; fastavg leaves it as it was


def test_step_supports_amp_scaling_unless_the_averager_acts_on_the_host(tmp_path):
    params = list(_model().parameters())
    for average in (None, fastavg.EMA(0.9), fastavg.LAWA(k=2), fastavg.BEMA(), fastavg.SWA(), fastavg.SEMA(0.9, switch_every=5),
                    fastavg.PowerEMA((0.05,))):
        assert fastavg.AdamW(params, average=average)._step_supports_amp_scaling
    # PowerEMA writing snapshots must know on the host, right after the step, whether it happened.
    opt = fastavg.SGD(params, lr=0.1, average=fastavg.PowerEMA((0.05,), snapshot_every=2, snapshot_dir=tmp_path))
    assert not opt._step_supports_amp_scaling
    model = _model()
    opt = fastavg.AdamW(model.parameters(),
                        average=fastavg.PowerEMA((0.05,), snapshot_every=2, snapshot_dir=tmp_path))
    ref_model = _model()
    ref = torch.optim.AdamW(ref_model.parameters())
    assert _train(model, opt, _scaler(), steps=5) == _train(ref_model, ref, _scaler(), steps=5)
    _assert_same_params(model, ref_model)
    assert opt._average_step == 5 - sum(s < 5 for s in INF_STEPS)


# --- the ops: found_inf and grad_scale on every backend --------------------------------------------------
def _op_case(seed=0, numel=3000):
    from fastavg import _segments

    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(numel, generator=g), torch.randn(37, generator=g)]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    offsets = [0, numel + 8]
    flat = offsets[-1] + 64
    table = _segments.build(params, grads, offsets, torch.device("cpu"))
    state = [torch.randn(flat, generator=g) * 0.1, torch.rand(flat, generator=g) * 0.01]
    averages = [torch.randn(flat, generator=g)]
    return params, grads, table, state, averages


def _adam(ops, case, grad_scale=None, found_inf=None, rule=RULE_EMA):
    params, grads, table, state, averages = case
    ops.adam_step_(params, grads, table, state, averages if rule != RULE_NONE else [], torch.tensor([1e-2]),
                   torch.tensor([3.0]), torch.tensor([0.1]), 0.9, 0.999, 1e-8, 0.01, True, False, False, rule, 0.5,
                   0.0, False, grad_scale=grad_scale, found_inf=found_inf)


def _ops(name):
    return _backends._status()[name][0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_change_nothing_on_found_inf(backend):
    ops = _ops(backend)
    case = _op_case()
    before = [t.clone() for group in case[:2] + case[3:] for t in group]
    _adam(ops, case, grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0))
    params, grads, table, state, averages = case
    ops.sgd_step_(params, grads, table, state[:1], averages, torch.tensor([0.1]), torch.tensor([2.0]),
                  torch.tensor([0.1]), 0.9, 0.0, 0.0, False, False, False, RULE_EMA, 0.0, 0.0, True,
                  grad_scale=None, found_inf=torch.tensor([2.0]))
    ops.average_(params, table[:, :], averages, torch.tensor([0.5]), RULE_BELAY, 1.0, 0.0, True,
                 found_inf=torch.tensor(1.0))
    after = [t for group in case[:2] + case[3:] for t in group]
    for a, b in zip(after, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_unscale_like_pre_divided_gradients(backend):
    """grad_scale = 2^k: the step equals the step on gradients divided by 2^k beforehand, bit for bit; found_inf = 0
    changes nothing about the step."""
    ops = _ops(backend)
    scaled, plain = _op_case(), _op_case()
    for g in scaled[1]:
        g.mul_(2.0**14)
    _adam(ops, scaled, grad_scale=torch.tensor(2.0**14), found_inf=torch.tensor(0.0))
    _adam(ops, plain)
    for a, b in zip(scaled[0] + scaled[3] + scaled[4], plain[0] + plain[3] + plain[4]):
        assert torch.equal(a, b)
    assert torch.equal(scaled[1][0], plain[1][0] * 2.0**14)  # the gradients are not written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the deferred found_inf read")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_counters_settle_without_a_sync_in_the_step(backend):
    """On a GPU the step does not read found_inf: a pinned copy and an event settle the counts at the next step,
    state_dict or averaged_parameters. Same numbers and counts as torch.optim.AdamW(fused=True) + GradScaler."""
    if _backends._status()[backend][0] is None:
        pytest.skip(_backends._status()[backend][1])
    ours, theirs = _model().cuda(), _model().cuda()
    opt = fastavg.AdamW(ours.parameters(), lr=1e-2, average=fastavg.EMA(0.8), backend=backend)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=2) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randn(8, 13, generator=g).cuda()
        for model, optimizer, scaler in ((ours, opt, scalers[0]), (theirs, ref, scalers[1])):
            scaler.scale(model(x).square().mean()).backward()
            if step in INF_STEPS:
                next(model.parameters()).grad.view(-1)[3] = float("inf")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    state = opt.state_dict()["state"]
    assert opt._average_step == STEPS - len(INF_STEPS)
    assert scalers[0].get_scale() == scalers[1].get_scale()
    for k, (p, q) in enumerate(zip(ours.parameters(), theirs.parameters())):
        assert float(state[k]["step"]) == float(ref.state[q]["step"]) == STEPS - len(INF_STEPS)
        torch.testing.assert_close(p, q, **tolerance(torch.float32))
