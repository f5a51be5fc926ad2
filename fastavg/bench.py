"""``python -m fastavg.bench``: step throughput of fastavg against what users run today.

With no arguments it runs a built-in default (GPT-2-like layout, fp32, AdamW with every averager and
SGD-momentum with EMA; 2M parameters on CPU, 124M on GPU) in under two minutes on a 2-core CPU.
``--quick`` makes a short run (fewer iterations, one round, no ``torch.compile``); ``--help`` lists the flags.

Every fast implementation is timed in three rounds that alternate between the implementations, so that
a drift of the machine's speed during the run does not favour whichever ran first.

For each configuration (optimizer + averager) and each implementation, in one run: the median step time
(with p20/p80), the bandwidth it implies from the bytes the fused step must move, that bandwidth as a
share of the machine's copy bandwidth measured in the same run (one large device-to-device copy), the
kernel launches per step (GPU only, counted with ``torch.profiler``), and the speedup against the
reference and against torch's best.

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
  installed (every-step and every-10 EMA only; it keeps its average in the model's dtype).
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
  the updated value, which the step writes anyway.

``--averaged-model`` measures instead the averaging update of a model trained by any optimizer (one
``update_parameters`` call, EMA β = 0.999, no optimizer step) on the GPT-2-like layout and on 2,000
tensors of 1000 elements: ``fastavg.AveragedModel`` (fp32 averages, one launch per bucket) against
``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``, a per-parameter
``e.lerp_(θ, 1 − β)`` loop and, when timm imports, ``timm.utils.ModelEmaV3``. The bytes credited per
element are those of an fp32 average: read θ, read and write the average, ``s + 8``; the ratio column is
against torch's ``AveragedModel``. torch's, timm's and the loop keep the average in the model's dtype.

Modes that do not average on every step (``ema-every-10``, ``lawa``, ``sema``) are timed over whole
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
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

import fastavg
from fastavg import reference
from fastavg.averaging import RULE_EMA, RULE_LAWA

DEFAULT_SIZE = {"cpu": 10_000_000, "cuda": 124_000_000}
QUICK_SIZE = {"cpu": 1_000_000, "cuda": 16_000_000}
OPTIMIZERS = ("adamw", "sgd")
AVERAGERS = ("ema", "ema-every-10", "lawa", "sema", "ema-multi")
BASELINES = ("torch-best", "averaged-model", "ema-loop", "ema-pytorch", "reference", "compiled")
_CYCLE = 10
_BUDGET_S = 2.0
_MULTI_DECAYS = (0.99, 0.999, 0.9999)
_MAX_COMPILED_TENSORS = 200
_TORCH_BEST = "torch best + foreach"
_REFERENCE = "reference"
_COMPILED = "reference (compiled)"


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
    raise ValueError(f"layout must be 'large', 'gpt2', 'small' or 'tiny', got {layout!r}")


@dataclass(frozen=True)
class Config:
    optimizer: str  # one of OPTIMIZERS
    averager: str = "ema"  # one of AVERAGERS

    @property
    def name(self) -> str:
        head = "AdamW" if self.optimizer == "adamw" else "SGD-momentum"
        tail = {"ema": "EMA", "ema-every-10": f"EMA/{_CYCLE}", "lawa": f"LAWA/{_CYCLE}",
                "sema": f"SEMA/{_CYCLE}", "ema-multi": f"EMAx{len(_MULTI_DECAYS)}"}[self.averager]
        return f"{head}+{tail}"

    @property
    def decays(self) -> tuple[float, ...]:
        return _MULTI_DECAYS if self.averager == "ema-multi" else (0.999,)

    @property
    def cycle(self) -> int:
        """Steps per timed sample: one averaging step per sample for the modes that skip steps."""
        return _CYCLE if self.averager in ("ema-every-10", "lawa", "sema") else 1

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
        return fastavg.EMA(self.decays)

    def bytes_per_element(self, param_bytes: int) -> float:
        moved = 3 * param_bytes + (16 if self.optimizer == "adamw" else 8)
        if self.averager == "ema-every-10":
            return moved + 8 / _CYCLE
        if self.averager == "lawa":
            return moved + (2 * param_bytes + 8) / _CYCLE
        return moved + 8 * len(self.decays)

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
            self.averages = [[p.detach().float() for p in params] for _ in config.decays]

    def _average(self, plan) -> None:
        if plan.rule == RULE_LAWA:
            slot = self.ring[plan.lawa_slot]
            torch._foreach_sub_(self.lawa_sum, [r.float() for r in slot] if self.cast else slot)
            torch._foreach_add_(self.lawa_sum, self._current())
            torch._foreach_copy_(slot, [p.detach() for p in self.params])
        elif plan.rule == RULE_EMA:
            current = self._current()
            for averages, weight in zip(self.averages, plan.weights):
                torch._foreach_lerp_(averages, current, weight)
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


def _implementations(config: Config, backends, baselines, compile_reference: bool, num_tensors: int):
    """``{name: builder(params) -> object with .step()}``, or ``{name: reason}`` for a row that cannot run."""
    cls_name = "AdamW" if config.optimizer == "adamw" else "SGD"
    impls = {}
    for backend in backends:
        for flat_params in (False, True):
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

    Timing stops early once ``budget_s`` seconds are spent and ``min_iters`` calls are timed.
    """
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) > budget_s and len(times) >= min_iters:
            break
    return times


def copy_bandwidth(device, nbytes: int, warmup: int, iters: int) -> float:
    """GB/s of a large device-to-device copy (read + write counted), the machine's practical ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = time_steps(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


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
    copy_fraction: float | None = None
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
        compile_reference=True, progress=print, rounds=3):
    """Measure every implementation of every configuration on every layout/size/dtype.

    Each fast implementation is measured in ``rounds`` alternating rounds (the references once).

    Returns the rows and the copy bandwidth (GB/s) measured at the start of the run.
    ``layouts``/``sizes``/``dtypes`` may be single values.
    """
    layouts = [layouts] if isinstance(layouts, str) else list(layouts)
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    dtypes = [dtypes] if isinstance(dtypes, torch.dtype) else list(dtypes)
    copy_gbps = copy_bandwidth(device, min(max(4 * max(sizes), 1 << 26), 1 << 30), warmup, max(iters, 3))
    progress(f"copy bandwidth on {device}: {copy_gbps:.1f} GB/s")

    plan = []
    for layout in layouts:
        for size in sizes:
            shapes = layout_shapes(layout, size)
            for dtype in dtypes:
                for index, config in enumerate(configs):
                    impls = _implementations(config, backends, baselines, compile_reference and index == 0,
                                             len(shapes))
                    plan.append((layout, shapes, dtype, config, impls))
    total = sum(len(impls) for *_, impls in plan)

    rows, done = [], 0
    for layout, shapes, dtype, config, impls in plan:
        numel = sum(math.prod(s) for s in shapes)
        moved = config.bytes_per_element(torch.finfo(dtype).bits // 8) * numel
        dtype_name = str(dtype).removeprefix("torch.")
        group = {name: Row(config.name, layout, dtype_name, numel, len(shapes), name) for name in impls}
        samples: dict[str, list[float]] = {name: [] for name in impls}
        for name, build in impls.items():
            if isinstance(build, str):
                group[name].unavailable = build
        # Rounds alternate the implementations, so that a drift of the machine's speed (frequency, other
        # tenants) during the run spreads over all of them instead of favouring whichever ran first.
        for round_index in range(rounds):
            for impl_name, build in impls.items():
                row = group[impl_name]
                slow = impl_name.startswith(_REFERENCE)
                if row.unavailable or (slow and round_index > 0):
                    continue
                try:
                    times, row.kernels_per_step = _measure(build, shapes, dtype, device, config, warmup, iters, slow)
                except Exception as error:  # torch.compile can fail in many ways (no compiler, dynamo limits)
                    if impl_name != _COMPILED:
                        raise
                    row.unavailable = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120]}"
                else:
                    samples[impl_name].extend(times)
        for impl_name, row in group.items():
            done += 1
            times = samples[impl_name]
            if times:
                row.median_ms = statistics.median(times) * 1e3
                row.p20_ms, row.p80_ms = (q * 1e3 for q in _quantiles(times))
                row.gbps = moved / (row.median_ms / 1e3) / 1e9
                row.copy_fraction = row.gbps / copy_gbps
            result = (f"unavailable ({row.unavailable})" if row.unavailable
                      else f"{row.median_ms:9.2f} ms {row.gbps:7.2f} GB/s")
            progress(f"[{done}/{total}] {config.name:<18} {layout:<5} {_human(numel):>6} {dtype_name:<8} "
                     f"{impl_name:<22} {result}")
        for row in group.values():
            if row.median_ms is None:
                continue
            if _REFERENCE in group and group[_REFERENCE].median_ms:
                row.speedup_vs_reference = group[_REFERENCE].median_ms / row.median_ms
            if _TORCH_BEST in group and group[_TORCH_BEST].median_ms:
                row.speedup_vs_torch = group[_TORCH_BEST].median_ms / row.median_ms
        rows.extend(group.values())
    return rows, copy_gbps


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table; unavailable rows say why in the time column."""
    def ratio(x):
        return "" if x is None else f"{x:.2f}x"

    header = ("| config | layout | dtype | params | tensors | implementation | median ms (p20-p80) | GB/s "
              "| % copy BW | kernels/step | vs reference | vs torch best |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r.config} | {r.layout} | {r.dtype} | {_human(r.numel)} | {r.tensors} | {r.impl} | "
        if r.unavailable:
            lines.append(head + f"unavailable: {r.unavailable} | | | | | |")
            continue
        kernels = "-" if r.kernels_per_step is None else f"{r.kernels_per_step:g}"
        lines.append(head + f"{r.median_ms:.3f} ({r.p20_ms:.3f}-{r.p80_ms:.3f}) | {r.gbps:.2f} | "
                     f"{100 * r.copy_fraction:.0f}% | {kernels} | {ratio(r.speedup_vs_reference)} | "
                     f"{ratio(r.speedup_vs_torch)} |")
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


def _averaged_model_implementations():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    impls = {
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


def run_averaged_model(layouts, sizes, dtype, device, warmup, iters, progress=print, rounds=3):
    """Time one ``update_parameters`` of each implementation on each layout; rows as :func:`run`'s.

    ``sizes`` maps a layout to its parameter count. Rounds alternate the implementations, as in :func:`run`.
    """
    rows = []
    dtype_name = str(dtype).removeprefix("torch.")
    for layout in layouts:
        shapes = layout_shapes(layout, sizes[layout])
        numel = sum(math.prod(s) for s in shapes)
        moved = (torch.finfo(dtype).bits // 8 + 8) * numel
        impls = _averaged_model_implementations()
        group = {name: Row("EMA update", layout, dtype_name, numel, len(shapes), name) for name in impls}
        samples = {name: [] for name in impls}
        for name, build in impls.items():
            if isinstance(build, str):
                group[name].unavailable = build
        for _ in range(rounds):
            for name, build in impls.items():
                if group[name].unavailable:
                    continue
                model = torch.nn.ParameterList(_params(shapes, dtype, device))
                averaged = build(model)
                samples[name] += time_steps(lambda: averaged.update_parameters(model), device, warmup, iters,
                                            _BUDGET_S, 3)
                del averaged, model
        for name, row in group.items():
            if samples[name]:
                times = samples[name]
                row.median_ms = statistics.median(times) * 1e3
                row.p20_ms, row.p80_ms = (q * 1e3 for q in _quantiles(times))
                row.gbps = moved / (row.median_ms / 1e3) / 1e9
            result = f"unavailable ({row.unavailable})" if row.unavailable else f"{row.median_ms:9.3f} ms"
            progress(f"EMA update {layout:<5} {_human(numel):>6} {dtype_name:<8} {name:<22} {result}")
        baseline = group[_TORCH_AVERAGED_MODEL].median_ms
        for row in group.values():
            if row.median_ms:
                row.speedup_vs_torch = baseline / row.median_ms
        rows.extend(group.values())
    return rows


def format_averaged_model_table(rows: list[Row], copy_gbps: float) -> str:
    """:func:`format_table`'s table, the ratio column against torch's ``AveragedModel``."""
    for row in rows:
        if row.gbps is not None:
            row.copy_fraction = row.gbps / copy_gbps
    return format_table(rows).replace("| vs torch best |", "| vs torch AveragedModel |", 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastavg.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--optimizers", "--optimizer", type=_csv_list(OPTIMIZERS), default=None,
                        help="comma-separated: adamw,sgd (default: AdamW with every averager, SGD with EMA)")
    parser.add_argument("--averagers", "--averager", type=_csv_list(AVERAGERS), default=None,
                        help=f"comma-separated: {','.join(AVERAGERS)}")
    parser.add_argument("--sizes", "--size", type=_parse_sizes, default=None,
                        help="comma-separated parameter counts, e.g. 1M,10M,100M (default: 2M CPU, 124M GPU)")
    parser.add_argument("--layouts", "--layout", type=_csv_list(("large", "gpt2", "small", "tiny")), default=["gpt2"],
                        help="comma-separated: large (one tensor), gpt2 (148 tensors), small (1000-element tensors), "
                             "tiny (10-element tensors)")
    parser.add_argument("--dtypes", "--dtype", type=_csv_list(("float32", "bfloat16", "float16")),
                        default=["float32"], help="comma-separated parameter dtypes")
    parser.add_argument("--backends", default=None, help="comma-separated fastavg backends (default: all available)")
    parser.add_argument("--baselines", type=_csv_list(BASELINES), default=list(BASELINES),
                        help=f"comma-separated, default all: {','.join(BASELINES)}")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference implementations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed steps per measurement (default: 10 on CPU, 20 on GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="short run: at most 1 warm-up and 6 iterations, smaller default size, no torch.compile")
    parser.add_argument("--averaged-model", action="store_true",
                        help="time AveragedModel.update_parameters implementations instead (layouts gpt2,small by "
                             "default; small = 2,000 tensors)")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    parser.add_argument("--plot", metavar="PNG", help="also plot GB/s against size (needs matplotlib)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.averaged_model:
        _main_averaged_model(args, device)
        return
    sizes = args.sizes or [(QUICK_SIZE if args.quick else DEFAULT_SIZE)[device.type]]
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
        configs = [Config("adamw", a) for a in AVERAGERS] + [Config("sgd", "ema")]
    else:
        configs = [Config(o, a) for o in (args.optimizers or OPTIMIZERS) for a in (args.averagers or ["ema"])]
    baselines = [b for b in args.baselines if not (args.no_reference and b in ("reference", "compiled"))]

    rows, copy_gbps = run(configs, args.layouts, sizes, [getattr(torch, d) for d in args.dtypes], device, backends,
                          warmup, iters, baselines=baselines, compile_reference=not args.quick,
                          progress=lambda line: print(line, file=sys.stderr, flush=True),
                          rounds=1 if args.quick else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    title = f"fastavg {fastavg.__version__}, torch {torch.__version__}, {name}, copy bandwidth {copy_gbps:.1f} GB/s"
    print(f"\n{title}\n")
    print(format_table(rows))
    if args.csv:
        _write_csv(rows, args.csv)
    if args.plot:
        _plot(rows, args.plot, title)


def _main_averaged_model(args, device) -> None:
    layouts = args.layouts if args.layouts != ["gpt2"] else ["gpt2", "small"]
    sizes = {layout: args.sizes[0] if args.sizes else _AVERAGED_MODEL_SIZES.get(layout, DEFAULT_SIZE)[device.type]
             for layout in layouts}
    iters = args.iters or (20 if device.type == "cuda" else 10)
    warmup, iters = (min(args.warmup, 1), min(iters, 6)) if args.quick else (args.warmup, iters)
    copy_gbps = copy_bandwidth(device, min(max(4 * max(sizes.values()), 1 << 26), 1 << 30), warmup, max(iters, 3))
    rows = []
    for dtype in args.dtypes:
        rows += run_averaged_model(layouts, sizes, getattr(torch, dtype), device, warmup, iters,
                                   progress=lambda line: print(line, file=sys.stderr, flush=True),
                                   rounds=1 if args.quick else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nfastavg {fastavg.__version__}, torch {torch.__version__}, {name}, copy bandwidth {copy_gbps:.1f} GB/s\n")
    print(format_averaged_model_table(rows, copy_gbps))
    if args.csv:
        _write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
