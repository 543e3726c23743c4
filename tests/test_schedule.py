"""The budget-fraction schedule: a run with `max_seconds` ends on the floor rate, and a resumed run counts the time
spent before the resumption."""
from __future__ import annotations

import json
import logging

import pytest

from tasks.training.loop import learning_rate, train
from tests.test_train import corpus_tokens, tiny_train_config

LOG = logging.getLogger("test")


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_budget_drives_the_decay_by_the_fraction_spent_not_by_max_steps():
    cfg = tiny_train_config(learning_rate=1e-3, warmup_steps=2, max_steps=10**9, min_lr_ratio=0.1, max_seconds=100)
    assert learning_rate(cfg, 1, elapsed=0.5) == pytest.approx(1e-3)  # warmup is still counted in steps
    assert learning_rate(cfg, 50, elapsed=50.0) == pytest.approx(0.55e-3)  # half the budget: half-way down the cosine
    assert learning_rate(cfg, 60, elapsed=100.0) == pytest.approx(1e-4)
    stepwise = tiny_train_config(learning_rate=1e-3, warmup_steps=0, max_steps=100, min_lr_ratio=0.1)
    assert learning_rate(stepwise, 50, elapsed=1e6) == pytest.approx(0.55e-3)  # no budget: steps only


def test_a_budgeted_run_stops_by_time_with_the_rate_on_its_floor(tmp_path):
    cfg = tiny_train_config(learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=2, max_steps=10**6, max_seconds=1.5,
                            eval_interval=10**6, checkpoint_interval=10**6)
    summary, _ = train(cfg, corpus_tokens(), corpus_tokens(800), 64, tmp_path, LOG)
    assert summary["early_stopped"] and 3 < summary["steps"] < 10**6
    lrs = [row["lr"] for row in rows(tmp_path)]
    assert max(lrs) == pytest.approx(1e-3, rel=0.05)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)  # fully decayed when the budget ran out
    trainer = json.loads((tmp_path / "checkpoints" / f"step-{summary['steps']:08d}" / "trainer.json").read_text())
    assert trainer["elapsed"] >= 1.5


def test_a_resumed_run_counts_the_seconds_trained_before_it(tmp_path):
    first = tiny_train_config(max_steps=6, checkpoint_interval=6, max_seconds=3600)
    train(first, corpus_tokens(), corpus_tokens(800), 64, tmp_path, LOG)
    spent = json.loads((tmp_path / "checkpoints" / "step-00000006" / "trainer.json").read_text())["elapsed"]
    assert spent > 0
    # The same budget, now already spent: the resumed run stops after one step, on the floor rate.
    resumed = tiny_train_config(max_steps=100, checkpoint_interval=6, max_seconds=spent)
    summary, _ = train(resumed, corpus_tokens(), corpus_tokens(800), 64, tmp_path, LOG)
    assert summary["resumed_from"] == 6 and summary["steps"] == 7 and summary["early_stopped"]
    assert rows(tmp_path)[-1]["lr"] == pytest.approx(resumed.learning_rate * resumed.min_lr_ratio)
