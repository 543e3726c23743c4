"""The Mamba-2 scan's written-out backward and fused paths against plain references (seconds, float64 mostly).

`ssd_scan` and the gated norm have hand-written backward passes (model/mamba2.py); these tests hold them
to the naive sequential recurrence and to autograd's own gradients, so a wrong term fails here.
"""

import pytest
import torch
import torch.nn.functional as F

from model.mamba2 import FACTOR_LOG_LIMIT, _GatedRMSNorm, factorable, ssd_scan


def sequential(x, a, b, c, h0):
    """The recurrence itself, one step at a time: h = exp(a) h + x b^T, y = h c."""
    h, ys = h0, []
    for t in range(x.size(1)):
        h = h * a[:, t].exp()[..., None, None] + x[:, t, :, :, None] * b[:, t, None, None, :]
        ys.append((h @ c[:, t][:, None, :, None]).squeeze(-1))
    return torch.stack(ys, 1), h


def inputs(L, decay_scale=2.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, P, N = 2, 3, 4, 5
    x = torch.randn(B, L, H, P, generator=g, dtype=dtype)
    a = -torch.rand(B, L, H, generator=g, dtype=dtype) * decay_scale
    b, c = torch.randn(B, L, N, generator=g, dtype=dtype), torch.randn(B, L, N, generator=g, dtype=dtype)
    h0 = torch.randn(B, H, P, N, generator=g, dtype=dtype)
    return x, a, b, c, h0


def chunk_cumsums(a, chunk):
    """The per-chunk cumsums ssd_scan decides its form on (for chunk-aligned a)."""
    B, L, H = a.shape
    return a.reshape(B, L // chunk, chunk, H).double().cumsum(2)


@pytest.mark.parametrize("factored", [True, False])  # the two forms of the within-chunk decays
@pytest.mark.parametrize("L, chunk", [(11, 4), (8, 4), (5, 8)])  # ragged tail, exact chunks, one short chunk
def test_scan_forward_and_gradients_match_the_sequential_recurrence(L, chunk, factored):
    ins = [t.requires_grad_(True) for t in inputs(L)]
    y, final = ssd_scan(*ins[:4], chunk, ins[4], factored=factored)
    weights = torch.randn_like(y), torch.randn_like(final)
    grads = torch.autograd.grad((y * weights[0]).sum() + (final * weights[1]).sum(), ins)
    y_ref, final_ref = sequential(*ins)
    grads_ref = torch.autograd.grad((y_ref * weights[0]).sum() + (final_ref * weights[1]).sum(), ins)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("factored", [True, False])
def test_fused_dt_and_skip_give_the_unfused_function_and_gradients(factored):
    x, _, b, c, h0 = [t.requires_grad_(True) for t in inputs(11)]
    dt = (torch.rand(2, 11, 3, dtype=torch.float64) + 0.1).requires_grad_(True)
    A, D = -torch.rand(3, dtype=torch.float64) * 3, torch.randn(3, dtype=torch.float64, requires_grad=True)
    fused = torch.autograd.gradcheck(
        lambda *t: ssd_scan(t[0], t[1] * A, t[2], t[3], 4, t[4], dt=t[1], D=t[5], factored=factored),
        (x, dt, b, c, h0, D))
    assert fused
    y, final = ssd_scan(x, dt * A, b, c, 4, h0, dt=dt, D=D, factored=factored)
    y_ref, final_ref = ssd_scan(x * dt[..., None], dt * A, b, c, 4, h0, factored=factored)
    torch.testing.assert_close(y, y_ref + x * D[:, None])
    torch.testing.assert_close(final, final_ref)


def test_float32_scan_keeps_float64_accuracy_under_strong_decay():
    # Per-step decays up to exp(-16): cumsums within a chunk reach the hundreds, where differencing them
    # in float32 alone loses ~1e-5 relative; the hi/lo split must keep the error at float32's own level.
    x, a, b, c, _ = inputs(64, decay_scale=16.0)
    assert not factorable(chunk_cumsums(a, 32))  # too strong to factor: the segsum form runs
    y64, final64 = ssd_scan(x, a, b, c, 32)
    y32, final32 = ssd_scan(*(t.float() for t in (x, a, b, c)), 32)
    assert ((y32.double() - y64).abs().max() / y64.abs().max()).item() < 2e-6
    assert ((final32.double() - final64).abs().max() / final64.abs().max()).item() < 2e-6


def test_factored_float32_scan_keeps_float64_accuracy_near_its_limit():
    # Chunks whose log-decay spans nearly 2 * FACTOR_LOG_LIMIT: the factors reach exp(+-60), the products the
    # matmuls form above the diagonal overflow float32 (masked out); values and gradients must stay at
    # float32's own accuracy and finite.
    x, a, b, c, h0 = inputs(64, decay_scale=1.0)
    a = a / chunk_cumsums(a, 32)[:, :, -1].neg().repeat_interleave(32, 1) * 1.9 * FACTOR_LOG_LIMIT
    spans = -chunk_cumsums(a, 32)[:, :, -1]
    assert factorable(chunk_cumsums(a, 32)) and spans.min() > 1.8 * FACTOR_LOG_LIMIT
    weights = torch.randn(2, 64, 3, 4, dtype=torch.float64), torch.randn_like(h0)
    results = {}
    for dtype in (torch.float64, torch.float32):
        ins = [t.to(dtype).requires_grad_(True) for t in (x, a, b, c, h0)]
        y, final = ssd_scan(*ins[:4], 32, ins[4], factored=True)
        loss = (y * weights[0].to(dtype)).sum() + (final * weights[1].to(dtype)).sum()
        results[dtype] = [y, final, *torch.autograd.grad(loss, ins)]
    y_ref, final_ref = sequential(x, a, b, c, h0)
    torch.testing.assert_close(results[torch.float64][0], y_ref, rtol=1e-9, atol=1e-9)
    for got, want in zip(results[torch.float32], results[torch.float64]):
        assert torch.isfinite(got).all()
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_the_default_picks_the_factored_form_where_it_is_exact():
    _, a, _, _, _ = inputs(64, decay_scale=2.0)  # spans ~64 per 64-step chunk, as at initialisation
    assert factorable(chunk_cumsums(a, 64))
    assert not factorable(chunk_cumsums(a * 3, 64))  # spans ~190: beyond float32's range once factored
    x, a, b, c, h0 = inputs(64, decay_scale=2.0)
    auto, forced = ssd_scan(x, a, b, c, 64, h0), ssd_scan(x, a, b, c, 64, h0, factored=False)
    for got, want in zip(auto, forced):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_scan_runs_in_float32_under_bf16_autocast():
    x, a, b, c, _ = inputs(8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, final = ssd_scan(x, a, b, c, 4)
    assert y.dtype == final.dtype == torch.float32
    torch.testing.assert_close(y, ssd_scan(x, a, b, c, 4)[0])


def test_gated_rms_norm_matches_the_formula_and_its_gradients():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(3, 5, 20, generator=g, dtype=torch.float64, requires_grad=True)  # z: a strided slice
    w = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    out = _GatedRMSNorm.apply(y, proj[..., 3:11], w, 1e-5)
    torch.testing.assert_close(out, F.rms_norm(y * F.silu(proj[..., 3:11]), (8,), w, 1e-5))
    assert torch.autograd.gradcheck(lambda y, p, w: _GatedRMSNorm.apply(y, p[..., 3:11], w, 1e-5), (y, proj, w))
