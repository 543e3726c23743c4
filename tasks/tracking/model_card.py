"""The model card: a `README.md` that says what the model is, what it was trained on and how well it does.

Built from the lineage's manifests alone (no MLflow call), as markdown, so register can log it with the model, set it
as the registered version's description, and append to it what it decides (the champion comparison, the lineage).
Sections follow the usual model card: data, tokenizer, architecture and parameters, training, metrics, energy,
samples (at the end of training and at each checkpoint), intended use, limitations.
"""
from __future__ import annotations

from typing import Any

from tasks.reporting.summaries import markdown_table
from tasks.stage import Artifact, redact
from tasks.tracking.views import checkpoint_samples, stage_metrics

ARCHITECTURES = {"gpt": "GPT-style transformer", "llama": "Llama-style transformer",
                 "mamba2": "Mamba-2-style state space model"}
# model_config knobs that only some architectures read (model/config.py); the card lists only the model's own
ONLY_FOR = {"bias": {"gpt"}, "pos_encoding": {"gpt"}, "n_head": {"gpt", "llama"}, "n_kv_head": {"llama"},
            "rope_theta": {"llama"}, **{knob: {"mamba2"} for knob in ("d_state", "d_conv", "expand", "headdim",
                                                                       "chunk_size")}}


def _source(source: dict[str, Any]) -> str:
    where = source.get("path") or source.get("url") or source.get("dataset") or "?"
    return f"`{redact(str(where))}` ({source.get('kind', 'local')}, {source.get('language', 'en')})"


def _data(acquire: Artifact | None, synthesize: Artifact | None, shard: Artifact) -> str:
    lines = ["## Data", ""]
    if acquire is not None:
        m = acquire.manifest
        sources = ", ".join(_source(s) for s in m.get("config", {}).get("sources", []))
        lines.append(f"- {m.get('documents', 0):,} documents ({m.get('bytes', 0) / 1e6:.2f} MB of text) from "
                     f"{sources}; {m.get('duplicates', 0):,} exact duplicates dropped")
    if synthesize is not None and synthesize.manifest.get("n_accepted"):
        m = synthesize.manifest
        lines.append(f"- {m['n_accepted']:,} synthetic stories written by {m.get('model')} ({m.get('backend')}, "
                     f"recipe {m.get('recipe')})")
    totals = shard.manifest.get("totals", {})
    rows = [{"split": split, "language": lang, "documents": row.get("documents"), "tokens": row.get("tokens")}
            for split in ("train", "val") for lang, row in totals.get(split, {}).get("languages", {}).items()]
    lines += ["- held out for validation by content hash, within each language:", "", markdown_table(rows)]
    return "\n".join(lines)


def _tokenizer(tokenizer: Artifact) -> str:
    m = tokenizer.manifest
    config = m.get("config", {})
    kind = f"SentencePiece {config.get('model_type')}" if m.get("kind") == "sentencepiece" else m.get("kind")
    rows = [{"language": lang, "tokens/word": row.get("tokens_per_word"),
             "words split": row.get("continued_word_share"), "bytes/token": row.get("bytes_per_token"),
             "vocabulary used": row.get("vocab_use")} for lang, row in m.get("fertility", {}).items()]
    fallback = ", byte fallback" if config.get("byte_fallback") and m.get("kind") == "sentencepiece" else ""
    return "\n".join(["## Tokenizer", "", f"{kind}, {m.get('vocab_size')} entries{fallback}. Fertility on a sample "
                      "of each language:", "", markdown_table(rows)])


def _architecture(train: Artifact) -> str:
    m = train.manifest
    config = m.get("model_config", {})
    rows = [{"setting": key, "value": value} for key, value in config.items()
            if config.get("arch") in ONLY_FOR.get(key, {config.get("arch")}) and value is not None]
    return "\n".join([
        "## Architecture and parameters", "",
        f"{ARCHITECTURES.get(config.get('arch'), config.get('arch'))}: **{m.get('parameters', 0):,} parameters** "
        f"({m.get('non_embedding_parameters', 0):,} outside the embeddings).", "", markdown_table(rows)])


def _training(train: Artifact) -> str:
    m = train.manifest
    config = m.get("config", {})
    return "\n".join([
        "## Training", "",
        f"{m.get('steps')} steps of {config.get('batch_size')} x {config.get('grad_accum_steps', 1)} sequences of "
        f"{m.get('model_config', {}).get('block_size')} tokens (AdamW, peak learning rate {config.get('learning_rate')}, "
        f"{config.get('warmup_steps')} warmup steps, cosine decay), on {m.get('device')} in {m.get('dtype')}, "
        f"{m.get('tokens_per_s', 0):,.0f} tokens/s; final train loss {m.get('final_train_loss', float('nan')):.4f}."])


def _metrics(evaluate: Artifact) -> str:
    metrics = evaluate.manifest.get("metrics", {})
    languages = sorted({k.split(".", 1)[1] for k in metrics if k.startswith("val_bpb.")})
    rows = [{"language": lang or "all", "bits per byte": metrics.get(f"val_bpb.{lang}" if lang else "val_bpb"),
             "loss (nats/token)": metrics.get(f"val_loss.{lang}" if lang else "val_loss"),
             "perplexity": metrics.get(f"val_perplexity.{lang}" if lang else "val_perplexity")}
            for lang in ["", *languages]]
    return "\n".join(["## Metrics", "", "On the held-out split (consecutive windows; bits per byte compares across "
                      "tokenizers):", "", markdown_table(rows)])


def _energy(upstream: dict[str, Artifact | None]) -> str:
    figures = stage_metrics(upstream)
    names = [name for name in upstream if f"stage/seconds/{name}" in figures]
    rows = [{"stage": name, "seconds": figures.get(f"stage/seconds/{name}"),
             "energy (kWh)": figures.get(f"stage/energy_kwh/{name}"),
             "CO2eq (kg)": figures.get(f"stage/emissions_kg_co2eq/{name}")} for name in [*names, "total"]]
    return "\n".join(["## Energy", "", "Wall time per stage, and energy where codecarbon measured it:", "",
                      markdown_table(rows)])


def _samples(evaluate: Artifact, train: Artifact) -> str:
    lines = ["## Samples", ""]
    lines += [f"- *{s['prompt']}* ({s['mode']}, T={s['temperature']}): {s['text']}"
              for s in evaluate.manifest.get("samples", [])]
    evolution = [row for row in checkpoint_samples(train) if row.get("mode") == "greedy"]
    if evolution:
        first = evolution[0]["prompt"]
        lines += ["", f"How the greedy continuation of *{first}* evolved over training:", "",
                  markdown_table([{"step": r["step"], "text": r["text"]} for r in evolution if r["prompt"] == first])]
    return "\n".join(lines)


USE_AND_LIMITS = """## Intended use

Research and teaching: a small language model trained end to end by a reproducible pipeline, to compare
architectures, tokenizers and data on the figures above, and to continue prompts in the style of its training text.

## Limitations

- A model of this size writes fluent-looking but shallow text; it does not know facts and must not be relied on
  for any.
- It reproduces the style, vocabulary and biases of its training data (see Data), including the synthetic stories'
  generator; it has had no safety tuning and no instruction tuning.
- It is measured only on text held out from the same sources: figures on other text will be worse.
- Languages are represented in proportion to the data: a language with little text is modelled poorly (see the
  per-language metrics)."""


def model_card(model_name: str, upstream: dict[str, Artifact | None]) -> str:
    """The card of the model `upstream` (the register stage's inputs) describes, as markdown."""
    train, evaluate = upstream["train"], upstream["evaluate"]
    arch = train.manifest.get("model_config", {}).get("arch")
    metrics = evaluate.manifest.get("metrics", {})
    # the title is what the registry's version list shows of the description (cut at ~30 characters): the figure
    # that tells versions apart goes first
    head = (f"# {model_name}: {metrics.get('val_bpb', float('nan')):.4f} bits per byte, {arch}, "
            f"{train.manifest.get('parameters', 0):,} parameters\n\nA small language model trained end to end by "
            "Scriptorium; this card is built from its lineage's manifests.")
    sections = [head, _data(upstream.get("acquire"), upstream.get("synthesize"), upstream["shard"]),
                _tokenizer(upstream["tokenizer"]), _architecture(train), _training(train), _metrics(evaluate),
                _energy(upstream), _samples(evaluate, train), USE_AND_LIMITS]
    return "\n\n".join(sections) + "\n"
