"""Muon: the Newton-Schulz step orthogonalises, fused projections are split per part, and a Muon run resumes from
its checkpoint to the same weights as an uninterrupted one (the optimizer state round-trips through safetensors)."""
from __future__ import annotations

import json
import logging
import shutil

import torch

from model import ModelConfig, build_model
from pipeline_config.schema import ModelSection
from tasks.training.loop import train
from tasks.training.muon import Muon, build_optimizer, orthogonalize
from tests.test_train import corpus_tokens, tiny_train_config, weights

LOG = logging.getLogger("test")


def test_newton_schulz_brings_every_singular_value_near_one():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48))
    v, _ = torch.linalg.qr(torch.randn(24, 24))
    g = u[:, :24] @ torch.diag(torch.logspace(-1, 1, 24)) @ v.T  # tall, singular values over two decades
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's band, not exactly 1 (by design: speed over precision)
    assert torch.linalg.svdvals(g).max() > 9


def llama_cfg(**changes):
    return tiny_train_config(model=ModelSection(arch="llama", n_layer=1, n_head=2, n_embd=32, block_size=16),
                             optimizer="muon", learning_rate=3e-3, muon_learning_rate=0.02, **changes)


def test_the_blocks_matrices_go_to_muon_and_the_rest_to_adamw():
    cfg = llama_cfg()
    model = build_model(ModelConfig(**cfg.model.model_dump(), vocab_size=64))
    opt = build_optimizer(model, cfg, "cpu")
    assert isinstance(opt, Muon)
    muon = {id(p): g for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in muon}
    assert names == {"layers.0.attention.wqkv.weight", "layers.0.attention.wo.weight",
                     "layers.0.feed_forward.w13.weight", "layers.0.feed_forward.w2.weight"}
    assert muon[id(model.layers[0].attention.wqkv.weight)]["split"] == [32, 32, 32]
    assert all(g["lr_scale"] == 0.02 / 3e-3 for g in opt.param_groups if g["use_muon"])


def test_a_muon_run_trains_and_resumes_to_the_same_weights(tmp_path):
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    summary, _ = train(llama_cfg(), corpus_tokens(), corpus_tokens(800), 64, clean, LOG)
    losses = [json.loads(line)["loss"] for line in (clean / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns
    # The same run, as if killed after step 20: only its step-20 checkpoint survives.
    shutil.copytree(clean, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000030")
    (resumed / "checkpoints" / "latest.json").write_text(json.dumps({"step": 20, "path": "step-00000020"}))
    summary, model = train(llama_cfg(), corpus_tokens(), corpus_tokens(800), 64, resumed, LOG)
    assert summary["resumed_from"] == 20
    a = weights(clean / "checkpoints" / "step-00000030" / "model.safetensors")
    b = weights(resumed / "checkpoints" / "step-00000030" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
