"""The runtime side of a tokenizer artifact: encode and decode with what the tokenizer stage trained.

It lives in `model/` because a registered MLflow model carries this package with it: whoever loads the model from
the registry can turn text into ids without the pipeline installed. Two kinds share one interface: SentencePiece
(`tokenizer.model`) and character-level (`vocab.json`, every character seen in training plus <unk>, <s>, </s>).
"""
from __future__ import annotations

import json
from pathlib import Path

UNK, BOS, EOS = 0, 1, 2
SPECIALS = ["<unk>", "<s>", "</s>"]


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        self.unk_id, self.bos_id, self.eos_id = self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class CharTokenizer:
    kind = "char"

    def __init__(self, vocab_file: Path):
        self.itos: list[str] = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.unk_id, self.bos_id, self.eos_id = UNK, BOS, EOS

    @classmethod
    def vocabulary(cls, texts: list[str]) -> list[str]:
        return SPECIALS + sorted({ch for text in texts for ch in text})

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        get = self.stoi.get
        return [[get(ch, UNK) for ch in text] for text in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIALS) and i < self.vocab_size)


def load_tokenizer(directory: Path) -> SentencePieceTokenizer | CharTokenizer:
    directory = Path(directory)
    if (directory / "tokenizer.model").is_file():
        return SentencePieceTokenizer(directory / "tokenizer.model")
    if (directory / "vocab.json").is_file():
        return CharTokenizer(directory / "vocab.json")
    raise FileNotFoundError(f"no tokenizer.model or vocab.json in {directory}")
