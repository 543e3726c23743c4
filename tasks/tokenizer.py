"""tokenizer: learn a vocabulary (SentencePiece BPE/unigram with byte fallback, or characters) and report its fertility.

Training settings follow llama2.c's `train_vocab`: identity normalisation (acquire already applied NFC, and any other
rule would make decode(encode(x)) != x), byte fallback so no input is ever <unk>, digits split, full character
coverage. Documents are fed line by line because SentencePiece silently skips sentences longer than
`max_sentence_length`, which whole documents often are.

The fertility report is per language because a vocabulary learned mostly on English can look fine on average while
splitting Spanish or French words into many pieces; tokens per word and the share of words split into several pieces
show that directly, bytes per token shows compression, the unknown rate shows coverage, and vocabulary use shows how
much of the embedding table the data actually exercises.
"""
from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from model.tokenizer import BOS, EOS, UNK, CharTokenizer, load_tokenizer
from pipeline_config.schema import TokenizerConfig
from tasks.corpus.reader import corpus
from tasks.stage import Artifact, Stage, describe_files, prefect_task, write_atomic, write_json

MODEL_FILE = "tokenizer.model"  # SentencePiece
VOCAB_FILE = "vocab.json"  # character-level
REPORT = "fertility.json"
MAX_SENTENCE_BYTES = 16384
REPORT_WORDS_PER_LANGUAGE = 100_000


def _training_lines(texts: list[str], budget: int) -> Iterator[str]:
    used = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            used += len(line.encode("utf-8"))
            if used > budget:
                return
            yield line


def train_sentencepiece(cfg: TokenizerConfig, texts: list[str], out_dir: Path) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts, cfg.train_bytes),
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


def fertility_report(tokenizer: Any, records: list[dict[str, str]], num_threads: int = 1) -> dict[str, Any]:
    by_language: dict[str, list[str]] = defaultdict(list)
    for record in records:
        by_language[record.get("language", "en")].append(record["text"])
    return {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "languages": {lang: fertility(tokenizer, texts, num_threads) for lang, texts in sorted(by_language.items())},
    }


def build_tokenizer(cfg: TokenizerConfig, records: list[dict[str, str]], out_dir: Path, log: logging.Logger) -> dict[str, Any]:
    texts = [r["text"] for r in records]
    if not texts:
        raise ValueError("tokenizer: the corpus is empty (acquire and synthesize produced no documents)")
    if cfg.kind == "char":
        write_json(out_dir / VOCAB_FILE, CharTokenizer.vocabulary(texts))
        files = [VOCAB_FILE]
    else:
        train_sentencepiece(cfg, texts, out_dir)
        files = [MODEL_FILE]
    tokenizer = load_tokenizer(out_dir)
    report = fertility_report(tokenizer, records, cfg.num_threads)
    write_json(out_dir / REPORT, report)
    for lang, row in report["languages"].items():
        log.info(
            "tokenizer [%s]: %.2f tokens/word, %.1f%% words split, %.2f bytes/token, unk %.4f, vocab use %.1f%%",
            lang, row["tokens_per_word"], 100 * row["continued_word_share"], row["bytes_per_token"],
            row["unknown_rate"], 100 * row["vocab_use"],
        )
    return {
        "kind": cfg.kind,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "fertility": report["languages"],
        "files": describe_files(out_dir, files + [REPORT]),
    }


def tokenizer(cfg: TokenizerConfig, out_dir: Path, log: logging.Logger, *,
              acquire: Artifact | None, synthesize: Artifact | None) -> dict[str, Any]:
    return build_tokenizer(cfg, corpus(acquire, synthesize), out_dir, log)


STAGE = Stage(name="tokenizer", run=tokenizer, inputs=("acquire", "synthesize"))
tokenizer_task = prefect_task(STAGE)
