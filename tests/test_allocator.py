"""train.keep_heap: glibc keeps freed blocks for the next step instead of unmapping them (tasks/training/allocator.py).

What is asserted is the mechanism, counted in minor page faults (the kernel's count, not a timing): a step-like
pattern of blocks (two of 64 MiB, larger than glibc's largest mmap threshold, and smaller ones), allocated, written and
freed round after round, faults every page in again each round with glibc's defaults, and not at all once the heap has
grown to the pattern inside `kept_heap()`; after the block the defaults are back. It runs in a fresh interpreter.
"""
import json
import subprocess
import sys

import pytest

from tasks.training.allocator import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's; elsewhere kept_heap is a no-op")

# A fresh interpreter: what a heap already holds (another test's training) decides where the next blocks land.
SCRIPT = """
import json, resource, sys, torch
from tasks.training.allocator import kept_heap
SIZES = (64 << 20, 8 << 20, 1 << 20, 64 << 20, 16 << 20)
def faults_per_round(rounds=5):
    faults = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(size // 4) for size in SIZES]
        del blocks
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults
out = {"before": faults_per_round()}
with kept_heap(sys.argv[1] == "on") as kept:
    out["kept"], out["inside"] = kept, faults_per_round()
out["after"] = faults_per_round()
print(json.dumps(out))
"""
PAGES = (64 + 8 + 1 + 64 + 16) * 256  # 4 KiB pages the blocks of one round span


def rounds(enabled: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, "on" if enabled else "off"], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def test_freed_blocks_are_reused_without_faults_inside_and_unmapped_outside():
    out = rounds(True)
    assert min(out["before"]) > PAGES // 2  # the defaults: fresh mappings, faulted page by page every round
    assert out["kept"]
    assert max(out["inside"][3:]) < PAGES // 50  # once the heap has grown to the pattern (2-3 rounds), it holds it
    assert max(out["after"]) > PAGES // 2  # defaults restored, the free heap trimmed: faulting again


def test_disabled_is_a_no_op():
    out = rounds(False)
    assert not out["kept"]
    assert min(out["inside"]) > PAGES // 2
