"""Quality study on scikit-learn's handwritten digits: do the seed papers' claims hold with fastavg?

``python -m benchmarks.quality.digits`` runs the full study (about 4 minutes on an idle 2-core CPU
machine), ``--quick`` a reduced one (about 30 seconds). Both write ``RESULTS.md`` and
``accuracy_vs_epoch.png`` into ``--out`` (default: this folder, where the full study's results are kept).

Protocol
--------
Data
    ``sklearn.datasets.load_digits``: 1797 grey 8x8 images of 10 digits, bundled with scikit-learn.
    One stratified split (``random_state=0``) into 1347 training and 450 test images. Pixels are
    standardized with the training set's mean and standard deviation.
Label noise
    Symmetric: at noise level p, exactly round(p * 1347) training labels, chosen at random, are each
    replaced by one of the 9 other classes, uniformly. The flip has its own fixed seed and does not
    depend on the training seed, so every seed trains on the same noisy labels (and the 20% flips are
    a subset of the 40% flips). Test labels are always clean.
Model and training
    An MLP with one hidden layer of 256 units, BatchNorm and ReLU (19.5k parameters), cross-entropy,
    ``fastavg.SGD`` with momentum 0.9, weight decay 5e-4, batch 16 (the ragged last batch of an epoch
    is dropped), peak learning rate 0.05 with linear warm-up over the first 10% of steps, then cosine
    decay to zero, stepped every batch. The training seed fixes the initialization and the batch order.
Methods
    One optimizer holds one averager, so each *training run* below is one optimizer, and one run can
    give several rows (the model's own weights, and each of its averages):

    - ``EMA((0.99, 0.999))``: the last iterate and both EMAs, from one trajectory;
    - ``SWA`` over the last 25% of steps (averaged every step), ``LAWA`` (k=5, one snapshot at the end of
      every epoch): separate runs on the same seed, hence the same trajectory (the study checks that the
      final weights are bitwise equal to the EMA run's);
    - ``SEMA`` (decay 0.99, the model switched to the EMA at the end of every epoch) and ``BELAY`` (decay
      0.99, reaction 0.1 and 1.0, inertia 0 and 0.9): these change the trajectory; their average is
      evaluated;
    - heavy-ball momentum (``momentum_style="heavy_ball"``, learning rate inside the velocity) against
      torch's form (the learning rate outside), under the same warm-up and schedule: last iterates;
    - ``PowerEMA((0.05, 0.10))`` (EDM2's power-function EMA) with a snapshot of both profiles at every
      epoch's end: both profiles, and the EMA of σ_rel 0.20 synthesized post hoc (EDM2's Algorithm 3,
      ``fastavg.posthoc.synthesize``) from the snapshots up to that epoch;
    - ``BEMA`` with TRL's defaults but ``update_freq`` 1 (the paper's rule at every step) and one epoch
      (TRL's default of 400 steps would leave a run of 3024 steps with 7 updates);
      these three runs do not feed back into training and share the first run's trajectory.

    SEMA and BELAY use decay 0.99 because an epoch here is 84 steps: 0.99's horizon (about 100 steps)
    is about one epoch, as in the SEMA paper's setting where the EMA horizon is of the order of an epoch.
Evaluation
    At the end of every epoch, on the test set. Averaged weights are evaluated inside
    ``opt.swap_average(k)`` with BatchNorm running statistics recomputed on the training images (one
    forward pass in training mode, as ``torch.optim.swa_utils.update_bn``); the training model's own
    BatchNorm buffers are restored afterwards. The last iterate is evaluated with its own running
    statistics.
Metrics (after the last epoch)
    Accuracy; expected calibration error (15 equal-width confidence bins: the bin-size-weighted mean of
    |accuracy - mean confidence|) and its sign (mean confidence minus accuracy); disagreement between
    seeds (the fraction of test images on which two seeds predict different classes, for every pair of
    seeds). Mean +- sample standard deviation over seeds (over seed pairs for disagreement). Test
    accuracy at 25% and 50% of the epochs measures early progress; the peak test accuracy over the epochs
    (an oracle, for diagnosis only) shows how much a method lost to memorizing noisy labels.
Claims
    Each claim compares a method with a baseline through paired differences (same seed, or same seed
    pair), and calls the method better or worse when the mean difference is outside the 95% t-interval
    of its standard error, otherwise "no clear difference" (no verdict with fewer than 3 samples).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastavg

NUM_CLASSES = 10
TEST_SIZE = 450
TRAIN_SIZE = 1797 - TEST_SIZE
SPLIT_SEED = 0
LABEL_NOISE_SEED = 1234
ECE_BINS = 15
VARIANT_DECAY = 0.99
DEFAULT_OUT = Path(__file__).resolve().parent
RESULTS_NAME = "RESULTS.md"
PLOT_NAME = "accuracy_vs_epoch.png"


@dataclass(frozen=True)
class StudyConfig:
    epochs: int
    seeds: int
    noise_levels: tuple[float, ...]
    batch_size: int = 16
    peak_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.1


FULL_STUDY = StudyConfig(epochs=36, seeds=5, noise_levels=(0.0, 0.2, 0.4))
QUICK_STUDY = StudyConfig(epochs=10, seeds=3, noise_levels=(0.0, 0.4))


# --- data ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsSplit:
    train_images: torch.Tensor  # (1347, 8, 8), standardized
    train_labels: torch.Tensor  # clean labels
    test_images: torch.Tensor  # (450, 8, 8)
    test_labels: torch.Tensor


def load_digits_split() -> DigitsSplit:
    """The fixed stratified 1347/450 split of scikit-learn's digits, standardized with training statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_images, test_images, train_labels, test_labels = train_test_split(
        digits.images.astype(np.float32), digits.target, test_size=TEST_SIZE, stratify=digits.target,
        random_state=SPLIT_SEED,
    )
    mean, std = train_images.mean(), train_images.std()

    def images(array):
        return torch.from_numpy((array - mean) / std)

    return DigitsSplit(images(train_images), torch.from_numpy(train_labels), images(test_images),
                       torch.from_numpy(test_labels))


def symmetric_label_noise(labels: torch.Tensor, fraction: float, seed: int = LABEL_NOISE_SEED) -> torch.Tensor:
    """A copy of ``labels`` with exactly round(fraction * n) of them, chosen at random, moved to another class.

    The new class is uniform over the other classes: adding an offset uniform in 1..C-1 modulo C.
    """
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(labels.numel(), generator=generator)[: round(fraction * labels.numel())]
    offsets = torch.randint(1, NUM_CLASSES, (flipped.numel(),), generator=generator)
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + offsets) % NUM_CLASSES
    return noisy


# --- model and schedule ----------------------------------------------------------------------------
class SmallMLP(nn.Module):
    """64 pixels -> 256 hidden units with BatchNorm and ReLU -> 10 classes (19.5k parameters).

    An MLP rather than a CNN because on 2 CPU cores a convolution over 8x8 images costs several times
    more per step and per evaluation, and the study runs 150 trainings.
    """

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor for ``LambdaLR``: linear warm-up to 1 over ``warmup_steps``, then cosine decay towards 0."""

    def factor(steps_taken: int) -> float:
        if steps_taken < warmup_steps:
            return (steps_taken + 1) / warmup_steps
        progress = (steps_taken - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# --- methods ---------------------------------------------------------------------------------------
LAST_ITERATE = "Last iterate"
EMA_FAST = "EMA 0.99"
EMA_SLOW = "EMA 0.999"
HEAVY_BALL = "Last iterate, heavy-ball momentum"
SWA_LAST_QUARTER = "SWA, last 25% of steps"
LAWA_PER_EPOCH = "LAWA k=5, per epoch"
SEMA_PER_EPOCH = f"SEMA {VARIANT_DECAY}, switch per epoch"
BELAY_SETTINGS = tuple(itertools.product((0.1, 1.0), (0.0, 0.9)))  # (reaction, inertia)
POWER_SIGMAS = (0.05, 0.10)
POSTHOC_SIGMA = 0.20
BEMA_EVERY_STEP = "BEMA, update every step"
BEMA_PER_EPOCH = "BEMA, update every epoch"


def power_name(sigma_rel: float) -> str:
    return f"PowerEMA σ_rel {sigma_rel:.2f}"


def posthoc_name(sigma_rel: float) -> str:
    return f"Post-hoc EMA σ_rel {sigma_rel:.2f}"


def belay_name(reaction: float, inertia: float) -> str:
    return f"BELAY {VARIANT_DECAY}, reaction {reaction}, inertia {inertia}"


@dataclass(frozen=True)
class Row:
    """One row of the results: the model's own weights (``average_index=None``), one of its averages, or the
    EMA of width ``posthoc_sigma`` synthesized from a PowerEMA's snapshots."""

    name: str
    average_index: int | None
    posthoc_sigma: float | None = None


@dataclass(frozen=True)
class TrainingRun:
    """One optimizer: its averager, built from (steps per epoch, total steps), and the rows it yields."""

    rows: tuple[Row, ...]
    make_average: Callable[[int, int], object]
    momentum_style: str = "torch"
    changes_trajectory: bool = False


def training_runs() -> tuple[TrainingRun, ...]:
    """Every run of one (noise level, seed); the first is the trajectory the non-interfering averagers share."""
    return (
        TrainingRun((Row(LAST_ITERATE, None), Row(EMA_FAST, 0), Row(EMA_SLOW, 1)),
                    lambda per_epoch, total: fastavg.EMA((0.99, 0.999))),
        TrainingRun((Row(SWA_LAST_QUARTER, 0),),
                    lambda per_epoch, total: fastavg.SWA(start=total - total // 4)),
        TrainingRun((Row(LAWA_PER_EPOCH, 0),),
                    lambda per_epoch, total: fastavg.LAWA(5, every=per_epoch)),
        TrainingRun((Row(SEMA_PER_EPOCH, 0),),
                    lambda per_epoch, total: fastavg.SEMA(VARIANT_DECAY, switch_every=per_epoch),
                    changes_trajectory=True),
        *(
            TrainingRun((Row(belay_name(reaction, inertia), 0),),
                        lambda per_epoch, total, reaction=reaction, inertia=inertia: fastavg.BELAY(
                            VARIANT_DECAY, reaction=reaction, inertia=inertia),
                        changes_trajectory=True)
            for reaction, inertia in BELAY_SETTINGS
        ),
        TrainingRun((Row(HEAVY_BALL, None),), lambda per_epoch, total: None, momentum_style="heavy_ball",
                    changes_trajectory=True),
        TrainingRun((*(Row(power_name(sigma), k) for k, sigma in enumerate(POWER_SIGMAS)),
                     Row(posthoc_name(POSTHOC_SIGMA), None, POSTHOC_SIGMA)),
                    lambda per_epoch, total: fastavg.PowerEMA(POWER_SIGMAS, snapshot_every=per_epoch,
                                                              snapshot_dir=tempfile.mkdtemp(prefix="digits-phema-"))),
        TrainingRun((Row(BEMA_EVERY_STEP, 0),), lambda per_epoch, total: fastavg.BEMA(update_freq=1)),
        TrainingRun((Row(BEMA_PER_EPOCH, 0),), lambda per_epoch, total: fastavg.BEMA(update_freq=per_epoch)),
    )


def method_names() -> list[str]:
    return [row.name for run in training_runs() for row in run.rows]


# --- evaluation ------------------------------------------------------------------------------------
@contextlib.contextmanager
def batchnorm_recomputed(model: nn.Module, images: torch.Tensor):
    """Inside the block, BatchNorm running statistics are those of ``images`` under the current weights.

    Averaged weights never produced activations during training, so the running statistics the raw
    model collected do not fit them. Every buffer of the model is restored on exit.
    """
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: one full-batch pass gives the exact statistics
        model.train()
        with torch.no_grad():
            model(images)
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])


@torch.no_grad()
@contextlib.contextmanager
def weights_swapped(model: nn.Module, weights: list[torch.Tensor]):
    """Inside the block the model's parameters hold ``weights``; its own come back on exit."""
    own = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(model.parameters(), own):
                p.copy_(w)


def class_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return F.softmax(model(images), dim=1)


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return (probabilities.argmax(dim=1) == labels).float().mean().item()


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Σ_b (|B_b| / n) |accuracy(B_b) − mean confidence(B_b)| over equal-width bins (lo, hi] of confidence."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
            error += in_bin.float().mean().item() * gap.item()
    return error


def overconfidence(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean confidence minus accuracy: the sign ECE leaves out (positive: overconfident)."""
    return probabilities.max(dim=1).values.mean().item() - accuracy(probabilities, labels)


def pairwise_disagreement(predictions: list[torch.Tensor]) -> np.ndarray:
    """For every pair of seeds (in ``itertools.combinations`` order), the fraction of differing predictions."""
    return np.array([(a != b).float().mean().item() for a, b in itertools.combinations(predictions, 2)])


# --- training --------------------------------------------------------------------------------------
@dataclass
class SeedOutcome:
    """One row, one seed: test accuracy after every epoch and the final test-set class probabilities."""

    accuracy_per_epoch: list[float]
    probabilities: torch.Tensor


def train(run: TrainingRun, data: DigitsSplit, train_labels: torch.Tensor, seed: int, config: StudyConfig):
    """Train one run; returns its rows' outcomes, its final raw weights (flat) and the optimizer's backends."""
    steps_per_epoch = data.train_labels.numel() // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    torch.manual_seed(seed)
    model = SmallMLP()
    optimizer = fastavg.SGD(model.parameters(), lr=config.peak_lr, momentum=config.momentum,
                            weight_decay=config.weight_decay, momentum_style=run.momentum_style,
                            average=run.make_average(steps_per_epoch, total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(config.warmup_fraction * total_steps), total_steps))
    batch_order = torch.Generator().manual_seed(seed)
    outcomes = {row.name: SeedOutcome([], torch.empty(0)) for row in run.rows}
    try:
        _train_epochs(model, optimizer, schedule, run, data, train_labels, config, batch_order, outcomes)
    finally:
        snapshot_dir = getattr(optimizer.average, "snapshot_dir", None)
        if snapshot_dir is not None:
            optimizer.average.flush()
            shutil.rmtree(snapshot_dir)
    final_weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return outcomes, final_weights, optimizer.backends()


def _train_epochs(model, optimizer, schedule, run, data, train_labels, config, batch_order, outcomes) -> None:
    steps_per_epoch = data.train_labels.numel() // config.batch_size
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(data.train_labels.numel(), generator=batch_order)
        for batch in order[: steps_per_epoch * config.batch_size].split(config.batch_size):
            loss = F.cross_entropy(model(data.train_images[batch]), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        for row in run.rows:
            if row.posthoc_sigma is not None:
                optimizer.average.flush()
                synthesized = fastavg.posthoc.synthesize(optimizer.average.snapshot_dir, row.posthoc_sigma,
                                                         step=(epoch + 1) * steps_per_epoch)
                with weights_swapped(model, synthesized), batchnorm_recomputed(model, data.train_images):
                    probabilities = class_probabilities(model, data.test_images)
            elif row.average_index is None:
                probabilities = class_probabilities(model, data.test_images)
            else:
                with optimizer.swap_average(row.average_index), batchnorm_recomputed(model, data.train_images):
                    probabilities = class_probabilities(model, data.test_images)
            outcomes[row.name].accuracy_per_epoch.append(accuracy(probabilities, data.test_labels))
            outcomes[row.name].probabilities = probabilities


@dataclass
class StudyOutcome:
    config: StudyConfig
    outcomes: dict[float, dict[str, list[SeedOutcome]]]  # noise level -> row name -> one per seed
    test_labels: torch.Tensor
    shared_trajectory_max_difference: float  # max |θ_run − θ_first run| over runs that should not differ
    backends: set[str]
    wall_seconds: float


def run_study(config: StudyConfig, log: Callable[[str], None] = print) -> StudyOutcome:
    start = time.perf_counter()
    data = load_digits_split()
    runs = training_runs()
    outcomes: dict[float, dict[str, list[SeedOutcome]]] = {}
    max_difference = 0.0
    backends: set[str] = set()
    for noise in config.noise_levels:
        labels = symmetric_label_noise(data.train_labels, noise)
        outcomes[noise] = {name: [] for name in method_names()}
        for seed in range(config.seeds):
            shared_weights = None
            for run in runs:
                run_outcomes, final_weights, run_backends = train(run, data, labels, seed, config)
                backends.update(run_backends)
                for name, outcome in run_outcomes.items():
                    outcomes[noise][name].append(outcome)
                if not run.changes_trajectory:
                    if shared_weights is None:
                        shared_weights = final_weights
                    max_difference = max(max_difference, (final_weights - shared_weights).abs().max().item())
            log(f"noise {noise:.0%} seed {seed}: done at {time.perf_counter() - start:.0f} s")
    return StudyOutcome(config, outcomes, data.test_labels, max_difference, backends,
                        time.perf_counter() - start)


# --- summaries and claims --------------------------------------------------------------------------
ACCURACY = "accuracy"
ECE = "ece"
OVERCONFIDENCE = "overconfidence"
PEAK_ACCURACY = "peak accuracy"
DISAGREEMENT = "disagreement"


def early_epochs(epochs: int) -> tuple[int, ...]:
    """The epochs (1-based) at 25% and 50% of training, where early progress is read (one if they coincide)."""
    return tuple(sorted({max(1, round(0.25 * epochs)), max(1, round(0.5 * epochs))}))


def early_metric(epoch: int) -> str:
    return f"accuracy at epoch {epoch}"


@dataclass
class MethodSummary:
    """Per-seed (or per-seed-pair, for disagreement) values of every metric, and the mean curve."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    mean_curve: np.ndarray = field(default_factory=lambda: np.empty(0))


def summarize(study: StudyOutcome) -> dict[float, dict[str, MethodSummary]]:
    summaries = {}
    for noise, by_name in study.outcomes.items():
        summaries[noise] = {}
        for name, seeds in by_name.items():
            curves = np.array([seed.accuracy_per_epoch for seed in seeds])
            summary = MethodSummary(mean_curve=curves.mean(axis=0))
            summary.values[ACCURACY] = curves[:, -1]
            summary.values[PEAK_ACCURACY] = curves.max(axis=1)
            summary.values[ECE] = np.array(
                [expected_calibration_error(seed.probabilities, study.test_labels) for seed in seeds])
            summary.values[OVERCONFIDENCE] = np.array(
                [overconfidence(seed.probabilities, study.test_labels) for seed in seeds])
            summary.values[DISAGREEMENT] = pairwise_disagreement([seed.probabilities.argmax(dim=1) for seed in seeds])
            for epoch in early_epochs(study.config.epochs):
                summary.values[early_metric(epoch)] = curves[:, epoch - 1]
            summaries[noise][name] = summary
    return summaries


@dataclass(frozen=True)
class Claim:
    statement: str
    method: str
    baseline: str
    metric: str
    higher_is_better: bool = True


def claims(epochs: int) -> list[Claim]:
    return [
        *(Claim("EMA generalizes better", ema, LAST_ITERATE, ACCURACY) for ema in (EMA_FAST, EMA_SLOW)),
        *(Claim("EMA is better calibrated", ema, LAST_ITERATE, ECE, False) for ema in (EMA_FAST, EMA_SLOW)),
        *(Claim("EMA is more consistent across seeds", ema, LAST_ITERATE, DISAGREEMENT, False)
          for ema in (EMA_FAST, EMA_SLOW)),
        *(Claim("EMA does well early", ema, LAST_ITERATE, early_metric(early_epochs(epochs)[0]))
          for ema in (EMA_FAST, EMA_SLOW)),
        *(Claim("SEMA improves on EMA", SEMA_PER_EPOCH, baseline, ACCURACY)
          for baseline in (EMA_FAST, EMA_SLOW, LAST_ITERATE)),
        *(Claim("LAWA converges faster", LAWA_PER_EPOCH, LAST_ITERATE, early_metric(epoch))
          for epoch in early_epochs(epochs)),
        Claim("LAWA converges faster", LAWA_PER_EPOCH, LAST_ITERATE, ACCURACY),
        *(Claim("BELAY improves on EMA", belay_name(*setting), EMA_FAST, ACCURACY) for setting in BELAY_SETTINGS),
        Claim("Heavy-ball momentum under warm-up generalizes better", HEAVY_BALL, LAST_ITERATE, ACCURACY),
        Claim("SWA generalizes better", SWA_LAST_QUARTER, LAST_ITERATE, ACCURACY),
        *(Claim("Power-function EMA generalizes better", name, LAST_ITERATE, ACCURACY)
          for name in (*map(power_name, POWER_SIGMAS), posthoc_name(POSTHOC_SIGMA))),
        Claim("A wider EMA synthesized post hoc beats the tracked profiles", posthoc_name(POSTHOC_SIGMA),
              power_name(POWER_SIGMAS[-1]), ACCURACY),
        *(Claim("BEMA generalizes better", bema, LAST_ITERATE, ACCURACY) for bema in (BEMA_EVERY_STEP, BEMA_PER_EPOCH)),
        *(Claim("BEMA removes EMA's lag early", bema, EMA_SLOW, early_metric(early_epochs(epochs)[0]))
          for bema in (BEMA_EVERY_STEP, BEMA_PER_EPOCH)),
    ]


def t_quantile_975(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


MIN_SAMPLES_FOR_VERDICT = 3


def verdict(differences: np.ndarray, higher_is_better: bool) -> str:
    """'better', 'worse' or 'no clear difference', from paired differences (method − baseline)."""
    if differences.size < MIN_SAMPLES_FOR_VERDICT:
        # With one degree of freedom, accuracies tied to the same image count give a zero-width interval.
        return f"n/a (fewer than {MIN_SAMPLES_FOR_VERDICT} samples)"
    mean = differences.mean()
    half_width = t_quantile_975(differences.size - 1) * differences.std(ddof=1) / math.sqrt(differences.size)
    if abs(mean) <= half_width:
        return "no clear difference"
    return "better" if (mean > 0) == higher_is_better else "worse"


# --- reporting -------------------------------------------------------------------------------------
def percent(values: np.ndarray) -> str:
    if values.size == 0:
        return "n/a"
    if values.size == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * values.mean():.2f} ± {100 * values.std(ddof=1):.2f}"


def signed_percent(values: np.ndarray) -> str:
    if values.size == 1:
        return f"{100 * values[0]:+.2f}"
    return f"{100 * values.mean():+.2f} ± {100 * values.std(ddof=1):.2f}"


def noise_label(noise: float) -> str:
    return f"{noise:.0%} noise"


def metric_table(summaries, metric: str) -> list[str]:
    noise_levels = list(summaries)
    lines = ["| Method | " + " | ".join(noise_label(noise) for noise in noise_levels) + " |",
             "|---|" + "---:|" * len(noise_levels)]
    for name in method_names():
        cells = [percent(summaries[noise][name].values[metric]) for noise in noise_levels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def claims_table(summaries, epochs: int) -> list[str]:
    noise_levels = list(summaries)
    header = " | ".join(noise_label(noise) for noise in noise_levels)
    lines = [f"| Claim | Method − baseline | Metric | {header} |", "|---|---|---|" + "---|" * len(noise_levels)]
    for claim in claims(epochs):
        cells = []
        for noise in noise_levels:
            differences = (summaries[noise][claim.method].values[claim.metric]
                           - summaries[noise][claim.baseline].values[claim.metric])
            if differences.size == 0:
                cells.append("n/a")
            else:
                cells.append(f"{signed_percent(differences)} ({verdict(differences, claim.higher_is_better)})")
        lines.append(f"| {claim.statement} | {claim.method} − {claim.baseline} | {claim.metric} | "
                     + " | ".join(cells) + " |")
    return lines


def plot_accuracy_curves(summaries, epochs: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = method_names()
    colors = [*plt.get_cmap("tab10").colors, "black"]
    figure, axes = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 5), sharey=True, squeeze=False)
    epoch_numbers = np.arange(1, epochs + 1)
    lowest_late_accuracy = min(
        summary.mean_curve[epochs // 4:].min() for by_name in summaries.values() for summary in by_name.values())
    for axis, (noise, by_name) in zip(axes[0], summaries.items()):
        for name, color in zip(names, colors):
            axis.plot(epoch_numbers, by_name[name].mean_curve, color=color,
                      linestyle="--" if name.startswith("BELAY") else "-", linewidth=1.3, label=name)
        axis.set_title(f"{noise_label(noise)} on training labels")
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean over seeds)")
    # The first epochs are far below the rest; the limit keeps the differences between methods visible.
    axes[0][0].set_ylim(max(0.0, lowest_late_accuracy - 0.02), 1.0)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.14, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine_description(backends: set[str]) -> list[str]:
    import matplotlib
    import sklearn

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    versions = (f"Python {platform.python_version()}, torch {torch.__version__}, fastavg {fastavg.__version__} "
                f"(backend: {', '.join(sorted(backends))}), scikit-learn {sklearn.__version__}, "
                f"numpy {np.__version__}, matplotlib {matplotlib.__version__}")
    return [f"- Machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {platform.system()}",
            f"- {versions}"]


def claim_sentences(summaries, epochs: int) -> list[str]:
    """One line per claim: for each comparison, the noise levels at which the method was better, worse or neither."""
    by_statement: dict[str, list[str]] = {}
    for claim in claims(epochs):
        noise_levels_by_verdict: dict[str, list[str]] = {}
        for noise, by_name in summaries.items():
            differences = by_name[claim.method].values[claim.metric] - by_name[claim.baseline].values[claim.metric]
            noise_levels_by_verdict.setdefault(verdict(differences, claim.higher_is_better), []).append(f"{noise:.0%}")
        outcome = "; ".join(f"{label} at {', '.join(levels)} noise"
                            for label, levels in noise_levels_by_verdict.items())
        by_statement.setdefault(claim.statement, []).append(
            f"{claim.method} vs {claim.baseline} ({claim.metric}): {outcome}.")
    return [f"- **{statement}.** " + " ".join(parts) for statement, parts in by_statement.items()]


def noise_robustness_lines(summaries) -> list[str]:
    """How much test accuracy each method loses from the cleanest to the noisiest training labels."""
    noise_levels = list(summaries)
    if len(noise_levels) < 2:
        return []
    clean, noisiest = noise_levels[0], noise_levels[-1]
    lines = [f"Accuracy lost from {clean:.0%} to {noisiest:.0%} label noise (mean over seeds, percentage points):"]
    for name in method_names():
        drop = summaries[clean][name].values[ACCURACY].mean() - summaries[noisiest][name].values[ACCURACY].mean()
        lines.append(f"- {name}: {100 * drop:.2f}")
    return lines


CAVEATS = (
    ("Scale: 1347 training images of 8x8 pixels and a 19.5k-parameter MLP trained for a few thousand steps; the "
     "papers study ImageNet/CIFAR-scale networks trained far longer. Effects that need long horizons cannot show "
     "here, and on 450 test images one image is 0.22 percentage points."),
    ("The learning rate decays to zero (cosine), which itself averages out SGD noise at the end of training; "
     "EMA's reported gains are largest with less decay, so this setting is unfavourable to every averager on clean "
     "labels."),
    ("EMA 0.999 has a horizon of about 1000 steps (12 epochs of 84 steps): it still carries early weights at the "
     "end of a short run, and far more so in the quick mode."),
    ("SEMA and BELAY use decay 0.99 (a horizon of about one epoch) and were not tuned. BELAY's update is derived "
     "from the abstract of Patsenker et al. (the paper's own equations could not be consulted), so a result here "
     "says nothing certain about the paper's algorithm."),
    ("Verdicts use a 95% t-interval over seeds (n − 1 degrees of freedom): with 5 seeds only large effects are "
     "detected, and the 10 seed pairs behind disagreement are not independent, which makes those intervals "
     "optimistic."),
    ("PowerEMA, its post-hoc width and BEMA were not tuned. BEMA's β_t = (10 + t)^(−1/2) counts optimizer steps: "
     "updated every step its EMA spans about √t steps (about 55 at the end), updated every epoch it spans most of "
     "the run, which under label noise keeps weights from before the noisy labels were memorized."),
    ("Averaged weights get BatchNorm statistics recomputed on the training images; last iterates keep their "
     "running statistics. The noisy labels are fixed per noise level and shared by all seeds, so disagreement "
     "measures the randomness of initialization and batch order only."),
)


def protocol_lines(config: StudyConfig, trajectory_check: str) -> list[str]:
    parameter_count = sum(p.numel() for p in SmallMLP().parameters())
    steps_per_epoch = TRAIN_SIZE // config.batch_size
    return [
        ("- Data: `sklearn.datasets.load_digits` (1797 8x8 images), one stratified split (`random_state=0`) into "
         "1347 training and 450 test images, standardized with training statistics."),
        ("- Symmetric label noise on the training labels only: exactly round(p·1347) labels, chosen with a fixed "
         "seed, each moved to one of the 9 other classes uniformly; the same noisy labels for every training seed."),
        (f"- Model: MLP 64-256-10 with BatchNorm and ReLU ({parameter_count / 1000:.1f}k parameters). `fastavg.SGD`, "
         f"momentum {config.momentum}, weight decay {config.weight_decay}, batch {config.batch_size}, peak LR "
         f"{config.peak_lr}, linear warm-up over the first {config.warmup_fraction:.0%} of steps then cosine decay "
         f"to 0; {config.epochs} epochs of {steps_per_epoch} steps; the seed fixes initialization and batch order."),
        ("- Methods: last iterate, EMA 0.99 and 0.999 (one run with `EMA((0.99, 0.999))`); SWA averaging every step "
         "of the last 25% of steps; LAWA k=5 with one snapshot per epoch; SEMA (decay 0.99, switch at every "
         "epoch's end); BELAY (decay 0.99, reaction 0.1 / 1.0, inertia 0 / 0.9); last iterate with heavy-ball "
         "momentum (`momentum_style=\"heavy_ball\"`) under the same warm-up and schedule; PowerEMA with σ_rel "
         f"{POWER_SIGMAS[0]} and {POWER_SIGMAS[1]} (EDM2), snapshotted at every epoch's end, and the EMA of σ_rel "
         f"{POSTHOC_SIGMA} synthesized from those snapshots (`fastavg.posthoc.synthesize`, EDM2's Algorithm 3) at "
         "every epoch; BEMA with TRL's defaults (κ 0.5, η 0.2, ρ 10, γ 1) updated every step and every epoch. "
         "One optimizer per run; the runs of one seed start from the same weights and see the same batches."),
        ("- Shared trajectory check: the final weights of the last-iterate/EMA, SWA, LAWA, PowerEMA and BEMA runs "
         "of each seed were "
         f"{trajectory_check}, as they must be (these averagers never feed back into training)."),
        ("- Evaluation after every epoch on the 450 clean test images. Averaged weights are evaluated inside "
         "`opt.swap_average(k)` with BatchNorm statistics recomputed on the training images (the training model's "
         "buffers are restored afterwards); last iterates use their own running statistics."),
        (f"- Metrics after the last epoch: accuracy; expected calibration error ({ECE_BINS} equal-width confidence "
         "bins); disagreement between seeds (fraction of test images predicted differently, every seed pair). "
         "Mean ± sample std over seeds (seed pairs for disagreement), in percent."),
    ]


CLAIMS_LEGEND = (
    "Paired differences (method − baseline on the same seed, or seed pair for disagreement), mean ± std, in "
    "percentage points. *better* / *worse*: the mean difference lies outside the 95% t-interval of its standard "
    "error; otherwise *no clear difference*."
)


PEAK_LEGEND = (
    "An oracle read off the test set, for diagnosis only: the best accuracy a method reached at any epoch's end. "
    "Where it is far above the final accuracy, the model learned the clean signal first and then memorized the "
    "noisy labels."
)


def write_results(study: StudyOutcome, out_dir: Path, command: str) -> Path:
    summaries = summarize(study)
    config = study.config
    plot_accuracy_curves(summaries, config.epochs, out_dir / PLOT_NAME)
    trajectory_check = (
        "bitwise identical" if study.shared_trajectory_max_difference == 0.0
        else f"NOT identical (max |difference| {study.shared_trajectory_max_difference:.3g})"
    )
    noise_levels = ", ".join(f"{noise:.0%}" for noise in config.noise_levels)
    sections = [
        ["# Quality study: fastavg's averagers on scikit-learn's handwritten digits", "",
         (f"Generated by `{command}` in {study.wall_seconds / 60:.1f} minutes ({config.epochs} epochs, "
          f"{config.seeds} seeds, label noise {noise_levels})."), "",
         *machine_description(study.backends)],
        ["## Protocol", "", *protocol_lines(config, trajectory_check)],
        ["## Test accuracy (%)", "", *metric_table(summaries, ACCURACY)],
        ["## Expected calibration error (%, lower is better)", "", *metric_table(summaries, ECE)],
        ["## Mean confidence minus accuracy (%, positive: overconfident)", "",
         *metric_table(summaries, OVERCONFIDENCE)],
        ["## Disagreement between seeds (%, lower is better)", "", *metric_table(summaries, DISAGREEMENT)],
        *([f"## Early progress: test accuracy (%) after epoch {epoch} of {config.epochs}", "",
           *metric_table(summaries, early_metric(epoch))] for epoch in early_epochs(config.epochs)),
        ["## Peak test accuracy over the epochs (%)", "", PEAK_LEGEND, "", *metric_table(summaries, PEAK_ACCURACY)],
        ["## Test accuracy vs epoch", "", f"![test accuracy vs epoch, mean over seeds]({PLOT_NAME})"],
        ["## Claims, tested", "", CLAIMS_LEGEND, "", *claims_table(summaries, config.epochs)],
        ["## Reading", "", *claim_sentences(summaries, config.epochs), "", *noise_robustness_lines(summaries)],
        ["## Caveats", "", *(f"- {caveat}" for caveat in CAVEATS)],
    ]
    path = out_dir / RESULTS_NAME
    path.write_text("\n\n".join("\n".join(section) for section in sections) + "\n", encoding="utf-8")
    return path


# --- command line ----------------------------------------------------------------------------------
def parse_config(argv: list[str] | None) -> tuple[StudyConfig, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.digits",
        description="Train a small MLP on scikit-learn's digits with fastavg's averagers; write RESULTS.md and a plot.",
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STUDY.epochs} epochs, {QUICK_STUDY.seeds} seeds, noise "
                             f"{', '.join(map(str, QUICK_STUDY.noise_levels))} (under 2 minutes on 2 cores)")
    parser.add_argument("--seeds", type=int, help="number of training seeds (0, 1, ...)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--noise-levels", type=float, nargs="+", metavar="FRACTION",
                        help="fractions of flipped training labels, e.g. 0 0.2 0.4")
    parser.add_argument("--out", type=Path, help=f"folder for RESULTS.md and the plot (default: {DEFAULT_OUT}, "
                                                   "or a temporary folder with --quick, to keep the full results)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="fastavg-quality-")) if args.quick else DEFAULT_OUT
    config = QUICK_STUDY if args.quick else FULL_STUDY
    if args.seeds is not None:
        config = replace(config, seeds=args.seeds)
    if args.epochs is not None:
        config = replace(config, epochs=args.epochs)
    if args.noise_levels is not None:
        config = replace(config, noise_levels=tuple(args.noise_levels))
    if config.seeds < 1 or config.epochs < 1:
        parser.error("--seeds and --epochs must be at least 1")
    if any(not 0.0 <= noise < 1.0 for noise in config.noise_levels):
        parser.error("noise levels must be in [0, 1)")
    return config, args.out


def main(argv: list[str] | None = None) -> Path:
    """Run the study and write its results; returns the path of RESULTS.md."""
    arguments = sys.argv[1:] if argv is None else argv
    config, out_dir = parse_config(arguments)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = run_study(config, log=lambda message: print(message, file=sys.stderr, flush=True))
    command = " ".join(["python -m benchmarks.quality.digits", *arguments])
    path = write_results(study, out_dir, command)
    print(f"wrote {path} and {out_dir / PLOT_NAME} in {study.wall_seconds:.0f} s", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
