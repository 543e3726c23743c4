"""The training engine: exact resume after SIGKILL, DDP equivalence, the divergence guard, schedules."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
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


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same tensors, to float rounding (a resumed run against one never stopped)."""
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


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
    sent = getattr(signal, sys.argv[3]) if len(sys.argv) > 3 else None
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


def _run_kill_script(out: Path, stop_at: int = -1, sent: str = "SIGKILL") -> subprocess.CompletedProcess:
    """KILL_SCRIPT in a process of its own: train into `out`, sending itself `sent` at step `stop_at` (-1: never)."""
    script = out.parent / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO)))
    out.mkdir()
    return subprocess.run([sys.executable, str(script), str(out), str(stop_at), sent],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of the run the stopped ones must end with."""
    out = tmp_path_factory.mktemp("clean") / "run"
    assert _run_kill_script(out).returncode == 0
    return weights(out / "final.safetensors")


@pytest.mark.parametrize("sent, status, checkpoint", [
    ("SIGKILL", -signal.SIGKILL, 20),  # a real kill: back to the last interval checkpoint
    ("SIGINT", 1, 26),  # Ctrl-C: the step ends, is checkpointed, then an uncaught KeyboardInterrupt as ever
    ("SIGTERM", -signal.SIGTERM, 26),  # `kill`, a deployment run cancelled in Prefect: the same, then death by it
])
def test_a_stopped_run_resumes_to_the_same_weights(tmp_path, never_stopped, sent, status, checkpoint):
    """A run stopped at step 25 (the checkpoint interval is 10) resumes to the weights of one never stopped, with
    each step logged once. SIGINT and SIGTERM lose no step: the one in progress ends and a checkpoint is written
    there (tasks/training/interrupts.py); a second Ctrl-C would act at once (the handler is gone by then)."""
    out = tmp_path / "stopped"
    first = _run_kill_script(out, 25, sent)
    assert first.returncode == status, first.stderr[-2000:]
    assert first.stderr.strip().endswith("KeyboardInterrupt") == (sent == "SIGINT")
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == checkpoint
    assert (f"stopping at step 26 on {sent}" in first.stderr) == (checkpoint == 26)
    assert (f"train: {sent}: stopping once the step in progress is checkpointed" in first.stderr) == (checkpoint == 26)
    again = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(out), "-1"],
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert again.returncode == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))  # the steps redone after the stop are logged once
    assert_same_weights(weights(out / "final.safetensors"), never_stopped)


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


def _torchrun(config: TrainConfig, shard_dir: Path, out: Path, world: int) -> subprocess.Popen:
    """DDP (gloo) training of `world` processes into `out`, torchrun in a session of its own (as in a terminal: Ctrl-C
    reaches torchrun alone, which sends it on to every rank, each in a session of its own too)."""
    out.mkdir(exist_ok=True)
    config_file = out.parent / f"{out.name}.json"
    config_file.write_text(config.model_dump_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "tasks.train", str(config_file), str(shard_dir), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    """gloo on CPU. Equal up to float reduction order; Adam amplifies rounding in near-zero gradients, so the check is
    relative: DDP(2 x 4) must sit far closer to one process with batch 8 than one process with batch 4 does."""
    shard_dir = _shards(tmp_path)
    runs = {}
    for world, batch in ((1, 8), (2, 4), (1, 4)):
        out = tmp_path / f"world{world}-batch{batch}"
        config = tiny_train_config(batch_size=batch, max_steps=6, eval_interval=6, model=ModelSection(
            arch="gpt", n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.0))
        run = _torchrun(config, shard_dir, out, world)
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
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


def test_ctrl_c_on_torchrun_checkpoints_the_step_every_rank_finished_and_resumes_to_the_same_weights(tmp_path):
    """gloo on CPU, a real torchrun. Ctrl-C (torchrun's SIGINT, passed to each rank) used to stop every rank at once,
    losing every step since the last checkpoint; now the ranks agree at the end of the step to stop there, rank 0
    checkpoints it, and the same command resumes to the weights of a run never stopped."""
    shard_dir, steps = _shards(tmp_path), 120
    config = tiny_train_config(batch_size=8, max_steps=steps, eval_interval=steps, checkpoint_interval=10_000,
                               model=ModelSection(arch="gpt", n_layer=2, n_head=2, n_embd=64, block_size=32,
                                                  dropout=0.0))
    clean = _torchrun(config, shard_dir, tmp_path / "clean", 2)
    _, stderr = clean.communicate(timeout=300)  # read as it runs: a full pipe would stall the ranks' logging
    assert clean.returncode == 0, stderr[-3000:]
    stopped_dir = tmp_path / "stopped"
    run, metrics = _torchrun(config, shard_dir, stopped_dir, 2), stopped_dir / "metrics.jsonl"
    while run.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0, stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert 5 <= rows[-1]["step"] < steps, "the run was to be stopped part way"
    assert json.loads((stopped_dir / "checkpoints" / "latest.json").read_text())["step"] == rows[-1]["step"], \
        stderr[-3000:]
    assert f"stopping at step {rows[-1]['step']} on SIGINT" in stderr
    resumed = _torchrun(config, shard_dir, stopped_dir, 2)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resuming at step {rows[-1]['step']}" in stderr
    assert [row["step"] for row in map(json.loads, metrics.read_text().splitlines())] == list(range(1, steps + 1))
    assert_same_weights(weights(stopped_dir / "model.safetensors"), weights(tmp_path / "clean" / "model.safetensors"))
