"""The tokenizer stage's settings: the kind of vocabulary, its size, and a comparison of candidates."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline_config.registry import MODEL_REF, RegistryRef
from pipeline_config.section import Section


# SentencePiece with byte fallback reserves one piece per byte value plus <unk>, <s>, </s>, and needs one more for
# every distinct character of the corpus on top (about 100 for English prose).
BYTE_FALLBACK_PIECES = 256 + 3


def _check_byte_room(kind: str, byte_fallback: bool, vocab_size: int) -> None:
    if kind == "sentencepiece" and byte_fallback and vocab_size <= BYTE_FALLBACK_PIECES:
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for pieces: byte fallback alone takes "
            f"{BYTE_FALLBACK_PIECES} (256 bytes + 3 specials) and every distinct character of the corpus needs one "
            f"more (about 100 for English prose, so {BYTE_FALLBACK_PIECES + 100} or more), or set "
            "tokenizer.byte_fallback=false"
        )


class TokenizerCandidate(Section):
    """One vocabulary of a tokenizer comparison (`tokenizer.candidates`)."""

    kind: Literal["sentencepiece", "char", "word"] = "sentencepiece"
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(1024, ge=32)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*$", description="how the report and "
                             "`tokenizer.choose` name it; default kind-model_type-vocab_size (char: just `char`)")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "char":
            return "char"
        return f"word-{self.vocab_size}" if self.kind == "word" else f"{self.model_type}-{self.vocab_size}"


class TokenizerConfig(Section):
    kind: Literal["sentencepiece", "char", "word"] = "sentencepiece"
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(1024, ge=32, description="target size (sentencepiece); word: the most entries (characters, "
                            "then the most frequent words, two entries each); char-level uses what it sees")
    candidates: list[TokenizerCandidate] = Field(default_factory=list, description="a comparison: each trained on "
                                                 "the same sample and reported side by side per language; the one "
                                                 "`choose` names (or the first) replaces kind/model_type/vocab_size")
    choose: str | None = Field(None, description="the candidate (by name) that continues the pipeline")
    byte_fallback: bool = True
    character_coverage: float = Field(1.0, gt=0, le=1)
    train_bytes: int = Field(20_000_000, gt=0, description="size of the sample the vocabulary is learned from, drawn "
                             "evenly over the whole corpus (by content hash) and stratified by language")
    language_exponent: float = Field(1.0, ge=0, le=1, description="each language's share of that sample goes as its "
                                     "bytes to this power: 1 proportional, 0 equal shares (capped at what it has)")
    fertility_bytes: int = Field(2_000_000, gt=0, description="per language, the sample the fertility report encodes")
    num_threads: int = Field(2, ge=1)
    from_model: str | None = Field(
        None, pattern=MODEL_REF, description="champion, models:/NAME/VERSION or models:/NAME@ALIAS: take that "
        "registered model's vocabulary instead of learning one (what train.init_from needs once the data changed); "
        "while there is no champion yet, one is learned")
    registry: RegistryRef | None = Field(None, exclude=True, description="filled in by the pipeline")

    @model_validator(mode="after")
    def _room_for_bytes(self) -> "TokenizerConfig":
        _check_byte_room(self.kind, self.byte_fallback, self.vocab_size)
        labels = [c.label for c in self.candidates]
        for candidate in self.candidates:
            _check_byte_room(candidate.kind, self.byte_fallback, candidate.vocab_size)
        if len(set(labels)) < len(labels):
            raise ValueError(f"tokenizer.candidates: two candidates are named alike ({', '.join(labels)}); give each a "
                             "distinct `name`")
        if self.choose is not None and self.choose not in labels:
            raise ValueError(f"tokenizer.choose '{self.choose}' is not a candidate: choose one of "
                             f"{', '.join(labels) or '(none: add tokenizer.candidates)'}")
        return self

    @property
    def chosen_label(self) -> str | None:
        """The name of the candidate that continues the pipeline (None without candidates)."""
        return (self.choose or self.candidates[0].label) if self.candidates else None

    def chosen(self) -> "TokenizerConfig":
        """The configuration that continues the pipeline: the chosen candidate's kind, model_type and vocab_size."""
        if not self.candidates:
            return self
        return self.candidate(next(c for c in self.candidates if c.label == self.chosen_label))

    def candidate(self, candidate: TokenizerCandidate) -> "TokenizerConfig":
        """These settings with one candidate's kind, model_type and vocab_size, and no comparison of its own."""
        return self.model_copy(update={"kind": candidate.kind, "model_type": candidate.model_type,
                                       "vocab_size": candidate.vocab_size, "candidates": [], "choose": None})
