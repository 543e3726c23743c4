"""Documents out of files: which local files a source names, and how each format yields its documents.

Formats: `.jsonl` (one JSON object per line), `.json` (an array of objects, parsed one element at a time), `.txt`
(cut into documents by the source's `split_by`: blank-line paragraphs by default, lines, a separator such as
TinyStories' `<|endoftext|>`, or the whole file) and `.parquet` (the `text_field` column); each may be `.gz` or
`.zst`, and `format:` overrides what the name says.

Bytes are decoded here, a block at a time, never by a lenient reader: a BOM is stripped, the source's `encoding` is
used, and an invalid byte is an error naming the file, line and byte offset, unless the source says
`errors: replace`, which puts U+FFFD in its place and counts it in the `FileReport`. A null or non-string text is an
error naming the line (or row). Blocks are cut at a line end, so memory does not grow with the file (except with
`split_by: file`, whose one document is the file).
"""
from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline_config.acquire import SourceConfig
from tasks.corpus.download import AcquireError
from tasks.stage import REPO_ROOT

BLOCK = 1 << 22
COMPRESSED = (".gz", ".zst")
FORMATS = {".jsonl": "jsonl", ".json": "json", ".txt": "txt", ".parquet": "parquet"}
SPLITTERS = {"paragraph": re.compile(r"\n\s*\n"), "line": re.compile(r"\n")}
SPACE = re.compile(r"\s*")


@dataclass
class FileReport:
    """What reading one file found besides its documents."""

    replaced: int = 0  # characters that were invalid in the source's encoding, now U+FFFD (errors: replace)


def resolve_local(pattern: str) -> list[Path]:
    """Files named by a path, directory or glob; relative paths are relative to the repository root. A directory is
    read recursively, less hidden files and folders (`.git/`, `.cache/`, ...) and `__`-prefixed ones, as Hugging Face
    `datasets` does with a data directory."""
    base = local_base(pattern)
    if base.is_dir():
        files = [p for p in sorted(base.rglob("*")) if p.is_file() and _known_suffix(p) is not None
                 and not skipped(p.relative_to(base))]
    else:
        files = [Path(p) for p in sorted(glob.glob(str(base), recursive=True)) if Path(p).is_file()]
    if not files:
        raise AcquireError(f"local source '{pattern}' matches no {'/'.join(FORMATS)} file (looked at {base})")
    return files


def local_base(pattern: str) -> Path:
    """The path, directory or glob a local source names, made absolute (relative to the repository root)."""
    base = Path(pattern).expanduser()
    return base if base.is_absolute() else REPO_ROOT / base


def skipped(relative: Path) -> bool:
    """Whether a directory source leaves out what lies at `relative` below it (hidden or `__` entries)."""
    return any(part.startswith((".", "__")) for part in relative.parts)


def _known_suffix(path: Path) -> str | None:
    name = path.name
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return FORMATS.get(Path(name).suffix)


def file_format(path: Path, source: SourceConfig) -> str:
    if source.format != "auto":
        return source.format
    found = _known_suffix(path)
    if found is None:
        raise AcquireError(f"{path}: cannot tell its format from the name; set acquire.sources[].format "
                           f"({', '.join(FORMATS.values())})")
    return found


def documents_from(path: Path, source: SourceConfig, report: FileReport | None = None) -> Iterator[str]:
    """The documents of one file, in order, as they are read (closing the iterator stops the reading)."""
    report = report if report is not None else FileReport()
    kind = file_format(path, source)
    try:
        if kind == "parquet":
            yield from _parquet_documents(path, source.text_field)
        elif kind == "txt":
            yield from (doc for doc in _text_documents(path, source, report) if doc.strip())
        elif kind == "jsonl":
            yield from _jsonl_documents(path, source, report)
        else:
            yield from _json_documents(path, source, report)
    except (OSError, pa.ArrowException) as exc:  # a cut-short .gz, a file that is not Parquet: pyarrow's words
        packed = next((f" ({suffix[1:]})" for suffix in COMPRESSED if path.name.endswith(suffix)), "")
        raise AcquireError(f"{path}: cannot be read as {kind}{packed}: {' '.join(str(exc).split())}; the file is "
                           "damaged or cut short, or not what its name says (`format:` on the source overrides the "
                           "name)") from None


# ----------------------------------------------------------------------------------------------- bytes to text
def _line_end(block: bytes) -> int:
    """Where to cut a block: after its last LF, else after its last CR that is not the block's final byte (that CR
    may be the first half of a CRLF); 0 when there is no line end yet."""
    cut = block.rfind(b"\n") + 1
    return cut or block.rfind(b"\r", 0, len(block) - 1) + 1


def _line_ends(data: bytes) -> int:
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def _decode(block: bytes, path: Path, source: SourceConfig, offset: int, line: int, report: FileReport) -> str:
    try:
        return block.decode(source.encoding)
    except UnicodeDecodeError as exc:
        if source.errors == "strict":
            bad = block[exc.start : exc.end]
            raise AcquireError(
                f"{path}: line {line + _line_ends(block[:exc.start])}, byte offset {offset + exc.start}: {bad!r} is "
                f"not valid {source.encoding} ({exc.reason}); set the source's encoding (e.g. latin-1, cp1252) or "
                "errors: replace"
            ) from None
    parts, start, view = [], 0, memoryview(block)
    while True:
        try:
            parts.append(str(view[start:], source.encoding))
            return "".join(parts)
        except UnicodeDecodeError as exc:
            parts.append(str(view[start : start + exc.start], source.encoding) + "\ufffd")
            report.replaced += 1
            start += exc.end


def _decoded_blocks(path: Path, source: SourceConfig, report: FileReport) -> Iterator[tuple[str, int]]:
    """The file's text in blocks that end at a line end, each with the number of its first line; BOM stripped."""
    offset, line, carry = 0, 1, b""
    with pa.input_stream(str(path), compression="detect") as stream:
        while True:
            data = stream.read(BLOCK)
            block = carry + data
            if not block:
                return
            cut = _line_end(block) if data else len(block)
            if cut == 0:
                carry = block
                continue
            block, carry = block[:cut], block[cut:]
            text = _decode(block, path, source, offset, line, report)
            yield (text.removeprefix("\ufeff") if offset == 0 else text), line
            offset, line = offset + len(block), line + _line_ends(block)


# ------------------------------------------------------------------------------------------------------ formats
def _text_documents(path: Path, source: SourceConfig, report: FileReport) -> Iterator[str]:
    mode = source.document_split
    blocks = (text.replace("\r\n", "\n").replace("\r", "\n") for text, _ in _decoded_blocks(path, source, report))
    if mode == "file":
        yield "".join(blocks)
        return
    splitter = SPLITTERS.get(mode) or re.compile(re.escape(source.separator))
    rest = ""
    for text in blocks:
        parts = splitter.split(rest + text)
        rest = parts.pop()
        yield from parts
    yield rest


def _text_of(record: Any, where: str, field: str) -> str:
    if not isinstance(record, dict):
        raise AcquireError(f"{where}: expected a JSON object with '{field}', found {type(record).__name__}")
    if field not in record:
        raise AcquireError(f"{where}: no field '{field}' (set text_field on the source)")
    value = record[field]
    if not isinstance(value, str):
        found = "null" if value is None else type(value).__name__
        raise AcquireError(f"{where}: '{field}' is {found}, not text")
    return value


def _jsonl_documents(path: Path, source: SourceConfig, report: FileReport) -> Iterator[str]:
    for text, first in _decoded_blocks(path, source, report):
        for number, line in enumerate(text.split("\n"), first):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AcquireError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            yield _text_of(record, f"{path}:{number}", source.text_field)


def _json_documents(path: Path, source: SourceConfig, report: FileReport) -> Iterator[str]:
    """A JSON array of objects, decoded one element at a time (the file is never one Python list)."""
    decoder = json.JSONDecoder()
    blocks = (text for text, _ in _decoded_blocks(path, source, report))
    buf, pos, line = "", 0, 1  # `line` is the line number of buf[0]

    def more() -> bool:
        nonlocal buf, pos, line
        text = next(blocks, None)
        if text is None:
            return False
        line, buf, pos = line + buf.count("\n", 0, pos), buf[pos:] + text, 0
        return True

    def peek() -> str:  # the next non-space character ("" at the end of the file)
        nonlocal pos
        while (pos := SPACE.match(buf, pos).end()) == len(buf) and more():
            pass
        return buf[pos : pos + 1]

    if peek() != "[":
        raise AcquireError(f"{path}: a .json source must be an array of objects; use .jsonl for one object per line")
    pos += 1
    while (next_char := peek()) != "]":
        if not next_char:
            raise AcquireError(f"{path}: the file ends inside the array (no closing ']')")
        while True:
            try:
                record, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as exc:
                if not more():
                    raise AcquireError(f"{path}:{line + buf.count(chr(10), 0, exc.pos)}: not valid JSON "
                                       f"({exc.msg})") from None
        yield _text_of(record, f"{path}:{line + buf.count(chr(10), 0, pos)}", source.text_field)
        pos = end
        if peek() == ",":
            pos += 1
        elif buf[pos : pos + 1] != "]":
            raise AcquireError(f"{path}:{line + buf.count(chr(10), 0, pos)}: expected ',' or ']' after an element")


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    source = pa.BufferReader(pa.input_stream(str(path), compression="detect").read()) \
        if path.name.endswith(COMPRESSED) else str(path)
    file = pq.ParquetFile(source)
    schema = file.schema_arrow
    if field not in schema.names:
        raise AcquireError(f"{path}: no column '{field}' (it has {schema.names}): set text_field on the source")
    if not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
        raise AcquireError(f"{path}: column '{field}' holds {schema.field(field).type}, not text")
    row = 0
    for batch in file.iter_batches(columns=[field], batch_size=8192):
        column = batch.column(0)
        if column.null_count:
            first = row + pc.index(pc.is_null(column), True).as_py()
            raise AcquireError(f"{path}: row {first + 1}: '{field}' is null, not text")
        yield from column.to_pylist()
        row += len(column)
