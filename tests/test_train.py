"""The training engine: exact resume after SIGKILL, DDP equivalence, the divergence guard, schedules."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_config.schema import ModelSection, TrainConfig
from tasks.training.loop import TrainingDiverged, Windows, learning_rate, train

REPO = Path(__file__).resolve().parent.parent
LOG = logging.getLogger("test")


def tiny_train_config(**changes) -> TrainConfig:
    base = dict(
        model=ModelSection(arch="gpt", n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.1),
        batch_size=4, max_steps=30, warmup_steps=3, eval_interval=10, eval_batches=2, checkpoint_interval=10,
        track_emissions=False, deterministic=True, threads=1, dtype="float32", log_interval=10,
    )
    base.update(changes)
    return TrainConfig(**base)


def corpus_tokens(n: int = 5000, vocab: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, n).astype(np.uint16)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = tiny_train_config(learning_rate=1e-3, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 100) == pytest.approx(1e-4)
    assert all(learning_rate(cfg, s) >= learning_rate(cfg, s + 1) for s in range(10, 100))


def test_windows_are_a_pure_function_of_the_key_and_ranks_split_the_global_batch():
    w = Windows(corpus_tokens(), block_size=16, seed=3)
    x1, y1 = w.batch(4, 7, 0)
    x2, _ = w.batch(4, 7, 0)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    full, _ = w.batch(4, 7, 0, part=(0, 1))
    halves = [w.batch(2, 7, 0, part=(r, 2))[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), full)


KILL_SCRIPT = textwrap.dedent(
    """
    import logging, os, signal, sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    import tasks.training.loop as T
    from tests.test_train import tiny_train_config, corpus_tokens
    kill_at = int(sys.argv[2])
    sent = getattr(signal, sys.argv[3]) if len(sys.argv) > 3 else signal.SIGKILL
    original = T.learning_rate
    def learning_rate(cfg, step, *rest):
        if step == kill_at:
            os.kill(os.getpid(), sent)  # a real signal, between two checkpoints
        return original(cfg, step, *rest)
    T.learning_rate = learning_rate
    out = T.Path(sys.argv[1])
    logging.basicConfig(level=logging.INFO)
    summary, model = T.train(tiny_train_config(), corpus_tokens(), corpus_tokens(800), 64, out, logging.getLogger())
    from safetensors.torch import save_model
    save_model(model, str(out / "final.safetensors"))
    """
)


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for d in (clean, killed):
        d.mkdir()
    assert subprocess.run([sys.executable, str(script), str(clean), "-1"], env=env).returncode == 0
    first = subprocess.run([sys.executable, str(script), str(killed), "25"], env=env)
    assert first.returncode == -9
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["step"] == 20
    assert subprocess.run([sys.executable, str(script), str(killed), "-1"], env=env).returncode == 0
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))  # the steps redone after the kill are logged once
    a, b = weights(clean / "final.safetensors"), weights(killed / "final.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, status", [("SIGINT", 1), ("SIGTERM", -signal.SIGTERM)])
def test_ctrl_c_or_sigterm_finishes_the_step_checkpoints_it_and_stops_as_the_signal_would(tmp_path, name, status):
    """Ctrl-C (or `kill`, a deployment cancelled in Prefect) at step 25 loses nothing: the step ends, a checkpoint is
    written at step 26 (the interval is 10), and the process then dies of the signal as it would have; the re-run
    resumes there to the weights of a run never stopped. A second Ctrl-C would act at once (the handler is gone)."""
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    for d in (clean, stopped):
        d.mkdir()
    assert subprocess.run([sys.executable, str(script), str(clean), "-1"], env=env).returncode == 0
    first = subprocess.run([sys.executable, str(script), str(stopped), "25", name], env=env, capture_output=True,
                           text=True)
    assert first.returncode == status, first.stderr[-2000:]  # SIGINT: an uncaught KeyboardInterrupt, as without this
    assert first.stderr.strip().endswith("KeyboardInterrupt") == (name == "SIGINT")
    assert json.loads((stopped / "checkpoints" / "latest.json").read_text())["step"] == 26
    assert f"stopping at step 26 on {name}" in first.stderr
    assert subprocess.run([sys.executable, str(script), str(stopped), "-1"], env=env).returncode == 0
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    a, b = weights(clean / "final.safetensors"), weights(stopped / "final.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_train_config(learning_rate=1e12, warmup_steps=0, grad_clip=0, checkpoint_interval=1, max_steps=50)
    with pytest.raises(TrainingDiverged, match="last good checkpoint") as err:
        train(cfg, corpus_tokens(), corpus_tokens(800), 64, tmp_path, LOG)
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest["path"] in str(err.value)
    ckpt = weights(tmp_path / "checkpoints" / latest["path"] / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in ckpt.values())


def test_time_budget_decays_the_rate_by_elapsed_time():
    cfg = tiny_train_config(learning_rate=1e-3, warmup_steps=0, max_steps=1000, min_lr_ratio=0.1, max_seconds=10)
    assert learning_rate(cfg, 5, elapsed=0.0) == pytest.approx(learning_rate(cfg, 5))
    assert learning_rate(cfg, 5, elapsed=10.0) == pytest.approx(1e-4)  # the budget is spent: at the floor
    assert learning_rate(cfg, 5, elapsed=5.0) < learning_rate(cfg, 5)


def test_time_budget_stops_training_and_leaves_a_checkpoint(tmp_path):
    summary, _ = train(tiny_train_config(max_steps=1000, max_seconds=0.001), corpus_tokens(), corpus_tokens(800), 64,
                       tmp_path, LOG)
    assert summary["steps"] == 1 and summary["early_stopped"]
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 1


def _shards(tmp_path: Path) -> Path:
    from tasks.stage import write_manifest
    from tasks.shard import _write_shard

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    shards = []
    rng = np.random.default_rng(1)
    for split, n in (("train", 5000), ("val", 800)):
        # learnable text (a cycle with some noise) so gradients are large and consistent, not rounding noise
        tokens = np.where(rng.random(n) < 0.1, rng.integers(0, 64, n), np.arange(n) % 64).astype(np.uint16)
        _write_shard(shard_dir / f"{split}.parquet", tokens, 3)
        shards.append({"file": f"{split}.parquet", "split": split, "tokens": n})
    write_manifest(shard_dir, "shard", {"shards": shards, "vocab_size": 64})
    return shard_dir


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    """gloo on CPU. Equal up to float reduction order; Adam amplifies rounding in near-zero gradients, so the check is
    relative: DDP(2 x 4) must sit far closer to one process with batch 8 than one process with batch 4 does."""
    shard_dir = _shards(tmp_path)
    runs = {}
    for world, batch in ((1, 8), (2, 4), (1, 4)):
        out = tmp_path / f"world{world}-batch{batch}"
        out.mkdir()
        config = out / "train.json"
        config.write_text(tiny_train_config(batch_size=batch, max_steps=6, eval_interval=6, model=ModelSection(
            arch="gpt", n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.0)).model_dump_json())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "tasks.train", str(config), str(shard_dir), str(out)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[world, batch] = json.loads((out / "manifest.json").read_text())
        runs[world, batch]["weights"] = weights(out / "model.safetensors")
    reference, ddp, half = runs[1, 8], runs[2, 4], runs[1, 4]
    assert ddp["world_size"] == 2
    ddp_gap = abs(ddp["best_val_loss_estimate"] - reference["best_val_loss_estimate"])
    half_gap = abs(half["best_val_loss_estimate"] - reference["best_val_loss_estimate"])
    assert ddp_gap < 0.1 * half_gap
    assert ddp["best_val_loss_estimate"] == pytest.approx(reference["best_val_loss_estimate"], rel=1e-4)

    def weight_gap(run):
        return max((run["weights"][k] - reference["weights"][k]).abs().max().item() for k in reference["weights"])

    assert weight_gap(ddp) < 0.1 * weight_gap(half)
