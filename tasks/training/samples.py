"""What the model writes at each checkpoint, so a reader sees the writing improve (Alexandria's "evolution of
language modeling"): every checkpoint continues the sample prompts (evaluate's, unless `train.samples.prompts` names
others) greedily and at `train.samples.temperature`, appended to the train artifact's `samples.jsonl`, one row per
(step, prompt, mode). Register logs them as an MLflow table with the step as a column.

Sampling must not disturb training: it runs with the torch RNG forked (restored afterwards, so a run that samples
trains bit for bit like one that does not, and a resumed run like an uninterrupted one), in eval mode, without
gradients. Rows are written before the checkpoint they belong to; on resume, rows after the checkpoint resumed from
are dropped and written again, as the loop does with its curve.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline_config.evaluate import EvaluateConfig
from pipeline_config.train import CheckpointSamplesConfig
from tasks.stage import read_jsonl, write_atomic
from tasks.training.files import SAMPLES


class CheckpointSamples:
    """Writes the samples of one checkpoint step: `samples(step, model)`."""

    def __init__(self, cfg: CheckpointSamplesConfig, tokenizer_dir: Path, path: Path, resumed_from: int, seed: int,
                 log: logging.Logger):
        from model.tokenizer import load_tokenizer

        self.cfg, self.path, self.seed, self.log = cfg, Path(path), seed, log
        self.prompts = list(cfg.prompts if cfg.prompts is not None else EvaluateConfig().prompts)
        self.tokenizer = load_tokenizer(Path(tokenizer_dir))
        kept = [row for row in read_jsonl(self.path) if row.get("step", 0) <= resumed_from] if resumed_from else []
        write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def rows(self, step: int, model: torch.nn.Module) -> list[dict[str, Any]]:
        from model.generation import generate_text

        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
                return [{"step": step, "prompt": prompt, "mode": mode, "temperature": temperature, "text": text}
                        for mode, temperature in (("greedy", 0.0), ("sampled", self.cfg.temperature))
                        for prompt, text in zip(self.prompts, generate_text(
                            model, self.tokenizer, self.prompts, self.cfg.max_new_tokens, temperature=temperature,
                            top_k=None, top_p=None, seed=self.seed))]
        finally:
            model.train(was_training)

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        rows = self.rows(step, model)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in rows))
        self.log.info("train: at step %d the model writes %r", step, rows[0]["text"][:120])


def checkpoint_samples(cfg: CheckpointSamplesConfig, tokenizer_dir: Path | None, out_dir: Path, resumed_from: int,
                       seed: int, log: logging.Logger) -> CheckpointSamples | None:
    """The sampler for a training run, or None when disabled or when there is no tokenizer to read (torchrun)."""
    if not cfg.enabled or tokenizer_dir is None:
        return None
    return CheckpointSamples(cfg, tokenizer_dir, Path(out_dir) / SAMPLES, resumed_from, seed, log)
