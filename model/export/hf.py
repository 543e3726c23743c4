"""Export to a transformers folder that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load, no custom code.

Each architecture becomes the stock transformers class that computes the same function:

- llama  -> LlamaForCausalLM. Our fused `wqkv` and `w13` are split into q/k/v and gate/up. RoPE needs no permutation:
  we rotate channel pairs (i, i + D/2) exactly as transformers' `rotate_half` does.
- gpt    -> GPT2LMHeadModel. GPT-2 stores its projections as `Conv1D` ([in, out]), so ours are transposed; a model
  without biases gets zero biases (adding 0 is exact); a sinusoidal model's fixed table becomes the learned `wpe`
  table, which computes the same thing. Our MLP uses exact (erf) GELU, which is transformers' "gelu", not GPT-2's
  default "gelu_new" (tanh approximation): the wrong one moves logits by about 1e-3.
- mamba2 -> Mamba2ForCausalLM. Same parameterisation (in_proj order z|x|B|C|dt, one group, gate-then-norm, per-head
  A_log/D/dt_bias), so the tensors only change names.

The tokenizer is our SentencePiece model as a `tokenizer.json` that encodes and decodes exactly as SentencePiece does
(BOS first), with tokenizer.model beside it for SentencePiece users (see `_write_tokenizer` for why not a plain
`LlamaTokenizer`). A character-level vocabulary becomes a `tokenizer.json` of its own (`_write_char_tokenizer`). A
word-level one raises `ExportError` (see `sentencepiece_file`), as does any tokenizer for GGUF but SentencePiece.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..tokenizer import BOS, EOS, SPECIALS, UNK, CharTokenizer, load_tokenizer
from . import ExportError

SAFETENSORS = "model.safetensors"
CHAR_SPECIALS = {name: (i, SPECIALS[i]) for name, i in (("unk", UNK), ("bos", BOS), ("eos", EOS))}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt": "GPT2LMHeadModel", "mamba2": "Mamba2ForCausalLM"}


def sentencepiece_file(tokenizer_dir: Path) -> Path:
    """The tokenizer.model to export, or ExportError for a tokenizer that transformers or llama.cpp cannot express
    (for transformers, `char_vocabulary` is asked first)."""
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "tokenizer.model").is_file():
        return tokenizer_dir / "tokenizer.model"
    if char_vocabulary(tokenizer_dir) is not None:
        raise ExportError(
            f"{tokenizer_dir} holds a character-level vocabulary (vocab.json), which GGUF cannot carry: llama.cpp's "
            "tokenizers stop the whole process (an uncaught std::out_of_range in llama_vocab::byte_to_token) on a "
            "character outside the vocabulary unless it holds the 256 byte tokens <0x00>..<0xFF>, for which this "
            "model has no embedding rows. The transformers folder (export.formats: [hf]) has it; train with "
            "tokenizer.kind=sentencepiece for GGUF."
        )
    if (tokenizer_dir / "vocab.json").is_file():
        raise ExportError(
            f"{tokenizer_dir} holds a word-level vocabulary (vocab.json), which is not exportable: neither "
            "transformers nor llama.cpp/GGUF has a tokenizer that takes a known word as one id and spells an unknown "
            "one in characters (their BPE needs every intermediate merge in the vocabulary). Train the model with a "
            "SentencePiece tokenizer (tokenizer.kind=sentencepiece) to export it."
        )
    raise ExportError(f"no tokenizer.model in {tokenizer_dir}: point tokenizer_dir at the tokenizer stage's output")


def char_vocabulary(tokenizer_dir: Path) -> list[str] | None:
    """The pieces of a character-level vocabulary (id = position), else None; which kind a tokenizer directory holds
    is `load_tokenizer`'s call, as when the model is trained and evaluated."""
    try:
        tokenizer = load_tokenizer(Path(tokenizer_dir))
    except FileNotFoundError:
        return None
    return tokenizer.itos if isinstance(tokenizer, CharTokenizer) else None


def special_ids(sp_file: Path, vocab_size: int) -> dict[str, tuple[int, str]]:
    """unk/bos/eos as (id, piece) from the SentencePiece model; ExportError if one is missing or outside the model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    if sp.get_piece_size() > vocab_size:
        raise ExportError(
            f"the tokenizer has {sp.get_piece_size()} pieces but the model only {vocab_size} embedding rows: "
            "the model was trained with another tokenizer; export it with the tokenizer it was trained on"
        )
    ids = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    missing = [name for name, i in ids.items() if i < 0]
    if missing:
        raise ExportError(
            f"{sp_file} defines no {'/'.join(missing)} piece; retrain it with unk_id=0, bos_id=1, eos_id=2"
        )
    return {name: (i, sp.id_to_piece(i)) for name, i in ids.items()}


# -----------------------------------------------------------------------------
# tensors, under transformers' names


def _llama_tensors(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = block.attention.wqkv.weight.split((q_dim, kv_dim, kv_dim), dim=0)
        gate, up = block.feed_forward.w13.weight.chunk(2, dim=0)  # FeedForward.forward: gate, up = w13(x).chunk(2)
        out |= {
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attention.wo.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.feed_forward.w2.weight,
            p + "input_layernorm.weight": block.attention_norm.weight,
            p + "post_attention_layernorm.weight": block.ffn_norm.weight,
        }
    if not cfg.tie_weights:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def _gpt_tensors(model) -> dict[str, torch.Tensor]:
    cfg = model.config

    def affine(prefix: str, module, transpose: bool) -> dict[str, torch.Tensor]:
        # Conv1D keeps [in, out]; a module built with bias=False gets GPT-2's mandatory bias as zeros.
        weight = module.weight.t() if transpose else module.weight
        width = weight.shape[-1] if transpose else weight.shape[0]
        bias = module.bias if module.bias is not None else torch.zeros(width)
        return {prefix + ".weight": weight, prefix + ".bias": bias}

    wpe = model.wpe.weight if cfg.pos_encoding == "learned" else model.wpe_table
    out = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": wpe}
    for i, block in enumerate(model.h):
        p = f"transformer.h.{i}."
        out |= affine(p + "ln_1", block.ln_1, False) | affine(p + "ln_2", block.ln_2, False)
        out |= affine(p + "attn.c_attn", block.attn.c_attn, True) | affine(p + "attn.c_proj", block.attn.c_proj, True)
        out |= affine(p + "mlp.c_fc", block.mlp.c_fc, True) | affine(p + "mlp.c_proj", block.mlp.c_proj, True)
    out |= affine("transformer.ln_f", model.ln_f, False)
    if not cfg.tie_weights:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def _mamba2_tensors(model) -> dict[str, torch.Tensor]:
    out = {"backbone.embeddings.weight": model.embedding.weight, "backbone.norm_f.weight": model.norm_f.weight}
    for i, block in enumerate(model.layers):
        p, m = f"backbone.layers.{i}.", block.mixer
        out |= {
            p + "norm.weight": block.norm.weight,
            p + "mixer.in_proj.weight": m.in_proj.weight, p + "mixer.out_proj.weight": m.out_proj.weight,
            p + "mixer.conv1d.weight": m.conv1d.weight, p + "mixer.conv1d.bias": m.conv1d.bias,
            p + "mixer.dt_bias": m.dt_bias, p + "mixer.A_log": m.A_log, p + "mixer.D": m.D,
            p + "mixer.norm.weight": m.norm.weight,
        }
    if not model.config.tie_weights:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def refuse_options(cfg) -> None:
    """The speed-run options (model/config.py) have no stock equivalent: refuse rather than export a model that
    computes something else."""
    used = [name for name, on in (("qk_norm", cfg.qk_norm), ("mlp: relu2", cfg.mlp == "relu2"),
                                  ("scale_embeddings", cfg.scale_embeddings)) if on]
    if used:
        raise ExportError(f"train.model uses {', '.join(used)}, which the stock Llama of transformers and llama.cpp "
                          "does not compute: train without it to export, or set export.formats: []")


def hf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names and layout, as contiguous fp32 CPU copies."""
    refuse_options(model.config)
    tensors = {"llama": _llama_tensors, "gpt": _gpt_tensors, "mamba2": _mamba2_tensors}[model.config.arch](model)
    # Copies: safetensors refuses tensors that share storage (split views, the tied embedding).
    return {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in tensors.items()}


# -----------------------------------------------------------------------------
# config


def hf_config(cfg, specials: dict[str, tuple[int, str]]):
    """The transformers config of the stock architecture that computes what `cfg` describes."""
    import transformers

    ids = {"bos_token_id": specials["bos"][0], "eos_token_id": specials["eos"][0], "pad_token_id": None}
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_weights, "dtype": "float32", **ids}
    if cfg.arch == "llama":
        return transformers.LlamaConfig(
            hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
            rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            max_position_embeddings=cfg.block_size, attention_bias=False, mlp_bias=False, **common,
        )
    if cfg.arch == "gpt":
        return transformers.GPT2Config(
            n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_inner=cfg.mlp_hidden, activation_function="gelu", layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    return transformers.Mamba2Config(
        hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, state_size=cfg.d_state, expand=cfg.expand,
        conv_kernel=cfg.d_conv, n_groups=1, head_dim=cfg.headdim, num_heads=cfg.n_ssm_heads, chunk_size=cfg.chunk_size,
        layer_norm_epsilon=cfg.norm_eps, use_bias=False, use_conv_bias=True, time_step_limit=(0.0, float("inf")),
        **common,
    )


def sentencepiece_proto(sp_file: Path):
    """The SentencePiece model's settings; ExportError if it normalizes text (NFKC and the like), which neither the
    tokenizer.json written here nor llama.cpp reproduces."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_file.read_bytes())
    if proto.normalizer_spec.name != "identity":
        raise ExportError(
            f"{sp_file} normalizes text with {proto.normalizer_spec.name!r}, which the exported tokenizers do not "
            'reproduce; retrain it with normalization_rule_name="identity" (the pipeline\'s setting) to export it'
        )
    return proto


def _write_tokenizer(sp_file: Path, proto, specials: dict[str, tuple[int, str]], cfg, out_dir: Path) -> None:
    """tokenizer.model, plus a tokenizer.json that encodes and decodes exactly as SentencePiece does.

    transformers' `LlamaTokenizer` builds the right BPE vocabulary and merges from tokenizer.model, but always
    pre-tokenizes with `Metaspace`, which adds no "▁" to text that already starts with a space: SentencePiece's dummy
    prefix is added unconditionally, so " the" would lose a token. The converted vocabulary is therefore saved with
    SentencePiece's own normalization (prepend "▁", spaces to "▁") and loaded through the generic tokenizer class.
    """
    from tokenizers import Regex, decoders, normalizers
    from transformers import LlamaTokenizer

    dummy_prefix, squeeze = proto.normalizer_spec.add_dummy_prefix, proto.normalizer_spec.remove_extra_whitespaces
    shutil.copyfile(sp_file, out_dir / "tokenizer.model")
    tokens = {"bos_token": specials["bos"][1], "eos_token": specials["eos"][1], "unk_token": specials["unk"][1]}
    backend = LlamaTokenizer.from_pretrained(
        out_dir, **tokens, add_bos_token=True, add_eos_token=False, legacy=False
    ).backend_tokenizer
    # remove_extra_whitespaces trims and collapses U+0020 only (a newline is not a space to SentencePiece). \A and
    # \z, not ^ and $: the tokenizers regex engine (Oniguruma) matches ^ after every newline.
    steps = [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")] if squeeze else []
    steps += [normalizers.Prepend("▁")] if dummy_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(content=" ", left=1)] if dummy_prefix else []),
    ])
    backend.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **tokens, "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.block_size,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n", encoding="utf-8")


def _write_char_tokenizer(pieces: list[str], cfg, out_dir: Path) -> None:
    """A tokenizer.json that encodes and decodes as `model.tokenizer.CharTokenizer` does: one id per character (a
    BPE with no merges splits text into characters), <unk> for each unseen one, <s> first; decoding concatenates and
    drops the three specials. `split_special_tokens`: the text "<s>" is three characters, as in training."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    backend = Tokenizer(models.BPE(vocab={piece: i for i, piece in enumerate(pieces)}, merges=[],
                                   unk_token=CHAR_SPECIALS["unk"][1], fuse_unk=False))
    backend.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                                for _, piece in CHAR_SPECIALS.values()])
    bos = CHAR_SPECIALS["bos"]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos[1]} $A", pair=f"{bos[1]} $A {bos[1]} $B",
                                                           special_tokens=[(bos[1], bos[0])])
    backend.decoder = decoders.Fuse()
    backend.save(str(out_dir / "tokenizer.json"))
    tokens = {f"{name}_token": piece for name, (_, piece) in CHAR_SPECIALS.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens, "pad_token": None, "add_bos_token": True,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "split_special_tokens": True,
              "model_max_length": cfg.block_size}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n", encoding="utf-8")


def _tokenizer_writer(tokenizer_dir: Path, cfg):
    """(specials, write(out_dir)) for the tokenizer in `tokenizer_dir`; ExportError before anything is written."""
    pieces = char_vocabulary(tokenizer_dir)
    if pieces is not None:
        if pieces[: len(CHAR_SPECIALS)] != [piece for _, piece in CHAR_SPECIALS.values()] or len(pieces) > \
                cfg.vocab_size:
            raise ExportError(f"{tokenizer_dir}/vocab.json is not the character vocabulary this model was trained "
                              f"with ({len(pieces)} pieces for {cfg.vocab_size} embedding rows)")
        return CHAR_SPECIALS, lambda out_dir: _write_char_tokenizer(pieces, cfg, out_dir)
    sp_file = sentencepiece_file(tokenizer_dir)
    proto, specials = sentencepiece_proto(sp_file), special_ids(sp_file, cfg.vocab_size)
    return specials, lambda out_dir: _write_tokenizer(sp_file, proto, specials, cfg, out_dir)


def export_hf(model, tokenizer_dir: Path | str, out_dir: Path | str) -> Path:
    """Write `model` and its tokenizer (SentencePiece or characters) as a transformers folder; returns `out_dir`."""
    import transformers
    from safetensors.torch import save_file

    cfg = model.config
    refuse_options(cfg)
    specials, write_tokenizer = _tokenizer_writer(Path(tokenizer_dir), cfg)  # refuse before writing
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Every file is written into a hidden folder inside out_dir, then renamed into place: a killed export leaves
    # out_dir as it was (a previous export stays whole, never new config beside old weights).
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".export-"))
    try:
        config = hf_config(cfg, specials)
        config.architectures = [ARCHITECTURES[cfg.arch]]
        config.save_pretrained(staging)
        save_file(hf_tensors(model), str(staging / SAFETENSORS), metadata={"format": "pt"})
        # Generation stops at </s>; attention models also at block_size, past which GPT-2 has no position row at all.
        limit = {} if cfg.arch == "mamba2" else {"max_length": cfg.block_size}
        transformers.GenerationConfig(
            bos_token_id=specials["bos"][0], eos_token_id=specials["eos"][0], pad_token_id=specials["eos"][0], **limit
        ).save_pretrained(staging)
        write_tokenizer(staging)
        for written in sorted(staging.iterdir()):
            os.replace(written, out_dir / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
