"""Which kernels run a bucket's step: ``reference`` (pure torch), ``cpu`` and ``cuda`` (the compiled
extension ``fastavg._C``), ``triton``. Every backend exposes the three ops with one signature:

``adam_step_(params, grads, segments, optimizer_state, average_state, lr, step, average_weights, beta1, beta2,
eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, average_rule, reaction, inertia, switch_to_average,
grad_scale=None, found_inf=None)``

``sgd_step_(params, grads, segments, optimizer_state, average_state, lr, step, average_weights, momentum,
dampening, weight_decay, nesterov, maximize, heavy_ball, average_rule, reaction, inertia, switch_to_average,
grad_scale=None, found_inf=None)``

``average_(params, segments, average_state, average_weights, average_rule, reaction, inertia, switch_to_average,
found_inf=None)``
(averaging alone: it writes ``params`` only for BELAY, whose spring pulls θ, or a switch; otherwise every backend
leaves the parameters' memory untouched)

``params``/``grads`` are lists of dense tensors of one dtype and device and ``segments`` the int64 table of
:mod:`fastavg._segments` that points into them; ``optimizer_state`` lists flat fp32 buffers (Adam: exp_avg,
exp_avg_sq[, max_exp_avg_sq]; SGD: [momentum_buffer] when momentum != 0) and ``average_state`` is
:func:`fastavg.reference.average_state`'s list of flat buffers, all indexed by the table's offsets; ``lr``,
``step`` and ``average_weights`` are fp32 tensors in the buffers' memory, read by the kernels.

``grad_scale`` and ``found_inf`` are ``torch.amp.GradScaler``'s one-value fp32 tensors (in the params' memory), read
by the kernels as torch's fused optimizers read them: the gradients are multiplied by ``1/grad_scale`` (rounded to
fp32 from float64, as ``GradScaler.unscale_`` computes it: for its power-of-two scales, exactly torch's division) in
registers and never written back (``p.grad`` keeps the scaled values, where torch's fused optimizers leave them
unscaled), and a nonzero ``found_inf`` makes the op change nothing at all.
"""
from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import torch

from . import _segments, reference
from .averaging import RULE_BELAY
from .buffers import _addresses_match_in_python

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def average_writes_params(average_rule: int, switch_to_average: bool) -> bool:
    """Whether an ``average_`` launch (averaging alone) writes its parameters: BELAY's spring pulls θ, a switch
    copies the average into it; any other rule only reads θ, and no backend stores it (csrc/fastavg_rules.h
    ``writes_param``), so that averaging alone moves the average's bytes and a read of θ."""
    return average_rule == RULE_BELAY or bool(switch_to_average)


def _reference_rows(params, grads, segments, buffers):
    """Per segment row: θ's memory, the gradient's (or None) and the row's slice of each flat buffer list."""
    for i, start, numel, offset in _segments.row_spans(segments, params):
        theta = _segments.memory_view(params[i])[start:start + numel]
        grad = _segments.memory_view(grads[i])[start:start + numel] if grads is not None else None

        def part(flat, offset=offset, numel=numel):
            return flat[offset:offset + numel]

        yield theta, grad, [[part(t) for t in group] for group in buffers]


def _skipped(found_inf) -> bool:
    """GradScaler found an inf or NaN: the op changes nothing (a host read: the reference is not sync-free)."""
    return found_inf is not None and float(found_inf.reshape(-1)[0]) != 0.0


def _unscaled(grad, dtype, grad_scale):
    """The gradient in ``dtype``, times GradScaler's ``1/scale`` (computed in float64 and rounded to fp32, as
    GradScaler.unscale_ does), on a copy: the gradient itself is never written."""
    grad = grad.to(dtype)
    if grad_scale is None:
        return grad
    inverse = torch.tensor(1.0 / float(grad_scale.reshape(-1)[0].double()), dtype=torch.float32)
    return grad * inverse.to(dtype)


def _reference_adam_step_(params, grads, segments, optimizer_state, average_state, lr, step, average_weights, beta1,
                          beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, average_rule, reaction,
                          inertia, switch_to_average, grad_scale=None, found_inf=None):
    if _skipped(found_inf):
        return
    for param, grad, (state, averages) in _reference_rows(params, grads, segments, [optimizer_state, average_state]):
        dtype = state[0].dtype
        work = param.to(dtype, copy=True)
        reference.adam_rule(work, _unscaled(grad, dtype, grad_scale), state[0], state[1], state[2] if amsgrad else None, lr=float(lr),
                            step=float(step), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                            decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize)
        _reference_average(param, reference.round_to(work, param.dtype), averages, average_weights, average_rule,
                           reaction, inertia, switch_to_average)


def _reference_sgd_step_(params, grads, segments, optimizer_state, average_state, lr, step, average_weights,
                         momentum, dampening, weight_decay, nesterov, maximize, heavy_ball, average_rule, reaction,
                         inertia, switch_to_average, grad_scale=None, found_inf=None):
    if _skipped(found_inf):
        return
    for param, grad, (state, averages) in _reference_rows(params, grads, segments, [optimizer_state, average_state]):
        dtype = reference.compute_dtype(param.dtype)
        work = param.to(dtype, copy=True)
        grad = _unscaled(grad, dtype, grad_scale)
        buffer = state[0] if state else None
        if heavy_ball:
            reference.sgd_heavy_ball_rule(work, grad.to(dtype), buffer, lr=float(lr), momentum=momentum,
                                          weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        else:
            reference.sgd_torch_rule(work, grad.to(dtype), buffer, lr=float(lr), momentum=momentum,
                                     dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                                     maximize=maximize, first_step=float(step) == 1)
        _reference_average(param, reference.round_to(work, param.dtype), averages, average_weights, average_rule,
                           reaction, inertia, switch_to_average)


def _reference_average_(params, segments, average_state, average_weights, average_rule, reaction, inertia,
                        switch_to_average, found_inf=None):
    if _skipped(found_inf):
        return
    for param, _, (averages,) in _reference_rows(params, None, segments, [average_state]):
        work = param.to(reference.compute_dtype(param.dtype), copy=True)
        # As the kernels: θ is written back only when averaging alone can change it (BELAY's pull, a switch);
        # otherwise the parameter's memory is left untouched.
        _reference_average(param, work, averages, average_weights, average_rule, reaction, inertia,
                           switch_to_average, write_param=average_writes_params(average_rule, switch_to_average))


def _reference_average(param, work, average_state, average_weights, average_rule, reaction, inertia,
                       switch_to_average, write_param=True):
    weights = average_weights.tolist() if average_state else []
    work = reference.apply_average(work, average_rule, average_state, weights, reaction=reaction, inertia=inertia,
                                   switch_to_average=switch_to_average, param_dtype=param.dtype)
    if write_param:
        param.copy_(work)


REFERENCE = SimpleNamespace(name="reference", adam_step_=_reference_adam_step_, sgd_step_=_reference_sgd_step_,
                            average_=_reference_average_, eager=None)


_LOADED = None  # (namespace of the extension's ops or None, why not, where it came from), once per process


def _extension():
    """The compiled extension's ops, loaded (or compiled just in time) on first use: see fastavg._extension."""
    global _LOADED
    if _LOADED is None:
        from . import _extension as loader

        module, reason, origin = loader.load()
        ops = None
        if module is not None:
            fastavg_ops = torch.ops.fastavg
            ops = SimpleNamespace(adam_step_=fastavg_ops.adam_step_, sgd_step_=fastavg_ops.sgd_step_,
                                  average_=fastavg_ops.average_, addresses_match=module.addresses_match,
                                  eager=SimpleNamespace(adam_step_=module.adam_step_, sgd_step_=module.sgd_step_,
                                                        average_=module.average_))
        _LOADED = (ops, reason, origin)
    return _LOADED


def __getattr__(name):
    # _EXTENSION stays a module attribute for the tests that read it, without loading at import.
    if name == "_EXTENSION":
        return _extension()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def addresses_match(params, addresses) -> bool:
    """Whether parameters and gradients are still where a cached segment table says (one C++ pass if built)."""
    extension = _extension()[0]
    if extension is not None:
        return extension.addresses_match(params, addresses)
    return _addresses_match_in_python(params, addresses)


def _extension_backend(name: str, dispatch_key: str):
    extension, reason, _ = _extension()
    if extension is None:
        return None, reason
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastavg::adam_step_", dispatch_key):
        if dispatch_key == "CUDA":
            return None, _missing_cuda_reason()
        return None, f"the extension has no {dispatch_key} kernels"
    return SimpleNamespace(name=name, **vars(extension)), ""


def _missing_cuda_reason() -> str:
    """Why the extension that loaded has no CUDA kernels, and the fix."""
    from . import _build

    try:
        _, reason = _build.cuda_plan(torch)
    except ValueError as error:
        reason = str(error)
    rebuild = "FASTAVG_BUILD_CUDA=1 pip install --no-build-isolation fastavg (or -e . in a checkout)"
    if reason:
        return f"the extension was built without CUDA kernels: {reason}; then rebuild: {rebuild}"
    return (f"the extension was built without CUDA kernels, though a toolkit is found now; rebuild: {rebuild} "
            "(it stops with the error if the CUDA part fails)")


def _triton_backend():
    try:
        from . import _triton
    except ImportError as error:
        return None, f"Triton is not importable ({error})"
    return _triton.backend()


def _status() -> dict:
    cpu, cpu_reason = _extension_backend("cpu", "CPU")
    if torch.version.cuda is None:
        cuda, cuda_reason = None, (f"this torch ({torch.__version__}) has no CUDA; install a CUDA build of torch "
                                   "(pip install torch from PyPI on Linux)")
    elif not torch.cuda.is_available():
        cuda, cuda_reason = None, "no CUDA device is visible (torch.cuda.is_available() is False)"
    else:
        cuda, cuda_reason = _extension_backend("cuda", "CUDA")
    triton, triton_reason = _triton_backend()
    return {
        "reference": (REFERENCE, ""),
        "cpu": (cpu, cpu_reason),
        "cuda": (cuda, cuda_reason),
        "triton": (triton, triton_reason),
    }


def status() -> dict[str, str]:
    """Each backend's name mapped to '' when it is available, else why it is not and the fix. Loads the compiled
    extension, compiling it just in time if needed (see fastavg._extension)."""
    return {name: reason for name, (_, reason) in _status().items()}


def extension_origin() -> str:
    """Where the compiled extension came from ('' if it is unavailable)."""
    return _extension()[2]


_WARNED_SLOW = False


def _warn_slow_once(device: torch.device, reasons: dict) -> None:
    """An 'auto' request that fell back to the reference backend for a dtype the kernels serve: say so once."""
    global _WARNED_SLOW
    if _WARNED_SLOW:
        return
    _WARNED_SLOW = True
    why = "; ".join(f"{name}: {reasons[name]}" for name in reasons)
    warnings.warn(f"fastavg runs the slow reference backend (pure torch, one parameter at a time) for parameters on "
                  f"{device}: {why}. Pass backend='reference' to choose it knowingly and silence this warning; "
                  "`python -m fastavg` reports every backend", RuntimeWarning, stacklevel=4)


def default_request(backend) -> str:
    request = backend if backend is not None else os.environ.get("FASTAVG_BACKEND", "auto")
    if request not in BACKENDS:
        source = "backend" if backend is not None else "FASTAVG_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {request!r}")
    return request


def resolve(request: str, device: torch.device, dtype: torch.dtype):
    """The backend that runs buckets of (device, dtype); raises if an explicit request cannot."""
    backends = _status()
    if request == "auto":
        order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
        for name in order:
            backend, _ = backends[name]
            if backend is not None and (name == "reference" or dtype in KERNEL_DTYPES) and _serves(name, device):
                if name == "reference" and dtype in KERNEL_DTYPES:
                    _warn_slow_once(device, {n: backends[n][1] for n in order if n != "reference"})
                return backend
        return REFERENCE
    backend, reason = backends[request]
    if backend is None:
        raise RuntimeError(f"backend={request!r} is unavailable: {reason}; use backend='auto' or 'reference'")
    if request != "reference":
        if dtype not in KERNEL_DTYPES:
            raise ValueError(f"backend={request!r} supports float32, bfloat16 and float16 parameters, got {dtype}; "
                             "use backend='reference' for other dtypes")
        if not _serves(request, device):
            raise RuntimeError(f"backend={request!r} cannot run parameters on {device}")
    return backend


def _serves(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
