"""``python -m fastavg.bench``: step throughput of fastavg against what users run today.

With no arguments it runs a built-in default (GPT-2-like layout, fp32, AdamW with every averager but
``power-ema`` and ``bema``, which ``--averagers power-ema,bema`` adds, and SGD-momentum with EMA; 10M
parameters requested on CPU, which the GPT-2-like layout rounds to 9.7M, 124M on GPU) in about two minutes
on a 2-core CPU. ``--quick`` makes a short run (fewer iterations, one round, no ``torch.compile`` of the
reference); ``--smoke`` checks that every implementation runs (200k parameters, ``--quick``'s settings) and
claims nothing; ``--help`` lists the flags and explains every column and row.

Every run ends with a headline: what was compared (fastavg's fused step against torch's best), on what
(device, layout, size, dtype), the speedup, and the fraction of this machine's streaming limit that the
fused step reaches. Below 500k parameters a step measures fixed overheads, not throughput, and the
headline says so instead of claiming a speedup; a ``--smoke`` run prints no speedups anywhere.

Every fast implementation is timed in three rounds that alternate between the implementations, so that
a drift of the machine's speed during the run does not favour whichever ran first.

For each configuration (optimizer + averager) and each implementation, in one run: the median step time
(with p20/p80), the bandwidth it implies from the bytes the fused step must move, that bandwidth as a
share of the streaming limit measured in the same rounds (below), the kernel launches per step (GPU only,
counted with ``torch.profiler``), and the speedup against the reference and against torch's best.

The streaming limit (row ``streaming limit (probe)``, column ``% of limit``): a step of this kind is a
stream over memory, so its limit is how fast the machine moves the same streams. The probe allocates, at
the group's parameter count, the streams one ordinary step touches, as flat tensors of the same dtypes:
those it only reads (the gradient) and those it reads and writes back in place (θ, the optimizer state,
every average updated on every step; e.g. AdamW+EMA in fp32: 1 read-only + 4 read-and-written streams,
36 bytes per parameter, exactly the bytes credited below), and updates them in one pass with next to no
arithmetic (``x ← x/2 + Σ read-only``). One pass needs one loop over all streams, which eager torch has
no op for, so the probe is ``torch.compile``d: Inductor fuses it into a single vectorized, multi-threaded
loop (C++/OpenMP on CPU, Triton on GPU) that loads every stream and stores the written ones in place,
like the fused step and independent of fastavg's kernels. Modes that average every 10th step are probed
with the ordinary step's streams (9 steps in 10). Compiling takes 10-30 s per access pattern on a CPU
the first time (Inductor caches it on disk). GB/s of a row divided by the probe's GB/s is its ``% of
limit``; a fused step can exceed 100% by a little (a better loop than Inductor's, or the machine's speed
drifting between the two), and the headline says so when it does. The probe measures what a plain,
compiler-vectorized loop reaches, not a hardware peak: it is the practical limit for a kernel of this
shape. Where the probe cannot compile (no C++ compiler) the row says why and the percentages are left
blank; ``--no-limit`` skips it. (Earlier versions divided by the
bandwidth of one ``copy_``, which reads and writes one stream and is not the limit of a multi-stream
step: it showed 146-789%.)

Implementations, all measured in the same run on the same layout:

- ``fastavg[<backend>]``: the fused step, one per available backend, with the parameters where they are
  (the default); ``fastavg[<backend>, flat_params]``: the same with ``flat_params=True`` (parameters and
  gradients moved into flat buffers: one segment per step).
- ``torch best + foreach``: ``torch.optim.AdamW(fused=True)`` / ``SGD(fused=True)`` (``foreach`` where
  fused is unsupported), then the averaging in ``torch._foreach_*`` ops on fp32 averages
  (``_foreach_lerp_`` per EMA; LAWA's ring update; SEMA's copy back).
- ``AveragedModel``: the fused torch step, then ``torch.optim.swa_utils.AveragedModel`` with
  ``get_ema_multi_avg_fn`` (one per decay), EMA configurations only.
- ``per-param EMA loop``: the fused torch step, then ``e.mul_(β).add_(θ, alpha=1-β)`` per parameter,
  EMA configurations only.
- ``ema_pytorch``: the fused torch step, then ``ema_pytorch.EMA.update()``, when that package is
  installed (every-step and every-10 EMA only; it keeps its average in the model's dtype);
  ``ema_pytorch PostHocEMA`` for ``power-ema``: ``PostHocEMA.update()``, one pass per profile.
- ``trl BEMACallback`` (``bema`` only, when TRL imports): the fused torch step, then TRL's callback.
- ``reference``: ``fastavg.reference`` in eager mode, one parameter at a time. Being slow, it (and its
  compiled form) gets one warm-up step and 3 timed steps, or a single timed cycle of 10.
- ``reference (compiled)``: ``torch.compile`` of the reference step. Compiling takes about a minute
  per configuration on CPU, so it is measured for the first configuration of each layout/size/dtype,
  not in ``--quick`` runs, and not for layouts of more than 200 tensors; where compiling fails the row
  says why.

For bf16/fp16 parameters every implementation but ``ema_pytorch`` keeps fp32 averages: the torch baselines
cast θ to fp32 before averaging (``AveragedModel`` averages an fp32 copy of the model refreshed each step),
and that cast is part of the timed step.

Bytes per parameter element that one step must move (``s`` = parameter bytes; every implementation is
credited with the same bytes, so GB/s ratios are speed ratios):

- the optimizer part, AdamW: read θ, g, m, v, write θ, m, v: ``3s + 16``; SGD with momentum: read θ, g,
  b, write θ, b: ``3s + 8``;
- ``ema`` (EMA every step, β = 0.999): read and write the fp32 average: ``+ 8``;
- ``ema-multi`` (EMA with decays 0.99, 0.999, 0.9999, ``K = 3``): ``+ 8K``;
- ``ema-every-10`` (EMA every 10th step): ``+ 8/10`` per step;
- ``lawa`` (LAWA k=10, a snapshot every 10th step): a snapshot reads and writes the ring slot and the
  fp32 sum: ``+ (2s + 8)/10`` per step;
- ``sema`` (Switch EMA, β = 0.999, switch every 10th step): ``+ 8``; the switch writes θ in place of
  the updated value, which the step writes anyway;
- ``power-ema`` (PowerEMA, σ_rel 0.05 and 0.10, ``K = 2`` profiles, no snapshots): ``+ 8K``;
- ``bema`` (BEMA, update every 10th step): an update reads and writes the fp32 EMA and writes θ at the
  update: ``+ 12/10`` per step.

``--averaged-model`` measures instead the averaging update of a model trained by any optimizer (one
``update_parameters`` call, EMA β = 0.999, no optimizer step) on the GPT-2-like layout and on 2,000
tensors of 1000 elements: ``fastavg.AveragedModel`` (fp32 averages, one launch per bucket) against
``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``, a per-parameter
``e.lerp_(θ, 1 − β)`` loop and, when timm imports, ``timm.utils.ModelEmaV3``. The bytes credited per
element are those of an fp32 average: read θ, read and write the average, ``s + 8``, and the streaming
limit is the probe over those streams (θ read-only, one fp32 average read and written); the ratio column
is against torch's ``AveragedModel``. torch's, timm's and the loop keep the average in the model's dtype.

Modes that do not average on every step (``ema-every-10``, ``lawa``, ``sema``, ``bema``) are timed over whole
cycles of 10 steps, each containing exactly one averaging/snapshot/switch step; the table reports the
per-step average of a cycle (cycle time / 10), and its p20/p80 over cycles. A measurement stops timing
after about 2 s once it has 3 steps (or 1 cycle), which bounds the run on large CPU sizes or a busy
machine; with a single sample p20 = p80 = median.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import torch

import fastavg
from fastavg import reference
from fastavg.averaging import RULE_EMA, RULE_LAWA

DEFAULT_SIZE = {"cpu": 10_000_000, "cuda": 124_000_000}
QUICK_SIZE = {"cpu": 1_000_000, "cuda": 16_000_000}
SMOKE_SIZE = 200_000
# Below this many parameters a step measures fixed overheads (launches, Python, caches), not throughput.
MIN_RESULT_NUMEL = 500_000
LAYOUTS = ("large", "gpt2", "small", "tiny", "split:N")
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "sgd")
AVERAGERS = ("ema", "ema-every-10", "lawa", "sema", "ema-multi", "power-ema", "bema")
# What a run without --optimizers/--averagers measures.
_DEFAULT_AVERAGERS = ("ema", "ema-every-10", "lawa", "sema", "ema-multi")
BASELINES = ("torch-best", "averaged-model", "ema-loop", "ema-pytorch", "trl", "reference", "compiled")
_CYCLE = 10
_BUDGET_S = 2.0
_MULTI_DECAYS = (0.99, 0.999, 0.9999)
_SIGMA_RELS = (0.05, 0.10)
_MAX_COMPILED_TENSORS = 200
_TORCH_BEST = "torch best + foreach"
_REFERENCE = "reference"
_COMPILED = "reference (compiled)"
_STREAMING_LIMIT = "streaming limit (probe)"
# The clock time_steps reads: wall time. A study on a shared CPU may set ``time.thread_time`` with one torch
# thread (every op then runs on the calling thread), which leaves out the time slices other processes take
# (``python -m benchmarks.scaling --clock cpu``).
CLOCK = time.perf_counter


def gpt2_like_shapes(total: int) -> list[tuple[int, ...]]:
    """GPT-2-small's tensor layout (embeddings, 12 blocks, final norm: 148 tensors), width scaled to ~``total``."""
    vocab, context, blocks = 50257, 1024, 12
    # params ≈ 12·blocks·d² + (vocab + context + 13·blocks + 2)·d; solve for the width d.
    a, b = 12 * blocks, vocab + context + 13 * blocks + 2
    d = max(8, int((-b + math.sqrt(b * b + 4 * a * total)) / (2 * a)) // 8 * 8)
    shapes = [(vocab, d), (context, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def layout_shapes(layout: str, total: int) -> list[tuple[int, ...]]:
    if layout == "large":
        return [(total,)]
    if layout == "gpt2":
        return gpt2_like_shapes(total)
    if layout == "small":
        return [(1000,)] * max(1, total // 1000)
    if layout == "tiny":
        return [(10,)] * max(1, total // 10)
    if layout.startswith("split:") and layout[6:].isdigit() and int(layout[6:]) > 0:
        count = int(layout[6:])
        return [(max(1, total // count),)] * count
    raise ValueError(f"layout must be 'large', 'gpt2', 'small', 'tiny' or 'split:N', got {layout!r}")


def describe_layout(layout: str, tensors: int) -> str:
    """The layout in words, for the headline."""
    if layout == "large":
        return "one tensor"
    if layout == "gpt2":
        return f"GPT-2-like layout ({tensors} tensors)"
    if layout == "small":
        return f"{tensors} tensors of 1000 elements"
    if layout == "tiny":
        return f"{tensors} tensors of 10 elements"
    return f"{tensors} equal tensors"


@dataclass(frozen=True)
class Config:
    optimizer: str  # one of OPTIMIZERS
    averager: str = "ema"  # one of AVERAGERS

    @property
    def name(self) -> str:
        head = "AdamW" if self.optimizer == "adamw" else "SGD-momentum"
        tail = {"ema": "EMA", "ema-every-10": f"EMA/{_CYCLE}", "lawa": f"LAWA/{_CYCLE}",
                "sema": f"SEMA/{_CYCLE}", "ema-multi": f"EMAx{len(_MULTI_DECAYS)}",
                "power-ema": f"PowerEMAx{len(_SIGMA_RELS)}", "bema": f"BEMA/{_CYCLE}"}[self.averager]
        return f"{head}+{tail}"

    @property
    def decays(self) -> tuple[float, ...]:
        return _MULTI_DECAYS if self.averager == "ema-multi" else (0.999,)

    @property
    def cycle(self) -> int:
        """Steps per timed sample: one averaging step per sample for the modes that skip steps."""
        return _CYCLE if self.averager in ("ema-every-10", "lawa", "sema", "bema") else 1

    @property
    def is_ema(self) -> bool:
        return self.averager in ("ema", "ema-every-10", "ema-multi")

    def averager_object(self):
        if self.averager == "ema-every-10":
            return fastavg.EMA(self.decays, every=_CYCLE)
        if self.averager == "lawa":
            return fastavg.LAWA(k=10, every=_CYCLE)
        if self.averager == "sema":
            return fastavg.SEMA(self.decays[0], switch_every=_CYCLE)
        if self.averager == "power-ema":
            return fastavg.PowerEMA(_SIGMA_RELS)
        if self.averager == "bema":
            return fastavg.BEMA(update_freq=_CYCLE)
        return fastavg.EMA(self.decays)

    def bytes_per_element(self, param_bytes: int) -> float:
        moved = 3 * param_bytes + (16 if self.optimizer == "adamw" else 8)
        if self.averager == "ema-every-10":
            return moved + 8 / _CYCLE
        if self.averager == "lawa":
            return moved + (2 * param_bytes + 8) / _CYCLE
        if self.averager == "power-ema":
            return moved + 8 * len(_SIGMA_RELS)
        if self.averager == "bema":  # an update reads and writes the EMA and writes θ at the update
            return moved + 12 / _CYCLE
        return moved + 8 * len(self.decays)

    def streams(self, param_dtype: torch.dtype) -> tuple[tuple[torch.dtype, ...], tuple[torch.dtype, ...]]:
        """(read-only streams, read-and-written streams) of one ordinary step, for the streaming-limit probe.

        The gradient is read; θ, the optimizer state (fp32) and every average updated on every step (fp32)
        are read and written. Modes that average every 10th step get the plain optimizer step's streams.
        """
        state = 2 if self.optimizer == "adamw" else 1
        averages = {"ema": 1, "sema": 1, "ema-multi": len(_MULTI_DECAYS), "power-ema": len(_SIGMA_RELS)}
        return (param_dtype,), (param_dtype,) + (torch.float32,) * (state + averages.get(self.averager, 0))

    def kwargs(self) -> dict:
        if self.optimizer == "adamw":
            return {"lr": 1e-3, "weight_decay": 0.01}
        return {"lr": 1e-2, "momentum": 0.9}


def _params(shapes, dtype, device):
    params = [torch.randn(s, dtype=dtype, device=device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


class _TorchStep:
    """torch's fastest optimizer for the device; subclasses add the averaging users run after it."""

    def __init__(self, params, config: Config):
        cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.SGD
        try:
            self.opt = cls(params, fused=True, **config.kwargs())
        except (RuntimeError, ValueError):
            self.opt = cls(params, foreach=True, **config.kwargs())
        self.params = params
        self.cast = params[0].dtype != torch.float32
        self.schedule = config.averager_object()
        self.t = 0

    def _current(self) -> list[torch.Tensor]:
        """θ as the fp32 tensors the averages are updated from (the cast is part of the step)."""
        return [p.detach().float() for p in self.params] if self.cast else [p.detach() for p in self.params]

    @torch.no_grad()
    def step(self):
        self.opt.step()
        self.t += 1
        self._average(self.schedule.plan(self.t))

    def _average(self, plan) -> None:
        raise NotImplementedError


class _TorchBest(_TorchStep):
    """The torch step, then the averaging as ``torch._foreach_*`` ops on fp32 averages."""

    def __init__(self, params, config: Config):
        super().__init__(params, config)
        if config.averager == "lawa":
            self.lawa_sum = [p.detach().float() for p in params]
            self.ring = [[torch.zeros_like(p) for p in params] for _ in range(self.schedule.k)]
            self.averages = []
        else:
            count = self.schedule.num_averages if config.averager in ("power-ema", "bema") else len(config.decays)
            self.averages = [[p.detach().float() for p in params] for _ in range(count)]

    def _average(self, plan) -> None:
        if plan.rule == RULE_LAWA:
            slot = self.ring[plan.lawa_slot]
            torch._foreach_sub_(self.lawa_sum, [r.float() for r in slot] if self.cast else slot)
            torch._foreach_add_(self.lawa_sum, self._current())
            torch._foreach_copy_(slot, [p.detach() for p in self.params])
        elif plan.rule == RULE_EMA:
            current = self._current()
            for k, weight in zip(plan.averages or range(len(plan.weights)), plan.weights):
                if weight == 1.0:
                    torch._foreach_copy_(self.averages[k], current)
                else:
                    torch._foreach_lerp_(self.averages[k], current, weight)
        if plan.switch:
            torch._foreach_copy_([p.detach() for p in self.params], self.averages[0])


class _EmaLoop(_TorchStep):
    """The torch step, then ``e.mul_(β).add_(θ, alpha=1-β)`` one parameter at a time."""

    def __init__(self, params, config: Config):
        super().__init__(params, config)
        self.averages = [[p.detach().float() for p in params] for _ in config.decays]

    def _average(self, plan) -> None:
        if plan.rule != RULE_EMA:
            return
        for i, p in enumerate(self.params):
            current = p.detach().float() if self.cast else p.detach()
            for averages, weight in zip(self.averages, plan.weights):
                averages[i].mul_(1 - weight).add_(current, alpha=weight)


class _AveragedModel(_TorchStep):
    """The torch step, then ``AveragedModel(get_ema_multi_avg_fn(β)).update_parameters`` per decay."""

    def __init__(self, params, config: Config):
        super().__init__(params, config)
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # AveragedModel averages a module in that module's dtype; an fp32 copy gives fp32 averages.
        self.model = torch.nn.ParameterList([torch.nn.Parameter(p.detach().float(), requires_grad=False)
                                             for p in params] if self.cast else params)
        self.averaged = [AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=False)
                         for d in config.decays]

    def _average(self, plan) -> None:
        if plan.rule != RULE_EMA:
            return
        if self.cast:
            torch._foreach_copy_(list(self.model), [p.detach() for p in self.params])
        for averaged in self.averaged:
            averaged.update_parameters(self.model)


class _EmaPytorch(_TorchStep):
    """The torch step, then ``ema_pytorch.EMA.update()`` (it counts steps and skips by itself)."""

    def __init__(self, params, config: Config):
        super().__init__(params, config)
        from ema_pytorch import EMA

        self.model = torch.nn.ParameterList(params)
        self.ema = EMA(self.model, beta=config.decays[0], update_after_step=0, update_every=config.cycle)

    def step(self):
        self.opt.step()
        self.ema.update()


class _EmaPytorchPostHoc(_TorchStep):
    """The torch step, then ``ema_pytorch.PostHocEMA.update()``: one ``KarrasEMA`` pass per profile, each
    average in the model's dtype (checkpoints off: fastavg's snapshots are not timed either)."""

    def __init__(self, params, config: Config):
        super().__init__(params, config)
        from ema_pytorch import PostHocEMA

        self.model = torch.nn.ParameterList(params)
        self.ema = PostHocEMA(self.model, sigma_rels=_SIGMA_RELS, update_every=1, checkpoint_every_num_steps="manual",
                              checkpoint_folder=tempfile.mkdtemp(prefix="fastavg-bench-"))

    def step(self):
        self.opt.step()
        self.ema.update()


class _TrlModel(torch.nn.Module):
    """What TRL's callback needs of a model: ``type(model)(model.config)`` builds a twin to hold the BEMA."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.params = torch.nn.ParameterList(config.params)


class _TrlBema(_TorchStep):
    """The torch step, then TRL's ``BEMACallback.on_step_end`` (a per-tensor loop; buffers on the
    parameters' device here, so that no host copy is timed)."""

    def __init__(self, params, config: Config):
        super().__init__(params, config)
        from types import SimpleNamespace

        from trl.trainer.callbacks import BEMACallback

        self.model = _TrlModel(SimpleNamespace(params=params))
        self.callback = BEMACallback(update_freq=_CYCLE, device=params[0].device)
        self.callback.on_train_begin(None, None, None, model=self.model)
        self.state = SimpleNamespace(global_step=0)

    def step(self):
        self.opt.step()
        self.state.global_step += 1
        self.callback.on_step_end(None, self.state, None, model=self.model)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # trl imports transformers and accelerate, which fail in many ways when versions mismatch
        return False
    return True


def _ema_pytorch_available() -> bool:
    try:
        import ema_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class _CompiledReference:
    """``torch.compile`` of the reference step; compiling happens (and may fail) in the warm-up steps."""

    def __init__(self, params, config: Config):
        cls = getattr(reference, "AdamW" if config.optimizer == "adamw" else "SGD")
        self.opt = cls(params, average=config.averager_object(), **config.kwargs())
        # The reference's data-dependent Python makes dynamo log each graph break; the row is what matters.
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        self.step = torch.compile(self.opt.step, dynamic=True)


def _implementations(config: Config, backends, baselines, compile_reference: bool, num_tensors: int,
                     flat_params_rows: bool = True):
    """``{name: builder(params) -> object with .step()}``, or ``{name: reason}`` for a row that cannot run."""
    cls_name = "AdamW" if config.optimizer == "adamw" else "SGD"
    impls = {}
    for backend in backends:
        for flat_params in (False, True) if flat_params_rows else (False,):
            name = f"fastavg[{backend}{', flat_params' if flat_params else ''}]"
            impls[name] = lambda p, b=backend, f=flat_params: getattr(fastavg, cls_name)(
                p, average=config.averager_object(), backend=b, flat_params=f, **config.kwargs())
    if "torch-best" in baselines:
        impls[_TORCH_BEST] = lambda p: _TorchBest(p, config)
    if "averaged-model" in baselines and config.is_ema:
        impls["AveragedModel"] = lambda p: _AveragedModel(p, config)
    if "ema-loop" in baselines and config.is_ema:
        impls["per-param EMA loop"] = lambda p: _EmaLoop(p, config)
    if ("ema-pytorch" in baselines and config.averager in ("ema", "ema-every-10")
            and _ema_pytorch_available()):
        impls["ema_pytorch"] = lambda p: _EmaPytorch(p, config)
    if "ema-pytorch" in baselines and config.averager == "power-ema" and _ema_pytorch_available():
        impls["ema_pytorch PostHocEMA"] = lambda p: _EmaPytorchPostHoc(p, config)
    if "trl" in baselines and config.averager == "bema" and _importable("trl.trainer.callbacks"):
        impls["trl BEMACallback"] = lambda p: _TrlBema(p, config)
    if "reference" in baselines:
        impls[_REFERENCE] = lambda p: getattr(reference, cls_name)(
            p, average=config.averager_object(), **config.kwargs())
    if "compiled" in baselines and compile_reference:
        if num_tensors > _MAX_COMPILED_TENSORS:
            impls[_COMPILED] = f"not measured: compiling {num_tensors} tensors takes too long"
        else:
            impls[_COMPILED] = lambda p: _CompiledReference(p, config)
    return impls


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, iters: int, budget_s: float = math.inf, min_iters: int = 1) -> list[float]:
    """Wall time of each of ``iters`` calls after ``warmup`` untimed ones, in seconds.

    Timing stops early once ``budget_s`` seconds are spent and ``min_iters`` calls are timed. The clock
    is :data:`CLOCK`.
    """
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        start = CLOCK()
        step()
        _sync(device)
        times.append(CLOCK() - start)
        if sum(times) > budget_s and len(times) >= min_iters:
            break
    return times


def _probe_pass(readonly: list[torch.Tensor], inplace: list[torch.Tensor]) -> None:
    """One pass over the streams: read every tensor, write the ``inplace`` ones back (``x ← x/2 + Σ readonly``)."""
    total = readonly[0].float()
    for tensor in readonly[1:]:
        total = total + tensor.float()
    for tensor in inplace:
        tensor.mul_(0.5).add_(total)


_PROBES: dict = {}


def _compiled_probe(readonly: tuple, inplace: tuple):
    """:func:`_probe_pass` compiled for one access pattern (dtypes of the streams), cached; sizes are dynamic."""
    key = (readonly, inplace)
    if key not in _PROBES:
        # A code object of its own per pattern, so that dynamo's per-code recompile limit is never reached.
        code = _probe_pass.__code__.replace(co_name=f"_probe_pass_{len(_PROBES)}")
        function = type(_probe_pass)(code, _probe_pass.__globals__, code.co_name)
        _PROBES[key] = torch.compile(function, dynamic=True, fullgraph=True)
    return _PROBES[key]


def probe_compiled(readonly: tuple, inplace: tuple) -> bool:
    return (readonly, inplace) in _PROBES


class StreamingProbe:
    """The streaming-limit probe for ``numel`` elements: ``.step()`` is one pass (see the module docstring)."""

    def __init__(self, numel: int, readonly: tuple, inplace: tuple, device):
        self.readonly = [torch.rand(numel, device=device).to(d) for d in readonly]
        self.inplace = [torch.rand(numel, device=device).to(d) for d in inplace]
        self.function = _compiled_probe(tuple(readonly), tuple(inplace))

    @staticmethod
    def bytes_for(readonly: tuple, inplace: tuple) -> int:
        """Bytes per element one pass moves: each read-only stream once, each written stream twice."""
        return sum(torch.finfo(d).bits // 8 for d in readonly) + 2 * sum(torch.finfo(d).bits // 8 for d in inplace)

    def step(self):
        self.function(self.readonly, self.inplace)

    def update_parameters(self, model=None):  # the same pass, under AveragedModel's name
        self.step()


def _kernel_launches(step, device, steps: int) -> float | None:
    """GPU kernels launched per step, counted by the profiler over ``steps`` steps; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        _sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / steps


@dataclass
class Row:
    config: str
    layout: str
    dtype: str
    numel: int
    tensors: int
    impl: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None
    limit_fraction: float | None = None
    kernels_per_step: float | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_torch: float | None = None
    unavailable: str | None = None


def _measure(build, shapes, dtype, device, config: Config, warmup: int, iters: int, slow: bool):
    """Per-step times (s), one per timed cycle, and kernel launches per step.

    ``warmup`` single steps come first: any ``config.cycle`` consecutive steps hold exactly one averaging
    step, so the timed cycles need no alignment. Slow implementations (the references) get one warm-up
    step and 3 timed steps, or a single timed cycle. Timing stops after ``_BUDGET_S`` seconds once there
    are 3 steps or 1 cycle (large CPU sizes, or a busy machine).
    """
    params = _params(shapes, dtype, device)
    opt = build(params)
    cycle = config.cycle

    def one_cycle():
        for _ in range(cycle):
            opt.step()

    if slow:
        warmup, samples = 1, 3 if cycle == 1 else 1
    else:
        samples = max(3, math.ceil(iters / cycle))
    if isinstance(opt, _CompiledReference):
        # The step counter changes under dynamo's guards; these steps take the recompiles out of the timing.
        warmup = max(warmup, 5)
    for _ in range(warmup):
        opt.step()
    times = time_steps(one_cycle, device, 0, samples, _BUDGET_S, 3 if cycle == 1 else 1)
    times = [t / cycle for t in times]
    return times, _kernel_launches(one_cycle, device, cycle)


def _quantiles(times):
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return q[0], q[3]


def _human(numel: int) -> str:
    return f"{numel / 1e6:.1f}M" if numel >= 100_000 else f"{numel / 1e3:.0f}k"


def _parse_size(text: str) -> int:
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}
    text = text.strip().lower()
    if text and text[-1] in scale:
        return int(float(text[:-1]) * scale[text[-1]])
    return int(text)


def run(configs, layouts, sizes, dtypes, device, backends, warmup, iters, baselines=BASELINES,
        compile_reference=True, progress=print, rounds=3, limit=True, flat_params_rows=True):
    """Measure every implementation of every configuration on every layout/size/dtype.

    Each fast implementation is measured in ``rounds`` alternating rounds (the references once), and so is
    the streaming-limit probe when ``limit``: its row comes first in each group. A row's progress line is
    printed as soon as its measurements are complete. ``flat_params_rows=False`` leaves out the
    ``fastavg[<backend>, flat_params]`` rows.

    Returns the rows. ``layouts``/``sizes``/``dtypes`` may be single values.
    """
    layouts = [layouts] if isinstance(layouts, str) else list(layouts)
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    dtypes = [dtypes] if isinstance(dtypes, torch.dtype) else list(dtypes)

    plan = []
    for layout in layouts:
        for size in sizes:
            shapes = layout_shapes(layout, size)
            for dtype in dtypes:
                for index, config in enumerate(configs):
                    impls = {}
                    if limit:
                        impls[_STREAMING_LIMIT] = lambda p, c=config: StreamingProbe(
                            sum(x.numel() for x in p), *c.streams(p[0].dtype), p[0].device)
                    impls.update(_implementations(config, backends, baselines, compile_reference and index == 0,
                                                  len(shapes), flat_params_rows))
                    plan.append((layout, shapes, dtype, config, impls))
    total = sum(len(impls) for *_, impls in plan)

    rows, done = [], 0
    for layout, shapes, dtype, config, impls in plan:
        numel = sum(math.prod(s) for s in shapes)
        moved = config.bytes_per_element(torch.finfo(dtype).bits // 8) * numel
        dtype_name = str(dtype).removeprefix("torch.")
        what = f"{config.name:<18} {layout:<5} {_human(numel):>6} {dtype_name:<8}"
        progress(f"{what} {len(impls)} rows, {rounds} alternating round{'s' if rounds > 1 else ''}")
        group = {name: Row(config.name, layout, dtype_name, numel, len(shapes), name) for name in impls}
        samples: dict[str, list[float]] = {name: [] for name in impls}
        for name, build in impls.items():
            if isinstance(build, str):
                group[name].unavailable = build
        credited = {name: StreamingProbe.bytes_for(*config.streams(dtype)) * numel if name == _STREAMING_LIMIT
                    else moved for name in impls}

        # Rounds alternate the implementations, so that a drift of the machine's speed (frequency, other
        # tenants) during the run spreads over all of them instead of favouring whichever ran first.
        for round_index in range(rounds):
            for impl_name, build in impls.items():
                row = group[impl_name]
                slow = impl_name.startswith(_REFERENCE)
                if round_index > 0 and (row.unavailable or slow):
                    continue
                if row.unavailable:
                    done += 1
                    result = _summarise(row, samples[impl_name], credited[impl_name])
                    progress(f"[{done}/{total}] {what} {impl_name:<24} {result}")
                    continue
                if round_index == 0 and impl_name == _COMPILED:
                    progress(f"{what} compiling the reference step with torch.compile (about a minute on CPU)")
                if (round_index == 0 and impl_name == _STREAMING_LIMIT
                        and not probe_compiled(*config.streams(dtype))):
                    readonly, inplace = config.streams(dtype)
                    progress(f"{what} compiling the streaming-limit probe ({len(readonly)} read-only + "
                             f"{len(inplace)} read-and-written streams) with torch.compile (10-30 s on CPU the first "
                             f"time, then cached on disk)")
                try:
                    times, row.kernels_per_step = _measure(build, shapes, dtype, device, config, warmup, iters, slow)
                except Exception as error:  # torch.compile can fail in many ways (no compiler, dynamo limits)
                    if impl_name not in (_COMPILED, _STREAMING_LIMIT):
                        raise
                    row.unavailable = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120]}"
                    samples[impl_name].clear()
                    done += 1
                    result = _summarise(row, samples[impl_name], credited[impl_name])
                    progress(f"[{done}/{total}] {what} {impl_name:<24} {result}")
                    continue
                samples[impl_name].extend(times)
                if slow or round_index == rounds - 1:
                    done += 1
                    result = _summarise(row, samples[impl_name], credited[impl_name])
                    progress(f"[{done}/{total}] {what} {impl_name:<24} {result}")
        _relate(group, _TORCH_BEST)
        rows.extend(group.values())
    return rows


def _summarise(row: Row, times: list[float], credited_bytes: float) -> str:
    """Fill the row's statistics from its times (s) and the bytes it is credited with; its progress text."""
    if times and not row.unavailable:
        row.median_ms = statistics.median(times) * 1e3
        row.p20_ms, row.p80_ms = (q * 1e3 for q in _quantiles(times))
        row.gbps = credited_bytes / (row.median_ms / 1e3) / 1e9
    return f"unavailable ({row.unavailable})" if row.unavailable else f"{row.median_ms:9.2f} ms {row.gbps:7.2f} GB/s"


def _relate(group: dict, baseline: str) -> None:
    """Fill each row's share of the group's streaming limit and its speedups against the reference and ``baseline``."""
    probe = group.get(_STREAMING_LIMIT)
    limit_gbps = probe.gbps if probe is not None and probe.median_ms else None
    for row in group.values():
        if row.median_ms is None:
            continue
        if limit_gbps:
            row.limit_fraction = row.gbps / limit_gbps
        if row.impl == _STREAMING_LIMIT:
            continue
        if _REFERENCE in group and group[_REFERENCE].median_ms:
            row.speedup_vs_reference = group[_REFERENCE].median_ms / row.median_ms
        if baseline in group and group[baseline].median_ms:
            row.speedup_vs_torch = group[baseline].median_ms / row.median_ms


def format_table(rows: list[Row], claims: bool = True) -> str:
    """The rows as a Markdown table; unavailable rows say why in the time column.

    Without ``claims`` (a smoke test) the columns that compare rows (% of limit, speedups) stay empty.
    """
    def ratio(x):
        return "" if x is None or not claims else f"{x:.2f}x"

    header = ("| config | layout | dtype | params | tensors | implementation | median ms (p20-p80) | GB/s "
              "| % of limit | kernels/step | vs reference | vs torch best |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r.config} | {r.layout} | {r.dtype} | {_human(r.numel)} | {r.tensors} | {r.impl} | "
        if r.unavailable:
            lines.append(head + f"unavailable: {r.unavailable} | | | | | |")
            continue
        kernels = "-" if r.kernels_per_step is None else f"{r.kernels_per_step:g}"
        fraction = "" if r.limit_fraction is None or not claims else f"{100 * r.limit_fraction:.0f}%"
        lines.append(head + f"{r.median_ms:.3f} ({r.p20_ms:.3f}-{r.p80_ms:.3f}) | {r.gbps:.2f} | "
                     f"{fraction} | {kernels} | {ratio(r.speedup_vs_reference)} | {ratio(r.speedup_vs_torch)} |")
    return "\n".join(lines)


def _fastest_fastavg(impls: dict) -> Row | None:
    """The fastest fastavg row with the parameters where they are (the default layout), any backend."""
    candidates = [r for name, r in impls.items()
                  if name.startswith("fastavg") and "flat_params" not in name and r.median_ms is not None]
    return min(candidates, key=lambda r: r.median_ms, default=None)


def load_average() -> float | None:
    """The 1-minute load average (Unix), None where there is none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def headline(rows: list[Row], device_name: str, smoke: bool = False, quick: bool = False,
             baseline: str = _TORCH_BEST, baseline_words: str | None = None,
             baseline_short: str = "torch's best", load: float | None = None,
             subject: str = "fastavg's fused step") -> str:
    """The result of the run in a few lines: what was compared, on what, the speedup, the share of the limit.

    ``load``: the highest 1-minute load average seen during the run; above the number of CPUs the headline
    warns that other processes took time slices (which hurts steps with many parallel regions most).
    """
    if smoke:
        measured = sum(r.median_ms is not None for r in rows if r.impl != _STREAMING_LIMIT)
        unavailable = [r for r in rows if r.unavailable]
        configs = len(dict.fromkeys(r.config for r in rows))
        note = f"; {len(unavailable)} rows unavailable, see the table" if unavailable else ""
        return (f"SMOKE TEST on {device_name}: {measured} measurements of {configs} configurations ran{note}. "
                f"At this size the times are fixed overheads and noise, not throughput: no speedup is claimed.")
    baseline_words = baseline_words or (
        "torch's best (torch.optim.AdamW/SGD with fused=True, then the averaging in torch._foreach_* ops)")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.layout, r.numel, r.tensors, r.dtype), {}).setdefault(r.config, {})[r.impl] = r
    lines = [f"Result on {device_name}: {subject} against {baseline_words}:"]
    above_limit = False
    for (layout, numel, tensors, dtype), configs in groups.items():
        lines.append(f"  {describe_layout(layout, tensors)}, {_human(numel)} parameters, {dtype}:")
        if numel < MIN_RESULT_NUMEL:
            lines.append(f"    too small for a throughput result (under {_human(MIN_RESULT_NUMEL)} parameters a step "
                         f"measures fixed overheads): no speedup claimed")
            continue
        for config, impls in configs.items():
            fast, base = _fastest_fastavg(impls), impls.get(baseline)
            if fast is None:
                lines.append(f"    {config:<18} fastavg not measured")
                continue
            if base is not None and base.median_ms is not None:
                speedup = base.median_ms / fast.median_ms
                verdict = (f"{speedup:.2f}x faster" if speedup >= 1
                           else f"{speedup:.2f}x ({100 * (1 - speedup):.0f}% slower)")
                text = (f"    {config:<18} {verdict}: {fast.impl} {fast.median_ms:.2f} ms, {baseline_short} "
                        f"{base.median_ms:.2f} ms")
            else:
                text = f"    {config:<18} {fast.impl} {fast.median_ms:.2f} ms; {baseline_short} not measured"
            if fast.limit_fraction is not None:
                text += f"; fastavg at {100 * fast.limit_fraction:.0f}% of the streaming limit"
                if base is not None and base.limit_fraction is not None:
                    text += f" ({baseline_short} {100 * base.limit_fraction:.0f}%)"
                above_limit |= fast.limit_fraction > 1.0
            else:
                probe = impls.get(_STREAMING_LIMIT)
                text += f"; streaming limit {'unavailable' if probe is not None else 'not measured'}"
            lines.append(text)
    if above_limit:
        lines.append("  Above 100%: fastavg ran faster than the probe's loop over the same streams (a better "
                     "loop, or the machine's speed changed between them); read it as 'at the limit'.")
    if quick:
        lines.append("  --quick: one round of a few steps; rerun without --quick before quoting these numbers.")
    cpus = os.cpu_count() or 1
    if load is not None and load > cpus:
        lines.append(f"  Busy machine: load average up to {load:.1f} on {cpus} CPUs during the run. Other processes "
                     f"took time slices, which slows steps made of many multi-threaded ops (torch's per-tensor "
                     f"and foreach loops) far more than one fused pass: these speedups overstate an idle "
                     f"machine's. Rerun when the load is below {cpus}.")
    return "\n".join(lines)


def _write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(Row)])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})


def _plot(rows: list[Row], path: str, title: str) -> None:
    """GB/s against parameter count, one panel per configuration, one line per implementation/layout/dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    configs = list(dict.fromkeys(r.config for r in rows))
    columns = min(3, len(configs))
    lines_of_panels = math.ceil(len(configs) / columns)
    fig, axes = plt.subplots(lines_of_panels, columns, figsize=(6 * columns, 4.2 * lines_of_panels), squeeze=False)
    for ax, config in zip(axes.flat, configs):
        series = {}
        for r in rows:
            if r.config == config and r.gbps is not None:
                series.setdefault(f"{r.impl} ({r.layout}, {r.dtype})", []).append((r.numel, r.gbps))
        for label, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("parameters")
        ax.set_ylabel("GB/s (bytes the fused step must move)")
        ax.set_title(config)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(configs):]:
        ax.axis("off")
    fig.suptitle(title, fontsize="small", wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _csv_list(choices):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        for item in items:
            if item not in choices:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(choices)}")
        return items
    return parse


def _parse_sizes(text: str) -> list[int]:
    try:
        return [_parse_size(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are integers with an optional k/M/B suffix, got {text!r}")


_AVERAGED_MODEL_SIZES = {"gpt2": DEFAULT_SIZE, "small": {"cpu": 2_000_000, "cuda": 2_000_000}}
_TORCH_AVERAGED_MODEL = "torch AveragedModel"


class _ParameterLoop:
    """``e.lerp_(θ, 1 − β)`` one parameter at a time, the average in the model's dtype."""

    def __init__(self, model):
        self.averages = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update_parameters(self, model):
        for average, p in zip(self.averages, model.parameters()):
            average.lerp_(p, 1 - _AVERAGED_MODEL_DECAY)


class _TimmModelEmaV3:
    def __init__(self, model):
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=_AVERAGED_MODEL_DECAY)

    def update_parameters(self, model):
        self.ema.update(model)


_AVERAGED_MODEL_DECAY = 0.999


def _averaged_model_implementations(limit: bool = True):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    impls = {}
    if limit:  # read θ, read and write the fp32 average: the bytes credited to every row
        impls[_STREAMING_LIMIT] = lambda m: StreamingProbe(
            sum(p.numel() for p in m.parameters()), (next(m.parameters()).dtype,), (torch.float32,),
            next(m.parameters()).device)
    impls |= {
        "fastavg.AveragedModel": lambda m: fastavg.AveragedModel(
            m, multi_avg_fn=get_ema_multi_avg_fn(_AVERAGED_MODEL_DECAY)),
        _TORCH_AVERAGED_MODEL: lambda m: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(_AVERAGED_MODEL_DECAY)),
        "per-param lerp loop": _ParameterLoop,
    }
    try:
        import timm.utils  # noqa: F401
    except Exception as error:  # timm imports torchvision, which fails in many ways when it mismatches torch
        impls["timm ModelEmaV3"] = f"timm does not import ({type(error).__name__})"
    else:
        impls["timm ModelEmaV3"] = _TimmModelEmaV3
    return impls


def run_averaged_model(layouts, sizes, dtype, device, warmup, iters, progress=print, rounds=3, limit=True):
    """Time one ``update_parameters`` of each implementation on each layout; rows as :func:`run`'s.

    ``sizes`` maps a layout to its parameter count. Rounds alternate the implementations, as in :func:`run`,
    and include the streaming-limit probe (read θ, read and write an fp32 average) when ``limit``.
    """
    rows = []
    dtype_name = str(dtype).removeprefix("torch.")
    for layout in layouts:
        shapes = layout_shapes(layout, sizes[layout])
        numel = sum(math.prod(s) for s in shapes)
        moved = (torch.finfo(dtype).bits // 8 + 8) * numel
        impls = _averaged_model_implementations(limit)
        group = {name: Row("EMA update", layout, dtype_name, numel, len(shapes), name) for name in impls}
        samples = {name: [] for name in impls}
        for name, build in impls.items():
            if isinstance(build, str):
                group[name].unavailable = build
        for round_index in range(rounds):
            for name, build in impls.items():
                if group[name].unavailable:
                    continue
                if round_index == 0 and name == _STREAMING_LIMIT and not probe_compiled((dtype,), (torch.float32,)):
                    progress(f"EMA update {layout:<5} {_human(numel):>6} {dtype_name:<8} compiling the "
                             f"streaming-limit probe with torch.compile (10-30 s on CPU the first time)")
                model = torch.nn.ParameterList(_params(shapes, dtype, device))
                try:
                    averaged = build(model)
                    samples[name] += time_steps(lambda a=averaged, m=model: a.update_parameters(m), device, warmup,
                                                iters, _BUDGET_S, 3)
                except Exception as error:  # the probe's torch.compile can fail (no compiler)
                    if name != _STREAMING_LIMIT:
                        raise
                    group[name].unavailable = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120]}"
                    samples[name].clear()
                averaged = None
                del model
        for name, row in group.items():
            if samples[name]:
                times = samples[name]
                row.median_ms = statistics.median(times) * 1e3
                row.p20_ms, row.p80_ms = (q * 1e3 for q in _quantiles(times))
                row.gbps = moved / (row.median_ms / 1e3) / 1e9
            result = f"unavailable ({row.unavailable})" if row.unavailable else f"{row.median_ms:9.3f} ms"
            progress(f"EMA update {layout:<5} {_human(numel):>6} {dtype_name:<8} {name:<24} {result}")
        _relate(group, _TORCH_AVERAGED_MODEL)
        for row in group.values():
            row.speedup_vs_reference = None
        rows.extend(group.values())
    return rows


def format_averaged_model_table(rows: list[Row], claims: bool = True) -> str:
    """:func:`format_table`'s table, the ratio column against torch's ``AveragedModel``."""
    return format_table(rows, claims).replace("| vs torch best |", "| vs torch AveragedModel |", 1)


DESCRIPTION = """Times one optimizer step with its weight averaging: fastavg's fused step against what PyTorch users
run today (torch's fused optimizer followed by the averaging in torch ops, torch's AveragedModel, a
per-parameter loop, ema_pytorch, TRL, fastavg's own reference), on the layouts, sizes and dtypes asked for,
all in one run. Prints progress on stderr, then a Markdown table and a headline: the speedup over torch's
best and the fraction of this machine's streaming limit that the fused step reaches."""

EPILOG = f"""defaults:
  With no arguments: GPT-2-like layout (148 tensors), float32, {DEFAULT_SIZE['cpu'] // 1_000_000}M parameters requested
  on CPU (the layout rounds its width: 9.7M run), {DEFAULT_SIZE['cuda'] // 1_000_000}M on GPU; AdamW with each of
  {', '.join(_DEFAULT_AVERAGERS)}, and SGD-momentum with ema; every available fastavg backend;
  every baseline; 3 warm-up steps, then up to 10 timed steps (20 on GPU) per measurement, 3 alternating
  rounds. About two minutes on a 2-core CPU. --quick: {QUICK_SIZE['cpu'] // 1_000_000}M on CPU, one round.
  --smoke: {SMOKE_SIZE // 1000}k, one round, no comparisons printed.

columns:
  config               optimizer + averager: EMA (every step), EMA/10 (every 10th step), LAWA/10, SEMA/10
                       (switch every 10th step), EMAx3 (three decays), PowerEMAx2, BEMA/10
  params, tensors      parameter count and number of parameter tensors of the layout
  median ms (p20-p80)  wall time of one step, median and 20th-80th percentiles over the timed steps
                       (modes that average every 10th step: a 10-step cycle divided by 10)
  GB/s                 bytes the fused step must move per step / median time; every row is credited with the
                       same bytes (formulas in the module docstring), so GB/s ratios are speed ratios
  % of limit           GB/s as a share of the streaming-limit probe's GB/s in the same group (below)
  kernels/step         GPU kernel launches per step (torch.profiler); '-' on CPU
  vs reference         the reference row's time / this row's time
  vs torch best        the 'torch best + foreach' row's time / this row's time: above 1.00x is faster

rows:
  streaming limit (probe)          one pass that reads the streams one step reads and writes back the ones
                                   it writes (same count, dtypes and size), compiled by torch.compile into a
                                   single loop: how fast this machine moves the step's bytes
  fastavg[<backend>]               fastavg's fused step, parameters where they are (the default)
  fastavg[<backend>, flat_params]  the same with flat_params=True (parameters moved into one buffer)
  torch best + foreach             torch.optim.AdamW/SGD(fused=True), then the averaging in
                                   torch._foreach_* ops on fp32 averages: the baseline of the headline
  AveragedModel                    the fused torch step, then torch.optim.swa_utils.AveragedModel (EMA only)
  per-param EMA loop               the fused torch step, then e.mul_(b).add_(p, alpha=1-b) per tensor
  ema_pytorch, ema_pytorch PostHocEMA, trl BEMACallback
                                   the fused torch step, then that package's update, when it imports
  reference, reference (compiled)  fastavg.reference (pure torch, per tensor), eager and torch.compile'd

CI and quick checks: '--smoke' (runs everything at {SMOKE_SIZE // 1000}k parameters, claims nothing)."""


def _prog(argv) -> str:
    """The program name as it was invoked: the ``fastavg-bench`` entry point or ``python -m fastavg.bench``."""
    invoked = os.path.basename(sys.argv[0]) if argv is None and sys.argv and sys.argv[0] else ""
    return invoked if invoked.startswith("fastavg-bench") else "python -m fastavg.bench"


def _parse_layouts(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        try:
            layout_shapes(item, 1000)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error))
    return items


def device_name(device) -> str:
    """The device in words: the GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU{' ' + model if model else ''} ({threads} thread{'s' if threads != 1 else ''})"


def backend_words(backends: list[str], status: dict, device) -> str:
    """The fastavg backends timed, for the title; the reference alone is said loudly, with why and the fix."""
    if backends != ["reference"]:
        return f"fastavg backend{'s' if len(backends) > 1 else ''}: {', '.join(backends)}"
    compiled = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    reasons = "; ".join(f"{b}: {status[b]}" for b in compiled if status.get(b))
    return (f"fastavg backend: reference ONLY (pure torch, slow: no compiled backend is available; {reasons}; "
            f"`python -m fastavg` says how to fix it)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=_prog(argv), description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--optimizers", "--optimizer", type=_csv_list(OPTIMIZERS), default=None,
                        help="comma-separated: adamw,sgd (sgd = SGD with momentum 0.9; default: AdamW with every "
                             "averager but power-ema and bema, SGD with ema)")
    parser.add_argument("--averagers", "--averager", type=_csv_list(AVERAGERS), default=None,
                        help=f"comma-separated: {','.join(AVERAGERS)} (default: see below; with --optimizers "
                             f"alone: ema)")
    parser.add_argument("--sizes", "--size", type=_parse_sizes, default=None,
                        help=f"comma-separated parameter counts with an optional k/M/B suffix, e.g. 1M,10M,100M "
                             f"(default: {DEFAULT_SIZE['cpu'] // 1_000_000}M on CPU, which the gpt2 layout runs as "
                             f"9.7M; {DEFAULT_SIZE['cuda'] // 1_000_000}M on GPU; --quick "
                             f"{QUICK_SIZE['cpu'] // 1_000_000}M/{QUICK_SIZE['cuda'] // 1_000_000}M; --smoke "
                             f"{SMOKE_SIZE // 1000}k)")
    parser.add_argument("--layouts", "--layout", type=_parse_layouts, default=["gpt2"],
                        help="comma-separated: large (one tensor), gpt2 (GPT-2-small's 148 tensors, width scaled "
                             "to the size), small (1000-element tensors), tiny (10-element tensors), split:N (N "
                             "equal tensors) (default: gpt2)")
    parser.add_argument("--dtypes", "--dtype", type=_csv_list(DTYPES), default=["float32"],
                        help=f"comma-separated parameter dtypes: {', '.join(DTYPES)} (default: float32); fastavg "
                             f"keeps optimizer state and averages in float32 whatever the parameter dtype")
    parser.add_argument("--backends", default=None,
                        help="comma-separated fastavg backends: triton, cuda, cpu, reference (default: every one "
                             "available for the device)")
    parser.add_argument("--baselines", type=_csv_list(BASELINES), default=list(BASELINES),
                        help=f"comma-separated, default all: {','.join(BASELINES)} (rows below)")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference implementations")
    parser.add_argument("--no-limit", action="store_true",
                        help="skip the streaming-limit probe (needs torch.compile; %% of limit stays empty)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed steps per measurement (default: 10 on CPU, 20 on GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="short run: at most 1 warm-up and 6 timed steps, one round, smaller default size, "
                             "no torch.compile of the reference")
    parser.add_argument("--smoke", action="store_true",
                        help=f"smoke test for CI: --quick's settings at {SMOKE_SIZE // 1000}k parameters (unless "
                             f"--sizes); checks that every row runs, prints no speedups or %% of limit")
    parser.add_argument("--averaged-model", action="store_true",
                        help="time AveragedModel.update_parameters implementations instead (layouts gpt2,small by "
                             "default; small = 2,000 tensors)")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    parser.add_argument("--plot", metavar="PNG", help="also plot GB/s against size (needs matplotlib)")
    args = parser.parse_args(argv)
    args.quick = args.quick or args.smoke

    device = torch.device(args.device)
    if args.averaged_model:
        _main_averaged_model(args, device)
        return
    sizes = args.sizes or ([SMOKE_SIZE] if args.smoke else [(QUICK_SIZE if args.quick else DEFAULT_SIZE)[device.type]])
    iters = args.iters or (20 if device.type == "cuda" else 10)
    warmup, iters = (min(args.warmup, 1), min(iters, 6)) if args.quick else (args.warmup, iters)
    status = fastavg.backend_status()
    if args.backends:
        backends = args.backends.split(",")
        for name in backends:
            if status.get(name, "unknown backend"):
                parser.error(f"backend {name!r} is unavailable: {status.get(name, 'unknown backend')}")
    else:
        backends = [b for b in ("triton", "cuda", "cpu") if not status[b]
                    and (b == "cpu") == (device.type == "cpu")] or ["reference"]
    if args.optimizers is None and args.averagers is None:
        configs = [Config("adamw", a) for a in _DEFAULT_AVERAGERS] + [Config("sgd", "ema")]
    else:
        configs = [Config(o, a) for o in (args.optimizers or OPTIMIZERS) for a in (args.averagers or ["ema"])]
    baselines = [b for b in args.baselines if not (args.no_reference and b in ("reference", "compiled"))]

    def progress(line):
        print(line, file=sys.stderr, flush=True)

    if args.smoke:
        progress("SMOKE TEST: checks that every implementation runs; the sizes are too small for results")
    load_before = load_average()
    rows = run(configs, args.layouts, sizes, [getattr(torch, d) for d in args.dtypes], device, backends,
               warmup, iters, baselines=baselines, compile_reference=not args.quick, progress=progress,
               rounds=1 if args.quick else 3, limit=not args.no_limit)
    loads = [x for x in (load_before, load_average()) if x is not None]
    name = device_name(device)
    title = (f"fastavg {fastavg.__version__}, torch {torch.__version__}, {name}, "
             f"{backend_words(backends, status, device)}")
    if args.smoke:
        title = f"SMOKE TEST (not a result): {title}"
    print(f"\n{title}\n")
    print(format_table(rows, claims=not args.smoke))
    print()
    print(headline(rows, name, smoke=args.smoke, quick=args.quick and not args.smoke,
                   load=max(loads) if loads else None))
    if args.csv:
        _write_csv(rows, args.csv)
    if args.plot:
        _plot(rows, args.plot, title)


def _main_averaged_model(args, device) -> None:
    layouts = args.layouts if args.layouts != ["gpt2"] else ["gpt2", "small"]
    default_sizes = {layout: _AVERAGED_MODEL_SIZES.get(layout, DEFAULT_SIZE)[device.type] for layout in layouts}
    if args.smoke and not args.sizes:
        default_sizes = {layout: SMOKE_SIZE for layout in layouts}
    sizes = {layout: args.sizes[0] if args.sizes else default_sizes[layout] for layout in layouts}
    iters = args.iters or (20 if device.type == "cuda" else 10)
    warmup, iters = (min(args.warmup, 1), min(iters, 6)) if args.quick else (args.warmup, iters)
    rows, load_before = [], load_average()
    for dtype in args.dtypes:
        rows += run_averaged_model(layouts, sizes, getattr(torch, dtype), device, warmup, iters,
                                   progress=lambda line: print(line, file=sys.stderr, flush=True),
                                   rounds=1 if args.quick else 3, limit=not args.no_limit)
    name = device_name(device)
    status = fastavg.backend_status()
    backend = next((b for b in ("triton", "cuda", "cpu") if not status[b] and (b == "cpu") == (device.type == "cpu")),
                   "reference")
    title = (f"fastavg {fastavg.__version__}, torch {torch.__version__}, {name}, "
             f"{backend_words([backend], status, device)}")
    print(f"\n{'SMOKE TEST (not a result): ' if args.smoke else ''}{title}\n")
    print(format_averaged_model_table(rows, claims=not args.smoke))
    print()
    print(headline(rows, name, smoke=args.smoke, quick=args.quick and not args.smoke,
                   baseline=_TORCH_AVERAGED_MODEL,
                   baseline_words="torch.optim.swa_utils.AveragedModel (one EMA update_parameters, no optimizer step)",
                   baseline_short="torch AveragedModel", subject="fastavg.AveragedModel's fused update",
                   load=max(x for x in (load_before, load_average(), 0.0) if x is not None)))
    if args.csv:
        _write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
