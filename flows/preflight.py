"""What makes a valid configuration unrunnable on this machine, found before any stage runs.

The schema checks a configuration on its own; these checks look outside it, at things a stage would otherwise
discover only once the stages before it had run: the training device, and the synthesis recipe with the languages
asked of it (a recipe is a YAML file the user may have written). `python -m flows` exits 2 on any of them, as on a
configuration error; a deployment's run fails with the same one line before its first stage.
"""
from __future__ import annotations

from pipeline_config import PipelineConfig
from tasks.training import device_unavailable


def unrunnable(cfg: PipelineConfig) -> str | None:
    """Why `cfg` cannot run here, naming the fix, or None. Imports nothing heavy (no torch unless a GPU is named)."""
    why = device_unavailable(cfg.train.device)
    if why or not cfg.synthesize.n:
        return why
    from tasks.synthesis.backend import SynthesizeError
    from tasks.synthesis.recipes import check_languages, load_recipe

    try:
        check_languages(load_recipe(cfg.synthesize.recipe), cfg.synthesize.languages)
    except SynthesizeError as exc:
        return str(exc)
    return None
