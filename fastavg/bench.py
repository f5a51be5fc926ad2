"""``python -m fastavg.bench``: step throughput of fastavg against what users run today.

For each configuration (optimizer + averager) and each implementation, in one run: the median step time
(with p20/p80), the bandwidth it implies from the bytes the fused step must move, that bandwidth as a
share of the machine's copy bandwidth measured in the same run, and the speedup against the reference
and against torch's best (``torch.optim.AdamW(fused=True)`` / ``SGD(fused=True)`` followed by
``torch._foreach_lerp_`` on fp32 averages).

Bytes per parameter element that one fused step must move (``s`` = parameter bytes, ``K`` averages):
AdamW + EMA: read θ, g, m, v, e and write θ, m, v, e: ``3s + 16 + 8K``;
SGD with momentum + EMA: read θ, g, b, e and write θ, b, e: ``3s + 8 + 8K``.
Every implementation is credited with these same bytes, so GB/s ratios are speed ratios.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch

import fastavg
from fastavg import reference

DEFAULT_SIZE = {"cpu": 10_000_000, "cuda": 124_000_000}


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
    raise ValueError(f"layout must be 'large', 'gpt2' or 'small', got {layout!r}")


@dataclass(frozen=True)
class Config:
    optimizer: str  # "adamw" or "sgd"
    decays: tuple[float, ...] = (0.999,)

    @property
    def name(self) -> str:
        head = "AdamW" if self.optimizer == "adamw" else "SGD-momentum"
        return f"{head}+EMA" + (f"x{len(self.decays)}" if len(self.decays) > 1 else "")

    def bytes_per_element(self, param_bytes: int) -> int:
        state = 16 if self.optimizer == "adamw" else 8
        return 3 * param_bytes + state + 8 * len(self.decays)

    def kwargs(self) -> dict:
        if self.optimizer == "adamw":
            return dict(lr=1e-3, weight_decay=0.01)
        return dict(lr=1e-2, momentum=0.9)


def _params(shapes, dtype, device):
    params = [torch.randn(s, dtype=dtype, device=device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


class _TorchBest:
    """torch's fastest optimizer for the device, then one ``_foreach_lerp_`` per EMA on fp32 averages."""

    def __init__(self, params, config: Config):
        cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.SGD
        try:
            self.opt = cls(params, fused=True, **config.kwargs())
        except (RuntimeError, ValueError):
            self.opt = cls(params, foreach=True, **config.kwargs())
        self.params = params
        self.cast = params[0].dtype != torch.float32
        self.averages = [[p.detach().float() for p in params] for _ in config.decays]
        self.weights = [1 - d for d in config.decays]

    @torch.no_grad()
    def step(self):
        self.opt.step()
        current = [p.detach().float() for p in self.params] if self.cast else [p.detach() for p in self.params]
        for averages, weight in zip(self.averages, self.weights):
            torch._foreach_lerp_(averages, current, weight)


def _implementations(config: Config, backends: list[str], with_reference: bool, with_torch: bool):
    cls_name = "AdamW" if config.optimizer == "adamw" else "SGD"
    impls = {}
    for backend in backends:
        impls[f"fastavg[{backend}]"] = lambda p, b=backend: getattr(fastavg, cls_name)(
            p, average=fastavg.EMA(config.decays), backend=b, **config.kwargs())
    if with_torch:
        impls["torch best + lerp"] = lambda p: _TorchBest(p, config)
    if with_reference:
        impls["reference"] = lambda p: getattr(reference, cls_name)(
            p, average=fastavg.EMA(config.decays), **config.kwargs())
    return impls


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, iters: int) -> list[float]:
    """Wall time of each of ``iters`` calls after ``warmup`` untimed ones, in seconds."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth(device, nbytes: int, warmup: int, iters: int) -> float:
    """GB/s of a large device-to-device copy (read + write counted), the machine's practical ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = time_steps(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


@dataclass
class Row:
    config: str
    layout: str
    numel: int
    tensors: int
    impl: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float
    copy_fraction: float
    speedup_vs_reference: float | None = None
    speedup_vs_torch: float | None = None


def run(configs, layout, total, dtype, device, backends, warmup, iters, with_reference=True, with_torch=True,
        progress=print):
    shapes = layout_shapes(layout, total)
    numel = sum(math.prod(s) for s in shapes)
    param_bytes = torch.finfo(dtype).bits // 8
    copy_gbps = copy_bandwidth(device, max(numel * 4, 1 << 26), warmup, iters)
    progress(f"copy bandwidth on {device}: {copy_gbps:.1f} GB/s")
    rows = []
    for config in configs:
        moved = config.bytes_per_element(param_bytes) * numel
        config_rows = {}
        for impl_name, build in _implementations(config, backends, with_reference, with_torch).items():
            params = _params(shapes, dtype, device)
            opt = build(params)
            slow = impl_name == "reference"
            times = time_steps(opt.step, device, 1 if slow else warmup, max(3, iters // 4) if slow else iters)
            del opt, params
            q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
            median = statistics.median(times)
            row = Row(config.name, layout, numel, len(shapes), impl_name, median * 1e3, q[0] * 1e3, q[3] * 1e3,
                      moved / median / 1e9, moved / median / 1e9 / copy_gbps)
            config_rows[impl_name] = row
            progress(f"{config.name:<16} {impl_name:<20} {row.median_ms:9.2f} ms  {row.gbps:7.1f} GB/s")
        for row in config_rows.values():
            if "reference" in config_rows:
                row.speedup_vs_reference = config_rows["reference"].median_ms / row.median_ms
            if "torch best + lerp" in config_rows:
                row.speedup_vs_torch = config_rows["torch best + lerp"].median_ms / row.median_ms
        rows.extend(config_rows.values())
    return rows, copy_gbps


def format_table(rows: list[Row]) -> str:
    def ratio(x):
        return "" if x is None else f"{x:.2f}x"

    lines = ["| config | layout | params | tensors | implementation | median ms (p20-p80) | GB/s | % copy BW "
             "| vs reference | vs torch best |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.config} | {r.layout} | {r.numel / 1e6:.1f}M | {r.tensors} | {r.impl} | "
                     f"{r.median_ms:.2f} ({r.p20_ms:.2f}-{r.p80_ms:.2f}) | {r.gbps:.1f} | {100 * r.copy_fraction:.0f}% | "
                     f"{ratio(r.speedup_vs_reference)} | {ratio(r.speedup_vs_torch)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastavg.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None, help="parameters per layout (default: 10M CPU, 124M GPU)")
    parser.add_argument("--layout", default="gpt2", choices=["large", "gpt2", "small"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backends", default=None, help="comma-separated fastavg backends (default: all available)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference implementation")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    size = args.size or DEFAULT_SIZE[device.type]
    status = fastavg.backend_status()
    if args.backends:
        backends = args.backends.split(",")
        for name in backends:
            if status.get(name, "unknown backend"):
                parser.error(f"backend {name!r} is unavailable: {status.get(name, 'unknown backend')}")
    else:
        backends = [b for b in ("triton", "cuda", "cpu") if not status[b]
                    and (b == "cpu") == (device.type == "cpu")] or ["reference"]
    configs = [Config("adamw"), Config("sgd")]
    rows, copy_gbps = run(configs, args.layout, size, getattr(torch, args.dtype), device, backends, args.warmup,
                          args.iters, with_reference=not args.no_reference)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nfastavg {fastavg.__version__}, torch {torch.__version__}, {name}, {args.dtype}, "
          f"copy bandwidth {copy_gbps:.1f} GB/s\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
