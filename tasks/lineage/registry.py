"""Registered models as parents: resolve `champion`, `models:/NAME/VERSION` or `models:/NAME@ALIAS` to a version of
the pipeline's MLflow store, and fetch its weights, model config and tokenizer.

A parent is identified by what it is, not by what it was called: name, version, run id and the sha256 of its weights
file and of its tokenizer's model file. That identity is what the train (and tokenizer) stage's cache key hashes, so
`init_from: champion` retrains when the champion moved and only then. Register writes both digests on every version
as tags, so resolving costs a couple of registry queries; a version registered before it did is downloaded once and
hashed. Fetched weights are checked against the digest before use: a version's files that changed since its identity
was taken stop the run instead of training from something else.

Only safetensors, JSON, YAML (safe_load) and tokenizer files are read from the store; nothing is unpickled and the
model's own code (the pyfunc) is never run.
"""
from __future__ import annotations

import functools
import logging
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline_config.registry import RegistryRef
from tasks.stage import PipelineError, file_sha256, redact

WEIGHTS_TAG = "scriptorium.weights_sha256"  # on the version: sha256 of model.safetensors
TOKENIZER_TAG = "scriptorium.tokenizer_sha256"  # on the version: sha256 of tokenizer.model / vocab.json
PARENT_TAG = "scriptorium.parent"  # on the version: "NAME/VERSION" it was trained from ("" for scratch)
PARENT_RUN_TAG = "scriptorium.parent_run_id"
TRAIN_INPUT_TAG = "scriptorium.train_input"  # on the version: digest of the train config and shards it was trained on
TOKENIZER_FILES = ("tokenizer.model", "vocab.json")  # SentencePiece, character-level (model/tokenizer.py)


class LineageError(PipelineError):
    """A parent model that cannot be used: missing, or not the same architecture or tokenizer."""


WITHOUT_PARENT = {"train.init_from": "set train.init_from: scratch",  # each knob naming a parent: how to go without
                  "tokenizer.from_model": "remove tokenizer.from_model (a vocabulary is then learned)"}


@dataclass(frozen=True)
class Parent:
    """A resolved registered model version: what a run starts from."""

    name: str
    version: str
    run_id: str
    weights_sha256: str
    tokenizer_sha256: str
    tracking_uri: str
    train_input: str = ""  # what it was trained from (config + upstream digests); "" when unknown

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def identity(self) -> dict[str, str]:
        """What cache keys hash: everything but where the store lives (a moved artifacts directory keeps its cache)."""
        return {k: v for k, v in asdict(self).items() if k not in ("tracking_uri", "train_input")}


@dataclass(frozen=True)
class ParentFiles:
    weights: Path
    model_config: Path
    tokenizer: Path  # a directory holding tokenizer.model or vocab.json


def tokenizer_digest(directory: Path) -> str:
    """sha256 of a tokenizer directory's model file: the vocabulary, not the fertility report beside it."""
    for name in TOKENIZER_FILES:
        if (Path(directory) / name).is_file():
            return file_sha256(Path(directory) / name)
    raise LineageError(f"{directory} holds no {' or '.join(TOKENIZER_FILES)}")


def _parse(ref: RegistryRef, spec: str) -> tuple[str, str | None, str | None]:
    """(model name, version or None, alias or None) of `champion` / `models:/NAME/VERSION` / `models:/NAME@ALIAS`."""
    if spec == "champion":
        return ref.model_name, None, ref.alias
    name_part = spec.removeprefix("models:/")
    if "@" in name_part:
        name, alias = name_part.split("@", 1)
        return name, None, alias
    name, version = name_part.split("/", 1)
    return name, version, None


def store_exists(uri: str) -> bool:
    """False for a local SQLite store that was never written (MLflow would create it on the first query)."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()


def unreachable_server(uri: str, timeout: float = 10.0) -> str | None:
    """For an http(s) tracking URI, why no server answers it, or None when one does (any HTTP status: a proxy's 401
    is an answer). One try of `timeout` seconds, because MLflow's client retries a refused connection with backoff
    for about four minutes before it says anything. A TLS error counts as an answer: MLflow has its own TLS settings
    (MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout).close()
    except requests.exceptions.SSLError:
        return None
    except (requests.ConnectionError, requests.Timeout) as exc:
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
        why = errno.group(0) if errno else "timed out" if isinstance(exc, requests.Timeout) else type(exc).__name__
        return redact(f"no MLflow tracking server answers at {uri} ({why}): start it, or fix the tracking URI")
    return None


def _model_version(ref: RegistryRef, spec: str, knob: str) -> Any:
    """The MLflow ModelVersion `spec` names; None for `champion` while nobody holds the alias. A missing one is an
    error saying how to go without it (`knob` is the setting that named it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, version, alias = _parse(ref, spec)
    missing = f"{spec} is not in the MLflow store {ref.tracking_uri}"
    if not store_exists(ref.tracking_uri):
        if spec == "champion":
            return None
        raise LineageError(f"{missing} (it holds no model yet): register one first, or {WITHOUT_PARENT[knob]}")
    down = unreachable_server(ref.tracking_uri)
    if down:
        raise LineageError(f"{spec}: {down}")
    client = MlflowClient(ref.tracking_uri)
    try:
        return client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            raise
        if spec == "champion":
            return None
        raise LineageError(f"{missing} ({str(exc).splitlines()[0][:160]}): name an existing version, e.g. "
                           f"models:/{name}/1, or {WITHOUT_PARENT[knob]}") from None


def resolve(ref: RegistryRef | None, spec: str, knob: str = "train.init_from") -> Parent | None:
    """The parent `spec` names, or None for `champion` while there is none."""
    if ref is None:
        raise LineageError(f"{spec} needs the MLflow store to read: run it through the pipeline, or set "
                           "train.registry (tracking_uri, model_name)")
    found = _model_version(ref, spec, knob)
    if found is None:
        return None
    weights, tokenizer = found.tags.get(WEIGHTS_TAG), found.tags.get(TOKENIZER_TAG)
    if not (weights and tokenizer):
        weights, tokenizer = _digests_by_download(ref.tracking_uri, found.name, str(found.version), found.run_id)
    return Parent(found.name, str(found.version), found.run_id, weights, tokenizer, ref.tracking_uri,
                  found.tags.get(TRAIN_INPUT_TAG, ""))


@functools.lru_cache(maxsize=16)
def _digests_by_download(uri: str, name: str, version: str, run_id: str) -> tuple[str, str]:
    """Digests of a version registered without the tags (before register wrote them): downloaded once per process."""
    with tempfile.TemporaryDirectory(prefix="scriptorium-parent-") as tmp:
        files = _download(uri, name, version, Path(tmp))
        return file_sha256(files.weights), tokenizer_digest(files.tokenizer)


def _download(uri: str, name: str, version: str, dst: Path) -> ParentFiles:
    import mlflow.artifacts
    import yaml
    from mlflow.tracking import MlflowClient

    # the version's own artifact location: a `models:/` URI would be resolved against the process's global registry
    location = MlflowClient(uri, registry_uri=uri).get_model_version_download_uri(name, version)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst), tracking_uri=uri))
        artifacts = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
        return ParentFiles(*(local / artifacts[key]["path"] for key in ("weights", "model_config", "tokenizer")))
    except (OSError, KeyError, TypeError, mlflow.exceptions.MlflowException) as exc:
        raise LineageError(f"models:/{name}/{version} is not a model this pipeline registered (no weights, "
                           f"model_config and tokenizer artifacts: {exc}); choose another version") from None


def fetch(parent: Parent, dst: Path, log: logging.Logger | None = None) -> ParentFiles:
    """Download the parent's files into `dst` and check its weights and tokenizer are the ones its identity names."""
    files = _download(parent.tracking_uri, parent.name, parent.version, Path(dst))
    if file_sha256(files.weights) != parent.weights_sha256 or tokenizer_digest(files.tokenizer) != \
            parent.tokenizer_sha256:
        raise LineageError(f"{parent.uri}'s files do not match the digests it was resolved with (the store changed "
                           "during the run): re-run")
    (log or logging.getLogger("scriptorium.lineage")).info("lineage: fetched %s (run %s) into %s", parent.uri,
                                                           parent.run_id, dst)
    return files


def parent_identity(ref: RegistryRef | None, spec: str | None, knob: str = "train.init_from") -> dict[str, Any] | None:
    """What a stage's cache key hashes for `spec`: None for none, the resolved identity, or a marker for a champion
    that does not exist yet (so the first run after one is registered is a new key)."""
    if spec in (None, "scratch"):
        return None
    parent = resolve(ref, spec, knob)
    return {"spec": spec, "parent": parent.identity() if parent else None}


def adopt_tokenizer(ref: RegistryRef | None, spec: str | None, out_dir: Path, log: logging.Logger) -> list[str]:
    """`tokenizer.from_model`: copy the registered model's tokenizer file into `out_dir`; the file names written,
    or [] when there is nothing to adopt (no spec, or no champion yet: the stage learns a vocabulary)."""
    from tasks.stage import write_atomic

    if spec is None:
        return []
    parent = resolve(ref, spec, "tokenizer.from_model")
    if parent is None:
        log.info("tokenizer: from_model champion, but %s has no '%s' yet: learning a vocabulary", ref.model_name,
                 ref.alias)
        return []
    with tempfile.TemporaryDirectory(prefix="scriptorium-parent-") as tmp:
        source = fetch(parent, Path(tmp), log).tokenizer
        names = [name for name in TOKENIZER_FILES if (source / name).is_file()][:1]
        for name in names:
            write_atomic(Path(out_dir) / name, (source / name).read_bytes())
    log.info("tokenizer: the vocabulary of %s (run %s), not learned", parent.uri, parent.run_id)
    return names


def train_input(config: dict[str, Any], upstream: dict[str, Any]) -> str:
    """What a train artifact was made from: its config slice and its inputs' fingerprints (as its manifest holds
    them). A champion whose train input is this run's is already what this run would train (see init.py)."""
    from tasks.stage import json_digest

    return json_digest({"config": config, "upstream": upstream})
