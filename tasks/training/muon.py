"""Muon (Jordan et al. 2024) for the hidden matrices, AdamW for everything else, as one optimizer.

Muon takes SGD-momentum's update of a 2-D weight and replaces it by the nearest semi-orthogonal matrix (all singular
values ~1), computed with five Newton-Schulz iterations of a quintic tuned to converge fast from any scale (the
coefficients of Keller Jordan's reference implementation). Every direction of the update then moves at the same rate,
which at small scale buys the loss of AdamW in fewer steps. It is only for matmul weights inside the blocks: the
embedding (a lookup table), the output head and the vector parameters (norm gains, biases) stay on AdamW, as in the
reference. Fused projections (llama's wqkv and w13, GPT's c_attn) are orthogonalised per part, because q, k and v are
separate maps that happen to share a matmul.

One optimizer object, so checkpoints save and restore it like AdamW: every state entry is a tensor (the step count
too), and the groups carry `lr_scale`, the ratio of the group's rate to `train.learning_rate`, which the loop's
schedule multiplies in.

On CPUs without bf16 instructions the iteration runs in fp32 (the reference uses bf16 on GPUs).
"""
from __future__ import annotations

import torch
import torch.nn as nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T (Newton-Schulz, quintic)."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Groups with `use_muon` True hold 2-D weights (optionally `split`: row counts of their fused parts); the
    others are AdamW groups."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), momentum: float = 0.95, eps: float = 1e-8):
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), momentum=momentum, eps=eps, weight_decay=0.0,
                                      lr_scale=1.0, use_muon=False, split=None))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                (self._muon if group["use_muon"] else self._adamw)(p, group, self.state[p])

    @staticmethod
    def _muon(p: torch.Tensor, group: dict, state: dict) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, beta = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - beta)
        update = p.grad.lerp(buf, beta)  # Nesterov
        parts = update.split(group["split"]) if group["split"] else (update,)
        # Scaled so a tall matrix's update has the RMS of a square one's (the reference's max(1, rows/cols)^0.5).
        update = torch.cat([orthogonalize(u) * max(1.0, u.size(0) / u.size(1)) ** 0.5 for u in parts])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"])

    @staticmethod
    def _adamw(p: torch.Tensor, group: dict, state: dict) -> None:
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        (beta1, beta2), t = group["betas"], state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


def fused_split(name: str, p: torch.Tensor, cfg) -> list[int] | None:
    """Row counts of the separate maps a fused projection holds, from the model config."""
    if name.endswith("wqkv.weight"):
        kv = cfg.kv_heads * cfg.head_dim
        return [cfg.n_embd, kv, kv]
    if name.endswith("w13.weight") or name.endswith("c_attn.weight"):
        parts = 2 if name.endswith("w13.weight") else 3
        return [p.size(0) // parts] * parts
    return None


def build_optimizer(model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
    """`train.optimizer`: AdamW over every parameter, or Muon for the blocks' matrices and AdamW for the rest.
    LoRA adapters (`train.lora`) always train with AdamW: a rank-8 factor has no use for orthogonalised updates."""
    if cfg.optimizer == "adamw" or getattr(cfg, "lora", None) is not None:
        return model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} | {id(model.lm_head.weight)}
    groups: list[dict] = [
        {"params": [], "weight_decay": cfg.weight_decay},  # AdamW: embedding and head
        {"params": [], "weight_decay": 0.0},  # AdamW: gains, biases, the SSM's scalars, conv kernels
    ]
    seen: set[int] = set()
    scale = cfg.muon_learning_rate / cfg.learning_rate
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in tables:
            groups[0]["params"].append(p)
        elif p.dim() == 2:
            groups.append({"params": [p], "use_muon": True, "lr_scale": scale, "split": fused_split(name, p, cfg.model),
                           "weight_decay": cfg.muon_weight_decay})
        else:
            groups[1]["params"].append(p)
    return Muon(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), momentum=cfg.muon_momentum)
