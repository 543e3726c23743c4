"""The artifact each stage publishes in the Prefect UI when it ends, built from its manifest (and, for train, its
curve): documents per language, stories written, fertility per language, shard totals, the training curve, the
evaluation metrics, the exported files, the registered version and the champion decision.

One function per stage, `SUMMARIES[stage](manifest, path) -> (key, markdown or table rows)`; `publish_summary` is
what `Stage.execute` calls once the manifest is written.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from tasks.reporting.prefect_artifacts import in_run, publish

Summary = tuple[str, str | list[dict[str, Any]]]


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of one shape as a markdown table (the columns of the first row)."""
    if not rows:
        return "_none_"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_number(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def compute_line(manifest: dict[str, Any]) -> str:
    compute = manifest.get("compute") or {}
    parts = [f"{compute['seconds']:.1f} s"] if compute.get("seconds") is not None else []
    if compute.get("energy_kwh") is not None:
        parts.append(f"{compute['energy_kwh']:.3g} kWh")
    return f"\n\n_{', '.join(parts)}_" if parts else ""


def _acquire(m: dict[str, Any], _path: Path) -> Summary:
    rows = [{"language": lang, **row} for lang, row in m.get("languages", {}).items()]
    head = (f"### acquire\n\n{_number(m.get('documents'))} documents, {_number(m.get('bytes'))} bytes "
            f"({_number(m.get('duplicates'))} duplicates and {_number(m.get('dropped_short'))} short documents "
            f"dropped{', byte budget reached' if m.get('budget_reached') else ''})\n\n")
    return "acquire-documents", head + markdown_table(rows) + compute_line(m)


def _synthesize(m: dict[str, Any], _path: Path) -> Summary:
    rejected = [{"reason": reason, "stories": n} for reason, n in m.get("rejected", {}).items()]
    text = (f"### synthesize\n\n{m.get('n_accepted')}/{m.get('n_requested')} stories written by {m.get('model')} "
            f"({m.get('backend')}), acceptance rate {_number(m.get('acceptance_rate'))}, "
            f"{_number(m.get('tokens_per_s'))} tokens/s\n\nlanguages: "
            + (", ".join(f"{k} {v}" for k, v in m.get("languages", {}).items()) or "none")
            + "\n\n#### rejected\n\n" + markdown_table(rejected))
    return "synthesize-stories", text + compute_line(m)


def _tokenizer(m: dict[str, Any], _path: Path) -> Summary:
    return "tokenizer-fertility", [{"language": lang, **{k: round(v, 4) if isinstance(v, float) else v
                                                         for k, v in row.items()}}
                                   for lang, row in m.get("fertility", {}).items()]


def _shard(m: dict[str, Any], _path: Path) -> Summary:
    rows = [{"split": split, "language": lang, **{k: row.get(k) for k in ("documents", "tokens", "text_bytes")}}
            for split in ("train", "val") for lang, row in m.get("totals", {}).get(split, {}).get("languages",
                                                                                                {}).items()]
    head = (f"### shard\n\n{len(m.get('shards', []))} shards ({m.get('dtype')}, vocabulary {m.get('vocab_size')}) "
            f"from {m.get('chunks')} chunks on {m.get('worker_processes')} worker process(es)\n\n")
    return "shard-totals", head + markdown_table(rows) + compute_line(m)


def _train(m: dict[str, Any], path: Path) -> Summary:
    from tasks.stage import read_jsonl

    rows = read_jsonl(path / "metrics.jsonl")
    evals = [{"step": r["step"], "train loss": r["loss"], "val loss (estimate)": r["val_loss_estimate"], "lr": r["lr"]}
             for r in rows if "val_loss_estimate" in r]
    config = m.get("model_config", {})
    head = (f"### train\n\n{config.get('arch')}, {_number(m.get('parameters'))} parameters, {m.get('steps')} steps "
            f"(resumed from {m.get('resumed_from')}) on {m.get('device')} in {m.get('dtype')}\n\n"
            f"final train loss {_number(m.get('final_train_loss'))}, best val estimate "
            f"{_number(m.get('best_val_loss_estimate'))}, {_number(m.get('tokens_per_s'), 3)} tokens/s"
            f"{', stopped early' if m.get('early_stopped') else ''}\n\n")
    return "train-curve", head + markdown_table(evals) + compute_line(m)


def _evaluate(m: dict[str, Any], _path: Path) -> Summary:
    metrics = m.get("metrics", {})
    languages = sorted({k.split(".", 1)[1] for k in metrics if k.startswith("val_bpb.")})
    rows = [{"language": lang or "all", **{name: metrics.get(f"{name}.{lang}" if lang else name)
                                          for name in ("val_bpb", "val_loss", "val_perplexity", "val_tokens_scored")}}
            for lang in ["", *languages]]
    samples = "\n\n".join(f"**{s['prompt']}** ({s['mode']}, T={s['temperature']}): {s['text']}"
                          for s in m.get("samples", []))
    return "evaluate-metrics", "### evaluate\n\n" + markdown_table(rows) + "\n\n#### samples\n\n" + samples \
        + compute_line(m)


def _export(m: dict[str, Any], _path: Path) -> Summary:
    files = "\n".join(f"- `{name}`" for name in m.get("exported", [])) or "_nothing exported_"
    skipped = "".join(f"\n- {fmt} skipped: {why}" for fmt, why in m.get("skipped", {}).items())
    return "export-files", f"### export\n\n{files}{skipped}" + compute_line(m)


def _register(m: dict[str, Any], _path: Path) -> Summary:
    metric, value = next(iter(m.get("metric", {}).items()), ("metric", None))
    decision = ("is the new champion" + (f" (replacing version {m['previous_champion']})"
                                         if m.get("previous_champion") else "")) if m.get("champion") else \
        f"did not beat the champion, version {m.get('previous_champion')}, which keeps the alias"
    return "register-version", (f"### register\n\n**{m.get('model_name')} version {m.get('version')}** "
                                f"({metric} {_number(value)}) {decision}.\n\n- model: `{m.get('model_uri')}`\n"
                                f"- MLflow run: `{m.get('run_id')}` in `{m.get('tracking_uri')}`")


SUMMARIES: dict[str, Callable[[dict[str, Any], Path], Summary]] = {
    "acquire": _acquire, "synthesize": _synthesize, "tokenizer": _tokenizer, "shard": _shard, "train": _train,
    "evaluate": _evaluate, "export": _export, "register": _register,
}


def summary(stage: str, manifest: dict[str, Any], path: Path) -> Summary:
    return SUMMARIES[stage](manifest, Path(path))


def publish_summary(stage: str, manifest: dict[str, Any], path: Path) -> bool:
    """Publish `stage`'s summary as a Prefect artifact (a table for fertility, markdown otherwise); a no-op outside a
    run. A summary that cannot be built (a manifest from an older version) is skipped, never an error."""
    if stage not in SUMMARIES or not in_run():
        return False
    try:
        key, content = summary(stage, manifest, path)
    except (KeyError, TypeError, ValueError, OSError):
        return False
    if isinstance(content, list):
        return publish(key, table=content, description=f"{stage}: {key.split('-', 1)[1]}")
    return publish(key, markdown=content, description=f"{stage}: {key.split('-', 1)[1]}")
