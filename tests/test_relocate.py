"""A moved artifacts directory and its MLflow store (`flows/relocate.py`), on a real MLflow SQLite store."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path


def _store_with_a_version(root: Path) -> str:
    """What register makes: the default store under `root`, a run with a file, a registered version of it."""
    from mlflow.tracking import MlflowClient

    from pipeline_config.schema import RegisterConfig
    from tasks.register import store_location

    uri, location = store_location(RegisterConfig(), root)
    client = MlflowClient(uri)
    experiment = client.create_experiment("scriptorium", artifact_location=location)
    run = client.create_run(experiment)
    (root.parent / "card.md").write_text("a model card")
    client.log_artifact(run.info.run_id, str(root.parent / "card.md"), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("tiny")
    client.create_model_version("tiny", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return run.info.run_id


def test_a_moved_artifacts_directory_stops_the_run_until_relocate_points_its_store_here(tmp_path, capsys):
    """Moving artifacts/ left its store recording the old path: the versions could not be loaded, and the next run
    registered into the old path (re-creating it). Now the run stops before any stage naming `scriptorium relocate`,
    which rewrites the locations; the version's file then loads from the new place."""
    import mlflow

    from flows.cli import main as cli
    from flows.preflight import unrunnable
    from pipeline_config import load_config

    old, new = tmp_path / "old" / "artifacts", tmp_path / "new" / "artifacts"
    old.mkdir(parents=True)
    _store_with_a_version(old)
    assert unrunnable(load_config("quickstart", [f"artifacts_dir={old}", "synthesize.n=0"])) is None
    new.parent.mkdir()
    shutil.move(old, new)

    stopped = unrunnable(load_config("quickstart", [f"artifacts_dir={new}", "synthesize.n=0"]))
    assert stopped is not None and f"was moved or copied from {old}" in stopped
    assert f"scriptorium relocate --artifacts-dir {new}" in stopped
    elsewhere = [f"artifacts_dir={new}", "synthesize.n=0", "register.tracking_uri=sqlite:////nowhere/x.db"]
    assert unrunnable(load_config("quickstart", elsewhere)) is None  # another store: its own artifact root

    writer = sqlite3.connect(new / "mlflow" / "mlflow.db")  # as an MLflow server in a write: the store is locked
    writer.execute("BEGIN IMMEDIATE")
    assert cli(["relocate", "--artifacts-dir", str(new)]) == 1
    assert "database is locked; nothing was changed" in capsys.readouterr().err
    writer.rollback()
    writer.close()
    assert cli(["relocate", "--artifacts-dir", str(new)]) == 0
    said = capsys.readouterr().out
    assert "1 experiments.artifact_location, 1 runs.artifact_uri" in said and "1 model_versions.source" in said
    assert unrunnable(load_config("quickstart", [f"artifacts_dir={new}", "synthesize.n=0"])) is None
    mlflow.set_tracking_uri(f"sqlite:///{new / 'mlflow' / 'mlflow.db'}")
    card = Path(mlflow.artifacts.download_artifacts("models:/tiny/1", dst_path=str(tmp_path / "got"))) / "card.md"
    assert card.read_text() == "a model card"
    assert not old.exists()
    assert cli(["relocate", "--artifacts-dir", str(new)]) == 0
    assert "nothing to change" in capsys.readouterr().out
