"""build-model: raw text to a registered small language model, each stage cached on what it depends on.

    acquire ─┐
             ├─> tokenizer ─> shard ─> train ─> evaluate ─> export ─> register
    synthesize ┘

Run it with `python -m flows.build_model --preset quickstart [--set train.max_steps=300 ...]`, or as a deployment
(`prefect deployment run build-model/<name> --param overrides='["train.max_steps=300"]'`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.killed_runs import record_killed_run
from flows.preflight import unrunnable
from pipeline_config import ConfigError, PipelineConfig, load_config
from tasks.acquire import acquire_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.register import register_task
from tasks.shard import shard_task
from tasks.stage import PipelineError, StageRunner, hold_artifacts, reference_serializer
from tasks.synthesize import synthesize_task
from tasks.tokenizer import tokenizer_task
from tasks.train import train_task


class InvalidConfiguration(PipelineError, ConfigError):
    """A deployment's run given a bad preset or override: logged as one line like any project error (a
    ConfigError still), where `python -m flows` would have refused it with status 2 before starting."""


# A failed run persists its exception: as JSON, not with Prefect's default pickle
@flow(name="build-model", log_prints=True, result_serializer=reference_serializer())
def build_model(preset: str = "quickstart", overrides: list[str] | None = None) -> dict[str, Any]:
    try:
        cfg = load_config(preset, overrides or [])
    except ConfigError as exc:
        raise InvalidConfiguration(" ".join(str(exc).split())) from None
    why = unrunnable(cfg)
    if why:  # before any stage runs, as for a configuration error: a deployment's run fails here, in one line
        raise PipelineError(why)
    with hold_artifacts(cfg.artifacts_dir):  # one run at a time per artifacts directory; a second one waits
        record_killed_run(cfg.artifacts_dir)  # a run that died holding it is 'Running' in Prefect: say it Crashed
        return run_pipeline(cfg)


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    run = StageRunner(Path(cfg.artifacts_dir), cfg.report)
    acquired = run(acquire_task, cfg.acquire) if cfg.acquire.sources else None
    stories = run(synthesize_task, cfg.synthesize) if cfg.synthesize.n else None
    vocabulary = run(tokenizer_task, cfg.tokenizer, acquire=acquired, synthesize=stories)
    shards = run(shard_task, cfg.shard, acquire=acquired, synthesize=stories, tokenizer=vocabulary)
    model = run(train_task, cfg.train, tokenizer=vocabulary, shard=shards)
    evaluation = run(evaluate_task, cfg.evaluate, tokenizer=vocabulary, shard=shards, train=model)
    exported = run(export_task, cfg.export, tokenizer=vocabulary, train=model)
    registered = run(
        register_task, cfg.register, acquire=acquired, synthesize=stories, tokenizer=vocabulary, shard=shards,
        train=model, evaluate=evaluation, export=exported,
    )
    summary = {
        "stages": run.states,
        "registered": registered.manifest,
        "metrics": evaluation.manifest["metrics"],
        "sample": evaluation.manifest["samples"][-1]["text"],
    }
    log = get_run_logger()
    log.info("build-model: stages %s", ", ".join(f"{k}={v}" for k, v in run.states.items()))
    if set(run.states.values()) == {"Cached"}:
        log.info(
            "build-model: nothing changed since the last run (every stage Cached: same sources, configuration and "
            "code), so no new version was trained; %s version %s stays and the '%s' alias was not moved",
            registered.manifest["model_name"], registered.manifest["version"], cfg.register.champion_alias,
        )
    return summary
