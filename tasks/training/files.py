"""The train stage's file names and resumable knobs, without the engine: importing this loads no torch.

The stage's cache key, the register stage and a fully cached run read these names only; `loop.py`, `checkpoints.py`
and `samples.py` take them from here too.
"""
from __future__ import annotations

WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
PROFILE = "profile.json"  # parameters by component, FLOPs per token, memory estimate (model/profile.py)
SAMPLES = "samples.jsonl"
DIVERGED = "diverged.json"

# Knobs a diverged run is re-run with: they do not change the train stage's work directory, so the re-run resumes
# from the last finite checkpoint. The time budget is one too (a stopping rule). A change to a learning-rate knob
# *without* a divergence starts over, so a finished run never passes for one trained under the new schedule.
RESUMABLE_KNOBS = frozenset({"learning_rate", "min_lr_ratio", "warmup_steps", "grad_clip", "max_seconds"})
