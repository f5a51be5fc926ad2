"""What the reference optimizers and the fused ones share: validation, the averaging API, state dicts.

Both keep, for every parameter ``p``, ``self.state[p]`` with torch's keys (``step``, ``exp_avg``, ...)
plus the averaging buffers (``average_0`` ..., ``average_velocity``, ``lawa_sum``, ``lawa_ring``),
allocated when the optimizer is built; averages are seeded from θ at the first step. In the fused
optimizers these are views into flat buffers.
"""
from __future__ import annotations

import collections
import contextlib
import copy

import torch

from ._distributed import is_dtensor
from .averaging import BEMA, LAWA, NO_PLAN, AveragePlan, check_averager

# The keys torch.optim's SGD, Adam and AdamW read; every other key of ``opt.state[p]`` is fastavg's averaging.
_OPTIMIZER_STATE_KEYS = ("step", "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# The averaging step, also kept in every saved param group: torch.distributed.checkpoint's
# get/set_optimizer_state_dict keep only "state" and "param_groups" of a state dict, not the "fastavg" section.
_AVERAGE_STEP_KEY = "average_step"


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


def check_tensor_lr(group: dict) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if group.get("foreach") and not group.get("capturable"):
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True (as in "
                             "torch.optim); pass a float, or leave foreach unset (fastavg always fuses)")


def check_torch_keywords(foreach, fused, differentiable, capturable=False) -> None:
    """torch.optim's implementation switches, accepted with torch's values; see the constructors' docstrings.
    ``capturable`` is Adam's and AdamW's (see :mod:`fastavg.optim`)."""
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be None, True or False, got {value!r}")
    for name, value in (("differentiable", differentiable), ("capturable", capturable)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if differentiable:
        raise NotImplementedError("differentiable=True is not supported: fastavg's fused step is not differentiable "
                                  "(as torch's fused=True path); use torch.optim with differentiable=True")


def check_sgd_group(group: dict, at_step: bool = False) -> None:
    check_tensor_lr(group)
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


def check_adam_group(group: dict, at_step: bool = False) -> None:
    """``at_step``: the check before each step, which with capturable=True reads no tensor lr (a host read of a
    device value); its value was checked when the group was made, as in torch.optim."""
    check_tensor_lr(group)
    capturable = group.get("capturable", False)
    if not (at_step and capturable and isinstance(group["lr"], torch.Tensor)):
        check_nonnegative("lr", group["lr"])
    check_nonnegative("eps", group["eps"])
    check_nonnegative("weight_decay", group["weight_decay"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    if len(betas) != 2:
        # torch indexes betas[1] and raises IndexError for a shorter tuple; so does fastavg, with a message.
        raise IndexError(f"betas must be a pair (beta1, beta2), got {len(betas)} value(s): {betas!r}")
    tensors = [isinstance(beta, torch.Tensor) for beta in betas]
    if any(tensors) and not all(tensors):
        raise ValueError(f"betas must be either both floats or both Tensors, got {betas!r}")
    if all(tensors) and group.get("foreach") and not capturable:
        raise ValueError("betas[0] as a Tensor is not supported for capturable=False and foreach=True (as in "
                         "torch.optim); pass floats, or leave foreach unset (fastavg always fuses)")
    if capturable and any(isinstance(beta, torch.Tensor) and beta.device.type != "cpu" for beta in betas):
        raise ValueError("betas on a device with capturable=True: fastavg's kernels take betas as arguments read on "
                         "the host, which a CUDA graph would fix at capture; pass floats (or CPU tensors)")
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


class _State(collections.defaultdict):
    """``optimizer.state``, where a whole entry assigned over a parameter's entry is copied into it.

    The fused optimizers' entries are views of the flat buffers their kernels update, so a new dict in their place
    would be state that no step reads. ZeroRedundancyOptimizer's ``load_state_dict`` assigns entries
    (``optim.state[p] = ...``): they are copied in, which resumes the optimizer rule exactly. The averages cannot be
    resumed that way, because ZeRO's state dicts drop the averaging step (it is in neither its param groups nor any
    entry): with an averager, such an assignment raises before anything changes.
    """

    averaging = False

    def __setitem__(self, p, entry) -> None:
        current = self.get(p)
        if current is None or current is entry or not isinstance(entry, dict):
            super().__setitem__(p, entry)
            return
        averages = sorted(name for name in entry if name not in _OPTIMIZER_STATE_KEYS)
        if self.averaging and averages:
            raise RuntimeError(
                f"optimizer.state[p] was assigned a new entry with averages {averages} (ZeroRedundancyOptimizer's "
                "load_state_dict does this), which cannot resume the averages: the averaging step is not in that "
                "state dict. Save and load each rank's own optimizer instead: zero.optim.state_dict() / "
                "zero.optim.load_state_dict(...) (same world size), or use FSDP2 with torch.distributed.checkpoint")
        with torch.no_grad():
            for name, value in entry.items():
                if isinstance(current.get(name), torch.Tensor) and isinstance(value, torch.Tensor):
                    current[name].copy_(value)
                else:
                    current[name] = value


class AveragingOptimizer(torch.optim.Optimizer):
    """Base of every fastavg optimizer: param-group checks, the averaging API and the state dict."""

    _check_group = staticmethod(lambda group, at_step=False: None)

    def __init__(self, params, defaults: dict, average):
        self.average = check_averager(average)
        self._average_step = 0
        super().__init__(params, defaults)

    # torch.optim.Optimizer pickles only defaults, state and param_groups; fastavg's optimizers also need their
    # averager, counts and buffers. torch's __setstate__ makes the hooks anew, as for its own optimizers; "step" is
    # an lr scheduler's wrapper of the bound method, which it puts on the instance.
    _NOT_PICKLED = ("step", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                    "_optimizer_load_state_dict_post_hooks")

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name not in self._NOT_PICKLED}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.state = self.__dict__["state"]  # a _State again, with its averaging flag

    @property
    def state(self) -> _State:
        return self.__dict__["state"]

    @state.setter
    def state(self, value) -> None:
        """torch.optim.Optimizer.__init__ sets ``self.state = defaultdict(dict)``; it becomes a :class:`_State`."""
        state = value if isinstance(value, _State) else _State(dict, value)
        state.averaging = self.average is not None
        self.__dict__["state"] = state

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
        # (name, tensor) pairs, as model.named_parameters() gives them: torch keeps the names in "param_names".
        named = [isinstance(p, tuple) for p in params]
        if any(named):
            if not all(named):
                raise ValueError("all optimizer params should be with/without names. Some param names are missing")
            group["param_names"] = [name for name, _ in params]
            params = [p for _, p in params]
        if self.param_groups and ("param_names" in group) != ("param_names" in self.param_groups[0]):
            raise ValueError("all optimizer param groups should be with/without names. cannot add a param group "
                             f"{'with' if 'param_names' in group else 'without'} names to groups "
                             f"{'with' if 'param_names' in self.param_groups[0] else 'without'} names")
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
        if self._average_step > 0:
            self._seed_averages(params)

    def _init_group_state(self, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def _seed_averages(self, params) -> None:
        """Averages start from θ as it is now: at the first step (the reference optimizers; the fused ones seed their
        flat buffers at once), and for parameters that join after it (a param group added later, or parameters a
        loaded state dict has no averages for), as if θ had been there all along: every
        average (BEMA's θ₀ and θ_u too) is θ, BELAY's velocity 0, LAWA's snapshots so far are θ."""
        average = self.average
        if average is None:
            return
        for p in params:
            state, theta = self.state[p], p.detach()
            for k in range(average.num_averages):
                state[f"average_{k}"].copy_(theta)
            if "average_velocity" in state:
                state["average_velocity"].zero_()
            if isinstance(average, LAWA):
                count = min(average.snapshot_count(self._average_step), average.k)
                state["lawa_ring"].zero_()
                state["lawa_ring"][:count].copy_(theta.expand_as(state["lawa_ring"][:count]))
                state["lawa_sum"].copy_(theta.to(state["lawa_sum"].dtype) * count)

    def _check_all_groups(self) -> None:
        for group in self.param_groups:
            self._check_group(group, at_step=True)

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
        return self._plan_of(self._average_step) if self.average is not None else NO_PLAN

    def _plan_of(self, t: int) -> AveragePlan:
        return self.average.plan(t)

    def _finish_average_step(self) -> None:
        """The averager's hook after a step's averaging (PowerEMA's snapshots)."""
        if self.average is not None:
            self.average.after_step(self._average_step, self.averaged_parameters)

    # --- averaging API ---------------------------------------------------------------------------
    def _require_average(self, index: int) -> None:
        if self.average is None:
            raise RuntimeError(
                "this optimizer keeps no average; build it with average=fastavg.EMA(...) or another averager"
            )
        count = self.average.num_outputs
        if not 0 <= index < count:
            raise IndexError(f"index must be in [0, {count}), got {index}")

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _average_of(self, p, index: int) -> torch.Tensor:
        """The average of ``p`` in fp32: a view for EMA/BELAY/SWA/SEMA/PowerEMA, computed for LAWA and BEMA;
        θ before any step."""
        state = self.state[p]
        if self._average_step == 0:
            return p.detach().to(compute_dtype(p.dtype), copy=True)
        if isinstance(self.average, LAWA):
            count = min(self.average.snapshot_count(self._average_step), self.average.k)
            if count == 0:
                return p.detach().to(compute_dtype(p.dtype))
            return state["lawa_sum"] / count
        if isinstance(self.average, BEMA):
            return self.average.bema_weights(state, self._average_step)
        return state[f"average_{index}"]

    @torch.no_grad()
    def averaged_parameters(self, index: int = 0) -> list[torch.Tensor]:
        """The average of every parameter, in order, shaped like the parameters (fp32).

        For EMA, BELAY, SWA, SEMA and PowerEMA these are live views of the average; for LAWA
        (``S / min(count, k)``) and BEMA (``EMA + α(θ_u − θ₀)``) they are computed at the call. ``index``
        picks one decay of a multi-decay EMA or one PowerEMA profile. Before the
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
        """torch's layout. Only parameters the optimizer rule has stepped carry an entry in ``"state"``, as in
        torch.optim (which reads a present entry as a live one); the averages of the others, which follow θ from
        the first step on, are kept under ``"fastavg"`` / ``"unstepped"``. Before the first step every parameter has
        its entry if it requires grad, as a torch.optim optimizer has once torch.distributed.checkpoint initialised it: a
        fresh optimizer is what ``dcp.load`` loads into (it fills only the entries it is given); averages a loaded state
        dict lacks start from θ (see :meth:`load_state_dict`). With an averager, every param group also
        carries ``"average_step"`` (the averaging step), which survives torch.distributed.checkpoint's
        ``get_optimizer_state_dict``/``set_optimizer_state_dict`` (they keep only ``"state"`` and ``"param_groups"``).
        Under FSDP2 the state entries and averages are DTensors, as torch.optim's."""
        state = super().state_dict()
        if self.average is not None:
            for group in state["param_groups"]:
                group[_AVERAGE_STEP_KEY] = self._average_step
        unstepped = {}
        fresh = self._average_step == 0
        params = self._params()
        for index, entry in list(state["state"].items()):
            # A fresh optimizer lists what torch.distributed.checkpoint's initialisation would step: the parameters
            # that require grad.
            if float(entry["step"]) == 0 and not (fresh and params[index].requires_grad):
                del state["state"][index]
                averages = {name: value for name, value in entry.items() if name not in _OPTIMIZER_STATE_KEYS}
                if averages and self._average_step > 0:
                    unstepped[index] = averages
        state["fastavg"] = {
            "averager": None if self.average is None else self.average.config(),
            "step": self._average_step,
            "unstepped": unstepped,
        }
        return state

    def _check_same_class(self, saved_groups) -> None:
        """A state dict of another optimizer class would silently change the update rule: refuse it."""
        ours = type(self).__name__
        own_keys = {"momentum", "dampening", "nesterov"} if "momentum" in self.defaults else {"betas", "eps", "amsgrad"}
        other_keys = {"betas", "eps", "amsgrad"} if "momentum" in self.defaults else {"momentum", "dampening", "nesterov"}
        for i, saved in enumerate(saved_groups):
            if not own_keys <= saved.keys() or other_keys & saved.keys():
                raise ValueError(
                    f"state_dict's param group {i} (keys {sorted(k for k in saved if k != 'params')}) is not a state "
                    f"dict of {ours}: load a state dict saved by {ours} (fastavg's or torch.optim's)")
            if "decoupled_weight_decay" in saved and "decoupled_weight_decay" in self.defaults and bool(
                    saved["decoupled_weight_decay"]) != bool(self.param_groups[i]["decoupled_weight_decay"]):
                saved_kind = "AdamW" if saved["decoupled_weight_decay"] else "Adam"
                raise ValueError(
                    f"state_dict was saved by {saved_kind} (decoupled_weight_decay={saved['decoupled_weight_decay']}) "
                    f"and this optimizer is {ours} with decoupled_weight_decay="
                    f"{self.param_groups[i]['decoupled_weight_decay']}; load it into the matching class")

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a fastavg or a ``torch.optim`` state dict; everything is checked before anything changes.

        Values are copied into the existing (fp32) state and average buffers. A plain ``torch.optim``
        state dict leaves the averages and the averaging step as they are. A state dict with an averaging step but
        without the averages of some parameters (never stepped: torch.distributed.checkpoint and torch.optim keep
        no entry for them) starts those averages from θ, which a never-stepped parameter's averages follow.
        ``capturable`` stays as the optimizer was built (it decides where the step counts live).
        """
        self._refuse_inside_swap("load_state_dict()")
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("state_dict must be an optimizer state dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        self._check_same_class(saved_groups)
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
        entries = dict(state_dict["state"])
        unstepped = (extra or {}).get("unstepped", {})
        # The saved averaging step, if the state dict has one (a plain torch.optim state dict has none).
        if extra is not None:
            average_step = int(extra["step"])
        elif saved_groups and _AVERAGE_STEP_KEY in saved_groups[0]:
            average_step = int(saved_groups[0][_AVERAGE_STEP_KEY])
        else:
            average_step = None
        for key in id_to_param:
            # A parameter without an entry has not been stepped (torch.optim's reading): fresh optimizer state;
            # its averages, if the state dict has them, are under "unstepped".
            if key not in entries:
                state = self.state[id_to_param[key]]
                copies += [(state[name], torch.zeros(())) for name in _OPTIMIZER_STATE_KEYS if name in state]
                entries[key] = unstepped.get(key, {})
        # Averages the state dict has no values for, after a saved averaging step (torch.distributed.checkpoint
        # drops "unstepped"; so does a round trip through torch.optim): a never-stepped parameter's averages
        # follow θ, so they start from θ.
        unseeded = [id_to_param[key] for key, entry in entries.items() if key in id_to_param
                    and not any(name.startswith(("average_", "lawa_")) for name in entry)] if average_step else []
        for key, entry in entries.items():
            if key not in id_to_param:
                raise ValueError(f"state_dict has state for parameter {key}, which no param group lists")
            p = id_to_param[key]
            state = self.state[p]
            for name, value in entry.items():
                if name == "step":
                    copies.append((state["step"], torch.as_tensor(value, dtype=torch.float32)))
                elif name in state and isinstance(value, torch.Tensor):
                    if is_dtensor(state[name]) and not is_dtensor(value):
                        raise ValueError(
                            f"state '{name}' of parameter {key} is a plain tensor, but this optimizer's parameters are "
                            "DTensors (FSDP2, tensor parallelism) and its state is sharded like them: load a full state "
                            "dict with torch.distributed.checkpoint.state_dict.set_optimizer_state_dict(model, opt, "
                            "state_dict, options=StateDictOptions(full_state_dict=True)), which shards it")
                    if value.numel() != state[name].numel():
                        raise ValueError(
                            f"state '{name}' of parameter {key} has {value.numel()} elements, "
                            f"expected {state[name].numel()}"
                        )
                    copies.append((state[name], value if value.shape == state[name].shape
                                   else value.reshape(state[name].shape)))
            if "step" not in entry and entry.get("momentum_buffer") is not None and "momentum_buffer" in state:
                # torch.optim.SGD keeps no step; a saved buffer means its first step is behind it.
                copies.append((state["step"], torch.ones(())))
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            new_group = {**copy.deepcopy({k: v for k, v in saved.items() if k not in ("params", _AVERAGE_STEP_KEY)}),
                         "params": group["params"]}
            if "capturable" in group:  # where the counts live was fixed when the optimizer was built
                new_group["capturable"] = group["capturable"]
            for name, default in self.defaults.items():
                new_group.setdefault(name, group.get(name, default))
            self._check_group(new_group)
            new_groups.append(new_group)
        for target, value in copies:
            target.copy_(value)
        for group, new_group in zip(self.param_groups, new_groups):
            group.update(new_group)
        if average_step is not None:
            self._average_step = average_step
        self._seed_averages(unseeded)
        self._after_load()

    def _after_load(self) -> None:
        """Hook for the fused optimizers to refresh host-side mirrors of loaded state."""


# The public constructors, shared by the fused optimizers and their reference twins so that both
# have the same signatures by construction. Each calls the next class in the MRO with
# ``(params, defaults, average, backend, flat_params)``. torch.optim's implementation switches are accepted
# with torch's meaning where fastavg has one and kept in the param groups as torch keeps them, so that state
# dicts have torch's keys: ``foreach`` and ``fused`` (None, True or False) change nothing, fastavg always runs
# its fused kernels (``backend="reference"`` is the unfused path); ``differentiable=True`` raises
# NotImplementedError; ``capturable=True`` (Adam, AdamW) keeps the step counts on the device (fastavg.optim).
class SGDArguments:
    _check_group = staticmethod(check_sgd_group)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, momentum_style="torch",
                 average=None, backend=None, flat_params=False):
        check_torch_keywords(foreach, fused, differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused, momentum_style=momentum_style)
        check_sgd_group(defaults)
        super().__init__(params, defaults, average, backend, flat_params)

    def _optimizer_state(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()


class AdamArguments:
    """``decoupled_weight_decay=True`` is AdamW, as in torch.optim.Adam."""
    _check_group = staticmethod(check_adam_group)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, average=None, backend=None, flat_params=False):
        check_torch_keywords(foreach, fused, differentiable, capturable)
        if not isinstance(decoupled_weight_decay, bool):
            raise TypeError(f"decoupled_weight_decay must be True or False, got {decoupled_weight_decay!r}")
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        check_adam_group(defaults)
        super().__init__(params, defaults, average, backend, flat_params)

    def _optimizer_state(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())


class AdamWArguments(AdamArguments):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, average=None,
                 backend=None, flat_params=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, average=average, backend=backend, flat_params=flat_params)


# Python names the function in "got an unexpected keyword argument": the public class, not the mixin.
for _public, _arguments in (("SGD", SGDArguments), ("Adam", AdamArguments), ("AdamW", AdamWArguments)):
    _arguments.__init__.__qualname__ = f"{_public}.__init__"
