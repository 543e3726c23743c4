"""acquire: gather documents from local files, HTTP(S) or the Hugging Face hub into one normalised Parquet file.

Normalisation is deliberately small and lossless for prose: strip a BOM, turn CRLF/CR into LF, apply Unicode NFC
(so "é" is one code point whatever the editor wrote, which keeps the tokenizer from learning two spellings of the
same letter). Exact duplicates (same normalised text) are dropped and counted.

It streams: documents are read, normalised and written a row group at a time (`batch_bytes`), so memory does not
grow with the corpus, and reading stops at the byte budget, which is applied at a document boundary (every kept
document is whole; the rest of a large file is never read). Each row is stored with its 64-bit content hash, from
which every later choice about the document is made (`tasks/corpus/sampling.py`); duplicates are found on those
hashes, 8 bytes per document kept.

Where documents come from is `tasks/corpus/`: the file formats and encodings (`formats.py`) and downloads that resume
and verify (`download.py`). In the pipeline, remote files are downloaded once into `acquire/.downloads/`, beside the
acquire directories, so a run that changes the byte budget (or acquire's code) reads the 2 GB it already has; each
manifest names the folders there it read (`downloads`), which is how `scriptorium prune` knows what is still used.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_config.acquire import AcquireConfig, SourceConfig
from tasks.corpus.download import AcquireError, download, hub_files, url_file_name
from tasks.corpus.formats import FileReport, documents_from, file_format, resolve_local
from tasks.corpus.sampling import content_hashes
from tasks.stage import Stage, atomic_path, describe_files, prefect_task, redact

__all__ = ["AcquireError", "DOCUMENTS", "acquire", "download", "normalize"]

DOCUMENTS = "documents.parquet"
SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string()), ("language", pa.string()), ("hash", pa.uint64())])
DOWNLOADS = ".downloads"  # in the pipeline: beside the acquire directories, shared by all of them
CANDIDATES = 2048  # documents normalised, hashed and checked for duplicates together
LARGE_PARAGRAPH = 1 << 20  # a blank-line paragraph this long is a file of lines without blank lines, not prose


def normalize(text: str) -> str:
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text.strip()


def download_folder(source: SourceConfig) -> str | None:
    """Where a remote source's files go, relative to the downloads folder (None for a local source)."""
    if source.kind == "http":
        return hashlib.sha256(source.url.encode()).hexdigest()[:12]
    return f"hf/{source.dataset}/{source.revision}" if source.kind == "hf" else None


def _source_files(source: SourceConfig, downloads: Path, log: logging.Logger) -> list[Path]:
    if source.kind == "local":
        return resolve_local(source.path)
    if source.kind == "http":
        return [download(source.url, downloads / download_folder(source) / url_file_name(source.url), source.sha256,
                         log)]
    return hub_files(source, downloads, log)


class SeenHashes:
    """The content hashes of the documents kept so far, 8 bytes each, in sorted runs that merge as they grow (a
    log-structured merge): a lookup is one binary search per run, and there are at most log2(n) runs."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def first_seen(self, hashes: np.ndarray) -> np.ndarray:
        """Which of `hashes` were never seen before (the first of equal ones within `hashes` counts); records them."""
        new = np.zeros(hashes.size, dtype=bool)
        new[np.unique(hashes, return_index=True)[1]] = True
        for run in self.runs:
            at = np.searchsorted(run, hashes).clip(max=run.size - 1)
            new &= run[at] != hashes
        if new.any():
            self.runs.append(np.sort(hashes[new]))
        while len(self.runs) > 1 and self.runs[-2].size <= self.runs[-1].size:
            self.runs[-2:] = [np.sort(np.concatenate(self.runs[-2:]))]
        return new


class DocumentWriter:
    """Keeps documents under the byte budget, skipping short ones and duplicates, and writes them a row group at a
    time; `offer` returns False once the budget is reached."""

    def __init__(self, writer: pq.ParquetWriter, cfg: AcquireConfig):
        self.writer, self.cfg, self.seen = writer, cfg, SeenHashes()
        self.rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.pending = self.total = self.row_groups = 0
        self.counts: Counter[str] = Counter()
        self.languages: dict[str, Counter[str]] = {}
        self.refused: tuple[int, str, bool] | None = None  # the document the budget stopped at (bytes, file, lines)
        self.one_paragraph: dict[str, int] = {}  # file -> bytes of a kept document that is a file without blank lines

    def offer(self, raw: list[str], language: str, origin: str, paragraphs: bool = False) -> bool:
        """`paragraphs`: the documents are a text file's blank-line paragraphs (see `one_paragraph_note`)."""
        texts = [t for t in map(normalize, raw) if len(t) >= self.cfg.min_chars]
        self.counts["dropped_short"] += len(raw) - len(texts)
        hashes = content_hashes(texts)
        for text, digest, new in zip(texts, hashes.tolist(), self.seen.first_seen(hashes)):
            if not new:
                self.counts["duplicates"] += 1
                continue
            size = len(text.encode("utf-8"))
            lines = paragraphs and size > LARGE_PARAGRAPH and "\n" in text
            if self.cfg.byte_budget is not None and self.total + size > self.cfg.byte_budget:
                self.refused = (size, origin, lines)
                return False
            if lines:
                self.one_paragraph.setdefault(origin, size)
            for name, value in zip(SCHEMA.names, (text, origin, language, digest)):
                self.rows[name].append(value)
            self.total, self.pending = self.total + size, self.pending + size
            row = self.languages.setdefault(language, Counter())
            row["documents"], row["bytes"] = row["documents"] + 1, row["bytes"] + size
            if self.pending >= self.cfg.batch_bytes:
                self.flush()
        return True

    @property
    def full(self) -> bool:
        """The byte budget was reached: reading stops."""
        return self.refused is not None

    @property
    def kept(self) -> int:
        return sum(c["documents"] for c in self.languages.values())

    def flush(self) -> None:
        if self.rows["text"]:
            self.writer.write_table(pa.table(self.rows, schema=SCHEMA), row_group_size=len(self.rows["text"]))
            self.row_groups += 1
        self.rows, self.pending = {name: [] for name in SCHEMA.names}, 0


def one_paragraph_note(origin: str, size: int) -> str:
    return (f"{origin} has no blank line in {size / 1e6:.1f} MB: a text file is cut into documents at blank lines "
            "(split_by: paragraph) and validation holds out whole documents, so set split_by: line on its source "
            "for a document per line")


def _read_file(path: Path, source: SourceConfig, documents: DocumentWriter, log: logging.Logger) -> None:
    report = FileReport()
    stream: Iterator[str] = documents_from(path, source, report)
    paragraphs = source.document_split == "paragraph" and file_format(path, source) == "txt"
    try:
        while group := list(itertools.islice(stream, CANDIDATES)):
            if not documents.offer(group, source.language, path.name, paragraphs):
                break
    finally:
        stream.close()  # stops reading the file where the budget was reached
    if path.name in documents.one_paragraph:
        size = documents.one_paragraph[path.name]
        log.warning("acquire: %s", one_paragraph_note(path.name, size))
    if report.replaced:
        documents.counts[f"replaced:{path.name}"] += report.replaced
        log.warning("acquire: %s: %d invalid %s byte sequences replaced by U+FFFD (errors: replace)",
                    path.name, report.replaced, source.encoding)


def _nothing_kept(cfg: AcquireConfig, documents: DocumentWriter) -> str:
    if documents.refused:
        size, origin, one_paragraph = documents.refused
        return (f"acquire.byte_budget ({cfg.byte_budget} bytes) is smaller than the first document ({size} bytes, in "
                f"{origin})" + (f"; {one_paragraph_note(origin, size)}" if one_paragraph else ": raise it"))
    counts = documents.counts
    where = ", ".join(s.path or s.url or s.dataset or s.kind for s in cfg.sources)
    return (f"acquire.sources ({redact(where)}) gave no documents: {counts['dropped_short']} shorter than "
            f"acquire.min_chars, {counts['duplicates']} duplicates; check the paths, format and min_chars")


def acquire(cfg: AcquireConfig, out_dir: Path, log: logging.Logger | None = None,
            downloads: Path | None = None) -> dict[str, Any]:
    """Documents into `out_dir/documents.parquet`; remote files are kept in `downloads` (default: `out_dir/downloads`,
    the stage passes the folder its directories share)."""
    log = log or logging.getLogger(__name__)
    downloads = Path(downloads) if downloads is not None else Path(out_dir) / "downloads"
    with atomic_path(out_dir / DOCUMENTS) as tmp, pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
        documents = DocumentWriter(writer, cfg)
        for source in cfg.sources:
            for path in _source_files(source, downloads, log):
                _read_file(path, source, documents, log)
                log.info("acquire: %s -> %d documents, %.2f MB so far", path.name, documents.kept,
                         documents.total / 1e6)
                if documents.full:
                    break
            if documents.full:
                log.info("acquire: byte budget of %d reached; stopped at a document boundary", cfg.byte_budget)
                break
        documents.flush()
        if not documents.kept:  # before the empty file is put in place: the stage fails, nothing is written
            raise AcquireError(_nothing_kept(cfg, documents))
    counts = documents.counts
    replaced = {key.split(":", 1)[1]: n for key, n in counts.items() if key.startswith("replaced:")}
    return {
        "documents": documents.kept,
        "bytes": documents.total,
        "dropped_short": counts["dropped_short"],
        "duplicates": counts["duplicates"],
        "replaced_characters": replaced,
        "budget_reached": documents.full,
        "row_groups": documents.row_groups,
        "languages": {lang: dict(c) for lang, c in sorted(documents.languages.items())},
        "downloads": sorted({folder for source in cfg.sources if (folder := download_folder(source))}),
        "files": describe_files(out_dir, [DOCUMENTS]),
    }


def acquire_stage(cfg: AcquireConfig, out_dir: Path, log: logging.Logger) -> dict[str, Any]:
    """What the pipeline runs: `acquire` with the downloads folder every acquire directory shares."""
    return acquire(cfg, out_dir, log, downloads=Path(out_dir).parent / DOWNLOADS)


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


STAGE = Stage(name="acquire", run=acquire_stage, external=source_fingerprint, retries=2, retry_delay_seconds=5)
acquire_task = prefect_task(STAGE)
