"""The `word` tokenizer kind: whole words from the documents, characters for the rest, JSON on disk, any arch."""
from __future__ import annotations

import json
import logging

import torch

from model import ModelConfig, build_model
from model.tokenizer import WordTokenizer, load_tokenizer
from pipeline_config.schema import TokenizerConfig
from tasks.tokenizer import build_tokenizer

LOG = logging.getLogger("test")
TEXTS = ["Once upon a time, a little dog ran to the park.\n\nThe dog saw a cat. \"Hello!\" said the dog.",
         "the cat and the dog played in the park all day"] * 3


def _records(small_corpus) -> list[dict[str, str]]:
    return [{"text": json.loads(line)["text"], "language": "en"} for line in small_corpus.read_text().splitlines()]


def test_words_are_one_token_and_unknown_words_are_spelled(tmp_path):
    table = WordTokenizer.vocabulary(TEXTS, set("".join(TEXTS)), vocab_size=80)
    (tmp_path / "vocab.json").write_text(json.dumps(table))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, WordTokenizer) and tok.vocab_size <= 80
    assert "dog" in table["words"] and "the" in table["words"]
    for text in TEXTS + ["the dog", "dog the dog"]:
        assert tok.decode(tok.encode([text])[0]) == text
    assert len(tok.encode([" the dog"])[0]) == 2  # each word with its leading space is one entry
    assert len(tok.encode(["the"])[0]) == 1  # and without it
    spelled = tok.encode(["the tac"])[0]  # "tac" was never seen: its characters
    assert len(spelled) == 1 + 4 and tok.decode(spelled) == "the tac"
    assert tok.encode(["\u4e2d"])[0] == [tok.unk_id]  # an unseen character


def test_the_vocabulary_is_size_limited_and_keeps_the_most_frequent_words():
    table = WordTokenizer.vocabulary(TEXTS, set("".join(TEXTS)), vocab_size=3 + len(set("".join(TEXTS))) + 4)
    assert table["words"] == ["the", "dog"]  # room for two words at two entries each: the two most frequent, in order


def test_word_kind_in_the_stage_reports_fertility_and_trains_every_arch(tmp_path, small_corpus):
    summary = build_tokenizer(TokenizerConfig(kind="word", vocab_size=2000), _records(small_corpus), tmp_path, LOG)
    assert summary["kind"] == "word" and summary["vocab_size"] <= 2000
    assert json.loads((tmp_path / "vocab.json").read_text())["kind"] == "word"  # JSON, not pickle
    en = summary["fertility"]["en"]
    assert en["tokens_per_word"] >= 1.0 and en["continued_word_share"] < 0.3  # most words are one token (the rest:
    # a word with punctuation attached, "time," is two, or one too rare to be kept)
    assert en["unknown_rate"] == 0.0  # every character of the corpus is in the fallback
    tok = load_tokenizer(tmp_path)
    text = json.loads(small_corpus.read_text().splitlines()[0])["text"]
    ids = tok.encode([text])[0]
    assert tok.decode(ids) == text
    for arch in ("gpt", "llama", "mamba2"):
        model = build_model(ModelConfig(arch=arch, vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2,
                                        block_size=64, headdim=16, chunk_size=16))
        x = torch.tensor([ids[:33]])
        _, loss = model(x[:, :-1], x[:, 1:])
        assert torch.isfinite(loss)


def test_export_skips_a_word_vocabulary_with_a_reason(tmp_path):
    import pytest

    from model.export import ExportError
    from model.export.hf import sentencepiece_file

    (tmp_path / "vocab.json").write_text(json.dumps(WordTokenizer.vocabulary(TEXTS, set("".join(TEXTS)), 64)))
    with pytest.raises(ExportError, match="word-level"):
        sentencepiece_file(tmp_path)
