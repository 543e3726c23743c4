"""Llama-style decoder (Touvron et al. 2023): RMSNorm, rotary positions, SwiGLU, grouped-query attention.

No biases anywhere and no position table: RoPE rotates queries and keys so attention scores depend on
relative position only. `n_kv_head` < `n_head` shares each key/value head among a group of query heads
(GQA; 1 = multi-query), shrinking the KV cache by n_head / n_kv_head.

The matmuls are laid out for throughput: q, k, v come from one fused projection and the SwiGLU gate and
up projections from another, so each block does four large matmuls instead of seven small ones.
"""

import torch.nn as nn
import torch.nn.functional as F

from .attention_maps import attention_probs
from .causal_lm import AttentionLM
from .config import ModelConfig
from .layers import (
    KVCache,
    RMSNorm,
    apply_rope,
    causal_attention,
    rope_tables,
)


class Attention(nn.Module):
    keep_probs = False  # model/attention_maps.py turns it on to keep `probs`

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.qk_norm = cfg.qk_norm
        kv_dim = self.n_kv_head * self.head_dim
        self.wqkv = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, attn_mask=None, cache: KVCache | None = None):
        B, T, C = x.size()
        H, Hkv = self.n_head, self.n_kv_head
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, self.head_dim)
        # q and k heads sit side by side in the projection's output: rotate them in one pass.
        qk = qkv[:, :, : H + Hkv]
        if self.qk_norm:  # bounds the attention logits, which lets a higher learning rate through
            qk = F.rms_norm(qk, (self.head_dim,))
        q, k = apply_rope(qk, cos, sin).split((H, Hkv), dim=2)
        v = qkv[:, :, H + Hkv :]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # the cache stores un-repeated kv heads: GQA's saving
        dropout_p = self.dropout if self.training else 0.0
        y = causal_attention(q, k, v, attn_mask, dropout_p, enable_gqa=self.n_kv_head != self.n_head)
        if self.keep_probs:  # opt-in, for attention maps: SDPA's fused kernels never form the probabilities
            self.probs = attention_probs(q, k, attn_mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(x w1) * (x w3)), with w1 and w3 stored as one matrix `w13`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=False)
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.dropout(self.w2(F.silu(gate) * up))


class ReluSquared(nn.Module):
    """w2(relu(x w1)^2) (So et al. 2021, Primer): as good as SwiGLU per step at small scale, with two matrices."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.relu(self.w1(x)).square()))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.feed_forward = ReluSquared(cfg) if cfg.mlp == "relu2" else FeedForward(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        x = x + self.resid_dropout(self.attention(self.attention_norm(x), cos, sin, attn_mask, cache))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(AttentionLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.tok_embeddings.weight = self.lm_head.weight
        # Buffers, not parameters, and not persistent: a function of the config, rebuilt on load.
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_parameters(residual_proj_names=("wo.weight", "w2.weight"), residuals_per_layer=2)

    def _lookup_tables(self):
        return [] if self.config.tie_weights else [self.tok_embeddings.weight]

    def _hidden(self, idx, attention_mask=None, cache: KVCache | None = None):
        pos, attn_mask = self._positions(idx, attention_mask, cache)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, D), or (B, T, D) per padded row
        x = self.tok_embeddings(idx)
        if self.config.scale_embeddings:  # the embedding's scale against the residual branches' (Gemma, T5)
            x = x * self.config.n_embd ** 0.5
        x = self.drop(x)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache)
        if cache is not None:
            cache.advance(idx.size(1))
        return self.norm(x)
