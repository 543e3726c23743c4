"""Checkpoints that resume exactly: model and optimizer tensors as safetensors, counters and RNG state beside them.

A checkpoint is a directory written under a temporary name and renamed into place, then `latest.json` is swapped
atomically to point at it; a kill mid-write leaves the previous checkpoint untouched. The last `KEEP_CHECKPOINTS`
are kept. Nothing here unpickles: tensors are safetensors, everything else JSON.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tasks.stage import atomic_path, write_json

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
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
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, Any] | None:
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
