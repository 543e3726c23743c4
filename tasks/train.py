"""train: fit the configured architecture on the train shards, with checkpoints that resume exactly.

Exact resumption is by construction rather than by bookkeeping: the batch for (step, micro-step) is drawn from a numpy
generator seeded with (seed, step, micro-step), so "where we were in the data" is just the step number, and the
torch RNG state (dropout) is saved with the weights and optimizer moments. A run killed at any point and restarted
therefore ends with the same weights as one that was never interrupted (bit-for-bit in deterministic mode).

A checkpoint is a directory (model and optimizer tensors as safetensors, counters as JSON) written under a temporary
name and renamed into place, then `latest.json` is swapped atomically to point at it; a kill mid-write leaves the
previous checkpoint untouched.

Under `torchrun` (WORLD_SIZE > 1) every rank draws the same global batch and trains on its own slice of it, so DDP's
gradient averaging gives exactly the single-process update for the same global batch.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from model import ModelConfig, build_model
from pipeline_config.schema import TrainConfig
from tasks.artifacts import Artifact, describe_files, load_artifact, write_atomic, write_json
from tasks.shard import load_split
from tasks.stage import Stage, prefect_task

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
METRICS = "metrics.jsonl"
KEEP_CHECKPOINTS = 2
TRAIN_STREAM, EVAL_STREAM = 0, 1  # first element of every window key: training and evaluation never share draws


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


# ---------------------------------------------------------------------------------------------------------- devices
def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device is 'mps' but MPS is not available; use 'auto' or 'cpu'")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per torchrun process
        torch.cuda.set_device(device)
        return device
    if name != "auto":
        return torch.device(name)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_faster(size: int = 1024, repeats: int = 3) -> bool:
    """Time one matmul in each dtype. The avx512_bf16 flag alone is not enough: on some hosts oneDNN's bf16 path
    runs at half the fp32 rate (seen on these machines: 157 vs 327 GFLOP/s), so autocast would only slow training."""
    if not _cpu_has_bf16():
        return False
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up: first call pays oneDNN's kernel selection
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        timings[dtype] = time.perf_counter() - started
    return timings[torch.bfloat16] < timings[torch.float32]


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. 'auto' picks bf16 on CUDA when supported, and on CPU only where it measures faster."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_bf16_is_faster():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------------------------- data
class Windows:
    """Random (x, y) windows of a flat token array; the draw for a given key is always the same."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int):
        if tokens.size <= block_size + 1:
            raise ValueError(
                f"only {tokens.size} tokens for a context of {block_size}: lower train.model.block_size or add data"
            )
        self.tokens, self.block_size, self.seed = tokens, block_size, seed
        self.offsets = np.arange(block_size + 1)

    def batch(self, batch_size: int, *key: int, part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch for `key`; `part=(rank, world)` returns this rank's slice of it."""
        rng = np.random.default_rng([self.seed, *key])
        starts = rng.integers(0, self.tokens.size - self.block_size - 1, size=batch_size * part[1])
        starts = starts[part[0] * batch_size : (part[0] + 1) * batch_size]
        window = torch.from_numpy(self.tokens[starts[:, None] + self.offsets].astype(np.int64))
        return window[:, :-1], window[:, 1:]


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


# --------------------------------------------------------------------------------------------------------- schedule
def learning_rate(cfg: TrainConfig, step: int, elapsed: float = 0.0) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak at `max_steps`, or at `max_seconds` of
    training (`elapsed`) if that comes first, so a time-budgeted run still ends on a decayed rate."""
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


# ------------------------------------------------------------------------------------------------------ checkpoints
def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors = {
        f"optim.{index}.{name}": value.detach().cpu().contiguous()
        for index, slot in state["state"].items()
        for name, value in slot.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, {"param_groups": state["param_groups"]}


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
    from safetensors.torch import save_file, save_model

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS))  # handles tied embeddings, which save_file refuses
    tensors, groups = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    write_json(tmp / "trainer.json", {"step": step, **groups, **extra})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json(directory / "latest.json", {"step": step, "path": final.name})
    for old in sorted(directory.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, Any] | None:
    """Restore the newest checkpoint into `model` and `optimizer`; None when there is none."""
    from safetensors.torch import load_file, load_model

    pointer = directory / "latest.json"
    if not pointer.is_file():
        return None
    path = directory / json.loads(pointer.read_text())["path"]
    meta = json.loads((path / "trainer.json").read_text())
    load_model(model, str(path / WEIGHTS), device=str(device))
    tensors = load_file(str(path / "optimizer.safetensors"))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


# ------------------------------------------------------------------------------------------------------------- loop
def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(**cfg.model.model_dump(), vocab_size=vocab_size)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _agreed_elapsed(started: float, world: int, device: torch.device) -> float:
    """Seconds since `started` by rank 0's clock, so every rank takes the same time-based decisions."""
    elapsed = time.perf_counter() - started
    if world > 1:
        value = torch.tensor([elapsed], dtype=torch.float64, device=device)  # NCCL only moves device tensors
        torch.distributed.broadcast(value, src=0)
        elapsed = float(value.item())
    return elapsed


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def _emissions_tracker(cfg: TrainConfig, out_dir: Path):
    if not cfg.track_emissions:
        return None
    from codecarbon import OfflineEmissionsTracker
    from codecarbon.output_methods.base_output import OutputMethod

    # Offline and with an explicit country: the plain tracker would look the location up online, or assume Canada.
    return OfflineEmissionsTracker(
        country_iso_code=cfg.country_iso_code, output_dir=str(out_dir), log_level="error",
        output_methods=[OutputMethod.CSV],
    )


def train(
    cfg: TrainConfig, tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int, out_dir: Path, log: logging.Logger
) -> tuple[dict[str, Any], nn.Module]:
    """Train to `cfg.max_steps` (resuming from `out_dir/checkpoints`); returns the summary and the model."""
    rank, world = _distributed()
    leader = rank == 0
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed + rank)
    device = pick_device(cfg.device)
    dtype = autocast_dtype(cfg.dtype, device)
    mcfg = model_config(cfg, vocab_size)
    model = build_model(mcfg).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    checkpoints = out_dir / CHECKPOINTS
    meta = load_checkpoint(checkpoints, model, optimizer, device)
    start = meta["step"] if meta else 0
    best_val, stale = (meta.get("best_val", math.inf), meta.get("stale", 0)) if meta else (math.inf, 0)
    if leader:
        log.info(
            "train: %s, %.2fM parameters (%.2fM non-embedding), device %s, %s, %s",
            mcfg.arch, model.num_params(non_embedding=False) / 1e6, model.num_params() / 1e6, device,
            "bf16 autocast" if dtype else "fp32", f"resuming at step {start}" if start else "from scratch",
        )
    runner: nn.Module = model
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        runner = torch.compile(runner)  # after DDP, so the compiler sees DDP's bucket boundaries
    train_windows = Windows(tokens, mcfg.block_size, cfg.seed)
    val_windows = Windows(val_tokens, mcfg.block_size, cfg.seed)
    metrics_path = out_dir / METRICS
    if leader and metrics_path.is_file():  # rows a killed run logged after its last checkpoint are re-done now
        rows = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        write_atomic(metrics_path, "".join(row + "\n" for row in rows))
    tracker = _emissions_tracker(cfg, out_dir) if leader else None
    if tracker:
        tracker.start()
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * world * mcfg.block_size
    started, done, last_loss, stopped_early = time.perf_counter(), start, math.nan, False
    logged_step, logged_at = start, started
    elapsed = 0.0  # by rank 0's clock, read once per step (a broadcast under DDP) when a time budget is set
    model.train()
    try:
        for step in range(start, cfg.max_steps):
            lr = learning_rate(cfg, step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.dropout_final is not None:
                set_dropout(model, cfg.model.dropout + (cfg.dropout_final - cfg.model.dropout) * step / cfg.max_steps)
            step_loss = 0.0
            for micro in range(cfg.grad_accum_steps):
                x, y = train_windows.batch(cfg.batch_size, TRAIN_STREAM, step, micro, part=(rank, world))
                sync = world == 1 or micro == cfg.grad_accum_steps - 1
                with (contextlib.nullcontext() if sync else runner.no_sync()), autocast(device, dtype):
                    _, loss = runner(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                    loss = loss / cfg.grad_accum_steps
                loss.backward()
                step_loss += loss.item()
            if not math.isfinite(step_loss):
                good = json.loads((checkpoints / "latest.json").read_text())["path"] if (checkpoints / "latest.json").is_file() else "none"
                raise TrainingDiverged(
                    f"loss became {step_loss} at step {step + 1}; last good checkpoint: {checkpoints / good}. "
                    "Lower train.learning_rate or raise train.warmup_steps, then re-run (it resumes from there)."
                )
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss, done = step_loss, step + 1
            row: dict[str, Any] = {"step": done, "loss": step_loss, "lr": lr}
            if done % cfg.eval_interval == 0 or done == cfg.max_steps:
                val = mean_loss(model, val_windows, cfg.eval_batches, cfg.batch_size * world, device, dtype)  # global batch: same windows at any world size
                row["val_loss"] = val
                best_val, stale = (val, 0) if val < best_val else (best_val, stale + 1)
                if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
                    stopped_early = True
            if cfg.max_seconds is not None:
                elapsed = _agreed_elapsed(started, world, device)
            out_of_time = cfg.max_seconds is not None and elapsed >= cfg.max_seconds
            stopped_early = stopped_early or out_of_time
            if leader:
                _append_metrics(metrics_path, row)
                if done % cfg.log_interval == 0 or "val_loss" in row or done == cfg.max_steps:
                    now = time.perf_counter()
                    rate = (done - logged_step) * tokens_per_step / max(now - logged_at, 1e-9)  # recent, not average
                    logged_step, logged_at = done, now
                    eta = (cfg.max_steps - done) * tokens_per_step / max(rate, 1e-9)
                    log.info(
                        "train: step %d/%d loss %.4f%s lr %.2e %.0f tok/s eta %.0fs",
                        done, cfg.max_steps, step_loss, f" val {row['val_loss']:.4f}" if "val_loss" in row else "",
                        lr, rate, eta,
                    )
                if done % cfg.checkpoint_interval == 0 or done == cfg.max_steps or stopped_early:
                    save_checkpoint(checkpoints, done, model, optimizer, {"best_val": best_val, "stale": stale})
            if stopped_early:
                reason = f"{cfg.max_seconds:.0f} s budget spent" if out_of_time else f"no val improvement in {stale} evaluations"
                log.info("train: early stop at step %d (%s)", done, reason)
                break
    finally:
        emissions = tracker.stop() if tracker else None
    elapsed = time.perf_counter() - started
    energy = tracker.final_emissions_data.energy_consumed if tracker else None
    return {
        "model_config": asdict(mcfg),
        "parameters": model.num_params(non_embedding=False),
        "non_embedding_parameters": model.num_params(),
        "device": str(device),
        "dtype": "bfloat16" if dtype else "float32",
        "world_size": world,
        "steps": done,
        "resumed_from": start,
        "final_train_loss": last_loss,
        "best_val_loss": best_val,
        "early_stopped": stopped_early,
        "tokens_per_s": (done - start) * tokens_per_step / max(elapsed, 1e-9),
        "train_seconds": elapsed,
        "energy_kwh": energy,
        "emissions_kg_co2eq": emissions,
    }, model


def run_stage(cfg: TrainConfig, upstream: dict[str, Artifact | None], out_dir: Path, log: logging.Logger) -> dict[str, Any]:
    from safetensors.torch import save_model

    shards = upstream["shards"]
    summary, model = train(
        cfg, load_split(shards, "train"), load_split(shards, "val"), shards.manifest["vocab_size"], out_dir, log
    )
    save_model(model, str(out_dir / WEIGHTS))
    write_json(out_dir / MODEL_CONFIG, summary["model_config"])
    return {**summary, "files": describe_files(out_dir, [WEIGHTS, MODEL_CONFIG])}


def load_trained(artifact: Artifact, device: str | torch.device = "cpu") -> nn.Module:
    from safetensors.torch import load_model

    model = build_model(ModelConfig(**json.loads((artifact.path / MODEL_CONFIG).read_text())))
    load_model(model, str(artifact.path / WEIGHTS), device=str(device))
    return model.to(device).eval()


STAGE = Stage(name="train", run=run_stage, code=("tasks/train.py", "tasks/shard.py", "model"))
train_task = prefect_task(STAGE)


def _torchrun_main(argv: list[str]) -> None:
    """`torchrun --nproc_per_node N -m tasks.train CONFIG.json SHARDS_DIR OUT_DIR`: the same loop under DDP."""
    config_file, shards_dir, out_dir = argv
    cfg = TrainConfig.model_validate_json(Path(config_file).read_text())
    shards = load_artifact(Path(shards_dir), "shard")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary, model = train(
        cfg, load_split(shards, "train"), load_split(shards, "val"), shards.manifest["vocab_size"], Path(out_dir),
        logging.getLogger("scriptorium.train"),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        from safetensors.torch import save_model

        save_model(model, str(Path(out_dir) / WEIGHTS))
        write_json(Path(out_dir) / "summary.json", summary)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _torchrun_main(sys.argv[1:])
