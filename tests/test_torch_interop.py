"""fastavg's optimizers against torch.optim on torch's own optimizer test database.

``torch.testing._internal.common_optimizers.optim_db`` ships with torch: for SGD, Adam and AdamW, every
``optim_inputs_func`` configuration (with torch's implementation switches: foreach, fused) runs here next to
torch.optim, each parameter and state tensor compared after every step, through an lr scheduler, a parameter
whose gradient arrives late, and state dicts loaded across the two mid-run; every ``optim_error_inputs_func``
case raises torch's exception type.
"""
import copy

import pytest
import torch

import fastavg
from fastavg import reference

from helpers import tolerance

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's optimizer test database needs expecttest")

NAMES = ("SGD", "Adam", "AdamW")
INFOS = {info.optim_cls.__name__: info for info in common_optimizers.optim_db if info.optim_cls.__name__ in NAMES}
IMPLEMENTATIONS = {"fused": fastavg, "reference": reference}
STEPS = 15


def _optim_inputs(name):
    info = INFOS[name]
    inputs = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs(
        "cpu", torch.float32, info, skip=("differentiable",))
    return [pytest.param(name, i.kwargs, id=f"{name}-{i.desc}") for i in inputs]


def _error_inputs(name):
    inputs = INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)
    return [pytest.param(name, e, id=f"{name}-{e.optimizer_error_input.desc}") for e in inputs]


def _models(dtype):
    """Two parameter sets: a small MLP, and one whose second parameter gets its first gradient at step 5."""
    torch.manual_seed(0)
    mlp = [torch.randn(6, 5, dtype=dtype), torch.randn(6, dtype=dtype), torch.randn(3, 6, dtype=dtype)]
    late = [torch.randn(4, 4, dtype=dtype), torch.randn(7, dtype=dtype)]
    return mlp + late


def _fastavg_kwargs(kwargs):
    """torch's kwargs as fastavg takes them: a 0-d tensor lr is a number to fastavg's fused step."""
    return {k: (v.item() if k == "lr" and isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


def _gradients(step, params, generator):
    return [None if (i == len(params) - 1 and step < 5) else
            torch.randn(p.shape, dtype=p.dtype, generator=generator) for i, p in enumerate(params)]


def _run_side_by_side(name, kwargs, impl, dtype, swap_at=None):
    values = _models(dtype)
    ours_params = [v.clone().requires_grad_() for v in values]
    torch_params = [v.clone().requires_grad_() for v in values]
    ours = getattr(impl, name)(ours_params, **_fastavg_kwargs(kwargs))
    # torch's fused SGD fails on a parameter without a gradient (the late one): torch runs its default path there.
    torch_kwargs = {k: v for k, v in copy.deepcopy(kwargs).items() if not (name == "SGD" and k == "fused")}
    theirs = getattr(torch.optim, name)(torch_params, **torch_kwargs)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5) for o in (ours, theirs)]
    generator = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        for p, q, g in zip(ours_params, torch_params, _gradients(step, values, generator)):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        ours.step()
        theirs.step()
        for scheduler in schedulers:
            scheduler.step()
        if step == swap_at:
            # Each continues from the other's state dict: the numbers must not notice.
            ours_state, theirs_state = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())
            ours.load_state_dict(theirs_state)
            theirs.load_state_dict(ours_state)
        for p, q in zip(ours_params, torch_params):
            torch.testing.assert_close(p.detach(), q.detach(), **tolerance(dtype))
            # torch keeps an entry once the rule has stepped a parameter (SGD without momentum keeps none).
            stepped = float(ours.state[p]["step"]) > 0
            torch_buffers = [key for key in theirs.state.get(q, {}) if key != "step"]
            assert stepped or not torch_buffers, "torch has state for a parameter fastavg has not stepped"
            for key, value in theirs.state[q].items():
                # torch.optim.SGD keeps no step of its own (a loaded one stays as it was).
                if isinstance(value, torch.Tensor) and not (name == "SGD" and key == "step"):
                    torch.testing.assert_close(ours.state[p][key].to(value.dtype).reshape(value.shape), value,
                                               **tolerance(dtype))
        # Only parameters the rule has stepped carry an entry torch would read.
        stepped = [i for i, p in enumerate(ours_params) if float(ours.state[p]["step"]) > 0]
        assert sorted(ours.state_dict()["state"]) == stepped


@pytest.mark.parametrize("impl", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
@pytest.mark.parametrize("name, kwargs", [p for name in NAMES for p in _optim_inputs(name)])
def test_optim_inputs_match_torch(name, kwargs, impl):
    _run_side_by_side(name, kwargs, impl, torch.float32, swap_at=7)


@pytest.mark.parametrize("name, kwargs", [p for name in NAMES for p in _optim_inputs(name)
                                          if not p.values[1].get("fused")])
def test_float64_is_exact_to_float64(name, kwargs):
    """lr, the bias corrections and the averaging weights reach a float64 step unrounded."""
    _run_side_by_side(name, kwargs, fastavg, torch.float64)


# torch warns and deduplicates; fastavg refuses a parameter listed twice in one group (its state would be
# stepped twice per step in a fused launch): a ValueError, documented in the README.
STRICTER = {"a param group cannot have duplicate parameters": ValueError}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
@pytest.mark.parametrize("name, error", [p for name in NAMES for p in _error_inputs(name)])
def test_error_inputs_raise_torchs_type(name, error, impl):
    inp = error.optimizer_error_input
    params = inp.params if inp.params is not None else [torch.rand(2, 2, requires_grad=True)]
    expected = STRICTER.get(inp.desc, error.error_type)
    with pytest.raises(expected):
        optimizer = getattr(impl, name)(params, **inp.kwargs)
        if error.error_on != common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            optimizer.step()


@pytest.mark.parametrize("name", NAMES)
def test_never_stepped_sgd_state_does_not_change_torchs_numbers(name):
    """A parameter that has had no gradient has no entry, so torch.optim initialises it as its own."""
    values = _models(torch.float32)
    ours_params = [v.clone().requires_grad_() for v in values]
    kwargs = {"lr": 0.5, "momentum": 0.5, "dampening": 0.5} if name == "SGD" else {"lr": 0.5}
    ours = getattr(fastavg, name)(ours_params, average=fastavg.EMA(0.9), **kwargs)
    ours_params[0].grad = torch.ones_like(ours_params[0])
    ours.step()
    state = ours.state_dict()
    assert list(state["state"]) == [0]
    assert sorted(state["fastavg"]["unstepped"]) == list(range(1, len(values)))
    torch_params = [p.detach().clone().requires_grad_() for p in ours_params]
    reference_params = [p.detach().clone().requires_grad_() for p in ours_params]
    theirs = getattr(torch.optim, name)(torch_params, **kwargs)
    theirs.load_state_dict(state)
    fresh = getattr(torch.optim, name)(reference_params, **kwargs)
    fresh.load_state_dict({"state": {0: copy.deepcopy(theirs.state_dict()["state"][0])},
                           "param_groups": theirs.state_dict()["param_groups"]})
    for opt, params in ((theirs, torch_params), (fresh, reference_params)):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    for p, q in zip(torch_params, reference_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_unstepped_averages_round_trip():
    params = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
    opt = fastavg.AdamW(params, lr=0.1, average=fastavg.EMA(0.5))
    params[0].grad = torch.ones(3)
    for _ in range(3):
        opt.step()
        with torch.no_grad():
            params[1].add_(1.0)
    saved = copy.deepcopy(opt.state_dict())
    other = fastavg.AdamW([p.detach().clone().requires_grad_() for p in params], lr=0.1, average=fastavg.EMA(0.5))
    other.load_state_dict(saved)
    for a, b in zip(opt.averaged_parameters(), other.averaged_parameters()):
        assert torch.equal(a, b)
    assert float(other.state[other.param_groups[0]["params"][1]]["step"]) == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_state_dict_of_another_class_is_refused_and_changes_nothing(impl):
    params = [torch.randn(4, requires_grad=True)]
    opt = impl.AdamW(params, lr=0.1)
    params[0].grad = torch.ones(4)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    sgd = torch.optim.SGD([torch.randn(4, requires_grad=True)], lr=0.5, momentum=0.9)
    adam = torch.optim.Adam([torch.randn(4, requires_grad=True)], lr=0.5)
    with pytest.raises(ValueError, match="not a state dict of AdamW"):
        opt.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="saved by Adam"):
        opt.load_state_dict(adam.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_torch_keywords(impl):
    p = [torch.randn(3, requires_grad=True)]
    for name in NAMES:
        cls = getattr(impl, name)
        opt = cls(p, foreach=True, fused=False)
        group = opt.param_groups[0]
        assert (group["foreach"], group["fused"], group["differentiable"]) == (True, False, False)
        torch_group = getattr(torch.optim, name)(p).param_groups[0]
        assert set(torch_group) <= set(group), "torch's param group keys are all there"
        with pytest.raises(NotImplementedError, match="differentiable"):
            cls(p, differentiable=True)
        with pytest.raises(TypeError, match=rf"^{name}\.__init__\(\) got an unexpected keyword argument 'bogus'"):
            cls(p, bogus=1)
    assert impl.Adam(p, capturable=True).param_groups[0]["capturable"] is True  # tests/test_capturable.py
    assert impl.Adam(p, decoupled_weight_decay=True).param_groups[0]["decoupled_weight_decay"] is True
    assert impl.AdamW(p).param_groups[0]["decoupled_weight_decay"] is True


def test_adam_decoupled_weight_decay_is_adamw():
    values = _models(torch.float32)
    a = [v.clone().requires_grad_() for v in values]
    b = [v.clone().requires_grad_() for v in values]
    adam = fastavg.Adam(a, lr=0.1, weight_decay=0.3, decoupled_weight_decay=True)
    adamw = torch.optim.AdamW(b, lr=0.1, weight_decay=0.3)
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        adam.step()
        adamw.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **tolerance(torch.float32))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_named_parameters(impl):
    model = torch.nn.Linear(3, 2)
    opt = impl.AdamW(model.named_parameters(), lr=0.1, average=fastavg.EMA(0.9))
    reference_opt = torch.optim.AdamW(model.named_parameters(), lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    assert opt.state_dict()["param_groups"][0]["param_names"] == reference_opt.state_dict()["param_groups"][0][
        "param_names"]
    with pytest.raises(ValueError, match="with/without names"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
