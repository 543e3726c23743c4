"""End to end: `build-model` under a real Prefect API, cached re-runs, and partial re-runs after an override.

Synthesize runs with the real embedded llama.cpp model (two very short stories) in the first flow test; the others
use the local corpus only to keep the suite fast.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

STAGES = ["acquire", "synthesize", "tokenizer", "shard", "train", "evaluate", "export", "register"]


@pytest.fixture
def build_model(prefect_api):
    from flows.build_model import build_model

    return build_model


def test_first_run_completes_every_stage_then_second_run_is_cached(build_model, tmp_path, small_corpus, capsys,
                                                                   monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    overrides = tiny_overrides(tmp_path / "artifacts", small_corpus, stories=2)
    first = build_model(preset="quickstart", overrides=overrides)
    # register's MLflow calls draw no tqdm bars ("Downloading artifacts: 100%|...") into the run's output
    assert "Downloading artifacts" not in capsys.readouterr().err
    assert list(first["stages"]) == STAGES
    assert set(first["stages"].values()) == {"Completed"}
    registered = first["registered"]
    assert registered["version"] == "1" and registered["champion"] is True
    assert first["metrics"]["val_bpb"] > 0
    assert first["sample"].startswith("once upon a time")
    assert (tmp_path / "artifacts" / "mlflow" / "mlflow.db").is_file()
    # the export stage wrote a transformers folder and GGUF files that llama.cpp continues as PyTorch does
    [export_dir] = (tmp_path / "artifacts" / "export").glob("*/")
    assert (export_dir / "hf" / "config.json").is_file() and (export_dir / "model-q8_0.gguf").is_file()
    assert "FROM ./model-q8_0.gguf" in (export_dir / "Modelfile").read_text()

    second = build_model(preset="quickstart", overrides=overrides)
    assert set(second["stages"].values()) == {"Cached"}
    assert second["registered"]["version"] == "1"  # nothing new registered

    # the registered pyfunc generates from the registry by alias, honouring predict-time params
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(registered["tracking_uri"])
    served = mlflow.pyfunc.load_model(f"models:/{registered['model_name']}@champion")
    out = served.predict(pd.DataFrame({"prompt": ["the dog", "a cat"]}), params={"max_new_tokens": 5, "temperature": 0.0})
    assert len(out) == 2 and out[0].startswith("the dog") and out[1].startswith("a cat")

    # the command line generates from the registry by alias and lists what is registered
    from flows.cli import main as cli

    capsys.readouterr()
    uri = registered["tracking_uri"]
    model_uri = f"models:/{registered['model_name']}@champion"
    assert cli(["generate", "--model", model_uri, "--tracking-uri", uri, "--prompt", "the dog", "--temperature", "0",
                "--max-new-tokens", "5", "--stream"]) == 0
    assert capsys.readouterr().out.startswith("the dog")
    mlflow.MlflowClient(uri).set_registered_model_alias(registered["model_name"], "production", "1")  # as in the UI
    assert cli(["models", "--tracking-uri", uri]) == 0
    assert f"version 1 @champion @production: val_bpb {first['metrics']['val_bpb']:.4f}" in capsys.readouterr().out


def test_train_override_reruns_train_evaluate_register_only(build_model, tmp_path, small_corpus):
    overrides = tiny_overrides(tmp_path / "artifacts", small_corpus)
    first = build_model(preset="quickstart", overrides=overrides)
    rerun = build_model(preset="quickstart", overrides=overrides + ["train.max_steps=9"])
    assert rerun["stages"] == {
        "acquire": "Cached", "tokenizer": "Cached", "shard": "Cached",
        "train": "Completed", "evaluate": "Completed", "export": "Completed", "register": "Completed",
    }
    assert rerun["registered"]["version"] == "2"
    better = rerun["metrics"]["val_bpb"] < first["metrics"]["val_bpb"]
    assert rerun["registered"]["champion"] is better

    # a retrain that is clearly worse (one step) is registered but does not take the champion alias
    worse = build_model(preset="quickstart", overrides=overrides + ["train.max_steps=1"])
    assert worse["registered"]["version"] == "3"
    assert worse["registered"]["champion"] is False
    assert worse["registered"]["previous_champion"] == ("2" if better else "1")

    retokenized = build_model(preset="quickstart", overrides=overrides + ["tokenizer.vocab_size=400"])
    assert retokenized["stages"]["acquire"] == "Cached"
    for stage in ("tokenizer", "shard", "train", "evaluate", "export", "register"):
        assert retokenized["stages"][stage] == "Completed", stage


def test_deleted_artifact_is_rebuilt_not_served_from_a_stale_cache(build_model, tmp_path, small_corpus):
    import shutil

    overrides = tiny_overrides(tmp_path / "artifacts", small_corpus)
    build_model(preset="quickstart", overrides=overrides)
    shutil.rmtree(tmp_path / "artifacts" / "shard")
    again = build_model(preset="quickstart", overrides=overrides)
    assert again["stages"]["tokenizer"] == "Cached"
    assert again["stages"]["shard"] == "Completed"
    # the rebuilt shards are identical, so everything downstream is still served from cache
    assert again["stages"]["train"] == "Cached"
    assert any(Path(tmp_path / "artifacts" / "shard").rglob("manifest.json"))


def test_deleted_mlflow_store_is_registered_again(build_model, tmp_path, small_corpus):
    """After the MLflow database is deleted, the next run (a new process, as `make run` or a deployment run is)
    registers the model again instead of serving `register` from a cache that points at a version that is gone."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    overrides = tiny_overrides(tmp_path / "artifacts", small_corpus)
    build_model(preset="quickstart", overrides=overrides)
    (tmp_path / "artifacts" / "mlflow" / "mlflow.db").unlink()
    command = [sys.executable, "-m", "flows", "--preset", "quickstart"] + [x for o in overrides for x in ("--set", o)]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "evaluate Cached, export Cached, register Completed" in again.stdout
    assert "version 1" in again.stdout and (tmp_path / "artifacts" / "mlflow" / "mlflow.db").is_file()
    assert build_model(preset="quickstart", overrides=overrides)["stages"]["register"] == "Cached"


def test_prune_keeps_the_newest_versions_lineage_and_unfinished_stages_and_removes_the_rest(build_model, tmp_path,
                                                                                            small_corpus, capsys):
    """`scriptorium prune --keep 1` after two versions that share acquire, tokenizer and shard: version 1's train,
    evaluate, export and register directories go, with the Prefect records pointing at them; version 2's lineage and
    a training run stopped before its manifest (its checkpoints) stay; version 2's configuration is still all
    Cached, and version 1's re-runs only the stages that were removed."""
    from flows.cli import main as cli

    root = tmp_path / "artifacts"

    def stage_dirs() -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.glob("*/*/") if p.parent.name != "mlflow"}

    overrides = tiny_overrides(root, small_corpus)
    first = build_model(preset="quickstart", overrides=overrides)
    second = build_model(preset="quickstart", overrides=overrides + ["train.max_steps=9"])
    assert second["registered"]["version"] == "2"
    stopped = root / "train" / "0123456789abcdef" / "checkpoints" / "step-5"
    stopped.mkdir(parents=True)
    (stopped / "model.safetensors").write_bytes(b"\0" * 1000)
    before = stage_dirs()
    records = len(list((root / ".prefect-results").iterdir()))

    capsys.readouterr()
    assert cli(["prune", "--artifacts-dir", str(root), "--keep", "1", "--dry-run"]) == 0
    assert "would remove 4 stage directories" in capsys.readouterr().out
    assert stage_dirs() == before

    assert cli(["prune", "--artifacts-dir", str(root), "--keep", "1"]) == 0
    out = capsys.readouterr().out
    assert "removed 4 stage directories" in out and "4 cache records" in out and "version 2" in out
    assert "left 1 unfinished stage directories" in out and "train/0123456789abcdef" in out
    after = stage_dirs()
    assert {p.split("/")[0] for p in before - after} == {"train", "evaluate", "export", "register"}
    assert (stopped / "model.safetensors").is_file()
    assert len(list((root / ".prefect-results").iterdir())) == records - 4

    assert set(build_model(preset="quickstart", overrides=overrides + ["train.max_steps=9"])["stages"].values()) \
        == {"Cached"}
    again = build_model(preset="quickstart", overrides=overrides)
    assert [again["stages"][s] for s in ("acquire", "tokenizer", "shard", "train", "register")] == \
        ["Cached", "Cached", "Cached", "Completed", "Completed"]
    assert again["registered"]["version"] == first["registered"]["version"]  # the same lineage: no new version
