"""The seeds' presets: each builds its architecture at full size, trains a few steps and generates."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pipeline_config import load_config
from tasks.training.loop import train

SEEDS = ["mnemos-0.1", "alexandria", "mini-llm", "ys-71m", "mini-transformer"]
CHAR_VOCAB = 96  # what a character-level tokenizer learns from English prose


@pytest.mark.parametrize("preset", SEEDS)
def test_seed_preset_builds_trains_and_generates(preset, tmp_path):
    cfg = load_config(preset)
    vocab = CHAR_VOCAB if cfg.tokenizer.kind == "char" else cfg.tokenizer.vocab_size
    block = cfg.train.model.block_size
    tokens = np.random.default_rng(0).integers(0, vocab, 4 * block + 2).astype(np.uint16)
    quick = cfg.train.model_copy(
        update={"batch_size": 2, "max_steps": 2, "eval_interval": 2, "eval_batches": 1, "track_emissions": False,
                "warmup_steps": 1, "dtype": "float32"}
    )
    summary, model = train(quick, tokens, tokens, vocab, tmp_path, logging.getLogger("test"))
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    assert summary["model_config"]["arch"] == cfg.train.model.arch
    out = model.eval().generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, temperature=cfg.evaluate.temperature,
                                top_k=cfg.evaluate.top_k, top_p=cfg.evaluate.top_p)
    assert out.shape == (1, 7) and int(out.max()) < vocab


def test_alexandria_is_about_nine_million_parameters():
    from model import build_model
    from tasks.training.loop import model_config

    cfg = load_config("alexandria")
    params = build_model(model_config(cfg.train, cfg.tokenizer.vocab_size)).num_params(non_embedding=False)
    assert 8e6 < params < 10.5e6
