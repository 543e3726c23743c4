"""register: log everything to MLflow and register the model as a new version; promote it only if it is better.

One MLflow run per trained model carries the whole lineage: every stage's config slice as params (`train.model.n_layer`,
`tokenizer.vocab_size`, ...), the training curve and evaluation metrics, the fertility report, samples, emissions and
each stage's manifest. The model is a pyfunc (see `model/serving.py`) registered under `register.model_name`.

The champion alias moves only when the new version beats the current champion on `champion_metric` (lower is better
for all of them), so a nightly retrain that regressed is registered, and comparable in the UI, but serves nobody.
The champion's figure is not its stored one: it is scored now on this run's validation text (`tasks/lineage/gate.py`),
and both figures, the margin and the decision are written on the new version, with its parent (`train.init_from`).
A NaN metric never wins. The alias is re-read just before it moves, so it never replaces a champion other than the
one compared against. The default store is SQLite plus local artifacts under `<artifacts_dir>/mlflow`.

Registering is idempotent: the run is tagged with the lineage's fingerprint (every upstream artifact's), so a re-run
after a kill anywhere (mid-lineage, after the model version, before `registered.json`) finds that run and finishes
it (ending it, adding the model version only if it has none) instead of starting another.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from pipeline_config.register import RegisterConfig
from tasks.evaluate import ATTENTION_MAP, SAMPLES
from tasks.lineage.gate import GATE_TAG, champion_figure, record_gate, record_lineage
from tasks.lineage.registry import unreachable_server
from tasks.stage import REPO_ROOT, Artifact, PipelineError, Stage, json_digest, key_upstream, prefect_task, \
    read_jsonl, storage_errno, write_json
from tasks.tokenizer import COMPARISON_CHART
from tasks.tokenizer import REPORT as FERTILITY
from tasks.train import METRICS as TRAIN_METRICS
from tasks.train import MODEL_CONFIG, PROFILE, WEIGHTS

REGISTERED = "registered.json"
SQLITE_TIMEOUT = 30.0  # seconds still_registered waits for a writer (the MLflow UI, another run) to let go
FINGERPRINT_TAG = "scriptorium.fingerprint"  # on the run: the lineage it registers
LINEAGE_TAG = "scriptorium.lineage_logged"  # on the run: params, curve, manifests and reports are all there
PREVIOUS_TAG = "scriptorium.previous_champion"  # on the version: the champion it replaced ("" for none)
MLFLOW_DB_LOGGER = "mlflow.store.db.utils"


class _FullDiskSaidOnce(logging.Filter):
    """MLflow logs a SQLite error with its whole traceback before raising it; a full disk is then said once, in one
    line, by the stage mechanism (StorageFull). Every other database error is logged as MLflow logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        raised = record.exc_info[1] if record.exc_info else None
        return raised is None or storage_errno(raised) is None


def quiet_mlflow_output() -> None:
    """A full disk said once (_FullDiskSaidOnce), and no tqdm bars ("Downloading artifacts: 100%|...") in a run's
    log, unless MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR is set."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    db_log = logging.getLogger(MLFLOW_DB_LOGGER)
    if not any(isinstance(f, _FullDiskSaidOnce) for f in db_log.filters):
        db_log.addFilter(_FullDiskSaidOnce())


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
    val = [r for r in rows if "val_loss_estimate" in r]
    ax.plot([r["step"] for r in val], [r["val_loss_estimate"] for r in val], "o-", label="val (estimate)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


CURVE_KEYS = {"loss": "train/loss", "val_loss_estimate": "train/val_loss_estimate", "lr": "train/lr",
              "grad_norm": "train/grad_norm"}
SUMMARY_KEYS = ("tokens_per_s", "train_seconds", "energy_kwh", "emissions_kg_co2eq", "parameters", "final_train_loss")


def _experiment(client: Any, cfg: RegisterConfig, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment:
        return experiment.experiment_id
    return client.create_experiment(cfg.experiment, artifact_location=artifact_location)


def summary_metrics(upstream: dict[str, Artifact | None]) -> dict[str, float]:
    """Evaluate's metrics of record plus the training summary's figures."""
    summary = upstream["train"].manifest
    return {**upstream["evaluate"].manifest["metrics"],
            **{key: float(summary[key]) for key in SUMMARY_KEYS if summary.get(key) is not None}}


def _log_lineage(client: Any, run_id: str, upstream: dict[str, Artifact | None], out_dir: Path) -> dict[str, float]:
    """Params (every stage's config slice), the training curve, the summary metrics, manifests, reports, plots."""
    import mlflow
    from mlflow.entities import Metric

    train, evaluation, tokenizer = upstream["train"], upstream["evaluate"], upstream["tokenizer"]
    params: dict[str, str] = {}
    for artifact in upstream.values():
        if artifact is not None:
            _flatten(artifact.stage, artifact.manifest.get("config", {}), params)
    mlflow.log_params(params)
    rows = read_jsonl(train.path / TRAIN_METRICS)
    curve = [Metric(name, float(row[key]), 0, row["step"]) for row in rows for key, name in CURVE_KEYS.items()
             if key in row]
    for start in range(0, len(curve), 1000):
        client.log_batch(run_id, metrics=curve[start : start + 1000])
    summary = train.manifest
    metrics = summary_metrics(upstream)
    mlflow.log_metrics(metrics)
    mlflow.set_tags({"scriptorium.config": summary.get("config", {}).get("model", {}).get("arch", "")})
    for name, artifact in upstream.items():
        if artifact is not None:
            mlflow.log_dict(artifact.manifest, f"manifests/{name}.json")
    mlflow.log_artifact(str(tokenizer.path / FERTILITY))
    mlflow.log_artifact(str(evaluation.path / SAMPLES))
    for emissions in train.path.glob("emissions*.csv"):
        mlflow.log_artifact(str(emissions))
    if _loss_plot(rows, out_dir / "loss.png"):
        mlflow.log_artifact(str(out_dir / "loss.png"), "plots")
    _log_seed_reports(upstream)
    return metrics


def _log_seed_reports(upstream: dict[str, Artifact | None]) -> None:
    """The model profile, the tokenizer comparison (table + chart) and the evaluate attention map, where present."""
    import mlflow

    from tasks.tokenization.comparison import as_columns

    for stage, name, folder in (("train", PROFILE, None), ("tokenizer", COMPARISON_CHART, "plots"),
                                ("evaluate", ATTENTION_MAP, "plots")):
        if upstream.get(stage) is not None and (upstream[stage].path / name).is_file():
            mlflow.log_artifact(str(upstream[stage].path / name), folder)
    comparison = upstream["tokenizer"].manifest.get("comparison") if upstream.get("tokenizer") else None
    if comparison:
        mlflow.log_table(as_columns(comparison["rows"]), "tables/tokenizer_comparison.json")


def _log_exports(export: Artifact) -> None:
    """The exported files (transformers folder, GGUF, Modelfile) under `export/` in the run, beside the model."""
    import mlflow

    for name in export.manifest.get("exported", []):
        parent = Path(name).parent
        mlflow.log_artifact(str(export.path / name), "export" if str(parent) == "." else f"export/{parent}")


def _log_model(cfg: RegisterConfig, train: Artifact, tokenizer: Artifact) -> str:
    """The pyfunc (model/serving.py) with the weights, registered as a new version of `cfg.model_name`."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from model.serving import PARAMS

    example = pd.DataFrame({"prompt": ["Once upon a time"]})
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(REPO_ROOT / "model" / "serving.py"),  # models from code: a file, never a pickle
        artifacts={
            "weights": str(train.path / WEIGHTS),
            "model_config": str(train.path / MODEL_CONFIG),
            "tokenizer": str(tokenizer.path),
        },
        code_paths=[str(REPO_ROOT / "model")],
        signature=infer_signature(example, ["Once upon a time ..."], params=PARAMS),
        input_example=(example, {"max_new_tokens": 8}),  # the UI's request to copy; MLflow runs it once, here
        pip_requirements=_requirements(),
        registered_model_name=cfg.model_name,
    )
    return str(info.registered_model_version)


def register(cfg: RegisterConfig, out_dir: Path, log: logging.Logger, *, acquire: Artifact | None,
             synthesize: Artifact | None, tokenizer: Artifact, shard: Artifact, train: Artifact,
             evaluate: Artifact, export: Artifact) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    upstream = {"acquire": acquire, "synthesize": synthesize, "tokenizer": tokenizer, "shard": shard, "train": train,
                "evaluate": evaluate, "export": export}
    if cfg.champion_metric not in evaluate.manifest["metrics"]:
        languages = sorted(k.split(".", 1)[1] for k in evaluate.manifest["metrics"] if k.startswith("val_bpb."))
        raise ValueError(f"register.champion_metric '{cfg.champion_metric}' is not among evaluate's metrics (the "
                         f"validation split has the languages {languages}): choose one of those or the total")
    uri, artifact_location = store_location(cfg, out_dir.parents[1])
    if down := unreachable_server(uri):
        raise RegisterError(f"register.tracking_uri: {down}")
    quiet_mlflow_output()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = _experiment(client, cfg, artifact_location)
    fingerprint = json_digest({"model_name": cfg.model_name, "upstream": key_upstream(upstream)})
    run_id, version = _registered_before(client, cfg, experiment_id, fingerprint)
    if version is None:
        resumed = {"run_id": run_id} if run_id else {
            "experiment_id": experiment_id, "run_name": f"{cfg.model_name}-{train.fingerprint[:8]}"}
        with mlflow.start_run(**resumed, tags={FINGERPRINT_TAG: fingerprint}) as run:
            run_id = run.info.run_id
            if client.get_run(run_id).data.tags.get(LINEAGE_TAG) != "true":
                _log_lineage(client, run_id, upstream, out_dir)
                _log_exports(export)
                mlflow.set_tag(LINEAGE_TAG, "true")
            version = _log_model(cfg, train, tokenizer)
    else:
        log.info("register: run %s already registered this lineage as version %s; finishing it", run_id, version)
    if client.get_run(run_id).info.status != "FINISHED":  # a run killed after its model version was created
        client.set_terminated(run_id, "FINISHED")
    _log_views_and_card(client, cfg, run_id, version, upstream)
    metrics = summary_metrics(upstream)
    lineage = record_lineage(client, cfg, version, upstream)
    promoted, previous = _maybe_promote(client, cfg, version, metrics, lambda current: champion_figure(
        client, cfg, uri, current, upstream, log))
    result = {
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "run_id": run_id,
        "model_name": cfg.model_name,
        "version": version,
        "model_uri": f"models:/{cfg.model_name}/{version}",
        "champion": promoted,
        "previous_champion": previous,
        "metric": {cfg.champion_metric: metrics[cfg.champion_metric]},
        "parent": lineage,
        "gate": client.get_model_version(cfg.model_name, version).tags.get(GATE_TAG + ".decision"),
    }
    write_json(out_dir / REGISTERED, result)
    log.info(
        "register: %s version %s (run %s)%s",
        cfg.model_name, version, run_id,
        f", now '{cfg.champion_alias}'" if promoted else f", '{cfg.champion_alias}' stays version {previous}",
    )
    return result


VIEWS_TAG = "scriptorium.views_logged"  # on the run: stage figures, tables and charts for the UI are all there
MODEL_CARD = "README.md"
# the experiment's kind, which MLflow 3's UI reads to tell training runs from GenAI traces
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _log_views_and_card(client: Any, cfg: RegisterConfig, run_id: str, version: str,
                        upstream: dict[str, Artifact | None]) -> str:
    """What the MLflow UI shows beyond the lineage (tasks/tracking/): per-stage time and energy, the fertility table
    and chart, evaluation and checkpoint samples as tables, and the model card, logged in the run and with the model
    and set as the version's description. Written once per run (a re-run of a registered lineage writes nothing);
    returns the card, for text the description adds to it."""
    from tasks.tracking.model_card import model_card
    from tasks.tracking.views import log_views

    card = model_card(cfg.model_name, upstream)
    if client.get_run(run_id).data.tags.get(VIEWS_TAG) == "true":
        return card
    client.set_experiment_tag(client.get_run(run_id).info.experiment_id, *EXPERIMENT_KIND)
    log_views(client, run_id, upstream)
    client.log_text(run_id, card, MODEL_CARD)
    source = str(client.get_model_version(cfg.model_name, version).source)
    if source.startswith("models:/m-"):  # MLflow 3: the logged model has its own artifacts, beside MLmodel
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / MODEL_CARD).write_text(card, encoding="utf-8")
            client.log_model_artifact(source.removeprefix("models:/").split("/")[0], str(Path(tmp) / MODEL_CARD))
    client.update_model_version(cfg.model_name, version, description=card)
    client.set_tag(run_id, VIEWS_TAG, "true")
    return card


class RegisterError(PipelineError):
    """The model registry cannot be brought to the state this run needs; the message says why."""


def _registered_before(client: Any, cfg: RegisterConfig, experiment_id: str,
                       fingerprint: str) -> tuple[str | None, str | None]:
    """(run, model version) that already register this lineage: what a killed or repeated register left."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}'",
                              order_by=["attributes.start_time ASC"])
    for run in runs:
        versions = client.search_model_versions(f"name = '{cfg.model_name}' and run_id = '{run.info.run_id}'")
        if versions:
            return run.info.run_id, str(min(int(v.version) for v in versions))
    return (runs[0].info.run_id if runs else None), None


def _champion(client: Any, cfg: RegisterConfig) -> Any:
    """The version holding the champion alias, or None when nobody holds it (any other registry error raises)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(cfg.model_name, cfg.champion_alias)
    except MlflowException as exc:
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):  # no such alias / model
            return None
        raise


def beats(ours: float, theirs: float | None) -> bool:
    """Lower is better; a NaN or infinite figure never wins, and loses to any finite one."""
    return math.isfinite(ours) and (theirs is None or not math.isfinite(theirs) or ours < theirs)


def _maybe_promote(client: Any, cfg: RegisterConfig, version: str, metrics: dict[str, float],
                   champion_figure: Any) -> tuple[bool, str | None]:
    """Move the champion alias to `version` if it beats the champion, and only away from that champion: the alias
    is re-read just before it moves, and compared again if another run moved it in between. `champion_figure`
    scores a champion version on this run's validation text (tasks/lineage/gate.py); the comparison is recorded."""
    ours = float(metrics.get(cfg.champion_metric, math.nan))
    for _ in range(5):
        current = _champion(client, cfg)
        held = str(current.version) if current is not None else None
        if held == version:  # a re-run after the alias already moved
            return True, client.get_model_version(cfg.model_name, version).tags.get(PREVIOUS_TAG) or None
        figure = champion_figure(current) if current else None
        theirs = figure["value"] if figure else None
        record_gate(client, cfg, version, ours, held, figure, beats(ours, theirs))
        if not beats(ours, theirs):
            client.set_model_version_tag(cfg.model_name, version, "champion_check",
                                         f"lost to v{held}" if held else f"{cfg.champion_metric} is {ours}")
            return False, held
        client.set_model_version_tag(cfg.model_name, version, PREVIOUS_TAG, held or "")
        again = _champion(client, cfg)
        if (str(again.version) if again is not None else None) == held:
            client.set_registered_model_alias(cfg.model_name, cfg.champion_alias, version)
            return True, held
    raise RegisterError(f"the '{cfg.champion_alias}' alias of {cfg.model_name} kept moving while version {version} "
                        "was compared with it; re-run to compare again")


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
        with closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=SQLITE_TIMEOUT)) as connection:
            row = connection.execute(
                "SELECT 1 FROM model_versions WHERE name = ? AND version = ? AND run_id = ?",
                (manifest["model_name"], int(manifest["version"]), manifest["run_id"]),
            ).fetchone()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):  # another writer, not a missing version: cannot tell, trust it
            logging.getLogger("scriptorium.register").warning("%s is busy (%s); trusting the registered version",
                                                              database, exc)
            return True
        return False
    except (sqlite3.Error, KeyError, ValueError):
        return False
    return row is not None


STAGE = Stage(
    name="register", run=register,
    inputs=("acquire", "synthesize", "tokenizer", "shard", "train", "evaluate", "export"),
    intact=still_registered,
)
register_task = prefect_task(STAGE)
