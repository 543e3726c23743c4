"""acquire: gather documents from local files, HTTP(S) or the Hugging Face hub into one normalised Parquet file.

Normalisation is deliberately small and lossless for prose: strip a BOM, turn CRLF/CR into LF, apply Unicode NFC
(so "é" is one code point whatever the editor wrote, which keeps the tokenizer from learning two spellings of the
same letter). The byte budget is applied at a document boundary, never mid-document, so every kept document is whole.

Where documents come from is `tasks/corpus/`: the file formats (`formats.py`) and downloads that resume and verify
(`download.py`).
"""
from __future__ import annotations

import hashlib
import logging
import unicodedata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_config.schema import AcquireConfig, SourceConfig
from tasks.corpus.download import AcquireError, download, hub_files
from tasks.corpus.formats import documents_from, resolve_local
from tasks.stage import Stage, atomic_path, describe_files, prefect_task

__all__ = ["AcquireError", "DOCUMENTS", "acquire", "download", "normalize"]

DOCUMENTS = "documents.parquet"


def normalize(text: str) -> str:
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).strip()


def _source_files(source: SourceConfig, out_dir: Path, log: logging.Logger) -> list[Path]:
    if source.kind == "local":
        return resolve_local(source.path)
    if source.kind == "http":
        name = source.url.rstrip("/").rsplit("/", 1)[-1] or "download"
        digest = hashlib.sha256(source.url.encode()).hexdigest()[:12]
        return [download(source.url, out_dir / "downloads" / digest / name, source.sha256, log)]
    return hub_files(source, out_dir, log)


def acquire(cfg: AcquireConfig, out_dir: Path, log: logging.Logger | None = None) -> dict[str, Any]:
    log = log or logging.getLogger(__name__)
    texts: list[str] = []
    origins: list[str] = []
    languages: list[str] = []
    total = 0
    dropped = 0
    full = False
    for source in cfg.sources:
        for path in _source_files(source, out_dir, log):
            for raw in documents_from(path, source):
                text = normalize(raw)
                if len(text) < cfg.min_chars:
                    dropped += 1
                    continue
                size = len(text.encode("utf-8"))
                if cfg.byte_budget is not None and total + size > cfg.byte_budget:
                    full = True
                    break
                texts.append(text)
                origins.append(str(path.name))
                languages.append(source.language)
                total += size
            log.info("acquire: %s -> %d documents, %.2f MB so far", path.name, len(texts), total / 1e6)
            if full:
                break
        if full:
            log.info("acquire: byte budget of %d reached; stopped at a document boundary", cfg.byte_budget)
            break
    table = pa.table({"text": texts, "source": origins, "language": languages})
    with atomic_path(out_dir / DOCUMENTS) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return {
        "documents": len(texts),
        "bytes": total,
        "dropped_short": dropped,
        "budget_reached": full,
        "files": describe_files(out_dir, [DOCUMENTS]),
    }


def source_fingerprint(cfg: AcquireConfig) -> list[Any]:
    """What the cache key needs to notice about sources outside the pipeline: local files' size and mtime."""
    seen: list[Any] = []
    for source in cfg.sources:
        if source.kind == "local":
            try:
                seen.extend((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in resolve_local(source.path))
            except AcquireError:
                seen.append((source.path, None))
    return seen


STAGE = Stage(name="acquire", run=acquire, external=source_fingerprint, retries=2, retry_delay_seconds=5)
acquire_task = prefect_task(STAGE)
