"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): a selective state-space model, in plain PyTorch.

Each layer keeps, per head, a (headdim x d_state) state h that every token decays and writes to:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        y_t = h_t C_t + D * x_t

A is one negative scalar per head; dt_t, B_t and C_t are computed from the input ("selective"). Training
uses the chunked SSD algorithm (`ssd_scan`, the paper's ssd_minimal): within a chunk the recurrence is
unrolled into a masked, attention-like matmul; across chunks only the states are carried. That is all
matmuls and cumsums, so it runs anywhere; no Triton/CUDA kernels. Where float32 allows (every chunk's
decays within exp(-128), as at initialisation), the within-chunk decays are factored per step
(`_factored_decays`), so one matmul per chunk serves all heads; else the paper's per-head segsum form
runs. On a CPU the matmuls are the cheap part: the scan and the gated norm are autograd Functions with
written-out backward passes, because autograd's versions spend more time writing out intermediate tensors
than the arithmetic takes
(tests/test_mamba2_scan.py holds them to the sequential recurrence and to autograd's gradients).
Generation runs the recurrence one token at a time (`Mamba2Mixer.step`) with a constant-size state, so
there is no context limit.

There is no positional encoding: the recurrence is ordered by construction. The scan runs in fp32 even
under bf16 autocast, because products of many decays lose too much in bf16.
"""

import contextlib
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
    cumsum, avoids subtracting two large numbers (the paper's numerically stable variant). The scan uses it
    across chunks, where T is the number of chunks + 1; within a chunk `_decay_within` gets the same
    accuracy at a fraction of the cost.
    """
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)  # [..., i, j] = x[i]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    out = x.masked_fill(~strictly_lower, 0).cumsum(dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return out.masked_fill(~lower, float("-inf"))


def ssd_scan(x, a, b, c, chunk_size: int, initial_state=None, dt=None, D=None, factored: bool | None = None):
    """Chunked SSD. x (B, L, H, P) already scaled by dt; a (B, L, H) = dt * A <= 0; b, c (B, L, N), shared by
    all heads (one group). Returns y (B, L, H, P) and the final state (B, H, P, N).

    With dt (B, L, H) given, x is the unscaled input and the scan scales it itself, in passes it makes
    anyway; with D (H,) given, y includes the skip D * x. L need not be a multiple of chunk_size: the tail
    is padded with a = 0 (no decay) and x = 0 (no input), which leaves both the real outputs and the final
    state unchanged. The per-step decays are prepared here under autograd (one number per step and head);
    the large tensors go through `_FactoredScan` or `_ChunkedScan`, whose backward passes are written out.

    `factored` picks the form of the within-chunk decays: None (the default) takes `_FactoredScan` whenever
    every chunk's decays fit float32 that way (`factorable`), else `_ChunkedScan`; True / False force one
    (tests compare both).
    """
    # Under bf16 autocast the matmuls would otherwise run in bf16, losing what the float32 decays keep.
    # (The meta device, where model/profile.py measures activations, has no autocast to switch off.)
    with torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else contextlib.nullcontext():
        Bsz, L, H, P = x.shape
        pad = (-L) % chunk_size
        if pad:
            x, a, b, c = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, a, b, c))
            dt = F.pad(dt, (0, 0, 0, pad)) if dt is not None else None
        Q, n_chunks = chunk_size, (L + pad) // chunk_size
        # A float64 cumsum: the decays below are differences of it (see _decay_within).
        cs = a.reshape(Bsz, n_chunks, Q, H).double().cumsum(dim=2)
        # across[z, j]: from the end of chunk j - 1 to the start of chunk z; column 0 is the initial state.
        across = torch.exp(segsum(F.pad(cs[:, :, -1].transpose(1, 2), (1, 0))))  # (B, H, c+1, c+1)
        dtype = x.dtype
        x, dt, b, c = (None if t is None else t.reshape(Bsz, n_chunks, Q, *t.shape[2:]) for t in (x, dt, b, c))
        if factored or (factored is None and factorable(cs)):
            y, final_state = _FactoredScan.apply(x, dt, D, b, c, *_factored_decays(cs, across, dtype), initial_state)
        else:
            to_end = torch.exp(cs[:, :, -1:] - cs).to(dtype)  # decay from each step to its chunk's end
            from_start = torch.exp(cs).to(dtype)  # decay from its chunk's start to each step
            y, final_state = _ChunkedScan.apply(
                x, dt, D, b, c, cs.permute(1, 0, 3, 2).contiguous(), to_end, from_start, across.to(dtype),
                initial_state
            )
        y = y.view(Bsz, n_chunks * Q, H, P)
        return (y[:, :L] if pad else y), final_state


# Largest |log| of a factor in the factored form: exp(64) ~ 6e27 leaves float32 (max 3.4e38) ten orders of
# magnitude for the sums it scales, and exp(-64) stays far from its subnormals (1.2e-38).
FACTOR_LOG_LIMIT = 64.0


def factorable(cs: torch.Tensor) -> bool:
    """Whether the factored scan is exact in float32 for these per-chunk cumsums cs (B, c, Q, H): every chunk's
    total log-decay within 2 * FACTOR_LOG_LIMIT (at the default initialisation a 64-step chunk spans at most ~100).
    Decided from the data, one number per call; on the meta device (no data) the factored form."""
    if cs.device.type == "meta":
        return True
    return bool((cs[:, :, 0] - cs[:, :, -1]).max() <= 2 * FACTOR_LOG_LIMIT) if cs.numel() else True


def _factored_decays(cs: torch.Tensor, across: torch.Tensor, dtype) -> tuple[torch.Tensor, ...]:
    """The decays of `_FactoredScan` from the per-chunk cumsums cs (B, c, Q, H) and the chunk-to-chunk decays across
    (B, H, c+1, c+1): u, v (B, c, Q, H), to_end (B, c, H) and carry (B, H, c+1, c+1), in `dtype`.

    Within a chunk exp(cs[l] - cs[s]) = u[l] * v[s] with u = exp(cs - ref) and v = exp(ref - cs), ref the middle of
    the chunk's cumsum range (so no factor exceeds exp(FACTOR_LOG_LIMIT)). Then every head's within-chunk matrix is
    diag(u) (C B^T) diag(v), and as C B^T is shared by the heads, the within-chunk term is one (Q x Q) by (Q x H*P)
    matmul per chunk instead of H per-head (Q x Q) matrices built, masked and multiplied. to_end is what v lacks of
    the decay to the chunk's end, exp(end - ref); carry is across times exp(ref) of chunk z, what u lacks of the decay
    from that chunk's start (the last row gives the final state, with no ref). ref is a constant (y does not depend
    on it), so it is detached."""
    ref = (0.5 * (cs[:, :, :1] + cs[:, :, -1:])).detach()  # (B, c, 1, H)
    u = torch.exp(cs - ref).to(dtype)
    v = torch.exp(ref - cs).to(dtype)
    to_end = torch.exp(cs[:, :, -1] - ref[:, :, 0]).to(dtype)
    into = F.pad(torch.exp(ref[:, :, 0]).transpose(1, 2), (0, 1), value=1.0)  # (B, H, c+1)
    return u, v, to_end, (across * into[..., :, None]).to(dtype)


class _FactoredScan(torch.autograd.Function):
    """The chunked SSD with factored decays; see `_factored_decays`. Per (batch, chunk), with w = v * dt:

        X = w x                                     (the chunk's input, each step scaled towards the chunk's end)
        state_own = to_end * X^T B,  state_in(z) = sum_j carry[z, j] state_own(j - 1)  (+ carry[z, 0] s0)
        y = u * (C state_in^T + mask(C B^T) X) + D x

    All four matmuls are batched over (chunk, batch) with the heads folded into a dimension of H*P; tensors
    inside are chunk-major, (c, B, ...), as in `_ChunkedScan`, so that `_pass_states` needs no copies. The
    states are kept at their true scale (to_end applied before they are carried): u, v and X reach exp(+-64),
    and no product of two such large factors may be formed, in this pass or the backward. The backward reuses
    the forward's matrices; gradients by u, v, to_end and carry go back through autograd's small exps.
    """

    @staticmethod
    def forward(ctx, x, dt, D, b, c, u, v, to_end, carry, s0):
        Bsz, n_chunks, Q, H, P = x.shape
        b, c = _chunk_major(b), _chunk_major(c)  # (c*B, Q, N)
        w = v if dt is None else dt * v
        xw = _into((n_chunks, Bsz, Q, H, P), x, torch.mul, x.transpose(0, 1), w.transpose(0, 1)[..., None])
        xw = xw.view(-1, Q, H * P)
        own = torch.bmm(xw.transpose(1, 2), b)  # (c*B, H*P, N), before to_end
        per_head = (own.size(0), H, P * own.size(-1))
        own_scaled = _into(per_head, own, torch.mul, own.view(per_head), to_end.transpose(0, 1).reshape(-1, H, 1))
        states, s_in, final_state = _pass_states(own_scaled.view(own.shape), carry, s0)
        g = _causal(torch.bmm(c, b.transpose(1, 2)))  # C B^T
        yu = torch.bmm(c, s_in.transpose(1, 2)).baddbmm_(g, xw)  # y / u, (c*B, Q, H*P)
        y = _into(x.shape, x, torch.mul, yu.view(n_chunks, Bsz, Q, H, P).transpose(0, 1), u[..., None])
        if D is not None:
            y.addcmul_(x, D[:, None])
        ctx.save_for_backward(x, dt, D, b, c, u, v, w, to_end, xw, g, own, states, s_in, yu, carry, s0)
        return y, final_state

    @staticmethod
    def backward(ctx, gy, g_final):
        x, dt, D, b, c, u, v, w, to_end, xw, g, own, states, s_in, yu, carry, s0 = ctx.saved_tensors
        Bsz, n_chunks, Q, H, P = x.shape
        gy = gy.contiguous()
        g_u = torch.linalg.vecdot(gy, yu.view(n_chunks, Bsz, Q, H, P).transpose(0, 1))
        gyu = _into((n_chunks, Bsz, Q, H, P), x, torch.mul, gy.transpose(0, 1), u.transpose(0, 1)[..., None])
        gyu = gyu.view(-1, Q, H * P)  # the gradient by y / u
        g_c = torch.bmm(gyu, s_in)
        g_states, g_carry, g_s0 = _pass_states_backward(gyu, c, g_final, states, carry, s0)
        g_states = g_states.view(-1, H, P * own.size(-1))
        g_to_end = torch.linalg.vecdot(g_states, own.view(g_states.shape)).view(n_chunks, Bsz, H).transpose(0, 1)
        g_own = g_states.mul_(to_end.transpose(0, 1).reshape(-1, H, 1)).view(own.shape)
        g_xw = torch.bmm(b, g_own.transpose(1, 2)).baddbmm_(g.transpose(1, 2), gyu)
        g_b = torch.bmm(xw, g_own)
        # Above the diagonal u[l] * v[s] may exceed float32 (the decay runs backwards there): masked, not used.
        g_g = _causal(torch.bmm(gyu, xw.transpose(1, 2)))
        g_c.baddbmm_(g_g, b)
        g_b.baddbmm_(g_g.transpose(1, 2), c)
        g_b, g_c = (t.view(n_chunks, Bsz, Q, -1).transpose(0, 1) for t in (g_b, g_c))
        g_xw = g_xw.view(n_chunks, Bsz, Q, H, P).transpose(0, 1)
        g_w = torch.linalg.vecdot(g_xw, x)
        g_x = _into(x.shape, x, torch.mul, g_xw, w[..., None])
        g_D = None if D is None else torch.linalg.vecdot(gy, x).sum((0, 1, 2))
        if D is not None:
            g_x.addcmul_(gy, D[:, None])
        g_dt, g_v = (None, g_w) if dt is None else (g_w * v, g_w * dt)
        return g_x, g_dt, g_D, g_b, g_c, g_u, g_v, g_to_end, g_carry, g_s0


def _decay_within(cs: torch.Tensor, dtype) -> torch.Tensor:
    """cs (..., Q) float64 -> decay (-1, Q, Q) with decay[l, s] = exp(cs[l] - cs[s]) on and below the
    diagonal (the decay from step s to step l); above it, values in (0, 1] that the causal mask zeroes.

    The difference of two large, close cumsums is where float32 loses digits. Split into hi + lo parts,
    cs[l] - cs[s] = (hi[l] - hi[s]) + (lo[l] - lo[s]) keeps float64's accuracy; a rank-4 matmul forms all
    pairs in one pass over the (Q x Q) output (the products are by 1, the sum runs in this order).
    """
    Q = cs.size(-1)
    hi = cs.to(dtype)
    lo = (cs - hi.double()).to(dtype)
    one = torch.ones_like(hi)
    left = torch.stack((hi, one, lo, one), dim=-1).view(-1, Q, 4)
    right = torch.stack((one, -hi, one, -lo), dim=-2).view(-1, 4, Q)
    # a <= 0, so the exponent is <= 0 on and below the diagonal; clamping keeps it there above the
    # diagonal too (no overflow), and above -87, below which exp is ~30x slower on CPUs (underflow).
    return torch.bmm(left, right).clamp_(-87.0, 0.0).exp_()


def _into(shape, like, op, *args) -> torch.Tensor:
    """op(*args) written into a new contiguous tensor of `shape`: one pass whatever the inputs' layouts."""
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    op(*args, out=out)
    return out


def _chunk_major(t: torch.Tensor) -> torch.Tensor:
    """(B, c, ...) -> (c, B, ...) contiguous, flattened to (c*B, ...)."""
    return t.transpose(0, 1).reshape(-1, *t.shape[2:])


class _ChunkedScan(torch.autograd.Function):
    """The chunked SSD on prepared decays; see `ssd_scan`. Per (batch, chunk), with l, s steps in the chunk:

        y[l] = sum_{s<=l} exp(cs[l] - cs[s]) (C[l] . B[s]) x[s]          (1. within the chunk)
             + from_start[l] * C[l] . state_in                             (4. from the chunks before)
        state_out = sum_s to_end[s] x[s] B[s]^T                            (2. what the chunk leaves)
        state_in(z) = sum_j across[z, j] state_out(j - 1)                   (3. across chunks)

    Every matmul is batched over (chunk, batch) with the heads folded into its rows or columns (B and C
    are shared by the heads), except 1.'s, whose decay differs per head. Inside, tensors are chunk-major,
    (c, B, ...): then each head's states across chunks are one strided matrix and 3. needs no copies.
    Autograd's version of all this writes out every intermediate product and its gradient; the backward
    here reuses buffers, reduces with dot products, and takes the gradient of the exponent in 1. from
    gM * M (d exp(u) / du = exp(u)).
    """

    @staticmethod
    def forward(ctx, x, dt, D, b, c, cs, to_end, from_start, across, s0):
        Bsz, n_chunks, Q, H, P = x.shape
        b, c = _chunk_major(b), _chunk_major(c)  # (c*B, Q, N)
        w = to_end if dt is None else dt * to_end
        xw = _into((n_chunks, Bsz, Q, H, P), x, torch.mul, x.transpose(0, 1), w.transpose(0, 1)[..., None])
        states, s_in, final_state = _pass_states(torch.bmm(xw.view(-1, Q, H * P).transpose(1, 2), b), across, s0)
        y_off = torch.bmm(c, s_in.transpose(1, 2)).view(n_chunks, Bsz, Q, H, P)
        y = _into(x.shape, x, torch.mul, y_off.transpose(0, 1), from_start[..., None])
        g = _causal(torch.bmm(c, b.transpose(1, 2)))  # C B^T
        xh = x.permute(1, 0, 3, 2, 4)  # (c, B, H, Q, P): per-head blocks for 1.
        xh = xh.contiguous() if dt is None else _into(xh.shape, x, torch.mul, xh, dt.permute(1, 0, 3, 2)[..., None])
        decay = _decay_within(cs, x.dtype)
        m = decay.view(-1, H, Q, Q) * g[:, None]
        y.add_(torch.bmm(m.view(-1, Q, Q), xh.view(-1, Q, P)).view(xh.shape).permute(1, 0, 3, 2, 4))
        if D is not None:
            y.addcmul_(x, D[:, None])
        ctx.save_for_backward(x, dt, D, b, c, xh, decay, m, g, xw, states, s_in, y_off, to_end, from_start, across, s0)
        return y, final_state

    @staticmethod
    def backward(ctx, gy, g_final):
        x, dt, D, b, c, xh, decay, m, g, xw, states, s_in, y_off, to_end, from_start, across, s0 = ctx.saved_tensors
        Bsz, n_chunks, Q, H, P = x.shape
        gy = gy.contiguous()
        # 4. from the chunks before
        g_from_start = torch.linalg.vecdot(gy, y_off.transpose(0, 1))
        gy_off = _into(y_off.shape, x, torch.mul, gy.transpose(0, 1), from_start.transpose(0, 1)[..., None])
        gy_off = gy_off.view(-1, Q, H * P)
        g_c = torch.bmm(gy_off, s_in)
        g_states, g_across, g_s0 = _pass_states_backward(gy_off, c, g_final, states, across, s0)
        # 2. what each chunk leaves
        g_xw = torch.bmm(b, g_states.transpose(1, 2)).view(xw.shape).transpose(0, 1)
        g_b = torch.bmm(xw.view(-1, Q, H * P), g_states)
        g_w = torch.linalg.vecdot(g_xw, x)  # by w (= to_end, or dt * to_end)
        g_xs = _into(x.shape, x, torch.mul, g_xw, to_end[..., None])  # by the dt-scaled x
        # 1. within each chunk
        g_g, g_cs = _within_backward(gy, xh, decay, m, g, g_xs)
        g_c.baddbmm_(g_g, b)
        g_b.baddbmm_(g_g.transpose(1, 2), c)
        g_b, g_c = (t.view(n_chunks, Bsz, Q, -1).transpose(0, 1) for t in (g_b, g_c))
        g_D = None if D is None else torch.linalg.vecdot(gy, x).sum((0, 1, 2))
        if dt is None:
            g_dt, g_to_end, g_x = None, g_w, g_xs
        else:
            g_dt, g_to_end = torch.linalg.vecdot(g_xs, x), g_w * dt  # g_xs holds both paths' gradients
            g_x = g_xs.mul_(dt[..., None])
        if D is not None:
            g_x.addcmul_(gy, D[:, None])
        return g_x, g_dt, g_D, g_b, g_c, g_cs, g_to_end, g_from_start, g_across, g_s0


def _within_backward(gy, xh, decay, m, g, g_xs):
    """Backward of 1.: adds the gradient by x (dt-scaled) into g_xs; returns those by G and by cs."""
    n_chunks, Bsz, H, Q, P = xh.shape
    gyh = gy.permute(1, 0, 3, 2, 4).contiguous().view(-1, Q, P)
    g_xs.add_(torch.bmm(m.view(-1, Q, Q).transpose(1, 2), gyh).view(xh.shape).permute(1, 0, 3, 2, 4))
    gm = torch.bmm(gyh, xh.view(-1, Q, P).transpose(1, 2)).view(-1, H, Q, Q)
    g_g = gm.mul_(decay.view(gm.shape)).sum(1)  # G is shared by the heads
    gm.mul_(g[:, None])  # now the gradient of the exponent cs[l] - cs[s]: gM * M
    g_cs = (gm.sum(-1) - gm.sum(-2)).view(n_chunks, Bsz, H, Q).double()
    return _causal(g_g), g_cs


def _causal(m: torch.Tensor) -> torch.Tensor:
    """m (..., Q, Q) with the entries above the diagonal zeroed, in place: step l reads no later step s."""
    Q = m.size(-1)
    return m.masked_fill_(torch.ones(Q, Q, dtype=torch.bool, device=m.device).triu(1), 0)


def _pass_states(states, across, s0):
    """3.: states (c*B, H*P, N), each chunk's own, chunk-major; across (B, H, c+1, c+1); s0 (B, H, P, N) or
    None. Returns states, the state entering each chunk (c*B, H*P, N) and the final state (B, H, P, N).
    In chunk-major layout each (batch, head)'s states over the chunks are one strided matrix, so this is
    one batched matmul reading and writing in place."""
    Bsz, H, n_chunks = across.size(0), across.size(1), across.size(2) - 1
    HP, N = states.shape[1:]
    out = torch.empty(n_chunks + 1, Bsz * H, HP // H * N, dtype=states.dtype, device=states.device)
    per_head = states.view(n_chunks, Bsz * H, -1).transpose(0, 1)  # (B*H, c, P*N)
    torch.bmm(across[..., 1:].reshape(Bsz * H, n_chunks + 1, n_chunks), per_head, out=out.transpose(0, 1))
    if s0 is not None:
        out.add_(across[..., 0].reshape(Bsz * H, n_chunks + 1).T[..., None] * s0.reshape(1, Bsz * H, -1))
    return states, out[:-1].view(n_chunks * Bsz, HP, N), out[-1].view(Bsz, H, HP // H, N).clone()


def _pass_states_backward(gy_off, c, g_final, states, across, s0):
    """Backward of 3. (and of 4.'s matmul by the entering states): returns the gradients by the chunks'
    own states (c*B, H*P, N), by across and by s0."""
    Bsz, H, n_chunks = across.size(0), across.size(1), across.size(2) - 1
    HP, N = states.shape[1:]
    g_out = torch.empty(n_chunks + 1, Bsz * H, HP // H * N, dtype=states.dtype, device=states.device)
    torch.bmm(gy_off.transpose(1, 2), c, out=g_out[:-1].view(-1, HP, N))
    g_out[-1] = g_final.reshape(Bsz * H, -1)
    g_out = g_out.transpose(0, 1)  # (B*H, c+1, P*N)
    g_across = torch.zeros_like(across)
    per_head = states.view(n_chunks, Bsz * H, -1).transpose(0, 1)
    g_across[..., 1:] = torch.bmm(g_out, per_head.transpose(1, 2)).view(Bsz, H, n_chunks + 1, n_chunks)
    g_states = torch.empty_like(states)
    a1 = across[..., 1:].reshape(Bsz * H, n_chunks + 1, n_chunks)
    torch.bmm(a1.transpose(1, 2), g_out, out=g_states.view(n_chunks, Bsz * H, -1).transpose(0, 1))
    g_s0 = None
    if s0 is not None:
        g_across[..., 0] = torch.bmm(g_out, s0.reshape(Bsz * H, -1, 1)).view(Bsz, H, n_chunks + 1)
        g_s0 = torch.bmm(across[..., :1].reshape(Bsz * H, 1, n_chunks + 1), g_out).view(s0.shape)
    return g_states, g_across, g_s0


class _GatedRMSNorm(torch.autograd.Function):
    """rms_norm(y * silu(z)) * weight over the last dimension: Mamba-2's gated norm, with the formula of
    F.rms_norm. Written out because autograd's version materialises about twice as many (B, T, d_inner)
    tensors, forward and backward, and on a CPU each costs as much as the arithmetic on it."""

    @staticmethod
    def forward(ctx, y, z, weight, eps):
        C = y.size(-1)
        y2, z2 = y.reshape(-1, C), z.reshape(-1, C)
        gate = F.silu(z2)
        v = y2 * gate
        # vector_norm reads v once; a (1 x C) by (C x 1) bmm per row took 6x as long (and v * v writes v out again)
        r = torch.rsqrt(torch.linalg.vector_norm(v, dim=-1).square_().div_(C).add_(eps))[:, None]
        ctx.save_for_backward(y2, z2, gate, v, r, weight)
        ctx.shape = y.shape
        return (v * r).mul_(weight).view(y.shape)

    @staticmethod
    def backward(ctx, g_out):
        y2, z2, gate, v, r, weight = ctx.saved_tensors
        C = v.size(-1)
        g_out = g_out.reshape(-1, C)
        vr = v * r  # the normalised v
        gn = g_out * weight
        dot = torch.linalg.vecdot(gn, vr).div_(C)[:, None]
        gv = gn.addcmul_(vr, dot, value=-1).mul_(r)  # d/dv of (v * r): r * (gn - vr * mean(gn * vr))
        g_weight = vr.mul_(g_out).sum(0)
        gy = gv * gate
        gz = torch.ops.aten.silu_backward(gv.mul_(y2), z2)
        return gy.view(ctx.shape), gz.reshape(ctx.shape), g_weight, None


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
        return self.out_proj(_GatedRMSNorm.apply(y, z.float(), self.norm.weight, self.norm.eps).to(z.dtype))

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
        xbc = F.silu(self._causal_conv(xbc))
        x, b, c = xbc.split((self.d_inner, self.d_state, self.d_state), dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias)  # (B, T, H)
        if keep is not None:
            dt = dt * keep
        A = -torch.exp(self.A_log.float())
        x = x.float().view(Bsz, T, self.n_heads, self.headdim)
        y, final_state = ssd_scan(x, A * dt, b.float(), c.float(), self.chunk_size, dt=dt, D=self.D.float())
        if state is not None:
            state.ssm[self.layer] = final_state
        return self._gated_out(y.reshape(Bsz, T, self.d_inner), z)

    def _causal_conv(self, xbc):
        """The depthwise causal conv1d over time, (B, T, C) -> (B, T, C), with self.conv1d's parameters.

        Run as a 2-d convolution on a channels-last view, which is what (B, T, C) already is: the oneDNN
        kernel then reads and writes this layout directly, where nn.Conv1d on (B, C, T) would copy the
        input, the output and both gradients between the layouts (measured: half the time of that path).
        The bias is added outside the convolution: oneDNN's bias gradient for this layout costs twice its
        weight gradient (measured), a sum over (B, T) a twentieth of that.
        """
        k = self.conv1d.kernel_size[0]
        xbc = F.pad(xbc, (0, 0, k - 1, 0))  # causal: k - 1 zeros before the first step, none after
        w = self.conv1d.weight.unsqueeze(2)  # (C, 1, 1, k)
        out = F.conv2d(xbc.transpose(1, 2).unsqueeze(2), w, groups=self.conv_dim)
        return out.squeeze(2).transpose(1, 2).add_(self.conv1d.bias)

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
