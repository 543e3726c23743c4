"""A model's profile before it trains: parameters by component, FLOPs per token, and the memory a step needs.

Parameters are counted per component (embedding, attention, MLP or SSM mixer, norms, output head) from their names,
each tensor once: a tied output head shares the embedding's matrix, so it appears under `embedding` and the profile
says `tied`. FLOPs are `flops_per_token()` (forward + backward, the figure MFU is computed from).

Memory is an estimate of what one optimizer step holds: weights, gradients and AdamW's two moments (4 bytes each per
trainable parameter in fp32), and the activations autograd keeps for the backward pass. Those are not guessed from a
formula: one forward + loss runs on the `meta` device (shapes only, no memory, no arithmetic) at the training
micro-batch and context, and every tensor autograd saves for backward that is not a parameter or buffer (nor a view
of one) is counted once, whatever views of it are saved. That
follows each architecture's real graph (SDPA's saved outputs, Mamba-2's chunked scan), at fp32; bf16 autocast keeps
about half of it, and torch.compile can keep less.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .config import ModelConfig

COMPONENTS = ("embedding", "attention", "mlp", "mixer", "norms", "head", "other")
EMBEDDINGS = ("wte", "wpe", "tok_embeddings", "embedding")
FP32 = 4


def component(name: str) -> str:
    """Which part of the model a parameter (by its qualified name) belongs to."""
    parts = name.split(".")
    owner = parts[-2] if len(parts) > 1 else parts[0]
    if "norm" in owner or owner.startswith("ln"):
        return "norms"
    if parts[0] in EMBEDDINGS:
        return "embedding"
    if parts[0] == "lm_head":
        return "head"
    for key, part in (("attn", "attention"), ("attention", "attention"), ("mlp", "mlp"), ("feed_forward", "mlp"),
                      ("mixer", "mixer")):
        if key in parts:
            return part
    return "other"


def parameters_by_component(model: nn.Module) -> dict[str, int]:
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # shared tensors (a tied head) are yielded once
        counts[component(name)] += p.numel()
    return {key: n for key, n in counts.items() if n or key in ("embedding", "norms", "head")}


def activation_bytes(cfg: ModelConfig, batch_size: int) -> int:
    """Bytes autograd saves for backward in one fp32 forward + loss of (batch_size, block_size), measured on meta."""
    with torch.device("meta"):
        model = _build(cfg).train()
        idx = torch.zeros(batch_size, cfg.block_size, dtype=torch.long)
    weights = {id(t) for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base  # a view (a transposed weight, a reshaped activation) holds its base
        if id(base) not in weights:
            saved[id(base)] = base  # keeping a reference keeps ids unique until the count is taken
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(t.numel() * t.element_size() for t in saved.values())


def _build(cfg: ModelConfig) -> nn.Module:
    from . import build_model  # here, not at the top: model/__init__ imports the architectures first

    return build_model(cfg)


def model_profile(model: nn.Module, batch_size: int, tokens_per_step: int | None = None) -> dict[str, Any]:
    """The profile of `model` (a CausalLM) trained at micro-batch `batch_size`; JSON-ready."""
    cfg: ModelConfig = model.config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = model.num_params(non_embedding=False)
    flops = model.flops_per_token()
    memory = {
        "weights": total * FP32,
        "gradients": trainable * FP32,
        "optimizer": 2 * trainable * FP32,  # AdamW: first and second moments
        "activations": activation_bytes(cfg, batch_size),
    }
    memory["total"] = sum(memory.values())
    return {
        "arch": cfg.arch,
        "parameters": total,
        "non_embedding_parameters": model.num_params(),
        "trainable_parameters": trainable,
        "parameters_by_component": parameters_by_component(model),
        "tied_embedding": bool(cfg.tie_weights),
        "flops_per_token": flops,
        "forward_flops_per_token": flops // 3,
        "flops_per_step": flops * tokens_per_step if tokens_per_step else None,
        "memory_bytes": memory,
        "memory_note": f"fp32, AdamW, activations of one micro-batch ({batch_size} x {cfg.block_size} tokens)",
    }


def describe(profile: dict[str, Any]) -> str:
    """One log line: parameters by component, FLOPs per token, memory."""
    parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in profile["parameters_by_component"].items())
    mem = profile["memory_bytes"]
    mib = 1 << 20
    tied = ", head tied" if profile["tied_embedding"] else ""
    return (f"{profile['parameters'] / 1e6:.2f}M parameters ({parts}{tied})"
            f"; {profile['flops_per_token'] / 1e6:.1f} MFLOP/token (fwd+bwd); memory ~{mem['total'] / mib:.0f} MiB "
            f"(weights {mem['weights'] / mib:.0f}, grads {mem['gradients'] / mib:.0f}, AdamW "
            f"{mem['optimizer'] / mib:.0f}, activations {mem['activations'] / mib:.0f})")

