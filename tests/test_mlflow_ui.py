"""The MLflow UI on a store that two pipeline runs produced, checked as a person would look at it.

`mlflow server` runs on a free 127.0.0.1 port against the store; the first test reads what the UI's pages read (its
own REST calls under `/ajax-api/2.0/mlflow/` and `/get-artifact`), the second drives Debian's chromium, headless,
over the DevTools protocol (benchmarks/mlflow_ui.py) and asserts on the rendered page text and images: the runs,
the training curves, the compare view, the tables, the fertility chart, the champion alias and the model card.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import mlflow_ui as ui  # noqa: E402  (benchmarks/ is scripts, not a package)

TABLES = ("tables/checkpoint_samples.json", "tables/evaluation_samples.json", "tables/fertility.json")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-ui")
    store = ui.tiny_store(root)
    with ui.mlflow_ui(store, root / "mlflow-server.log") as base:
        yield base, store


def test_the_ui_api_serves_curves_stage_figures_tables_plots_the_alias_and_the_card(served):
    base, store = served
    assert store["versions"] == ["1", "2"]
    for run_id, steps in zip(store["runs"], ui.RUN_STEPS):
        run = ui.ajax(base, "runs/get", run_id=run_id)["run"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["val_bpb"] > 0
        assert all(metrics[f"stage/seconds/{stage}"] > 0 for stage in ("acquire", "tokenizer", "shard", "train",
                                                                        "evaluate", "export"))
        assert metrics["stage/seconds/total"] >= metrics["stage/seconds/train"]
        for curve in ("train/loss", "train/lr"):
            history = ui.ajax(base, "metrics/get-history", run_uuid=run_id, metric_key=curve)["metrics"]
            assert sorted(m["step"] for m in history) == list(range(1, steps + 1)), curve
        estimates = ui.ajax(base, "metrics/get-history", run_uuid=run_id, metric_key="train/val_loss_estimate")
        assert sorted(m["step"] for m in estimates["metrics"]) == list(range(4, steps + 1, 4))

        listed = {f["path"] for folder in ("plots", "tables")
                  for f in ui.ajax(base, "artifacts/list", run_uuid=run_id, path=folder)["files"]}
        assert {"plots/fertility.png", "plots/loss.png", *TABLES} <= listed
        assert ui.artifact(base, run_id, "plots/fertility.png").startswith(b"\x89PNG")
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert {t["path"] for t in json.loads(tags["mlflow.loggedArtifacts"])} == set(TABLES)  # the evaluation view
        table = json.loads(ui.artifact(base, run_id, "tables/checkpoint_samples.json"))
        assert table["columns"][:2] == ["step", "text"]
        assert [row[0] for row in table["data"]] == [s for s in range(4, steps + 1, 4) for _ in range(4)]  # 2 x 2

    aliases = ui.ajax(base, "registered-models/get", name=store["model_name"])["registered_model"]["aliases"]
    assert {"alias": "champion", "version": store["champion"]} in aliases
    version = ui.ajax(base, "model-versions/get", name=store["model_name"], version=store["champion"])
    description = version["model_version"]["description"]
    card, lineage = description.split("\n\n## Lineage and champion gate\n", 1)  # the gate's section follows the card
    assert "champion gate on val_bpb" in lineage
    assert card.startswith(f"# {store['model_name']}: ") and " bits per byte, gpt, " in card.splitlines()[0]
    assert "## Intended use" in card and "## Energy" in card
    assert ui.artifact(base, version["model_version"]["run_id"], "README.md").decode().rstrip("\n") == card.rstrip("\n")
    model_id = version["model_version"]["source"].removeprefix("models:/")
    assert (Path(store["artifacts"]) / "models" / model_id / "artifacts" / "README.md").read_text().rstrip("\n") == \
        card.rstrip("\n")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (`make setup` installs it)")
def test_a_browser_shows_the_runs_curves_tables_chart_alias_and_model_card(served, tmp_path):
    base, store = served
    with ui.Browser() as browser:
        shots = ui.shoot(base, store, tmp_path, browser)
    assert {name: shot.path.stat().st_size > 10_000 for name, shot in shots.items()} == {
        page.name: True for page in ui.pages(base, store)}
    text = {name: " ".join(shot.text.split()) for name, shot in shots.items()}  # one space between rendered blocks
    assert all(f"{store['model_name']}-" in text["experiment"] for _ in store["runs"])
    assert "2 matching runs" in text["experiment"]
    for curve in ("train/loss", "train/lr", "train/val_loss_estimate"):
        assert curve in text["experiment-charts"] and curve in text["run-curves"]
    assert "tables/checkpoint_samples.json" in text["evaluation-tables"] and "Group by: step" in \
        text["evaluation-tables"]
    assert "val_bpb" in text["compare-versions"] and "stage/seconds/train" in text["compare-versions"]
    assert all(run_id in text["compare-versions"] for run_id in store["runs"])
    assert "champion" in text["registered-model"]
    for section in ("Data", "Tokenizer", "Architecture and parameters", "Metrics", "Energy", "Samples",
                    "Intended use", "Limitations"):
        assert section in text["model-card"]
    # the logged figure was fetched from the server and decoded by the browser: an image of the PNG's own size
    png = ui.artifact(base, store["runs"][-1], "plots/fertility.png")
    size = (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))  # the IHDR chunk
    assert size in shots["run-fertility-chart"].images
