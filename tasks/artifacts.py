"""Artifacts: a stage's output directory, which exists for the pipeline only once its `manifest.json` is written.

Every file is written atomically (a temporary file in the same directory, fsync, then `os.replace`), and the manifest
is written last, so a killed stage never leaves something that looks finished. The artifact's fingerprint, which
downstream cache keys hash, covers the checksums of its files and what produced them (see `fingerprint`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    """What a stage hands the next one: where its output lives and the fingerprint of its manifest."""

    stage: str
    path: Path
    fingerprint: str

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))


def write_atomic(path: Path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and checksum of each named file, for a manifest."""
    return {
        name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
        for name in names
    }


def write_manifest(directory: Path, stage: str, manifest: dict[str, Any]) -> Artifact:
    directory = Path(directory)
    write_json(directory / MANIFEST, {"stage": stage, **manifest})
    return load_artifact(directory, stage)


CONTENT_KEYS = ("stage", "config", "upstream", "files")


def fingerprint(manifest: dict[str, Any]) -> str:
    """What downstream keys hash: the output files' checksums plus what produced them, not the manifest's timings,
    so a stage that re-runs and writes the same bytes (deterministic stages, a resumed synthesize) invalidates
    nothing downstream. A manifest without a `files` section is fingerprinted whole."""
    content = {key: manifest[key] for key in CONTENT_KEYS if key in manifest} if "files" in manifest else manifest
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def load_artifact(directory: Path, stage: str) -> Artifact | None:
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text(encoding="utf-8"))
    return Artifact(stage=stage, path=Path(directory).resolve(), fingerprint=fingerprint(data))
