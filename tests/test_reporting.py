"""What a person sees: Prefect artifacts from inside stages (and nothing outside a run), each stage's time and energy
in its manifest, the samples written at every checkpoint, and the model card built from a real lineage.

The lineage is real (acquire, tokenizer, shard, train, evaluate on 150 stories, a one-layer model); the MLflow side
(tables, charts, the card on the registered version) is checked through the MLflow UI's own API in
tests/test_mlflow_ui.py.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_config.schema import ReportConfig

LOG = logging.getLogger("test")
QUIET = ReportConfig(track_energy=False)


@pytest.fixture(scope="module")
def lineage(tmp_path_factory) -> dict:
    """Every stage up to evaluate, run once through `Stage.execute` outside any flow; evaluate with codecarbon on."""
    from tests.conftest import run_stages

    return run_stages(tmp_path_factory.mktemp("reporting"), ("acquire", "tokenizer", "shard", "train", "evaluate"),
                      ("train.samples.max_new_tokens=6",), lambda stage: ReportConfig(track_energy=stage == "evaluate"))


def test_checkpoint_samples_are_written_per_step_greedy_and_at_the_configured_temperature(lineage):
    cfg = lineage["cfg"]
    assert cfg.train.samples.prompts == cfg.evaluate.prompts == ["once upon a time"]  # evaluate's, by default
    rows = [json.loads(line) for line in (lineage["train"].path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["mode"], r["temperature"]) for r in rows] == [
        (3, "greedy", 0.0), (3, "sampled", 0.5), (6, "greedy", 0.0), (6, "sampled", 0.5)]
    assert all(r["text"].startswith("once upon a time") for r in rows)
    manifest = lineage["train"].manifest
    assert "samples.jsonl" in manifest["reports"] and "samples.jsonl" not in manifest["files"]  # a report: checksummed,
    # but not what later stages read, so not in the fingerprint


def test_every_stage_records_its_time_and_the_compute_stages_their_energy(lineage):
    for stage in ("acquire", "tokenizer", "shard", "train", "evaluate"):
        compute = lineage[stage].manifest["compute"]
        assert compute["seconds"] > 0, stage
    assert lineage["evaluate"].manifest["compute"]["energy_kwh"] > 0  # codecarbon measured it
    assert lineage["shard"].manifest["compute"]["energy_kwh"] is None  # report.track_energy was off there


def test_the_compute_figures_are_not_part_of_the_fingerprint(lineage):
    from tasks.stage import fingerprint

    manifest = dict(lineage["shard"].manifest)
    assert fingerprint({**manifest, "compute": {"seconds": 123.0}}) == lineage["shard"].fingerprint


def test_reporting_is_in_no_code_identity_but_the_samples_are():
    from tasks.stage import code_modules

    train = code_modules("tasks.train")
    assert "tasks.training.samples" in train  # it writes samples.jsonl: a change re-trains
    assert not any(name.startswith("tasks.reporting") for stage in ("tasks.train", "tasks.shard", "tasks.register")
                   for name in code_modules(stage))


def test_sampling_at_checkpoints_does_not_change_training_and_a_resume_drops_later_rows(tmp_path):
    """Sampling forks the torch RNG, so weights trained with dropout match bit for bit with and without samples; a
    resumed run drops the rows a killed run wrote after its checkpoint."""
    from safetensors.torch import load_file, save_model

    from model.tokenizer import load_tokenizer
    from pipeline_config.schema import CheckpointSamplesConfig, TokenizerConfig
    from tasks.tokenizer import build_tokenizer
    from tasks.training.loop import train
    from tests.test_train import tiny_train_config

    texts = [{"text": "once upon a time there was a little dog who liked the sun", "language": "en"}] * 4
    build_tokenizer(TokenizerConfig(kind="char"), texts, tmp_path / "tok", LOG)
    vocab = load_tokenizer(tmp_path / "tok").vocab_size
    tokens = np.random.default_rng(0).integers(3, vocab, 4000).astype(np.uint16)
    samples = CheckpointSamplesConfig(prompts=["once upon"], max_new_tokens=5)
    for name, enabled in (("with", True), ("without", False)):
        cfg = tiny_train_config(max_steps=6, checkpoint_interval=3, samples=samples.model_copy(update={"enabled":
                                                                                                        enabled}))
        _, model = train(cfg, tokens, tokens[:800], vocab, tmp_path / name, LOG, tokenizer_dir=tmp_path / "tok")
        save_model(model, str(tmp_path / f"{name}.safetensors"))
    with_samples, without = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("with", "without"))
    assert all(torch.equal(with_samples[k], without[k]) for k in without)
    assert not (tmp_path / "without" / "samples.jsonl").exists()

    journal = tmp_path / "with" / "samples.jsonl"
    with open(journal, "a") as handle:  # what a run killed after a checkpoint it never reached would leave
        handle.write(json.dumps({"step": 99, "prompt": "x", "mode": "greedy", "temperature": 0.0, "text": "x"}) + "\n")
    cfg = tiny_train_config(max_steps=9, checkpoint_interval=3, samples=samples)
    train(cfg, tokens, tokens[:800], vocab, tmp_path / "with", LOG, tokenizer_dir=tmp_path / "tok")
    steps = [json.loads(line)["step"] for line in journal.read_text().splitlines()]
    assert steps == [3, 3, 6, 6, 9, 9]


def test_nothing_is_published_outside_a_flow_run():
    from tasks.reporting.prefect_artifacts import Progress, publish
    from tasks.reporting.summaries import publish_summary

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Prefect warns when an artifact is made outside a run: it must not be asked
        progress = Progress("train-progress", 10, "training steps")
        progress.update(10)
        assert progress.id is None
        assert publish("x", markdown="# x") is False
        assert publish_summary("register", {"model_name": "m", "version": "1"}, Path(".")) is False


def _artifacts(flow_run_id) -> dict[str, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key: dict[str, list] = {}
    for artifact in found:
        by_key.setdefault(artifact.key, []).append(artifact)
    return by_key


def test_stages_publish_progress_while_they_run_and_a_summary_when_they_end(prefect_api, lineage):
    from prefect import flow
    from prefect.runtime import flow_run

    from tasks.shard import STAGE as SHARD
    from tasks.train import STAGE as TRAIN

    cfg = lineage["cfg"]

    @flow
    def probe(report: ReportConfig, changed: int) -> str:
        shard_cfg = cfg.shard.model_copy(update={"tokens_per_shard": cfg.shard.tokens_per_shard + changed})
        shard = SHARD.execute(shard_cfg, {"acquire": lineage["acquire"], "synthesize": None,
                                          "tokenizer": lineage["tokenizer"]}, lineage["root"], LOG, report)
        TRAIN.execute(cfg.train.model_copy(update={"max_steps": 4 + changed}),
                      {"tokenizer": lineage["tokenizer"], "shard": shard}, lineage["root"], LOG, report)
        return flow_run.id

    published = _artifacts(probe(QUIET, 1))
    [train_progress] = published["train-progress"]
    assert train_progress.type == "progress" and float(train_progress.data) == 100.0
    assert "training steps: 5/5" in train_progress.description
    assert [a.type for a in published["shard-chunks-tokenized"]] == ["progress"]
    [curve] = published["train-curve"]
    assert curve.type == "markdown" and "val loss (estimate)" in curve.data and "| 5 |" in curve.data
    [totals] = published["shard-totals"]
    assert "| train | en |" in totals.data and "| val | en |" in totals.data

    assert _artifacts(probe(ReportConfig(track_energy=False, prefect_artifacts=False), 2)) == {}


@pytest.mark.parametrize("stage", ["acquire", "tokenizer", "shard", "train", "evaluate"])
def test_every_stage_has_a_summary_built_from_its_manifest(lineage, stage):
    from tasks.reporting.summaries import summary

    key, content = summary(stage, lineage[stage].manifest, lineage[stage].path)
    assert key.startswith(stage + "-")
    assert content  # a table's rows or markdown text
    if stage == "tokenizer":
        assert content[0]["language"] == "en" and content[0]["tokens_per_word"] > 1


def test_the_model_card_says_what_the_model_is_and_how_it_did(lineage):
    from tasks.tracking.model_card import model_card

    upstream = {name: lineage[name] for name in ("acquire", "synthesize", "tokenizer", "shard", "train", "evaluate")}
    card = model_card("tiny", {**upstream, "export": None})
    for section in ("# tiny", "## Data", "## Tokenizer", "## Architecture and parameters", "## Training",
                    "## Metrics", "## Energy", "## Samples", "## Intended use", "## Limitations"):
        assert section in card
    metrics = lineage["evaluate"].manifest["metrics"]
    assert f"{metrics['val_bpb']:.4f} bits per byte" in card
    assert f"{lineage['train'].manifest['parameters']:,} parameters" in card
    assert "| 3 | once upon a time" in card and "| 6 | once upon a time" in card  # the checkpoint evolution
    assert "d_state" not in card  # a GPT's card lists a GPT's knobs


def test_starting_the_energy_tracker_logs_nothing_below_the_errors_it_is_asked_for(tmp_path, capfd):
    """codecarbon applies `log_level` only after its first lines ("offline tracker init" and a WARNING that several
    trackers may run at once), so every stage's log carried them; the tracker starts with its logger at ERROR."""
    from tasks.training.emissions import emissions_tracker

    logging.getLogger("codecarbon").setLevel(logging.INFO)  # as in a fresh process, before any tracker set it
    tracker = emissions_tracker(True, "FRA", tmp_path)
    tracker.start()
    tracker.stop()
    err = capfd.readouterr().err
    assert "codecarbon WARNING" not in err and "codecarbon INFO" not in err, err
    assert (tmp_path / "emissions.csv").is_file()  # it still measured
