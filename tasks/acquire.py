"""acquire: gather documents from local files, HTTP(S) or the Hugging Face hub into one normalised Parquet file.

Normalisation is deliberately small and lossless for prose: strip a BOM, turn CRLF/CR into LF, apply Unicode NFC
(so "é" is one code point whatever the editor wrote, which keeps the tokenizer from learning two spellings of the
same letter). The byte budget is applied at a document boundary, never mid-document, so every kept document is whole.

Downloads resume: bytes go to `<file>.part`, a re-run asks for the rest with an HTTP Range request, and the finished
file is checked against its SHA-256 before it is renamed into place.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import logging
import os
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_config.schema import AcquireConfig, SourceConfig
from tasks.artifacts import describe_files, file_sha256
from tasks.corpus import DOCUMENTS
from tasks.stage import REPO_ROOT, Stage, prefect_task



class AcquireError(RuntimeError):
    """A source cannot be read or downloaded; the message names the source."""


def normalize(text: str) -> str:
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).strip()


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


def download(
    url: str, dest: Path, sha256: str | None, log: logging.Logger, timeout: float = 60, token: str | None = None
) -> Path:
    """Fetch `url` to `dest`, resuming a partial `.part` file, and verify the checksum when one is given.

    `token` goes as a bearer token to `url` only, not to where it redirects (the hub sends files to a CDN)."""
    if dest.is_file() and (sha256 is None or file_sha256(dest) == sha256):
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = offset and response.status == 206
            if offset and not resumed:
                log.info("server ignored the range request; downloading %s from the start", url)
            mode = "ab" if resumed else "wb"
            expected = response.headers.get("Content-Length")
            received = 0
            with open(part, mode) as handle:
                while block := response.read(1 << 20):
                    handle.write(block)
                    received += len(block)
                handle.flush()
                os.fsync(handle.fileno())
            if expected is not None and received < int(expected):
                # http.client returns short reads silently when the server hangs up mid-body
                raise ConnectionError(f"connection closed after {received} of {expected} bytes")
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part file already holds everything
            pass
        else:
            raise AcquireError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise AcquireError(f"download of {url} failed ({exc}); a re-run resumes from {part.stat().st_size if part.exists() else 0} bytes") from None
    if sha256 is not None:
        actual = file_sha256(part)
        if actual != sha256:
            part.unlink()
            raise AcquireError(f"checksum mismatch for {url}: expected {sha256}, got {actual}; the partial file was removed")
    os.replace(part, dest)
    return dest


def _source_files(source: SourceConfig, out_dir: Path, log: logging.Logger) -> list[Path]:
    if source.kind == "local":
        return resolve_local(source.path)
    if source.kind == "http":
        name = source.url.rstrip("/").rsplit("/", 1)[-1] or "download"
        digest = hashlib.sha256(source.url.encode()).hexdigest()[:12]
        return [download(source.url, out_dir / "downloads" / digest / name, source.sha256, log)]
    return _hub_files(source, out_dir, log)


HUB_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


def _hub_files(source: SourceConfig, out_dir: Path, log: logging.Logger) -> list[Path]:
    """The Parquet/JSONL files of a hub dataset split, over the hub's HTTP API (what huggingface_hub calls too).

    The recursive tree listing (`/api/datasets/{id}/tree/{revision}`, paginated by `Link: <...>; rel="next"`) names
    the files and gives each LFS file's sha256; every file then comes through `download` from
    `/datasets/{id}/resolve/{revision}/{path}`, so it resumes after a cut and is checked against that checksum.
    """
    base = source.endpoint.rstrip("/")
    token = os.environ.get(source.token_env) or None
    revision = urllib.parse.quote(source.revision, safe="")
    url: str | None = f"{base}/api/datasets/{source.dataset}/tree/{revision}?recursive=true"
    entries: list[dict[str, Any]] = []
    while url:
        request = urllib.request.Request(url)
        if token:
            request.add_unredirected_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                entries += json.load(response)
                url = _next_page(response.headers.get("Link"))
        except urllib.error.HTTPError as exc:
            hint = (f"check acquire.sources[].dataset and .revision; a gated or private dataset needs a token in "
                    f"${source.token_env}") if exc.code in (401, 403, 404) else "a re-run tries again"
            raise AcquireError(
                f"hub dataset '{source.dataset}' (revision {source.revision}) at {base}: HTTP {exc.code} {exc.reason}; "
                f"{hint}"
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise AcquireError(
                f"cannot reach the hub at {base} for dataset '{source.dataset}' ({exc}): kind 'hf' needs the internet, "
                f"or set acquire.sources[].endpoint to a mirror"
            ) from None
    files = [e for e in entries if e.get("type") == "file"]
    wanted = sorted(
        (e for e in files if source.split in Path(e["path"]).name and e["path"].endswith(HUB_SUFFIXES)),
        key=lambda e: e["path"],
    )
    if not wanted:
        raise AcquireError(
            f"hub dataset '{source.dataset}' has no {'/'.join(HUB_SUFFIXES)} file with '{source.split}' in its name "
            f"(it has {sorted(e['path'] for e in files)[:10]}): set acquire.sources[].split"
        )
    paths = []
    for entry in wanted:
        path = entry["path"]
        dest = out_dir / "downloads" / "hf" / source.dataset / source.revision / path
        paths.append(download(
            f"{base}/datasets/{source.dataset}/resolve/{revision}/{urllib.parse.quote(path)}",
            dest,
            (entry.get("lfs") or {}).get("oid"),  # the sha256 of an LFS file's content; small files have none
            log,
            token=token,
        ))
        log.info("acquire: %s/%s (%d bytes)", source.dataset, path, dest.stat().st_size)
    return paths


def _next_page(link: str | None) -> str | None:
    """The `rel="next"` address of an RFC 8288 Link header, as the hub paginates its listings."""
    for part in (link or "").split(","):
        address, _, params = part.partition(";")
        if 'rel="next"' in params.replace(" ", ""):
            return address.strip().strip("<>")
    return None


def _documents_from(path: Path, source: SourceConfig) -> Iterator[str]:
    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(columns=[source.text_field]):
            yield from (str(t) for t in batch.column(0).to_pylist() if t is not None)
    else:
        yield from read_documents(path, source.text_field)


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
            for raw in _documents_from(path, source):
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
    tmp = out_dir / f".{DOCUMENTS}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, out_dir / DOCUMENTS)
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


STAGE = Stage(
    name="acquire",
    run=lambda cfg, upstream, out_dir, log: acquire(cfg, out_dir, log),
    code=("tasks/acquire.py",),
    external=source_fingerprint,
    retries=2,
    retry_delay_seconds=5,
)
acquire_task = prefect_task(STAGE)
