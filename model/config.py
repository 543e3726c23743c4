"""The one schema every architecture is built from, with every check, used by the pipeline's config too.

A single flat model, nanoGPT-style, so that any model is one set of keyword arguments: fields an architecture does
not use are ignored by it (documented per field) rather than split into per-arch classes, so a sweep can switch
`arch` without touching anything else.

`ModelSection` is what a preset writes under `train.model` (pipeline_config/train.py uses it as is);
`ModelConfig` adds the vocabulary size, which comes from the tokenizer artifact, and is what `build_model` takes.
There is no second copy of these fields or of their checks anywhere: a configuration that passes here builds.
It is pydantic, not a dataclass, because it is the validation layer; it lives in `model/` because a registered
model carries this package (and pydantic is a dependency of MLflow itself).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ARCHS = ("gpt", "llama", "mamba2")


class ModelSection(BaseModel):
    """Every architecture knob; the vocabulary size is not one (it comes from the tokenizer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Literal["gpt", "llama", "mamba2"] = "gpt"
    block_size: int = Field(128, ge=2, description="context length: the longest sequence trained on, the KV-cache cap")
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1, description="attention query heads (gpt, llama)")
    n_kv_head: int | None = Field(None, ge=1, description="llama: None = n_head (MHA), 1 = multi-query, else GQA")
    n_embd: int = Field(128, ge=8)
    # MLP hidden width. None: 4*n_embd for gpt; for llama SwiGLU 2/3 of that (so the three SwiGLU matrices cost what
    # GPT's two do), rounded up to a multiple of 64 for matmul-friendly shapes.
    d_ff: int | None = Field(None, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    bias: bool = Field(False, description="gpt only: biases in Linear and LayerNorm; llama and mamba2 never use them")
    pos_encoding: Literal["learned", "sinusoidal"] = Field("learned", description="gpt only; llama uses RoPE")
    tie_weights: bool = Field(True, description="share the token embedding with the output projection")
    rope_theta: float = Field(10000.0, gt=0)
    # Speed-run options (modded-nanogpt and its kin); llama only, and off by default. None of them has a stock
    # transformers/llama.cpp equivalent, so the export stage refuses a model that uses one rather than drop it.
    qk_norm: bool = Field(False, description="llama: RMS-normalise each head's queries and keys (no gain) before RoPE")
    mlp: Literal["default", "relu2"] = Field(
        "default", description="default: SwiGLU (llama) / GELU (gpt); relu2: w2(relu(x w1)^2), hidden 4*n_embd (llama)")
    scale_embeddings: bool = Field(False, description="llama: multiply token embeddings by sqrt(n_embd)")
    norm_eps: float = Field(1e-5, gt=0)
    # Mamba-2 (SSM) fields
    d_state: int = Field(64, ge=1, description="mamba2: SSM state size N per head")
    d_conv: int = Field(4, ge=1, description="mamba2: width of the causal depthwise convolution")
    expand: int = Field(2, ge=1, description="mamba2: d_inner = expand * n_embd")
    headdim: int = Field(32, ge=1, description="mamba2: SSM head dimension P; n_ssm_heads = d_inner // headdim")
    chunk_size: int = Field(64, ge=1, description="mamba2: SSD chunk length, the quadratic block size of the scan")

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
        if self.arch == "llama" and self.mlp == "default":
            return _round_up(int(2 * 4 * self.n_embd / 3), 64)
        return 4 * self.n_embd

    @property
    def d_inner(self) -> int:
        return self.expand * self.n_embd

    @property
    def n_ssm_heads(self) -> int:
        return self.d_inner // self.headdim

    @model_validator(mode="after")
    def _shapes_fit(self) -> "ModelSection":
        if self.arch in ("gpt", "llama") and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.arch == "llama" and self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension; n_embd/n_head = {self.head_dim}: change n_embd or "
                             "n_head")
        if self.arch != "llama" and (self.qk_norm or self.mlp != "default" or self.scale_embeddings):
            raise ValueError(f"qk_norm, mlp: relu2 and scale_embeddings are llama options; arch is {self.arch!r}")
        if self.arch == "mamba2" and self.d_inner % self.headdim:
            raise ValueError(f"expand*n_embd ({self.d_inner}) must be divisible by headdim ({self.headdim})")
        return self


class ModelConfig(ModelSection):
    """A buildable model: the architecture knobs plus the vocabulary size."""

    vocab_size: int = Field(ge=1)
    pad_token_id: int | None = Field(None, description="informational: padding is expressed via attention_mask")


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple
