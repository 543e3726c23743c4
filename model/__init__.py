"""Small causal language models behind one interface: GPT, Llama and Mamba-2.

    cfg = ModelConfig(arch="llama", vocab_size=4096, n_layer=4, n_head=4, n_embd=256)
    model = build_model(cfg)
    logits, loss = model(idx, targets)                 # training
    out = model.generate(prompt, max_new_tokens=64)    # sampling, KV cache / recurrent state
    model = load_model("model.safetensors", "model_config.json")   # a trained model, as every reader loads it
    texts = generate_text(model, tokenizer, ["Once upon a time"])  # model/generation.py: prompt -> text

Every model also offers configure_optimizers(), num_params() and flops_per_token().
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from .config import ARCHS, ModelConfig, ModelSection
from .gpt import GPT
from .llama import Llama
from .mamba2 import Mamba2

__all__ = ["ARCHS", "ModelConfig", "ModelSection", "GPT", "Llama", "Mamba2", "build_model", "load_model"]


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "gpt":
        return GPT(cfg)
    if cfg.arch == "llama":
        return Llama(cfg)
    if cfg.arch == "mamba2":
        return Mamba2(cfg)
    raise ValueError(f"unknown model arch {cfg.arch!r}: choose one of {', '.join(ARCHS)}")


def load_model(weights: Path | str, config: Path | str, device: str = "cpu") -> nn.Module:
    """A trained model from its safetensors weights and its `model_config.json`, in eval mode (no pickle involved)."""
    from safetensors.torch import load_model as load_weights

    model = build_model(ModelConfig.model_validate(json.loads(Path(config).read_text(encoding="utf-8"))))
    load_weights(model, str(weights), device=str(device))
    return model.to(device).eval()
