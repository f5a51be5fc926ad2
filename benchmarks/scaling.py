"""Scaling study: how the fused step's cost grows with parameter count and with tensor count.

``python -m benchmarks.scaling`` (about 10-20 minutes on a 2-core CPU) measures AdamW + EMA (β = 0.999),
fp32, with ``fastavg.bench``'s harness, and writes ``scaling.png``, ``scaling.csv`` and ``scaling.md`` into ``--out``
(default: this folder) and the Markdown tables on stdout. ``--quick`` runs a reduced grid (one round,
up to 10M parameters, up to 1,000 tensors) in about two minutes, to check the script.

Two sweeps:

- parameter count, 1M to 100M, on one tensor (``large``) and on the GPT-2-like layout (148 tensors, the
  width scaled to the size, so the larger the model the larger its tensors);
- tensor count, 1 to 10,000 equal tensors (``split:N``) at a fixed total of 10M parameters.

Rows: ``fastavg[cpu]`` (the fused step, parameters in place), ``torch best + foreach`` (AdamW(fused=True),
then ``torch._foreach_lerp_`` on fp32 averages), ``AveragedModel`` (the fused torch step, then
``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``), and the streaming limit: the
``fastavg.bench`` probe, one ``torch.compile``d pass over the same streams (1 read-only + 4 read-and-written
fp32 streams, 36 bytes per parameter, exactly what the fused step must move; see ``fastavg/bench.py``).
Every point is the median of all timed steps of ``--rounds`` rounds (default 5) that alternate between the
rows, so that a change in the machine's speed during the sweep spreads over all of them.

``--clock cpu`` is for a shared machine: one torch thread, and each step timed by that thread's CPU time
(``time.thread_time``), so the time slices that other processes take are left out. With two threads on a
machine whose load exceeds its cores, wall time measures the scheduler: every multi-threaded op waits at
its barrier for a descheduled thread, which costs torch's per-tensor loops (hundreds of parallel regions a
step) far more than one fused pass. One thread measures the work itself, at one core's bandwidth.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from dataclasses import asdict, fields

import torch

from fastavg import bench

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = (1_000_000, 3_000_000, 10_000_000, 30_000_000, 100_000_000)
TENSOR_COUNTS = (1, 10, 100, 1_000, 10_000)
FIXED_TOTAL = 10_000_000
QUICK_SIZES = (1_000_000, 3_000_000, 10_000_000)
QUICK_TENSOR_COUNTS = (1, 100, 1_000)
ROWS = ("fastavg[cpu]", "torch best + foreach", "AveragedModel", "streaming limit (probe)")
STYLE = {"fastavg[cpu]": ("tab:blue", "fastavg (fused step)"),
         "torch best + foreach": ("tab:orange", "torch best: AdamW(fused) + _foreach_lerp_"),
         "AveragedModel": ("tab:green", "AdamW(fused) + AveragedModel"),
         "streaming limit (probe)": ("black", "streaming limit (probe)")}




def sweep(layouts, sizes, rounds, progress):
    device = torch.device("cpu")
    return bench.run([bench.Config("adamw", "ema")], layouts, sizes, torch.float32, device, ["cpu"], warmup=3,
                     iters=10, baselines=("torch-best", "averaged-model"), compile_reference=False,
                     progress=progress, rounds=rounds, limit=True, flat_params_rows=False)


def _table(rows, key_name, key) -> str:
    """Markdown: one line per point, the step time of every row, the speedup and the share of the limit."""
    points = {}
    for r in rows:
        points.setdefault(key(r), {})[r.impl] = r
    tensors_column = key_name != "tensors"
    header = (f"| {key_name} |{' tensors |' if tensors_column else ''} fastavg ms | torch best ms | AveragedModel ms | "
              "limit ms | speedup vs torch best | speedup vs AveragedModel | fastavg % of limit | torch best % of limit |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|" + ("---|" if tensors_column else "")]

    def ms(r):
        return "-" if r is None or r.median_ms is None else f"{r.median_ms:.2f}"

    def pct(r):
        return "-" if r is None or r.limit_fraction is None else f"{100 * r.limit_fraction:.0f}%"

    for label, impls in points.items():
        fast, best, averaged, limit = (impls.get(name) for name in ROWS)
        speedup = ("-" if not (fast and best and fast.median_ms and best.median_ms)
                   else f"{best.median_ms / fast.median_ms:.2f}x")
        vs_averaged = ("-" if not (fast and averaged and fast.median_ms and averaged.median_ms)
                       else f"{averaged.median_ms / fast.median_ms:.2f}x")
        lines.append(f"| {label} |{f' {fast.tensors} |' if tensors_column else ''} {ms(fast)} | {ms(best)} | "
                     f"{ms(averaged)} | {ms(limit)} | "
                     f"{speedup} | {vs_averaged} | {pct(fast)} | {pct(best)} |")
    return "\n".join(lines)


def _series(rows, x_of, impl, value):
    points = sorted((x_of(r), value(r)) for r in rows if r.impl == impl and r.median_ms is not None)
    return [p[0] for p in points], [p[1] for p in points]


def _speedup_series(rows, x_of, baseline):
    by_x = {}
    for r in rows:
        by_x.setdefault(x_of(r), {})[r.impl] = r
    points = sorted((x, impls[baseline].median_ms / impls["fastavg[cpu]"].median_ms) for x, impls in by_x.items()
                    if impls.get("fastavg[cpu]") and impls.get(baseline)
                    and impls["fastavg[cpu]"].median_ms and impls[baseline].median_ms)
    return [p[0] for p in points], [p[1] for p in points]


def plot(size_rows, count_rows, path, title):
    """Top: step time (log-log) with the streaming limit; bottom: fastavg's speedup over each baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharex="col", gridspec_kw={"height_ratios": [3, 2]})
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    panels = [(axes[:, 0], size_rows, lambda r: r.numel,
               (("gpt2", "-", "o", "GPT-2-like"), ("large", "--", "s", "one tensor")),
               "parameters", "step time against parameter count"),
              (axes[:, 1], count_rows, lambda r: r.tensors, ((None, "-", "o", None),),
               f"tensors ({bench._human(FIXED_TOTAL)} parameters in all, equal tensors)",
               f"step time against tensor count, {bench._human(FIXED_TOTAL)} parameters")]
    for (top, bottom), rows, x_of, layouts, xlabel, heading in panels:
        for layout, dash, marker, words in layouts:
            subset = [r for r in rows if layout is None or r.layout == layout]
            for impl in ROWS:
                if impl == "streaming limit (probe)" and layout == "large":
                    continue  # the same flat pass as for the GPT-2-like sizes: drawn once
                color, label = STYLE[impl]
                if words and impl != "streaming limit (probe)":
                    label = f"{label}, {words}"
                xs, ys = _series(subset, x_of, impl, lambda r: r.median_ms)
                top.plot(xs, ys, dash, marker=marker, color=color, label=label, markersize=4,
                         linewidth=2.4 if impl == "streaming limit (probe)" else 1.5)
            for baseline, shade in (("torch best + foreach", "tab:orange"), ("AveragedModel", "tab:green")):
                xs, ys = _speedup_series(subset, x_of, baseline)
                name = "over torch best" if baseline.startswith("torch") else "over AveragedModel"
                bottom.plot(xs, ys, dash, marker=marker, color=shade, markersize=4,
                            label=f"{name}{', ' + words if words else ''}")
                if baseline.startswith("torch"):
                    for x, y in zip(xs, ys):
                        bottom.annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(0, 5),
                                        ha="center", fontsize=7, color=shade)
        bottom.axhline(1.0, color="grey", linewidth=1)
        for ax, ticks in ((top, matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0))),
                          (bottom, matplotlib.ticker.FixedLocator([0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16]))):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticks)
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        top.set_title(f"AdamW + EMA, fp32: {heading}", fontsize=9)
        top.set_ylabel("ms per step (median)")
        top.legend(fontsize=7)
        bottom.set_ylabel("fastavg's speedup (above 1 = faster)")
        bottom.set_xlabel(xlabel)
        bottom.legend(fontsize=7)
    fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0],
                                     epilog="Writes scaling.png, scaling.csv and scaling.md (the tables) into --out "
                                            "and prints the tables.")
    parser.add_argument("--out", default=HERE, help="folder for the outputs (default: benchmarks/)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per point (default 5)")
    parser.add_argument("--quick", action="store_true", help="reduced grid, one round: checks the script")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: wall time with torch's threads (default); cpu: CPU time of one thread "
                             "(torch.set_num_threads(1), time.thread_time), for a shared machine: it leaves out "
                             "the time slices other processes take")
    parser.add_argument("--from-csv", metavar="CSV",
                        help="measure nothing: redraw the plot and reprint the tables from a scaling.csv (the title "
                             "from the scaling.md beside it)")
    args = parser.parse_args(argv)
    if args.from_csv:
        size_rows, count_rows = _read_csv(args.from_csv)
        notes = os.path.join(os.path.dirname(args.from_csv), "scaling.md")
        title = ""
        if os.path.exists(notes):
            with open(notes) as f:
                title = f.readline().strip()
        os.makedirs(args.out, exist_ok=True)
        plot(size_rows, count_rows, os.path.join(args.out, "scaling.png"), title)
        print(_report(title, size_rows, count_rows))
        return
    if args.clock == "cpu":
        torch.set_num_threads(1)
        bench.CLOCK = time.thread_time
    sizes, counts = (QUICK_SIZES, QUICK_TENSOR_COUNTS) if args.quick else (SIZES, TENSOR_COUNTS)
    rounds = 1 if args.quick else args.rounds

    loads = []

    def progress(line):
        load = bench.load_average()
        if load is not None:
            loads.append(load)
        print(line, file=sys.stderr, flush=True)

    started = time.time()
    progress(f"scaling: start, load average {bench.load_average()}")
    size_rows = sweep(["gpt2", "large"], list(sizes), rounds, progress)
    count_rows = sweep([f"split:{n}" for n in counts], [FIXED_TOTAL], rounds, progress)
    minutes = (time.time() - started) / 60
    load = (f"1-min load average {min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f}) on "
            f"{os.cpu_count()} CPUs" if loads else "load average unknown")

    import fastavg

    title = (f"fastavg {fastavg.__version__}, torch {torch.__version__}, {bench.device_name(torch.device('cpu'))}; "
             f"median of {rounds} alternating round(s) per point; "
             f"{'CPU time of one thread' if args.clock == 'cpu' else 'wall time'}; {load} during the "
             f"{minutes:.0f} min sweep")
    os.makedirs(args.out, exist_ok=True)
    plot(size_rows, count_rows, os.path.join(args.out, "scaling.png"), title)
    with open(os.path.join(args.out, "scaling.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sweep"] + [field.name for field in fields(bench.Row)])
        writer.writeheader()
        for sweep_name, rows in (("parameters", size_rows), ("tensors", count_rows)):
            for row in rows:
                writer.writerow({"sweep": sweep_name, **{k: "" if v is None else v for k, v in asdict(row).items()}})

    report = _report(title, size_rows, count_rows)
    with open(os.path.join(args.out, "scaling.md"), "w") as f:
        f.write(report + "\n")
    print(report)


def _report(title, size_rows, count_rows) -> str:
    parts = [title]
    for layout in ("gpt2", "large"):
        parts.append(f"\nParameter count, {'GPT-2-like layout' if layout == 'gpt2' else 'one tensor'}:\n")
        parts.append(_table([r for r in size_rows if r.layout == layout], "parameters",
                            lambda r: bench._human(r.numel)))
    parts.append(f"\nTensor count, {bench._human(FIXED_TOTAL)} parameters in all:\n")
    parts.append(_table(count_rows, "tensors", lambda r: f"{r.tensors:,}"))
    return "\n".join(parts)


def _read_csv(path):
    """The rows of both sweeps from a scaling.csv."""
    types = {field.name: field.type for field in fields(bench.Row)}
    sweeps = {"parameters": [], "tensors": []}
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            values = {}
            for name, text in record.items():
                if name == "sweep":
                    continue
                if text == "":
                    values[name] = None
                elif "int" in str(types[name]):
                    values[name] = int(text)
                elif "float" in str(types[name]):
                    values[name] = float(text)
                else:
                    values[name] = text
            sweeps[record["sweep"]].append(bench.Row(**values))
    return sweeps["parameters"], sweeps["tensors"]


if __name__ == "__main__":
    main()
