"""evaluate: validation loss, perplexity and bits per byte, plus sample generations from fixed prompts.

Bits per byte is the number to compare across tokenizers: loss per token depends on how much text a token covers, so
a bigger vocabulary "wins" on loss for free. Dividing the total nats by ln 2 and by the UTF-8 bytes the tokens stand
for removes that; here the tokens-per-byte ratio of the whole validation split converts the mean per-token loss.

Windows are consecutive, non-overlapping slices of each validation shard, read one shard at a time, so the figure is
deterministic, covers the held-out text evenly (up to `max_batches`) and needs one shard in memory.

Each language of the validation split is scored on its own (the shard stage writes one validation stream per
language): `val_bpb.<lang>`, `val_perplexity.<lang>`, `val_loss.<lang>`, because a multilingual model's average hides
a language that costs twice as many bits. The totals (`val_bpb`, `val_loss`, `val_perplexity`, the metrics of
record) weight each language by its share of the held-out text: its mean loss per token is taken to stand for all of
its validation tokens, so scoring more windows of one language does not tilt the total.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.tokenizer import load_tokenizer
from pipeline_config.evaluate import EvaluateConfig
from tasks.corpus.reader import ShardTokens, split_languages, split_tokens
from tasks.stage import Artifact, Stage, atomic_path, describe_files, prefect_task, write_json
from tasks.train import MODEL_CONFIG, WEIGHTS

if TYPE_CHECKING:  # torch loads when the stage runs, not when a cached run imports the pipeline
    import torch

SAMPLES = "samples.json"
METRICS = "metrics.json"
ATTENTION_MAP = "attention.png"  # the last layer's heads on the first prompt (attention architectures only)


def _consecutive_windows(tokens: ShardTokens, block_size: int, limit: int) -> list[tuple[int, int, int]]:
    """(shard, start, length) of up to `limit` consecutive windows, shard by shard; a split too small for one full
    window gets one shorter window over its largest shard."""
    windows = []
    for index, size in enumerate(tokens.sizes.tolist()):
        starts = range(0, max(size - 1, 0) // block_size * block_size, block_size)
        windows.extend((index, start, block_size + 1) for start in starts[: limit - len(windows)])
    if not windows:
        index = int(np.argmax(tokens.sizes))
        windows = [(index, 0, int(tokens.sizes[index]))]
    return windows


def validation_loss(model: torch.nn.Module, tokens: np.ndarray | ShardTokens, block_size: int, batch_size: int,
                    max_batches: int) -> tuple[float, int]:
    """Mean per-token cross-entropy (nats) over consecutive windows, and the number of tokens scored."""
    import torch

    device = next(model.parameters()).device
    tokens = ShardTokens.of(tokens)
    windows = _consecutive_windows(tokens, block_size, batch_size * max_batches)
    total, count, loaded = 0.0, 0, (-1, None)
    for first in range(0, len(windows), batch_size):
        rows = []
        for index, start, length in windows[first : first + batch_size]:
            if loaded[0] != index:
                loaded = (index, tokens.read(index))  # one shard in memory at a time
            rows.append(loaded[1][start : start + length].astype(np.int64))
        window = torch.from_numpy(np.stack(rows)).to(device)
        with torch.no_grad():
            _, loss = model(window[:, :-1], window[:, 1:])
        scored = window[:, 1:].numel()
        total += loss.item() * scored
        count += scored
    return total / count, count


def language_metrics(losses: dict[str | None, tuple[float, int]], totals: dict[str, Any]) -> dict[str, float]:
    """The totals and, per language, loss, perplexity and bits per byte; `losses` maps a language (None: shards
    written without one) to (mean loss, tokens scored), `totals` is the shard manifest's validation totals."""
    metrics: dict[str, float] = {}
    nats = tokens = text_bytes = scored = 0.0
    for lang, (loss, n_scored) in sorted(losses.items(), key=lambda item: item[0] or ""):
        row = totals.get("languages", {}).get(lang, totals) if lang else totals
        nats, tokens = nats + loss * row["tokens"], tokens + row["tokens"]
        text_bytes, scored = text_bytes + row["text_bytes"], scored + n_scored
        if lang:
            metrics.update({f"val_loss.{lang}": loss, f"val_perplexity.{lang}": math.exp(min(loss, 700)),
                            f"val_bpb.{lang}": loss / math.log(2) * row["tokens"] / max(row["text_bytes"], 1),
                            f"val_tokens_scored.{lang}": n_scored})
    loss = nats / max(tokens, 1)
    metrics.update({"val_loss": loss, "val_perplexity": math.exp(min(loss, 700)),
                    "val_bpb": nats / math.log(2) / max(text_bytes, 1), "val_tokens_scored": scored})
    return metrics


def generate_samples(model: torch.nn.Module, tokenizer: Any, cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """Each prompt continued greedily and sampled at `cfg.temperature`, through model/generation.py."""
    from model.generation import generate_text

    samples = []
    for prompt in cfg.prompts:
        for mode, temperature in (("greedy", 0.0), ("sampled", cfg.temperature)):
            [text] = generate_text(model, tokenizer, [prompt], cfg.max_new_tokens, temperature=temperature,
                                   top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed)
            samples.append({"prompt": prompt, "mode": mode, "temperature": temperature, "text": text})
    return samples


def evaluate(cfg: EvaluateConfig, out_dir: Path, log: logging.Logger, *,
             tokenizer: Artifact, shard: Artifact, train: Artifact) -> dict[str, Any]:
    from model import load_model

    model = load_model(train.path / WEIGHTS, train.path / MODEL_CONFIG)
    text_tokenizer = load_tokenizer(tokenizer.path)
    block_size = train.manifest["model_config"]["block_size"]
    losses = {lang: validation_loss(model, split_tokens(shard, "val", lang), block_size, cfg.batch_size,
                                    cfg.max_batches) for lang in split_languages(shard, "val")}
    metrics = language_metrics(losses, shard.manifest["totals"]["val"])
    samples = generate_samples(model, text_tokenizer, cfg)
    write_json(out_dir / METRICS, metrics)
    write_json(out_dir / SAMPLES, samples)
    log.info("evaluate: val loss %.4f, perplexity %.2f, %.4f bits/byte over %d tokens%s", metrics["val_loss"],
             metrics["val_perplexity"], metrics["val_bpb"], metrics["val_tokens_scored"],
             "".join(f"; {lang}: {metrics[f'val_bpb.{lang}']:.4f} bits/byte" for lang in losses if lang))
    log.info("evaluate: sample (%s) %r", samples[0]["mode"], samples[0]["text"][:200])
    files = [METRICS, SAMPLES] + ([ATTENTION_MAP] if _attention_map(model, text_tokenizer, cfg, out_dir) else [])
    return {"metrics": metrics, "samples": samples, "files": describe_files(out_dir, files)}


def _attention_map(model: torch.nn.Module, tokenizer: Any, cfg: EvaluateConfig, out_dir: Path) -> bool:
    """Draw the representative attention map (model/attention_maps.py); False for mamba2 or without matplotlib."""
    from model.attention_maps import AttentionMapError, write_representative_map

    if not cfg.prompts:
        return False
    try:
        with atomic_path(out_dir / ATTENTION_MAP) as tmp:
            write_representative_map(model, tokenizer, cfg.prompts[0], tmp)
    except (AttentionMapError, ImportError):
        return False
    return True


STAGE = Stage(name="evaluate", run=evaluate, inputs=("tokenizer", "shard", "train"))
evaluate_task = prefect_task(STAGE)
