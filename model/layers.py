"""Building blocks shared by the architectures: normalisation, positions, attention, cache, loss, sampling.

Each piece is here because at least two of gpt.py / llama.py / mamba2.py use it, and keeping one copy
means the three models cannot drift apart on, say, how padding is masked or how top-p is cut.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# normalisation


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight. No mean subtraction and no bias (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is the fused kernel for exactly the formula above; it accumulates in fp32 under bf16.
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


# -----------------------------------------------------------------------------
# positions


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """The fixed positional table of Vaswani et al. 2017: sin on even channels, cos on odd ones."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : dim // 2]
    return table


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles laid out for `apply_rope`, each (max_len, head_dim): channel i and
    i + D/2 share an angle, and sin's first half is negated (the sign of the rotation's x2 term)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by their position's angle:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), computed as x * cos + swap_halves(x) * signed sin,
    two full-width multiplies instead of four half-width ones plus a concatenation of the results.

    The half-split pairing (GPT-NeoX style) rather than interleaved pairs: it is the same rotation up to a
    fixed permutation of the head channels, and slices contiguous halves instead of strided ones.
    cos/sin are (T, D) from `rope_tables`, or (B, T, D) when each row has its own positions (padding).
    """
    cos = cos.to(x.dtype).unsqueeze(-2)  # broadcast over heads
    sin = sin.to(x.dtype).unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted over real tokens only, so a left-padded row sees the same positions
    as the unpadded sequence. Padding slots get position 0; their outputs are never read."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# -----------------------------------------------------------------------------
# attention


def padding_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) keep-mask (1 = real token) -> (B, 1, T, T) bool mask for SDPA: causal and no padded keys.

    Every query may also attend to itself. Under left padding a padded query has no allowed key at all,
    and softmax over an empty row is 0/0 = NaN, which would then poison gradients through the shared
    weights. Letting it see itself costs nothing: real queries never see a padded key, and padded
    outputs are ignored (their targets are -1).
    """
    T = attention_mask.size(-1)
    keep = attention_mask.bool()
    causal = torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()
    allowed = causal & keep[:, None, None, :]
    return allowed | torch.eye(T, dtype=torch.bool, device=keep.device)


def causal_attention(q, k, v, attn_mask=None, dropout_p: float = 0.0, enable_gqa: bool = False):
    """Causal SDPA over q (B, H, Tq, D) and k, v (B, Hkv, Tk, D), where the Tq queries are the last Tq
    positions of the Tk keys (Tk > Tq when earlier keys come from a KV cache)."""
    Tq, Tk = q.size(-2), k.size(-2)
    if attn_mask is not None:
        is_causal = False
    elif Tq == Tk:
        is_causal = True  # the flag, not a mask tensor, lets SDPA pick its flash kernel
    elif Tq == 1:
        is_causal = False  # one new query may see every cached key
    else:
        # SDPA's is_causal aligns the triangle top-left, which is wrong when queries are offset by the cache.
        is_causal = False
        attn_mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=enable_gqa
    )


class KVCache:
    """Keys and values of every layer for the tokens generated so far, preallocated to block_size.

    Allocated lazily on the first write so it takes the dtype the keys actually have (bf16 under autocast).
    `length` advances once per forward, after all layers have written the same positions.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at positions [length, length + T); return all keys/values so far."""
        if self.k[layer] is None:
            B, H, _, D = k.shape
            self.k[layer] = k.new_zeros(B, H, self.max_len, D)
            self.v[layer] = v.new_zeros(B, H, self.max_len, D)
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to fill up to {end}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


# -----------------------------------------------------------------------------
# loss and sampling


def lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all positions whose target is not -1 (padding, prompt, ...).

    Computed in fp32: under bf16 autocast the logits are bf16, and log-softmax over a large vocabulary
    loses visible precision there.
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (B, V): greedy at temperature 0, else sample after top-k and
    nucleus (top-p) filtering. Returns (B, 1) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass *before* it
        # already does. The most likely token is always kept, so a tiny top_p degenerates to greedy.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
