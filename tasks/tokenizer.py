"""tokenizer: learn a vocabulary (SentencePiece BPE/unigram with byte fallback, characters, or whole words with a
character fallback) and report its fertility; optionally compare several candidate vocabularies side by side.

Training settings follow llama2.c's `train_vocab`: identity normalisation (acquire already applied NFC, and any other
rule would make decode(encode(x)) != x), byte fallback so no input is ever <unk>, digits split, full character
coverage. Documents are fed line by line because SentencePiece silently skips sentences longer than
`max_sentence_length`, which whole documents often are.

The fertility report is per language because a vocabulary learned mostly on English can look fine on average while
splitting Spanish or French words into many pieces; tokens per word and the share of words split into several pieces
show that directly, bytes per token shows compression, the unknown rate shows coverage, and vocabulary use shows how
much of the embedding table the data actually exercises.

Neither reads the whole corpus into memory. The vocabulary is learned from a sample of about `train_bytes`, drawn by
content hash (`tasks/corpus/sampling.py`), so it is spread evenly over the whole corpus, not its first megabytes, and
stratified by language: each language's share goes as its size to the power `language_exponent` (1: proportional,
0: equal). The fertility report encodes a sample of `fertility_bytes` per language drawn the same way.

With `candidates`, every candidate is trained on that same sample and reported on that same fertility sample
(`comparison.json`, `comparison.png`, and each candidate's files under `candidates/<name>/`); the one `choose` names,
or the first, is the stage's tokenizer, so what continues the pipeline is one of the vocabularies compared.
"""
from __future__ import annotations

import io
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from model.tokenizer import BOS, EOS, SPECIALS, UNK, WordTokenizer, load_tokenizer
from pipeline_config.tokenizer import TokenizerConfig
from tasks.corpus.reader import Corpus
from tasks.corpus.sampling import FERTILITY_SAMPLE, TOKENIZER_SAMPLE, in_sample, language_quotas
from tasks.lineage.registry import adopt_tokenizer, parent_identity
from tasks.stage import Artifact, Stage, describe_files, prefect_task, write_atomic, write_json
from tasks.tokenization.comparison import comparison_chart, comparison_rows

MODEL_FILE = "tokenizer.model"  # SentencePiece
VOCAB_FILE = "vocab.json"  # character- or word-level
REPORT = "fertility.json"
COMPARISON, COMPARISON_CHART, CANDIDATES = "comparison.json", "comparison.png", "candidates"
MAX_SENTENCE_BYTES = 16384
REPORT_WORDS_PER_LANGUAGE = 100_000
Samples = dict[str, list[str]]  # language -> texts


def _training_lines(texts: list[str]) -> Iterator[str]:
    for text in texts:
        yield from (line for line in text.split("\n") if line.strip())


def draw_samples(cfg: TokenizerConfig, corpus: Corpus) -> tuple[Samples, Samples]:
    """The vocabulary's training sample and the fertility sample, per language, in one pass over the corpus."""
    sizes = {lang: row["bytes"] for lang, row in corpus.languages.items()}
    quotas = language_quotas(sizes, cfg.train_bytes, cfg.language_exponent)
    rates = {
        TOKENIZER_SAMPLE: {lang: quotas.get(lang, 0) / max(size, 1) for lang, size in sizes.items()},
        FERTILITY_SAMPLE: {lang: cfg.fertility_bytes / max(size, 1) for lang, size in sizes.items()},
    }
    samples: dict[int, Samples] = {use: defaultdict(list) for use in rates}
    for batch in corpus.batches():
        languages = np.asarray(batch.languages, dtype=object)
        for lang in sorted(set(batch.languages)):
            rows = np.flatnonzero(languages == lang)
            for use, rate in rates.items():
                picked = rows[in_sample(batch.hashes[rows], rate.get(lang, 1.0), use)]
                samples[use][lang].extend(batch.texts[i] for i in picked)
    return dict(samples[TOKENIZER_SAMPLE]), dict(samples[FERTILITY_SAMPLE])


def _sample_summary(samples: Samples) -> dict[str, dict[str, int]]:
    return {lang: {"documents": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts)}
            for lang, texts in sorted(samples.items())}


def char_vocabulary(corpus: Corpus) -> list[str]:
    """Every character of the whole corpus (streamed; a character vocabulary has no fallback for unseen ones)."""
    seen: set[str] = set()
    for batch in corpus.batches():
        for text in batch.texts:
            seen.update(text)
    return SPECIALS + sorted(seen)


def train_sentencepiece(cfg: TokenizerConfig, texts: list[str], out_dir: Path) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts),
        model_writer=model,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        byte_fallback=cfg.byte_fallback,
        character_coverage=cfg.character_coverage,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        max_sentence_length=MAX_SENTENCE_BYTES,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=cfg.num_threads,
        minloglevel=2,
    )
    write_atomic(out_dir / MODEL_FILE, model.getvalue())


def fertility(tokenizer: Any, texts: list[str], num_threads: int = 1) -> dict[str, float]:
    """Tokens per word, share of words split into several tokens, bytes per token, unknown rate, vocabulary use."""
    words = [w for text in texts for w in text.split()][:REPORT_WORDS_PER_LANGUAGE]
    word_tokens = tokenizer.encode(words, num_threads=num_threads) if words else []
    docs = tokenizer.encode(texts, num_threads=num_threads)
    n_tokens = sum(len(d) for d in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    used = {i for d in docs for i in d}
    return {
        "documents": len(texts),
        "words": len(words),
        "tokens": n_tokens,
        "tokens_per_word": sum(len(t) for t in word_tokens) / max(len(words), 1),
        "continued_word_share": sum(len(t) > 1 for t in word_tokens) / max(len(words), 1),
        "bytes_per_token": n_bytes / max(n_tokens, 1),
        "unknown_rate": sum(d.count(tokenizer.unk_id) for d in docs) / max(n_tokens, 1),
        "vocab_use": len(used) / tokenizer.vocab_size,
    }


def fertility_report(tokenizer: Any, samples: Samples, num_threads: int = 1) -> dict[str, Any]:
    return {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "languages": {lang: fertility(tokenizer, texts, num_threads) for lang, texts in sorted(samples.items()) if texts},
    }


def train_vocabulary(cfg: TokenizerConfig, train_sample: Samples, characters: list[str], out_dir: Path) -> str:
    """Learn `cfg`'s kind of vocabulary into `out_dir`; returns the file written. `characters`: the corpus's own."""
    texts = [t for lang in sorted(train_sample) for t in train_sample[lang]]
    if cfg.kind == "char":
        write_json(out_dir / VOCAB_FILE, SPECIALS + characters)
        return VOCAB_FILE
    if cfg.kind == "word":
        write_json(out_dir / VOCAB_FILE, WordTokenizer.vocabulary(texts, characters, cfg.vocab_size))
        return VOCAB_FILE
    train_sentencepiece(cfg, texts, out_dir)
    return MODEL_FILE


def _log_fertility(log: logging.Logger, report: dict[str, Any], label: str = "") -> None:
    for lang, row in report["languages"].items():
        log.info(
            "tokenizer%s [%s]: %.2f tokens/word, %.1f%% words split, %.2f bytes/token, unk %.4f, vocab use %.1f%%",
            f" {label}" if label else "", lang, row["tokens_per_word"], 100 * row["continued_word_share"],
            row["bytes_per_token"], row["unknown_rate"], 100 * row["vocab_use"],
        )


def compare_candidates(cfg: TokenizerConfig, samples: tuple[Samples, Samples], characters: list[str],
                       chosen: tuple[str, dict[str, Any]], out_dir: Path, log: logging.Logger) -> dict[str, Any]:
    """Train every candidate on the same sample, report each on the same fertility sample, write the table + chart.
    `chosen` is (label, report) of the stage's own tokenizer, which is not trained twice."""
    reports, files = {}, []
    for candidate in cfg.candidates:
        if candidate.label == chosen[0]:
            reports[candidate.label] = chosen[1]
            continue
        where = out_dir / CANDIDATES / candidate.label
        name = train_vocabulary(cfg.candidate(candidate), samples[0], characters, where)
        reports[candidate.label] = fertility_report(load_tokenizer(where), samples[1], cfg.num_threads)
        files.append(f"{CANDIDATES}/{candidate.label}/{name}")
        _log_fertility(log, reports[candidate.label], candidate.label)
    rows = comparison_rows(reports, chosen[0])
    write_json(out_dir / COMPARISON, {"chosen": chosen[0], "rows": rows})
    files.append(COMPARISON)
    if comparison_chart(rows, out_dir / COMPARISON_CHART):
        files.append(COMPARISON_CHART)
    return {"chosen": chosen[0], "rows": rows, "files": files}


def build_tokenizer(cfg: TokenizerConfig, corpus: Corpus | list[dict[str, str]], out_dir: Path,
                    log: logging.Logger) -> dict[str, Any]:
    """Learn the vocabulary of `corpus` (or of documents given as {text, language} records) into `out_dir`."""
    corpus = Corpus.from_records(corpus) if isinstance(corpus, list) else corpus
    if not corpus.chunks:
        raise ValueError("tokenizer: the corpus is empty (acquire and synthesize produced no documents)")
    run = cfg.chosen()
    train_sample, fertility_sample = draw_samples(cfg, corpus)
    kinds = {run.kind, *(c.kind for c in cfg.candidates)}
    characters = char_vocabulary(corpus)[len(SPECIALS):] if kinds & {"char", "word"} else []
    files = adopt_tokenizer(cfg.registry, cfg.from_model, out_dir, log)  # tokenizer.from_model: a registered one's
    asked = None if files or run.kind == "char" else run.vocab_size  # char: the corpus's characters, no size asked
    if not files:
        files = [train_vocabulary(run, train_sample, characters, out_dir)]
    tokenizer = load_tokenizer(out_dir)
    _say_if_fewer_pieces(asked, tokenizer.vocab_size, run.kind, log)
    report = fertility_report(tokenizer, fertility_sample, cfg.num_threads)
    write_json(out_dir / REPORT, report)
    _log_fertility(log, report)
    summary: dict[str, Any] = {
        "kind": run.kind,
        "vocab_size": tokenizer.vocab_size,
        **({"vocab_size_asked": asked} if asked else {}),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "fertility": report["languages"],
        "sample": {"train": _sample_summary(train_sample), "fertility": _sample_summary(fertility_sample)},
    }
    if cfg.candidates:
        comparison = compare_candidates(cfg, (train_sample, fertility_sample), characters,
                                        (cfg.chosen_label, report), out_dir, log)
        files += comparison.pop("files")
        summary["comparison"] = comparison
    return {**summary, "files": describe_files(out_dir, files + [REPORT])}


def _say_if_fewer_pieces(asked: int | None, made: int, kind: str, log: logging.Logger) -> None:
    """`vocab_size` is a soft limit (SentencePiece's hard_vocab_limit=False, the word list's distinct words): a sample
    that holds fewer pieces gives fewer, and the model is sized to them. Said, so it is not a surprise later. (A word
    vocabulary may leave one entry free by design: each word takes two.)"""
    if asked and made < asked - (kind == "word"):
        log.warning("tokenizer: tokenizer.vocab_size is %d but the training sample yields %d pieces, so the model's "
                    "vocabulary is %d; lower tokenizer.vocab_size, or learn from more text (tokenizer.train_bytes, a "
                    "larger corpus)", asked, made, made)


def tokenizer(cfg: TokenizerConfig, out_dir: Path, log: logging.Logger, *,
              acquire: Artifact | None, synthesize: Artifact | None) -> dict[str, Any]:
    return build_tokenizer(cfg, Corpus.of(acquire, synthesize), out_dir, log)


def registered_vocabulary(cfg: TokenizerConfig) -> dict[str, Any] | None:
    """The cache key's view of `from_model`: the resolved version and its digests (None when learning)."""
    return parent_identity(cfg.registry, cfg.from_model, "tokenizer.from_model")


STAGE = Stage(name="tokenizer", run=tokenizer, inputs=("acquire", "synthesize"), external=registered_vocabulary)
tokenizer_task = prefect_task(STAGE)
