"""Weight averagers: EMA, BELAY, SWA, LAWA, Switch EMA (SEMA), power-function EMA (PowerEMA) and BEMA.

An averager is a small immutable description of *when* and *how much* to average. Every schedule is a
pure function of ``t``, the number of ``optimizer.step()`` calls so far including the current one, so
the only averaging counter an optimizer keeps is ``t`` itself. ``plan(t)`` turns ``t`` into an
:class:`AveragePlan` that the reference and every kernel backend execute in the same way.

Every average starts as a copy of the parameters at the first step (parameters added later: when they are added)
and is kept in fp32 (float64 for float64 parameters), whatever the parameter dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["EMA", "BELAY", "SWA", "LAWA", "SEMA", "PowerEMA", "BEMA", "AveragePlan", "sigma_rel_to_gamma"]

RULE_NONE = 0
RULE_EMA = 1
RULE_BELAY = 2
RULE_LAWA = 3

# One read of θ feeds at most this many EMAs (kMaxAverages in the kernels).
MAX_AVERAGES = 8


@dataclass(frozen=True)
class AveragePlan:
    """What the averaging part of one step does.

    ``rule``: ``RULE_NONE`` (no averaging this step), ``RULE_EMA`` (``e_k ← lerp(e_k, θ, weights[k])``
    for each average; SWA and the copy phase before ``start`` use it too), ``RULE_BELAY`` (the spring
    step with ``weights[0]``), or ``RULE_LAWA`` (snapshot θ into ring slot ``lawa_slot``).
    ``switch``: after averaging, ``θ ← e_0`` (Switch EMA).
    ``averages``: which averages ``weights`` apply to, in order; empty means the first ``len(weights)``.
    """

    rule: int = RULE_NONE
    weights: tuple[float, ...] = ()
    switch: bool = False
    lawa_slot: int = 0
    averages: tuple[int, ...] = ()


NO_PLAN = AveragePlan()


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_decay(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


class _Averager:
    """Base of all averagers. ``num_averages`` fp32 buffers, plus the extras a subclass declares."""

    num_averages = 1
    uses_velocity = False
    lawa_k = 0

    @property
    def num_outputs(self) -> int:
        """How many averages ``averaged_parameters(index)`` serves."""
        return max(self.num_averages, 1)

    def plan(self, t: int) -> AveragePlan:
        raise NotImplementedError

    def after_step(self, t: int, averaged_parameters) -> None:
        """Called after step ``t`` has averaged; ``averaged_parameters(index)`` reads the averages."""

    def capturable_plan(self) -> AveragePlan:
        """The plan of every step under ``capturable=True``: one rule and switch for all steps, so that a CUDA graph
        can replay them; the weights come from :meth:`device_weights` (the plan's own are placeholders).
        Raises NotImplementedError for a schedule that changes what a step launches."""
        raise NotImplementedError(
            f"{type(self).__name__} with capturable=True is not supported: its schedule changes which buffers a step "
            "touches from step to step, which a CUDA graph cannot follow; use capturable=False, or EMA, BELAY "
            "(start=0, every=1), SWA or PowerEMA without snapshots")

    def device_weights(self, t: torch.Tensor) -> torch.Tensor:
        """``plan(t).weights`` computed with tensor ops from the float64 step count ``t`` (0-d, any device), with
        weight 0 on steps where ``plan(t)`` averages nothing: no host read, so a CUDA graph can replay it."""
        raise NotImplementedError

    def config(self) -> dict:
        """Hyperparameters, as saved in and checked by ``state_dict``."""
        return {"name": type(self).__name__, **{k: v for k, v in vars(self).items()}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class EMA(_Averager):
    """Exponential moving average of the weights, ``e ← e + (1 − β_u)(θ − e)``.

    While ``t ≤ start`` the average copies θ. Afterwards, on every ``every``-th step, ``u`` counts the
    averaging updates so far including this one and the decay is
    ``β`` (``warmup=None``), ``min(β, (1+u)/(10+u))`` (``"tf"``) or
    ``clamp(1 − (1 + u/inv_gamma)^(−power), min_decay, β)`` (``"power"``).
    ``decay`` may be a tuple: several EMAs updated from one read of θ.
    ``EMA(β, start=1)`` is ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(β)``.
    """

    def __init__(self, decay=0.999, *, warmup=None, start=0, every=1, inv_gamma=1.0, power=2 / 3,
                 min_decay=0.0):
        decays = tuple(decay) if isinstance(decay, (tuple, list)) else (decay,)
        if not 1 <= len(decays) <= MAX_AVERAGES:
            raise ValueError(f"decay must be a float or a tuple of 1 to {MAX_AVERAGES} floats, got {len(decays)}")
        self.decay = tuple(_check_decay("decay", d) for d in decays)
        if warmup not in (None, "tf", "power"):
            raise ValueError(f"warmup must be None, 'tf' or 'power', got {warmup!r}")
        self.warmup = warmup
        self.start = _check_int("start", start, 0)
        self.every = _check_int("every", every, 1)
        if not inv_gamma > 0:
            raise ValueError(f"inv_gamma must be > 0, got {inv_gamma}")
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power}")
        self.inv_gamma = float(inv_gamma)
        self.power = float(power)
        self.min_decay = _check_decay("min_decay", min_decay)

    @property
    def num_averages(self) -> int:
        return len(self.decay)

    def decay_at(self, decay: float, u: int) -> float:
        """β_u: the decay of the ``u``-th averaging update (1-based)."""
        if self.warmup == "tf":
            return min(decay, (1 + u) / (10 + u))
        if self.warmup == "power":
            value = 1.0 - (1.0 + u / self.inv_gamma) ** (-self.power)
            return min(max(value, self.min_decay), decay)
        return decay

    def update_count(self, t: int) -> int:
        """How many averaging updates steps ``1..t`` made (the copy phase counts none)."""
        return max(0, (t - self.start) // self.every)

    def _ema_plan(self, t: int) -> AveragePlan:
        if t <= self.start:
            return AveragePlan(RULE_EMA, (1.0,) * self.num_averages)
        if (t - self.start) % self.every:
            return NO_PLAN
        u = self.update_count(t)
        return AveragePlan(RULE_EMA, tuple(1.0 - self.decay_at(d, u) for d in self.decay))

    def plan(self, t: int) -> AveragePlan:
        return self._ema_plan(t)

    def capturable_plan(self) -> AveragePlan:
        return AveragePlan(RULE_EMA, (0.0,) * self.num_averages)

    def _device_decay(self, decay: float, u: torch.Tensor) -> torch.Tensor:
        """:meth:`decay_at` of a float64 tensor ``u``."""
        if self.warmup == "tf":
            return torch.clamp((1 + u) / (10 + u), max=decay)
        if self.warmup == "power":
            value = 1.0 - torch.pow(1.0 + u / self.inv_gamma, -self.power)
            return torch.clamp(torch.clamp(value, min=self.min_decay), max=decay)
        return torch.full_like(u, decay)

    def device_weights(self, t: torch.Tensor) -> torch.Tensor:
        since = t - self.start
        u = torch.clamp(torch.div(since, self.every, rounding_mode="floor"), min=0)
        update = torch.remainder(since, self.every) == 0
        weights = [torch.where(since <= 0, 1.0, torch.where(update, 1.0 - self._device_decay(d, u), 0.0))
                   for d in self.decay]
        return torch.stack(weights)


class BELAY(EMA):
    """BELAY: the average ``e`` and the model ``θ`` as two particles joined by a zero-length spring.

    With ``α = 1 − β_u`` (EMA's schedule) and ``d = θ − e``, on every averaging step::

        v ← inertia·v + α·d;   e ← e + v;   θ ← θ − reaction·α·d

    (with ``inertia = 0`` the average moves by ``lerp(e, θ, α)``, exactly EMA's rule). ``reaction`` is
    the mass ratio m_e/m_θ: how hard the spring pulls the model back toward its average; ``inertia`` is
    the velocity the average keeps. ``reaction = inertia = 0`` is exactly EMA, and with ``inertia = 0``
    each step conserves ``reaction·e + θ``.

    This form is *derived* from the physical model in the abstract of Patsenker, Li & Kluger
    (arXiv 2310.13854); the paper's own equations could not be consulted.
    """

    def __init__(self, decay=0.999, *, reaction=1.0, inertia=0.0, **ema_args):
        if isinstance(decay, (tuple, list)):
            raise TypeError("BELAY takes one decay (a float): one spring joins the model to one average")
        super().__init__(decay, **ema_args)
        if not reaction >= 0:
            raise ValueError(f"reaction must be >= 0, got {reaction}")
        if not 0.0 <= inertia < 1.0:
            raise ValueError(f"inertia must be in [0, 1), got {inertia}")
        self.reaction = float(reaction)
        self.inertia = float(inertia)

    @property
    def uses_velocity(self) -> bool:
        return self.inertia > 0

    def plan(self, t: int) -> AveragePlan:
        plan = self._ema_plan(t)
        if t <= self.start or plan.rule == RULE_NONE:
            return plan  # the copy phase moves only the average
        return AveragePlan(RULE_BELAY, plan.weights)

    def capturable_plan(self) -> AveragePlan:
        # The copy phase and skipped steps run other rules than the spring (a zero weight would still decay v).
        if self.start != 0 or self.every != 1:
            raise NotImplementedError(
                f"BELAY(start={self.start}, every={self.every}) with capturable=True is not supported: its copy phase "
                "and skipped steps run another rule than the spring step, which a CUDA graph cannot follow; use "
                "start=0 and every=1 (a warmup schedule is fine), or capturable=False")
        return AveragePlan(RULE_BELAY, (0.0,))


class SWA(_Averager):
    """Stochastic weight averaging: on update steps ``n ← n + 1``, ``e ← e + (θ − e)/n``.

    Update steps are ``t > start`` with ``(t − start) % every == 0``; while ``t ≤ start`` the average
    copies θ. ``SWA()`` is ``torch.optim.swa_utils.AveragedModel`` with its default average.
    """

    def __init__(self, *, start=0, every=1):
        self.start = _check_int("start", start, 0)
        self.every = _check_int("every", every, 1)

    def plan(self, t: int) -> AveragePlan:
        if t <= self.start:
            return AveragePlan(RULE_EMA, (1.0,))
        if (t - self.start) % self.every:
            return NO_PLAN
        n = (t - self.start) // self.every
        return AveragePlan(RULE_EMA, (1.0 / n,))

    def capturable_plan(self) -> AveragePlan:
        return AveragePlan(RULE_EMA, (0.0,))

    def device_weights(self, t: torch.Tensor) -> torch.Tensor:
        since = t - self.start
        n = torch.clamp(torch.div(since, self.every, rounding_mode="floor"), min=1)
        update = torch.remainder(since, self.every) == 0
        return torch.where(since <= 0, 1.0, torch.where(update, 1.0 / n, 0.0)).reshape(1)


class LAWA(_Averager):
    """Latest weight averaging: the uniform mean of the last ``k`` snapshots of θ.

    Snapshots are taken on steps ``t > start`` with ``(t − start) % every == 0``, into a ring of ``k``
    buffers (parameter dtype) with their running sum ``S`` (fp32): ``S ← S + θ − ring[j]``,
    ``ring[j] ← θ``. The average is ``S / min(count, k)``; before the first snapshot it is θ.
    """

    num_averages = 0

    def __init__(self, k=10, *, every=1000, start=0):
        self.k = _check_int("k", k, 1)
        self.every = _check_int("every", every, 1)
        self.start = _check_int("start", start, 0)

    @property
    def lawa_k(self) -> int:
        return self.k

    def snapshot_count(self, t: int) -> int:
        return max(0, (t - self.start) // self.every)

    def plan(self, t: int) -> AveragePlan:
        if t <= self.start or (t - self.start) % self.every:
            return NO_PLAN
        return AveragePlan(RULE_LAWA, (), lawa_slot=(self.snapshot_count(t) - 1) % self.k)


class SEMA(EMA):
    """Switch EMA (Li et al., arXiv 2402.09240): EMA, and on switch steps ``θ ← e`` after the update.

    Switch steps are ``t > switch_start`` with ``(t − switch_start) % switch_every == 0``; optimizer
    state is untouched. ``optimizer.switch_to_average()`` switches on demand (e.g. at an epoch's end).
    """

    def __init__(self, decay=0.999, *, switch_every, switch_start=0, **ema_args):
        if isinstance(decay, (tuple, list)):
            raise TypeError("SEMA takes one decay (a float): the model switches to one average")
        super().__init__(decay, **ema_args)
        self.switch_every = _check_int("switch_every", switch_every, 1)
        self.switch_start = _check_int("switch_start", switch_start, 0)

    capturable_plan = _Averager.capturable_plan  # its switch steps launch another op than the others

    def plan(self, t: int) -> AveragePlan:
        plan = self._ema_plan(t)
        if t > self.switch_start and (t - self.switch_start) % self.switch_every == 0:
            return AveragePlan(plan.rule, plan.weights, switch=True)
        return plan


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2's exponent γ for a relative width σ_rel: the largest real root of
    ``γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²)`` (that is, ``σ_rel² = (γ+1) / ((γ+2)²(γ+3))``).

    The cubic is convex right of −7/3 and positive from ``γ = σ_rel⁻¹`` on, so Newton's method started
    there descends monotonically onto the largest root; σ_rel above about 0.3003 has no root above −1
    (no power-function profile is that wide).
    """
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise TypeError(f"sigma_rel must be a float in (0, 0.3), got {type(sigma_rel).__name__}")
    if not 0.0 < sigma_rel < 0.3:
        raise ValueError(f"sigma_rel must be in (0, 0.3) (EDM2 uses 0.05 to 0.2), got {sigma_rel}")
    s = float(sigma_rel) ** -2
    gamma = math.sqrt(s) + 1.0
    for _ in range(200):
        f = ((gamma + 7.0) * gamma + 16.0 - s) * gamma + 12.0 - s
        step = f / ((3.0 * gamma + 14.0) * gamma + 16.0 - s)
        gamma -= step
        if abs(step) <= 1e-15 * max(1.0, abs(gamma)):
            return gamma
    raise AssertionError(f"Newton's method did not converge for sigma_rel={sigma_rel}")


class PowerEMA(_Averager):
    """EDM2's power-function EMA (Karras et al., arXiv 2312.02696), one profile per ``sigma_rel``.

    Profile ``k`` is an EMA with ``β_t = (1 − 1/t)^(γ_k + 1)``, where ``t`` counts optimizer steps
    including the current one and ``γ_k = sigma_rel_to_gamma(sigma_rel[k])``: its weights on past θ grow
    like ``τ^γ``, so its length is a fixed fraction (σ_rel) of the run so far. Every profile is updated
    from one read of θ in the fused step (the multi-average EMA rule with per-step weights
    ``1 − β_t``); ``β_1 = 0`` makes the first step a copy. ``averaged_parameters(k)`` is profile ``k``.

    With ``snapshot_every=N`` and ``snapshot_dir``, every N-th step writes each profile (fp32, in the
    optimizer's parameter order, with σ_rel, γ and t) to one file per profile and step; the copy to
    (pinned) host memory is queued on the device's stream and the file is written by a background
    thread, so the step does not wait. :meth:`flush` waits for the pending writes and raises a failed
    one. :func:`fastavg.posthoc.synthesize` builds the EMA of any σ_rel from the snapshots (EDM2's
    Algorithm 3).
    """

    def __init__(self, sigma_rel=(0.05, 0.10), *, snapshot_every=None, snapshot_dir=None):
        sigmas = tuple(sigma_rel) if isinstance(sigma_rel, (tuple, list)) else (sigma_rel,)
        if not 1 <= len(sigmas) <= MAX_AVERAGES:
            raise ValueError(
                f"sigma_rel must be a float or a tuple of 1 to {MAX_AVERAGES} floats, got {len(sigmas)}")
        gammas = tuple(sigma_rel_to_gamma(s) for s in sigmas)
        if len(set(sigmas)) != len(sigmas):
            raise ValueError(f"sigma_rel has a value twice ({sigmas}); each profile needs its own width")
        if snapshot_every is not None:
            _check_int("snapshot_every", snapshot_every, 1)
        if (snapshot_every is None) != (snapshot_dir is None):
            raise ValueError("snapshot_every and snapshot_dir go together: pass both to write snapshots for "
                             "fastavg.posthoc, or neither")
        if snapshot_dir is not None:
            from .posthoc import prepare_snapshot_dir

            snapshot_dir = prepare_snapshot_dir(snapshot_dir)
        self.sigma_rel = tuple(float(s) for s in sigmas)
        self.gamma = gammas
        self.snapshot_every = snapshot_every
        self.snapshot_dir = snapshot_dir
        self._writer = None

    @property
    def num_averages(self) -> int:
        return len(self.sigma_rel)

    def decay_at(self, gamma: float, t: int) -> float:
        """``β_t = (1 − 1/t)^(γ + 1)``."""
        return (1.0 - 1.0 / t) ** (gamma + 1.0)

    def weight_at(self, gamma: float, t: int) -> float:
        """``1 − β_t``, computed without the cancellation of ``1 − β_t`` when β_t is near 1."""
        return 1.0 if t == 1 else -math.expm1((gamma + 1.0) * math.log1p(-1.0 / t))

    def plan(self, t: int) -> AveragePlan:
        return AveragePlan(RULE_EMA, tuple(self.weight_at(g, t) for g in self.gamma))

    def capturable_plan(self) -> AveragePlan:
        if self.snapshot_every is not None:
            raise NotImplementedError(
                "PowerEMA(snapshot_every=...) with capturable=True is not supported: its snapshots are written from "
                "the host after the step; use snapshot_every=None under capture, or capturable=False")
        return AveragePlan(RULE_EMA, (0.0,) * self.num_averages)

    def device_weights(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.where(t == 1, 1.0, -torch.expm1((g + 1.0) * torch.log1p(-1.0 / t)))
                            for g in self.gamma])

    def after_step(self, t: int, averaged_parameters) -> None:
        if self.snapshot_every is None or t % self.snapshot_every:
            return
        if self._writer is None:
            from .posthoc import SnapshotWriter

            self._writer = SnapshotWriter(self.snapshot_dir)
        for k, (sigma, gamma) in enumerate(zip(self.sigma_rel, self.gamma)):
            self._writer.write(t, k, sigma, gamma, averaged_parameters(k))

    def flush(self) -> None:
        """Wait until every snapshot queued so far is on disk; raise the first write that failed."""
        if self._writer is not None:
            self._writer.flush()

    def config(self) -> dict:
        # Where and how often snapshots go does not change the averages: a run may resume with others.
        return {"name": "PowerEMA", "sigma_rel": self.sigma_rel}

    def __repr__(self) -> str:
        return (f"PowerEMA(sigma_rel={self.sigma_rel!r}, snapshot_every={self.snapshot_every!r}, "
                f"snapshot_dir={self.snapshot_dir!r})")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_writer": None}


def _check_positive(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value >= 0.0 if allow_zero else value > 0.0) or math.isinf(value):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")
    return float(value)


class BEMA(_Averager):
    """BEMA, "EMA without the lag" (Block & Zhang, arXiv 2508.00180), exactly TRL's ``BEMACallback``.

    With ``t`` the optimizer's step count (TRL's ``global_step``), ``ρ = lag``, ``γ = multiplier``,
    ``κ = ema_power``, ``η = bias_power``:

    - until step ``update_after``: nothing; the BEMA weights are θ as at the first step (TRL's copy of
      the model at ``on_train_begin``), as are θ₀ and the EMA;
    - at step ``update_after`` (if > 0): ``θ₀ ← θ``, ``EMA ← θ`` (the BEMA weights do not change);
    - at steps ``t > update_after`` with ``(t − update_after) % update_freq == 0``:
      ``β_t = max((ρ + γt)^(−κ), min_ema_multiplier)``, ``α_t = (ρ + γt)^(−η)``,
      ``EMA ← (1 − β_t)·EMA + β_t·θ_t``, and the BEMA weights are ``EMA + α_t(θ_t − θ₀)``.

    Three fp32 buffers: ``average_0`` the EMA, ``average_1`` θ at the last update step, ``average_2``
    θ₀. An update step is the multi-average EMA rule with weights ``(β_t, 1)`` on the first two, fused in
    the optimizer step; the BEMA weights ``EMA + α_t(θ_t − θ₀)`` are assembled when read
    (``averaged_parameters()``, ``swap_average()``), which moves fewer bytes per update step than
    storing them and gives the same fp32 values. ``averaged_parameters()`` are the BEMA weights as of
    the last update step, as TRL's running model holds them.
    """

    num_averages = 3

    def __init__(self, update_freq=400, ema_power=0.5, bias_power=0.2, lag=10, update_after=0, multiplier=1.0,
                 min_ema_multiplier=0.0):
        self.update_freq = _check_int("update_freq", update_freq, 1)
        self.ema_power = _check_positive("ema_power", ema_power, allow_zero=True)
        self.bias_power = _check_positive("bias_power", bias_power, allow_zero=True)
        self.lag = _check_positive("lag", lag, allow_zero=True)
        self.update_after = _check_int("update_after", update_after, 0)
        self.multiplier = _check_positive("multiplier", multiplier, allow_zero=True)
        self.min_ema_multiplier = _check_positive("min_ema_multiplier", min_ema_multiplier, allow_zero=True)
        if self.min_ema_multiplier > 1.0:
            raise ValueError(f"min_ema_multiplier must be in [0, 1] (a floor on β_t), got {min_ema_multiplier}")
        if self.lag + self.multiplier * (update_after + update_freq) <= 0:
            raise ValueError("lag + multiplier * t must be > 0 at the first update step (its powers are taken); "
                             "set lag > 0 or multiplier > 0")

    @property
    def num_outputs(self) -> int:
        return 1

    def ema_beta(self, t: int) -> float:
        """``β_t = max((ρ + γt)^(−κ), min_ema_multiplier)``."""
        return max((self.lag + self.multiplier * t) ** (-self.ema_power), self.min_ema_multiplier)

    def bema_alpha(self, t: int) -> float:
        """``α_t = (ρ + γt)^(−η)``."""
        return (self.lag + self.multiplier * t) ** (-self.bias_power)

    def last_update(self, t: int) -> int:
        """The last update step at or before ``t``, or 0 if none has come yet."""
        if t <= self.update_after:
            return 0
        return t - (t - self.update_after) % self.update_freq if t - self.update_after >= self.update_freq else 0

    def plan(self, t: int) -> AveragePlan:
        if t == self.update_after:
            return AveragePlan(RULE_EMA, (1.0, 1.0), averages=(0, 2))
        if t > self.update_after and (t - self.update_after) % self.update_freq == 0:
            return AveragePlan(RULE_EMA, (self.ema_beta(t), 1.0))
        return NO_PLAN

    def bema_weights(self, buffers: dict, t: int):
        """The BEMA weights after ``t`` steps from ``buffers`` (a parameter's state or a bucket's flat
        buffers, by name): ``EMA + α(θ_u − θ₀)`` at the last update step ``u``, θ_u itself before one."""
        u = self.last_update(t)
        if u == 0:
            return buffers["average_1"]
        return buffers["average_0"] + self.bema_alpha(u) * (buffers["average_1"] - buffers["average_2"])


def check_averager(average) -> _Averager | None:
    if average is None or isinstance(average, _Averager):
        return average
    raise TypeError(
        "average must be None or one of fastavg.EMA/BELAY/SWA/LAWA/SEMA/PowerEMA/BEMA, "
        f"got {type(average).__name__}"
    )

