"""Downloads that resume and verify: plain HTTP(S) files and Hugging Face hub dataset files.

Bytes go to `<file>.part`; a re-run asks for the rest with an HTTP Range request, and the finished file is checked
against its SHA-256 (given in the config, or the hub's LFS checksum) before it is renamed into place.

The hub is spoken to over its HTTP API directly (what huggingface_hub calls too): the recursive tree listing
(`/api/datasets/{id}/tree/{revision}`, paginated by `Link: <...>; rel="next"`) names the files and gives each LFS
file's sha256; every file then comes through `download` from `/datasets/{id}/resolve/{revision}/{path}`. A token
goes to the hub only, never to the CDN it redirects to.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pipeline_config.schema import SourceConfig
from tasks.stage import file_sha256


class AcquireError(RuntimeError):
    """A source cannot be read or downloaded; the message names the source."""


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


HUB_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


def hub_files(source: SourceConfig, out_dir: Path, log: logging.Logger) -> list[Path]:
    """The Parquet/JSONL files of a hub dataset split, downloaded into `out_dir/downloads/hf/...`."""
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
