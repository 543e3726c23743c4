"""Shared fixtures: a real (temporary, SQLite-backed) Prefect API and a shrunk quickstart configuration."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "tinystories-sample" / "stories.jsonl"


@pytest.fixture(scope="session", autouse=True)
def _prefect_logs_to_the_session_stream():
    """Prefect sets up logging when its API is first used (`from prefect import flow`, not `import prefect`), and its
    console handler keeps whatever sys.stderr was then. A test with capsys that did that first (test_deployment's
    serve test, run on its own before test_flow) left the handler writing to capsys's stream, closed when that test
    ended, and every later flow's log line failed ('I/O operation on closed file'). Set up here, before any test's
    capture, the handler writes to pytest's session-long stream, so the suite passes in any order."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's own test harness: a real API server on a throwaway database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def write_small_corpus(path: Path) -> Path:
    """The first 150 stories of the shipped sample (real prose, ~130 KB), written to `path`."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:150]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    return write_small_corpus(tmp_path / "corpus.jsonl")


def tiny_overrides(artifacts: Path, corpus: Path, stories: int = 0) -> list[str]:
    """Quickstart shrunk to seconds: a small corpus, a 320-piece vocabulary, a one-layer model, a few steps."""
    return [
        f"artifacts_dir={artifacts}",
        f"acquire.sources={json.dumps([{'path': str(corpus)}])}",
        "acquire.byte_budget=200000",
        f"synthesize.n={stories}",
        "synthesize.max_tokens=48",
        "synthesize.quality.min_words=10",
        "tokenizer.vocab_size=320",
        "train.model.n_layer=1",
        "train.model.n_embd=32",
        "train.model.n_head=2",
        "train.model.block_size=32",
        "train.batch_size=4",
        "train.max_steps=6",
        "train.warmup_steps=2",
        "train.eval_interval=3",
        "train.eval_batches=2",
        "train.checkpoint_interval=3",
        "evaluate.max_batches=2",
        "evaluate.max_new_tokens=8",
        "evaluate.prompts=[once upon a time]",
        "report.track_energy=false",  # codecarbon costs 2-4 s a stage; tests/test_reporting.py measures it once
    ]


@pytest.fixture(autouse=True)
def _own_synthesis_tuning_file(tmp_path_factory, monkeypatch):
    """`synthesize.requantize/parallel: auto` keep this machine's pick in ~/.cache; a pick left there by a benchmark
    would change what the tests' story model is (e.g. `@q4_0` instead of `@f32`), so each test starts without one."""
    import tasks.synthesis.tuning as tuning

    monkeypatch.setattr(tuning, "DEFAULT_FILE", tmp_path_factory.mktemp("tuning") / "synthesize-tuning.json")


@contextlib.contextmanager
def temporary_mlflow_store(root: Path) -> Iterator[tuple[str, str]]:
    """(tracking URI, experiment id) of a SQLite MLflow store under `root`, the tracking URI inside the block and the
    previous one again after it. Start runs in that experiment: it keeps artifacts under `root`, where MLflow's
    default experiment would write them to ./mlruns, in whatever directory the tests run from."""
    import mlflow

    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        yield uri, mlflow.MlflowClient().create_experiment("tests", artifact_location=(root / "artifacts").as_uri())
    finally:
        mlflow.set_tracking_uri(before)


def register_tiny(trained: Path, experiment: str) -> str:
    """The `trained` folder registered as model "tiny" by register's own `_log_model` (the pyfunc, its signature and
    input example), in a run of `experiment` of the current store; returns the version."""
    import mlflow

    from pipeline_config.schema import RegisterConfig
    from tasks.register import _log_model
    from tasks.stage import Artifact

    with mlflow.start_run(experiment_id=experiment):
        return _log_model(RegisterConfig(model_name="tiny"), Artifact("train", trained, ""),
                          Artifact("tokenizer", trained / "tokenizer", ""))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder as a registered version holds it: model.safetensors, model_config.json, tokenizer/ (a tiny GPT on a
    real 320-piece SentencePiece vocabulary, untrained)."""
    import torch
    from safetensors.torch import save_model

    from model import ModelConfig, build_model
    from model.tokenizer import load_tokenizer
    from pipeline_config.schema import TokenizerConfig
    from tasks.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("model")
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:100]
    records = [{"text": json.loads(line)["text"], "language": "en"} for line in lines]
    (root / "tokenizer").mkdir()
    build_tokenizer(TokenizerConfig(vocab_size=320), records, root / "tokenizer", logging.getLogger("test"))
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", vocab_size=load_tokenizer(root / "tokenizer").vocab_size, n_layer=1, n_head=2,
                      n_embd=32, block_size=64)
    save_model(build_model(cfg), str(root / "model.safetensors"))
    (root / "model_config.json").write_text(cfg.model_dump_json())
    return root


def run_stages(root: Path, stages: tuple[str, ...], extra_overrides: tuple[str, ...] = (),
               report: Callable[[str], Any] | None = None) -> dict:
    """Quickstart shrunk by `tiny_overrides` (plus `extra_overrides`) on the small corpus under `root`, with `stages`
    run once each, in order, through `Stage.execute` outside any flow (no stories: synthesize is None). `report(stage)`
    gives a stage its ReportConfig. Returns {stage: artifact, "cfg": the config, "root": the artifacts directory}."""
    import importlib

    from pipeline_config import load_config

    artifacts = root / "artifacts"
    cfg = load_config("quickstart", tiny_overrides(artifacts, write_small_corpus(root / "corpus.jsonl"))
                      + list(extra_overrides))
    made: dict = {"synthesize": None, "cfg": cfg, "root": artifacts}
    for stage in stages:
        declared = importlib.import_module(f"tasks.{stage}").STAGE
        made[stage] = declared.execute(getattr(cfg, stage), {name: made[name] for name in declared.inputs}, artifacts,
                                       logging.getLogger("test"), report(stage) if report else None)
    return made
