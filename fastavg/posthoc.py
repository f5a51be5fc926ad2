"""Post-hoc EMA (Karras et al., EDM2, arXiv 2312.02696): the EMA of any σ_rel, built after training.

``fastavg.PowerEMA(sigma_rel=(...), snapshot_every=N, snapshot_dir=DIR)`` writes every profile every N
steps, one file per profile and step (``power_ema-t000001000-sigma0.05.pt``: the profile's fp32 average
of every parameter in the optimizer's parameter order, with its σ_rel, γ and step ``t``).
:func:`synthesize` finds the combination of those snapshots whose weight on past iterates is closest,
in the least-squares sense of EDM2's Algorithm 3, to a power-function EMA of the requested σ_rel at
the requested step, and returns that combination::

    averages = fastavg.posthoc.synthesize("snapshots/", sigma_rel=0.08)
    with torch.no_grad():
        for p, a in zip(model.parameters(), averages):
            p.copy_(a)

``python -m fastavg.posthoc DIR --sigma-rel 0.08 --out FILE`` does the same from the command line and
saves ``{"params": [...], "sigma_rel", "gamma", "step", "snapshots", "coefficients"}``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
from dataclasses import dataclass

import torch

from .averaging import sigma_rel_to_gamma

__all__ = ["synthesize", "solve_weights", "p_dot_p", "snapshots", "Snapshot"]

_NAME = re.compile(r"^power_ema-t(\d+)-sigma([0-9.e+-]+)\.pt$")


def prepare_snapshot_dir(path) -> str:
    """Create ``path`` if needed and check that it is a writable directory, before training starts."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"snapshot_dir={path!r} exists and is not a directory; pass a directory")
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"snapshot_dir={path!r} is not writable; pass a directory this process can write")
    return path


def _snapshot_name(t: int, sigma_rel: float) -> str:
    return f"power_ema-t{t:09d}-sigma{sigma_rel!r}.pt"


def _save(path: str, record: dict, event) -> None:
    if event is not None:
        event.synchronize()
    partial = path + ".partial"
    torch.save(record, partial)
    os.replace(partial, path)  # a reader never sees a half-written snapshot


class SnapshotWriter:
    """Writes snapshots off the training thread.

    The averages are copied into fresh host tensors (pinned, with the copy queued on the current CUDA
    stream, for GPU averages; a plain copy for CPU ones, which the next step would overwrite), and one
    background thread saves them in order. Writes still queued at interpreter exit are completed first.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastavg-snapshot")
        self._pending: list[concurrent.futures.Future] = []

    def _raise_failures(self, wait: bool) -> None:
        if wait:
            concurrent.futures.wait(self._pending)
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()  # re-raises the error of a failed write on the training thread

    @torch.no_grad()
    def write(self, t: int, index: int, sigma_rel: float, gamma: float, averages) -> None:
        self._raise_failures(wait=False)
        host, event = [], None
        for a in averages:
            copy = torch.empty(a.shape, dtype=a.dtype, device="cpu", pin_memory=a.is_cuda)
            copy.copy_(a, non_blocking=a.is_cuda)
            host.append(copy)
        if any(a.is_cuda for a in averages):
            event = torch.cuda.Event()
            event.record()
        record = {"sigma_rel": sigma_rel, "gamma": gamma, "step": t, "profile": index, "params": host}
        path = os.path.join(self.directory, _snapshot_name(t, sigma_rel))
        self._pending.append(self._executor.submit(_save, path, record, event))

    def flush(self) -> None:
        self._raise_failures(wait=True)


# --- EDM2's Algorithm 3 ------------------------------------------------------------------------------
def p_dot_p(t_a, gamma_a, t_b, gamma_b):
    """⟨p_a, p_b⟩ = ∫₀^∞ p_a(τ) p_b(τ) dτ for power-function EMA profiles ``p(τ) = (γ+1) τ^γ / t^(γ+1)``
    on ``0 < τ < t`` (EDM2, Algorithm 3); broadcasts over float64 tensors."""
    t_ratio = t_a / t_b
    t_exp = torch.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = torch.maximum(t_a, t_b)
    num = (gamma_a + 1) * (gamma_b + 1) * t_ratio**t_exp
    den = (gamma_a + gamma_b + 1) * t_max
    return num / den


def solve_weights(t_i, gamma_i, t_r, gamma_r) -> torch.Tensor:
    """EDM2's Algorithm 3: coefficients ``X`` (snapshots × targets, float64) such that ``Σ_i X[i, r]·snapshot_i``
    is the least-squares best approximation of the profile ``(t_r, γ_r)`` by the snapshot profiles ``(t_i, γ_i)``."""
    t_i, gamma_i, t_r, gamma_r = (torch.as_tensor(x, dtype=torch.float64) for x in (t_i, gamma_i, t_r, gamma_r))
    t_i, gamma_i, t_r, gamma_r = t_i.reshape(-1, 1), gamma_i.reshape(-1, 1), t_r.reshape(1, -1), gamma_r.reshape(1, -1)
    a = p_dot_p(t_i, gamma_i, t_i.T, gamma_i.T)
    b = p_dot_p(t_i, gamma_i, t_r, gamma_r)
    return torch.linalg.solve(a, b)


# --- reading snapshots -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    path: str
    step: int
    sigma_rel: float
    gamma: float


def snapshots(snapshot_dir) -> list[Snapshot]:
    """The snapshots in ``snapshot_dir``, ordered by step then σ_rel (read from each file's header)."""
    snapshot_dir = os.fspath(snapshot_dir)
    if not os.path.isdir(snapshot_dir):
        raise FileNotFoundError(f"snapshot_dir={snapshot_dir!r} is not a directory")
    found = []
    for name in sorted(os.listdir(snapshot_dir)):
        if not _NAME.match(name):
            continue
        path = os.path.join(snapshot_dir, name)
        record = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        found.append(Snapshot(path, int(record["step"]), float(record["sigma_rel"]), float(record["gamma"])))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def _check_step(step, last: int):
    if step is None:
        return last
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int or None, got {type(step).__name__}")
    if not 1 <= step <= last:
        raise ValueError(f"step must be in [1, {last}] (the last snapshot's step), got {step}")
    return step


def coefficients(snapshot_dir, sigma_rel: float, step=None) -> tuple[list[Snapshot], torch.Tensor, int]:
    """The snapshots used for ``sigma_rel`` at ``step`` (default: the last snapshot's), their float64
    coefficients from :func:`solve_weights`, and the step."""
    gamma_r = sigma_rel_to_gamma(sigma_rel)
    found = snapshots(snapshot_dir)
    if not found:
        raise FileNotFoundError(
            f"no power_ema-*.pt snapshots in {os.fspath(snapshot_dir)!r}; train with "
            "fastavg.PowerEMA(..., snapshot_every=N, snapshot_dir=DIR) (and call its flush() before reading)")
    step = _check_step(step, found[-1].step)
    used = [s for s in found if s.step <= step]
    x = solve_weights([s.step for s in used], [s.gamma for s in used], [float(step)], [gamma_r])
    return used, x[:, 0], step


@torch.no_grad()
def synthesize(snapshot_dir, sigma_rel: float, step=None) -> list[torch.Tensor]:
    """The power-function EMA of width ``sigma_rel`` at ``step`` (default: the last snapshot's), from the
    snapshots that ``fastavg.PowerEMA`` wrote into ``snapshot_dir`` up to ``step``: one fp32 tensor per
    parameter, in the optimizer's parameter order. The combination is accumulated in float64 (its
    coefficients alternate in sign when snapshots are close), one snapshot in memory at a time."""
    used, x, _ = coefficients(snapshot_dir, sigma_rel, step)
    total = None
    for snapshot, weight in zip(used, x.tolist()):
        params = torch.load(snapshot.path, map_location="cpu", mmap=True, weights_only=True)["params"]
        if total is None:
            total = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
        if [p.shape for p in params] != [t.shape for t in total]:
            raise ValueError(f"{snapshot.path} holds parameters of other shapes than the first snapshot's; keep "
                             "one run's snapshots per directory")
        for acc, p in zip(total, params):
            acc.add_(p.to(torch.float64), alpha=weight)
    return [t.float() for t in total]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fastavg.posthoc",
        description="Synthesize the power-function EMA of any sigma_rel from fastavg.PowerEMA snapshots (EDM2, Alg. 3).")
    parser.add_argument("snapshot_dir", help="the snapshot_dir given to fastavg.PowerEMA")
    parser.add_argument("--sigma-rel", type=float, required=True, help="relative width of the EMA, e.g. 0.08")
    parser.add_argument("--step", type=int, default=None, help="the step to synthesize at (default: the last snapshot's)")
    parser.add_argument("--out", required=True, help="file to write: {'params': [...], 'sigma_rel', 'gamma', 'step', ...}")
    args = parser.parse_args(argv)
    used, x, step = coefficients(args.snapshot_dir, args.sigma_rel, args.step)
    params = synthesize(args.snapshot_dir, args.sigma_rel, step)
    torch.save({"params": params, "sigma_rel": args.sigma_rel, "gamma": sigma_rel_to_gamma(args.sigma_rel),
                "step": step, "snapshots": [os.path.basename(s.path) for s in used], "coefficients": x}, args.out)
    print(f"wrote {args.out}: sigma_rel={args.sigma_rel} at step {step} from {len(used)} snapshots")


if __name__ == "__main__":
    main()
