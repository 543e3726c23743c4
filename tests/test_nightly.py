"""The nightly retrain, in process under a real Prefect API and a real SQLite MLflow store: a source folder, a run, a
re-run that trains nothing and says so, then a new file in the folder and a run with `train.init_from: champion`
that re-acquires, starts from the champion's weights and records its parent and the gate's two figures."""
from __future__ import annotations

import logging

from tests.conftest import SAMPLE, tiny_overrides


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_new_file_retrains_from_the_champion_and_an_unchanged_folder_trains_nothing(prefect_api, tmp_path,
                                                                                       capsys):
    import mlflow

    from flows.build_model import build_model
    from tasks.lineage.registry import PARENT_RUN_TAG, PARENT_TAG, WEIGHTS_TAG

    stories = SAMPLE.read_text(encoding="utf-8").splitlines()
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "day-1.jsonl").write_text("\n".join(stories[:150]) + "\n", encoding="utf-8")
    overrides = tiny_overrides(tmp_path / "artifacts", incoming) + ["train.track_emissions=false"]

    first = build_model(preset="quickstart", overrides=overrides)
    assert first["registered"]["version"] == "1" and first["registered"]["parent"] is None

    lines = _Lines()
    logging.getLogger("prefect.flow_runs").addHandler(lines)
    try:
        again = build_model(preset="quickstart", overrides=overrides)
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(lines)
    assert set(again["stages"].values()) == {"Cached"}
    assert [line for line in lines.lines if "nothing changed" in line] == [
        "build-model: nothing changed since the last run (every stage Cached: same sources, configuration and code), "
        "so no new version was trained; scriptorium-quickstart version 1 stays and the 'champion' alias was not moved"]

    (incoming / "day-2.jsonl").write_text("\n".join(stories[150:230]) + "\n", encoding="utf-8")
    nightly = overrides + ["train.init_from=champion", "tokenizer.from_model=champion"]
    third = build_model(preset="quickstart", overrides=nightly)
    assert third["stages"]["acquire"] == "Completed"  # the folder changed: re-acquired
    assert third["stages"]["train"] == "Completed" and third["registered"]["version"] == "2"

    client = mlflow.MlflowClient(third["registered"]["tracking_uri"])
    v1, v2 = (client.get_model_version("scriptorium-quickstart", v) for v in ("1", "2"))
    # trained from the champion: the weights it loaded are version 1's (by digest), and the parent is recorded
    [train_dir] = [p for p in (tmp_path / "artifacts" / "train").iterdir()
                   if (p / "parent").is_dir()]
    from tasks.stage import file_sha256, load_artifact

    started_from = load_artifact(train_dir, "train").manifest["init_from"]
    assert started_from["version"] == "1" and started_from["weights_sha256"] == v1.tags[WEIGHTS_TAG]
    assert file_sha256(next((train_dir / "parent").rglob("model.safetensors"))) == v1.tags[WEIGHTS_TAG]
    assert v2.tags[PARENT_TAG] == "scriptorium-quickstart/1" and v2.tags[PARENT_RUN_TAG] == v1.run_id
    assert third["registered"]["parent"] == {"name": "scriptorium-quickstart", "version": "1", "run_id": v1.run_id}

    # the gate scored the champion on this run's validation tokens: both figures, the margin, the decision
    gate = {k.split(".", 2)[2]: v for k, v in v2.tags.items() if k.startswith("scriptorium.gate.")}
    assert gate["champion_version"] == "1" and gate["scored"] == "this run's validation tokens"
    candidate, champion = float(gate["candidate"]), float(gate["champion"])
    assert abs(candidate - third["metrics"]["val_bpb"]) < 1e-5
    assert abs(float(gate["margin"]) - (champion - candidate)) < 1e-5
    assert gate["decision"] == ("promoted over v1" if candidate < champion else "kept v1")
    assert third["registered"]["champion"] is (candidate < champion)
    # the same figure of the champion as stored would be a different exam: the validation text grew
    assert champion != client.get_run(v1.run_id).data.metrics["val_bpb"]
    assert "models:/scriptorium-quickstart/1" in v2.description and gate["margin"] in v2.description
    from flows.cli import main as cli

    capsys.readouterr()
    assert cli(["models", "--tracking-uri", third["registered"]["tracking_uri"]]) == 0
    first_line, second_line = capsys.readouterr().out.splitlines()[1:3]  # `scriptorium models` shows the lineage
    assert first_line.startswith("  version 1") and "trained from" not in first_line
    assert second_line.startswith("  version 2")
    assert second_line.endswith("(trained from models:/scriptorium-quickstart/1)")

    # the next night, nothing new: whichever version is champion now, nothing is trained again or registered (a
    # promoted v2 was trained from this very config and these shards: its weights are the train stage's output)
    fourth = build_model(preset="quickstart", overrides=nightly)
    assert fourth["stages"]["acquire"] == fourth["stages"]["shard"] == "Cached"
    assert fourth["stages"]["evaluate"] == fourth["stages"]["register"] == "Cached"
    assert fourth["registered"]["version"] == "2"
    reused = [load_artifact(p, "train").manifest.get("reused") for p in (tmp_path / "artifacts" / "train").iterdir()]
    if third["registered"]["champion"]:  # v2 is champion: train ran and handed on v2's own weights
        assert fourth["stages"]["train"] == "Completed"
        assert [r["version"] for r in reused if r] == ["2"]
    else:  # v1 is still champion: the same key as the third night's
        assert fourth["stages"]["train"] == "Cached" and not any(reused)


def test_acquire_key_changes_when_a_file_is_added_or_changed_in_the_folder_and_only_then(tmp_path):
    import os

    from pipeline_config.schema import AcquireConfig, SourceConfig
    from tasks.acquire import STAGE

    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "a.txt").write_text("one story.\n\nanother story.\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a source format, ignored\n", encoding="utf-8")
    cfg = AcquireConfig(sources=[SourceConfig(path=str(folder))])
    first = STAGE.key(cfg, {})
    (folder / "notes.md").write_text("edited, still ignored\n", encoding="utf-8")
    assert STAGE.key(cfg, {}) == first  # nothing acquire reads changed
    (folder / "b.txt").write_text("a new story.\n", encoding="utf-8")
    added = STAGE.key(cfg, {})
    assert added != first
    (folder / "b.txt").write_text("a new story, longer.\n", encoding="utf-8")
    os.utime(folder / "b.txt", ns=(1, 1))
    assert STAGE.key(cfg, {}) not in (first, added)
