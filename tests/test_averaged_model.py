"""fastavg.AveragedModel against independent oracles: torch's AveragedModel, timm's ModelEmaV3, ema-pytorch's
EMA and the averaging equations in float64, with the model trained by optimizers fastavg does not implement."""
import copy
import importlib.util
import os
import warnings

import pytest
import torch
from torch.optim.swa_utils import (SWALR, AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn,
                                   get_swa_multi_avg_fn, update_bn)

import fastavg

from helpers import assert_close


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 33), torch.nn.BatchNorm1d(33), torch.nn.GELU(),
                               torch.nn.Linear(33, 3)).to(dtype)


def _train_step(model, opt, step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=g).to(next(model.parameters()).dtype)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _assert_modules_close(ours, theirs, dtype=torch.float32):
    """Every parameter and floating buffer of the two ``.module``s; integer buffers follow the model."""
    for (name, a), (_, b) in zip(ours.module.state_dict().items(), theirs.module.state_dict().items()):
        if a.is_floating_point():
            assert_close(a, b, dtype)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023), written here: an optimizer fastavg does not implement."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m.lerp(p.grad, 1 - beta1)), alpha=-group["lr"])
                m.lerp_(p.grad, 1 - beta2)


# --- drop-in for torch's AveragedModel ----------------------------------------------------------------
@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("functions", ["swa", "ema_multi", "ema_single", "swa_multi"])
def test_equals_torch_averaged_model(functions, use_buffers):
    kwargs = {"swa": {}, "ema_multi": {"multi_avg_fn": get_ema_multi_avg_fn(0.9)},
              "ema_single": {"avg_fn": get_ema_avg_fn(0.8)}, "swa_multi": {"multi_avg_fn": get_swa_multi_avg_fn()}}
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own functions are fused: no "unfused" warning
        ours = fastavg.AveragedModel(model, use_buffers=use_buffers, **kwargs[functions])
    # torch's get_swa_multi_avg_fn raises on the integer num_batches_tracked; its default is the same average.
    theirs = AveragedModel(model, use_buffers=use_buffers,
                           **({} if functions == "swa_multi" and use_buffers else kwargs[functions]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(6):
        _train_step(model, opt, step)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 6
    _assert_modules_close(ours, theirs)
    assert torch.equal(ours.module[1].num_batches_tracked, model[1].num_batches_tracked)
    x = torch.randn(5, 6)
    ours.eval(), theirs.eval()
    assert_close(ours(x), theirs(x), torch.float32)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for a, b in zip(ours.averaged_parameters(), theirs.module.parameters()):
        assert a.dtype == torch.float32
        assert_close(a, b, torch.float32)


def test_arbitrary_function_runs_torch_code_unfused_with_one_warning():
    def halfway(averaged, current, n):
        return 0.5 * (averaged + current)

    model = _model()
    with pytest.warns(UserWarning, match="unfused"):
        ours = fastavg.AveragedModel(model, avg_fn=halfway)
    theirs = AveragedModel(model, avg_fn=halfway)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        _train_step(model, opt, step)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


def test_update_bn_and_swalr_work_as_with_torch():
    model = _model()
    ours = fastavg.AveragedModel(model)
    theirs = AveragedModel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    swalr = SWALR(opt, swa_lr=0.05, anneal_epochs=2)
    for step in range(4):
        _train_step(model, opt, step)
        ours.update_parameters(model)
        theirs.update_parameters(model)
        swalr.step()
    loader = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    update_bn(loader, ours)
    update_bn(loader, theirs)
    _assert_modules_close(ours, theirs)
    # update_bn wrote into .module; a later update starts from what it wrote, as torch's does.
    _train_step(model, opt, 9)
    ours.update_parameters(model)
    theirs.update_parameters(model)
    _assert_modules_close(ours, theirs)


# --- fastavg averagers, against float64 equations ------------------------------------------------------
@pytest.mark.parametrize("name", ["ema_tuple_power", "ema_tf_every", "swa_start", "lawa", "sema", "belay"])
def test_averagers_follow_their_equations(name):
    average = {
        "ema_tuple_power": fastavg.EMA((0.9, 0.99), warmup="power", inv_gamma=2.0, power=0.75, start=2),
        "ema_tf_every": fastavg.EMA(0.95, warmup="tf", every=2),
        "swa_start": fastavg.SWA(start=3, every=2),
        "lawa": fastavg.LAWA(3, every=2),
        "sema": fastavg.SEMA(0.8, switch_every=3),
        "belay": fastavg.BELAY(0.7, reaction=0.5),
    }[name]
    model = _model()
    ours = fastavg.AveragedModel(model, average=average)
    opt = Lion(model.parameters(), lr=0.01)
    params = list(model.parameters())
    expected = [[p.detach().double().clone() for p in params] for _ in range(max(average.num_averages, 1))]
    snapshots = []
    for t in range(1, 10):
        _train_step(model, opt, t)
        theta = [p.detach().double().clone() for p in params]
        plan = average.plan(t)
        if name == "lawa":
            if plan.rule:
                snapshots.append(theta)
            last = snapshots[-average.k:] or [theta]
            expected[0] = [sum(ts) / len(last) for ts in zip(*last)]
        elif plan.rule:
            for k, w in enumerate(plan.weights):
                diffs = [th - e for th, e in zip(theta, expected[k])]
                expected[k] = [e + w * d for e, d in zip(expected[k], diffs)]
                if name == "belay":
                    theta = [th - average.reaction * w * d for th, d in zip(theta, diffs)]
        if plan.switch:
            theta = [e.clone() for e in expected[0]]
        ours.update_parameters(model)
        for p, th in zip(params, theta):  # SEMA's switch and BELAY's reaction land in the training model
            assert_close(p.detach(), th, torch.float32)
    for k in range(len(expected)):
        for a, e in zip(ours.averaged_parameters(k), expected[k]):
            assert_close(a, e, torch.float32)
    for a, e in zip(ours.module.parameters(), expected[0]):
        assert_close(a, e, torch.float32)


def test_bf16_model_average_keeps_moving_where_torchs_stalls():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    ours = fastavg.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    exact = [p.detach().double().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(300):
        loss = model(torch.randn(8, 64, dtype=torch.bfloat16)).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours.update_parameters(model)
        theirs.update_parameters(model)
        theta = [p.detach().double() for p in model.parameters()]
        exact = theta if step == 0 else [e + 0.001 * (th - e) for e, th in zip(exact, theta)]
    ours_error = max((a.double() - e).abs().max().item() for a, e in zip(ours.averaged_parameters(), exact))
    torch_error = max((a.double() - e).abs().max().item() for a, e in zip(theirs.module.parameters(), exact))
    assert ours_error < 1e-6 < 1e-4 < torch_error
    # .module holds the fp32 average rounded to bf16 once, not the rounding error of 300 bf16 updates.
    for a, m in zip(ours.averaged_parameters(), ours.module.parameters()):
        assert torch.equal(a.to(torch.bfloat16), m)


# --- timm and ema-pytorch under the documented argument mappings -------------------------------------------
def _timm_model_ema_v3():
    """timm's ModelEmaV3; its file alone when ``import timm`` fails for want of a working torchvision."""
    try:
        from timm.utils.model_ema import ModelEmaV3
        return ModelEmaV3
    except ImportError:
        spec = importlib.util.find_spec("timm")
        if spec is None:
            pytest.skip("timm is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "utils", "model_ema.py")
    module_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelEmaV3


@pytest.mark.parametrize("with_step", [True, False])
def test_equals_timm_model_ema_v3(with_step):
    ModelEmaV3 = _timm_model_ema_v3()
    beta, after, gamma, power, minimum = 0.95, 3, 2.0, 0.8, 0.3
    model = _model()
    if with_step:
        theirs = ModelEmaV3(model, beta, update_after_step=after, use_warmup=True, warmup_gamma=gamma,
                            warmup_power=power, min_decay=minimum)
        average = fastavg.EMA(beta, warmup="power", start=after + 1, inv_gamma=gamma, power=power, min_decay=minimum)
    else:
        theirs = ModelEmaV3(model, beta)
        average = fastavg.EMA(beta, start=0)
    ours = fastavg.AveragedModel(model, average=average, use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    for t in range(1, 12):
        _train_step(model, opt, t)
        ours.update_parameters(model)
        theirs.update(model, step=t) if with_step else theirs.update(model)
        _assert_modules_close(ours, theirs)


@pytest.mark.parametrize("after, every", [(4, 2), (0, 3)])
def test_equals_ema_pytorch_when_update_after_step_is_a_multiple_of_update_every(after, every):
    ema_pytorch = pytest.importorskip("ema_pytorch")
    beta, gamma, power, minimum = 0.9, 1.5, 0.7, 0.2
    model = _model()
    theirs = ema_pytorch.EMA(model, beta=beta, update_after_step=after, update_every=every, inv_gamma=gamma,
                             power=power, min_value=minimum)
    ours = fastavg.AveragedModel(model, use_buffers=True, average=fastavg.EMA(
        beta, warmup="power", start=after + 1, every=every, inv_gamma=gamma / every, power=power, min_decay=minimum))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(1, 16):
        _train_step(model, opt, t)
        ours.update_parameters(model)
        theirs.update()
        if t >= after + 1:  # before, ema-pytorch copies the model only every `every` steps
            _assert_modules_close(ours, type("M", (), {"module": theirs.ema_model})())


# --- attach, save/load, devices, errors ----------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw_fused", "sgd", "lion"])
def test_attach_updates_after_every_step_of_any_optimizer(optimizer):
    model = _model()
    opt = {"adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
           "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
           "lion": lambda p: Lion(p, lr=0.01)}[optimizer](model.parameters())
    ours = fastavg.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    handle = ours.attach(opt)
    for step in range(4):
        _train_step(model, opt, step)
        theirs.update_parameters(model)
    _assert_modules_close(ours, theirs)
    handle.remove()
    _train_step(model, opt, 5)
    assert int(ours.n_averaged) == 4


def test_attached_optimizer_cannot_step_inside_the_swap():
    """The step would run on the averaged weights, which the block restores over: refused before it changes anything."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    ema = fastavg.AveragedModel(model, average=fastavg.EMA(0.9))
    with ema.attach(opt):
        _train_step(model, opt, 0)
        before = copy.deepcopy(opt.state_dict())
        with ema.swap_average(model):
            model(torch.randn(3, 6)).sum().backward()
            with pytest.raises(RuntimeError, match="optimizer.step\\(\\) was called inside"):
                opt.step()
    after = opt.state_dict()
    assert after["state"][0]["step"] == before["state"][0]["step"]
    assert torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
    assert int(ema.n_averaged) == 1
    _train_step(model, opt, 1)
    assert int(ema.n_averaged) == 1, "the handle was removed on leaving the with block"


def test_state_dict_round_trip_keeps_the_fp32_averages_and_loads_torch_state_dicts():
    model = _model(torch.bfloat16)
    average = fastavg.EMA((0.9, 0.99), start=1)
    ours = fastavg.AveragedModel(model, average=average, use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        _train_step(model, opt, step)
        ours.update_parameters(model)
    saved = ours.state_dict()
    assert "fastavg_state" in saved  # bf16 .module cannot hold the fp32 averages
    loaded = fastavg.AveragedModel(_model(torch.bfloat16, seed=5), average=fastavg.EMA((0.9, 0.99), start=1),
                                   use_buffers=True)
    loaded.load_state_dict(saved)
    assert int(loaded.n_averaged) == 3
    for k in range(2):
        for a, b in zip(loaded.averaged_parameters(k), ours.averaged_parameters(k)):
            assert torch.equal(a, b)
    _train_step(model, opt, 4)
    ours.update_parameters(model)
    loaded.update_parameters(model)
    for a, b in zip(loaded.averaged_parameters(1), ours.averaged_parameters(1)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="saved with average"):
        fastavg.AveragedModel(_model(torch.bfloat16), average=fastavg.EMA(0.5), use_buffers=True).load_state_dict(saved)

    # An fp32 EMA's state dict is torch's, both ways.
    model = _model()
    ours = fastavg.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    theirs = AveragedModel(_model(seed=3), multi_avg_fn=get_ema_multi_avg_fn(0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        _train_step(model, opt, step)
        ours.update_parameters(model)
    theirs.load_state_dict(ours.state_dict())
    back = fastavg.AveragedModel(_model(seed=4), multi_avg_fn=get_ema_multi_avg_fn(0.9))
    back.load_state_dict(theirs.state_dict())
    for step in range(3, 5):
        _train_step(model, opt, step)
        for averaged in (ours, theirs, back):
            averaged.update_parameters(model)
    _assert_modules_close(back, theirs)
    _assert_modules_close(ours, theirs)


def test_cpu_device_for_a_cpu_model_is_the_same_average():
    model = _model()
    offloaded = fastavg.AveragedModel(model, device="cpu", average=fastavg.EMA(0.9))
    plain = fastavg.AveragedModel(model, average=fastavg.EMA(0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        _train_step(model, opt, step)
        offloaded.update_parameters(model)
        plain.update_parameters(model)
    for a, b in zip(offloaded.averaged_parameters(), plain.averaged_parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: averages in pinned host memory")
def test_cpu_offload_of_a_gpu_model_overlaps_and_matches():
    model = _model().cuda()
    offloaded = fastavg.AveragedModel(model, device="cpu", multi_avg_fn=get_ema_multi_avg_fn(0.9))
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        x = torch.randn(16, 6, device="cuda")
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        offloaded.update_parameters(model)
        theirs.update_parameters(model)
    for a, b in zip(offloaded.averaged_parameters(), theirs.module.parameters()):
        assert a.device.type == "cpu"
        assert_close(a, b.cpu(), torch.float32)


@pytest.mark.parametrize("name", ["power_ema", "bema"])
def test_power_ema_and_bema_equal_the_optimizers_averages(name, tmp_path):
    """The same averager on AveragedModel and on the reference optimizer (tested against the papers' rules in
    test_power_ema.py and test_bema.py), over the same trajectory; PowerEMA's snapshots are written too."""
    def make(directory):
        if name == "power_ema":
            return fastavg.PowerEMA((0.05, 0.2), snapshot_every=3, snapshot_dir=tmp_path / directory)
        return fastavg.BEMA(update_freq=2, update_after=1, lag=3)

    model, twin = _model(), _model()
    ours = fastavg.AveragedModel(model, average=make("ours"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    spec = fastavg.reference.SGD(twin.parameters(), lr=0.05, momentum=0.9, average=make("spec"))
    for t in range(1, 8):
        _train_step(model, opt, t)
        _train_step(twin, spec, t)
        ours.update_parameters(model)
    for k in range(ours.average.num_outputs):
        for a, b in zip(ours.averaged_parameters(k), spec.averaged_parameters(k)):
            assert_close(a, b, torch.float32)
    for a, b in zip(ours.module.parameters(), spec.averaged_parameters(0)):
        assert_close(a, b, torch.float32)
    if name == "power_ema":
        ours.average.flush()
        assert len(list((tmp_path / "ours").iterdir())) == 2 * 2  # steps 3 and 6, two profiles


def test_bad_arguments_raise_before_anything_changes():
    model = _model()
    with pytest.raises(ValueError, match="avg_fn or multi_avg_fn"):
        fastavg.AveragedModel(model, avg_fn=get_ema_avg_fn(), multi_avg_fn=get_ema_multi_avg_fn())
    with pytest.raises(ValueError, match="not both"):
        fastavg.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(), average=fastavg.EMA())
    with pytest.raises(TypeError, match="average must be"):
        fastavg.AveragedModel(model, average=0.999)
    with pytest.raises(TypeError, match="use_buffers"):
        fastavg.AveragedModel(model, use_buffers="yes")
    with pytest.raises(ValueError, match="device="):
        fastavg.AveragedModel(model, device="meta", average=fastavg.SEMA(0.9, switch_every=2))
    ours = fastavg.AveragedModel(model, average=fastavg.EMA(0.9))
    before = [a.clone() for a in ours.averaged_parameters()]
    with pytest.raises(ValueError, match="model passed to update_parameters"):
        ours.update_parameters(_model(torch.float64))
    with pytest.raises(ValueError, match="parameters"):
        ours.update_parameters(torch.nn.Linear(2, 2))
    assert int(ours.n_averaged) == 0
    for a, b in zip(ours.averaged_parameters(), before):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ours.attach("adam")


@pytest.mark.parametrize("use_buffers", [False, True])
def test_swap_average_puts_the_average_into_the_model_and_restores_it(use_buffers):
    model = _model()
    ema = fastavg.AveragedModel(model, use_buffers=use_buffers, average=fastavg.EMA((0.9, 0.5)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema.attach(opt)
    for step in range(4):
        _train_step(model, opt, step)
    raw = {name: t.clone() for name, t in model.state_dict().items()}
    x = torch.randn(5, 6)
    ema.eval(), model.eval()
    with ema.swap_average(index=1) as swapped:
        assert swapped is model
        for p, average in zip(model.parameters(), ema.averaged_parameters(1)):
            assert torch.equal(p, average)
        with torch.no_grad():
            model[1].running_mean.add_(1.0)  # what update_bn inside the block does: undone on exit
    with ema.swap_average(model), torch.no_grad():
        assert torch.equal(model(x), ema(x))  # average 0 in the model, as in .module
        with pytest.raises(RuntimeError, match="swap_average"):
            ema.update_parameters(model)
        with pytest.raises(RuntimeError, match="swap_average"), ema.swap_average():
            pass
    with pytest.raises(ZeroDivisionError), ema.swap_average():
        raise ZeroDivisionError
    for name, t in model.state_dict().items():
        assert torch.equal(t, raw[name]), name
    with pytest.raises(TypeError, match="index="), ema.swap_average(1):
        pass
    with pytest.raises(IndexError, match="index"), ema.swap_average(index=2):
        pass
    with pytest.raises(ValueError, match="swap_average"), ema.swap_average(_model(torch.float64)):
        pass
    with pytest.warns(UserWarning, match="unfused"):
        unfused = fastavg.AveragedModel(model, avg_fn=lambda average, p, n: average)
    with pytest.raises(RuntimeError, match=r"\.module"), unfused.swap_average():
        pass


# --- the README's recipes with Lightning and the HF Trainer ----------------------------------------------
def test_lightning_callback_from_the_readme():
    lightning = pytest.importorskip("lightning")

    class FastEMA(lightning.Callback):  # as in the README
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def on_fit_start(self, trainer, pl_module):
            self.ema = fastavg.AveragedModel(pl_module, **self.kwargs)

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.ema.update_parameters(pl_module)

    class Oracle(lightning.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.ema = AveragedModel(pl_module, multi_avg_fn=get_ema_multi_avg_fn(0.9))

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.ema.update_parameters(pl_module)

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def training_step(self, batch, index):
            return self.net(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.randn(40, 6), batch_size=8)
    ours, oracle = FastEMA(multi_avg_fn=get_ema_multi_avg_fn(0.9)), Oracle()
    trainer = lightning.Trainer(max_steps=5, accelerator="cpu", callbacks=[ours, oracle], logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), data)
    assert int(ours.ema.n_averaged) == 5
    _assert_modules_close(ours.ema, oracle.ema)


def test_hf_trainer_callback_from_the_readme(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class FastEMA(transformers.TrainerCallback):  # as in the README
        def __init__(self, model, **kwargs):
            self.ema = fastavg.AveragedModel(model, **kwargs)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.ema.update_parameters(model)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 33), torch.nn.GELU(), torch.nn.Linear(33, 1))

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": (out.squeeze(-1) - labels).square().mean(), "logits": out}

    torch.manual_seed(0)
    model = Net()
    oracle = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))

    class Oracle(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            oracle.update_parameters(model)

    callback = FastEMA(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    data = [{"x": torch.randn(6), "labels": torch.randn(())} for _ in range(24)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=6,
                                          use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Oracle()]).train()
    assert int(callback.ema.n_averaged) == 4
    _assert_modules_close(callback.ema, oracle)


def test_benchmark_mode_writes_rows_for_every_implementation(capsys):
    from fastavg import bench

    bench.main(["--averaged-model", "--quick", "--layouts", "small", "--sizes", "20k", "--iters", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| EMA update")]
    assert {line.split("|")[2].strip() for line in rows} == {"small"}
    for name in ("fastavg.AveragedModel", "torch AveragedModel", "per-param lerp loop", "timm ModelEmaV3"):
        assert sum(f"| {name} |" in line for line in rows) == 1
    assert "vs torch AveragedModel" in out
