"""Throughput and peak memory of the data stages (acquire -> tokenizer -> shard) on a generated corpus of N MB.

    .venv/bin/python benchmarks/data.py [--mb 1000] [--vocab 1024] [--workdir DIR]

The corpus is JSON lines made from the shared TinyStories sample, each copy of a story made unique (so acquire's
duplicate check keeps it). Each stage runs through its plain stage function in a fresh process, so its peak RSS is
its own (`ru_maxrss`), and prints MB/s of corpus text. The ceiling is SentencePiece's raw `encode` of the same
documents with every core (the faster of one multi-threaded call and one call per core on threads), timed around the
encode calls only, in its own process. Goals on a 2-core machine: peak
RSS under 2 GB at 1000 MB and within 10% of the figure at 250 MB; shard at least 0.8x the ceiling. The last two
lines are `peak_rss_mb: <int>` and `shard_vs_ceiling: <ratio>`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinystories-sample" / "train.jsonl"
STAGES = ("acquire", "tokenizer", "shard", "ceiling")


def generate(source: Path, out: Path, megabytes: int) -> tuple[int, int]:
    """JSON lines of `megabytes` MB: the sample's stories, copy k of story i prefixed with its own number."""
    stories = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    written = count = copy = 0
    with open(out, "w", encoding="utf-8") as handle:
        while written < megabytes * 1_000_000:
            for i, story in enumerate(stories):
                line = json.dumps({"text": f"story {copy}.{i}: {story}"}, ensure_ascii=False) + "\n"
                handle.write(line)
                written, count = written + len(line.encode("utf-8")), count + 1
                if written >= megabytes * 1_000_000:
                    break
            copy += 1
    return written, count


def run_stage(name: str, work: Path, vocab: int) -> dict:
    """One stage (or the ceiling) in this process; returns its seconds and the text bytes it went through."""
    from pipeline_config.schema import AcquireConfig, ShardConfig, SourceConfig, TokenizerConfig
    from tasks.acquire import acquire
    from tasks.shard import shard
    from tasks.stage import load_artifact, write_manifest
    from tasks.tokenizer import tokenizer

    log = logging.getLogger(f"bench.{name}")
    out = work / name
    out.mkdir(exist_ok=True)
    acquired = load_artifact(work / "acquire", "acquire")
    started = time.perf_counter()  # after the imports: a stage's figure is its own work
    if name == "acquire":
        fields = acquire(AcquireConfig(sources=[SourceConfig(path=str(work / "corpus.jsonl"))]), out, log)
    elif name == "tokenizer":
        fields = tokenizer(TokenizerConfig(vocab_size=vocab, num_threads=os.cpu_count()), out, log,
                           acquire=acquired, synthesize=None)
    elif name == "shard":
        fields = shard(ShardConfig(num_workers=os.cpu_count()), out, log, acquire=acquired, synthesize=None,
                       tokenizer=load_artifact(work / "tokenizer", "tokenizer"))
    else:
        return ceiling(work, acquired)
    seconds = time.perf_counter() - started
    write_manifest(out, name, fields)
    return {"seconds": seconds, "text_bytes": (acquired.manifest if acquired else fields)["bytes"]}


def ceiling(work: Path, acquired) -> dict:
    """SentencePiece's encode over the acquired documents with every core, timing the encode calls only, two ways:
    one call with `num_threads` = cores, and one single-threaded call per core on threads (what shard does); the
    faster of the two is the ceiling."""
    import pyarrow.parquet as pq
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(work / "tokenizer" / "tokenizer.model"))
    file, cores = pq.ParquetFile(acquired.path / "documents.parquet"), os.cpu_count()
    seconds = {"one call on every core": 0.0, "a call per core": 0.0}
    with ThreadPoolExecutor(cores) as pool:
        for group in range(file.num_row_groups):
            texts = file.read_row_group(group, columns=["text"]).column(0).to_pylist()
            started = time.perf_counter()
            sp.encode(texts, num_threads=cores)
            seconds["one call on every core"] += time.perf_counter() - started
            started = time.perf_counter()
            list(pool.map(lambda part: sp.encode(part, num_threads=1), [texts[i::cores] for i in range(cores)]))
            seconds["a call per core"] += time.perf_counter() - started
    text_bytes = acquired.manifest["bytes"]
    return {"seconds": min(seconds.values()), "text_bytes": text_bytes,
            "ways": {way: text_bytes / 1e6 / spent for way, spent in seconds.items()}}


def child(name: str, work: Path, vocab: int) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = run_stage(name, work, vocab)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=1000, help="corpus size in MB of JSON lines")
    parser.add_argument("--vocab", type=int, default=1024, help="SentencePiece BPE vocabulary size")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the stories the corpus is made of")
    parser.add_argument("--workdir", type=Path, default=None, help="where to work (default: a temporary folder)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage, print JSON
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="scriptorium-data-"))
    if args.stage:
        return child(args.stage, work, args.vocab)
    work.mkdir(parents=True, exist_ok=True)
    written, count = generate(args.data, work / "corpus.jsonl", args.mb)
    print(f"corpus: {written / 1e6:.0f} MB of JSON lines, {count} stories, in {work}; {os.cpu_count()} cores")
    results = {}
    for name in STAGES:
        done = subprocess.run([sys.executable, __file__, "--stage", name, "--workdir", str(work), "--vocab",
                               str(args.vocab)], capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        row = results[name]
        ways = ", ".join(f"{way} {speed:.2f} MB/s" for way, speed in row.get("ways", {}).items())
        print(f"{name:>9}: {row['text_bytes'] / 1e6 / row['seconds']:7.2f} MB/s ({row['seconds']:.1f} s), "
              f"peak RSS {row['peak_rss_mb']:.0f} MB" + (f" (raw encode, the faster of: {ways})" if ways else ""))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    speed = {name: row["text_bytes"] / row["seconds"] for name, row in results.items()}
    print(f"peak_rss_mb: {max(results[name]['peak_rss_mb'] for name in STAGES[:3]):.0f}")
    print(f"shard_vs_ceiling: {speed['shard'] / speed['ceiling']:.2f}")


if __name__ == "__main__":
    main()
