"""The benchmark CLI runs end to end on a tiny size and writes a sane table, CSV, plot and headline; no timing is asserted."""
import csv
import sys
from pathlib import Path

import pytest
import torch

from fastavg import bench


@pytest.fixture
def one_thread():
    # On a busy machine every multi-threaded region of a tiny step can wait a whole time slice; this test
    # checks what the CLI writes, not how fast it runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cli_quick_run_writes_table_csv_and_plot(tmp_path, capsys, one_thread):
    pytest.importorskip("matplotlib")
    csv_path, png_path = tmp_path / "rows.csv", tmp_path / "plot.png"
    bench.main(["--quick", "--sizes", "10k,20k", "--layouts", "large,small", "--iters", "3",
                "--csv", str(csv_path), "--plot", str(png_path)])
    out, err = capsys.readouterr()

    assert "[1/" in err and "streaming limit (probe)" in err  # per-row progress lines
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(table) > 0

    measured = [r for r in rows if not r["unavailable"]]
    assert {r["config"] for r in measured} == {
        "AdamW+EMA", "AdamW+EMA/10", "AdamW+LAWA/10", "AdamW+SEMA/10", "AdamW+EMAx3", "SGD-momentum+EMA"}
    assert {r["layout"] for r in measured} == {"large", "small"}
    impls = {r["impl"] for r in measured}
    assert {"torch best + foreach", "AveragedModel", "per-param EMA loop", "reference"} <= impls
    assert any(i.startswith("fastavg[") for i in impls)
    assert "reference (compiled)" not in impls  # --quick does not compile
    probes = [r for r in measured if r["impl"] == "streaming limit (probe)"]
    assert len(probes) == 4 * 6  # one per configuration in each layout/size group
    for r in probes:
        assert float(r["limit_fraction"]) == pytest.approx(1.0)
        assert r["speedup_vs_torch"] == r["speedup_vs_reference"] == ""
    for r in measured:
        for key in ("median_ms", "p20_ms", "p80_ms", "gbps", "limit_fraction"):
            assert float(r[key]) > 0, (key, r)
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert r["kernels_per_step"] == ""  # counted on CUDA only
        if r["impl"] == "reference":
            assert float(r["speedup_vs_reference"]) == pytest.approx(1.0)
    assert all("| - |" in line for line in table)

    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # The run ends with a headline; at 10k-20k parameters it refuses to claim a speedup.
    result = out[out.index("Result on CPU"):]
    assert "fastavg's fused step against torch's best" in result
    assert "one tensor, 10k parameters, float32:" in result and "20 tensors of 1000 elements" in result
    assert result.count("too small for a throughput result") == 4
    assert "faster" not in result and "slower" not in result
    assert "--quick" in result


def test_smoke_run_is_labelled_and_claims_nothing(capsys, one_thread):
    bench.main(["--smoke", "--optimizers", "adamw", "--averagers", "ema", "--layouts", "large", "--no-reference"])
    out, err = capsys.readouterr()
    assert err.startswith("SMOKE TEST")
    assert "SMOKE TEST (not a result)" in out and ", fastavg backend: cpu\n" in out
    table = [line for line in out.splitlines() if line.startswith("| AdamW")]
    assert {line.split("|")[4].strip() for line in table} == {"0.2M"}
    impls = {line.split("|")[6].strip() for line in table}
    assert {"streaming limit (probe)", "fastavg[cpu]", "torch best + foreach"} <= impls
    for line in table:  # % of limit, vs reference, vs torch best: empty
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        assert cells[8] == cells[10] == cells[11] == "", line
    summary = out[out.index("SMOKE TEST on CPU"):]
    assert "no speedup is claimed" in summary
    assert "faster" not in out and "% of the streaming limit" not in out


def _help(monkeypatch, capsys, argv0):
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_names_the_program_and_tells_the_defaults(monkeypatch, capsys):
    text = _help(monkeypatch, capsys, "/venv/bin/fastavg-bench")
    assert text.startswith("usage: fastavg-bench ")
    text = _help(monkeypatch, capsys, "/repo/fastavg/bench.py")  # python -m fastavg.bench
    assert text.startswith("usage: python -m fastavg.bench ")
    assert "``" not in text  # no reStructuredText markup
    flat = " ".join(text.split())
    assert "10M on CPU, which the gpt2 layout runs as 9.7M" in flat and "124M on GPU" in flat
    assert "float32, bfloat16, float16" in flat
    for column in ("median ms (p20-p80)", "GB/s", "% of limit", "kernels/step", "vs reference", "vs torch best"):
        assert f"\n  {column} " in text, column
    for row in ("streaming limit (probe)", "fastavg[<backend>]", "torch best + foreach", "AveragedModel",
                "per-param EMA loop", "ema_pytorch", "trl BEMACallback", "reference (compiled)"):
        assert row in text, row
    assert "--smoke" in text and "--quick" in text


def _group(times_ms, limit_fraction_of=None):
    rows = {}
    for impl, ms in times_ms.items():
        rows[impl] = bench.Row("AdamW+EMA", "gpt2", "float32", 9_700_000, 148, impl, median_ms=ms, p20_ms=ms,
                               p80_ms=ms, gbps=36 * 9.7e6 / (ms / 1e3) / 1e9)
    return rows


def test_headline_states_speedup_and_fraction_of_the_limit():
    group = _group({"streaming limit (probe)": 4.0, "fastavg[cpu]": 5.0, "fastavg[cpu, flat_params]": 4.5,
                    "torch best + foreach": 10.0, "reference": 40.0})
    bench._relate(group, "torch best + foreach")
    assert group["fastavg[cpu]"].limit_fraction == pytest.approx(0.8)
    assert group["torch best + foreach"].limit_fraction == pytest.approx(0.4)
    assert group["streaming limit (probe)"].speedup_vs_torch is None
    text = bench.headline(list(group.values()), "CPU Test (2 threads)")
    assert text.startswith("Result on CPU Test (2 threads): fastavg's fused step against torch's best")
    assert "GPT-2-like layout (148 tensors), 9.7M parameters, float32:" in text
    # the default layout's row (parameters in place) is the one quoted, not flat_params
    assert "AdamW+EMA          2.00x faster: fastavg[cpu] 5.00 ms, torch's best 10.00 ms" in text
    assert "fastavg at 80% of the streaming limit (torch's best 40%)" in text
    assert "Above 100%" not in text

    slower = _group({"streaming limit (probe)": 4.0, "fastavg[cpu]": 3.9, "torch best + foreach": 1.95})
    bench._relate(slower, "torch best + foreach")
    text = bench.headline(list(slower.values()), "CPU")
    assert "0.50x (50% slower)" in text and "103% of the streaming limit" in text and "Above 100%" in text

    busy = bench.headline(list(group.values()), "CPU", load=100.0)
    assert "Busy machine: load average up to 100.0" in busy
    assert "Busy machine" not in bench.headline(list(group.values()), "CPU", load=0.0)

    no_probe = _group({"fastavg[cpu]": 5.0, "torch best + foreach": 5.0})
    bench._relate(no_probe, "torch best + foreach")
    assert "1.00x faster" in bench.headline(list(no_probe.values()), "CPU")
    assert "streaming limit not measured" in bench.headline(list(no_probe.values()), "CPU")


def test_title_says_loudly_when_only_the_reference_ran():
    status = {"reference": "", "cpu": "the extension did not build (no compiler)", "cuda": "no GPU", "triton": "no GPU"}
    words = bench.backend_words(["reference"], status, torch.device("cpu"))
    assert words.startswith("fastavg backend: reference ONLY (pure torch, slow")
    assert "cpu: the extension did not build (no compiler)" in words and "no GPU" not in words
    assert bench.backend_words(["triton", "cuda"], status, torch.device("cuda")) == "fastavg backends: triton, cuda"


def test_averaged_model_headline_names_the_update():
    group = _group({"fastavg.AveragedModel": 1.0, "torch AveragedModel": 2.0})
    bench._relate(group, "torch AveragedModel")
    text = bench.headline(list(group.values()), "CPU", baseline="torch AveragedModel",
                          subject="fastavg.AveragedModel's fused update")
    assert text.startswith("Result on CPU: fastavg.AveragedModel's fused update against")


def test_probe_streams_are_the_bytes_the_step_is_credited_with():
    for optimizer in bench.OPTIMIZERS:
        for averager in bench.AVERAGERS:
            config = bench.Config(optimizer, averager)
            for dtype in (torch.float32, torch.bfloat16):
                size = torch.finfo(dtype).bits // 8
                readonly, inplace = config.streams(dtype)
                probe_bytes = bench.StreamingProbe.bytes_for(readonly, inplace)
                if averager not in ("ema-every-10", "lawa", "bema"):  # averages every step (SEMA too)
                    assert probe_bytes == config.bytes_per_element(size), config
                else:  # the 9 ordinary steps in 10: the optimizer's streams alone
                    assert probe_bytes == bench.Config(optimizer).bytes_per_element(size) - 8
    assert bench.Config("adamw", "ema").streams(torch.float32) == ((torch.float32,), (torch.float32,) * 4)


def test_probe_is_one_pass_that_updates_the_written_streams_in_place(one_thread):
    probe = bench.StreamingProbe(1000, (torch.float32,), (torch.float32, torch.float32), torch.device("cpu"))
    before = [t.clone() for t in probe.inplace]
    probe.step()
    for old, new in zip(before, probe.inplace):
        torch.testing.assert_close(new, old * 0.5 + probe.readonly[0])


def test_split_layout():
    assert bench.layout_shapes("split:4", 1000) == [(250,)] * 4
    with pytest.raises(ValueError):
        bench.layout_shapes("split:0", 1000)


def test_bytes_per_element_follow_the_documented_formulas():
    assert bench.Config("adamw", "ema").bytes_per_element(4) == 3 * 4 + 16 + 8
    assert bench.Config("sgd", "ema").bytes_per_element(2) == 3 * 2 + 8 + 8
    assert bench.Config("adamw", "ema-multi").bytes_per_element(4) == 3 * 4 + 16 + 8 * 3
    assert bench.Config("adamw", "ema-every-10").bytes_per_element(4) == pytest.approx(3 * 4 + 16 + 0.8)
    assert bench.Config("adamw", "lawa").bytes_per_element(2) == pytest.approx(3 * 2 + 16 + (2 * 2 + 8) / 10)
    assert bench.Config("adamw", "sema").bytes_per_element(4) == 3 * 4 + 16 + 8


def test_unavailable_rows_say_why():
    row = bench.Row("AdamW+EMA", "gpt2", "float32", 10, 1, "reference (compiled)", unavailable="no compiler")
    assert "unavailable: no compiler" in bench.format_table([row])


def test_bad_flags_are_rejected():
    with pytest.raises(SystemExit):
        bench.main(["--averagers", "nope"])
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "lots"])


def test_scaling_study_plots_and_tabulates_rows(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    # benchmarks/ is not part of the installed package; import it from the checkout.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks import scaling

    def rows(layout, numel, tensors, times):
        out = []
        for impl, ms in zip(scaling.ROWS, times):
            row = bench.Row("AdamW+EMA", layout, "float32", numel, tensors, impl, median_ms=ms, p20_ms=ms, p80_ms=ms,
                            gbps=36 * numel / (ms / 1e3) / 1e9)
            out.append(row)
        group = {r.impl: r for r in out}
        bench._relate(group, "torch best + foreach")
        return out

    size_rows = rows("gpt2", 1_000_000, 148, (2, 4, 5, 1.6)) + rows("gpt2", 10_000_000, 148, (20, 22, 25, 16))
    size_rows += rows("large", 1_000_000, 1, (2, 2, 3, 1.6)) + rows("large", 10_000_000, 1, (20, 20, 21, 16))
    count_rows = rows("split:1", 10_000_000, 1, (20, 20, 21, 16)) + rows("split:1000", 10_000_000, 1000, (20, 40, 50, 16))
    scaling.plot(size_rows, count_rows, tmp_path / "scaling.png", "test")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = scaling._report("title", size_rows, count_rows)
    assert "| 1.0M | 148 | 2.00 | 4.00 | 5.00 | 1.60 | 2.00x | 2.50x | 80% | 40% |" in report
    assert "| 1,000 | 20.00 | 40.00 | 50.00 | 16.00 | 2.00x | 2.50x | 80% | 40% |" in report
