"""``capturable=True``: Adam and AdamW keep the step counts, the averaging step, lr and the averaging weights on
the parameters' device, so that a step reads nothing back to the host and a CUDA graph can replay it.

Here (any machine): the same numbers as ``capturable=False`` for every averager a graph can replay, with a tensor lr
changed by a scheduler, under GradScaler with skipped steps, through state-dict round trips, and on torch's own
capturable optimizer inputs; a step after warm-up makes no host read of a device value (every read of a tensor's
value from Python goes through ``aten._local_scalar_dense``, which a dispatch mode refuses; the same check catches
``capturable=False``, which reads lr and found_inf on the host); the averagers and arguments it cannot replay are
refused at construction. With a GPU: a whole training step (forward, backward, ``opt.step()``) captured in a CUDA
graph and replayed with new lr values equals the same steps run eagerly.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastavg
from fastavg import _backends, _segments

from helpers import tolerance

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's optimizer test database needs expecttest")


def _backend(name):
    backend, reason = _backends._status()[name]
    return pytest.param(name, marks=pytest.mark.skipif(backend is None, reason=reason or ""))


KERNEL_BACKENDS = [_backend("cpu"), _backend("triton")]
AVERAGERS = {
    "none": lambda: None,
    "ema": lambda: fastavg.EMA(0.9),
    "ema2-every3-power": lambda: fastavg.EMA((0.8, 0.95), warmup="power", start=2, every=3, min_decay=0.1),
    "ema-tf": lambda: fastavg.EMA(0.99, warmup="tf"),
    "belay": lambda: fastavg.BELAY(0.9, reaction=0.5, inertia=0.3),
    "swa-every2": lambda: fastavg.SWA(start=1, every=2),
    "power-ema": lambda: fastavg.PowerEMA((0.05, 0.15)),
}
STEPS = 9


class _NoHostReads(TorchDispatchMode):
    """Refuses every read of a tensor's value into Python (``item()``, ``float()``, ``bool()``, ``int()``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                    torch.ops.aten.equal.default):
            raise AssertionError(f"host read of a tensor value: {func}")
        return func(*args, **(kwargs or {}))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)


def _grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _assert_same(a, b, opt_a, opt_b, dtype, exact=False):
    tol = dict(rtol=0, atol=0) if exact else tolerance(dtype)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.float(), q.float(), **tol)
    for p, q in zip(a.parameters(), b.parameters()):
        for name, value in opt_b.state[q].items():
            torch.testing.assert_close(opt_a.state[p][name].float().cpu(), value.float().cpu(), **tol)
    if getattr(opt_b, "average", None) is not None:
        for x, y in zip(opt_a.averaged_parameters(), opt_b.averaged_parameters()):
            torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("averager", AVERAGERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_numbers_as_host_counts(backend, averager, dtype):
    """Tensor lr through a scheduler, a state-dict round trip in the middle: bit-identical to capturable=False."""
    a, b = _model(dtype), _model(dtype)
    opt_a = fastavg.AdamW(a.parameters(), lr=torch.tensor(0.02), weight_decay=0.1, average=AVERAGERS[averager](),
                          backend=backend, capturable=True)
    opt_b = fastavg.AdamW(b.parameters(), lr=0.02, weight_decay=0.1, average=AVERAGERS[averager](), backend=backend)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (opt_a, opt_b)]
    for step in range(STEPS):
        _grads(a, step)
        _grads(b, step)
        opt_a.step()
        opt_b.step()
        for scheduler in schedulers:
            scheduler.step()
        if step == 4:
            saved = copy.deepcopy(opt_a.state_dict())
            assert saved["fastavg"]["step"] == 5 and float(saved["state"][0]["step"]) == 5
            opt_a.load_state_dict(saved)
    assert isinstance(opt_a.param_groups[0]["lr"], torch.Tensor)
    assert opt_a.param_groups[0]["lr"] == torch.tensor(opt_b.param_groups[0]["lr"])
    _assert_same(a, b, opt_a, opt_b, dtype, exact=True)
    assert opt_a.state_dict()["fastavg"]["step"] == STEPS


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_step_makes_no_host_read(backend):
    """After warm-up, steps with a tensor lr (changed between steps) and GradScaler's tensors read no value back;
    the detector catches capturable=False, which reads them."""
    def run(capturable):
        model = _model()
        opt = fastavg.AdamW(model.parameters(), lr=torch.tensor(0.01), average=fastavg.EMA(0.99, warmup="power"),
                            backend=backend, capturable=capturable)
        _grads(model, 0)
        opt.step()  # warm-up: seeds the averages, builds the launches
        for step in range(1, 4):
            _grads(model, step)
            opt.param_groups[0]["lr"].fill_(0.01 / step)
            opt.grad_scale, opt.found_inf = torch.tensor([4.0]), torch.tensor([float(step == 2)])
            with _NoHostReads():
                opt.step()
            del opt.grad_scale, opt.found_inf
        return opt

    opt = run(capturable=True)
    assert opt.state_dict()["fastavg"]["step"] == 3  # four steps, one skipped
    assert float(opt.state[opt.param_groups[0]["params"][0]]["step"]) == 3
    with pytest.raises(AssertionError, match="host read"):
        run(capturable=False)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("averager", ["ema", "belay", "power-ema"])
def test_grad_scaler_skips_on_the_device(backend, averager):
    """Under GradScaler with infs on some steps: the same numbers and counts as capturable=False."""
    a, b = _model(), _model()
    opts = [fastavg.AdamW(m.parameters(), lr=0.01, average=AVERAGERS[averager](), backend=backend,
                          capturable=capturable) for m, capturable in ((a, True), (b, False))]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in opts]
    g = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        x = torch.randn(5, 6, generator=g)
        for model, opt, scaler in zip((a, b), opts, scalers):
            scaler.scale(model(x).square().mean()).backward()
            if step in (2, 3, 6):
                next(model.parameters()).grad.view(-1)[1] = float("inf")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    _assert_same(a, b, *opts, torch.float32, exact=True)
    assert opts[0].state_dict()["fastavg"]["step"] == opts[1].state_dict()["fastavg"]["step"] == STEPS - 3


def _torch_capturable_inputs():
    """torch's Adam/AdamW inputs with capturable=True (torch lists them for CUDA; fastavg runs them anywhere)."""
    cases = []
    for info in common_optimizers.optim_db:
        name = info.optim_cls.__name__
        if name in ("Adam", "AdamW"):
            for i in info.optim_inputs_func(device="cuda"):
                if i.kwargs.get("capturable"):
                    cases.append(pytest.param(name, i.kwargs, id=f"{name}-{i.desc}"))
    return cases


@pytest.mark.parametrize("name, kwargs", _torch_capturable_inputs())
def test_torch_capturable_inputs(name, kwargs):
    """torch's own capturable inputs (tensor lr, tensor betas, amsgrad) against torch.optim without capturable
    (torch's capturable path needs a GPU), every parameter and state tensor after every step."""
    ours_model, torch_model = _model(), _model()
    ours = getattr(fastavg, name)(ours_model.parameters(), **copy.deepcopy(kwargs))
    torch_kwargs = {k: v for k, v in copy.deepcopy(kwargs).items() if k != "capturable"}
    theirs = getattr(torch.optim, name)(torch_model.parameters(), **torch_kwargs)
    for step in range(STEPS):
        _grads(ours_model, step)
        _grads(torch_model, step)
        ours.step()
        theirs.step()
        _assert_same(ours_model, torch_model, ours, theirs, torch.float32)


@pytest.mark.parametrize("averager", [
    fastavg.LAWA(k=3, every=2), fastavg.SEMA(0.9, switch_every=4), fastavg.BEMA(update_freq=3),
    fastavg.BELAY(0.9, start=3), fastavg.BELAY(0.9, every=2)], ids=repr)
def test_refuses_averagers_a_graph_cannot_replay(averager):
    with pytest.raises(NotImplementedError, match="capturable=True is not supported"):
        fastavg.AdamW(_model().parameters(), average=averager, capturable=True)


def test_refuses_power_ema_snapshots(tmp_path):
    with pytest.raises(NotImplementedError, match="snapshot_every"):
        fastavg.AdamW(_model().parameters(), capturable=True,
                      average=fastavg.PowerEMA(0.1, snapshot_every=2, snapshot_dir=tmp_path))


def test_refuses_mixed_groups_and_device_betas():
    model = _model()
    with pytest.raises(ValueError, match="every group must agree"):
        fastavg.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "capturable": False}],
                      capturable=True)
    meta_betas = (torch.tensor(0.9, device="meta"), torch.tensor(0.99, device="meta"))
    with pytest.raises(ValueError, match="betas on a device with capturable=True"):
        fastavg.Adam(model.parameters(), betas=meta_betas, capturable=True)


def test_sgd_has_no_capturable_keyword():
    """As torch.optim.SGD."""
    with pytest.raises(TypeError, match=r"^SGD\.__init__\(\) got an unexpected keyword argument 'capturable'"):
        fastavg.SGD(_model().parameters(), capturable=True)


@pytest.fixture
def pretend_capturing(monkeypatch):
    """The CPU steps as if inside a CUDA graph capture: the refusals below are the GPU's, before anything changes."""
    monkeypatch.setattr(fastavg.optim._FusedOptimizer, "_on_gpu", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def _refused(opt, model, match):
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_capture_refusals(backend, pretend_capturing):
    model = _model()
    _grads(model, 0)
    _refused(fastavg.AdamW(model.parameters(), average=fastavg.EMA(0.9), backend=backend),
             model, "cannot be captured in a CUDA graph with capturable=False")
    _refused(fastavg.AdamW(model.parameters(), backend=backend, capturable=True), model, "warm-up steps eagerly")
    opt = fastavg.AdamW(model.parameters(), backend=backend, capturable=True, lr=torch.tensor(0.01))
    with pytest.MonkeyPatch.context() as eager:
        eager.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        opt.step()
    model[0].bias.grad = None
    _refused(opt, model, "some parameters have a gradient and others not")
    _grads(model, 1)
    opt.step()  # with every gradient there the step goes ahead (on the CPU)
    assert opt.state_dict()["fastavg"]["step"] == 2
    number_lr = fastavg.AdamW(model.parameters(), backend=backend, capturable=True, lr=0.01)
    with pytest.MonkeyPatch.context() as eager:
        eager.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        number_lr.step()
    with pytest.warns(UserWarning, match="captured as a constant"):
        number_lr.step()


def test_reference_backend_capture_refused(pretend_capturing):
    model = _model(torch.float64)
    _grads(model, 0)
    opt = fastavg.AdamW(model.parameters(), capturable=True, lr=torch.tensor(0.01, dtype=torch.float64))
    with pytest.MonkeyPatch.context() as eager:
        eager.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        opt.step()
    _refused(opt, model, "reference backend")


def test_captured_table_is_the_table():
    rows = _segments.rows(torch.randn(3 * _segments.ROW_NUMEL + 5), None, 7)
    pinned = torch.empty((len(rows) + 2, len(_segments.COLUMNS)), dtype=torch.int64)
    table = _segments.captured_table(rows, pinned, torch.device("cpu"))
    assert torch.equal(table, _segments.table(rows, torch.device("cpu")))
    assert any(kept is pinned for kept in _segments._CAPTURED_TABLE_SOURCES), "kept for the graph's replays"


# --- CUDA graphs (GPU only) ----------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _cuda_run(averager, capture, steps=8, warmup=3, new_grads=False):
    """``steps`` training steps with lr 0.01·0.8^step written into a device lr tensor; with ``capture`` the steps
    after ``warmup`` replay one captured graph of forward, backward and opt.step(). ``new_grads``: the gradients are
    set to None before the capture (torch's whole-network recipe), so the captured backward makes new ones."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
    lr = torch.tensor(0.01, device="cuda")
    opt = fastavg.AdamW(model.parameters(), lr=lr, average=averager, capturable=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = [torch.randn(32, 64, device="cuda", generator=g) for _ in range(steps)]
    static_x = torch.zeros(32, 64, device="cuda")

    def train_step():
        opt.zero_grad(set_to_none=False)
        model(static_x).square().mean().backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(warmup):
            lr.fill_(0.01 * 0.8**step)
            static_x.copy_(inputs[step])
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = None
    if capture:
        if new_grads:
            opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            train_step()
    for step in range(warmup, steps):
        lr.fill_(0.01 * 0.8**step)
        static_x.copy_(inputs[step])
        graph.replay() if capture else train_step()
    torch.cuda.synchronize()
    return model, opt


@cuda
@pytest.mark.parametrize("new_grads", [False, True], ids=["same-grads", "grads-made-in-capture"])
@pytest.mark.parametrize("averager", ["none", "ema", "ema2-every3-power", "belay", "swa-every2", "power-ema"])
def test_cuda_graph_replays_the_step(averager, new_grads):
    captured, opt_captured = _cuda_run(AVERAGERS[averager](), capture=True, new_grads=new_grads)
    eager, opt_eager = _cuda_run(AVERAGERS[averager](), capture=False)
    _assert_same(captured, eager, opt_captured, opt_eager, torch.float32, exact=True)
    assert opt_captured.state_dict()["fastavg"]["step"] == 8
    assert float(opt_captured.state[next(captured.parameters())]["step"]) == 8


@cuda
def test_cuda_graph_capture_refusals():
    model = torch.nn.Linear(8, 8).cuda()
    x = torch.randn(4, 8, device="cuda")
    for opt, match in ((fastavg.AdamW(model.parameters(), average=fastavg.EMA(0.9)), "capturable=True"),
                       (fastavg.AdamW(model.parameters(), average=fastavg.EMA(0.9), capturable=True), "warm-up")):
        model(x).sum().backward()
        torch.cuda.synchronize()
        with pytest.raises(RuntimeError, match=match), torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
