"""Flat buffers: layout, views, torch's gradient semantics, relocated parameters."""
import pytest
import torch

import fastavg
from fastavg.buffers import ALIGN_BYTES

from helpers import assert_close, make_params, set_grads


def _model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_segments_are_aligned_views_and_padding_is_zero(dtype):
    params = make_params("many", dtype)
    values = [p.detach().clone() for p in params]
    opt = fastavg.AdamW(params, lr=0.1, average=fastavg.EMA(0.9))
    (bucket,) = opt._buckets[0]
    base = bucket.data.data_ptr()
    for p, v in zip(params, values):
        assert (p.data_ptr() - base) % ALIGN_BYTES == 0
        assert torch.equal(p.detach(), v)
    for step in range(3):
        set_grads(params, step)
        opt.step()
    used = torch.zeros(bucket.numel, dtype=torch.bool)
    for offset, p in zip(bucket.offsets, params):
        used[offset:offset + p.numel()] = True
    for flat in [bucket.data, bucket.grad, *bucket.buffers.values()]:
        assert not flat[~used].any()


def test_backward_accumulates_into_the_grad_buffer():
    model = _model()
    opt = fastavg.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    model(x).sum().backward()
    (bucket,) = opt._buckets[0]
    for p, view in zip(model.parameters(), bucket.grad_views):
        assert p.grad is view
    assert bucket.grad.abs().sum() > 0


def test_channels_last_strides_are_kept():
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    strides = conv.weight.stride()
    twin = torch.nn.Conv2d(3, 8, 3)
    twin.load_state_dict(conv.state_dict())
    opt = fastavg.AdamW(conv.parameters(), lr=0.1)
    ref = torch.optim.AdamW(twin.parameters(), lr=0.1)
    assert conv.weight.stride() == strides
    x = torch.randn(2, 3, 5, 5)
    for _ in range(3):
        for model, o in ((conv, opt), (twin, ref)):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
    assert conv.weight.stride() == strides
    assert_close(conv.weight.detach(), twin.weight.detach(), torch.float32)


def test_none_grad_leaves_parameter_and_state_untouched_like_torch():
    ours, theirs = make_params("many", torch.float32), make_params("many", torch.float32)
    opt = fastavg.AdamW(ours, lr=0.01)
    ref = torch.optim.AdamW(theirs, lr=0.01)
    skip = lambda i, step: i % 5 == 0 and step >= 1  # noqa: E731
    for step in range(4):
        set_grads(ours, step, skip)
        set_grads(theirs, step, skip)
        if step == 1:
            frozen = {i: (ours[i].detach().clone(), opt.state[ours[i]]["exp_avg"].clone()) for i in range(0, 300, 5)}
        opt.step()
        ref.step()
    for i, (value, exp_avg) in frozen.items():
        assert torch.equal(ours[i].detach(), value)
        assert torch.equal(opt.state[ours[i]]["exp_avg"], exp_avg)
        assert float(opt.state[ours[i]]["step"]) == 1
    for p, q in zip(ours, theirs):
        assert_close(p.detach(), q.detach(), torch.float32)


def test_replaced_grad_is_used_and_the_view_restored():
    params = make_params(7, torch.float32)
    opt = fastavg.SGD(params, lr=1.0)
    before = params[0].detach().clone()
    params[0].grad = torch.ones(7)
    opt.step()
    assert torch.equal(params[0].detach(), before - 1)
    assert params[0].grad is opt._buckets[0][0].grad_views[0]
    opt.zero_grad(set_to_none=True)
    assert params[0].grad is None
    params[0].grad = torch.full((7,), 2.0)
    opt.step()
    assert torch.equal(params[0].detach(), before - 3)


def test_replaced_parameter_with_same_layout_is_copied_back():
    params = make_params(7, torch.float32)
    opt = fastavg.SGD(params, lr=1.0, average=fastavg.EMA(0.5))
    params[0].data = torch.zeros(7)
    params[0].grad = torch.ones(7)
    opt.step()
    assert torch.equal(params[0].detach(), -torch.ones(7))
    assert params[0].data_ptr() == opt._buckets[0][0].data.data_ptr()


@pytest.mark.parametrize("change", ["dtype", "shape"])
def test_incompatible_relocation_raises_and_changes_nothing(change):
    params = make_params(7, torch.float32) + make_params(5, torch.float32, seed=1)
    opt = fastavg.AdamW(params, lr=0.1, average=fastavg.EMA(0.9))
    set_grads(params, 0)
    opt.step()
    other = params[0].detach().clone()
    snapshot = opt._buckets[0][0].data.clone(), opt._buckets[0][0].buffers["exp_avg"].clone()
    params[1].data = params[1].detach().double() if change == "dtype" else torch.zeros(3)
    set_grads([params[0]], 1)
    with pytest.raises(RuntimeError, match="parameter 1 of param group 0 changed"):
        opt.step()
    assert torch.equal(params[0].detach(), other)
    assert torch.equal(opt._buckets[0][0].data, snapshot[0])
    assert torch.equal(opt._buckets[0][0].buffers["exp_avg"], snapshot[1])
    assert opt._average_step == 1


def test_buckets_split_by_dtype_and_group():
    a = make_params(7, torch.float32)
    b = make_params(9, torch.bfloat16)
    c = make_params(3, torch.float32)
    opt = fastavg.Adam([{"params": a + b}, {"params": c, "lr": 0.5}], lr=0.1)
    assert [[bucket.dtype for bucket in group] for group in opt._buckets] == [
        [torch.float32, torch.bfloat16], [torch.float32]
    ]
