"""shard: tokenize the corpus into fixed-size Parquet shards (one flat integer column, zstd) with a manifest.

Each shard is one row group holding one column of token ids, `<s> doc </s>` after each other, as uint16 when the
vocabulary fits (half the bytes of uint32). One row group is what lets training read a shard back as a single
contiguous numpy array without a copy. Every shard of a stream holds exactly `tokens_per_shard` tokens but its last.

Streams: one for training (every language, in corpus order) and one validation stream per language, so evaluation
can report each language. The split is decided per document from its content hash (`tasks/corpus/sampling.py`), not
its position, so it is stable when documents are added or reordered; it is applied within each language: a language
whose documents the hash happens to hold out none of gets its lowest-hash document held out, so every language with
two documents or more has validation text.

It streams, in two mapped steps run by the configured task runner (`tasks/corpus/runner.py`: threads, or Dask):
1. `tokenize_chunk` per corpus chunk (a row group of acquire's documents): encode, frame, and write one raw run file
   per stream; memory is one chunk per worker.
2. `write_shard` per shard: the layout of each stream (its chunks' runs in chunk order, cut every `tokens_per_shard`
   tokens) is computed from the run sizes alone, so each shard is assembled from memory-mapped slices of runs.
Nothing depends on which worker ran what or when, so the shards are the same bytes on one thread or on a cluster.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
import socket
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from model.tokenizer import load_tokenizer
from pipeline_config.shard import ShardConfig
from tasks.corpus.reader import Chunk, Corpus
from tasks.corpus.runner import task_mapper
from tasks.corpus.sampling import BUCKETS, SPLIT, bucket
from tasks.stage import Artifact, PipelineError, Stage, atomic_path, describe_files, prefect_task

RUNS = ".runs"


class ShardError(PipelineError, ValueError):
    """The corpus cannot be split: nothing to train on, or nothing held out to validate on."""


def held_out(hashes: np.ndarray, val_fraction: float, forced: frozenset[int] = frozenset()) -> np.ndarray:
    """Which documents (by content hash) go to validation."""
    held = bucket(hashes, SPLIT) < np.uint64(round(val_fraction * BUCKETS))
    if forced:
        held |= np.isin(hashes, np.fromiter(forced, dtype=np.uint64, count=len(forced)))
    return held


def forced_val(corpus: Corpus, val_fraction: float) -> frozenset[int]:
    """For each language with two documents or more of which the hash holds out none: its lowest-bucket document.
    Reads only the languages and hashes (two small columns), never the text."""
    threshold = round(val_fraction * BUCKETS)
    counts: Counter[str] = Counter()
    has_val: set[str] = set()
    lowest: dict[str, tuple[int, int]] = {}
    for chunk in corpus.chunks:
        languages, hashes = chunk.keys()
        buckets = bucket(hashes, SPLIT)
        for lang in set(languages.tolist()):
            rows = np.flatnonzero(languages == lang)
            counts[lang] += rows.size
            first = rows[np.argmin(buckets[rows])]
            candidate = (int(buckets[first]), int(hashes[first]))
            lowest[lang] = min(lowest.get(lang, candidate), candidate)
            has_val.update([lang] if candidate[0] < threshold else [])
    return frozenset(lowest[lang][1] for lang in counts if lang not in has_val and counts[lang] > 1)


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


def _tokenizer(directory: str) -> Any:
    files = sorted(Path(directory).glob("*"))
    return _load_tokenizer(directory, tuple((f.name, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(directory: str, _stamp: tuple) -> Any:
    return load_tokenizer(Path(directory))  # once per worker process (and tokenizer), not once per chunk


def _run_file(runs_dir: str, index: int, stream: str) -> Path:
    return Path(runs_dir) / f"{index:06d}.{stream}.npy"


@task(name="tokenize-chunk", task_run_name="tokenize-{index}", cache_policy=NO_CACHE, persist_result=False)
def tokenize_chunk(chunk: Chunk, index: int, tokenizer_dir: str, runs_dir: str, val_fraction: float,
                   forced: frozenset[int], split: str | None = None) -> dict[str, Any]:
    """Encode one chunk and write its documents, framed, as one run file per stream; `split` overrides the hash."""
    batch = chunk.read()
    tokenizer = _tokenizer(tokenizer_dir)
    ids = tokenizer.encode(batch.texts)
    held = held_out(batch.hashes, val_fraction, forced).tolist() if split is None else [split == "val"] * len(ids)
    rows: dict[str, list[int]] = defaultdict(list)
    stats: dict[str, dict[str, Counter]] = {"train": defaultdict(Counter), "val": defaultdict(Counter)}
    for i, (lang, val) in enumerate(zip(batch.languages, held)):
        rows[f"val-{lang}" if val else "train"].append(i)
        stats["val" if val else "train"][lang].update(
            documents=1, tokens=len(ids[i]) + 2, text_bytes=len(batch.texts[i].encode("utf-8")))
    runs = {}
    dtype = token_dtype(tokenizer.vocab_size)
    for stream, members in rows.items():
        framed = frame_documents([ids[i] for i in members], tokenizer.bos_id, tokenizer.eos_id, dtype)
        with atomic_path(_run_file(runs_dir, index, stream)) as tmp, open(tmp, "wb") as handle:
            np.save(handle, framed)
        runs[stream] = int(framed.size)
    return {
        "runs": runs,
        "process": f"{socket.gethostname()}:{os.getpid()}",
        "stats": {name: {lang: dict(c) for lang, c in by_lang.items()} for name, by_lang in stats.items()},
        "text_bytes": sum(c["text_bytes"] for by_lang in stats.values() for c in by_lang.values()),
    }


@task(name="write-shard", task_run_name="write-{file}", cache_policy=NO_CACHE, persist_result=False)
def write_shard(file: str, pieces: list[tuple[str, int, int]], out_dir: str, level: int) -> None:
    """One shard from slices of memory-mapped runs."""
    tokens = np.concatenate([np.load(path, mmap_mode="r")[start:end] for path, start, end in pieces])
    _write_shard(Path(out_dir) / file, tokens, level)


def shard_layout(runs: list[dict[str, int]], runs_dir: str, per_shard: int) -> list[dict[str, Any]]:
    """Each stream (its chunks' runs, in chunk order) cut into shards of `per_shard` tokens: which slices of which
    run files make each shard. Depends on the run sizes only."""
    shards: list[dict[str, Any]] = []
    for stream in sorted({name for chunk in runs for name in chunk}, key=lambda name: (name != "train", name)):
        pieces, filled, number = [], 0, 0
        for index, chunk in enumerate(runs):
            start, size = 0, chunk.get(stream, 0)
            while start < size:
                take = min(size - start, per_shard - filled)
                pieces.append((str(_run_file(runs_dir, index, stream)), start, start + take))
                start, filled = start + take, filled + take
                if filled == per_shard:
                    shards.append({"file": f"{stream}-{number:05d}.parquet", "stream": stream, "tokens": filled,
                                   "pieces": pieces})
                    pieces, filled, number = [], 0, number + 1
        if filled:
            shards.append({"file": f"{stream}-{number:05d}.parquet", "stream": stream, "tokens": filled,
                           "pieces": pieces})
    return shards


def _totals(stats: list[dict[str, dict[str, dict[str, int]]]]) -> dict[str, Any]:
    totals: dict[str, Any] = {}
    for split in ("train", "val"):
        languages: dict[str, Counter] = defaultdict(Counter)
        for chunk in stats:
            for lang, row in chunk[split].items():
                languages[lang].update(row)
        overall = sum(languages.values(), Counter())
        totals[split] = {key: overall[key] for key in ("documents", "tokens", "text_bytes")}
        totals[split]["languages"] = {lang: dict(row) for lang, row in sorted(languages.items())}
    return totals


def shard_corpus(cfg: ShardConfig, corpus: Corpus | list[dict[str, str]], tokenizer_dir: Path, out_dir: Path,
                 log: logging.Logger) -> dict[str, Any]:
    """Shard `corpus` (or documents given as {text, language} records), split by content hash, into `out_dir`."""
    corpus = Corpus.from_records(corpus) if isinstance(corpus, list) else corpus
    forced = forced_val(corpus, cfg.val_fraction)
    return _shard(cfg, [(chunk, None) for chunk in corpus.chunks], forced, tokenizer_dir, out_dir, log)


def shard_splits(cfg: ShardConfig, splits: dict[str, list[str]], tokenizer_dir: Path, out_dir: Path,
                 log: logging.Logger) -> dict[str, Any]:
    """Shard texts already split ({"train": [...], "val": [...]}, one language) into `out_dir`."""
    chunks = [(chunk, split) for split, texts in splits.items()
              for chunk in Corpus.from_records([{"text": t} for t in texts]).chunks]
    return _shard(cfg, chunks, frozenset(), tokenizer_dir, out_dir, log)


def _check_splits(layout: list[dict[str, Any]], totals: dict[str, Any], log: logging.Logger) -> None:
    streams = {s["stream"].split("-", 1)[0] for s in layout}
    if "train" not in streams:
        raise ShardError("shard: no training documents (the corpus is empty or entirely held out)")
    if "val" not in streams:
        languages = totals["train"]["languages"]
        count = ", ".join(f"{row['documents']} document{'s' * (row['documents'] != 1)} ({lang})"
                          for lang, row in languages.items())
        raise ShardError(f"shard: no held-out text: validation holds out whole documents, at least one of each "
                         f"language that has two, and the corpus has {count}; give acquire more documents (a text "
                         "file without blank lines is one document unless its source sets split_by: line)")
    alone = sorted(set(totals["train"]["languages"]) - set(totals["val"]["languages"]))
    if alone:
        log.warning("shard: nothing in %s is held out (one document, and validation holds out whole documents), so "
                    "evaluate reports no figures for it; give acquire more of its documents (split_by: line for a "
                    "text file without blank lines)", ", ".join(alone))


def _shard(cfg: ShardConfig, chunks: list[tuple[Chunk, str | None]], forced: frozenset[int], tokenizer_dir: Path,
           out_dir: Path, log: logging.Logger) -> dict[str, Any]:
    runs_dir, started = Path(out_dir) / RUNS, time.perf_counter()
    runs_dir.mkdir(parents=True, exist_ok=True)
    calls = [{"chunk": chunk, "index": i, "tokenizer_dir": str(tokenizer_dir), "runs_dir": str(runs_dir),
              "val_fraction": cfg.val_fraction, "forced": forced, "split": split} for i, (chunk, split) in enumerate(chunks)]
    with task_mapper(cfg.runner, cfg.num_workers, log) as run:
        results = run(tokenize_chunk, calls, "shard: chunks tokenized", size=lambda result: result["text_bytes"])
        layout = shard_layout([r["runs"] for r in results], str(runs_dir), cfg.tokens_per_shard)
        totals = _totals([r["stats"] for r in results])
        try:
            _check_splits(layout, totals, log)
        except ShardError:
            shutil.rmtree(runs_dir)
            raise
        run(write_shard, [{"file": s["file"], "pieces": s.pop("pieces"), "out_dir": str(out_dir),
                           "level": cfg.compression_level} for s in layout], "shard: shards written")
    shutil.rmtree(runs_dir)
    files = describe_files(out_dir, [s["file"] for s in layout])
    shards = [{"file": s["file"], "split": s["stream"].split("-", 1)[0], "language": s["stream"].partition("-")[2] or
               None, "tokens": s["tokens"], "sha256": files[s["file"]]["sha256"]} for s in layout]
    log.info("shard: %d shards, %d train / %d val tokens (val: %s), %.1f MB/s", len(shards), totals["train"]["tokens"],
             totals["val"]["tokens"], ", ".join(f"{lang} {row['tokens']}" for lang, row in
                                               totals["val"]["languages"].items()),
             sum(r["text_bytes"] for r in results) / 1e6 / max(time.perf_counter() - started, 1e-9))
    vocab_size = _tokenizer(str(tokenizer_dir)).vocab_size
    return {"dtype": token_dtype(vocab_size).name, "vocab_size": vocab_size, "chunks": len(chunks),
            "worker_processes": len({r["process"] for r in results}), "shards": shards, "totals": totals,
            "files": files}


def shard(cfg: ShardConfig, out_dir: Path, log: logging.Logger, *,
          acquire: Artifact | None, synthesize: Artifact | None, tokenizer: Artifact) -> dict[str, Any]:
    return shard_corpus(cfg, Corpus.of(acquire, synthesize), tokenizer.path, out_dir, log)


STAGE = Stage(name="shard", run=shard, inputs=("acquire", "synthesize", "tokenizer"))
shard_task = prefect_task(STAGE)
