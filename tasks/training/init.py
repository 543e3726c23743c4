"""Where training starts: random weights (`init_from: scratch`) or a registered model's, optionally with LoRA.

Continuing from a parent only makes sense when the new run computes the same function of the same token ids: the
model config must be the parent's (dropout aside, a training knob) and the tokenizer's model file must be byte for
byte the parent's. Either mismatch stops the run before any step, naming the first differences and the fix.

The parent's weights go into the freshly built model through safetensors (strict: every tensor, the right shapes),
then, with `train.lora`, every parameter is frozen and adapters are added (`model/lora.py`), so the optimizer the
loop builds from the trainable parameters holds adapter state only. Checkpoints save the adapted model, so a killed
LoRA run resumes into the same structure. The stage merges the adapters before writing the weights.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.nn as nn

from model import ModelConfig
from model.lora import apply_lora
from pipeline_config.train import TrainConfig
from tasks.lineage.registry import LineageError, Parent, ParentFiles, fetch, resolve, tokenizer_digest
from tasks.stage import Artifact

PARENT_DIR = "parent"  # inside the train work directory: the fetched parent model
IGNORED_KEYS = frozenset({"dropout"})  # how the parent was trained, not what it computes


@dataclass(frozen=True)
class Start:
    """The parent (None: scratch) and what the loop applies to each model it builds."""

    parent: Parent | None
    init: Callable[[nn.Module], nn.Module] | None
    reuse: ParentFiles | None = None  # the parent already is this run's result: its files are the output

    def record(self) -> dict[str, object]:
        return {"init_from": self.parent.identity() if self.parent else None}


def check_compatible(parent: Parent, files: ParentFiles, expected: ModelConfig, tokenizer_sha256: str | None) -> None:
    """Raise LineageError naming the mismatch when `parent` is not the same architecture and tokenizer."""
    theirs = json.loads(Path(files.model_config).read_text(encoding="utf-8"))
    ours = expected.model_dump(mode="json")
    differ = sorted(k for k in set(ours) | set(theirs) if k not in IGNORED_KEYS and ours.get(k) != theirs.get(k))
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} (this run: {ours.get(k)!r})" for k in differ[:4])
        raise LineageError(f"train.init_from {parent.uri} is another architecture: {shown}; set train.model (and the "
                           "tokenizer) to the parent's, or train.init_from: scratch")
    if tokenizer_sha256 is None:
        raise LineageError(f"train.init_from {parent.uri}: this run's tokenizer is unknown (the train stage was run "
                           "without its tokenizer artifact), so it cannot be checked against the parent's")
    if tokenizer_sha256 != parent.tokenizer_sha256:
        raise LineageError(f"train.init_from {parent.uri} was trained with another tokenizer (sha256 "
                           f"{parent.tokenizer_sha256[:12]}, this run {tokenizer_sha256[:12]}): set "
                           f"tokenizer.from_model: {parent.uri} to reuse its vocabulary, or train.init_from: scratch")


def _initializer(cfg: TrainConfig, files: ParentFiles, log: logging.Logger) -> Callable[[nn.Module], nn.Module]:
    def init(model: nn.Module) -> nn.Module:
        from safetensors.torch import load_model

        load_model(model, str(files.weights))  # strict: a missing or extra tensor is an error
        if cfg.lora is not None:
            try:
                wrapped = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
            except ValueError as exc:
                raise LineageError(str(exc)) from None
            log.info("train: LoRA rank %d alpha %g on %d layers; %d trainable parameters of %d", cfg.lora.rank,
                     cfg.lora.alpha, len(wrapped), sum(p.numel() for p in model.parameters() if p.requires_grad),
                     sum(p.numel() for p in model.parameters()))
        return model

    return init


def starting_point(cfg: TrainConfig, expected: ModelConfig, tokenizer: Artifact | None, out_dir: Path,
                   log: logging.Logger, this_input: str = "") -> Start:
    """Resolve `cfg.init_from`, fetch and check the parent, and return how to initialise the model.

    A fixed point for nightly runs with `init_from: champion`: when the champion was itself trained from exactly
    this run's input (`this_input`: the same train config on the same tokenizer and shards), continuing it would
    only train the same data again, so its files are this stage's output. They are byte for byte the champion's
    train artifact, so everything downstream is Cached and no new version is registered."""
    if cfg.init_from == "scratch":
        return Start(None, None)
    parent = resolve(cfg.registry, cfg.init_from)
    if parent is None:
        log.info("train: init_from champion, but %s has no '%s' yet: training from scratch",
                 cfg.registry.model_name, cfg.registry.alias)
        return Start(None, None)
    files = fetch(parent, Path(out_dir) / PARENT_DIR, log)
    check_compatible(parent, files, expected, tokenizer_digest(tokenizer.path) if tokenizer else None)
    if this_input and parent.train_input == this_input:
        log.info("train: %s was trained from this very configuration and these shards; nothing new to learn, so its "
                 "weights are this stage's output", parent.uri)
        return Start(parent, None, reuse=files)
    log.info("train: starting from %s (run %s)%s", parent.uri, parent.run_id,
             " with LoRA adapters" if cfg.lora else "")
    return Start(parent, _initializer(cfg, files, log))
