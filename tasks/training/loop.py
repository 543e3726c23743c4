"""The training loop: fit a model on a flat token array, resuming exactly from its checkpoints.

Exact resumption is by construction rather than by bookkeeping: the batch for (step, micro-step) is drawn from a numpy
generator seeded with (seed, step, micro-step), so "where we were in the data" is just the step number, and the torch
RNG state (dropout) is saved with the weights and optimizer moments. A run killed at any point and restarted therefore
ends with the same weights as one that was never interrupted (bit-for-bit in deterministic mode).

The loop's periodic validation loss is an *estimate* (random windows, `eval_batches` of them) for early stopping and
the curve; it is logged as `val_loss_estimate`. The figures of record come from the evaluate stage.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from model import ModelConfig, build_model
from model.profile import describe as describe_profile
from model.profile import model_profile
from pipeline_config.train import TrainConfig
from tasks.corpus.reader import ShardTokens
from tasks.reporting.prefect_artifacts import Progress
from tasks.stage import PipelineError, read_jsonl, write_atomic, write_json
from tasks.training.allocator import kept_heap
from tasks.training.checkpoints import load_checkpoint, save_checkpoint
from tasks.training.data import Windows  # noqa: F401  (windows per shard; imported from here too)
from tasks.training.devices import autocast, autocast_dtype, pick_device
from tasks.training.distributed import agreed, init_distributed
from tasks.training.emissions import emissions_tracker
from tasks.training.files import CHECKPOINTS, DIVERGED, METRICS, PROFILE, RESUMABLE_KNOBS
from tasks.training.interrupts import StopRequest, stop_at_step_end
from tasks.training.muon import build_optimizer
from tasks.training.samples import checkpoint_samples

TRAIN_STREAM, EVAL_STREAM = 0, 1  # first element of every window key: training and evaluation never share draws


class TrainingDiverged(PipelineError, RuntimeError):
    """The loss or the gradient became NaN/inf; the message names the step and the last good checkpoint."""


class SplitTooShort(PipelineError, ValueError):
    """A split holds no window of the context length; the message names the split and the fix."""




@torch.no_grad()
def mean_loss(model: nn.Module, windows: Windows, batches: int, batch_size: int, device: torch.device, dtype) -> float:
    """Mean cross-entropy over a fixed set of windows (the same ones at every evaluation)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(batches):
        x, y = windows.batch(batch_size, EVAL_STREAM, i)
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        total += loss.item()
    model.train(was_training)
    return total / batches


def learning_rate(cfg: TrainConfig, step: int, elapsed: float = 0.0) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio` of the peak.

    With `max_seconds` the decay is driven by the fraction of the time budget spent (`elapsed`, training seconds
    summed over resumptions), not by a step count guessed in advance: however fast or loaded the machine, the rate is
    on its floor when the budget runs out. `max_steps` still counts when it comes first (whichever stop is nearer
    drives the decay); without a budget the schedule is step-driven only."""
    peak = cfg.learning_rate
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.max_seconds:
        progress = max(progress, min(elapsed / cfg.max_seconds, 1.0))
    floor = peak * cfg.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)


def set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(getattr(module, "dropout", None), float):  # attention's SDPA dropout_p
            module.dropout = p


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(**cfg.model.model_dump(), vocab_size=vocab_size)


@dataclass
class Session:
    """Everything set up before the first step, and the counters the loop advances."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype | None
    mcfg: ModelConfig
    model: nn.Module
    runner: nn.Module
    optimizer: torch.optim.Optimizer
    checkpoints: Path
    start: int
    done: int
    best_val: float
    stale: int
    last_loss: float = math.nan
    grad_norm: float = math.nan  # the last step's gradient norm, before clipping
    profile: dict[str, Any] | None = None
    stopped_early: bool = False
    out_of_time: bool = False
    elapsed: float = 0.0  # by rank 0's clock, read once per step (a broadcast under DDP) when a time budget is set
    samples: Any = None  # the leader's CheckpointSamples (tasks/training/samples.py), or None
    progress: Any = None  # the leader's Prefect progress artifact (a no-op outside a flow run)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum_steps * self.world * self.mcfg.block_size


def _session(cfg: TrainConfig, vocab_size: int, out_dir: Path, init: Callable[[nn.Module], nn.Module] | None = None
             ) -> Session:
    """Process group, threads, seeds, device and dtype, the model and optimizer, restored from the last checkpoint.
    `init` turns each freshly built model into the starting one (a parent's weights, LoRA; tasks/training/init.py);
    the optimizer takes the parameters that are left trainable."""
    rank, world = init_distributed()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed + rank)
    device = pick_device(cfg.device)
    mcfg = model_config(cfg, vocab_size)
    init = init or (lambda built: built)
    model = init(build_model(mcfg)).to(device)
    optimizer = build_optimizer(model, cfg, device.type)
    checkpoints = out_dir / CHECKPOINTS
    meta = load_checkpoint(checkpoints, model, optimizer, device) or {}
    if meta and not _may_resume(cfg, meta, checkpoints, rank):
        _start_over(checkpoints, out_dir / METRICS, rank, world)
        torch.manual_seed(cfg.seed + rank)  # the same initial weights as a run that never had a checkpoint
        model = init(build_model(mcfg)).to(device)
        optimizer = build_optimizer(model, cfg, device.type)
        meta = {}
    runner: nn.Module = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        runner = torch.compile(runner)  # after DDP, so the compiler sees DDP's bucket boundaries
    start = meta.get("step", 0)
    return Session(cfg, rank, world, device, autocast_dtype(cfg.dtype, device), mcfg, model, runner, optimizer,
                   checkpoints, start, start, meta.get("best_val", math.inf), meta.get("stale", 0),
                   elapsed=meta.get("elapsed", 0.0))


def schedule(cfg: TrainConfig) -> dict[str, Any]:
    """The resumable knobs a checkpoint was trained under (saved in it, compared on resume)."""
    return {name: getattr(cfg, name) for name in sorted(RESUMABLE_KNOBS)}


def _may_resume(cfg: TrainConfig, meta: dict[str, Any], checkpoints: Path, rank: int) -> bool:
    """Whether a checkpoint trained under other resumable knobs may be resumed: yes after a divergence (that is what
    the new learning rate is for) or when only the time budget changed; otherwise training starts over."""
    log = logging.getLogger("scriptorium.train")
    saved = meta.get("schedule")
    changed = {k: (saved.get(k), v) for k, v in schedule(cfg).items() if saved.get(k) != v} if saved else {}
    if set(changed) <= {"max_seconds"}:
        return True
    described = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(changed.items()))
    if (checkpoints / DIVERGED).is_file():
        if rank == 0:
            log.info("train: resuming the diverged run from step %d with %s", meta["step"], described)
        return True
    if rank == 0:
        log.info("train: %s changed and the previous run did not diverge: training starts over", described)
    return False


def _start_over(checkpoints: Path, metrics: Path, rank: int, world: int) -> None:
    """Remove the checkpoints and curve of a run that is not resumed (the leader does; the others wait for it)."""
    if world > 1:
        torch.distributed.barrier()  # every rank has read the checkpoint before the leader removes it
    if rank == 0:
        shutil.rmtree(checkpoints, ignore_errors=True)
        metrics.unlink(missing_ok=True)
    if world > 1:
        torch.distributed.barrier()


def _drop_rows_after(path: Path, step: int) -> None:
    """Rows a killed run logged after its last checkpoint are re-done now: keep only rows up to `step`."""
    if path.is_file():
        rows = [row for row in read_jsonl(path) if row.get("step", 0) <= step]
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def train(
    cfg: TrainConfig, tokens: np.ndarray | ShardTokens, val_tokens: np.ndarray | ShardTokens, vocab_size: int,
    out_dir: Path, log: logging.Logger, init: Callable[[nn.Module], nn.Module] | None = None,
    tokenizer_dir: Path | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    """Train to `cfg.max_steps` (resuming from `out_dir/checkpoints`) on a split's shards (or one flat array);
    returns the summary and the model. With `tokenizer_dir`, every checkpoint also writes samples."""
    s = _session(cfg, vocab_size, out_dir, init)
    if s.leader:
        log.info(
            "train: %s, %.2fM parameters (%.2fM non-embedding), device %s, %s, %s",
            s.mcfg.arch, s.model.num_params(non_embedding=False) / 1e6, s.model.num_params() / 1e6, s.device,
            "bf16 autocast" if s.dtype else "fp32", f"resuming at step {s.start}" if s.start else
            "from its parent's weights" if init else "from scratch",
        )
        _drop_rows_after(out_dir / METRICS, s.start)
        s.profile = model_profile(s.model, cfg.batch_size, s.tokens_per_step)
        write_json(out_dir / PROFILE, s.profile)
        log.info("train: profile: %s", describe_profile(s.profile))
        s.samples = checkpoint_samples(cfg.samples, tokenizer_dir, out_dir, s.start, cfg.seed, log)
        s.progress = Progress("train-progress", cfg.max_steps, "training steps")
    windows = _windows(tokens, "train", s.mcfg.block_size, cfg.seed), _windows(val_tokens, "val", s.mcfg.block_size,
                                                                             cfg.seed)
    tracker = emissions_tracker(cfg.track_emissions, cfg.country_iso_code, out_dir) if s.leader else None
    if tracker:
        tracker.start()
    started = time.perf_counter()
    try:
        with kept_heap(cfg.keep_heap), stop_at_step_end(announce=s.leader) as stop:
            _loop(s, windows, out_dir / METRICS, log, stop)
    finally:
        emissions = tracker.stop() if tracker else None
    return _summary(s, time.perf_counter() - started, tracker, emissions), s.model


def _windows(tokens: np.ndarray | ShardTokens, split: str, block_size: int, seed: int) -> Windows:
    """The split's windows, or a project error that names the split and what to change."""
    try:
        return Windows(tokens, block_size, seed)
    except ValueError as exc:
        fix = "raise shard.val_fraction (the share of documents held out) or add data" if split == "val" else \
            "add data"
        raise SplitTooShort(f"the {split} split is too short for train.model.block_size={block_size} ({exc}): {fix}, "
                            "or lower train.model.block_size") from None


def _loop(s: Session, windows: tuple[Windows, Windows], metrics_path: Path, log: logging.Logger,
          stop: StopRequest) -> None:
    cfg = s.cfg
    started = time.perf_counter() - s.elapsed  # the budget counts training seconds before a resumption too
    logged = [s.start, time.perf_counter()]  # (step, time) of the last progress line: a recent rate
    s.model.train()
    for step in range(s.start, cfg.max_steps):
        lr = learning_rate(cfg, step, s.elapsed)
        for group in s.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices run at their own peak rate
        if cfg.dropout_final is not None:
            set_dropout(s.model, cfg.model.dropout + (cfg.dropout_final - cfg.model.dropout) * step / cfg.max_steps)
        s.last_loss, s.done = _step(s, windows[0], step), step + 1
        row: dict[str, Any] = {"step": s.done, "loss": s.last_loss, "lr": lr, "grad_norm": s.grad_norm}
        if s.done % cfg.eval_interval == 0 or s.done == cfg.max_steps:
            row["val_loss_estimate"] = _estimate_val(s, windows[1])
        # elapsed is kept in the checkpoint should a budget be set on resume; a stop any rank noted stops them all
        s.elapsed, signum = agreed(started, stop.signum, s.world, s.device)
        s.out_of_time = cfg.max_seconds is not None and s.elapsed >= cfg.max_seconds
        s.stopped_early = s.stopped_early or s.out_of_time
        if s.leader:
            _append_metrics(metrics_path, row)
            _log_progress(s, row, logged, log)
            due = s.done % cfg.checkpoint_interval == 0 or s.done == cfg.max_steps or s.stopped_early
            if due and s.samples:
                s.samples(s.done, s.model)
            if due or signum is not None:
                _save(s)
        if signum is not None:  # Ctrl-C or SIGTERM during the step (interrupts.py): saved above, now stop
            if s.world > 1:
                torch.distributed.barrier()  # no rank ends before rank 0's checkpoint is written
            if s.leader:
                log.info("train: stopping at step %d on %s: checkpoint saved, the same command resumes from it",
                         s.done, signal.Signals(signum).name)
            stop.resend(signum)
        if s.stopped_early:
            reason = f"{cfg.max_seconds:.0f} s budget spent" if s.out_of_time else \
                f"no val improvement in {s.stale} evaluations"
            log.info("train: early stop at step %d (%s)", s.done, reason)
            return


def _save(s: Session) -> None:
    save_checkpoint(s.checkpoints, s.done, s.model, s.optimizer,
                    {"best_val": s.best_val, "stale": s.stale, "schedule": schedule(s.cfg), "elapsed": s.elapsed})
    (s.checkpoints / DIVERGED).unlink(missing_ok=True)  # a checkpoint under the new knobs: resumed


def _step(s: Session, windows: Windows, step: int) -> float:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the step's loss."""
    cfg, step_loss = s.cfg, 0.0
    for micro in range(cfg.grad_accum_steps):
        x, y = windows.batch(cfg.batch_size, TRAIN_STREAM, step, micro, part=(s.rank, s.world))
        sync = s.world == 1 or micro == cfg.grad_accum_steps - 1
        with (contextlib.nullcontext() if sync else s.runner.no_sync()), autocast(s.device, s.dtype):
            _, loss = s.runner(x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True))
            loss = loss / cfg.grad_accum_steps
        loss.backward()
        step_loss += loss.item()
    if not math.isfinite(step_loss):
        _diverged(s, step, f"loss became {step_loss}")
    # The norm is computed (and clipped when grad_clip > 0) every step: a finite loss with a non-finite gradient
    # would otherwise write NaN weights, and the next checkpoint with them.
    norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    s.grad_norm = norm.item()
    if not math.isfinite(s.grad_norm):
        _diverged(s, step, f"the gradient norm became {s.grad_norm} (loss {step_loss:.4f})")
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return step_loss


def _diverged(s: Session, step: int, what: str) -> None:
    """Record the divergence beside the checkpoints (so a re-run with new knobs resumes) and stop."""
    try:
        good = json.loads((s.checkpoints / "latest.json").read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError):
        good = None
    if s.leader:
        write_json(s.checkpoints / DIVERGED, {"step": step + 1, "what": what, "schedule": schedule(s.cfg)})
    where = f"the last good checkpoint, {s.checkpoints / good}" if good else "the start (no checkpoint yet)"
    raise TrainingDiverged(
        f"{what} at step {step + 1}. Lower train.learning_rate, raise train.warmup_steps or set train.grad_clip, then "
        f"re-run: it resumes from {where}."
    )


def _estimate_val(s: Session, windows: Windows) -> float:
    """The loop's validation estimate (global batch: the same windows at any world size); drives early stopping."""
    val = mean_loss(s.model, windows, s.cfg.eval_batches, s.cfg.batch_size * s.world, s.device, s.dtype)
    s.best_val, s.stale = (val, 0) if val < s.best_val else (s.best_val, s.stale + 1)
    if s.cfg.early_stopping_patience and s.stale >= s.cfg.early_stopping_patience:
        s.stopped_early = True
    return val


def _log_progress(s: Session, row: dict[str, Any], logged: list, log: logging.Logger) -> None:
    cfg, done = s.cfg, s.done
    if not (done % cfg.log_interval == 0 or "val_loss_estimate" in row or done == cfg.max_steps):
        return
    now = time.perf_counter()
    rate = (done - logged[0]) * s.tokens_per_step / max(now - logged[1], 1e-9)
    logged[:] = [done, now]
    eta = (cfg.max_steps - done) * s.tokens_per_step / max(rate, 1e-9)
    if cfg.max_seconds is not None:
        eta = min(eta, max(cfg.max_seconds - s.elapsed, 0.0))
    val = f" val~{row['val_loss_estimate']:.4f}" if "val_loss_estimate" in row else ""
    log.info("train: step %d/%d loss %.4f%s lr %.2e %.0f tok/s eta %.0fs", done, cfg.max_steps, row["loss"], val,
             row["lr"], rate, eta)
    if s.progress:
        s.progress.update(done, f"loss {row['loss']:.4f}{val}, {rate:.0f} tok/s, eta {eta:.0f} s")


def _summary(s: Session, seconds: float, tracker, emissions) -> dict[str, Any]:
    return {
        "model_config": s.mcfg.model_dump(),
        "parameters": s.model.num_params(non_embedding=False),
        "non_embedding_parameters": s.model.num_params(),
        "device": str(s.device),
        "dtype": "bfloat16" if s.dtype else "float32",
        "world_size": s.world,
        "steps": s.done,
        "resumed_from": s.start,
        "final_train_loss": s.last_loss,
        "best_val_loss_estimate": s.best_val,
        "early_stopped": s.stopped_early,
        "tokens_per_s": (s.done - s.start) * s.tokens_per_step / max(seconds, 1e-9),
        "train_seconds": seconds,
        "energy_kwh": tracker.final_emissions_data.energy_consumed if tracker else None,
        "emissions_kg_co2eq": emissions,
        "profile": s.profile,
    }
