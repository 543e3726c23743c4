"""What makes a valid configuration unrunnable on this machine, found before any stage runs.

The schema checks a configuration on its own; these checks look outside it, at things a stage would otherwise
discover only once the stages before it had run (or once Prefect's API had started): the training device, the
synthesis recipe with the languages asked of it (a recipe is a YAML file the user may have written), local sources
that match no file or reach into the artifacts directory, an MLflow tracking server that does not answer, an
artifacts directory moved away from where its MLflow store says its files are, and registered models named as
parents (`tokenizer.from_model`, `train.init_from`) that the MLflow store does not hold.
`python -m flows` exits 2 on any of them, as on a configuration error; a deployment's run fails with the same one
line before its first stage.
`prefect_api_down` is asked before Prefect runs anything, by `python -m flows` and `python -m flows.serve`.
"""
from __future__ import annotations

from pathlib import Path

from pipeline_config import PipelineConfig
from tasks.training import device_unavailable


def unrunnable(cfg: PipelineConfig) -> str | None:
    """Why `cfg` cannot run here, naming the fix, or None. Imports nothing heavy (no torch unless a GPU is named,
    MLflow only when a parent model is named)."""
    return (device_unavailable(cfg.train.device) or _recipe_problem(cfg) or _source_problem(cfg)
            or _unreachable_store(cfg) or _moved_store(cfg) or _missing_parent(cfg))


def _recipe_problem(cfg: PipelineConfig) -> str | None:
    if not cfg.synthesize.n:
        return None
    from tasks.synthesis.backend import SynthesizeError
    from tasks.synthesis.recipes import check_languages, load_recipe

    try:
        check_languages(load_recipe(cfg.synthesize.recipe), cfg.synthesize.languages)
    except SynthesizeError as exc:
        return str(exc)
    return None


def _source_problem(cfg: PipelineConfig) -> str | None:
    """A local source (path, directory or glob) that matches no file, or that reaches into `artifacts_dir`: the
    pipeline would read its own output (stories, documents) back, and acquire's key, which holds the files' sizes and
    times, would move with every run. HTTP and hub sources are found by acquire."""
    from tasks.corpus.formats import AcquireError, local_base, resolve_local, skipped

    artifacts = Path(cfg.artifacts_dir).resolve()
    for index, source in enumerate(cfg.acquire.sources):
        if source.kind != "local":
            continue
        try:
            files = resolve_local(source.path)
        except AcquireError as exc:
            return f"acquire.sources[{index}]: {exc}"
        base = local_base(source.path).resolve()
        holds = base.is_dir() and artifacts.is_relative_to(base) and not skipped(artifacts.relative_to(base))
        if holds or any(f.resolve().is_relative_to(artifacts) for f in files):
            return (f"acquire.sources[{index}]: '{source.path}' reaches into artifacts_dir ({artifacts}), so the "
                    "pipeline would read its own output: name a folder or glob outside it, or move artifacts_dir")
    return None


def _unreachable_store(cfg: PipelineConfig) -> str | None:
    """An MLflow tracking server (`register.tracking_uri`) that does not answer: register would find it after
    training."""
    from tasks.lineage.registry import unreachable_server

    down = unreachable_server(cfg.register.tracking_uri or "")
    return f"register.tracking_uri: {down}" if down else None


def _moved_store(cfg: PipelineConfig) -> str | None:
    """The default MLflow store, in an artifacts directory that was moved: its files are recorded at the old path
    (`flows/relocate.py`; a few SQLite reads, no MLflow import)."""
    from flows.relocate import moved_from, moved_message

    old = None if cfg.register.tracking_uri else moved_from(Path(cfg.artifacts_dir))
    return moved_message(Path(cfg.artifacts_dir), old) if old else None


def _missing_parent(cfg: PipelineConfig) -> str | None:
    """A named parent model the store does not hold (`champion` while there is none is not an error: the stage
    learns or trains from scratch)."""
    from tasks.lineage.registry import LineageError, parent_identity  # MLflow loads only when a parent is named

    for knob, section, spec in (("tokenizer.from_model", cfg.tokenizer, cfg.tokenizer.from_model),
                                ("train.init_from", cfg.train, cfg.train.init_from)):
        try:
            parent_identity(section.registry, spec, knob)
        except LineageError as exc:
            return f"{knob}: {exc}"
    return None


def prefect_api_down() -> str | None:
    """Why the Prefect API this run is configured with (PREFECT_API_URL, from the environment or the Prefect profile)
    cannot take it, naming the fix; None when none is configured (Prefect then starts a temporary one) or it can.
    The check is Prefect's own (the one its client makes on a run's first request, where it would end in a 100-line
    traceback): the API answers `/admin/version` with a version of the client's major. Prefect remembers a check that
    passed for the rest of the process, so the run does not ask again."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    import httpx
    from prefect.client.orchestration import get_client

    from tasks.stage import redact

    try:
        with get_client(sync_client=True) as client:
            client.raise_for_api_version_mismatch_once()
    except RuntimeError as exc:  # not reached, or a server of another major version
        if exc.__cause__ is None:
            return redact(f"the Prefect API at {url} (PREFECT_API_URL): {exc}")
        why = " ".join(str(exc.__cause__).split(" - For more information")[0].split())[:200]
        return redact(f"no Prefect API answers at {url} (PREFECT_API_URL: {why or type(exc.__cause__).__name__}): "
                      "start it (`make server`), or unset PREFECT_API_URL to record the run in a temporary one")
    except httpx.HTTPStatusError as exc:  # Prefect re-raises an Unauthorized reply as it came
        return redact(f"the Prefect API at {url} (PREFECT_API_URL) refused the run: {' '.join(str(exc).split())[:200]}")
    return None
