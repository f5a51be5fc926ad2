"""Saving and loading with the tools people train with: accelerate, safetensors, HF save_pretrained, torch.save.

Every weight, the optimizer state and the averages survive, at the size the tensors have. Each test
skips when its library is not installed (``pip install -e ".[test]"`` installs them).
"""
import copy
import os

import pytest
import torch

import fastavg

from helpers import assert_close


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 513), torch.nn.GELU(), torch.nn.Linear(513, 10),
                               torch.nn.LayerNorm(10))


def _train(model, opt, steps=3, backward=None):
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        loss = model(x).square().mean()
        (backward or torch.Tensor.backward)(loss)
        opt.step()


def _assert_state_dicts_equal(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_accelerate_save_model_and_state_keep_everything(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    safetensors_torch = pytest.importorskip("safetensors.torch")

    def build():
        accelerator = accelerate.Accelerator(cpu=True)
        model = _model()
        opt = fastavg.AdamW(model.parameters(), lr=0.01, average=fastavg.EMA((0.9, 0.99)))
        return accelerator, *accelerator.prepare(model, opt)

    accelerator, model, opt = build()
    _train(model, opt, backward=accelerator.backward)
    accelerator.save_model(model, tmp_path / "model")
    saved = safetensors_torch.load_file(tmp_path / "model" / "model.safetensors")
    _assert_state_dicts_equal(saved, model.state_dict())

    accelerator.save_state(tmp_path / "state")
    other_accelerator, other_model, other_opt = build()
    other_accelerator.load_state(tmp_path / "state")
    _assert_state_dicts_equal(other_model.state_dict(), model.state_dict())
    for k in range(2):
        for a, b in zip(other_opt.optimizer.averaged_parameters(k), opt.optimizer.averaged_parameters(k)):
            assert torch.equal(a, b)
    for p, q in zip(model.parameters(), other_model.parameters()):
        for key, value in opt.optimizer.state[p].items():
            assert torch.equal(other_opt.optimizer.state[q][key], value), key
    _train(model, opt, backward=accelerator.backward)
    _train(other_model, other_opt, backward=other_accelerator.backward)
    _assert_state_dicts_equal(other_model.state_dict(), model.state_dict())


def test_safetensors_save_and_load_model(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _model()
    opt = fastavg.SGD(model.parameters(), lr=0.1, momentum=0.9, average=fastavg.EMA(0.9))
    _train(model, opt)
    safetensors_torch.save_model(model, tmp_path / "m.safetensors")
    other = _model()
    safetensors_torch.load_model(other, tmp_path / "m.safetensors")
    _assert_state_dicts_equal(other.state_dict(), model.state_dict())
    with opt.swap_average():
        safetensors_torch.save_model(model, tmp_path / "ema.safetensors")
    averaged = safetensors_torch.load_file(tmp_path / "ema.safetensors")
    for (name, _), average in zip(model.named_parameters(), opt.averaged_parameters()):
        assert torch.equal(averaged[name], average)


def test_flat_params_share_storage_and_safetensors_refuses_it(tmp_path):
    """The documented price of flat_params=True: serializers see one shared storage (safetensors raises)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _model()
    fastavg.AdamW(model.parameters(), flat_params=True)
    with pytest.raises(RuntimeError):
        safetensors_torch.save_model(model, tmp_path / "m.safetensors")


def test_hf_save_pretrained_round_trip_with_tied_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    opt = fastavg.AdamW(model.parameters(), lr=0.01, average=fastavg.EMA(0.9))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "raw")
    with opt.swap_average():
        model.save_pretrained(tmp_path / "ema")
        expected_ema = copy.deepcopy(model.state_dict())
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "raw")
    _assert_state_dicts_equal(loaded.state_dict(), model.state_dict())
    loaded_ema = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ema")
    _assert_state_dicts_equal(loaded_ema.state_dict(), expected_ema)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_torch_save_of_a_part_is_the_size_of_the_part(tmp_path):
    model = _model()
    opt = fastavg.AdamW(model.parameters(), lr=0.01, average=fastavg.EMA(0.9))
    _train(model, opt)
    weight = model[2].weight
    for name, value in {"weight": weight, "grad": weight.grad, "submodule": model[2].state_dict(),
                        "average_copy": opt.averaged_parameters()[2].clone()}.items():
        torch.save(value, tmp_path / name)
        assert os.path.getsize(tmp_path / name) < weight.numel() * 4 + 4096, name
    torch.save(opt.state_dict(), tmp_path / "optimizer")
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert os.path.getsize(tmp_path / "optimizer") < state_bytes * 1.1 + 65536
    loaded = torch.load(tmp_path / "optimizer")
    other = _model()
    other_opt = fastavg.AdamW(other.parameters(), lr=0.01, average=fastavg.EMA(0.9))
    other.load_state_dict(model.state_dict())
    other_opt.load_state_dict(loaded)
    for a, b in zip(other_opt.averaged_parameters(), opt.averaged_parameters()):
        assert_close(a, b, torch.float32)
