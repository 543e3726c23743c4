"""GPT-2 style decoder (Radford et al. 2019), after nanoGPT's model.py.

Pre-norm blocks with LayerNorm and a GELU MLP, absolute positions added to the token embeddings:
either learned, or the fixed sinusoidal table of the original Transformer, which is a buffer and not a
parameter, so a sweep can compare the two at the same trainable size minus the table.
"""

import torch.nn as nn
import torch.nn.functional as F

from .attention_maps import attention_probs
from .causal_lm import AttentionLM
from .config import ModelConfig
from .layers import (
    KVCache,
    causal_attention,
    sinusoidal_table,
)


class CausalSelfAttention(nn.Module):
    keep_probs = False  # model/attention_maps.py turns it on to keep `probs`

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask=None, cache: KVCache | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        y = causal_attention(q, k, v, attn_mask, dropout_p)
        if self.keep_probs:  # opt-in, for attention maps: SDPA's fused kernels never form the probabilities
            self.probs = attention_probs(q, k, attn_mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(AttentionLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_encoding == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            # Not persistent: it is a function of the config, so checkpoints need not carry it.
            self.register_buffer("wpe_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            # Input and output embeddings share one matrix (Press & Wolf 2017): fewer parameters, and the
            # rarely-seen tokens' input rows get gradient from the output side on every step.
            self.wte.weight = self.lm_head.weight
        self._init_parameters(residual_proj_names=("c_proj.weight",), residuals_per_layer=2)

    def _lookup_tables(self):
        tables = [self.wpe.weight] if self.config.pos_encoding == "learned" else []
        if not self.config.tie_weights:
            tables.append(self.wte.weight)
        return tables

    def _position_embedding(self, pos):
        if self.config.pos_encoding == "learned":
            return self.wpe(pos)
        return self.wpe_table[pos]

    def _hidden(self, idx, attention_mask=None, cache: KVCache | None = None):
        pos, attn_mask = self._positions(idx, attention_mask, cache)
        x = self.drop(self.wte(idx) + self._position_embedding(pos))
        for block in self.h:
            x = block(x, attn_mask, cache)
        if cache is not None:
            cache.advance(idx.size(1))
        return self.ln_f(x)
