"""`scriptorium prune`: free the disk that old stage outputs hold, keeping what recent registered versions came from.

Every run whose configuration, data or code changed writes new stage directories under `artifacts/<stage>/<key>/`,
and nothing removes the old ones: a nightly retrain on a growing folder adds its documents, shards and checkpoints
every night. `prune` keeps

- the lineage of the `keep` newest register artifacts (each registered version: its register, export, evaluate,
  train, shard, tokenizer, synthesize and acquire directories, found through the fingerprints each manifest records
  of its inputs), so re-running any of those configurations is still all Cached;
- every directory finished since the oldest of those (a run that failed or was stopped after it, to be re-run), and
  its inputs;
- every directory without a manifest (a stage that did not finish: a training run to resume holds its checkpoints
  there), and the inputs such a training run names in its `upstream.json`;

and removes the other finished stage directories, with the Prefect cache records that point at them (a removed
stage simply runs again if its configuration comes back), and the downloaded files (`acquire/.downloads/`) that only
removed acquire directories read (none while an acquire directory is unfinished: it may be resuming one). The
MLflow store (`artifacts/mlflow`: every registered version's model, a copy of its own) is never touched. It holds
the artifacts lock, so it never removes what a run is writing, and it removes a directory's manifest first, so one
cut short halfway is a stage that runs again.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.acquire import DOWNLOADS
from tasks.stage import MANIFEST, PIPELINE, fingerprint, hold_artifacts, read_manifest, results_dir
from tasks.train import UPSTREAM


@dataclass
class Entry:
    """One stage directory under the artifacts root."""

    stage: str
    path: Path
    size: int
    manifest: dict[str, Any] | None = None
    finished: float = 0.0  # the manifest's modification time

    @functools.cached_property  # asked several times per directory while planning: hashed once
    def fingerprint(self) -> str | None:
        return fingerprint(self.manifest) if self.manifest is not None else None


@dataclass
class Plan:
    kept: list[Entry] = field(default_factory=list)
    removed: list[Entry] = field(default_factory=list)
    unfinished: list[Entry] = field(default_factory=list)
    roots: list[Entry] = field(default_factory=list)  # the register artifacts whose lineage is kept, newest first
    downloads: list[Entry] = field(default_factory=list)  # folders under acquire/.downloads only removed ones read


def _size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def stage_entries(root: Path) -> list[Entry]:
    entries = []
    for stage in PIPELINE:
        for path in sorted(p for p in (Path(root) / stage).glob("[!.]*") if p.is_dir() and not p.is_symlink()):
            manifest = read_manifest(path / MANIFEST)
            finished = (path / MANIFEST).stat().st_mtime if manifest is not None else 0.0
            entries.append(Entry(stage, path, _size(path), manifest, finished))
    return entries


def plan(root: Path, keep: int) -> Plan:
    """What `prune` keeps and removes under `root` (read only)."""
    entries, result = stage_entries(root), Plan()
    finished = [e for e in entries if e.manifest is not None]
    result.unfinished = [e for e in entries if e.manifest is None]
    result.roots = sorted((e for e in finished if e.stage == "register"), key=lambda e: e.finished, reverse=True)[:keep]
    if not result.roots:  # no registered run yet: nothing tells what is old
        result.kept = finished
        return result
    by_fingerprint = {e.fingerprint: e for e in finished}
    since = min(e.finished for e in result.roots)
    wanted, todo = set(), [e.fingerprint for e in finished if e.finished >= since]
    todo += [f for e in result.unfinished for f in _started_on(e)]
    while todo:
        current = todo.pop()
        if current in wanted or current not in by_fingerprint:
            continue
        wanted.add(current)
        todo.extend(by_fingerprint[current].manifest.get("upstream", {}).values())
    for entry in finished:
        (result.kept if entry.fingerprint in wanted else result.removed).append(entry)
    result.downloads = _unread_downloads(Path(root), result)
    return result


def _started_on(entry: Entry) -> list[str]:
    """The input fingerprints an unfinished training run wrote as it started (so resuming it finds its shard)."""
    try:
        upstream = json.loads((entry.path / UPSTREAM).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [f for f in upstream.values() if isinstance(f, str)] if isinstance(upstream, dict) else []


def _unread_downloads(root: Path, result: Plan) -> list[Entry]:
    if any(e.stage == "acquire" for e in result.unfinished):
        return []

    def read(entries: list[Entry]) -> set[str]:
        return {f for e in entries if e.stage == "acquire" for f in e.manifest.get("downloads", [])}

    downloads = (root / "acquire" / DOWNLOADS).resolve()
    folders = [downloads / f for f in sorted(read(result.removed) - read(result.kept))
               if isinstance(f, str) and ".." not in Path(f).parts and not Path(f).is_absolute()]  # data, not orders
    return [Entry("acquire", f, _size(f)) for f in folders if f.is_dir() and not f.is_symlink()
            and f.resolve().is_relative_to(downloads)]


def _drop_records(root: Path, removed: set[str]) -> int:
    """Delete the Prefect cache records that point at a removed directory (relative path in their reference)."""
    dropped = 0
    for record in results_dir(root).glob("*"):
        try:
            reference = json.loads(json.loads(record.read_bytes())["result"])
            pointed = reference["path"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge: the stage mechanism deletes records it cannot trust before reading them
        if pointed in removed:
            record.unlink(missing_ok=True)
            dropped += 1
    return dropped


def prune(root: Path, keep: int, dry_run: bool = False, wait: bool = True) -> tuple[Plan, int]:
    """Remove what `plan` says under the artifacts lock; returns the plan and the number of cache records dropped."""
    root = Path(root).resolve()
    with hold_artifacts(root, wait=wait):
        result = plan(root, keep)
        if dry_run:
            return result, 0
        for entry in result.removed:
            (entry.path / MANIFEST).unlink()  # first: a removal cut short leaves a stage that runs again
            shutil.rmtree(entry.path)
        for entry in result.downloads:
            shutil.rmtree(entry.path)
            for parent in entry.path.relative_to(root / "acquire" / DOWNLOADS).parents[:-1]:  # hf/org/ left empty
                with contextlib.suppress(OSError):
                    (root / "acquire" / DOWNLOADS / parent).rmdir()
        return result, _drop_records(root, {e.path.relative_to(root).as_posix() for e in result.removed})


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _mb(entries: list[Entry]) -> str:
    return _human(sum(e.size for e in entries))


def report(root: Path, result: Plan, keep: int, records: int, dry_run: bool) -> list[str]:
    """The lines `scriptorium prune` prints."""
    if not result.roots:
        return [f"{root}: no register artifact yet, so nothing is old: kept {len(result.kept)} stage directories "
                f"({_mb(result.kept)})"]
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {e.path} ({_human(e.size)})" for e in result.removed + result.downloads]
    versions = ", ".join(str(e.manifest.get("version", "?")) for e in result.roots)
    downloads = f", {len(result.downloads)} download folders ({_mb(result.downloads)})" if result.downloads else ""
    lines.append(f"{verb} {len(result.removed)} stage directories ({_mb(result.removed)}){downloads}"
                 + ("" if dry_run else f" and {records} cache records") + f"; kept {len(result.kept)} "
                 f"({_mb(result.kept)}): the lineage of the {len(result.roots)} newest registered run(s) (version "
                 f"{versions}; --keep {keep}) and everything finished since")
    if result.unfinished:
        lines.append(f"left {len(result.unfinished)} unfinished stage directories ({_mb(result.unfinished)}; a "
                     "stopped training run resumes from its checkpoints there): "
                     + ", ".join(f"{e.stage}/{e.path.name}" for e in result.unfinished))
    return lines
