"""What every architecture shares above its layers: the training/generation interface.

GPT, Llama and Mamba-2 differ in how they mix tokens; they do not differ in how they are optimised,
counted, initialised or sampled from. Those live here once. A subclass provides:

- `_hidden(idx, attention_mask=None) -> (B, T, C)`: the final-normalised hidden states, and `lm_head`;
  `forward` is shared on top of them;
- `_new_cache(batch_size)` and `_forward_cached(idx, cache) -> logits (B, V) of the last position`,
  which consumes `idx` (the tokens not yet in the cache) and advances the cache;
- `_cache_can_hold(length)`: whether a cache can cover a context of `length` tokens;
- `_lookup_tables()`: parameters only ever indexed, never multiplied (see `num_params`);
- `_mixer_flops_per_token()`: the sequence-mixing FLOPs that are not parameter matmuls.
"""

import math

import torch
import torch.nn as nn

from .config import ModelConfig
from .layers import KVCache, lm_cross_entropy, padding_attention_mask, positions_from_mask, sample_next_token


class CausalLM(nn.Module):
    config: ModelConfig
    lm_head: nn.Linear

    def forward(self, idx, targets=None, attention_mask=None):
        """idx (B, T) -> (logits, loss). With targets: logits (B, T, V) and the mean cross-entropy over
        targets != -1. Without: logits (B, 1, V) of the last slot, and None.

        attention_mask (B, T), 1 = real token, 0 = padding: a left- or right-padded row gives its real
        tokens the same logits as the unpadded sequence. (Without targets the last slot is read: left-pad
        batched prompts.)
        """
        x = self._hidden(idx, attention_mask)
        if targets is None:
            # Inference needs only the next-token distribution; skip the vocabulary matmul elsewhere.
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return logits, lm_cross_entropy(logits, targets)

    # ---- initialisation -------------------------------------------------------------------------

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _init_parameters(self, residual_proj_names: tuple[str, ...], residuals_per_layer: int) -> None:
        """nanoGPT's scheme: N(0, 0.02) everywhere, and the projections that write into the residual
        stream scaled by 1/sqrt(number of residual additions), so the stream's variance does not grow
        with depth at initialisation (GPT-2 paper, section 2.3)."""
        self.apply(self._init_weights)
        std = 0.02 / math.sqrt(residuals_per_layer * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(residual_proj_names):
                nn.init.normal_(p, mean=0.0, std=std)

    # ---- accounting -----------------------------------------------------------------------------

    def _lookup_tables(self) -> list[nn.Parameter]:
        return []

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. With non_embedding, leave out tables that are only indexed (position
        embeddings, and the token embedding when it is *not* tied to the output layer): they cost no
        FLOPs per token, so excluding them makes 6N a FLOP estimate. A tied embedding stays in because
        it is also the output projection, a real matmul. Shared tensors are counted once."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self._lookup_tables())
        return n

    def _mixer_flops_per_token(self) -> int:
        raise NotImplementedError

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token: 6N for the parameter matmuls (2 forward, 4
        backward per parameter, Kaplan et al. 2020 / PaLM appendix B) plus the sequence mixing that
        is not a parameter matmul, e.g. attention's 12*L*H*Q*T."""
        return 6 * self.num_params(non_embedding=True) + self._mixer_flops_per_token()

    # ---- optimisation ---------------------------------------------------------------------------

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas, device_type: str):
        params = [p for p in self.parameters() if p.requires_grad]
        # Decay only matrices (matmul weights, embeddings, conv kernels): they hold the model's capacity
        # and are what overfits. Biases, norm gains and the SSM's per-head scalars (A_log, D, dt_bias)
        # set scales and offsets, for which 0 is not a "simpler" value, just a wrong one (a norm gain
        # of 0 silences its channel), so shrinking them regularises nothing.
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel is one launch for all parameters instead of several per tensor; it only
        # pays on CUDA.
        return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), fused=device_type == "cuda")

    # ---- generation -----------------------------------------------------------------------------

    def _new_cache(self, batch_size: int):
        raise NotImplementedError

    def _cache_can_hold(self, length: int) -> bool:
        raise NotImplementedError

    def _forward_cached(self, idx: torch.Tensor, cache) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Extend idx (B, T) by up to max_new_tokens sampled tokens and return (B, T + new).

        Rows that have emitted eos_id keep emitting eos_id (so the result stays rectangular); the loop
        stops once every row has. See `stream` for the cache."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache))
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, eos_id: int | None = None, use_cache: bool = True):
        """Yield the next token of every row, (B, 1), as it is sampled.

        With use_cache, only new tokens are fed each step; once a context no longer fits the cache
        (attention models: block_size), every further step recomputes on the last block_size tokens,
        exactly as use_cache=False does throughout, so both give the same tokens. Mamba-2's recurrent
        state has no such limit (see mamba2.py).
        """
        block_size = self.config.block_size
        cache = None
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if use_cache and self._cache_can_hold(idx.size(1)):
                if cache is None:
                    cache = self._new_cache(idx.size(0))
                logits = self._forward_cached(idx[:, cache.length :], cache)
            else:
                cache = None
                logits, _ = self(idx[:, -block_size:])
                logits = logits[:, -1, :]
            next_token = sample_next_token(logits, temperature, top_k, top_p)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished[:, None], eos_id)
                finished |= next_token[:, 0] == eos_id
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token
            if eos_id is not None and bool(finished.all()):
                return


class AttentionLM(CausalLM):
    """What the attention models (gpt, llama) share: their attention FLOPs, positions and the KV-cache path."""

    def _mixer_flops_per_token(self) -> int:
        c = self.config
        return 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    def _positions(self, idx, attention_mask=None, cache: KVCache | None = None):
        """(positions, SDPA mask) for `idx`: with a padding mask, per-row positions over real tokens (B, T);
        otherwise the positions after what the cache already holds (T,)."""
        T = idx.size(1)
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size={self.config.block_size}")
        if attention_mask is not None:
            return positions_from_mask(attention_mask), padding_attention_mask(attention_mask)
        return torch.arange(start, start + T, device=idx.device), None

    def _new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.config.n_layer, self.config.block_size)

    def _cache_can_hold(self, length: int) -> bool:
        return length <= self.config.block_size

    def _forward_cached(self, idx, cache: KVCache):
        return self.lm_head(self._hidden(idx, cache=cache)[:, -1, :])
