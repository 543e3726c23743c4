"""The acquire stage's settings: where documents come from and how much of them is kept."""
from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, model_validator

from pipeline_config.section import Section


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _check_addresses(source: "SourceConfig") -> None:
    """Only http(s) is downloaded; a hub id and revision are names, never paths that could climb out of a folder."""
    for key, address in (("url", source.url if source.kind == "http" else None),
                         ("endpoint", source.endpoint if source.kind == "hf" else None)):
        if address is not None and urlsplit(address).scheme not in ("http", "https"):
            raise ValueError(f"{key} must be an http:// or https:// address (got {address.split(':')[0]}:); a local "
                             "file is a source of kind 'local' with a path")
    if source.kind == "hf" and not HUB_ID.fullmatch(source.dataset or ""):
        raise ValueError(f"dataset {source.dataset!r} is not a hub id like 'owner/name'")
    if source.kind == "hf" and (".." in source.revision.split("/") or source.revision.startswith("/")):
        raise ValueError(f"revision {source.revision!r} is not a branch, tag or commit")


def _sha256_hex(value: str) -> str:
    """A SHA-256 as `hashlib` writes it: lower case, no `sha256:` prefix; anything else could never match the
    download, which would be fetched whole and then thrown away."""
    digest = value.strip().lower().removeprefix("sha256:")
    if not re.fullmatch("[0-9a-f]{64}", digest):
        raise ValueError(f"'{value}' is not a SHA-256 (64 hexadecimal digits, as `sha256sum` prints)")
    return digest


Sha256 = Annotated[str, AfterValidator(_sha256_hex)]


class SourceConfig(Section):
    """One place documents come from."""

    kind: Literal["local", "http", "hf"] = "local"
    path: str | None = Field(None, description="local file, directory or glob (kind=local)")
    url: str | None = Field(None, description="HTTP(S) address of a .jsonl/.txt file, optionally .gz (kind=http)")
    sha256: Sha256 | None = Field(None, description="expected checksum of the downloaded file (kind=http): 64 hex "
                                  "digits, either case, optionally after 'sha256:'")
    dataset: str | None = Field(None, description="Hugging Face hub dataset id, e.g. roneneldan/TinyStories (kind=hf; "
                                "needs the internet)")
    split: str = Field("train", description="kind=hf: take the .parquet/.jsonl files with this in their name")
    revision: str = Field("main", description="kind=hf: branch, tag or commit of the dataset repository")
    endpoint: str = Field("https://huggingface.co", description="kind=hf: the hub, or a mirror of its HTTP API")
    token_env: str = Field("HF_TOKEN", description="kind=hf: environment variable holding a token for gated or "
                           "private datasets (sent to the hub only, never written anywhere)")
    text_field: str = Field("text", description="field (JSON) or column (Parquet) holding the text")
    language: str = Field("en", pattern=r"^[A-Za-z0-9_-]+$", description="ISO 639-1 code: the tokenizer samples, "
                          "the shard stage splits and evaluate reports each language on its own")
    format: Literal["auto", "jsonl", "json", "txt", "parquet"] = Field(
        "auto", description="auto: from the file name (.jsonl, .json array, .txt, .parquet; each optionally .gz/.zst)")
    split_by: Literal["file", "paragraph", "line", "separator"] | None = Field(
        None, description="how a .txt file becomes documents: the whole file, blank-line paragraphs (the default), "
        "lines, or `separator` (the default when a separator is given)")
    separator: str | None = Field(None, min_length=1, description="document separator, e.g. '<|endoftext|>'")
    encoding: str = Field("utf-8", description="text encoding of .txt/.jsonl/.json files (a BOM is always stripped)")
    errors: Literal["strict", "replace"] = Field(
        "strict", description="strict: an invalid byte stops acquire, naming file, line and byte offset; replace: "
        "it becomes U+FFFD and is counted in the manifest")

    @model_validator(mode="after")
    def _needs_location(self) -> "SourceConfig":
        needed = {"local": "path", "http": "url", "hf": "dataset"}[self.kind]
        if getattr(self, needed) is None:
            raise ValueError(f"a source of kind '{self.kind}' needs '{needed}'")
        if self.split_by == "separator" and self.separator is None:
            raise ValueError("split_by 'separator' needs 'separator' (e.g. '<|endoftext|>')")
        try:
            newline_is_a_byte = "\n".encode(self.encoding) == b"\n"
        except LookupError:
            raise ValueError(f"unknown encoding '{self.encoding}' (e.g. utf-8, latin-1, cp1252)") from None
        if not newline_is_a_byte:
            raise ValueError(f"encoding '{self.encoding}' is not ASCII-compatible (UTF-16/32): convert the file to "
                             "UTF-8 first")
        _check_addresses(self)
        return self

    @property
    def document_split(self) -> str:
        return self.split_by or ("separator" if self.separator is not None else "paragraph")


class AcquireConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    byte_budget: int | None = Field(None, gt=0, description="keep whole documents until this many UTF-8 bytes; "
                                    "reading stops there")
    min_chars: int = Field(1, ge=1, description="drop documents shorter than this after normalisation")
    batch_bytes: int = Field(4_000_000, ge=1, description="documents are written in row groups of about this many "
                             "bytes; a row group is one unit of the shard stage's mapped work")
