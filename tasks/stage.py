"""The stage mechanism and artifact I/O: the one module in `tasks/` that is not a stage.

A stage is a small frozen record, read like marin's executor steps: its name, a plain function, and the names of the
stages whose artifacts it reads (`inputs=("tokenizer", "shard")`). The function is called as
`run(cfg, out_dir, log, **inputs)`, each input named after the stage that made it; a declared input the function does
not take (or a stage name that does not exist) fails when the module is imported, not mid-run.

A stage's cache key is the hash of exactly what its output depends on: its own config slice, the fingerprints of the
upstream artifacts it reads, and its code identity, which is derived, not listed: the project modules its function's
module imports, transitively, each hashed on its syntax tree with docstrings removed (comments never reach the tree).
A comment edit never re-runs anything; a helper module nobody remembered to list can never serve stale output.

An artifact is a directory that exists for the pipeline only once its `manifest.json` is written, last and
atomically. Every file a stage writes goes through `atomic_path` (a temporary name in the same directory, fsync, then
`os.replace`), Parquet and safetensors included, so a killed stage never leaves a file that looks finished. The
artifact's fingerprint covers the checksums of its files and what produced them, not its timings, so a stage that
re-runs to the same bytes invalidates nothing downstream.
"""
from __future__ import annotations

import ast
import contextlib
import errno
import functools
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pydantic import BaseModel

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ".prefect-results"
MANIFEST = "manifest.json"
# The pipeline's stages in the order they run: a stage may read only stages named before it.
PIPELINE = ("acquire", "synthesize", "tokenizer", "shard", "train", "evaluate", "export", "register")
PROJECT_PACKAGES = ("tasks", "model", "pipeline_config", "flows")
LOCK = ".lock"


# ---------------------------------------------------------------------------------------------------------- errors
class PipelineError(Exception):
    """A failure the user can cause and fix: the message names the fix. The command line prints it as one line
    (exit 1); Prefect retries it only when `transient` (a 5xx, 429 or 408, a dropped connection), never a 404 or a bad
    checksum, which no retry can change."""

    transient = False


class ArtifactsBusy(PipelineError):
    """Another run holds the artifacts directory's lock."""


class StorageFull(PipelineError):
    """A stage could not write its output: the disk is full, a quota is reached, or the file system is read-only."""


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def storage_errno(exc: BaseException) -> int | None:
    """The errno of `exc` when it says the disk cannot take more (full, over quota, read-only), else None: an
    OSError's own, the `(os error N)` that Rust libraries (safetensors, tokenizers) put in their messages, or
    SQLite's "database or disk is full" inside MLflow's exception."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found and int(found.group(1)) in _STORAGE_ERRNOS:
        return int(found.group(1))
    return errno.ENOSPC if "database or disk is full" in str(exc) else None


class ArtifactsUnusable(PipelineError):
    """The artifacts directory cannot be created or written (a file in the way, a read-only or missing mount)."""


def retryable(exc: BaseException | None) -> bool:
    """Whether a retry can change the outcome: a project error marked transient, or a dropped connection or
    timeout from a library. Deterministic project errors and bugs are not retried."""
    if isinstance(exc, PipelineError):
        return exc.transient
    return isinstance(exc, (ConnectionError, TimeoutError))


_CREDENTIAL_PARAMS = re.compile(
    r"(?i)([?&](?:access_token|token|api_key|apikey|key|password|sig|signature|x-amz-signature|x-amz-credential|"
    r"x-amz-security-token)=)[^&#\s]*")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s:]*(?::[^/@\s]*)?@")


def redact(text: str) -> str:
    """`text` with the credentials a URL can carry (user:password@, token/signature query parameters) replaced by
    `***`, for everything the pipeline records: manifests, MLflow params, error messages."""
    return _CREDENTIAL_PARAMS.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def redacted(value: Any) -> Any:
    """`redact` applied to every string inside a JSON-like value."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redacted(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [redacted(inner) for inner in value]
    return value


# ------------------------------------------------------------------------------------------------- artifact files
def json_digest(payload: Any) -> str:
    """SHA-256 of `payload` as sorted JSON: the one way the pipeline hashes structured data."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to open a directory; the rename still happened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it into place.

    For writers that want a file name (pyarrow, safetensors); `write_atomic` is the same for bytes in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path, names: list[str], records: Mapping[str, int] | None = None) -> dict[str, dict]:
    """Size and checksum of each named file (and its record count where given), for a manifest's `files`."""
    described = {}
    for name in names:
        entry: dict[str, Any] = {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
        if records and name in records:
            entry["records"] = records[name]
        described[name] = entry
    return described


class TornFileError(PipelineError, ValueError):
    """A JSON-lines file is corrupt somewhere other than its last line, so no kill mid-write explains it."""


def read_jsonl(path: Path, log: logging.Logger | None = None) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file the pipeline appended to, with one rule for damage: a bad *last* line is
    what a kill mid-write leaves, so it is dropped (and logged); a bad line before it is corruption and raises."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if any(rest.strip() for rest in lines[number:]):
                raise TornFileError(
                    f"{path} line {number} is corrupt and is not the last line, so a kill mid-write did not leave "
                    "it: move the file away and re-run"
                ) from None
            (log or logging.getLogger("scriptorium")).warning(
                "%s ends with a torn line (%d bytes, left by a kill); it is dropped", path.name, len(line))
            break
        records.append(record)
    return records


def seal_jsonl(path: Path) -> None:
    """Make a JSON-lines file safe to append to: cut off a torn last line (what a kill mid-write leaves), or end a
    complete last line that lacks only its newline."""
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    if not data or data.endswith(b"\n"):
        return
    head, newline, tail = data.rpartition(b"\n")
    try:
        json.loads(tail)
        complete = True
    except ValueError:
        complete = False
    with open(path, "r+b") as handle:
        if complete:
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n")
        else:
            handle.truncate(len(head) + len(newline))
        handle.flush()
        os.fsync(handle.fileno())


# ------------------------------------------------------------------------------------------------------ artifacts
@dataclass(frozen=True)
class Artifact:
    """What a stage hands the next one: where its output lives and the fingerprint of its manifest."""

    stage: str
    path: Path
    fingerprint: str

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))


CONTENT_KEYS = ("stage", "config", "upstream", "files")


def fingerprint(manifest: dict[str, Any]) -> str:
    """What downstream keys hash: the output files' checksums plus what produced them, not the manifest's timings.
    A manifest without a `files` section is fingerprinted whole."""
    content = {key: manifest[key] for key in CONTENT_KEYS if key in manifest} if "files" in manifest else manifest
    return json_digest(content)


def write_manifest(directory: Path, stage: str, manifest: dict[str, Any]) -> Artifact:
    directory = Path(directory)
    write_json(directory / MANIFEST, redacted({"stage": stage, **manifest}))
    return load_artifact(directory, stage)


def read_manifest(path: Path, log: logging.Logger | None = None) -> dict[str, Any] | None:
    """The manifest at `path`, or None when there is none or it is damaged (torn, not JSON, not an object): a
    damaged manifest means the stage did not finish as far as the pipeline can tell, so it runs again."""
    try:
        data = json.loads(Path(path).read_bytes())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        (log or logging.getLogger("scriptorium")).warning(
            "%s is damaged (%s); its stage runs again", path, str(exc).splitlines()[0][:120])
        return None
    return data


def load_artifact(directory: Path, stage: str, log: logging.Logger | None = None) -> Artifact | None:
    data = read_manifest(Path(directory) / MANIFEST, log)
    if data is None:
        return None
    return Artifact(stage=stage, path=Path(directory).resolve(), fingerprint=fingerprint(data))


# -------------------------------------------------------------------------------------------------- code identity
def _module_file(name: str) -> Path | None:
    """The source file of a project module (`tasks.shard` -> tasks/shard.py), or None for anything else."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Modules a tree imports anywhere (top level or inside functions), resolved to absolute dotted names; for
    `from pkg import name` both `pkg` and `pkg.name` (which may be a submodule) are candidates."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(filter(None, [*parts, base]))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@functools.lru_cache(maxsize=None)
def _module_source(name: str) -> tuple[str, frozenset[str]] | None:
    """(digest of the module's syntax tree without docstrings, the project modules it imports)."""
    path = _module_file(name)
    if path is None:
        return None
    tree = _strip_docstrings(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    imported = _imports(tree, name, path.name == "__init__.py")
    parents = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}  # packages run on import
    deps = frozenset(m for m in imported | parents if _module_file(m) is not None)
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest(), deps


STAGE_MODULES = frozenset(f"tasks.{name}" for name in PIPELINE)
# What a person sees (Prefect artifacts, time and energy; see tasks/reporting/) never shapes a stage's files, so it
# is in no stage's code identity: editing a summary table re-runs nothing.
REPORTING = "tasks.reporting"
# The loader reads presets and `--set` into values, and a stage's key holds its slice of those values: how they were
# read never shapes a stage's files, so editing the loader re-runs nothing. The package's __init__ only re-exports the
# loader and the whole schema; a stage imports the module of its own settings (pipeline_config/train.py, ...), whose
# defaults, validators and properties do shape its files and are followed.
CONFIG_READING = frozenset({"pipeline_config", "pipeline_config.loader"})


def _untracked(name: str) -> bool:
    return name in STAGE_MODULES or name in CONFIG_READING or name == REPORTING or name.startswith(REPORTING + ".")


def code_modules(module: str) -> list[str]:
    """`module` and every project module it imports, transitively, sorted; the walk stops at other stages' modules,
    at `tasks/reporting/` (what a person sees, never what a stage writes) and at the config loader (CONFIG_READING).

    A stage reads another stage's output through that stage's artifact, whose fingerprint is already in its key; it
    imports the other stage's module only for file names, which the fingerprint covers too. Following those imports
    would make an edit to, say, the llama.cpp backend retrain the model. Code that reads an artifact therefore lives
    in a shared module (e.g. `tasks/corpus/reader.py`), which the walk does follow."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or (_untracked(name) and name != module) or (source := _module_source(name)) is None:
            continue
        seen.add(name)
        todo.extend(source[1] - seen)
    return sorted(seen)


def code_identity(module: str) -> str:
    return json_digest({name: _module_source(name)[0] for name in code_modules(module)})


# ---------------------------------------------------------------------------------------------------------- stages
StageFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: `run(cfg, out_dir, log, **inputs) -> manifest fields`, the stages it reads, and its knobs."""

    name: str
    run: StageFn
    inputs: tuple[str, ...] = ()
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

    def __post_init__(self) -> None:
        if self.name not in PIPELINE:
            raise ValueError(f"stage '{self.name}' is not in the pipeline {PIPELINE}")
        earlier = PIPELINE[: PIPELINE.index(self.name)]
        unknown = [name for name in self.inputs if name not in earlier]
        if unknown:
            raise ValueError(f"stage '{self.name}' reads {unknown}, which are not stages before it ({earlier})")
        params = inspect.signature(self.run).parameters
        missing = [name for name in self.inputs if name not in params]
        if missing:
            raise TypeError(f"stage '{self.name}': {self.run.__qualname__} takes no parameter for input(s) {missing}")

    @property
    def code(self) -> str:
        return code_identity(self.run.__module__)

    def _check_inputs(self, upstream: Mapping[str, Artifact | None]) -> None:
        if set(upstream) != set(self.inputs):
            raise TypeError(f"stage '{self.name}' reads {sorted(self.inputs)}, was given {sorted(upstream)}")

    def _identity(self, cfg: BaseModel, upstream: Mapping[str, Artifact | None], exclude: frozenset[str],
                  code: bool = True) -> str:
        self._check_inputs(upstream)
        return json_digest({
            "stage": self.name,
            "config": cfg.model_dump(mode="json", exclude=set(exclude)),
            "upstream": key_upstream(upstream),
            "code": self.code if code else None,
            # what lives outside the pipeline (local files' sizes and times, a URL's checksum)
            "external": self.external(cfg) if self.external else None,
        })

    def key(self, cfg: BaseModel, upstream: Mapping[str, Artifact | None]) -> str:
        return self._identity(cfg, upstream, frozenset())

    def workdir(self, root: Path, cfg: BaseModel, upstream: Mapping[str, Artifact | None]) -> Path:
        identity = self._identity(cfg, upstream, self.workdir_ignores, code=self.code_in_workdir)
        return Path(root).resolve() / self.name / identity[:16]

    def finished(self, out_dir: Path, log: logging.Logger | None = None) -> Artifact | None:
        """The artifact in `out_dir` if it is complete and intact, else None."""
        artifact = load_artifact(out_dir, self.name, log)
        if artifact is not None and self.intact is not None and not self.intact(artifact):
            return None
        return artifact

    def current(self, cfg: BaseModel, upstream: Mapping[str, Artifact | None], root: Path,
                log: logging.Logger | None = None) -> Artifact | None:
        """The finished artifact for exactly this key, or None. A work directory can be shared by several keys
        (the knobs in `workdir_ignores`), so a finished manifest counts only if it was written for this key."""
        existing = self.finished(self.workdir(root, cfg, upstream), log)
        if existing is not None and existing.manifest.get("cache_key") == self.key(cfg, upstream):
            return existing
        return None

    def execute(self, cfg: BaseModel, upstream: Mapping[str, Artifact | None], root: Path,
                log: logging.Logger | None = None, report: BaseModel | None = None) -> Artifact:
        """Run the stage without Prefect; returns the existing artifact if this exact key already finished.

        The run is timed (and its energy tracked when `report`, the `ReportConfig`, says so) into the manifest's
        `compute`; inside a Prefect run its summary is published as an artifact (tasks/reporting/)."""
        log = log or logging.getLogger(f"scriptorium.{self.name}")
        out_dir = self.workdir(root, cfg, upstream)
        key = self.key(cfg, upstream)
        existing = self.current(cfg, upstream, root, log)
        if existing is not None:
            log.info("%s: output already complete in %s", self.name, out_dir)
            return existing
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)
        from tasks.reporting.compute import measured
        from tasks.reporting.prefect_artifacts import reporting
        from tasks.reporting.summaries import publish_summary

        try:
            with reporting(getattr(report, "prefect_artifacts", True)):
                with measured(self.name, out_dir, report, log) as compute:
                    fields = self.run(cfg, out_dir, log, **upstream)
                artifact = write_manifest(out_dir, self.name, {
                    "cache_key": key, "config": cfg.model_dump(mode="json"), "upstream": key_upstream(upstream),
                    **fields, "compute": compute.figures(fields),
                })
                publish_summary(self.name, artifact.manifest, artifact.path)
        except Exception as exc:
            code = storage_errno(exc)
            if code is None:
                raise
            free = shutil.disk_usage(out_dir).free / 1e9
            raise StorageFull(f"{self.name}: {os.strerror(code).lower()} writing {out_dir} ({free:.2f} GB free): "
                              "make room, or set artifacts_dir on a larger disk, and run again; finished stages "
                              "come from the cache and training resumes from its last checkpoint") from None
        return artifact


def key_upstream(upstream: Mapping[str, Artifact | None]) -> dict[str, str | None]:
    return {name: art.fingerprint if art else None for name, art in sorted(upstream.items())}


# ------------------------------------------------------------------------------------------- the artifacts lock
_held: dict[Path, list[int]] = {}  # artifacts root -> [lock file descriptor, nesting depth] held by this process
_left: dict[Path, dict[str, Any]] = {}  # artifacts root -> what a holder that died holding its lock had written there
_held_guard = threading.Lock()


def lock_holder(root: Path) -> str:
    """Who holds the artifacts lock, as its holder wrote it: pid, host, start time, and its flow run once started."""
    try:
        holder = json.loads((Path(root) / LOCK).read_text(encoding="utf-8"))
        run = f" (Prefect flow run '{holder['flow_run_name']}')" if holder.get("flow_run_name") else ""
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}{run}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


def _lock(root: Path, wait: bool, log: logging.Logger) -> int:
    import fcntl

    try:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ArtifactsUnusable(f"artifacts_dir {root} cannot be written ({exc.strerror}): set artifacts_dir to a "
                                "folder this user can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(root)
        if not wait:
            os.close(fd)
            raise ArtifactsBusy(f"{root} is in use by {holder}: wait for it, or run without --no-wait to queue "
                                "behind it") from None
        log.warning("%s is in use by %s; waiting for it to finish", root, holder)
        fcntl.flock(fd, fcntl.LOCK_EX)
    with contextlib.suppress(ValueError):  # a holder empties the file as it lets go: left non-empty, it died
        left = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
        if isinstance(left, dict):
            _left[root] = left
    _write_holder(fd, {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return fd


def _write_holder(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def note_holder(root: Path, **fields: Any) -> dict[str, Any] | None:
    """Add `fields` (e.g. the Prefect flow run) to what this process wrote in the artifacts lock it holds; returns
    what a previous holder that died holding the lock had written there (once), or None."""
    root = Path(root).resolve()
    with _held_guard:
        fd = _held[root][0]
        _write_holder(fd, {**json.loads(os.pread(fd, 1 << 16, 0)), **fields})
        return _left.pop(root, None)


@contextlib.contextmanager
def hold_artifacts(root: Path, wait: bool = True, log: logging.Logger | None = None) -> Iterator[None]:
    """Hold the artifacts directory's lock (an OS file lock on `<root>/.lock`) for the block.

    One run at a time per artifacts directory: its stage directories, downloads, story journal, checkpoints and
    MLflow store are written by one process. A second run waits (or, with `wait=False`, fails at once naming the
    holder). Re-entrant within a process, so the command line, the flow and each stage can all hold it. The OS
    drops the lock when its holder dies, SIGKILL included, so a killed run never leaves a stale lock."""
    root = Path(root).resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "a file is in the way" if root.is_file() else f"{exc.strerror}: {exc.filename}"
        raise ArtifactsUnusable(f"artifacts_dir {root} cannot be created ({why}): set artifacts_dir to a folder "
                                "this user can write") from None
    with _held_guard:
        if root in _held:
            _held[root][1] += 1
        else:
            _held[root] = [_lock(root, wait, log or logging.getLogger("scriptorium")), 1]
    try:
        yield
    finally:
        with _held_guard:
            _held[root][1] -= 1
            if _held[root][1] == 0:
                fd = _held.pop(root)[0]
                if root in _left:  # a dead holder's name no flow run took up (flows/killed_runs.py): keep it
                    _write_holder(fd, _left.pop(root))
                else:
                    os.ftruncate(fd, 0)  # let go of in order: the next holder finds no one who died holding it
                os.close(fd)  # closing the descriptor releases the lock


# ---------------------------------------------------------------------------------------------------------- Prefect
# Prefect persists a task's result so that a cache hit can hand it back. The record names its own serializer, and
# Prefect's default is pickle: a record anyone could write would run code on the next cached run. A stage's result
# is therefore a reference (stage, path relative to the artifacts root, fingerprint) serialized as plain JSON, a
# record in any other form is deleted before Prefect reads it, and the Artifact is rebuilt from the manifest it
# points at, so a moved artifacts directory keeps its cache.
REFERENCE_SERIALIZER = "scriptorium-artifact-reference"


def results_dir(root: Path) -> Path:
    return Path(root).resolve() / RESULTS_DIR


class StaleResult(PipelineError):
    """A cache record points at an artifact that is gone or changed (the check before reading it raced a writer)."""


def reference(artifact: Artifact, root: Path) -> dict[str, str]:
    """What the Prefect record holds for `artifact`: no absolute path, nothing but strings."""
    return {"stage": artifact.stage, "path": artifact.path.relative_to(Path(root).resolve()).as_posix(),
            "fingerprint": artifact.fingerprint}


def resolve_reference(ref: Any, root: Path) -> Artifact:
    """The Artifact a record's reference points at, rebuilt from its manifest under `root`."""
    if not (isinstance(ref, dict) and set(ref) == {"stage", "path", "fingerprint"}
            and all(isinstance(v, str) for v in ref.values())):
        raise StaleResult(f"a cache record in {results_dir(root)} is not an artifact reference; delete the folder")
    relative = Path(ref["path"])
    artifact = None
    if not relative.is_absolute() and ".." not in relative.parts:
        artifact = load_artifact(Path(root).resolve() / relative, ref["stage"])
    if artifact is None or artifact.fingerprint != ref["fingerprint"]:
        raise StaleResult(f"the cached {ref['stage']} artifact {ref['path']} is gone or changed; re-run")
    return artifact


@functools.lru_cache(maxsize=None)
def reference_serializer() -> Any:
    """Prefect's serializer for this pipeline's results (stage references, a failed run's exception): JSON only, no
    object hooks, so reading a record runs no code."""
    return _reference_serializer_class()()


def __getattr__(name: str) -> Any:
    """`tasks.stage.ArtifactReferenceSerializer`, built on first use so that importing this module does not import
    Prefect (torchrun, plain tests). It is reachable by that name because a stage's task travels to Dask workers
    (as the parent of the chunk task runs) with its serializer: cloudpickle sends a class it can find by module and
    name as that reference, but a class local to a function by value, which Prefect's registry refuses to rebuild."""
    if name == "ArtifactReferenceSerializer":
        return _reference_serializer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _reference_serializer_class() -> type:
    from prefect.serializers import Serializer
    from pydantic import Field

    class ArtifactReferenceSerializer(Serializer):
        type: str = Field(default=REFERENCE_SERIALIZER, frozen=True)

        def dumps(self, obj: Any) -> bytes:
            if isinstance(obj, BaseException):  # Prefect persists a failed run's exception as its result
                obj = {"error": type(obj).__name__, "message": redact(str(obj))}
            return json.dumps(obj, sort_keys=True).encode()

        def loads(self, blob: bytes) -> Any:
            data = json.loads(blob)
            if isinstance(data, dict) and set(data) == {"error", "message"}:
                return PipelineError(f"{data['error']}: {data['message']}")
            return data

    ArtifactReferenceSerializer.__qualname__ = ArtifactReferenceSerializer.__name__  # found as tasks.stage.<name>
    return ArtifactReferenceSerializer


def trusted_record(path: Path) -> bool:
    """Whether a Prefect record file is one this pipeline wrote: JSON whose serializer is the reference one (so
    Prefect will not unpickle it) and whose result is a string."""
    try:
        record = json.loads(Path(path).read_bytes())
        serializer = record["metadata"]["serializer"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return serializer == REFERENCE_SERIALIZER and isinstance(record.get("result"), str)


class _ProjectErrorsInOneLine(logging.Filter):
    """Prefect logs a failed run's exception with its traceback. A project error's message already names the fix,
    so its traceback is dropped (the line stays); a bug keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError):
            record.exc_info, record.exc_text = None, None
        return True


@functools.lru_cache(maxsize=None)
def _quiet_project_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_ProjectErrorsInOneLine())


def _retry_condition(_task: Any, _task_run: Any, state: Any) -> bool:
    return retryable(state.data if isinstance(state.data, BaseException) else None)


def prefect_task(stage: Stage):
    """The thin Prefect task around `stage`: caching on `Stage.key`, retries of transient errors only, Prefect's
    run logger, results as JSON references."""
    from prefect import task
    from prefect.logging import get_run_logger

    _quiet_project_errors()

    def cache_key(_context: Any, parameters: dict[str, Any]) -> str:
        cfg, upstream, root = parameters["cfg"], parameters["upstream"], parameters["root"]
        key = stage.key(cfg, upstream)
        record = results_dir(root) / key
        # Someone deleted the artifact (or what it made elsewhere) by hand, or the work directory now holds another
        # key's output: drop the record too, or Prefect would hand back a dead or wrong path. A record that is not
        # plain JSON in our form is deleted unread.
        if record.exists() and (stage.current(cfg, upstream, root) is None or not trusted_record(record)):
            if not trusted_record(record):
                logging.getLogger("scriptorium").warning("%s: cache record %s is not one this pipeline wrote; "
                                                         "deleted unread, the stage runs again", stage.name, record)
            record.unlink(missing_ok=True)
        return key

    def run_stage(cfg: BaseModel, upstream: dict[str, Artifact | None], root: Path,
                  report: BaseModel | None = None) -> dict[str, str]:
        with hold_artifacts(root):
            return reference(stage.execute(cfg, upstream, root, get_run_logger(), report), root)

    return task(
        run_stage,
        name=stage.name,
        task_run_name=stage.name,
        cache_key_fn=cache_key,
        persist_result=True,
        result_serializer=reference_serializer(),
        retries=stage.retries,
        # exponential backoff from the declared delay: 5 s, 10 s, 20 s... for a server that needs a moment
        retry_delay_seconds=[stage.retry_delay_seconds * 2**attempt for attempt in range(stage.retries)] or 0,
        retry_condition_fn=_retry_condition,
    )


class StageRunner:
    """Calls stage tasks inside a flow with result storage under the artifacts root, and remembers their states.

    It holds the artifacts lock around each call (re-entrant: the flow normally holds it for the whole run)."""

    def __init__(self, root: Path, report: BaseModel | None = None):
        self.root = Path(root).resolve()
        self.report = report  # the ReportConfig: Prefect artifacts, energy tracking (in no cache key)
        self.states: dict[str, str] = {}

    def __call__(self, stage_task: Any, cfg: BaseModel, **upstream: Artifact | None) -> Artifact:
        configured = stage_task.with_options(result_storage=results_dir(self.root))
        with hold_artifacts(self.root):
            state = configured(cfg=cfg, upstream=upstream, root=self.root, report=self.report, return_state=True)
            self.states[stage_task.name] = state.name
            return resolve_reference(state.result(), self.root)
