"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): a selective state-space model, in plain PyTorch.

Each layer keeps, per head, a (headdim x d_state) state h that every token decays and writes to:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        y_t = h_t C_t + D * x_t

A is one negative scalar per head; dt_t, B_t and C_t are computed from the input ("selective"). Training
uses the chunked SSD algorithm (`ssd_scan`, the paper's ssd_minimal): within a chunk the recurrence is
unrolled into a masked, attention-like matmul; across chunks only the states are carried. That is all
matmuls and cumsums, so it runs anywhere; no Triton/CUDA kernels. Generation runs the recurrence one
token at a time (`Mamba2Mixer.step`) with a constant-size state, so there is no context limit.

There is no positional encoding: the recurrence is ordered by construction. The scan runs in fp32 even
under bf16 autocast, because products of many decays lose too much in bf16.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .causal_lm import CausalLM
from .config import ModelConfig
from .layers import RMSNorm


# -----------------------------------------------------------------------------
# the SSD scan


def segsum(x: torch.Tensor) -> torch.Tensor:
    """x (..., T) -> (..., T, T) with out[i, j] = x[j+1] + ... + x[i] for j <= i, and -inf above the diagonal.

    exp(out) is then the decay from step j to step i. Summing masked copies, rather than differencing one
    cumsum, avoids subtracting two large numbers (the paper's numerically stable variant).
    """
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)  # [..., i, j] = x[i]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    out = x.masked_fill(~strictly_lower, 0).cumsum(dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return out.masked_fill(~lower, float("-inf"))


def ssd_scan(x, a, b, c, chunk_size: int, initial_state=None):
    """Chunked SSD. x (B, L, H, P) already scaled by dt; a (B, L, H) = dt * A; b, c (B, L, N), shared by all
    heads (one group). Returns y (B, L, H, P) and the final state (B, H, P, N).

    L need not be a multiple of chunk_size: the tail is padded with a = 0 (no decay) and x = 0 (no
    input), which leaves both the real outputs and the final state unchanged.
    """
    Bsz, L, H, P = x.shape
    pad = (-L) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        b = F.pad(b, (0, 0, 0, pad))
        c = F.pad(c, (0, 0, 0, pad))
    n_chunks = (L + pad) // chunk_size
    x = x.view(Bsz, n_chunks, chunk_size, H, P)
    b = b.view(Bsz, n_chunks, chunk_size, -1)
    c = c.view(Bsz, n_chunks, chunk_size, -1)
    a = a.view(Bsz, n_chunks, chunk_size, H).permute(0, 3, 1, 2)  # (B, H, chunks, l)
    a_cumsum = a.cumsum(dim=-1)

    # 1. Within each chunk: outputs from the chunk's own inputs, an attention-like masked matmul
    #    where the "attention" weight of s on l is (C_l . B_s) times the decay from s to l.
    decay = torch.exp(segsum(a))  # (B, H, chunks, l, s)
    scores = c @ b.transpose(-1, -2)  # (B, chunks, l, s)
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores[:, None] * decay, x)

    # 2. The state each chunk leaves behind from its own inputs, decayed to the chunk's end.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (B, H, chunks, l)
    states = torch.einsum("bcln,bhcl,bclhp->bchpn", b, decay_to_end, x)

    # 3. Across chunks: a short recurrence over chunk boundaries gives the state entering each chunk.
    if initial_state is None:
        initial_state = torch.zeros_like(states[:, :1])
    else:
        initial_state = initial_state[:, None]
    states = torch.cat((initial_state, states), dim=1)  # (B, chunks + 1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(a_cumsum[..., -1], (1, 0))))  # (B, H, chunks + 1, chunks + 1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. The entering state's contribution to each output, decayed to that position.
    y_off = torch.einsum("bcln,bchpn,bhcl->bclhp", c, states, torch.exp(a_cumsum))

    y = (y_diag + y_off).reshape(Bsz, n_chunks * chunk_size, H, P)[:, :L]
    return y, final_state


# -----------------------------------------------------------------------------
# the layer


@dataclass
class Mamba2State:
    """Per-layer recurrent state for generation: the last d_conv conv inputs and the SSM state."""

    conv: list[torch.Tensor | None]  # (B, conv_dim, d_conv)
    ssm: list[torch.Tensor | None]  # (B, H, P, N), fp32
    length: int = 0  # tokens consumed so far


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.d_inner, self.d_state, self.n_heads, self.headdim = cfg.d_inner, cfg.d_state, cfg.n_ssm_heads, cfg.headdim
        self.chunk_size = cfg.chunk_size
        # x, B and C go through the causal conv together; z (the output gate) and dt do not.
        self.conv_dim = self.d_inner + 2 * self.d_state
        self.in_proj = nn.Linear(cfg.n_embd, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, padding=cfg.d_conv - 1, bias=True
        )
        # The reference initialisation: dt log-uniform in [1e-3, 1e-1] (stored as its softplus inverse, so
        # softplus(dt_bias) starts there), A uniform in [1, 16], D = 1 (the skip starts as identity).
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = RMSNorm(self.d_inner, cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.n_embd, bias=False)

    def _gated_out(self, y, z):
        # Gate before normalising (Mamba-2's norm_before_gate=False): the gate can then also rescale.
        # y is the fp32 scan output; the norm stays in fp32 too, and out_proj returns to z's dtype.
        return self.out_proj(self.norm(y * F.silu(z.float())).to(z.dtype))

    def forward(self, u, keep=None, state: Mamba2State | None = None):
        """u (B, T, n_embd); keep (B, T, 1) with 0 at padding; state, if given, is filled for generation."""
        Bsz, T, _ = u.shape
        z, xbc, dt = self.in_proj(u).split((self.d_inner, self.conv_dim, self.n_heads), dim=-1)
        if keep is not None:
            # A padded step must neither enter the conv window (zero input, like the conv's own left
            # padding) nor touch the state (dt = 0: no decay, no write). Left padding then leaves the
            # real tokens' outputs exactly as without it.
            xbc = xbc * keep
        if state is not None:
            window = F.pad(xbc.transpose(1, 2), (max(0, self.conv1d.kernel_size[0] - T), 0))
            state.conv[self.layer] = window[..., -self.conv1d.kernel_size[0] :].contiguous()
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :T].transpose(1, 2))
        x, b, c = xbc.split((self.d_inner, self.d_state, self.d_state), dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias)  # (B, T, H)
        if keep is not None:
            dt = dt * keep
        A = -torch.exp(self.A_log.float())
        x = x.float().view(Bsz, T, self.n_heads, self.headdim)
        y, final_state = ssd_scan(x * dt[..., None], A * dt, b.float(), c.float(), self.chunk_size)
        if state is not None:
            state.ssm[self.layer] = final_state
        y = y + x * self.D.float()[:, None]
        return self._gated_out(y.reshape(Bsz, T, self.d_inner), z)

    def step(self, u, state: Mamba2State):
        """One token: u (B, n_embd) -> (B, n_embd), advancing this layer's conv window and SSM state."""
        Bsz = u.size(0)
        z, xbc, dt = self.in_proj(u).split((self.d_inner, self.conv_dim, self.n_heads), dim=-1)
        conv = torch.cat((state.conv[self.layer][..., 1:], xbc[..., None]), dim=-1)
        state.conv[self.layer] = conv
        xbc = F.silu((conv * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias)
        x, b, c = xbc.split((self.d_inner, self.d_state, self.d_state), dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias)  # (B, H)
        A = -torch.exp(self.A_log.float())
        x = x.float().view(Bsz, self.n_heads, self.headdim)
        h = state.ssm[self.layer] * torch.exp(dt * A)[..., None, None]
        h = h + (dt[..., None] * x)[..., None] * b.float()[:, None, None, :]  # dt * x B^T
        state.ssm[self.layer] = h
        y = (h @ c.float()[:, None, :, None]).squeeze(-1) + x * self.D.float()[:, None]
        return self._gated_out(y.reshape(Bsz, self.d_inner), z)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg, layer)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, keep=None, state=None):
        return x + self.dropout(self.mixer(self.norm(x), keep, state))

    def step(self, x, state):
        return x + self.mixer.step(self.norm(x), state)


class Mamba2(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.embedding.weight = self.lm_head.weight
        # One residual addition per layer (not two as in a transformer block), hence 1/sqrt(n_layer).
        self._init_parameters(residual_proj_names=("out_proj.weight",), residuals_per_layer=1)

    def _lookup_tables(self):
        return [] if self.config.tie_weights else [self.embedding.weight]

    def _mixer_flops_per_token(self) -> int:
        """The scan's work that is not a parameter matmul, by analogy with attention's 12*L*H*Q*T.

        Attention's state per channel is the T cached keys; the SSM's is d_state numbers. Per token and
        channel the recurrence writes the state (x B^T) and reads it (h C): 2 * d_state multiply-adds =
        4 * d_state FLOPs forward, times 3 for forward + backward, over d_inner channels and n_layer
        layers: 12 * L * d_inner * d_state. The chunked algorithm spends somewhat more (its intra-chunk
        block is quadratic in chunk_size), as flash attention does over the ideal count; like the
        attention term, this counts the model's arithmetic, not the implementation's.
        """
        c = self.config
        return 12 * c.n_layer * c.d_inner * c.d_state

    def _hidden(self, idx, attention_mask=None, state=None):
        keep = attention_mask[..., None].float() if attention_mask is not None else None
        x = self.embedding(idx)
        for layer in self.layers:
            x = layer(x, keep, state)
        return self.norm_f(x)

    # ---- generation -----------------------------------------------------------------------------

    def _new_cache(self, batch_size: int) -> Mamba2State:
        n = self.config.n_layer
        return Mamba2State(conv=[None] * n, ssm=[None] * n)

    def _cache_can_hold(self, length: int) -> bool:
        # The state is constant-size: generation continues past block_size without cropping (the model
        # then extrapolates beyond the lengths it was trained on, as any recurrent model does).
        return True

    def _forward_cached(self, idx, cache: Mamba2State):
        if cache.length == 0:  # the prompt: one chunked pass that leaves the states behind
            x = self._hidden(idx, state=cache)[:, -1, :]
        else:
            for t in range(idx.size(1)):
                x = self.embedding(idx[:, t])
                for layer in self.layers:
                    x = layer.step(x, cache)
            x = self.norm_f(x)
        cache.length += idx.size(1)
        return self.lm_head(x)
