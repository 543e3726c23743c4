"""The one caching mechanism every stage shares.

A stage's cache key is the hash of exactly what its output depends on: its own config slice, the fingerprints of the
upstream manifests it reads, and the source of its code (its module plus any package it names, e.g. `model/` for
training). Prefect stores the result under that key, so a re-run after a config change re-executes that stage and,
because its manifest fingerprint changes, everything downstream of it, and nothing upstream.

The output directory is derived from the same key, so two configurations never overwrite each other and a killed
stage re-runs in the same directory (where synthesize and train resume from what they left). A stage may leave some
knobs out of the directory's identity (`workdir_ignores`): asking synthesize for more stories reuses the directory
that holds the first ones and extends it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import BaseModel

from tasks.artifacts import Artifact, load_artifact, write_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ".prefect-results"

StageFn = Callable[[Any, Mapping[str, Artifact | None], Path, logging.Logger], dict[str, Any]]


def code_version(paths: tuple[str, ...]) -> str:
    """SHA-256 over the Python sources at `paths` (files or packages, relative to the repository root)."""
    digest = hashlib.sha256()
    for rel in sorted(paths):
        target = REPO_ROOT / rel
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for source in files:
            digest.update(str(source.relative_to(REPO_ROOT)).encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: a plain function `run(cfg, upstream, out_dir, log) -> manifest fields`, plus its identity."""

    name: str
    run: StageFn
    code: tuple[str, ...]
    workdir_ignores: frozenset[str] = field(default_factory=frozenset)
    # False for stages whose directory is a journal guarded by its own identity check (synthesize): editing their
    # code must not strand hours of generated stories in a directory nobody reads again.
    code_in_workdir: bool = True
    external: Callable[[Any], Any] | None = None
    # Whether what a finished artifact made outside its directory still exists (register: its version in the MLflow
    # store). When it does not, the artifact counts as missing and the stage runs again.
    intact: Callable[[Artifact], bool] | None = None
    retries: int = 0
    retry_delay_seconds: float = 0

    def _identity(
        self, cfg: BaseModel, upstream: Mapping[str, Artifact | None], exclude: frozenset[str], code: bool = True
    ) -> str:
        return _hash(
            {
                "stage": self.name,
                "config": cfg.model_dump(mode="json", exclude=set(exclude)),
                "upstream": self.key_upstream(upstream),
                "code": code_version(self.code) if code else None,
                # what lives outside the pipeline (local files' sizes and times, a URL's checksum)
                "external": self.external(cfg) if self.external else None,
            }
        )

    def key(self, cfg: BaseModel, upstream: Mapping[str, Artifact | None]) -> str:
        return self._identity(cfg, upstream, frozenset())

    def workdir(self, root: Path, cfg: BaseModel, upstream: Mapping[str, Artifact | None]) -> Path:
        identity = self._identity(cfg, upstream, self.workdir_ignores, code=self.code_in_workdir)
        return Path(root).resolve() / self.name / identity[:16]

    def finished(self, out_dir: Path) -> Artifact | None:
        """The artifact in `out_dir` if it is complete and intact, else None."""
        artifact = load_artifact(out_dir, self.name)
        if artifact is not None and self.intact is not None and not self.intact(artifact):
            return None
        return artifact

    @staticmethod
    def key_upstream(upstream: Mapping[str, Artifact | None]) -> dict[str, str | None]:
        return {name: art.fingerprint if art else None for name, art in sorted(upstream.items())}

    def execute(
        self,
        cfg: BaseModel,
        upstream: Mapping[str, Artifact | None],
        root: Path,
        log: logging.Logger | None = None,
    ) -> Artifact:
        """Run the stage without Prefect; returns the existing artifact if this exact key already finished."""
        log = log or logging.getLogger(f"scriptorium.{self.name}")
        out_dir = self.workdir(root, cfg, upstream)
        key = self.key(cfg, upstream)
        existing = self.finished(out_dir)
        if existing is not None and existing.manifest.get("cache_key") == key:
            log.info("%s: output already complete in %s", self.name, out_dir)
            return existing
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "manifest.json").unlink(missing_ok=True)
        fields = self.run(cfg, upstream, out_dir, log)
        return write_manifest(
            out_dir,
            self.name,
            {
                "cache_key": key,
                "config": cfg.model_dump(mode="json"),
                "upstream": self.key_upstream(upstream),
                **fields,
            },
        )


def results_dir(root: Path) -> Path:
    return Path(root).resolve() / RESULTS_DIR


def prefect_task(stage: Stage):
    """The thin Prefect task around `stage`: caching on `Stage.key`, retries, Prefect's run logger."""
    from prefect import task
    from prefect.logging import get_run_logger

    def cache_key(_context: Any, parameters: dict[str, Any]) -> str:
        cfg, upstream, root = parameters["cfg"], parameters["upstream"], parameters["root"]
        key = stage.key(cfg, upstream)
        # Someone deleted the artifact (or what it made elsewhere) by hand: drop the cache record too, or Prefect
        # would hand back a dead path.
        if stage.finished(stage.workdir(root, cfg, upstream)) is None:
            (results_dir(root) / key).unlink(missing_ok=True)
        return key

    def run_stage(cfg: BaseModel, upstream: dict[str, Artifact | None], root: Path) -> Artifact:
        return stage.execute(cfg, upstream, root, get_run_logger())

    return task(
        run_stage,
        name=stage.name,
        task_run_name=stage.name,
        cache_key_fn=cache_key,
        persist_result=True,
        retries=stage.retries,
        retry_delay_seconds=stage.retry_delay_seconds,
    )


class StageRunner:
    """Calls stage tasks inside a flow with result storage under the artifacts root, and remembers their states."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.states: dict[str, str] = {}

    def __call__(self, stage_task: Any, cfg: BaseModel, **upstream: Artifact | None) -> Artifact:
        configured = stage_task.with_options(result_storage=results_dir(self.root))
        state = configured(cfg=cfg, upstream=upstream, root=self.root, return_state=True)
        self.states[stage_task.name] = state.name
        return state.result()
