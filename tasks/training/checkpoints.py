"""Checkpoints that resume exactly: model and optimizer tensors as safetensors, counters and RNG state beside them.

A checkpoint is a directory written under a temporary name and renamed into place, then `latest.json` is swapped
atomically to point at it; a kill mid-write leaves the previous checkpoint untouched. The last `KEEP_CHECKPOINTS`
are kept. Nothing here unpickles: tensors are safetensors, everything else JSON.

Loading trusts nothing it reads: a checkpoint whose files are torn or unreadable, or whose weights are not all
finite, is skipped with a warning for the one before it (newest first, `latest.json` only a hint), and every file
of a candidate is read before any of it is applied, so a bad one leaves the model untouched.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tasks.stage import atomic_path, write_json
from tasks.training.files import WEIGHTS

KEEP_CHECKPOINTS = 2


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors = {
        f"optim.{index}.{name}": value.detach().cpu().contiguous()
        for index, slot in state["state"].items()
        for name, value in slot.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, {"param_groups": state["param_groups"]}


def save_checkpoint(
    directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> Path:
    from safetensors.torch import save_file, save_model

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with atomic_path(tmp / WEIGHTS) as weights:
        save_model(model, str(weights))  # handles tied embeddings, which save_file refuses
    tensors, groups = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    with atomic_path(tmp / "optimizer.safetensors") as state:
        save_file(tensors, str(state))
    write_json(tmp / "trainer.json", {"step": step, **groups, **extra})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json(directory / "latest.json", {"step": step, "path": final.name})
    for old in sorted(directory.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
    log: logging.Logger | None = None,
) -> dict[str, Any] | None:
    """Restore the newest sound checkpoint into `model` and `optimizer`; None when there is none."""
    log = log or logging.getLogger("scriptorium.train")
    for path in checkpoint_candidates(directory):
        try:
            meta, weights, tensors = _read_checkpoint(path)
        except Exception as exc:  # torn, truncated or foreign files: safetensors, JSON and OS errors alike
            log.warning("checkpoint %s is unreadable (%s: %s); trying the one before it", path, type(exc).__name__,
                        str(exc).splitlines()[0][:160] if str(exc) else "")
            continue
        if not all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()):
            log.warning("checkpoint %s holds non-finite weights; trying the one before it", path)
            continue
        _apply(path, meta, tensors, model, optimizer, device)
        return meta
    return None


def checkpoint_candidates(directory: Path) -> list[Path]:
    """Checkpoints newest first: the one `latest.json` names, then every `step-*` directory by step."""
    steps = sorted((p for p in Path(directory).glob("step-*") if p.is_dir()), reverse=True)
    try:
        named = Path(directory) / json.loads((Path(directory) / "latest.json").read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return steps
    return [named] + [p for p in steps if p != named] if named in steps else steps


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    meta = json.loads((path / "trainer.json").read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or "param_groups" not in meta:
        raise ValueError("trainer.json has no step or no param_groups")
    return meta, load_file(str(path / WEIGHTS)), load_file(str(path / "optimizer.safetensors"))


def _apply(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module,
           optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    from safetensors.torch import load_model

    load_model(model, str(path / WEIGHTS), device=str(device))  # handles tied embeddings, as save_model did
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
