"""Weight averagers: EMA, BELAY, SWA, LAWA and Switch EMA (SEMA).

An averager is a small immutable description of *when* and *how much* to average. Every schedule is a
pure function of ``t``, the number of ``optimizer.step()`` calls so far including the current one, so
the only averaging counter an optimizer keeps is ``t`` itself. ``plan(t)`` turns ``t`` into an
:class:`AveragePlan` that the reference and every kernel backend execute in the same way.

Every average starts as a copy of the parameters when the optimizer is built and is kept in fp32
(float64 for float64 parameters), whatever the parameter dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EMA", "BELAY", "SWA", "LAWA", "SEMA", "AveragePlan"]

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
    """

    rule: int = RULE_NONE
    weights: tuple[float, ...] = ()
    switch: bool = False
    lawa_slot: int = 0


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

    def plan(self, t: int) -> AveragePlan:
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

    def plan(self, t: int) -> AveragePlan:
        plan = self._ema_plan(t)
        if t > self.switch_start and (t - self.switch_start) % self.switch_every == 0:
            return AveragePlan(plan.rule, plan.weights, switch=True)
        return plan


def check_averager(average) -> _Averager | None:
    if average is None or isinstance(average, _Averager):
        return average
    raise TypeError(
        f"average must be None or one of fastavg.EMA/BELAY/SWA/LAWA/SEMA, got {type(average).__name__}"
    )

