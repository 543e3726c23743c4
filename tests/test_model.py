"""Tests of model/: the three architectures behind one interface, on tiny configs (whole file: seconds)."""

import math

import pytest
import torch

from model import ModelConfig, build_model
from model.mamba2 import ssd_scan

ARCHS = ("gpt", "llama", "mamba2")
V, T, C = 64, 16, 32  # vocab, block_size, width of every tiny model below


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls gain nothing from threads, and the test machine's cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(arch: str, **overrides) -> ModelConfig:
    kw = dict(arch=arch, vocab_size=V, block_size=T, n_layer=2, n_head=4, n_embd=C)
    if arch == "mamba2":
        kw.update(d_state=8, headdim=8, chunk_size=8, expand=2)
    kw.update(overrides)
    return ModelConfig(**kw)


def make(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny(arch, **overrides)).eval()


def all_logits(model, idx, attention_mask=None):
    """Logits at every position: the forward returns all of them when given targets."""
    logits, _ = model(idx, torch.zeros_like(idx), attention_mask=attention_mask)
    return logits


# -----------------------------------------------------------------------------
# config and construction


def test_unknown_arch_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'gpt', 'llama' or 'mamba2'"):
        ModelConfig(arch="rnn")
    cfg = tiny("gpt").model_copy(update={"arch": "rnn"})  # past validation, as a hand-edited config would be
    with pytest.raises(ValueError, match="gpt, llama, mamba2"):
        build_model(cfg)


# -----------------------------------------------------------------------------
# parameter counts against closed forms


def gpt_params(cfg: ModelConfig, non_embedding: bool) -> int:
    c, f, b = cfg.n_embd, cfg.d_ff or 4 * cfg.n_embd, int(cfg.bias)
    layer = (
        2 * (c + b * c)  # two LayerNorms
        + (3 * c * c + b * 3 * c)  # c_attn
        + (c * c + b * c)  # attn c_proj
        + (c * f + b * f)  # c_fc
        + (f * c + b * c)  # mlp c_proj
    )
    n = cfg.n_layer * layer + (c + b * c) + cfg.vocab_size * c  # + ln_f + (tied) wte/lm_head
    if not non_embedding:
        n += cfg.block_size * c if cfg.pos_encoding == "learned" else 0
        n += 0 if cfg.tie_weights else cfg.vocab_size * c
    return n


def llama_params(cfg: ModelConfig, non_embedding: bool, d_ff: int) -> int:
    c, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    kv = cfg.n_kv_head or cfg.n_head
    layer = 2 * c + c * (c + 2 * kv * hd) + c * c + 3 * c * d_ff  # norms, qkv, wo, w1 w3 w2
    n = cfg.n_layer * layer + c + cfg.vocab_size * c
    if not non_embedding and not cfg.tie_weights:
        n += cfg.vocab_size * c
    return n


def mamba2_params(cfg: ModelConfig, non_embedding: bool) -> int:
    c, di, ns = cfg.n_embd, cfg.expand * cfg.n_embd, cfg.d_state
    h = di // cfg.headdim
    conv_dim = di + 2 * ns
    layer = (
        c  # block RMSNorm
        + c * (2 * di + 2 * ns + h)  # in_proj -> z, x, B, C, dt
        + conv_dim * cfg.d_conv + conv_dim  # depthwise conv weight + bias
        + 3 * h  # dt_bias, A_log, D
        + di  # gated RMSNorm
        + di * c  # out_proj
    )
    n = cfg.n_layer * layer + c + cfg.vocab_size * c
    if not non_embedding and not cfg.tie_weights:
        n += cfg.vocab_size * c
    return n


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("overrides", [{}, {"bias": True}, {"pos_encoding": "sinusoidal"}, {"d_ff": 48}])
def test_gpt_param_count(tie, overrides):
    cfg = tiny("gpt", tie_weights=tie, **overrides)
    model = build_model(cfg)
    assert model.num_params(non_embedding=False) == gpt_params(cfg, non_embedding=False)
    assert model.num_params(non_embedding=True) == gpt_params(cfg, non_embedding=True)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
def test_llama_param_count(tie, n_kv_head):
    cfg = tiny("llama", tie_weights=tie, n_kv_head=n_kv_head)
    model = build_model(cfg)
    d_ff = 128  # 2/3 * 4 * 32 = 85.3, rounded up to a multiple of 64
    assert model.num_params(non_embedding=False) == llama_params(cfg, False, d_ff)
    assert model.num_params(non_embedding=True) == llama_params(cfg, True, d_ff)


def test_gqa_shrinks_only_the_kv_projection():
    mha = build_model(tiny("llama")).num_params()
    mqa = build_model(tiny("llama", n_kv_head=1)).num_params()
    hd = C // 4
    assert mha - mqa == 2 * 2 * C * (4 - 1) * hd  # n_layer * (k and v) * C * (dropped heads) * head dim


@pytest.mark.parametrize("tie", [True, False])
def test_mamba2_param_count(tie):
    cfg = tiny("mamba2", tie_weights=tie)
    model = build_model(cfg)
    assert model.num_params(non_embedding=False) == mamba2_params(cfg, False)
    assert model.num_params(non_embedding=True) == mamba2_params(cfg, True)


def test_flops_per_token():
    for arch in ("gpt", "llama"):
        cfg = tiny(arch)
        model = build_model(cfg)
        assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * 4 * (C // 4) * T
    cfg = tiny("mamba2")
    model = build_model(cfg)
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * (2 * C) * 8


def test_sinusoidal_positions_are_not_parameters():
    learned = make("gpt")
    fixed = make("gpt", pos_encoding="sinusoidal")
    assert not any("wpe" in name for name, _ in fixed.named_parameters())
    assert "wpe_table" in dict(fixed.named_buffers())
    assert not fixed.wpe_table.requires_grad
    assert learned.num_params(non_embedding=False) - fixed.num_params(non_embedding=False) == T * C
    assert "wpe_table" not in fixed.state_dict()  # rebuilt from the config, not stored


def test_rope_is_a_rotation_whose_scores_depend_on_relative_position():
    from model.layers import apply_rope, rope_tables

    torch.manual_seed(0)
    D = 8
    cos, sin = rope_tables(D, 32, theta=100.0)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def rotated(x, pos):
        return apply_rope(x, cos[pos : pos + 1], sin[pos : pos + 1])

    torch.testing.assert_close(rotated(q, 5).norm(), q.norm())  # a rotation keeps the norm
    score = (rotated(q, 7) * rotated(k, 3)).sum()
    torch.testing.assert_close((rotated(q, 20) * rotated(k, 16)).sum(), score)  # same offset 4: same score
    assert not torch.allclose((rotated(q, 20) * rotated(k, 17)).sum(), score)
    # channel 0 pairs with channel D/2 and turns by angle pos * theta^0 = pos radians
    x = torch.zeros(1, 1, 1, D)
    x[..., 0] = 1.0
    out = rotated(x, 1)
    torch.testing.assert_close(out[0, 0, 0, [0, D // 2]], torch.tensor([math.cos(1.0), math.sin(1.0)]))


@pytest.mark.parametrize("arch", ARCHS)
def test_optimizer_groups(arch):
    model = make(arch)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == model.num_params(non_embedding=False)  # the tied matrix appears once


# -----------------------------------------------------------------------------
# behaviour


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_loss(arch):
    model = make(arch)
    idx = torch.randint(0, V, (2, T))
    logits, loss = model(idx)
    assert logits.shape == (2, 1, V) and loss is None
    targets = idx.clone()
    targets[:, :4] = -1  # ignored positions
    logits, loss = model(idx, targets)
    assert logits.shape == (2, T, V)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, V), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_causality(arch):
    model = make(arch)
    idx = torch.randint(0, V, (2, T))
    for t in (0, 6, T - 2):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % V
        a, b = all_logits(model, idx), all_logits(model, changed)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, t + 1], b[:, t + 1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("overrides", [{}, {"tie_weights": False}])
def test_cached_generation_equals_uncached(arch, overrides):
    model = make(arch, **overrides)
    prompt = torch.randint(0, V, (3, 5))
    # Attention models: 20 new tokens run past block_size=16, covering the fall back to recomputation.
    # Mamba-2 without a cache crops to block_size while its state does not, so compare within it.
    n_new = 20 if arch != "mamba2" else T - 5
    cached = model.generate(prompt, n_new, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, n_new, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 5 + n_new)
    assert torch.equal(cached, uncached)


def test_llama_gqa_cached_generation_equals_uncached():
    model = make("llama", n_kv_head=2)
    prompt = torch.randint(0, V, (2, 3))
    cached = model.generate(prompt, 12, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 12, temperature=0, use_cache=False))


def test_mamba2_recurrent_step_matches_chunked_forward():
    model = make("mamba2")
    idx = torch.randint(0, V, (2, 13))  # 13: not a multiple of chunk_size=8
    full = all_logits(model, idx)
    state = model._new_cache(2)
    step_logits = [model._forward_cached(idx[:, :3], state)]  # chunked prefill, then one token at a time
    step_logits += [model._forward_cached(idx[:, t : t + 1], state) for t in range(3, 13)]
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full[:, 2:], rtol=1e-4, atol=1e-5)


def test_ssd_scan_matches_sequential_recurrence():
    torch.manual_seed(0)
    B, L, H, P, N = 2, 11, 3, 4, 5
    x, b, c = torch.randn(B, L, H, P), torch.randn(B, L, N), torch.randn(B, L, N)
    a = -torch.rand(B, L, H)
    y, final = ssd_scan(x, a, b, c, chunk_size=4)
    h = torch.zeros(B, H, P, N)
    for t in range(L):
        h = h * a[:, t].exp()[..., None, None] + x[:, t, :, :, None] * b[:, t, None, None, :]
        torch.testing.assert_close(y[:, t], (h @ c[:, t][:, None, :, None]).squeeze(-1))
    torch.testing.assert_close(final, h)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_no_nan_and_does_not_leak(arch, side):
    model = make(arch)
    n_pad, n_real = 5, T - 5
    real = torch.randint(0, V, (1, n_real))
    reference = all_logits(model, real)  # the same tokens, unpadded
    pad = torch.zeros(1, n_pad, dtype=torch.long)  # token 0 as filler: padding must not matter at all
    parts = (pad, real) if side == "left" else (real, pad)
    padded = torch.cat(parts, dim=1)
    mask = torch.cat([torch.zeros_like(p) if p is pad else torch.ones_like(p) for p in parts], dim=1)
    # batched with an unpadded row, as a real padded batch would be
    idx = torch.cat((padded, torch.randint(0, V, (1, T))))
    mask = torch.cat((mask, torch.ones(1, T, dtype=torch.long)))
    logits = all_logits(model, idx, attention_mask=mask)
    assert not torch.isnan(logits).any()
    real_slots = slice(n_pad, None) if side == "left" else slice(0, n_real)
    torch.testing.assert_close(logits[:1, real_slots], reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_gradients_are_finite(arch):
    model = make(arch).train()
    idx = torch.randint(0, V, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :6] = 0  # left-padded row: its first queries have no real key at all
    targets = idx.masked_fill(mask == 0, -1)
    _, loss = model(idx, targets, attention_mask=mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_one_batch(arch):
    torch.manual_seed(0)
    model = build_model(tiny(arch)).train()
    idx = torch.randint(0, V, (4, T + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    _, first = model(x, y)
    for _ in range(60):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first.item(), (first.item(), loss.item())


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_trains(arch):
    model = make(arch).train()
    idx = torch.randint(0, V, (2, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)


# -----------------------------------------------------------------------------
# sampling


@pytest.mark.parametrize("arch", ARCHS)
def test_top_k_1_and_tiny_top_p_equal_greedy(arch):
    model = make(arch)
    prompt = torch.randint(0, V, (2, 4))
    greedy = model.generate(prompt, 8, temperature=0.0)
    torch.manual_seed(1)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_p=1e-6), greedy)


def test_sampling_respects_top_k():
    from model.layers import sample_next_token

    logits = torch.arange(10.0).repeat(200, 1)  # token 9 most likely, then 8, ...
    torch.manual_seed(0)
    samples = sample_next_token(logits, temperature=5.0, top_k=3)
    assert set(samples.flatten().tolist()) == {7, 8, 9}
    samples = sample_next_token(logits, temperature=1.0, top_p=0.8)  # p(9)=.63, p(8)=.23: both needed
    assert set(samples.flatten().tolist()) == {8, 9}


def test_generation_stops_at_eos():
    model = make("gpt")
    prompt = torch.randint(0, V, (2, 4))
    greedy = model.generate(prompt, 6, temperature=0.0)
    eos = int(greedy[0, 4])  # row 0's first new token
    out = model.generate(prompt, 6, temperature=0.0, eos_id=eos)
    assert (out[0, 4:] == eos).all()  # a finished row keeps emitting eos
    single = model.generate(prompt[:1], 6, temperature=0.0, eos_id=eos)
    assert single.shape == (1, 5)  # every row finished: stop at once
