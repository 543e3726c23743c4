"""Data-parallel training under `torchrun`: process-group setup, a clock every rank agrees on, and the launch entry.

Every rank draws the same global batch and trains on its own slice of it (`Windows.batch(part=...)`), so DDP's
gradient averaging gives exactly the single-process update for the same global batch. Time-based decisions (the
`max_seconds` budget, the schedule it drives) use rank 0's clock, and a Ctrl-C or SIGTERM any rank noted during a step
(torchrun sends it on to every rank) stops all of them after that step, checkpointed: both agreed once per step, so
ranks never disagree on when to stop.

    torchrun --nproc_per_node N -m tasks.train CONFIG.json SHARD_DIR OUT_DIR [TOKENIZER_DIR]

writes the same artifact the train stage writes (weights, model config, metrics, `manifest.json`), so evaluate and
register can use it.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun set up (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def agreed(started: float, signum: int | None, world: int, device: torch.device) -> tuple[float, int | None]:
    """(seconds since `started` by rank 0's clock, the stop signal any rank noted or None), the same on every rank,
    so all take the same time-based decisions and stop at the same step: one collective a step."""
    elapsed = time.perf_counter() - started
    if world > 1:
        mine = elapsed if torch.distributed.get_rank() == 0 else 0.0  # the maximum is rank 0's: the others send 0
        value = torch.tensor([mine, float(signum or 0)], dtype=torch.float64, device=device)  # NCCL: device tensors
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        elapsed, signum = float(value[0].item()), int(value[1].item()) or None
    return elapsed, signum


def torchrun_main(argv: list[str]) -> None:
    """`CONFIG.json SHARD_DIR OUT_DIR [TOKENIZER_DIR]`: the train stage's function on every rank; rank 0 writes the
    artifact (with the checkpoint samples when the tokenizer is given)."""
    from pipeline_config.train import TrainConfig
    from tasks.stage import key_upstream, load_artifact, write_manifest
    from tasks.train import train_stage

    config_file, shard_dir, out_dir, *tokenizer_dir = argv
    cfg = TrainConfig.model_validate_json(Path(config_file).read_text())
    shard = load_artifact(Path(shard_dir), "shard")
    tokenizer = load_artifact(Path(tokenizer_dir[0]), "tokenizer") if tokenizer_dir else None
    if shard is None:
        raise SystemExit(f"{shard_dir} is not a finished shard artifact (no manifest.json)")
    # force: importing Prefect (tasks.stage) gave the root logger its handler at WARNING, which hid every line
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    out = Path(out_dir)
    fields = train_stage(cfg, out, logging.getLogger("scriptorium.train"), shard=shard, tokenizer=tokenizer)
    if int(os.environ.get("RANK", "0")) == 0:
        write_manifest(out, "train", {"config": cfg.model_dump(mode="json"),
                                      "upstream": key_upstream({"shard": shard, "tokenizer": tokenizer}), **fields})
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
