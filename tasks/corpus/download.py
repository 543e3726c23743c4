"""Downloads that resume and verify: plain HTTP(S) files and Hugging Face hub dataset files.

Bytes go to `<file>.part`; a re-run asks for the rest with an HTTP Range request, and the finished file is checked
against its SHA-256 (given in the config, or the hub's LFS checksum) before it is renamed into place. The file's
validator (its strong ETag, else its Last-Modified date) is kept beside the part file (`<file>.part.validator`) and sent
back as `If-Range` (RFC 9110 13.1.5): a file changed on the server since the first bytes came is sent whole and written
from the start, never glued onto the old file's beginning, checksum or not.

The hub is spoken to over its HTTP API directly (what huggingface_hub calls too): the recursive tree listing
(`/api/datasets/{id}/tree/{revision}`, paginated by `Link: <...>; rel="next"`) names the files and gives each LFS
file's sha256; every file then comes through `download` from `/datasets/{id}/resolve/{revision}/{path}`. A token
goes to the hub only, never to the CDN it redirects to.

Downloads are verified or refused. A body is complete only when the protocol says so (its `Content-Length`, or a
chunked transfer's terminator) or its checksum matches: a body that simply stops, with neither, is refused rather
than cached for good. Only what a retry can change is marked transient and retried (by the stage, with backoff): a
5xx, a 429 or 408, a dropped connection, a timeout, a transfer cut short (a 429 or 503 whose Retry-After asks for a
minute or less is first waited out, in `open_url`). Another 4xx or a checksum mismatch fails at once. Only `http`
and `https` are spoken, redirects included. A file name the hub lists is a path *inside* the download folder or an
error: `../x` and `/etc/x` are refused before anything is written. Credentials in a URL never reach a message.
"""
from __future__ import annotations

import base64
import email.utils
import http.client
import json
import logging
import os
import posixpath
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline_config.acquire import SourceConfig
from tasks.stage import PipelineError, file_sha256, redact, write_atomic

SCHEMES = ("http", "https")


def later(status: int) -> bool:
    """Whether an HTTP status says "try again later": a 5xx, 429 Too Many Requests (the hub's rate limit) or 408."""
    return status >= 500 or status in (408, 429)


def reachable_later(exc: BaseException) -> bool:
    """Whether a failure to connect may pass: anything but a host name the resolver says does not exist (offline,
    or a typo), which a retry seconds later cannot change. 'Temporary failure in name resolution' may pass."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return not (isinstance(reason, socket.gaierror)
                and reason.errno in {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)})


class AcquireError(PipelineError, RuntimeError):
    """A source cannot be read or downloaded; the message names the source. `transient`: a retry may succeed."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(redact(message))
        self.transient = transient


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: urllib alone would follow one to ftp://."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        if urllib.parse.urlsplit(newurl).scheme not in SCHEMES:
            raise AcquireError(f"{req.full_url} redirects to {newurl}: only http and https are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


RETRY_AFTER_MAX_S = 60.0  # a server that asks for a longer wait is left to the stage's retries and a later run
RETRY_AFTER_TIMES = 3


def retry_after(exc: urllib.error.HTTPError) -> float | None:
    """The seconds a 429 or 503 asks to wait (`Retry-After`: seconds or an HTTP date), or None."""
    value = exc.headers.get("Retry-After") if exc.code in (429, 503) and exc.headers else None
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max((email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


def open_url(request: urllib.request.Request, timeout: float, log: logging.Logger | None = None) -> Any:
    """`urlopen` for http(s) URLs only (urllib would also read file:// and ftp://). A 429 or 503 whose Retry-After
    asks for a minute or less is waited out and asked again, up to RETRY_AFTER_TIMES times."""
    if urllib.parse.urlsplit(request.full_url).scheme not in SCHEMES:
        raise AcquireError(f"{request.full_url}: only http:// and https:// addresses can be downloaded")
    waited = 0
    while True:
        try:
            return _OPENER.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            wait = retry_after(exc)
            if waited == RETRY_AFTER_TIMES or wait is None or wait > RETRY_AFTER_MAX_S:
                raise
            exc.close()
            (log or logging.getLogger(__name__)).info(
                "%s: HTTP %d, the server asks to wait %g s; asking again then", redact(request.full_url), exc.code,
                wait)
            time.sleep(wait)
            waited += 1


def url_file_name(url: str) -> str:
    """The file name a URL's path ends with (never its query, which may carry a token), or `download`."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path).rstrip("/").rsplit("/", 1)[-1]
    return name if name not in ("", ".", "..") and "\\" not in name else "download"


def confined(base: Path, relative: str, what: str) -> Path:
    """`base / relative` for a name that came from elsewhere (a hub listing), normalised; an error if it would
    land outside `base` (`..`, an absolute path, a backslash, a symlink out)."""
    normal = posixpath.normpath(relative) if relative else ""
    if (not normal or normal.startswith(("/", "../")) or normal in (".", "..") or "\\" in relative
            or "\0" in relative):
        raise AcquireError(f"{what}: refusing the file name {relative!r}, which is not a path inside the dataset")
    target = Path(base) / normal
    if not target.resolve().is_relative_to(Path(base).resolve()):
        raise AcquireError(f"{what}: refusing the file name {relative!r}, which leads outside {base}")
    return target


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
    address, basic = _split_credentials(url)
    request = urllib.request.Request(address, headers=_resume_headers(part, offset))
    if token or basic:
        request.add_unredirected_header("Authorization", f"Bearer {token}" if token else f"Basic {basic}")
    try:
        with open_url(request, timeout, log) as response:
            _receive(response, part, offset, url, sha256, log)
    except urllib.error.HTTPError as exc:
        if not (exc.code == 416 and offset):  # 416 with a .part file: it already holds everything
            raise AcquireError(f"download of {url} failed: HTTP {exc.code} {exc.reason}", transient=later(exc.code)) \
                from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        size = part.stat().st_size if part.exists() else 0
        raise AcquireError(_failed(url, exc) + (f"; a re-run resumes from {size} bytes" if size else ""),
                           transient=reachable_later(exc)) from None
    if sha256 is not None:
        actual = file_sha256(part)
        if actual != sha256:
            _discard(part)
            raise AcquireError(f"checksum mismatch for {url}: expected {sha256}, got {actual}; the partial file was "
                               "removed")
    os.replace(part, dest)
    _validator_file(part).unlink(missing_ok=True)
    return dest


def _failed(url: str, exc: BaseException) -> str:
    """What went wrong: a host whose name does not resolve or that refuses the connection (offline, most often) is
    named with what the source needs; a transfer that broke off is named with its error."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (socket.gaierror, ConnectionRefusedError)):
        parts = urllib.parse.urlsplit(url)
        host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
        return (f"cannot reach {host} ({reason}) to download {url}: this source needs the internet (or a copy at a "
                "URL this machine can reach)")
    return f"download of {url} failed ({type(exc).__name__}: {exc})"


def _validator_file(part: Path) -> Path:
    return part.with_name(part.name + ".validator")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validator_file(part).unlink(missing_ok=True)


def _resume_headers(part: Path, offset: int) -> dict[str, str]:
    """`Range` for the bytes a part file lacks, with `If-Range` when the server gave a validator for them."""
    if not offset:
        return {}
    headers = {"Range": f"bytes={offset}-"}
    validator = _validator_file(part)
    if validator.is_file():
        headers["If-Range"] = validator.read_text().strip()
    return headers


def _record_validator(response: Any, part: Path) -> None:
    """Keep what identifies this version of the file for a later `If-Range`: a strong ETag (a weak one may not be
    used there), else the Last-Modified date; neither, and a resume can only trust that the file did not change."""
    etag = response.headers.get("ETag") or ""
    value = etag if etag.startswith('"') else response.headers.get("Last-Modified") or ""
    if value and "\n" not in value:
        write_atomic(_validator_file(part), value)
    else:
        _validator_file(part).unlink(missing_ok=True)


def _range_start(response: Any) -> int | None:
    """The first byte a 206 answer holds, from its `Content-Range: bytes A-B/N`; None if it does not say."""
    unit, _, spec = (response.headers.get("Content-Range") or "").partition(" ")
    first = spec.partition("-")[0]
    return int(first) if unit.strip() == "bytes" and first.isdigit() else None


def _split_credentials(url: str) -> tuple[str, str | None]:
    """(`url` without `user:password@`, their Basic credentials): urllib cannot send a URL's own credentials."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    bare = urllib.parse.urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))
    pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    return bare, base64.b64encode(pair.encode()).decode()


def _receive(response: Any, part: Path, offset: int, url: str, sha256: str | None, log: logging.Logger) -> None:
    """Write the body to `part` (appending to a resumed one) and check it arrived whole."""
    resumed = offset and response.status == 206
    if resumed and _range_start(response) not in (offset, None):
        _discard(part)
        raise AcquireError(f"{url} answered a request for bytes from {offset} with {response.headers['Content-Range']}"
                           "; the partial file was removed and a re-run starts over", transient=True)
    if offset and not resumed:
        log.info("server sent the whole file (it changed, or it ignores ranges); downloading %s from the start",
                 redact(url))
    if not resumed:
        _record_validator(response, part)
    expected = response.headers.get("Content-Length")
    if expected is None and not response.chunked and sha256 is None:
        # A close-delimited body: a server that hangs up mid-transfer looks exactly like a finished one.
        raise AcquireError(f"{url} was sent without a length and no sha256 is configured, so a body cut short "
                           "cannot be told from a whole one: set acquire.sources[].sha256")
    received = 0
    with open(part, "ab" if resumed else "wb") as handle:
        while block := response.read(1 << 20):  # a broken chunked transfer raises IncompleteRead here
            handle.write(block)
            received += len(block)
        handle.flush()
        os.fsync(handle.fileno())
    if expected is not None and received < int(expected):
        # http.client returns short reads silently when the server hangs up mid-body
        raise ConnectionError(f"connection closed after {received} of {expected} bytes")


HUB_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


def hub_files(source: SourceConfig, downloads: Path, log: logging.Logger) -> list[Path]:
    """The Parquet/JSONL files of a hub dataset split, downloaded into `downloads/hf/<dataset>/<revision>/...`."""
    base = source.endpoint.rstrip("/")
    token = os.environ.get(source.token_env) or None
    revision = urllib.parse.quote(source.revision, safe="")
    files = [e for e in _hub_listing(source, base, revision, token, log)
             if isinstance(e, dict) and e.get("type") == "file" and isinstance(e.get("path"), str)]
    wanted = sorted(
        (e for e in files if source.split in Path(e["path"]).name and e["path"].endswith(HUB_SUFFIXES)),
        key=lambda e: e["path"],
    )
    if not wanted:
        raise AcquireError(
            f"hub dataset '{source.dataset}' has no {'/'.join(HUB_SUFFIXES)} file with '{source.split}' in its name "
            f"(it has {sorted(e['path'] for e in files)[:10]}): set acquire.sources[].split"
        )
    root = downloads / "hf"
    folder = confined(root, f"{source.dataset}/{source.revision}", f"hub dataset '{source.dataset}'")
    # every name is checked before the first byte is written: a hostile listing writes nothing anywhere
    destinations = [confined(folder, entry["path"], f"hub dataset '{source.dataset}' at {base}") for entry in wanted]
    paths = []
    for entry, dest in zip(wanted, destinations):
        path = posixpath.normpath(entry["path"])
        paths.append(download(
            f"{base}/datasets/{source.dataset}/resolve/{revision}/{urllib.parse.quote(path)}",
            dest,
            (entry.get("lfs") or {}).get("oid"),  # the sha256 of an LFS file's content; small files have none
            log,
            token=token,
        ))
        log.info("acquire: %s/%s (%d bytes)", source.dataset, path, dest.stat().st_size)
    return paths


def _hub_listing(source: SourceConfig, base: str, revision: str, token: str | None,
                 log: logging.Logger) -> list[Any]:
    """Every entry of the dataset's recursive tree listing, following its pages."""
    url: str | None = f"{base}/api/datasets/{source.dataset}/tree/{revision}?recursive=true"
    entries: list[Any] = []
    while url:
        request = urllib.request.Request(url)
        if token:
            request.add_unredirected_header("Authorization", f"Bearer {token}")
        try:
            with open_url(request, 60, log) as response:
                page = json.load(response)
                url = _next_page(response.headers.get("Link"))
            if not isinstance(page, list):
                raise ValueError("the listing is not a JSON list")
            entries += page
        except urllib.error.HTTPError as exc:
            hint = (f"check acquire.sources[].dataset and .revision; a gated or private dataset needs a token in "
                    f"${source.token_env}") if exc.code in (401, 403, 404) else "a re-run tries again"
            raise AcquireError(
                f"hub dataset '{source.dataset}' (revision {source.revision}) at {base}: HTTP {exc.code} {exc.reason}; "
                f"{hint}", transient=later(exc.code),
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise AcquireError(
                f"cannot reach the hub at {base} for dataset '{source.dataset}' ({exc}): kind 'hf' needs the internet, "
                f"or set acquire.sources[].endpoint to a mirror", transient=reachable_later(exc),
            ) from None
        except ValueError as exc:
            raise AcquireError(f"hub at {base} answered the listing of '{source.dataset}' with something other than "
                               f"a hub listing ({exc}): check acquire.sources[].endpoint") from None
    return entries


def _next_page(link: str | None) -> str | None:
    """The `rel="next"` address of an RFC 8288 Link header, as the hub paginates its listings."""
    for part in (link or "").split(","):
        address, _, params = part.partition(";")
        if 'rel="next"' in params.replace(" ", ""):
            return address.strip().strip("<>")
    return None
