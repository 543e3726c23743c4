"""evaluate: validation loss, perplexity and bits per byte, plus sample generations from fixed prompts.

Bits per byte is the number to compare across tokenizers: loss per token depends on how much text a token covers, so
a bigger vocabulary "wins" on loss for free. Dividing the total nats by ln 2 and by the UTF-8 bytes the tokens stand
for removes that; here the tokens-per-byte ratio of the whole validation split converts the mean per-token loss.

Windows are consecutive, non-overlapping slices of the validation stream, so the figure is deterministic and covers
the held-out text evenly (up to `max_batches`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import load_model
from model.generation import generate_text
from model.tokenizer import load_tokenizer
from pipeline_config.schema import EvaluateConfig
from tasks.corpus.reader import load_split
from tasks.stage import Artifact, Stage, describe_files, prefect_task, write_json
from tasks.train import MODEL_CONFIG, WEIGHTS

SAMPLES = "samples.json"
METRICS = "metrics.json"


@torch.no_grad()
def validation_loss(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int) -> tuple[float, int]:
    """Mean per-token cross-entropy (nats) over consecutive windows, and the number of tokens scored."""
    device = next(model.parameters()).device
    n_windows = min((tokens.size - 1) // block_size, batch_size * max_batches)
    if n_windows == 0:
        block_size = tokens.size - 1
        n_windows = 1
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        rows = np.arange(start, min(start + batch_size, n_windows))[:, None] * block_size + np.arange(block_size + 1)
        window = torch.from_numpy(tokens[rows].astype(np.int64)).to(device)
        _, loss = model(window[:, :-1], window[:, 1:])
        scored = window[:, 1:].numel()
        total += loss.item() * scored
        count += scored
    return total / count, count


def generate_samples(model: torch.nn.Module, tokenizer: Any, cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """Each prompt continued greedily and sampled at `cfg.temperature`, through model/generation.py."""
    samples = []
    for prompt in cfg.prompts:
        for mode, temperature in (("greedy", 0.0), ("sampled", cfg.temperature)):
            [text] = generate_text(model, tokenizer, [prompt], cfg.max_new_tokens, temperature=temperature,
                                   top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed)
            samples.append({"prompt": prompt, "mode": mode, "temperature": temperature, "text": text})
    return samples


def evaluate(cfg: EvaluateConfig, out_dir: Path, log: logging.Logger, *,
             tokenizer: Artifact, shard: Artifact, train: Artifact) -> dict[str, Any]:
    model = load_model(train.path / WEIGHTS, train.path / MODEL_CONFIG)
    text_tokenizer = load_tokenizer(tokenizer.path)
    val = load_split(shard, "val")
    block_size = train.manifest["model_config"]["block_size"]
    loss, scored = validation_loss(model, val, block_size, cfg.batch_size, cfg.max_batches)
    totals = shard.manifest["totals"]["val"]
    tokens_per_byte = totals["tokens"] / max(totals["text_bytes"], 1)
    metrics = {
        "val_loss": loss,
        "val_perplexity": math.exp(min(loss, 700)),
        "val_bpb": loss / math.log(2) * tokens_per_byte,
        "val_tokens_scored": scored,
    }
    samples = generate_samples(model, text_tokenizer, cfg)
    write_json(out_dir / METRICS, metrics)
    write_json(out_dir / SAMPLES, samples)
    log.info(
        "evaluate: val loss %.4f, perplexity %.2f, %.4f bits/byte over %d tokens",
        metrics["val_loss"], metrics["val_perplexity"], metrics["val_bpb"], scored,
    )
    log.info("evaluate: sample (%s) %r", samples[0]["mode"], samples[0]["text"][:200])
    return {"metrics": metrics, "samples": samples, "files": describe_files(out_dir, [METRICS, SAMPLES])}


STAGE = Stage(name="evaluate", run=evaluate, inputs=("tokenizer", "shard", "train"))
evaluate_task = prefect_task(STAGE)
