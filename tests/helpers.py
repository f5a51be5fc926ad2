"""Shared test helpers: per-dtype tolerances (the one place they are derived) and small models."""
import pytest
import torch

import fastavg
from fastavg import reference


def tolerance(dtype: torch.dtype) -> dict:
    """rtol/atol for comparing a backend with the reference on parameters of ``dtype``.

    fp32: contraction is off in every backend (no fused multiply-add; see README), so each operation rounds as in
    the reference; the kernels still differ from torch's ops in the last bit of some elements (torch's vectorized
    pow, division and square root, and the order in which a few terms are summed), so 1e-6 relative.
    bf16/fp16: one fp32 ulp of difference can flip the rounding of θ to the parameter dtype, so one
    ulp of that dtype, which then also bounds the fp32 averages fed from θ.
    float64 (reference against torch): 1e-12.
    """
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=1e-6, atol=1e-6)
    eps = torch.finfo(dtype).eps
    return dict(rtol=eps, atol=eps)


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **tolerance(dtype))


SIZES = [1, 7, 1023, 4097, 2**20 + 3]


def make_params(layout, dtype, seed=0):
    """``layout`` is a size (one tensor), ``"many"`` (300 tensors of mixed shapes) or ``"views"``: leaves
    that the kernels reach in every way (storage offsets that break 16-byte alignment, a transpose, a
    channels_last 4-D tensor, gaps in memory that take the staging copy, one sharing a storage)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "views":
        base = torch.randn(4100, generator=g).to(dtype)
        return [
            base[1:1024].detach().requires_grad_(),  # storage offset 1: unaligned
            base[1027:1027 + 15 * 7].view(15, 7).t().detach().requires_grad_(),  # transposed, dense
            torch.randn(2, 5, 3, 4, generator=g).to(dtype).to(memory_format=torch.channels_last).requires_grad_(),
            torch.randn(9, 12, generator=g).to(dtype)[:, ::2].detach().requires_grad_(),  # gaps: staged
            base[2048:2048 + 70001 // 64].detach().requires_grad_(),  # shares base's storage
            torch.randn(70001, generator=g).to(dtype).requires_grad_(),  # several segment rows
        ]
    if layout == "many":
        shapes = [(1 + (7 * i) % 13, 1 + (3 * i) % 5) if i % 3 else (1 + (11 * i) % 37,) for i in range(300)]
    else:
        shapes = [(layout,)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def set_grads(params, step, skip=None):
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
        if skip is not None and skip(i, step):
            p.grad = None
        elif p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)


OPTIMIZERS = {
    "sgd_torch": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "sgd_nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    "sgd_heavy_ball": ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01, momentum_style="heavy_ball")),
    "adam": ("Adam", dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=0.1, maximize=True)),
}

AVERAGERS = {
    "none": lambda: None,
    "ema": lambda: fastavg.EMA((0.9, 0.99), start=1),
    "ema_every": lambda: fastavg.EMA(0.9, warmup="tf", every=2),
    "belay": lambda: fastavg.BELAY(0.9, reaction=0.5, inertia=0.5),
    "swa": lambda: fastavg.SWA(start=1),
    "lawa": lambda: fastavg.LAWA(3, every=1),
    "sema": lambda: fastavg.SEMA(0.9, switch_every=2),
    "power_ema": lambda: fastavg.PowerEMA((0.05, 0.2)),
    # θ₀ snapshot at step 1, an update at step 3 (of 4): every kind of BEMA step within a short run.
    "bema": lambda: fastavg.BEMA(update_freq=2, update_after=1, lag=3),
}


def _copy_grads(source, params):
    """``source``'s gradients onto ``params`` (any device), with torch's semantics: None stays None."""
    for q, p in zip(source, params):
        if q.grad is None:
            p.grad = None
        elif p.grad is None:
            p.grad = q.grad.to(p.device, copy=True)
        else:
            p.grad.copy_(q.grad)


def _twin(p, device):
    """A leaf with ``p``'s values and memory layout on ``device`` (views stay views of a storage of their own)."""
    if p.device.type == device and p.data_ptr() != p.untyped_storage().data_ptr():
        storage = torch.empty(p.untyped_storage().nbytes() // p.element_size(), dtype=p.dtype)
        twin = storage.as_strided(p.shape, p.stride(), p.storage_offset())
        twin.copy_(p.detach())
        return twin.requires_grad_()
    return p.detach().to(device, copy=True).requires_grad_()


def run_against_reference(backend, optimizer, averager, layout, dtype, device="cpu", steps=4, skip=None,
                          flat_params=False):
    """``steps`` steps of fastavg's ``backend`` and of the reference on the same parameters, gradients and
    LR schedule (``skip(i, step)`` drops gradients), then every parameter, state and average compared."""
    name, kwargs = OPTIMIZERS[optimizer]
    host = make_params(layout, dtype)
    ours = [_twin(p, device) for p in host]
    ref = [_twin(p, device) for p in host]
    fused = getattr(fastavg, name)(ours, average=AVERAGERS[averager](), backend=backend, flat_params=flat_params,
                                   **kwargs)
    spec = getattr(reference, name)(ref, average=AVERAGERS[averager](), **kwargs)
    assert set(fused.backends()) == {backend}
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s)) for opt in (fused, spec)]
    for step in range(steps):
        set_grads(host, step, skip)
        _copy_grads(host, ours)
        _copy_grads(host, ref)
        fused.step()
        spec.step()
        for schedule in schedules:
            schedule.step()
    assert_same_state(fused, spec, ours, ref, dtype)


def assert_same_state(fused, spec, ours, ref, dtype):
    for p, q in zip(ours, ref):
        assert_close(p.detach(), q.detach(), dtype)
        for key, value in spec.state[q].items():
            if key != "step":
                assert_close(fused.state[p][key], value, dtype)
        assert float(fused.state[p]["step"]) == float(spec.state[q]["step"])
    if spec.average is not None:
        for k in range(spec.average.num_outputs):
            for a, b in zip(fused.averaged_parameters(k), spec.averaged_parameters(k)):
                assert_close(a, b, dtype)


def available(backend):
    """``backend`` as a pytest parameter, skipped with the reason when it is not available here."""
    reason = fastavg.backend_status()[backend]
    return pytest.param(backend, marks=pytest.mark.skipif(bool(reason), reason=reason))


# "spec" is fastavg.reference's own optimizer; the others are fastavg's fused optimizer on that backend.
IMPLS = ["spec", "reference", available("cpu"), available("triton"), available("cuda")]


def impl_device(impl):
    """Where ``impl`` runs: Triton and CUDA on the GPU when there is one (Triton interpreted on CPU tensors
    without)."""
    return "cuda" if impl in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


def impl_params(impl, layout, dtype, seed=0):
    return [p.detach().to(impl_device(impl)).requires_grad_() for p in make_params(layout, dtype, seed)]
