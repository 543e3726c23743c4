"""What exporting costs in quality and buys in speed: PyTorch against llama.cpp on each GGUF type, side by side.

    .venv/bin/python benchmarks/export.py [--train-seconds 60] [--arch llama] [--threads 2]
    .venv/bin/python benchmarks/export.py --model-dir ARTIFACT --tokenizer-dir TOKENIZER [--val-tokens val.npy]

Without --model-dir it trains a tokenizer (SentencePiece BPE, as the pipeline does) and a small model for a fixed
wall-clock budget on the shared TinyStories sample (`train.jsonl`; `val.jsonl` is the validation text). Then, for the
PyTorch model and for every GGUF type (f32, f16, and llama.cpp's q8_0 and q4_k_m quantizations of the f32 file), it
prints in one table:

- validation bits per byte on the same consecutive windows of the same tokens (nats / ln 2 / UTF-8 bytes, as the
  evaluate stage computes it), so the cost of each quantization reads directly off the column;
- greedy decode tokens/s of a single stream: PyTorch `generate` with its KV cache against llama.cpp's own decode loop
  (argmax, one token per call), both on --threads threads, best of --repeats runs. Prefill is left out.

The reference for every row is the PyTorch row of the same run. llama.cpp runs with its default f16 KV cache (what
llama-cpp-python and Ollama use) unless --kv-type f32. The CPU's vector extensions are printed first, because
llama.cpp's kernels (and so every GGUF row) depend on them; figures from machines with different flags do not compare.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from model import ModelConfig, build_model  # noqa: E402
from model.export import ExportError, export_gguf, gguf_tensor_types, quantize_gguf  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories-sample"
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m")


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    model = re.search(r"^model name\s*:(.*)$", text, re.M)
    vector = ("avx", "avx2", "fma", "f16c")
    wanted = sorted(f for f in flags if f in vector or f.startswith(("avx512", "amx", "avx_vnni")))
    return f"{model.group(1).strip() if model else 'unknown CPU'}; {' '.join(wanted) or 'no AVX'}"


# -----------------------------------------------------------------------------
# the model and its data


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_tokenizer(texts: list[str], out: Path, vocab_size: int) -> Path:
    """The pipeline's SentencePiece settings (llama2.c's): BPE, byte fallback, digits split, no normalization."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, num_threads=2, minloglevel=2,
    )
    return out


def frame(sp, texts: list[str]) -> np.ndarray:
    """<s> doc </s> <s> doc </s> ..., as the shard stage lays documents out."""
    return np.array([t for ids in sp.encode(texts, num_threads=2) for t in (sp.bos_id(), *ids, sp.eos_id())], np.int64)


def train_model(cfg: ModelConfig, tokens: np.ndarray, seconds: float, batch_size: int, lr: float) -> torch.nn.Module:
    """AdamW at a constant learning rate on random windows for a wall-clock budget: trained enough that quantization
    error shows against a real loss, not tuned."""
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=lr, betas=(0.9, 0.95), device_type="cpu")
    rng, T = np.random.default_rng(0), cfg.block_size
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        rows = rng.integers(0, len(tokens) - T - 1, batch_size)[:, None] + np.arange(T + 1)
        batch = torch.from_numpy(tokens[rows])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"  trained {step} steps, {step * batch_size * T / (time.perf_counter() - start):,.0f} tokens/s")
    return model.eval()


def load_model_dir(directory: Path) -> torch.nn.Module:
    from safetensors.torch import load_model

    model = build_model(ModelConfig(**json.loads((directory / "model_config.json").read_text())))
    load_model(model, str(directory / "model.safetensors"))
    return model.eval()


def load_val_tokens(path: Path) -> np.ndarray:
    """A .npy array, a Parquet shard, or a shard directory (its val-*.parquet files, in order)."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.int64)
    import pyarrow.parquet as pq

    files = sorted(path.glob("val-*.parquet")) if path.is_dir() else [path]
    return np.concatenate([pq.read_table(f).column(0).to_numpy() for f in files]).astype(np.int64)


def text_bytes(sp, tokens: np.ndarray) -> int:
    """UTF-8 bytes the tokens stand for, decoded document by document (the specials stand for none)."""
    cuts = np.flatnonzero((tokens == sp.bos_id()) | (tokens == sp.eos_id()))
    docs = np.split(tokens, cuts)
    specials = {sp.bos_id(), sp.eos_id()}
    return sum(len(sp.decode([int(t) for t in d if t not in specials]).encode("utf-8")) for d in docs)


# -----------------------------------------------------------------------------
# the measurements


def windows(tokens: np.ndarray, block_size: int, n: int) -> np.ndarray:
    """n consecutive, non-overlapping windows of block_size + 1 tokens (inputs and their next tokens)."""
    n = min(n, (len(tokens) - 1) // block_size)
    return np.arange(n)[:, None] * block_size + np.arange(block_size + 1)


@torch.no_grad()
def pytorch_nats(model, tokens: np.ndarray, rows: np.ndarray) -> float:
    window = torch.from_numpy(tokens[rows])
    return model(window[:, :-1], window[:, 1:])[1].item()


def llama_cpp_nats(llm, tokens: np.ndarray, rows: np.ndarray) -> float:
    total = 0.0
    for row in tokens[rows]:
        llm.reset()
        llm.eval(row[:-1].tolist())
        logits = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
        peak = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
        total += float((log_z - logits[np.arange(len(row) - 1), row[1:]]).sum())
    return total / (rows.shape[0] * (rows.shape[1] - 1))


def pytorch_decode_rate(model, prompt: list[int], n: int, repeats: int) -> float:
    """Tokens/s of greedy decoding with the KV cache, prefill excluded: (n - 1) tokens over t(n) - t(1), each time the
    best of `repeats` runs (the least disturbed one, on a shared machine)."""
    x = torch.tensor([prompt])
    model.generate(x, 2, temperature=0.0)  # warm-up: first-call allocations
    best = []
    for length in (1, n):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(x, length, temperature=0.0)
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return (n - 1) / max(best[1] - best[0], 1e-9)


def llama_cpp_decode_rate(llm, prompt: list[int], n: int, repeats: int) -> float:
    """Tokens/s of llama.cpp's greedy decode, one token per call after an untimed prefill; best of `repeats`."""
    rates = []
    for _ in range(repeats):
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(n):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        rates.append(n / (time.perf_counter() - start))
    return max(rates)


@contextlib.contextmanager
def stderr_to(path: Path):
    """Send the process's stderr (file descriptor 2) to `path`: llama.cpp's quantizer prints a line per tensor there
    from C, past Python's logging, and would bury the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def gguf_files(model, tokenizer_dir: Path, work: Path, kinds: list[str]) -> dict[str, Path | str]:
    """kind -> GGUF path, or the reason llama.cpp's quantizer gave none (q4_k_m on narrow rows)."""
    files: dict[str, Path | str] = {"f32": export_gguf(model, tokenizer_dir, work / "model-f32.gguf")}
    for kind in kinds:
        if kind == "f16":
            files[kind] = export_gguf(model, tokenizer_dir, work / "model-f16.gguf", outtype="f16")
        elif kind != "f32":
            try:
                with stderr_to(work / "quantize.log"):
                    files[kind] = quantize_gguf(files["f32"], work / f"model-{kind}.gguf", kind)
            except ExportError as err:
                files[kind] = f"not written: {err}"
    return {kind: files[kind] for kind in kinds}


# -----------------------------------------------------------------------------
# the run


def prepare(args, work: Path):
    """(model, tokenizer dir, validation tokens, validation UTF-8 bytes)."""
    import sentencepiece as spm

    if args.model_dir:
        if not args.tokenizer_dir:
            sys.exit("--model-dir needs --tokenizer-dir (the tokenizer the model was trained with)")
        model, tokenizer_dir = load_model_dir(args.model_dir), args.tokenizer_dir
    else:
        start = time.perf_counter()
        tokenizer_dir = train_tokenizer(read_texts(args.data / "train.jsonl"), work, args.vocab_size)
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
        train = frame(sp, read_texts(args.data / "train.jsonl"))
        took = time.perf_counter() - start
        print(f"tokenizer: {args.vocab_size} pieces, {len(train):,} training tokens ({took:.0f} s)")
        cfg = ModelConfig(arch=args.arch, vocab_size=sp.get_piece_size(), n_layer=args.n_layer, n_head=args.n_head,
                          n_embd=args.n_embd, block_size=args.block_size)
        print(f"training {args.arch} {args.n_layer}x{args.n_embd} for {args.train_seconds:.0f} s")
        model = train_model(cfg, train, args.train_seconds, args.batch_size, args.lr)
    sp = spm.SentencePieceProcessor(model_file=str(Path(tokenizer_dir) / "tokenizer.model"))
    val = load_val_tokens(args.val_tokens) if args.val_tokens else frame(sp, read_texts(args.data / "val.jsonl"))
    return model, Path(tokenizer_dir), sp, val, text_bytes(sp, val)


def main() -> None:
    args = parse_args()
    import llama_cpp

    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_flags()}")
    print(f"threads: {args.threads} (torch and llama.cpp); llama.cpp KV cache: {args.kv_type}")
    work = Path(tempfile.mkdtemp(prefix="scriptorium-export-bench-"))
    model, tokenizer_dir, sp, val, n_bytes = prepare(args, work)
    cfg = model.config
    tokens_per_byte = len(val) / n_bytes
    rows = windows(val, cfg.block_size, args.val_windows)
    prompt = [sp.bos_id(), *sp.encode(args.prompt)]
    n_decode = args.decode_tokens if cfg.arch == "mamba2" else min(args.decode_tokens, cfg.block_size - len(prompt))
    print(f"validation: {rows.shape[0]} windows x {cfg.block_size} tokens; decode: {n_decode} tokens after "
          f"{len(prompt)} prompt tokens\n")

    def bpb(nats: float) -> float:
        return nats / math.log(2) * tokens_per_byte

    header = f"{'format':<14}{'MB':>8}{'val bpb':>10}{'d bpb':>9}{'decode tok/s':>14}{'x torch':>9}  tensor types"
    print(header + "\n" + "-" * len(header))
    ref_bpb, ref_rate = bpb(pytorch_nats(model, val, rows)), pytorch_decode_rate(model, prompt, n_decode, args.repeats)
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    print(f"{'pytorch f32':<14}{params_mb:>8.1f}{ref_bpb:>10.4f}{0:>9.4f}{ref_rate:>14.1f}{1:>9.2f}", flush=True)
    kv = llama_cpp.GGML_TYPE_F32 if args.kv_type == "f32" else llama_cpp.GGML_TYPE_F16
    for kind, path in gguf_files(model, tokenizer_dir, work, args.types).items():
        if isinstance(path, str):
            print(f"{'gguf ' + kind:<14}  {path}")
            continue
        n_ctx = max(cfg.block_size, len(prompt) + n_decode)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=cfg.block_size, logits_all=True,
                              n_threads=args.threads, type_k=kv, type_v=kv, verbose=False)
        try:
            value = bpb(llama_cpp_nats(llm, val, rows))
            rate = llama_cpp_decode_rate(llm, prompt, n_decode, args.repeats)
        finally:
            llm.close()
        types = ", ".join(f"{n} {t}" for t, n in sorted(gguf_tensor_types(path).items()))
        print(f"{'gguf ' + kind:<14}{path.stat().st_size / 1e6:>8.1f}{value:>10.4f}{value - ref_bpb:>+9.4f}"
              f"{rate:>14.1f}{rate / ref_rate:>9.2f}  {types}", flush=True)
    print(f"\nfiles in {work} (llama.cpp's quantization log: quantize.log)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.jsonl and val.jsonl")
    p.add_argument("--model-dir", type=Path, help="a train artifact (model.safetensors + model_config.json)")
    p.add_argument("--tokenizer-dir", type=Path, help="the tokenizer artifact the model was trained with")
    p.add_argument("--val-tokens", type=Path, help="validation tokens: .npy, a Parquet shard, or a shard folder")
    p.add_argument("--arch", default="llama", choices=["gpt", "llama", "mamba2"], help="architecture to train")
    p.add_argument("--n-layer", type=int, default=4, help="layers of the model trained here")
    p.add_argument("--n-embd", type=int, default=256, help="width; a multiple of 256 lets q4_k_m use k-quants")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--block-size", type=int, default=256, help="context length")
    p.add_argument("--vocab-size", type=int, default=2048, help="SentencePiece pieces")
    p.add_argument("--train-seconds", type=float, default=60.0, help="wall-clock training budget")
    p.add_argument("--batch-size", type=int, default=16, help="training windows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--val-windows", type=int, default=16, help="validation windows of block_size tokens")
    p.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens to time per runtime")
    p.add_argument("--repeats", type=int, default=3, help="decode timings per runtime; the best one is reported")
    p.add_argument("--prompt", default="once upon a time", help="decode prompt (after <s>)")
    p.add_argument("--types", default=",".join(GGUF_TYPES), type=lambda s: s.split(","), help="GGUF types, f32 first")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and llama.cpp")
    p.add_argument("--kv-type", default="f16", choices=["f16", "f32"], help="llama.cpp KV cache type")
    return p.parse_args()


if __name__ == "__main__":
    main()
