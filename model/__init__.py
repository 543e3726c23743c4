"""Small causal language models behind one interface: GPT, Llama and Mamba-2.

    cfg = ModelConfig(arch="llama", vocab_size=4096, n_layer=4, n_head=4, n_embd=256)
    model = build_model(cfg)
    logits, loss = model(idx, targets)                 # training
    out = model.generate(prompt, max_new_tokens=64)    # sampling, KV cache / recurrent state

Every model also offers configure_optimizers(), num_params() and flops_per_token().
"""

import torch.nn as nn

from .config import ARCHS, ModelConfig
from .gpt import GPT
from .llama import Llama
from .mamba2 import Mamba2

__all__ = ["ARCHS", "ModelConfig", "GPT", "Llama", "Mamba2", "build_model"]


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "gpt":
        return GPT(cfg)
    if cfg.arch == "llama":
        return Llama(cfg)
    if cfg.arch == "mamba2":
        return Mamba2(cfg)
    raise ValueError(f"unknown model arch {cfg.arch!r}: choose one of {', '.join(ARCHS)}")
