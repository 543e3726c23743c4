"""LoRA: adapt a trained model by learning a low-rank update of some of its linear layers, the rest frozen.

A targeted `nn.Linear` W becomes W x + (alpha / r) B A dropout(x), with A (r x in) random and B (out x r) zero, so the
adapted model starts as exactly the original one and only A and B (a few percent of the parameters at rank 8) get
gradients and optimizer state (Hu et al. 2021; the "Mini Transformer" seed's rank 8, alpha 16).

Adapters are a training device, not a model format: `merge_lora` folds B A into W and gives back plain `nn.Linear`
layers, so evaluate, export and register see the same architecture and the same safetensors keys as any other
model. The output head is never adapted: with tied weights it is the token embedding, which stays frozen.
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scaling = alpha / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight (and peft A)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self) -> nn.Linear:
        """The plain linear layer computing what this one computes in eval mode."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight + (self.lora_B @ self.lora_A) * self.scaling)
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def _matches(name: str, targets: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, t) or fnmatch.fnmatchcase(leaf, t) for t in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Freeze every parameter of `model`, wrap the linear layers named by `targets` (a layer's own name such as
    `c_attn`, or a glob over its full name such as `h.*.attn.*`) in `LoRALinear`; returns the wrapped names.
    Raises ValueError when no layer matches (the message lists the candidates)."""
    for p in model.parameters():
        p.requires_grad_(False)
    candidates = [name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"]
    chosen = [name for name in candidates if _matches(name, targets)]
    if not chosen:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise ValueError(f"train.lora.targets {targets} match no linear layer of this model (its layers: {leaves})")
    for name in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, dropout))
    return chosen


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is left with plain `nn.Linear` layers and every
    parameter trainable again (as a freshly loaded model would be)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for module in model.modules() if isinstance(module, LoRALinear) for p in (module.lora_A, module.lora_B)]
