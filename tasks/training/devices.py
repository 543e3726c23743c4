"""Where and in what precision training runs: the device (CUDA, MPS or CPU) and the autocast dtype.

`train.dtype: auto` never trusts a CPU flag alone: bf16 autocast is used on a CPU only where a matmul measures faster
in bf16 than in fp32 on this machine, now. Some hosts with avx512_bf16 run oneDNN's bf16 path at half the fp32 rate,
and hosts without it run bf16 matmuls orders of magnitude slower; the same kind of cloud machine has come with either.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path

import torch

from tasks.training import device_unavailable


def pick_device(name: str) -> torch.device:
    why = device_unavailable(name)
    if why:
        raise RuntimeError(why)
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
    """Time one matmul in each dtype: the avx512_bf16 flag alone is not enough (see the module docstring)."""
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
