"""Documents out of files: which local files a source names, and how each format yields its documents.

A `.jsonl` file is one document per JSON line (the text in `text_field`), a `.txt` file is one document, a `.parquet`
file is one document per row of its text column; `.gz` is decompressed on the fly.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from pipeline_config.schema import SourceConfig
from tasks.corpus.download import AcquireError
from tasks.stage import REPO_ROOT


def resolve_local(pattern: str) -> list[Path]:
    """Files named by a path, directory or glob; relative paths are relative to the repository root."""
    base = Path(pattern).expanduser()
    if not base.is_absolute():
        base = REPO_ROOT / base
    if base.is_dir():
        files = [p for p in sorted(base.rglob("*")) if p.is_file() and _readable_suffix(p)]
    else:
        files = [Path(p) for p in sorted(glob.glob(str(base), recursive=True)) if Path(p).is_file()]
    if not files:
        raise AcquireError(f"local source '{pattern}' matches no .jsonl/.txt file (looked at {base})")
    return files


def _readable_suffix(path: Path) -> bool:
    name = path.name.removesuffix(".gz")
    return name.endswith((".jsonl", ".txt", ".json"))


def read_documents(path: Path, text_field: str) -> Iterator[str]:
    """Documents in one file: a JSON line each for .jsonl, the whole file for .txt; .gz is decompressed."""
    opener = gzip.open if path.suffix == ".gz" else open
    name = path.name.removesuffix(".gz")
    with opener(path, "rb") as raw:
        stream = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
        if name.endswith(".txt"):
            yield stream.read()
            return
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AcquireError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if text_field not in record:
                raise AcquireError(f"{path}:{lineno}: no field '{text_field}' (set text_field on the source)")
            yield str(record[text_field])


def documents_from(path: Path, source: SourceConfig) -> Iterator[str]:
    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(columns=[source.text_field]):
            yield from (str(t) for t in batch.column(0).to_pylist() if t is not None)
    else:
        yield from read_documents(path, source.text_field)
