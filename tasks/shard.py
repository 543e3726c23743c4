"""shard: tokenize the corpus into Parquet shards (one flat integer column, zstd) with a manifest.

Each shard is one row group holding one column of token ids, `<s> doc </s>` after each other, as uint16 when the
vocabulary fits (half the bytes of uint32). One row group is what lets training read a shard back as a single
contiguous numpy array without a copy.

The train/val split is decided per document from a hash of its text, not from its position, so it is stable when
documents are added or reordered and identical on every machine. Tokenization runs on `num_workers` threads inside
SentencePiece's encoder (C++; it releases the GIL), and shards are compressed and written on a thread pool.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.tokenizer import load_tokenizer
from pipeline_config.schema import ShardConfig
from tasks.corpus.reader import corpus
from tasks.stage import Artifact, Stage, atomic_path, describe_files, prefect_task

SPLIT_BUCKETS = 1_000_000


def split_of(text: str, val_fraction: float) -> str:
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % SPLIT_BUCKETS
    return "val" if bucket < val_fraction * SPLIT_BUCKETS else "train"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def frame_documents(ids: list[list[int]], bos: int, eos: int, dtype: np.dtype) -> np.ndarray:
    """`<s> doc </s>` for each document, concatenated, without a Python loop per token."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    framed = np.empty(body.size + 2 * len(ids), dtype=dtype)
    starts = np.concatenate(([0], np.cumsum(lengths + 2)[:-1])).astype(np.int64)
    ends = starts + lengths + 1
    inside = np.ones(framed.size, dtype=bool)
    inside[starts] = inside[ends] = False
    framed[starts], framed[ends] = bos, eos
    framed[inside] = body
    return framed


def _write_shard(path: Path, tokens: np.ndarray, level: int) -> None:
    table = pa.table({"tokens": pa.array(tokens)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=level, row_group_size=max(len(tokens), 1))


def split_records(records: list[dict[str, str]], val_fraction: float) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for record in records:
        splits[split_of(record["text"], val_fraction)].append(record["text"])
    if not splits["val"] and len(splits["train"]) > 1:
        # Tiny corpora can hash every document into train; evaluation still needs something held out.
        splits["val"].append(splits["train"].pop())
    return splits


def shard_corpus(cfg: ShardConfig, records: list[dict[str, str]], tokenizer_dir: Path, out_dir: Path, log: logging.Logger) -> dict[str, Any]:
    return shard_splits(cfg, split_records(records, cfg.val_fraction), tokenizer_dir, out_dir, log)


def shard_splits(cfg: ShardConfig, splits: dict[str, list[str]], tokenizer_dir: Path, out_dir: Path, log: logging.Logger) -> dict[str, Any]:
    """Shard already-split texts ({"train": [...], "val": [...]}) into `out_dir`; returns the manifest fields."""
    if not splits.get("train"):
        raise ValueError("shard: no training documents (the corpus is empty or entirely held out)")
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)

    started = time.perf_counter()
    shards: list[dict[str, Any]] = []
    jobs = []
    with ThreadPoolExecutor(max_workers=cfg.num_workers) as pool:
        for split, texts in splits.items():
            for index, start in enumerate(range(0, len(texts), cfg.docs_per_shard)):
                chunk = texts[start : start + cfg.docs_per_shard]
                ids = tokenizer.encode(chunk, num_threads=cfg.num_workers)
                flat = frame_documents(ids, tokenizer.bos_id, tokenizer.eos_id, dtype)
                name = f"{split}-{index:05d}.parquet"
                jobs.append(pool.submit(_write_shard, out_dir / name, flat, cfg.compression_level))
                shards.append(
                    {
                        "file": name,
                        "split": split,
                        "documents": len(chunk),
                        "tokens": int(flat.size),
                        "text_bytes": sum(len(t.encode("utf-8")) for t in chunk),
                    }
                )
        for job in jobs:
            job.result()
    elapsed = time.perf_counter() - started
    totals = {
        split: {
            "documents": sum(s["documents"] for s in shards if s["split"] == split),
            "tokens": sum(s["tokens"] for s in shards if s["split"] == split),
            "text_bytes": sum(s["text_bytes"] for s in shards if s["split"] == split),
        }
        for split in ("train", "val")
    }
    total_bytes = sum(t["text_bytes"] for t in totals.values())
    log.info(
        "shard: %d shards, %d train / %d val tokens, %.1f MB/s",
        len(shards), totals["train"]["tokens"], totals["val"]["tokens"], total_bytes / 1e6 / max(elapsed, 1e-9),
    )
    files = describe_files(out_dir, [s["file"] for s in shards])
    for entry in shards:
        entry["sha256"] = files[entry["file"]]["sha256"]
    return {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "shards": shards, "totals": totals, "files": files}


def shard(cfg: ShardConfig, out_dir: Path, log: logging.Logger, *,
          acquire: Artifact | None, synthesize: Artifact | None, tokenizer: Artifact) -> dict[str, Any]:
    return shard_corpus(cfg, corpus(acquire, synthesize), tokenizer.path, out_dir, log)


STAGE = Stage(name="shard", run=shard, inputs=("acquire", "synthesize", "tokenizer"))
shard_task = prefect_task(STAGE)
