"""register: log everything to MLflow and register the model as a new version; promote it only if it is better.

One MLflow run per trained model carries the whole lineage: every stage's config slice as params (`train.model.n_layer`,
`tokenizer.vocab_size`, ...), the training curve and evaluation metrics, the fertility report, samples, emissions and
each stage's manifest. The model is a pyfunc (see `model/serving.py`) registered under `register.model_name`.

The champion alias moves only when the new version beats the current champion on `champion_metric` (lower is better
for all of them), so a nightly retrain that regressed is registered, and comparable in the UI, but serves nobody.
The default store is SQLite plus local artifacts under `<artifacts_dir>/mlflow`.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from pipeline_config.schema import RegisterConfig
from tasks.artifacts import Artifact, write_json
from tasks.stage import REPO_ROOT, Stage, prefect_task
from tasks.train import METRICS as TRAIN_METRICS

REGISTERED = "registered.json"


def store_location(cfg: RegisterConfig, artifacts_root: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide)."""
    if cfg.tracking_uri:
        return cfg.tracking_uri, None
    store = Path(artifacts_root).resolve() / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)


def _loss_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def register(cfg: RegisterConfig, upstream: dict[str, Artifact | None], out_dir: Path, log: logging.Logger) -> dict[str, Any]:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import pandas as pd
    from mlflow.entities import Metric
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from model.serving import PARAMS, ScriptoriumLM

    model_art, evaluation, tokenizer = upstream["model"], upstream["evaluation"], upstream["tokenizer"]
    uri, artifact_location = store_location(cfg, out_dir.parents[1])
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = (
        experiment.experiment_id if experiment
        else client.create_experiment(cfg.experiment, artifact_location=artifact_location)
    )
    metrics = evaluation.manifest["metrics"]
    train_summary = model_art.manifest
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{cfg.model_name}-{model_art.fingerprint[:8]}") as run:
        params: dict[str, str] = {}
        for name, artifact in upstream.items():
            if artifact is not None:
                _flatten(artifact.stage, artifact.manifest.get("config", {}), params)
        mlflow.log_params(params)
        rows = [json.loads(line) for line in (model_art.path / TRAIN_METRICS).read_text().splitlines() if line.strip()]
        curve = [
            Metric(key, float(row[key]), 0, row["step"]) for row in rows for key in ("loss", "val_loss", "lr") if key in row
        ]
        for start in range(0, len(curve), 1000):
            client.log_batch(run.info.run_id, metrics=curve[start : start + 1000])
        summary_metrics = {
            **metrics,
            **{
                key: float(train_summary[key]) for key in
                ("tokens_per_s", "train_seconds", "energy_kwh", "emissions_kg_co2eq", "parameters", "final_train_loss")
                if train_summary.get(key) is not None
            },
        }
        mlflow.log_metrics(summary_metrics)
        mlflow.set_tags({"scriptorium.config": train_summary.get("config", {}).get("model", {}).get("arch", "")})
        for name, artifact in upstream.items():
            if artifact is not None:
                mlflow.log_dict(artifact.manifest, f"manifests/{name}.json")
        mlflow.log_artifact(str(tokenizer.path / "fertility.json"))
        mlflow.log_artifact(str(evaluation.path / "samples.json"))
        for emissions in model_art.path.glob("emissions*.csv"):
            mlflow.log_artifact(str(emissions))
        if _loss_plot(rows, out_dir / "loss.png"):
            mlflow.log_artifact(str(out_dir / "loss.png"), "plots")
        example = pd.DataFrame({"prompt": ["Once upon a time"]})
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ScriptoriumLM(),
            artifacts={
                "weights": str(model_art.path / "model.safetensors"),
                "model_config": str(model_art.path / "model_config.json"),
                "tokenizer": str(tokenizer.path),
            },
            code_paths=[str(REPO_ROOT / "model")],
            signature=infer_signature(example, ["Once upon a time ..."], params=PARAMS),
            pip_requirements=_requirements(),
            registered_model_name=cfg.model_name,
        )
        version = str(info.registered_model_version)
    promoted, previous = _maybe_promote(client, cfg, version, summary_metrics)
    result = {
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "run_id": run.info.run_id,
        "model_name": cfg.model_name,
        "version": version,
        "model_uri": f"models:/{cfg.model_name}/{version}",
        "champion": promoted,
        "previous_champion": previous,
        "metric": {cfg.champion_metric: summary_metrics[cfg.champion_metric]},
    }
    write_json(out_dir / REGISTERED, result)
    log.info(
        "register: %s version %s (run %s)%s",
        cfg.model_name, version, run.info.run_id,
        f", now '{cfg.champion_alias}'" if promoted else f", '{cfg.champion_alias}' stays version {previous}",
    )
    return result


def _maybe_promote(client: Any, cfg: RegisterConfig, version: str, metrics: dict[str, float]) -> tuple[bool, str | None]:
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(cfg.model_name, cfg.champion_alias)
    except MlflowException:
        current = None
    if current is not None:
        theirs = client.get_run(current.run_id).data.metrics.get(cfg.champion_metric)
        if theirs is not None and theirs <= metrics[cfg.champion_metric]:
            client.set_model_version_tag(cfg.model_name, version, "champion_check", f"lost to v{current.version}")
            return False, str(current.version)
    client.set_registered_model_alias(cfg.model_name, cfg.champion_alias, version)
    return True, str(current.version) if current else None


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "sentencepiece", "safetensors", "numpy", "pandas", "mlflow")]


def still_registered(artifact: Artifact) -> bool:
    """Whether the model version this artifact registered is still in its tracking store, from that run.

    A deleted or replaced MLflow database must not leave `register` cached on a version that no longer exists. The
    local SQLite store is read directly (a cached run then needs no MLflow import); other stores are trusted.
    """
    manifest = artifact.manifest
    uri = str(manifest.get("tracking_uri", ""))
    if not uri.startswith("sqlite:///"):
        return True
    database = Path(uri.removeprefix("sqlite:///"))
    if not database.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as connection:
            row = connection.execute(
                "SELECT 1 FROM model_versions WHERE name = ? AND version = ? AND run_id = ?",
                (manifest["model_name"], int(manifest["version"]), manifest["run_id"]),
            ).fetchone()
    except (sqlite3.Error, KeyError, ValueError):
        return False
    return row is not None


STAGE = Stage(
    name="register", run=register, code=("tasks/register.py", "model/serving.py"), intact=still_registered
)
register_task = prefect_task(STAGE)
