"""The digits quality study end to end, on a tiny budget: its outputs exist and make sense."""
import re
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the quality study needs scikit-learn (pip install scikit-learn)")
pytest.importorskip("matplotlib", reason="the quality study plots with matplotlib (pip install matplotlib)")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def digits_study(monkeypatch):
    # benchmarks/ is not part of the installed package; import it from the checkout.
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.quality import digits

    return digits


def test_label_noise_is_symmetric_and_reproducible(digits_study):
    import torch

    labels = torch.arange(1000) % 10
    noisy = digits_study.symmetric_label_noise(labels, 0.4)
    assert torch.equal(noisy, digits_study.symmetric_label_noise(labels, 0.4))
    flipped = noisy != labels
    assert flipped.sum().item() == 400
    assert noisy[flipped].unique().numel() == 10
    assert torch.equal(digits_study.symmetric_label_noise(labels, 0.0), labels)


def test_expected_calibration_error_of_known_predictions(digits_study):
    import torch

    confident_and_right = torch.eye(10)[:4]
    assert digits_study.expected_calibration_error(confident_and_right, torch.arange(4)) == pytest.approx(0.0)
    # Confidence 0.55 on every point, half of them right: one bin, gap 0.05.
    probabilities = torch.full((4, 10), 0.05)
    probabilities[:, 0] = 0.55
    assert digits_study.expected_calibration_error(probabilities, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.05)


def test_batchnorm_statistics_are_recomputed_inside_and_restored_after(digits_study):
    import torch

    model = digits_study.SmallMLP()
    norm = model.layers[2]
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    images = torch.randn(64, 8, 8)
    with digits_study.batchnorm_recomputed(model, images):
        hidden = model.layers[1](images.flatten(1))
        torch.testing.assert_close(norm.running_mean, hidden.mean(dim=0))
        torch.testing.assert_close(norm.running_var, hidden.var(dim=0))
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert norm.momentum == 0.1


def test_quick_study_writes_sane_results(digits_study, tmp_path):
    results = digits_study.main(["--quick", "--epochs", "2", "--seeds", "2", "--noise-levels", "0.2",
                                 "--out", str(tmp_path)])
    assert results == tmp_path / "RESULTS.md"
    plot = tmp_path / "accuracy_vs_epoch.png"
    assert plot.stat().st_size > 0 and plot.read_bytes().startswith(b"\x89PNG")
    text = results.read_text()
    assert "accuracy_vs_epoch.png" in text
    accuracy_section = text.split("## Test accuracy (%)")[1].split("\n## ")[0]
    for name in digits_study.method_names():
        row = re.search(rf"^\| {re.escape(name)} \| ([0-9.]+) ± [0-9.]+ \|$", accuracy_section, re.MULTILINE)
        assert row is not None, f"no accuracy row for {name}"
        assert float(row.group(1)) > 10.0, f"{name} is not above chance"
    assert "bitwise identical" in text
