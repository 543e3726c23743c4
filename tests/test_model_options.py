"""The speed-run model options (QK-norm, ReLU^2 MLP, scaled embeddings): they change the function, keep the cached
and uncached paths equal, are refused on architectures that lack them, and block export instead of exporting wrong
weights."""
from __future__ import annotations

import pytest
import torch

from model import ModelConfig, build_model
from model.export import ExportError, export_gguf, export_hf

OPTIONS = [dict(qk_norm=True), dict(mlp="relu2"), dict(scale_embeddings=True)]


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**dict(arch="llama", vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, **overrides))


def make(**overrides):
    torch.manual_seed(0)
    return build_model(tiny(**overrides)).eval()


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: next(iter(o)))
def test_an_option_changes_the_function_and_cached_generation_still_matches(option):
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    base, model = make(), make(**option)
    assert not torch.allclose(base(idx, idx)[0], model(idx, idx)[0])
    prompt = idx[:, :4]
    cached = model.generate(prompt, 10, temperature=0.0, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 10, temperature=0.0, use_cache=False))


def test_relu2_has_two_matrices_of_4x_width():
    model = make(mlp="relu2")
    ffn = model.layers[0].feed_forward
    assert ffn.w1.weight.shape == (128, 32) and ffn.w2.weight.shape == (32, 128)
    x = torch.randn(3, 32)
    torch.testing.assert_close(ffn(x), ffn.w2(torch.relu(ffn.w1(x)) ** 2))


def test_qk_norm_makes_attention_logits_independent_of_the_projection_scale():
    model = make(qk_norm=True)
    idx = torch.randint(0, 64, (1, 8))
    before = model(idx, idx)[0]
    with torch.no_grad():
        w = model.layers[0].attention.wqkv.weight
        w[: 2 * 32] *= 7.0  # queries and keys ten times larger: normalised away
    torch.testing.assert_close(model(idx, idx)[0], before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: next(iter(o)))
def test_options_are_llama_only(option):
    with pytest.raises(ValueError, match="llama options"):
        ModelConfig(arch="gpt", vocab_size=64, **option)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: next(iter(o)))
def test_export_refuses_a_model_with_an_option_and_writes_nothing(option, tmp_path):
    model = make(**option)
    with pytest.raises(ExportError, match="stock Llama"):
        export_hf(model, tmp_path / "tokenizer", tmp_path / "hf")
    with pytest.raises(ExportError, match="stock Llama"):
        export_gguf(model, tmp_path / "tokenizer", tmp_path / "model.gguf")
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == []
