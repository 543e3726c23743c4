"""Shared fixtures: a real (temporary, SQLite-backed) Prefect API and a shrunk quickstart configuration."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "tinystories-sample" / "stories.jsonl"


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's own test harness: a real API server on a throwaway database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """The first 150 stories of the shipped sample (real prose, ~130 KB)."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:150]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


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
