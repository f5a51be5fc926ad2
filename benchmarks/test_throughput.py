"""pytest-benchmark suite over ``fastavg.bench``'s harness: ``pytest benchmarks/ --benchmark-only``.

Each benchmark times one sample of ``fastavg.bench`` (one step, or a cycle of 10 steps for the modes
that average every 10th step) and records in ``extra_info`` the bytes the step must move and the GB/s
that the median implies (see ``fastavg.bench``'s docstring for the byte counts). Sizes are small so
the suite runs in about a minute on a CPU; ``python -m fastavg.bench`` is the full benchmark.
"""
import math

import pytest
import torch

import fastavg
from fastavg import bench

SIZE = 300_000
LAYOUTS = ("large", "gpt2")
CONFIGS = [bench.Config("adamw", a) for a in bench.AVERAGERS] + [bench.Config("sgd", "ema")]
BASELINES = ("torch-best", "averaged-model", "ema-loop", "ema-pytorch")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backends():
    status = fastavg.backend_status()
    wanted = ("cpu",) if DEVICE.type == "cpu" else ("triton", "cuda")
    return [b for b in wanted if not status[b]] or ["reference"]


def _cases():
    for layout in LAYOUTS:
        shapes = bench.layout_shapes(layout, SIZE)
        for config in CONFIGS:
            impls = bench._implementations(config, _backends(), BASELINES, False, len(shapes))
            for name in impls:
                yield pytest.param(layout, config, name, id=f"{config.name}-{layout}-{name}".replace(" ", "_"))


@pytest.mark.parametrize("layout,config,impl", list(_cases()))
def test_step_throughput(benchmark, layout, config, impl):
    shapes = bench.layout_shapes(layout, SIZE)
    build = bench._implementations(config, _backends(), BASELINES, False, len(shapes))[impl]
    opt = build(bench._params(shapes, torch.float32, DEVICE))

    def cycle():
        for _ in range(config.cycle):
            opt.step()
        bench._sync(DEVICE)

    benchmark.pedantic(cycle, rounds=max(3, 10 // config.cycle), warmup_rounds=1, iterations=1)

    numel = sum(math.prod(s) for s in shapes)
    bytes_per_step = config.bytes_per_element(4) * numel
    benchmark.extra_info.update(config=config.name, layout=layout, numel=numel, tensors=len(shapes),
                                bytes_per_step=bytes_per_step)
    if benchmark.stats is not None:
        seconds_per_step = benchmark.stats.stats.median / config.cycle
        benchmark.extra_info["gbps"] = bytes_per_step / seconds_per_step / 1e9
