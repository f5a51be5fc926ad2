"""What the reference optimizers and the fused ones share: validation, the averaging API, state dicts.

Both keep, for every parameter ``p``, ``self.state[p]`` with torch's keys (``step``, ``exp_avg``, ...)
plus the averaging buffers (``average_0`` ..., ``average_velocity``, ``lawa_sum``, ``lawa_ring``),
allocated when the optimizer is built; averages are seeded from θ at the first step. In the fused
optimizers these are views into flat buffers.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from .averaging import LAWA, NO_PLAN, AveragePlan, check_averager

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return float(value)
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_nonnegative(name: str, value) -> None:
    if not _scalar(name, value) >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_unit_interval(name: str, value) -> None:
    if not 0.0 <= _scalar(name, value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_sgd_group(group: dict) -> None:
    check_nonnegative("lr", group["lr"])
    check_nonnegative("momentum", group["momentum"])
    check_nonnegative("weight_decay", group["weight_decay"])
    dampening = _scalar("dampening", group["dampening"])
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"dampening must be in [0, 1], got {dampening}")
    if group["momentum_style"] not in ("torch", "heavy_ball"):
        raise ValueError(f"momentum_style must be 'torch' or 'heavy_ball', got {group['momentum_style']!r}")
    if group["nesterov"] and (group["momentum"] <= 0 or dampening != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
    if group["momentum_style"] == "heavy_ball" and dampening != 0:
        raise ValueError("dampening is defined only for momentum_style='torch'; set dampening=0")


def check_adam_group(group: dict) -> None:
    check_nonnegative("lr", group["lr"])
    check_nonnegative("eps", group["eps"])
    check_nonnegative("weight_decay", group["weight_decay"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    check_unit_interval("betas[0]", betas[0])
    check_unit_interval("betas[1]", betas[1])


def check_param(p) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"params must be tensors, got {type(p).__name__}")
    if p.layout != torch.strided:
        raise ValueError(f"sparse parameters are not supported (got layout {p.layout}); use a dense tensor")
    if p.is_complex():
        raise ValueError("complex parameters are not supported; optimize torch.view_as_real(p) instead")
    if not p.is_floating_point():
        raise TypeError(f"parameters must be floating point, got {p.dtype}")
    if not p.is_leaf:
        raise ValueError("can't optimize a non-leaf tensor; pass model.parameters() or detached leaves")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """State, averages and arithmetic are fp32, or float64 for float64 parameters."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class AveragingOptimizer(torch.optim.Optimizer):
    """Base of every fastavg optimizer: param-group checks, the averaging API and the state dict."""

    _check_group = staticmethod(lambda group: None)

    def __init__(self, params, defaults: dict, average):
        self.average = check_averager(average)
        self._average_step = 0
        super().__init__(params, defaults)

    # --- param groups ----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("params must be an ordered collection of tensors, not a set")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        for p in params:
            check_param(p)
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears twice in one param group; pass each parameter once")
        known = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in known for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        self._check_group(group)
        group["params"] = params
        self._init_group_state(group)
        self.param_groups.append(group)

    def _init_group_state(self, group: dict) -> None:
        raise NotImplementedError

    def _check_all_groups(self) -> None:
        for group in self.param_groups:
            self._check_group(group)

    def _begin_step(self, closure):
        """Run the closure (with grad enabled) and re-check the groups a scheduler may have changed."""
        self._refuse_inside_swap("opt.step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_all_groups()
        return loss

    def _advance_average_step(self) -> AveragePlan:
        """Count this step and return what its averaging does."""
        self._average_step += 1
        return self.average.plan(self._average_step) if self.average is not None else NO_PLAN

    # --- averaging API ---------------------------------------------------------------------------
    def _require_average(self, index: int) -> None:
        if self.average is None:
            raise RuntimeError(
                "this optimizer keeps no average; build it with average=fastavg.EMA(...) or another averager"
            )
        count = max(self.average.num_averages, 1)
        if not 0 <= index < count:
            raise IndexError(f"index must be in [0, {count}), got {index}")

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _average_of(self, p, index: int) -> torch.Tensor:
        """The average of ``p`` in fp32: a view for EMA/BELAY/SWA/SEMA, computed for LAWA; θ before any step."""
        state = self.state[p]
        if self._average_step == 0:
            return p.detach().to(compute_dtype(p.dtype), copy=True)
        if isinstance(self.average, LAWA):
            count = min(self.average.snapshot_count(self._average_step), self.average.k)
            if count == 0:
                return p.detach().to(compute_dtype(p.dtype))
            return state["lawa_sum"] / count
        return state[f"average_{index}"]

    @torch.no_grad()
    def averaged_parameters(self, index: int = 0) -> list[torch.Tensor]:
        """The average of every parameter, in order, shaped like the parameters (fp32).

        For EMA, BELAY, SWA and SEMA these are live views of the average; for LAWA they are computed
        (``S / min(count, k)``) at the call. ``index`` picks one decay of a multi-decay EMA. Before the
        first step, when no average exists yet, they are copies of the parameters.
        """
        self._require_average(index)
        return [self._average_of(p, index) for p in self._params()]

    @contextlib.contextmanager
    def swap_average(self, index: int = 0):
        """Inside the block the parameters hold the average; the raw weights come back on exit, always.

        ``step()``, ``switch_to_average()``, ``load_state_dict()`` and a nested swap raise inside the block:
        their work would be thrown away (or restored over) on exit.
        """
        self._refuse_inside_swap("swap_average()")
        self._require_average(index)
        with torch.no_grad():
            raw = self._save_weights()
            self._load_average(index)
        self._inside_swap = True
        try:
            yield self
        finally:
            self._inside_swap = False
            with torch.no_grad():
                self._restore_weights(raw)

    def _refuse_inside_swap(self, what: str) -> None:
        if getattr(self, "_inside_swap", False):
            raise RuntimeError(
                f"{what} was called inside `with opt.swap_average():`, where the parameters hold the average and "
                "the raw weights come back on exit, so its work would be lost; leave the block first"
            )

    @torch.no_grad()
    def switch_to_average(self, index: int = 0) -> None:
        """``θ ← e`` now (Switch EMA at an epoch's end); the average and optimizer state are untouched."""
        self._refuse_inside_swap("switch_to_average()")
        self._require_average(index)
        self._load_average(index)

    def _save_weights(self):
        return [p.detach().clone() for p in self._params()]

    def _restore_weights(self, raw) -> None:
        for p, saved in zip(self._params(), raw):
            p.copy_(saved)

    def _load_average(self, index: int) -> None:
        for p in self._params():
            p.copy_(self._average_of(p, index))

    # --- state dict ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["fastavg"] = {
            "averager": None if self.average is None else self.average.config(),
            "step": self._average_step,
        }
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a fastavg or a ``torch.optim`` state dict; everything is checked before anything changes.

        Values are copied into the existing (fp32) state and average buffers. A plain ``torch.optim``
        state dict leaves the averages and the averaging step as they are.
        """
        self._refuse_inside_swap("load_state_dict()")
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("state_dict must be an optimizer state dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        id_to_param = {}
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {i} has {len(group['params'])} parameters, "
                    f"the state_dict's has {len(saved['params'])}"
                )
            id_to_param.update(zip(saved["params"], group["params"]))
        extra = state_dict.get("fastavg")
        if extra is not None:
            ours = None if self.average is None else self.average.config()
            if extra["averager"] != ours:
                raise ValueError(f"state_dict was saved with average={extra['averager']}, this optimizer has {ours}")
        copies = []
        for key, entry in state_dict["state"].items():
            if key not in id_to_param:
                raise ValueError(f"state_dict has state for parameter {key}, which no param group lists")
            p = id_to_param[key]
            state = self.state[p]
            for name, value in entry.items():
                if name == "step":
                    copies.append((state["step"], torch.as_tensor(value, dtype=torch.float32)))
                elif name in state and isinstance(value, torch.Tensor):
                    if value.numel() != state[name].numel():
                        raise ValueError(
                            f"state '{name}' of parameter {key} has {value.numel()} elements, "
                            f"expected {state[name].numel()}"
                        )
                    copies.append((state[name], value.reshape(state[name].shape)))
            if "step" not in entry and entry.get("momentum_buffer") is not None and "momentum_buffer" in state:
                # torch.optim.SGD keeps no step; a saved buffer means its first step is behind it.
                copies.append((state["step"], torch.ones(())))
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            new_group = {**copy.deepcopy({k: v for k, v in saved.items() if k != "params"}), "params": group["params"]}
            for name, default in self.defaults.items():
                new_group.setdefault(name, group.get(name, default))
            self._check_group(new_group)
            new_groups.append(new_group)
        for target, value in copies:
            target.copy_(value)
        for group, new_group in zip(self.param_groups, new_groups):
            group.update(new_group)
        if extra is not None:
            self._average_step = int(extra["step"])
        self._after_load()

    def _after_load(self) -> None:
        """Hook for the fused optimizers to refresh host-side mirrors of loaded state."""


# The public constructors, shared by the fused optimizers and their reference twins so that both
# have the same signatures by construction. Each calls the next class in the MRO with
# ``(params, defaults, average, backend, flat_params)``.
class SGDArguments:
    _check_group = staticmethod(check_sgd_group)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, momentum_style="torch", average=None, backend=None, flat_params=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, momentum_style=momentum_style)
        check_sgd_group(defaults)
        super().__init__(params, defaults, average, backend, flat_params)

    def _optimizer_state(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()


class AdamArguments:
    _check_group = staticmethod(check_adam_group)
    _decoupled_weight_decay = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, average=None, backend=None, flat_params=False):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        check_adam_group(defaults)
        super().__init__(params, defaults, average, backend, flat_params)

    def _optimizer_state(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())


class AdamWArguments(AdamArguments):
    _decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, average=None, backend=None, flat_params=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, average=average,
                         backend=backend, flat_params=flat_params)
