"""Validation bits per byte reached on the shared TinyStories sample within a fixed wall-clock budget.

    .venv/bin/python benchmarks/quality.py [--minutes 10] [--arch llama] [--data ../shared/data/tinystories-sample]
    .venv/bin/python benchmarks/quality.py --steps 300 --no-muon      # equal steps instead of equal time, one option off

It runs the pipeline's own stage functions (tokenizer: 4096-piece BPE; shard; train; evaluate's bits per byte) on
`train.jsonl` / `val.jsonl`. The training budget is wall-clock (`train.max_seconds`): the learning-rate schedule is
driven by the fraction of the budget spent, so the run ends fully decayed however fast the machine is; there is no
step count to guess in advance. Tokenizer training, sharding and model construction are not counted against the
budget; the final evaluation is reported apart. The last line is `val_bpb: <bits per byte>`.

Every speed-run option is a flag; the defaults are the best configuration found (Muon, QK-norm, ReLU^2, untied
embeddings; `--no-muon --no-qk-norm --no-relu2 --tie` is the previous configuration). How it was chosen: one change
at a time at EQUAL STEPS (benchmarks/quality_sweep.py --steps 150 --n-embd 128 --block-size 64, a smaller proxy of
this model, taken on a 2-core machine under heavy load from other work, so steps, not seconds):

    baseline (AdamW 3e-3, SwiGLU, tied)  1.6468      on top of Muon + ReLU^2 + untied   1.5093
      +muon                              1.5194        +qk_norm                         1.4848  (the defaults)
      +relu2                             1.5846        muon_learning_rate 0.04          1.5133
      untied                             1.5934        muon_learning_rate 0.01          1.5119
      +qk_norm                           1.7561        learning_rate 1.5e-3             1.5805
      +scale_embeddings                  1.7043
      learning_rate 6e-3                 1.8238

Per-step cost of each change on the full 4x256 model, A/B interleaved in one process (quality_sweep.py --ab 4
--no-train, under load; the A/A row read 0.89x, so about +-10%): Muon 1.17x, QK-norm 1.03x, ReLU^2 1.07x, untied
1.09x. Whether the equal-steps gains survive equal time is what `quality_sweep.py --minutes 10` on an idle machine
decides; its table is the figure of record. Batch size and sequence length change the tokens per step, so they are compared at equal time only (the sweep's
batch8/batch32/block128/block512 rows, for an idle machine). `--reference` trains the in-repo
GPT (nanoGPT's model.py layout: learned positions, GELU, tied embeddings, AdamW, fp32) instead, for the comparison
row against a nanoGPT-style model on the same data and budget.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from model.tokenizer import load_tokenizer
from pipeline_config.schema import ModelSection, ShardConfig, TokenizerConfig, TrainConfig
from tasks.corpus.reader import split_tokens
from tasks.evaluate import validation_loss
from tasks.shard import shard_splits
from tasks.stage import load_artifact, write_json, write_manifest
from tasks.tokenizer import build_tokenizer
from tasks.training.loop import train

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories-sample"


def records(path: Path) -> list[dict[str, str]]:
    return [{"text": json.loads(line)["text"], "language": "en"} for line in path.read_text().splitlines()
            if line.strip()]


def add_options(parser: argparse.ArgumentParser) -> None:
    """The model and optimizer flags, shared with quality_sweep.py; defaults are the chosen configuration."""
    parser.add_argument("--arch", default="llama", choices=["gpt", "llama", "mamba2"])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256, help="sequence length trained on")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW rate (embeddings/head/norms under Muon)")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--muon", action=argparse.BooleanOptionalAction, default=True,
                        help="Muon for the blocks' matrices (train.optimizer: muon)")
    parser.add_argument("--muon-lr", type=float, default=0.02)
    parser.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--relu2", action=argparse.BooleanOptionalAction, default=True, help="ReLU^2 MLP (llama)")
    parser.add_argument("--tie", action=argparse.BooleanOptionalAction, default=False,
                        help="tie the token embedding and the output head")
    parser.add_argument("--scale-embeddings", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--reference", action="store_true",
                        help="the nanoGPT-style row: in-repo GPT, AdamW, fp32, tied, the other options off")


def train_config(args: argparse.Namespace, **limits: Any) -> TrainConfig:
    """The TrainConfig the flags describe; `limits` are max_steps / max_seconds / eval_interval."""
    if args.reference:
        model = ModelSection(arch="gpt", n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                             block_size=args.block_size, dropout=0.0, tie_weights=True)
        optimizer: dict[str, Any] = {"dtype": "float32"}
    else:
        llama = args.arch == "llama"
        model = ModelSection(
            arch=args.arch, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size,
            dropout=0.0, tie_weights=args.tie, qk_norm=args.qk_norm and llama, mlp="relu2" if args.relu2 and llama
            else "default", scale_embeddings=args.scale_embeddings and llama,
        )
        optimizer = {"dtype": args.dtype, "optimizer": "muon" if args.muon else "adamw",
                     "muon_learning_rate": args.muon_lr}
    return TrainConfig(model=model, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup_steps,
                       min_lr_ratio=0.1, weight_decay=0.1, track_emissions=False, eval_batches=4, log_interval=50,
                       checkpoint_interval=10**9, **optimizer, **limits)


def prepare(data: Path, work: Path, log: logging.Logger) -> tuple[Any, Any, int, dict[str, int]]:
    """Tokenizer and shards of the sample (re-used when `work` already holds them): train and val tokens, the
    vocabulary size, the validation totals (tokens, bytes) bits per byte is computed from."""
    tok_dir, shard_dir = work / "tokenizer", work / "shards"
    shards = load_artifact(shard_dir, "shard")
    if shards is None:
        train_docs, val_docs = records(data / "train.jsonl"), records(data / "val.jsonl")
        tok_dir.mkdir(parents=True, exist_ok=True)
        shard_dir.mkdir(parents=True, exist_ok=True)
        build_tokenizer(TokenizerConfig(vocab_size=4096), train_docs, tok_dir, log)
        # The sample's own train/val files are the split.
        manifest = shard_splits(ShardConfig(), {"train": [d["text"] for d in train_docs],
                                                "val": [d["text"] for d in val_docs]}, tok_dir, shard_dir, log)
        shards = write_manifest(shard_dir, "shard", manifest)
    totals = json.loads((shard_dir / "manifest.json").read_text())["totals"]["val"]
    train_tokens, val_tokens = split_tokens(shards, "train"), split_tokens(shards, "val")
    vocab = load_tokenizer(tok_dir).vocab_size
    log.info("data: %d train tokens, %d val tokens, vocab %d", train_tokens.size, val_tokens.size, vocab)
    return train_tokens, val_tokens, vocab, totals


def run(cfg: TrainConfig, data: tuple, out: Path, log: logging.Logger) -> dict[str, Any]:
    """Train under `cfg`, then score the whole held-out split (up to 10,000 windows): steps, seconds, val_bpb."""
    train_tokens, val_tokens, vocab, totals = data
    started = time.perf_counter()
    summary, net = train(cfg, train_tokens, val_tokens, vocab, out, log)
    trained = time.perf_counter() - started
    with torch.no_grad():
        loss, scored = validation_loss(net.eval(), val_tokens, cfg.model.block_size, 16, 10_000)
    bpb = loss / math.log(2) * totals["tokens"] / totals["text_bytes"]
    return {"steps": summary["steps"], "train_seconds": trained, "tokens_per_s": summary["tokens_per_s"],
            "parameters": summary["parameters"], "val_loss": loss, "scored": scored, "val_bpb": bpb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget (train.max_seconds)")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of a time budget")
    parser.add_argument("--work", type=Path, default=None, help="keep the tokenizer and shards here (re-used)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    add_options(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    log = logging.getLogger("quality")
    work = args.work or Path(tempfile.mkdtemp(prefix="scriptorium-quality-"))
    data = prepare(args.data, work, log)
    limits = {"max_steps": args.steps, "eval_interval": max(args.steps // 5, 1)} if args.steps else \
        {"max_steps": 10**9, "max_seconds": args.minutes * 60, "eval_interval": 200}
    cfg = train_config(args, **limits)
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    result = run(cfg, data, out, log)
    if args.json:
        write_json(args.json, {"config": cfg.model_dump(mode="json"), **result})
    print(f"arch {cfg.model.arch}, {result['parameters'] / 1e6:.2f}M params, optimizer {cfg.optimizer}, "
          f"{result['steps']} steps, {result['tokens_per_s']:.0f} tok/s, {result['train_seconds'] / 60:.1f} min, "
          f"torch threads {torch.get_num_threads()}")
    print(f"val_loss: {result['val_loss']:.4f} over {result['scored']} tokens")
    print(f"val_bpb: {result['val_bpb']:.4f}")


if __name__ == "__main__":
    main()
