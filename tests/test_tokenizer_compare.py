"""tokenizer.candidates: several vocabularies trained on one sample, reported side by side; the chosen one continues."""
from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from model.tokenizer import load_tokenizer
from pipeline_config.schema import TokenizerConfig
from tasks.tokenizer import build_tokenizer

LOG = logging.getLogger("test")
CANDIDATES = [{"kind": "sentencepiece", "model_type": "bpe", "vocab_size": 320},
              {"kind": "sentencepiece", "model_type": "unigram", "vocab_size": 400},
              {"kind": "word", "vocab_size": 600}, {"kind": "char"}]


def _records(small_corpus) -> list[dict[str, str]]:
    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    return [{"text": t, "language": "en"} for t in texts[:60]] + [
        {"text": "el pequeño perro jugaba en el jardín con su pelota roja. " * 3, "language": "es"}]


def test_candidates_are_compared_per_language_and_the_chosen_one_continues(tmp_path, small_corpus):
    cfg = TokenizerConfig(candidates=CANDIDATES, choose="word-600")
    summary = build_tokenizer(cfg, _records(small_corpus), tmp_path, LOG)
    assert summary["kind"] == "word" and load_tokenizer(tmp_path).kind == "word"  # the chosen one is the tokenizer
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert table["chosen"] == "word-600"
    rows = {(r["candidate"], r["language"]): r for r in table["rows"]}
    assert set(rows) == {(c, lang) for c in ("bpe-320", "unigram-400", "word-600", "char") for lang in ("en", "es")}
    assert [r["candidate"] for r in table["rows"] if r["chosen"]] == ["word-600", "word-600"]
    # Characters: one token per character, so the most tokens per word and about one byte per token.
    assert rows["char", "en"]["tokens_per_word"] > rows["bpe-320", "en"]["tokens_per_word"] > 1.0
    assert rows["char", "en"]["bytes_per_token"] < 1.1 < rows["bpe-320", "en"]["bytes_per_token"]
    # The chosen candidate's row is the stage's own fertility report, not a second training.
    assert rows["word-600", "en"]["tokens_per_word"] == summary["fertility"]["en"]["tokens_per_word"]
    assert load_tokenizer(tmp_path / "candidates" / "unigram-400").vocab_size <= 400
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert {"comparison.json", "comparison.png", "candidates/bpe-320/tokenizer.model"} <= set(summary["files"])


def test_without_a_choice_the_first_candidate_continues(tmp_path, small_corpus):
    summary = build_tokenizer(TokenizerConfig(candidates=CANDIDATES[:2]), _records(small_corpus), tmp_path, LOG)
    assert summary["comparison"]["chosen"] == "bpe-320" and summary["vocab_size"] == 320


def test_a_choice_that_is_not_a_candidate_is_a_config_error():
    with pytest.raises(ValidationError, match="tokenizer.choose 'bpe-999' is not a candidate: choose one of bpe-320"):
        TokenizerConfig(candidates=CANDIDATES, choose="bpe-999")
    with pytest.raises(ValidationError, match="named alike"):
        TokenizerConfig(candidates=[CANDIDATES[0], CANDIDATES[0]])
