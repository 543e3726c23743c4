"""train: fit the configured architecture on the train shards; the artifact is the weights and their config.

The engine lives in `tasks/training/` (the loop, checkpoints, devices and dtype, distributed launch); this module is
the stage: read the shards, train (resuming from the checkpoints in its own directory), write the final weights.
Under `torchrun` the same function runs on every rank (see `tasks/training/distributed.py`):

    torchrun --nproc_per_node N -m tasks.train CONFIG.json SHARD_DIR OUT_DIR [TOKENIZER_DIR]
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline_config.schema import TrainConfig
from tasks.corpus.reader import split_tokens
from tasks.stage import Artifact, Stage, atomic_path, describe_files, prefect_task, write_json
from tasks.training.checkpoints import WEIGHTS
from tasks.training.loop import METRICS, RESUMABLE_KNOBS, TrainingDiverged, train  # noqa: F401  (callers import these)
from tasks.training.samples import SAMPLES

MODEL_CONFIG = "model_config.json"


def train_stage(cfg: TrainConfig, out_dir: Path, log: logging.Logger, *, shard: Artifact,
                tokenizer: Artifact | None = None) -> dict[str, Any]:
    """The tokenizer is read only to write the checkpoint samples (`train.samples`); without it there are none."""
    from safetensors.torch import save_model

    summary, model = train(
        cfg, split_tokens(shard, "train"), split_tokens(shard, "val"), shard.manifest["vocab_size"], out_dir, log,
        tokenizer_dir=tokenizer.path if tokenizer is not None else None,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes the artifact
        return summary
    with atomic_path(out_dir / WEIGHTS) as weights:
        save_model(model, str(weights))
    write_json(out_dir / MODEL_CONFIG, summary["model_config"])
    samples = [SAMPLES] if (out_dir / SAMPLES).is_file() else []
    return {**summary, "files": describe_files(out_dir, [WEIGHTS, MODEL_CONFIG, *samples])}


# A re-run with another learning rate or time budget shares the work directory, so it can resume (see the loop).
STAGE = Stage(name="train", run=train_stage, inputs=("tokenizer", "shard"), workdir_ignores=RESUMABLE_KNOBS)
train_task = prefect_task(STAGE)

if __name__ == "__main__":
    from tasks.training.distributed import torchrun_main

    torchrun_main(sys.argv[1:])
