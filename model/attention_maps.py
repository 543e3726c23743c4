"""Attention maps: each head's attention probabilities over a prompt, drawn as one heat map per layer and head.

The models attend through `F.scaled_dot_product_attention`, whose fused kernels never materialise the probabilities.
So the attention modules of gpt and llama carry an opt-in flag, `keep_probs` (a class attribute, False): only while a
map is being drawn does each one also compute the explicit softmax(q k^T / sqrt(d)) under the same causal and padding
mask and keep it as `probs`. The normal path pays one attribute check per layer. Mamba-2 has no attention matrix (its
mixing is a scan), so asking for its maps is an error that says so.

    maps = attention_probabilities(model, ids)               # per layer: (heads, T, T)
    paths = write_attention_maps(model, tokenizer, "Once upon a time", Path("maps"))
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


class AttentionMapError(ValueError):
    """Attention maps asked of a model without attention (mamba2); the message names the architectures that have it."""


def attention_probs(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) for q (B, H, Tq, D) and k (B, Hkv, Tk, D), the queries being the last Tq of the Tk
    positions, masked causally and by `attn_mask` (bool, True = may attend) as `layers.causal_attention` masks them.
    Key heads are repeated for grouped-query attention. Returns (B, H, Tq, Tk) in fp32."""
    Tq, Tk = q.size(-2), k.size(-2)
    if k.size(1) != q.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    if attn_mask is not None:
        allowed = allowed & attn_mask
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules in layer order; AttentionMapError for a model that has none."""
    modules = [m for m in model.modules() if hasattr(type(m), "keep_probs")]
    if not modules:
        arch = getattr(getattr(model, "config", None), "arch", type(model).__name__)
        raise AttentionMapError(f"{arch} has no attention to draw (its token mixing is not an attention matrix); "
                                "attention maps are for the gpt and llama architectures")
    return modules


@torch.no_grad()
def attention_probabilities(model: nn.Module, ids: list[int]) -> list[torch.Tensor]:
    """Each layer's attention probabilities (heads, T, T) over one sequence of token ids."""
    modules = attention_modules(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for module in modules:
            module.keep_probs = True
        model(torch.tensor([ids], dtype=torch.long, device=device))
        return [module.probs[0].cpu() for module in modules]
    finally:
        for module in modules:
            del module.keep_probs  # back to the class's False
            module.probs = None
        model.train(was_training)


def prompt_tokens(tokenizer: Any, prompt: str, block_size: int) -> tuple[list[int], list[str]]:
    """The prompt's ids as the model sees them (<s> first, at most block_size) and a readable label per token."""
    ids = [tokenizer.bos_id, *tokenizer.encode([prompt])[0]][:block_size]
    labels = ["<s>" if i == tokenizer.bos_id else tokenizer.decode([i]).replace("\n", "\\n") or f"#{i}" for i in ids]
    return ids, labels


def _draw(ax, probs: torch.Tensor, labels: list[str], title: str) -> Any:
    image = ax.imshow(probs.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=9)
    return image


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_attention_maps(model: nn.Module, tokenizer: Any, prompt: str, out_dir: Path) -> list[Path]:
    """One PNG per layer and head, `layerLL_headHH.png`, for `prompt`; returns the paths."""
    plt = _pyplot()
    ids, labels = prompt_tokens(tokenizer, prompt, model.config.block_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    size = 2.5 + 0.3 * len(ids)
    for layer, probs in enumerate(attention_probabilities(model, ids)):
        for head in range(probs.size(0)):
            fig, ax = plt.subplots(figsize=(size, size))
            fig.colorbar(_draw(ax, probs[head], labels, f"layer {layer} head {head}"), ax=ax, fraction=0.046)
            fig.tight_layout()
            paths.append(out_dir / f"layer{layer:02d}_head{head:02d}.png")
            fig.savefig(paths[-1], dpi=80)
            plt.close(fig)
    return paths


def write_representative_map(model: nn.Module, tokenizer: Any, prompt: str, path: Path) -> Path:
    """The last layer's heads side by side in one PNG (what evaluate logs): the layer closest to the prediction."""
    plt = _pyplot()
    ids, labels = prompt_tokens(tokenizer, prompt, model.config.block_size)
    layers = attention_probabilities(model, ids)
    probs, last = layers[-1], len(layers) - 1
    size = 2.5 + 0.3 * len(ids)
    fig, axes = plt.subplots(1, probs.size(0), figsize=(size * probs.size(0), size), squeeze=False)
    for head in range(probs.size(0)):
        _draw(axes[0][head], probs[head], labels, f"layer {last} head {head}")
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
    return Path(path)
