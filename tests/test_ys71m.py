"""The ys-71m preset at the seed's size: 59.9M parameters with its 13,183-entry table, 71.3M with 28,590 (within 1%)."""
from __future__ import annotations

import pytest
import torch

from model import build_model
from pipeline_config import load_config
from tasks.training.loop import model_config


@pytest.mark.parametrize("vocab_size,seed_params", [(13_183, 59.9e6), (28_590, 71.3e6)])
def test_ys71m_has_the_seeds_parameter_count(vocab_size, seed_params):
    cfg = load_config("ys-71m", [f"tokenizer.vocab_size={vocab_size}"])
    assert cfg.tokenizer.kind == "word" and cfg.train.model.n_embd == cfg.train.model.d_state == 368
    with torch.device("meta"):  # shapes only: no memory, no initialisation arithmetic
        model = build_model(model_config(cfg.train, cfg.tokenizer.vocab_size))
    assert model.num_params(non_embedding=False) == pytest.approx(seed_params, rel=0.01)
