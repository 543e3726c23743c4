"""The champion gate, like with like: the current champion is scored on the candidate's validation text, now.

A champion's stored metric was measured on the validation split of *its* run; new data brings new held-out
documents, so comparing stored figures compares two different exams. Here the champion's weights and tokenizer are
fetched from the registry and scored by evaluate's own functions on the held-out documents of the candidate's run:
on the candidate's validation tokens when both share a tokenizer (the very windows evaluate scored), otherwise on the
same documents re-tokenized with the champion's tokenizer. Bits per byte is comparable either way (per UTF-8 byte of
the same text); loss and perplexity are per token, so across tokenizers only `val_bpb*` is a fair gate.

The held-out documents are a fixed set: the shard stage splits by content hash, so data added later never moves an
existing document between train and validation (`tests/test_lineage.py`).
"""
from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tasks.lineage.registry import Parent, fetch, tokenizer_digest
from tasks.stage import Artifact


def _held_out_documents(shard: Artifact, acquire: Artifact | None, synthesize: Artifact | None
                        ) -> dict[str, list[str]]:
    """The candidate's validation documents per language, chosen exactly as the shard stage chose them."""
    from tasks.corpus.reader import Corpus
    from tasks.shard import forced_val, held_out

    corpus = Corpus.of(acquire, synthesize)
    fraction = shard.manifest["config"]["val_fraction"]
    forced = forced_val(corpus, fraction)
    texts: dict[str, list[str]] = defaultdict(list)
    for batch in corpus.batches():
        for text, lang, held in zip(batch.texts, batch.languages, held_out(batch.hashes, fraction, forced).tolist()):
            if held:
                texts[lang].append(text)
    return dict(texts)


def _retokenized(tokenizer: Any, documents: dict[str, list[str]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Each language's documents framed as the shard stage frames them, and the totals evaluate's metrics need."""
    from tasks.shard import frame_documents

    streams, languages = {}, {}
    for lang, texts in sorted(documents.items()):
        ids = tokenizer.encode(texts)
        streams[lang] = frame_documents(ids, tokenizer.bos_id, tokenizer.eos_id, np.dtype(np.int64))
        languages[lang] = {"documents": len(texts), "tokens": int(streams[lang].size),
                           "text_bytes": sum(len(t.encode("utf-8")) for t in texts)}
    totals = {key: sum(row[key] for row in languages.values()) for key in ("documents", "tokens", "text_bytes")}
    return streams, {**totals, "languages": languages}


def score_champion(champion: Parent, upstream: dict[str, Artifact | None], log: logging.Logger) -> dict[str, Any]:
    """Evaluate's metrics for `champion` on the candidate's validation text, plus how it was scored."""
    from model import load_model
    from model.tokenizer import load_tokenizer
    from tasks.corpus.reader import split_languages, split_tokens
    from tasks.evaluate import language_metrics, validation_loss

    shard, evaluation = upstream["shard"], upstream["evaluate"]
    batch_size, max_batches = (evaluation.manifest["config"][k] for k in ("batch_size", "max_batches"))
    with tempfile.TemporaryDirectory(prefix="scriptorium-champion-") as tmp:
        files = fetch(champion, Path(tmp), log)
        model = load_model(files.weights, files.model_config)
        block = model.config.block_size
        same_tokenizer = tokenizer_digest(files.tokenizer) == tokenizer_digest(upstream["tokenizer"].path)
        if same_tokenizer:
            losses = {lang: validation_loss(model, split_tokens(shard, "val", lang), block, batch_size, max_batches)
                      for lang in split_languages(shard, "val")}
            totals = shard.manifest["totals"]["val"]
        else:
            documents = _held_out_documents(shard, upstream["acquire"], upstream["synthesize"])
            streams, totals = _retokenized(load_tokenizer(files.tokenizer), documents)
            losses = {lang: validation_loss(model, tokens, block, batch_size, max_batches)
                      for lang, tokens in streams.items()}
    metrics = language_metrics(losses, totals)
    log.info("register: champion %s scored on this run's validation text (%s): %.4f bits/byte", champion.uri,
             "same tokens" if same_tokenizer else "re-tokenized with its own tokenizer", metrics["val_bpb"])
    return {"metrics": metrics, "same_tokenizer": same_tokenizer}


# ------------------------------------------------------------------------------------- what the version records
GATE_TAG = "scriptorium.gate"  # .metric .candidate .champion .champion_version .margin .decision .scored
DESCRIPTION_MARK = "## Lineage and champion gate"


def champion_figure(client: Any, cfg: Any, uri: str, current: Any, upstream: dict[str, Artifact | None],
                    log: logging.Logger) -> dict[str, Any]:
    """The champion version's `cfg.champion_metric` on this run's validation text; its stored figure (and why) when
    it cannot be rescored (not a model this pipeline registered)."""
    from pipeline_config.registry import RegistryRef
    from tasks.lineage.registry import LineageError, resolve

    stored = client.get_run(current.run_id).data.metrics.get(cfg.champion_metric)
    ref = RegistryRef(tracking_uri=uri, model_name=cfg.model_name, alias=cfg.champion_alias)
    try:
        scored = score_champion(resolve(ref, f"models:/{cfg.model_name}/{current.version}"), upstream, log)
        value = scored["metrics"][cfg.champion_metric]
        how = "this run's validation tokens" if scored["same_tokenizer"] else \
            "this run's validation text, in its own tokenizer"
    except LineageError as exc:
        log.warning("register: champion v%s could not be rescored (%s); comparing with its stored %s", current.version,
                    exc, cfg.champion_metric)
        value, how = stored, f"its stored figure (not rescored: {exc})"
    return {"version": str(current.version), "value": value, "stored": stored, "how": how}


def record_gate(client: Any, cfg: Any, version: str, ours: float, held: str | None, figure: dict[str, Any] | None,
                won: bool) -> None:
    """Both figures, the margin (champion minus candidate: positive means the candidate is better) and the decision,
    as tags on the new version and in its description."""
    theirs = figure["value"] if figure else None
    tags = {
        "metric": cfg.champion_metric,
        "candidate": f"{ours:.6f}",
        "champion": "" if theirs is None else f"{theirs:.6f}",
        "champion_version": held or "",
        "margin": "" if theirs is None else f"{theirs - ours:.6f}",
        "decision": ("promoted" if held is None else f"promoted over v{held}") if won else f"kept v{held}",
        "scored": figure["how"] if figure else "no champion yet",
    }
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, f"{GATE_TAG}.{key}", value)
    describe(client, cfg.model_name, version)


def record_lineage(client: Any, cfg: Any, version: str, upstream: dict[str, Artifact | None]) -> dict[str, str] | None:
    """The parent (name, version, run) and the digests a later run resolves this version by, as tags."""
    from tasks.lineage.registry import PARENT_RUN_TAG, PARENT_TAG, TOKENIZER_TAG, TRAIN_INPUT_TAG, WEIGHTS_TAG, \
        train_input
    from tasks.training.files import WEIGHTS

    train = upstream["train"].manifest
    parent = train.get("init_from")
    lora = train.get("config", {}).get("lora")
    tags = {
        WEIGHTS_TAG: train["files"][WEIGHTS]["sha256"],
        TOKENIZER_TAG: tokenizer_digest(upstream["tokenizer"].path),
        PARENT_TAG: f"{parent['name']}/{parent['version']}" if parent else "",
        PARENT_RUN_TAG: parent["run_id"] if parent else "",
        TRAIN_INPUT_TAG: train_input(train.get("config", {}), train.get("upstream", {})),
        "scriptorium.lora": f"rank {lora['rank']}, alpha {lora['alpha']:g}, {', '.join(lora['targets'])}" if lora else "",
    }
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    describe(client, cfg.model_name, version)
    return {k: parent[k] for k in ("name", "version", "run_id")} if parent else None


def describe(client: Any, name: str, version: str) -> None:
    """The version's description, with its lineage and gate section (re)written at the end; whatever else it says
    (a model card) is kept."""
    from tasks.lineage.registry import PARENT_RUN_TAG, PARENT_TAG

    found = client.get_model_version(name, version)
    tags = found.tags
    kept = (found.description or "").split(DESCRIPTION_MARK)[0].rstrip()
    parent = tags.get(PARENT_TAG)
    lines = [DESCRIPTION_MARK, "",
             f"- parent: models:/{parent} (run {tags.get(PARENT_RUN_TAG)})" if parent else "- parent: none "
             "(trained from scratch)"]
    if tags.get("scriptorium.lora"):
        lines.append(f"- LoRA adapters ({tags['scriptorium.lora']}), merged into the weights")
    gate = {k.removeprefix(GATE_TAG + "."): v for k, v in tags.items() if k.startswith(GATE_TAG + ".")}
    if gate.get("champion"):
        lines.append(f"- champion gate on {gate['metric']}: this version {gate['candidate']}, champion "
                     f"v{gate['champion_version']} {gate['champion']} (on {gate['scored']}), margin {gate['margin']} "
                     f"(positive: this version is better): {gate['decision']}")
    elif gate:
        lines.append(f"- champion gate on {gate['metric']}: this version {gate['candidate']}, no champion yet: "
                     f"{gate['decision']}")
    text = "\n".join(lines)
    client.update_model_version(name, version, description=f"{kept}\n\n{text}" if kept else text)
