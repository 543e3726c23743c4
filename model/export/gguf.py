"""Export to GGUF, the file llama.cpp (and so Ollama and llama-cpp-python) loads, and quantize it with llama.cpp itself.

The writer starts from the transformers-layout tensors of `hf.hf_tensors` and applies, tensor by tensor, what
llama.cpp's `convert_hf_to_gguf.py` does to that layout: the same names, the same reshapes, the same choice of which
tensors stay f32 in an f16 file. The one transform that moves numbers is llama's q/k permutation: llama.cpp's "llama"
architecture rotates interleaved channel pairs (2j, 2j+1), where we (and transformers) rotate (j, j + D/2), so the
rows of each q/k head are reordered (`permute`, the converter's `LlamaModel.permute`). GPT-2 has no RoPE and Mamba-2
no positions at all, so neither needs one.

Exactness: llama and mamba2 f32 files compute our function up to summation order (about 1e-5 on logits with an f32
KV cache; llama.cpp's default f16 KV cache alone adds about 1e-3). GPT-2 does not quite: llama.cpp's "gpt2" graph
evaluates GELU as the tanh approximation read from an f16 table, where ours (and transformers' "gelu") is the exact
erf form, which moves logits by about 1e-3. llama.cpp has no GPT-2-shaped architecture with exact GELU, so this is
the closest file there is. The tokenizer is exact for the pipeline's SentencePiece settings; one that squeezes
whitespace (remove_extra_whitespaces), which llama.cpp's SentencePiece tokenizer cannot do, raises `ExportError`.

Quantization is llama.cpp's own `llama_model_quantize` on the f32 file: the k-quants (q4_k_m, ...) need rows that are
a multiple of 256 values, and llama.cpp silently substitutes q5_0/q8_0 for tensors whose rows are not. A file in which
no tensor got the requested k-quant would be mislabelled, so that case raises `ExportError` instead.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from . import ExportError
from .hf import hf_tensors, refuse_options, sentencepiece_file, sentencepiece_proto, special_ids

log = logging.getLogger(__name__)

ARCH = {"llama": "llama", "gpt": "gpt2", "mamba2": "mamba2"}
OUTTYPES = ("f32", "f16")

# transformers name (layer index as {i}) -> GGUF name, per architecture: convert_hf_to_gguf's tensor map, for the
# tensors our three models have.
NAMES = {
    "llama": {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
        "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
        "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
        "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
        "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
        "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
        "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
        "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
        "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    },
    "gpt": {
        "transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
        "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
        "lm_head.weight": "output.weight",
        **{f"transformer.h.{{i}}.{hf}.{kind}": f"blk.{{i}}.{gg}.{kind}" for kind in ("weight", "bias") for hf, gg in (
            ("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
            ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down"))},
    },
    "mamba2": {
        "backbone.embeddings.weight": "token_embd.weight", "backbone.norm_f.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "backbone.layers.{i}.norm.weight": "blk.{i}.attn_norm.weight",
        "backbone.layers.{i}.mixer.in_proj.weight": "blk.{i}.ssm_in.weight",
        "backbone.layers.{i}.mixer.conv1d.weight": "blk.{i}.ssm_conv1d.weight",
        "backbone.layers.{i}.mixer.conv1d.bias": "blk.{i}.ssm_conv1d.bias",
        "backbone.layers.{i}.mixer.dt_bias": "blk.{i}.ssm_dt.bias",
        "backbone.layers.{i}.mixer.A_log": "blk.{i}.ssm_a",
        "backbone.layers.{i}.mixer.D": "blk.{i}.ssm_d",
        "backbone.layers.{i}.mixer.norm.weight": "blk.{i}.ssm_norm.weight",
        "backbone.layers.{i}.mixer.out_proj.weight": "blk.{i}.ssm_out.weight",
    },
}


def permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """convert_hf_to_gguf's `LlamaModel.permute`: per head, rows (j, j + D/2) -> rows (2j, 2j + 1), i.e. from the
    half-split RoPE pairing to the interleaved one llama.cpp's "llama" architecture rotates."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _to_gguf_layout(cfg, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
    """The per-tensor reshapes convert_hf_to_gguf applies to the transformers layout."""
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    if cfg.arch == "llama" and kind == "attn_q":
        return permute(t, cfg.n_head, cfg.n_head)
    if cfg.arch == "llama" and kind == "attn_k":
        return permute(t, cfg.n_head, cfg.kv_heads)
    conv1d = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
    if cfg.arch == "gpt" and gguf_name.endswith(".weight") and kind in conv1d:
        return t.t()  # Conv1D [in, out] back to [out, in]
    if cfg.arch == "mamba2" and kind == "ssm_conv1d" and gguf_name.endswith(".weight"):
        return t.squeeze(1)  # (conv_dim, 1, d_conv) -> (conv_dim, d_conv)
    if kind == "ssm_a":
        return (-torch.exp(t)).reshape(-1, 1)  # llama.cpp stores A itself, not log(-A)
    if kind == "ssm_d":
        return t.reshape(-1, 1)
    if kind == "ssm_norm":
        return t.reshape(1, -1)  # (n_group, d_inner / n_group) with one group
    return t


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's tensors under GGUF names and in llama.cpp's layout (numpy shape [out, in])."""
    cfg, names = model.config, NAMES[model.config.arch]
    out = {}
    for hf_name, t in hf_tensors(model).items():
        layer = re.search(r"\.(\d+)\.", hf_name)
        key = hf_name.replace(layer.group(0), ".{i}.", 1) if layer else hf_name
        gguf_name = names[key].format(i=layer.group(1) if layer else "")
        out[gguf_name] = _to_gguf_layout(cfg, gguf_name, t).contiguous()
    return out


def _stays_f32(name: str, array: np.ndarray) -> bool:
    """convert_hf_to_gguf's rule: 1-D tensors, norms, position tables, conv kernels and non-`.weight` tensors
    stay f32 in an f16 file (much of llama.cpp handles only f32 there)."""
    return (array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or name.startswith("position_embd") or ".ssm_conv1d." in name)


# -----------------------------------------------------------------------------
# metadata


def _write_hparams(writer, cfg) -> None:
    """The keys llama.cpp's loader reads for each architecture (see convert_hf_to_gguf's set_gguf_parameters)."""
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.arch == "llama":
        writer.add_feed_forward_length(cfg.mlp_hidden)
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    elif cfg.arch == "gpt":
        writer.add_feed_forward_length(cfg.mlp_hidden)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_feed_forward_length(0)  # unused by mamba2, but the loader requires the keys
        writer.add_head_count(0)
        writer.add_ssm_conv_kernel(cfg.d_conv)
        writer.add_ssm_inner_size(cfg.d_inner)
        writer.add_ssm_state_size(cfg.d_state)
        writer.add_ssm_time_step_rank(cfg.n_ssm_heads)
        writer.add_ssm_group_count(1)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)


def _write_vocab(writer, sp_file: Path, vocab_size: int) -> None:
    """SentencePiece pieces, scores and types as llama.cpp's "llama" (SPM) tokenizer reads them; embedding rows
    beyond the tokenizer's pieces become unused [PADn] tokens, as the converter writes them."""
    import gguf
    import sentencepiece as spm

    proto, specials = sentencepiece_proto(sp_file), special_ids(sp_file, vocab_size)
    if proto.normalizer_spec.remove_extra_whitespaces:
        raise ExportError(
            f"{sp_file} squeezes repeated spaces (remove_extra_whitespaces), which llama.cpp's SentencePiece tokenizer "
            "does not do, so a GGUF would tokenize such text differently; retrain the tokenizer with "
            "remove_extra_whitespaces=False (the pipeline's setting), or use the transformers export"
        )
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [gguf.TokenType.UNUSED] * vocab_size
    for i in range(sp.get_piece_size()):
        tokens[i], scores[i] = sp.id_to_piece(i).encode("utf-8"), sp.get_score(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                    else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                    else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(specials["bos"][0])
    writer.add_eos_token_id(specials["eos"][0])
    writer.add_unk_token_id(specials["unk"][0])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    # Whether SentencePiece prepends "▁" to the text; llama.cpp's SPM tokenizer honours this switch.
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)


def export_gguf(model, tokenizer_dir: Path | str, out_path: Path | str, outtype: str = "f32") -> Path:
    """Write `model` and its SentencePiece tokenizer as one GGUF file (f32, or f16 matrices); returns the path."""
    import gguf

    if outtype not in OUTTYPES:
        raise ExportError(f"outtype={outtype!r}: write f32 or f16 here, then quantize_gguf() it to anything smaller")
    cfg = model.config
    refuse_options(cfg)
    sp_file = sentencepiece_file(Path(tokenizer_dir))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")  # a killed export leaves no file that looks finished
    writer = gguf.GGUFWriter(str(partial), ARCH[cfg.arch])  # opens the file only at write_header_to_file
    try:
        writer.add_name(f"scriptorium-{cfg.arch}")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        _write_hparams(writer, cfg)
        _write_vocab(writer, sp_file, cfg.vocab_size)
        for name, tensor in gguf_tensors(model).items():
            array = tensor.numpy()
            writer.add_tensor(name, array if outtype == "f32" or _stays_f32(name, array) else array.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        writer.close()
    os.replace(partial, out_path)
    return out_path


# -----------------------------------------------------------------------------
# quantization and Ollama


def _ftypes() -> dict[str, int]:
    import llama_cpp

    return {"f32": llama_cpp.LLAMA_FTYPE_ALL_F32, "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
            "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
            "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
            "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
            "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M, "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K}


def gguf_tensor_types(path: Path | str) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds, e.g. {"Q8_0": 14, "F32": 9}."""
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def _quietly(call, *args):
    """`call(*args)` with llama.cpp's log, as llama-cpp-python forwards it to sys.stderr, cut to its errors (what
    `Llama(verbose=False)` does): its INFO dump of every GGUF key is noise in a run's log, its errors are not."""
    forwarded = logging.getLogger("llama-cpp-python")
    level = forwarded.level
    forwarded.setLevel(max(level, logging.ERROR))
    try:
        return call(*args)
    finally:
        forwarded.setLevel(level)


def quantize_gguf(src: Path | str, dst: Path | str, qtype: str = "q8_0") -> Path:
    """Quantize an f32/f16 GGUF with llama.cpp's own quantizer (its mixture rules included, e.g. q4_k_m keeps some
    tensors at q6_k). ExportError if llama.cpp fails, or if a k-quant fell back on every tensor (rows not a
    multiple of 256 values), which would leave a file named for a type it does not contain."""
    import llama_cpp

    ftypes = _ftypes()
    if qtype not in ftypes:
        raise ExportError(f"qtype={qtype!r}: choose one of {', '.join(ftypes)}")
    src, dst = Path(src), Path(dst)
    partial = dst.with_name(dst.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[qtype]
    params.allow_requantize = True
    params.nthread = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if _quietly(llama_cpp.llama_model_quantize, str(src).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        partial.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp could not quantize {src} to {qtype}; its log above says which tensor and why")
    if qtype.endswith(("_k", "_k_m")):
        types = gguf_tensor_types(partial)
        if not any(name.endswith("_K") for name in types):
            partial.unlink(missing_ok=True)
            raise ExportError(
                f"{qtype} does not fit this model: k-quants need rows that are a multiple of 256 values, and llama.cpp "
                f"fell back on every tensor ({types}). Use q8_0/q5_0/q4_0, or a width (n_embd, d_ff) that is a "
                "multiple of 256."
            )
        log.info("%s: tensor types %s (q5_0/q8_0 where a row is not a multiple of 256)", dst, types)
    os.replace(partial, dst)
    return dst


def write_modelfile(directory: Path | str, gguf_name: str, temperature: float = 0.8, stop: tuple[str, ...] = ("</s>",),
                    num_ctx: int | None = None) -> Path:
    """An Ollama Modelfile next to the GGUF (`ollama create NAME -f Modelfile`): plain completion, no chat template,
    since the model was trained on raw text. `num_ctx` (the model's block_size) keeps Ollama from running an
    attention model past the positions it was trained on."""
    lines = [f"FROM ./{gguf_name}", 'TEMPLATE """{{ .Prompt }}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    lines.append(f"PARAMETER temperature {temperature}")
    if num_ctx is not None:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    path = Path(directory) / "Modelfile"
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path
