"""The one configuration every architecture is built from.

A single flat dataclass, nanoGPT-style, so that the pipeline can construct any model from one
pydantic config slice with keyword arguments. Fields an architecture does not use are ignored by
it (documented per field) rather than split into per-arch classes: a sweep can then switch `arch`
without touching anything else.
"""

from dataclasses import dataclass

ARCHS = ("gpt", "llama", "mamba2")


@dataclass
class ModelConfig:
    arch: str = "gpt"  # "gpt" | "llama" | "mamba2"
    vocab_size: int = 1024
    block_size: int = 256  # context length: the longest sequence trained on, and the KV-cache cap
    n_layer: int = 4
    n_head: int = 4  # attention query heads (gpt, llama)
    n_kv_head: int | None = None  # llama only: None = n_head (MHA), 1 = multi-query, else grouped-query
    n_embd: int = 256
    # MLP hidden width. None: 4*n_embd for gpt; for llama SwiGLU 2/3 of that (so the three SwiGLU
    # matrices cost what GPT's two do), rounded up to a multiple of 64 for matmul-friendly shapes.
    d_ff: int | None = None
    dropout: float = 0.0
    bias: bool = False  # gpt only: biases in Linear and LayerNorm; llama and mamba2 never use them
    pos_encoding: str = "learned"  # gpt: "learned" | "sinusoidal"; llama always uses RoPE; mamba2 none
    tie_weights: bool = True  # share the token embedding with the output projection
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    pad_token_id: int | None = None  # informational: padding is expressed via attention_mask
    # Mamba-2 (SSM) fields
    d_state: int = 64  # SSM state size N per head
    d_conv: int = 4  # width of the causal depthwise convolution
    expand: int = 2  # d_inner = expand * n_embd
    headdim: int = 32  # SSM head dimension P; n_ssm_heads = d_inner // headdim
    chunk_size: int = 64  # SSD chunk length: the quadratic (attention-like) block size of the scan

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.arch == "llama":
            return _round_up(int(2 * 4 * self.n_embd / 3), 64)
        return 4 * self.n_embd

    @property
    def d_inner(self) -> int:
        return self.expand * self.n_embd

    @property
    def n_ssm_heads(self) -> int:
        return self.d_inner // self.headdim

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch={self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.arch in ("gpt", "llama"):
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.arch == "llama" and self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.kv_heads}")
        if self.arch == "gpt" and self.pos_encoding not in ("learned", "sinusoidal"):
            raise ValueError(f"pos_encoding={self.pos_encoding!r}: choose 'learned' or 'sinusoidal'")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim; n_embd/n_head = {self.head_dim}")
        if self.arch == "mamba2" and self.d_inner % self.headdim:
            raise ValueError(f"expand*n_embd={self.d_inner} must be divisible by headdim={self.headdim}")


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple
