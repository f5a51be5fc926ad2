"""Shared test helpers: per-dtype tolerances (the one place they are derived) and small models."""
import torch

import fastavg
from fastavg import reference


def tolerance(dtype: torch.dtype) -> dict:
    """rtol/atol for comparing a backend with the reference on parameters of ``dtype``.

    fp32: the kernels and the reference round differently in the last bit, so 1e-6 relative.
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
    """``layout`` is a size (one tensor) or ``"many"`` (300 tensors of mixed shapes)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "many":
        shapes = [(1 + (7 * i) % 13, 1 + (3 * i) % 5) if i % 3 else (1 + (11 * i) % 37,) for i in range(300)]
    else:
        shapes = [(layout,)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def set_grads(params, step, skip=None):
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g).to(p.dtype)
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
}


def make_pair(optimizer, averager, layout, dtype, backend):
    """The same optimizer on two identical parameter sets: fastavg's (``backend``) and the reference."""
    name, kwargs = OPTIMIZERS[optimizer]
    ours = make_params(layout, dtype)
    ref = make_params(layout, dtype)
    fused = getattr(fastavg, name)(ours, average=AVERAGERS[averager](), backend=backend, **kwargs)
    spec = getattr(reference, name)(ref, average=AVERAGERS[averager](), **kwargs)
    return ours, ref, fused, spec


def assert_same_state(fused, spec, ours, ref, dtype):
    for p, q in zip(ours, ref):
        assert_close(p.detach(), q.detach(), dtype)
        for key, value in spec.state[q].items():
            if key != "step":
                assert_close(fused.state[p][key], value, dtype)
        assert float(fused.state[p]["step"]) == float(spec.state[q]["step"])
    if spec.average is not None:
        for k in range(max(spec.average.num_averages, 1)):
            for a, b in zip(fused.averaged_parameters(k), spec.averaged_parameters(k)):
                assert_close(a, b, dtype)
