"""Tables, charts and per-stage figures logged to a register run, for the MLflow UI.

Tables go through `MlflowClient.log_table`, which is what lists them in the experiment's evaluation view; since it
appends to a table that already exists, a table already in the run (a re-run after a kill) is left as it is.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tasks.stage import Artifact, read_jsonl

FERTILITY_TABLE = "tables/fertility.json"
EVALUATION_TABLE = "tables/evaluation_samples.json"
CHECKPOINT_TABLE = "tables/checkpoint_samples.json"
FERTILITY_FIGURE = "plots/fertility.png"
FERTILITY_COLUMNS = ("tokens_per_word", "continued_word_share", "bytes_per_token", "vocab_use")
STAGE_FIGURES = ("seconds", "energy_kwh", "emissions_kg_co2eq")
CHECKPOINT_SAMPLES = "samples.jsonl"  # tasks/training/samples.py, in the train artifact


def stage_metrics(upstream: dict[str, Artifact | None]) -> dict[str, float]:
    """`stage/seconds/<name>`, `stage/energy_kwh/<name>`, `stage/emissions_kg_co2eq/<name>` of every stage that ran
    (the `compute` section of its manifest), and their sums as `stage/<figure>/total`. Named figure first, so the
    run page shows one section per figure (MLflow groups charts by the prefix before the last `/`)."""
    metrics: dict[str, float] = {}
    for name, artifact in upstream.items():
        compute = (artifact.manifest.get("compute") or {}) if artifact is not None else {}
        for figure in STAGE_FIGURES:
            if compute.get(figure) is not None:
                metrics[f"stage/{figure}/{name}"] = float(compute[figure])
                metrics[f"stage/{figure}/total"] = metrics.get(f"stage/{figure}/total", 0.0) + float(compute[figure])
    return metrics


def fertility_rows(tokenizer: Artifact) -> list[dict[str, Any]]:
    """One row per language of the tokenizer's fertility report."""
    return [{"language": lang, **{k: v for k, v in row.items()}}
            for lang, row in tokenizer.manifest.get("fertility", {}).items()]


def fertility_figure(rows: list[dict[str, Any]]) -> Any:
    """A bar chart per figure of the fertility report, one bar per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FERTILITY_COLUMNS), figsize=(3.2 * len(FERTILITY_COLUMNS), 3.4))
    languages = [row["language"] for row in rows]
    for ax, column in zip(axes, FERTILITY_COLUMNS):
        values = [float(row.get(column, 0.0)) for row in rows]
        bars = ax.bar(languages, values, color="#4c72b0")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_title(column.replace("_", " "), fontsize=10)
        ax.margins(y=0.2)
    fig.suptitle(f"tokenizer fertility per language ({', '.join(languages)})", fontsize=11)
    fig.tight_layout()
    return fig


def checkpoint_samples(train: Artifact) -> list[dict[str, Any]]:
    """The samples the model wrote at each checkpoint (empty when training wrote none)."""
    return read_jsonl(Path(train.path) / CHECKPOINT_SAMPLES)


def _columns(rows: list[dict[str, Any]], first: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows with `first` as their leading columns: the evaluation view groups by the first column and compares the
    second across runs (step, then the text written at it)."""
    return [{**{key: row[key] for key in first if key in row}, **row} for row in rows]


def _log_table_once(client: Any, run_id: str, rows: list[dict[str, Any]], path: str) -> None:
    import pandas as pd

    parent = path.rpartition("/")[0] or None
    if rows and path not in {f.path for f in client.list_artifacts(run_id, parent)}:
        client.log_table(run_id, pd.DataFrame(rows), path)


def log_views(client: Any, run_id: str, upstream: dict[str, Artifact | None]) -> None:
    """Stage figures, the fertility table and chart, the evaluation and checkpoint samples, into `run_id`."""
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric

    figures = stage_metrics(upstream)
    if figures:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(name, value, now, 0) for name, value in sorted(figures.items())])
    # the evaluation view opens on the first table logged: how the writing evolved
    _log_table_once(client, run_id, _columns(checkpoint_samples(upstream["train"]), ("step", "text")),
                    CHECKPOINT_TABLE)
    _log_table_once(client, run_id, _columns(upstream["evaluate"].manifest.get("samples", []), ("prompt", "text")),
                    EVALUATION_TABLE)
    rows = fertility_rows(upstream["tokenizer"])
    _log_table_once(client, run_id, rows, FERTILITY_TABLE)
    if rows:
        fig = fertility_figure(rows)
        client.log_figure(run_id, fig, FERTILITY_FIGURE)
        plt.close(fig)
