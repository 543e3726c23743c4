"""Attention maps: the opt-in explicit softmax equals what SDPA computes, the normal path is untouched, one PNG per
layer and head from `scriptorium attention`, a clear error for mamba2, and evaluate's representative map."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flows.cli import main
from model import ModelConfig, build_model
from model.attention_maps import AttentionMapError, attention_modules, attention_probabilities, attention_probs
from model.tokenizer import load_tokenizer
from pipeline_config.schema import EvaluateConfig, TokenizerConfig
from tasks.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=64, headdim=16, chunk_size=16)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    lines = (REPO / "data" / "tinystories-sample" / "stories.jsonl").read_text().splitlines()[:40]
    build_tokenizer(TokenizerConfig(kind="char"), [{"text": json.loads(x)["text"], "language": "en"} for x in lines],
                    root, logging.getLogger("test"))
    return root


def _model_dir(root: Path, arch: str, vocab_size: int, **changes) -> Path:
    from safetensors.torch import save_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=vocab_size, **{**TINY, **changes})
    folder = root / arch
    folder.mkdir()
    save_model(build_model(cfg), str(folder / "model.safetensors"))
    (folder / "model_config.json").write_text(cfg.model_dump_json())
    return folder


@pytest.mark.parametrize("kv_heads,tq", [(4, 7), (2, 7), (1, 3)])
def test_the_explicit_softmax_is_what_sdpa_computes(kv_heads, tq):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, tq, 8), torch.randn(2, kv_heads, 7, 8), torch.randn(2, kv_heads, 7, 8)
    probs = attention_probs(q, k)  # tq < 7: the queries are the last positions (a KV cache's case)
    mask = torch.ones(tq, 7, dtype=torch.bool).tril(diagonal=7 - tq)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != 4)
    got = probs @ v.repeat_interleave(4 // kv_heads, dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,changes", [("gpt", {}), ("llama", {"n_kv_head": 2})])
def test_maps_are_causal_distributions_and_leave_the_normal_path_alone(arch, changes):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, vocab_size=50, **{**TINY, **changes})).eval()
    ids = torch.randint(0, 50, (1, 9))
    before, _ = model(ids, ids)
    maps = attention_probabilities(model, ids[0].tolist())
    assert len(maps) == 2 and all(m.shape == (4, 9, 9) for m in maps)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(4, 9))
        assert torch.all(m.triu(diagonal=1) == 0)  # no query sees a later key
    assert not any(m.keep_probs for m in attention_modules(model)) and all(m.probs is None
                                                                           for m in attention_modules(model))
    after, _ = model(ids, ids)
    assert torch.equal(before, after)


def test_cli_writes_one_map_per_layer_and_head(tmp_path, tokenizer_dir, capsys):
    vocab = load_tokenizer(tokenizer_dir).vocab_size
    folder = _model_dir(tmp_path, "llama", vocab)
    assert main(["attention", "--model", str(folder), "--tokenizer", str(tokenizer_dir), "--prompt", "the dog ran",
                 "--out", str(tmp_path / "maps")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert pngs == [f"layer{layer:02d}_head{h:02d}.png" for layer in range(2) for h in range(4)]
    assert all((tmp_path / "maps" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert "8 attention maps (2 layers x 4 heads) over " in capsys.readouterr().out
    # a prompt past the context is drawn over its first block_size tokens, and the command says so
    assert main(["attention", "--model", str(folder), "--tokenizer", str(tokenizer_dir),
                 "--prompt", "the dog ran " * 40, "--out", str(tmp_path / "long")]) == 0
    said = capsys.readouterr()
    assert "over 64 tokens" in said.out and "the model's context is 64, so only the first 64 are drawn" in said.err


def test_mamba2_is_a_clear_error(tmp_path, tokenizer_dir, capsys):
    folder = _model_dir(tmp_path, "mamba2", load_tokenizer(tokenizer_dir).vocab_size)
    assert main(["attention", "--model", str(folder), "--tokenizer", str(tokenizer_dir), "--out",
                 str(tmp_path / "maps")]) == 1
    err = capsys.readouterr().err
    assert "mamba2 has no attention" in err and "for the gpt and llama architectures" in err
    with pytest.raises(AttentionMapError):
        attention_modules(build_model(ModelConfig(arch="mamba2", vocab_size=10, **TINY)))


def test_evaluate_draws_the_representative_map_for_attention_models_only(tmp_path, tokenizer_dir):
    from model import load_model
    from tasks.evaluate import ATTENTION_MAP, _attention_map

    tok = load_tokenizer(tokenizer_dir)
    for arch, drawn in (("gpt", True), ("mamba2", False)):
        folder = _model_dir(tmp_path, arch, tok.vocab_size)
        model = load_model(folder / "model.safetensors", folder / "model_config.json")
        assert _attention_map(model, tok, EvaluateConfig(), folder) is drawn
        assert (folder / ATTENTION_MAP).is_file() is drawn
