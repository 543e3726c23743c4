"""Small causal language models behind one interface: GPT, Llama and Mamba-2.

    cfg = ModelConfig(arch="llama", vocab_size=4096, n_layer=4, n_head=4, n_embd=256)
    model = build_model(cfg)
    logits, loss = model(idx, targets)                 # training
    out = model.generate(prompt, max_new_tokens=64)    # sampling, KV cache / recurrent state
    model = load_model("model.safetensors", "model_config.json")   # a trained model, as every reader loads it
    texts = generate_text(model, tokenizer, ["Once upon a time"])  # model/generation.py: prompt -> text

Every model also offers configure_optimizers(), num_params() and flops_per_token().

Importing this package does not import torch (`ModelConfig` is all the configuration schema needs, and a fully cached
pipeline run reads nothing else): the architectures load on first use.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ARCHS, ModelConfig, ModelSection

if TYPE_CHECKING:
    import torch.nn as nn

    from .gpt import GPT
    from .llama import Llama
    from .mamba2 import Mamba2

_CLASSES = {"gpt": "GPT", "llama": "Llama", "mamba2": "Mamba2"}  # arch -> its class, in model/<arch>.py

__all__ = ["ARCHS", "ModelConfig", "ModelSection", "GPT", "Llama", "Mamba2", "build_model", "load_model"]


def __getattr__(name: str) -> Any:  # PEP 562: `from model import GPT` imports torch only then
    arch = next((arch for arch, cls in _CLASSES.items() if cls == name), None)
    if arch is not None:
        return getattr(importlib.import_module(f".{arch}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch in _CLASSES:
        return __getattr__(_CLASSES[cfg.arch])(cfg)
    raise ValueError(f"unknown model arch {cfg.arch!r}: choose one of {', '.join(ARCHS)}")


def load_model(weights: Path | str, config: Path | str, device: str = "cpu") -> nn.Module:
    """A trained model from its safetensors weights and its `model_config.json`, in eval mode (no pickle involved)."""
    from safetensors.torch import load_model as load_weights

    model = build_model(ModelConfig.model_validate(json.loads(Path(config).read_text(encoding="utf-8"))))
    load_weights(model, str(weights), device=str(device))
    return model.to(device).eval()
