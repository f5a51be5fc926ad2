"""The benchmark CLI runs end to end on a tiny size and writes a sane table, CSV and plot."""
import csv

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

    assert "copy bandwidth" in err and "[1/" in err  # progress lines
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
    for r in measured:
        for key in ("median_ms", "p20_ms", "p80_ms", "gbps", "copy_fraction"):
            assert float(r[key]) > 0, (key, r)
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert r["kernels_per_step"] == ""  # counted on CUDA only
        if r["impl"] == "reference":
            assert float(r["speedup_vs_reference"]) == pytest.approx(1.0)
    assert all("| - |" in line for line in table)

    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


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
