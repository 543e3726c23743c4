"""export: the trained model as the tools people already use load it: a transformers folder and GGUF files.

    hf/                   AutoModelForCausalLM.from_pretrained("hf") and AutoTokenizer.from_pretrained("hf")
    model-f32.gguf        llama.cpp / llama-cpp-python; the source of the quantized files
    model-q8_0.gguf       llama.cpp's own quantizer (`export.quantize`)
    Modelfile             `ollama create NAME -f Modelfile` (FROM ./model-q8_0.gguf, plain completion)

The conversion itself is `model/export/` (it ships with the model, so `scriptorium export` can convert a registered
version outside the flow). Every file is checked before the manifest is written: the f32 GGUF is loaded by llama.cpp
and must continue a prompt greedily exactly as the PyTorch model does, so a layout mistake fails here, not in a
user's Ollama. A model with no exact equivalent in a format (GGUF of a char-level vocabulary, either format of a
word-level one; a Mamba-2 block whose layout differs from the stock one) is recorded as skipped with the reason, or
fails the stage with `on_unsupported: error`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.tokenizer import load_tokenizer
from pipeline_config.export import ExportConfig
from tasks.stage import Artifact, Stage, describe_files, prefect_task
from tasks.train import MODEL_CONFIG, WEIGHTS

if TYPE_CHECKING:  # torch and the exporters load when the stage runs, not when a cached run imports the pipeline
    import torch

HF_DIR = "hf"
MODELFILE = "Modelfile"
CHECK_PROMPT = "Once upon a time"
CHECK_TOKENS = 16


def gguf_name(kind: str) -> str:
    return f"model-{kind}.gguf"


def llama_cpp_greedy(path: Path, prompt_ids: list[int], n: int) -> list[int]:
    """The greedy continuation llama.cpp computes for `prompt_ids` from a GGUF file (no sampling involved)."""
    import llama_cpp

    # an f32 KV cache: the default f16 one moves logits by ~1e-3 on its own, enough to flip a near-tie
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt_ids) + n + 8, n_threads=1, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        out: list[int] = []
        for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if token == llm.token_eos() or len(out) == n:
                break
            out.append(int(token))
        return out
    finally:
        llm.close()


def check_gguf(model: torch.nn.Module, tokenizer: Any, path: Path) -> dict[str, Any]:
    """PyTorch and llama.cpp must continue the same prompt with the same tokens."""
    from model.export import ExportError
    from model.generation import generate_ids

    prompt = [tokenizer.bos_id, *tokenizer.encode([CHECK_PROMPT])[0]]
    room = max(model.config.block_size - len(prompt), 1) if model.config.arch != "mamba2" else CHECK_TOKENS
    n = min(CHECK_TOKENS, room)
    [ours] = generate_ids(model, [prompt], n, temperature=0.0, eos_id=tokenizer.eos_id)
    theirs = llama_cpp_greedy(path, prompt, n)
    if ours[: len(theirs)] != theirs or (len(theirs) < len(ours) and tokenizer.eos_id not in ours):
        raise ExportError(f"{path.name}: llama.cpp continues {CHECK_PROMPT!r} with {theirs}, PyTorch with {ours}: the "
                          "conversion is wrong for this model; please report it with the model config")
    return {"prompt": CHECK_PROMPT, "tokens": len(theirs), "matches_pytorch": True}


def _write_gguf(cfg: ExportConfig, model, tokenizer_dir: Path, out_dir: Path, log: logging.Logger) -> dict[str, Any]:
    from model.export import ExportError, export_gguf, quantize_gguf, write_modelfile

    source = export_gguf(model, tokenizer_dir, out_dir / gguf_name(cfg.gguf_outtype), cfg.gguf_outtype)
    written = {"files": [source.name], "check": check_gguf(model, load_tokenizer(tokenizer_dir), source)}
    for kind in cfg.quantize:
        try:
            written["files"].append(quantize_gguf(source, out_dir / gguf_name(kind), kind).name)
        except ExportError as err:  # a k-quant that does not fit these widths: the other types are still useful
            written.setdefault("skipped", {})[kind] = str(err)
            log.warning("export: no %s GGUF: %s", kind, err)
    if cfg.modelfile and gguf_name(cfg.modelfile) in written["files"]:
        write_modelfile(out_dir, gguf_name(cfg.modelfile), cfg.temperature, num_ctx=model.config.block_size
                        if model.config.arch != "mamba2" else None)
        written["files"].append(MODELFILE)
    log.info("export: %s (llama.cpp continues the check prompt as PyTorch does)", ", ".join(written["files"]))
    return written


def export(cfg: ExportConfig, out_dir: Path, log: logging.Logger, *, tokenizer: Artifact,
           train: Artifact) -> dict[str, Any]:
    from model import load_model
    from model.export import ExportError, export_hf

    model = load_model(train.path / WEIGHTS, train.path / MODEL_CONFIG)
    files: list[str] = []
    skipped: dict[str, str] = {}
    checks: dict[str, Any] = {}
    for fmt in cfg.formats:
        try:
            if fmt == "hf":
                export_hf(model, tokenizer.path, out_dir / HF_DIR)
                files += sorted(str(p.relative_to(out_dir)) for p in (out_dir / HF_DIR).rglob("*") if p.is_file())
            else:
                written = _write_gguf(cfg, model, tokenizer.path, out_dir, log)
                files += written["files"]
                checks["gguf"] = written["check"]
                skipped.update(written.get("skipped", {}))
        except ExportError as err:
            if cfg.on_unsupported == "error":
                raise
            skipped[fmt] = str(err)
            log.warning("export: %s skipped: %s", fmt, err)
    return {"exported": files, "skipped": skipped, "checks": checks, "files": describe_files(out_dir, files)}


STAGE = Stage(name="export", run=export, inputs=("tokenizer", "train"))
export_task = prefect_task(STAGE)
