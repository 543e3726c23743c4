"""train: fit the configured architecture on the train shards; the artifact is the weights and their config.

The engine lives in `tasks/training/` (the loop, checkpoints, devices and dtype, distributed launch); this module is
the stage: read the shards, train (resuming from the checkpoints in its own directory), write the final weights.
Under `torchrun` the same function runs on every rank (see `tasks/training/distributed.py`):

    torchrun --nproc_per_node N -m tasks.train CONFIG.json SHARD_DIR OUT_DIR [TOKENIZER_DIR]

`train.init_from` starts from a registered model's weights instead of random ones (`tasks/training/init.py`), and
`train.lora` trains adapters on them; the artifact is plain merged weights either way. The stage's cache key follows
the *resolved* parent (its version and weights digest, `tasks/lineage/registry.py`), not the word `champion`, so a
run after the champion moved trains again.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline_config.train import TrainConfig
from tasks.corpus.reader import split_tokens
from tasks.lineage.registry import parent_identity, train_input
from tasks.stage import Artifact, Stage, atomic_path, describe_files, key_upstream, prefect_task, write_atomic, \
    write_json
from tasks.training.files import METRICS, PROFILE, RESUMABLE_KNOBS, SAMPLES, WEIGHTS  # noqa: F401  (read from here)

MODEL_CONFIG = "model_config.json"
UPSTREAM = "upstream.json"  # the inputs' fingerprints, written at the start: the CLI finds a stopped run's tokenizer


def train_stage(cfg: TrainConfig, out_dir: Path, log: logging.Logger, *, tokenizer: Artifact | None = None,
                shard: Artifact) -> dict[str, Any]:
    """The tokenizer is checked against init_from's parent and used to write the checkpoint samples
    (`train.samples`); without it there are none."""
    from safetensors.torch import save_model

    from model.lora import merge_lora
    from tasks.training.init import starting_point
    from tasks.training.loop import model_config, train

    vocab_size = shard.manifest["vocab_size"]
    upstream = key_upstream({"tokenizer": tokenizer, "shard": shard})
    this_input = train_input(cfg.model_dump(mode="json"), upstream)
    mcfg = model_config(cfg, vocab_size)
    start = starting_point(cfg, mcfg, tokenizer, out_dir, log, this_input)
    if start.reuse is not None:
        return _reused(start, out_dir)
    leader = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes the artifact
    if leader:  # before the first checkpoint, so `scriptorium generate` can read one
        write_json(out_dir / MODEL_CONFIG, mcfg.model_dump())
        write_json(out_dir / UPSTREAM, upstream)
    summary, model = train(cfg, split_tokens(shard, "train"), split_tokens(shard, "val"), vocab_size, out_dir, log,
                           init=start.init, tokenizer_dir=tokenizer.path if tokenizer is not None else None)
    summary["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.lora is not None:
        model = merge_lora(model)  # plain weights, the same keys as any model: evaluate/export/register unchanged
    if not leader:
        return summary
    with atomic_path(out_dir / WEIGHTS) as weights:
        save_model(model, str(weights))
    samples = [SAMPLES] if (out_dir / SAMPLES).is_file() else []
    # The weights and their config are what later stages read, so they alone are `files` (the fingerprint): the
    # profile and the checkpoint samples are reports, and a champion handed on unchanged (`_reused`) has none.
    return {**summary, **start.record(), "files": describe_files(out_dir, [WEIGHTS, MODEL_CONFIG]),
            "reports": describe_files(out_dir, [PROFILE, *samples])}


def _reused(start: Any, out_dir: Path) -> dict[str, Any]:
    """The parent's weights and model config as this stage's output (the parent already is this run's result)."""
    import json

    for source, name in ((start.reuse.weights, WEIGHTS), (start.reuse.model_config, MODEL_CONFIG)):
        write_atomic(out_dir / name, Path(source).read_bytes())
    model_cfg = json.loads((out_dir / MODEL_CONFIG).read_text(encoding="utf-8"))
    return {"model_config": model_cfg, "reused": start.parent.identity(), **start.record(),
            "files": describe_files(out_dir, [WEIGHTS, MODEL_CONFIG])}


def resolved_parent(cfg: TrainConfig) -> dict[str, Any] | None:
    """The cache key's view of `init_from`: the resolved version and its digests (None for scratch)."""
    return parent_identity(cfg.registry, cfg.init_from)


# A re-run with another learning rate or time budget shares the work directory, so it can resume (see the loop).
STAGE = Stage(name="train", run=train_stage, inputs=("tokenizer", "shard"), workdir_ignores=RESUMABLE_KNOBS,
              external=resolved_parent)
train_task = prefect_task(STAGE)

if __name__ == "__main__":
    from tasks.training.distributed import torchrun_main

    torchrun_main(sys.argv[1:])
