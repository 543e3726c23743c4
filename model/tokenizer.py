"""The runtime side of a tokenizer artifact: encode and decode with what the tokenizer stage trained.

It lives in `model/` because a registered MLflow model carries this package with it: whoever loads the model from
the registry can turn text into ids without the pipeline installed. Three kinds share one interface: SentencePiece
(`tokenizer.model`), character-level (`vocab.json` holding a list: every character seen in training plus <unk>, <s>,
</s>) and word-level (`vocab.json` holding {"kind": "word", ...}: whole words, unknown words spelled in characters).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

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


class WordTokenizer:
    """Whole words from the documents, as the YS-71M seed's vocabulary; a word not in it is spelled in characters.

    Text is cut into pieces: a word (`\\w+`) with the single space before it if there is one, or any other single
    character. Each kept word has two entries, with and without that space, so a word costs one token both inside a
    sentence and at a line's start (and in the fertility report, which encodes words on their own). Decoding
    concatenates the pieces, so decode(encode(x)) == x whenever every character of x was seen in training; an unseen
    character is <unk>. The words kept are the most frequent ones, as many as fit `vocab_size` after the characters.
    """

    kind = "word"
    PIECE = re.compile(r" ?\w+|.", re.DOTALL)

    def __init__(self, vocab_file: Path):
        table = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        if table.get("kind") != self.kind:
            raise ValueError(f"{vocab_file}: not a word vocabulary (kind {table.get('kind')!r})")
        words = table["words"]
        self.itos: list[str] = SPECIALS + table["characters"] + words + [" " + w for w in words]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.unk_id, self.bos_id, self.eos_id = UNK, BOS, EOS

    @classmethod
    def vocabulary(cls, texts: Iterable[str], characters: Iterable[str], vocab_size: int) -> dict:
        """The JSON table of a word vocabulary: `characters` (the fallback), then the most frequent words (ties by
        spelling, so the table is deterministic) that fit in `vocab_size` at two entries each."""
        characters = sorted(set(characters))
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(p.lstrip(" ") for p in cls.PIECE.findall(text) if len(p.lstrip(" ")) > 1)
        room = max(vocab_size - len(SPECIALS) - len(characters), 0) // 2
        words = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:room]
        return {"kind": cls.kind, "characters": characters, "words": [w for w, _ in words]}

    def _piece_ids(self, piece: str) -> list[int]:
        found = self.stoi.get(piece)
        if found is not None:
            return [found]
        get = self.stoi.get
        return [get(ch, UNK) for ch in piece]

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        stoi, pieces = self.stoi, self.PIECE.findall
        out = []
        for text in texts:
            ids: list[int] = []
            for piece in pieces(text):
                found = stoi.get(piece)
                if found is None:
                    ids.extend(self._piece_ids(piece))
                else:
                    ids.append(found)
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIALS) and i < self.vocab_size)


def load_tokenizer(directory: Path) -> SentencePieceTokenizer | CharTokenizer | WordTokenizer:
    directory = Path(directory)
    if (directory / "tokenizer.model").is_file():
        return SentencePieceTokenizer(directory / "tokenizer.model")
    if (directory / "vocab.json").is_file():
        with open(directory / "vocab.json", encoding="utf-8") as handle:
            is_words = handle.read(1) == "{"  # a char vocabulary is a JSON list, a word vocabulary an object
        return (WordTokenizer if is_words else CharTokenizer)(directory / "vocab.json")
    raise FileNotFoundError(f"no tokenizer.model or vocab.json in {directory}")
