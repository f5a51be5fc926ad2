"""Buckets: parameters stay where they are, state in aligned flat buffers, torch's gradient semantics,
layouts that change after the optimizer is built, and the opt-in flat_params layout."""
import copy

import pytest
import torch

import fastavg
from fastavg.buffers import ALIGN_BYTES

from helpers import assert_close, make_params, set_grads


def _conv_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5))


def _train(model, opt, steps, x, zero_grad=lambda opt: opt.zero_grad()):
    for _ in range(steps):
        zero_grad(opt)
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_state_segments_are_aligned_and_padding_stays_zero(dtype):
    params = make_params("many", dtype)
    opt = fastavg.AdamW(params, lr=0.1, average=fastavg.EMA(0.9))
    (bucket,) = opt._buckets[0]
    for step in range(3):
        set_grads(params, step)
        opt.step()
    used = torch.zeros(bucket.numel, dtype=torch.bool)
    for i, (offset, p) in enumerate(zip(bucket.offsets, params)):
        used[offset:offset + p.numel()] = True
        for name in ("exp_avg", "exp_avg_sq", "average_0"):
            view = opt.state[p][name]
            assert (view.data_ptr() - bucket.buffers[name].data_ptr()) % ALIGN_BYTES == 0
            assert view.shape == p.shape and view.stride() == p.stride()
    for flat in bucket.buffers.values():
        assert not flat[~used].any()


def test_parameters_and_gradients_stay_where_they_are():
    model = _conv_model()
    x = torch.randn(2, 3, 6, 6)
    opt = fastavg.SGD(model.parameters(), lr=0.1, momentum=0.9, average=fastavg.EMA(0.9))
    storages = [(p.data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()]
    _train(model, opt, 2, x, zero_grad=lambda opt: opt.zero_grad(set_to_none=False))
    grads = [p.grad for p in model.parameters()]
    _train(model, opt, 2, x, zero_grad=lambda opt: opt.zero_grad(set_to_none=False))
    assert [(p.data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()] == storages
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert all(g.untyped_storage().nbytes() == g.numel() * g.element_size() for g in grads)


def test_zero_grad_is_torchs_default_included():
    model = _conv_model()
    opt = fastavg.AdamW(model.parameters())
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("make", [
    lambda ps: (fastavg.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1), torch.optim.SGD),
    lambda ps: (fastavg.AdamW(ps, lr=0.1, weight_decay=0.1), torch.optim.AdamW),
], ids=["sgd", "adamw"])
def test_frozen_layer_stays_put_like_torch(make):
    model = _conv_model()
    twin = copy.deepcopy(model)
    opt, torch_class = make(list(model.parameters()))
    ref = torch_class(twin.parameters(), **{k: v for k, v in opt.defaults.items() if k in ("lr", "momentum",
                                                                                            "weight_decay")})
    x = torch.randn(2, 3, 6, 6)
    _train(model, opt, 2, x)
    _train(twin, ref, 2, x)
    model[0].requires_grad_(False)
    twin[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    _train(model, opt, 5, x)
    _train(twin, ref, 5, x)
    assert torch.equal(model[0].weight.detach(), frozen)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), torch.float32)


class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)])

    def forward(self, x, head):
        return self.heads[head](torch.relu(self.body(x)))


@pytest.mark.parametrize("name, kwargs", [("AdamW", dict(lr=0.05, weight_decay=0.1)),
                                          ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.1))])
def test_heads_used_on_alternate_steps_match_torch(name, kwargs):
    torch.manual_seed(0)
    model = _TwoHeads()
    twin = copy.deepcopy(model)
    opt = getattr(fastavg, name)(model.parameters(), average=fastavg.EMA(0.9), **kwargs)
    ref = getattr(torch.optim, name)(twin.parameters(), **kwargs)
    x = torch.randn(5, 6)
    for step in range(8):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x, step % 2).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), torch.float32)
    assert float(opt.state[model.heads[0].weight]["step"]) == 4


def test_weights_loaded_after_construction_seed_the_average():
    model = _conv_model()
    pretrained = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    opt = fastavg.AdamW(model.parameters(), lr=0.01, average=fastavg.EMA(0.9, start=1))
    model.load_state_dict(pretrained)
    averaged = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    x = torch.randn(2, 3, 6, 6)
    for _ in range(10):
        _train(model, opt, 1, x)
        averaged.update_parameters(model)
    for ours, theirs in zip(opt.averaged_parameters(), averaged.module.parameters()):
        assert_close(ours, theirs.detach(), torch.float32)


def test_channels_last_set_after_construction_is_kept_with_its_state():
    model = _conv_model()
    twin = copy.deepcopy(model)
    opt = fastavg.AdamW(model.parameters(), lr=0.1, average=fastavg.EMA(0.5))
    ref = torch.optim.AdamW(twin.parameters(), lr=0.1)
    x = torch.randn(2, 3, 6, 6)
    _train(model, opt, 2, x)
    _train(twin, ref, 2, x)
    model.to(memory_format=torch.channels_last)
    twin.to(memory_format=torch.channels_last)
    _train(model, opt, 3, x.to(memory_format=torch.channels_last))
    _train(twin, ref, 3, x.to(memory_format=torch.channels_last))
    weight = model[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert opt.state[weight]["exp_avg"].stride() == weight.stride()
    assert opt.averaged_parameters()[0].stride() == weight.stride()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), torch.float32)
    assert_close(opt.state[weight]["exp_avg_sq"], ref.state[twin[0].weight]["exp_avg_sq"], torch.float32)


def test_gradient_laid_out_unlike_its_parameter_is_staged():
    p = torch.randn(6, 4, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt, ref = fastavg.SGD([p], lr=0.5, momentum=0.5), torch.optim.SGD([q], lr=0.5, momentum=0.5)
    for _ in range(2):
        grad = torch.randn(4, 6)
        p.grad, q.grad = grad.t(), grad.t().contiguous()
        opt.step()
        ref.step()
    assert_close(p.detach(), q.detach(), torch.float32)


def test_segment_table_is_cached_and_rebuilt_when_an_address_changes():
    params = make_params("many", torch.float32)[:20]
    opt = fastavg.AdamW(params, lr=0.1)
    (bucket,) = opt._buckets[0]
    set_grads(params, 0)
    opt.step()
    table = bucket._cache[0][1].table
    set_grads(params, 1)
    opt.step()
    assert bucket._cache[0][1].table is table
    reference = [p.detach().clone() for p in params]
    kept = params[3].grad
    params[3].grad = torch.ones_like(kept)
    opt.step()
    assert bucket._cache[0][1].table is not table
    assert not torch.equal(params[3].detach(), reference[3])


@pytest.mark.parametrize("change", ["dtype", "shape"])
def test_incompatible_change_raises_and_changes_nothing(change):
    params = make_params(7, torch.float32) + make_params(5, torch.float32, seed=1)
    opt = fastavg.AdamW(params, lr=0.1, average=fastavg.EMA(0.9))
    set_grads(params, 0)
    opt.step()
    other = params[0].detach().clone()
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    new = {"dtype": params[1].detach().double(), "shape": torch.zeros(3)}
    params[1].data = new[change]
    params[1].grad = None
    set_grads([params[0]], 1)
    with pytest.raises(RuntimeError, match="parameter 1 of param group 0 is now"):
        opt.step()
    assert torch.equal(params[0].detach(), other)
    for k, v in state.items():
        assert torch.equal(opt.state[params[0]][k], v)
    assert opt._average_step == 1


def test_buckets_split_by_dtype_and_group():
    a = make_params(7, torch.float32)
    b = make_params(9, torch.bfloat16)
    c = make_params(3, torch.float32)
    opt = fastavg.Adam([{"params": a + b}, {"params": c, "lr": 0.5}], lr=0.1)
    assert [[bucket.dtype for bucket in group] for group in opt._buckets] == [
        [torch.float32, torch.bfloat16], [torch.float32]
    ]


# --- flat_params=True -------------------------------------------------------------------------------
def test_flat_params_are_views_and_a_step_is_one_segment():
    model = _conv_model()
    opt = fastavg.SGD(model.parameters(), lr=0.1, momentum=0.9, flat_params=True)
    (bucket,) = opt._buckets[0]
    for i, p in enumerate(model.parameters()):
        assert p.data_ptr() == bucket.data.data_ptr() + bucket.offsets[i] * p.element_size()
    _train(model, opt, 3, torch.randn(2, 3, 6, 6), zero_grad=lambda opt: opt.zero_grad(set_to_none=False))
    for i, p in enumerate(model.parameters()):
        assert p.grad.data_ptr() == bucket.grad.data_ptr() + bucket.offsets[i] * p.element_size()
    ((_, launch),) = bucket._cache
    assert launch.flat is not None and launch.table.shape == (1, 4)


def test_flat_params_replaced_parameter_is_copied_back():
    params = make_params(7, torch.float32)
    opt = fastavg.SGD(params, lr=1.0, average=fastavg.EMA(0.5), flat_params=True)
    params[0].data = torch.zeros(7)
    params[0].grad = torch.ones(7)
    opt.step()
    assert torch.equal(params[0].detach(), -torch.ones(7))
    assert params[0].data_ptr() == opt._buckets[0][0].data.data_ptr()


def test_flat_params_must_be_a_bool():
    with pytest.raises(TypeError, match="flat_params"):
        fastavg.SGD(make_params(7, torch.float32), flat_params="yes")
