"""Validation bits per byte reached on the shared TinyStories sample within a fixed wall-clock budget.

    .venv/bin/python benchmarks/quality.py [--minutes 10] [--arch llama] [--data ../shared/data/tinystories-sample]

It runs the pipeline's own stage functions (tokenizer: 4096-piece BPE; shard; train; evaluate's bits per byte) on
`train.jsonl` / `val.jsonl`. The training budget is wall-clock: a few timed steps measure the step time, then
`max_steps` is set so the cosine schedule ends when the budget does. Tokenizer training, sharding and the probes are
not counted against the budget; the final evaluation is. The last line is `val_bpb: <bits per byte>`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from model.tokenizer import load_tokenizer
from pipeline_config.schema import ModelSection, ShardConfig, TokenizerConfig, TrainConfig
from tasks.stage import write_manifest
from tasks.evaluate import validation_loss
from tasks.corpus.reader import split_tokens
from tasks.shard import shard_splits
from tasks.tokenizer import build_tokenizer
from tasks.training.loop import train

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories-sample"


def records(path: Path) -> list[dict[str, str]]:
    return [{"text": json.loads(line)["text"], "language": "en"} for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--arch", default="llama", choices=["gpt", "llama", "mamba2"])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    log = logging.getLogger("quality")

    work = Path(tempfile.mkdtemp(prefix="scriptorium-quality-"))
    train_docs, val_docs = records(args.data / "train.jsonl"), records(args.data / "val.jsonl")
    tok_dir, shard_dir = work / "tokenizer", work / "shards"
    tok_dir.mkdir()
    shard_dir.mkdir()
    build_tokenizer(TokenizerConfig(vocab_size=4096), train_docs, tok_dir, log)
    # The sample's own train/val files are the split.
    manifest = shard_splits(ShardConfig(), {"train": [d["text"] for d in train_docs], "val": [d["text"] for d in val_docs]},
                            tok_dir, shard_dir, log)
    shards = write_manifest(shard_dir, "shard", manifest)
    train_tokens = split_tokens(shards, "train")
    val_tokens = split_tokens(shards, "val")
    vocab = load_tokenizer(tok_dir).vocab_size
    log.info("data: %d train tokens, %d val tokens, vocab %d", train_tokens.size, val_tokens.size, vocab)

    model = ModelSection(
        arch=args.arch, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size,
        dropout=0.0, tie_weights=True,
    )
    base = dict(model=model, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=10, min_lr_ratio=0.1,
                weight_decay=0.1, track_emissions=False, dtype=args.dtype, eval_batches=4, log_interval=50)
    # Two probes of different lengths: their difference is the steady step time, without start-up and evaluation.
    probe_times = {}
    for probe_steps in (4, 12):
        started = time.perf_counter()
        train(TrainConfig(**base, max_steps=probe_steps, eval_interval=probe_steps), train_tokens, val_tokens, vocab,
              work / f"probe-{probe_steps}", log)
        probe_times[probe_steps] = time.perf_counter() - started
    step_time = (probe_times[12] - probe_times[4]) / 8
    overhead = probe_times[4] - 4 * step_time  # model build, evaluation: paid again by the real run
    budget = args.minutes * 60
    steps = max(int((budget - overhead) * 0.97 / step_time), 10)
    log.info("probe: %.3f s/step -> %d steps in %.1f minutes", step_time, steps, args.minutes)

    started = time.perf_counter()
    # max_seconds is the hard stop should the machine slow down after the probes (the schedule still spans `steps`)
    summary, net = train(TrainConfig(**base, max_steps=steps, max_seconds=budget - overhead, eval_interval=max(steps // 5, 1)), train_tokens,
                         val_tokens, vocab, work / "run", log)
    loss, scored = validation_loss(net.eval(), val_tokens, args.block_size, 16, 10_000)
    elapsed = time.perf_counter() - started
    totals = manifest["totals"]["val"]
    bpb = loss / math.log(2) * totals["tokens"] / totals["text_bytes"]
    print(f"arch {args.arch}, {summary['parameters'] / 1e6:.2f}M params, {summary['steps']}/{steps} steps, "
          f"{summary['tokens_per_s']:.0f} tok/s, {elapsed / 60:.1f} min, torch threads {torch.get_num_threads()}")
    print(f"val_loss: {loss:.4f} over {scored} tokens")
    print(f"val_bpb: {bpb:.4f}")


if __name__ == "__main__":
    main()
