"""What the data stages wrote, as later stages read it: the corpus in chunks, and the token shards one at a time.

The corpus is acquire's documents followed by synthesize's accepted stories. Both stages write their own format
(Parquet for documents, an append-only JSONL for stories, because stories arrive one at a time and must survive a
kill); this is the one place that reads them back. Nothing here holds the whole corpus: a `Corpus` is a list of
`Chunk`s (a row group of documents, or a few megabytes of stories carried inline), each read when it is used, so a
chunk is also the unit of work the shard stage maps over its task runner. A `Batch` is a chunk's documents with their
languages and content hashes.

Shards are read back as `ShardTokens`: a split's shards, each read zero-copy (one row group, one flat column) when
first used, never concatenated into one array. The file names come from the stages that write them.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from tasks.corpus.sampling import content_hashes
from tasks.stage import Artifact, read_jsonl

INLINE_CHUNK_BYTES = 4_000_000


@dataclass(frozen=True)
class Batch:
    texts: list[str]
    languages: list[str]
    hashes: np.ndarray  # uint64 content hashes (tasks/corpus/sampling.py)


@dataclass(frozen=True)
class Chunk:
    """One unit of reading and of mapped work: a row group of acquire's Parquet file, or documents carried inline."""

    path: str | None = None
    row_group: int = 0
    texts: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()

    def read(self) -> Batch:
        if self.path is None:
            return Batch(list(self.texts), list(self.languages), content_hashes(list(self.texts)))
        table = pq.ParquetFile(self.path).read_row_group(self.row_group, columns=["text", "language", "hash"])
        return Batch(table.column("text").to_pylist(), table.column("language").to_pylist(),
                     table.column("hash").to_numpy())

    def keys(self) -> tuple[np.ndarray, np.ndarray]:
        """Languages and hashes without the text (for Parquet, two small columns)."""
        if self.path is None:
            return np.asarray(self.languages, dtype=object), content_hashes(list(self.texts))
        table = pq.ParquetFile(self.path).read_row_group(self.row_group, columns=["language", "hash"])
        return np.asarray(table.column("language").to_pylist(), dtype=object), table.column("hash").to_numpy()


@dataclass
class Corpus:
    chunks: list[Chunk]
    languages: dict[str, dict[str, int]] = field(default_factory=dict)  # {language: {documents, bytes}}

    @property
    def documents(self) -> int:
        return sum(row["documents"] for row in self.languages.values())

    def batches(self) -> Iterator[Batch]:
        for chunk in self.chunks:
            yield chunk.read()

    def __add__(self, other: "Corpus") -> "Corpus":
        languages: dict[str, Counter] = {}
        for part in (self, other):
            for lang, row in part.languages.items():
                languages.setdefault(lang, Counter()).update(row)
        return Corpus(self.chunks + other.chunks, {lang: dict(c) for lang, c in sorted(languages.items())})

    @classmethod
    def from_records(cls, records: list[dict[str, str]]) -> "Corpus":
        """Documents in memory ({text, language}), as inline chunks of about INLINE_CHUNK_BYTES."""
        chunks, languages, texts, langs, size = [], {}, [], [], 0
        for record in records:
            lang, nbytes = record.get("language", "en"), len(record["text"].encode("utf-8"))
            row = languages.setdefault(lang, {"documents": 0, "bytes": 0})
            row["documents"], row["bytes"] = row["documents"] + 1, row["bytes"] + nbytes
            texts.append(record["text"])
            langs.append(lang)
            size += nbytes
            if size >= INLINE_CHUNK_BYTES:
                chunks.append(Chunk(texts=tuple(texts), languages=tuple(langs)))
                texts, langs, size = [], [], 0
        if texts:
            chunks.append(Chunk(texts=tuple(texts), languages=tuple(langs)))
        return cls(chunks, dict(sorted(languages.items())))

    @classmethod
    def of(cls, acquire: Artifact | None, synthesize: Artifact | None) -> "Corpus":
        return documents(acquire) + cls.from_records(stories(synthesize))


def documents(artifact: Artifact | None) -> Corpus:
    from tasks.acquire import DOCUMENTS  # here, not at the top: training reads shards without importing the stages

    if artifact is None:
        return Corpus([])
    path = artifact.path / DOCUMENTS
    chunks = [Chunk(path=str(path), row_group=i) for i in range(pq.ParquetFile(path).num_row_groups)]
    return Corpus(chunks, artifact.manifest.get("languages", {}))


def stories(artifact: Artifact | None) -> list[dict[str, str]]:
    """Accepted stories with index < the requested n (a larger earlier run may have left more on disk)."""
    from tasks.synthesize import STORIES

    if artifact is None:
        return []
    wanted = artifact.manifest.get("config", {}).get("n")
    return [
        {"text": record["text"], "language": record.get("language", "en")}
        for record in read_jsonl(artifact.path / STORIES)
        if wanted is None or record.get("index", 0) < wanted
    ]


# ---------------------------------------------------------------------------------------------------------- shards
def read_shard(path: Path) -> np.ndarray:
    """A shard's tokens without a copy (read-only): one row group of one flat column is one contiguous buffer."""
    return pq.ParquetFile(path).read().column(0).chunk(0).to_numpy(zero_copy_only=True)


class ShardTokens:
    """A split's tokens as its shards: each read when first used and kept, never concatenated with the others."""

    def __init__(self, paths: list[Path | None], sizes: list[int], arrays: list[np.ndarray | None] | None = None):
        self.paths, self.sizes = paths, np.asarray(sizes, dtype=np.int64)
        self._arrays = arrays or [None] * len(paths)

    @classmethod
    def of(cls, tokens: "np.ndarray | ShardTokens") -> "ShardTokens":
        """`tokens` as is, or an in-memory array as a split of one shard."""
        return tokens if isinstance(tokens, ShardTokens) else cls([None], [tokens.size], [tokens])

    @property
    def size(self) -> int:
        return int(self.sizes.sum())

    def __len__(self) -> int:
        return len(self.sizes)

    def shard(self, index: int) -> np.ndarray:
        if self._arrays[index] is None:
            self._arrays[index] = read_shard(self.paths[index])
        return self._arrays[index]

    def read(self, index: int) -> np.ndarray:
        """Shard `index` without keeping it (for one pass over the split, e.g. evaluation)."""
        return self._arrays[index] if self._arrays[index] is not None else read_shard(self.paths[index])

    def windows(self, index: int, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows of `length` consecutive tokens of shard `index`, one per start."""
        return self.shard(index)[starts[:, None] + np.arange(length)]

    def spilled(self, directory: Path) -> "ShardTokens":
        """The same split, each shard decompressed once into `directory` as a raw file that windows are read from.

        Random windows over a zstd Parquet shard need the whole shard decompressed; kept in memory that is 2 bytes a
        token of the whole training set. Read from a raw file with one positioned read per window, the tokens stay
        in the page cache, which the kernel owns and drops at will, so the process's memory does not grow with the
        corpus. (Not a memory map: on this kernel a touch maps a whole 2 MB folio into the process, so a mapped
        training set shows up in its resident size after a few hundred windows.) In-memory arrays are kept as is."""
        return _SpilledShardTokens(self.paths, list(self.sizes), list(self._arrays), Path(directory))


class _SpilledShardTokens(ShardTokens):
    def __init__(self, paths: list[Path | None], sizes: list[int], arrays: list[np.ndarray | None], directory: Path):
        super().__init__(paths, sizes, arrays)
        self.directory, self._dtypes = directory, {}

    def _file(self, index: int) -> tuple[Path, np.dtype]:
        raw = self.directory / f"{index:05d}.tokens"
        if index not in self._dtypes:
            tokens = read_shard(self.paths[index])
            tokens.tofile(raw)  # private scratch: complete once recorded in _dtypes, so no rename, no fsync
            self._dtypes[index] = tokens.dtype
        return raw, self._dtypes[index]

    def windows(self, index: int, starts: np.ndarray, length: int) -> np.ndarray:
        if self._arrays[index] is not None:
            return super().windows(index, starts, length)
        raw, dtype = self._file(index)
        rows = np.empty((len(starts), length), dtype=dtype)
        with open(raw, "rb", buffering=0) as handle:
            for row, start in zip(rows, starts):
                handle.seek(int(start) * dtype.itemsize)
                handle.readinto(memoryview(row).cast("B"))
        return rows

    def shard(self, index: int) -> np.ndarray:
        """The whole shard, read from its raw file and not kept (an evaluation pass reads one at a time)."""
        if self._arrays[index] is not None:
            return self._arrays[index]
        raw, dtype = self._file(index)
        return np.fromfile(raw, dtype=dtype)

    read = shard


def split_shards(artifact: Artifact, split: str, language: str | None = None) -> list[dict[str, Any]]:
    return [s for s in artifact.manifest["shards"] if s["split"] == split and s["tokens"] > 0
            and (language is None or s.get("language") == language)]


def split_tokens(artifact: Artifact, split: str, language: str | None = None) -> ShardTokens:
    """The tokens of a split (of one language's part of it, for validation shards), shard by shard."""
    shards = split_shards(artifact, split, language)
    if not shards:
        raise ValueError(f"no {split} shards{f' for {language}' if language else ''} in {artifact.path}")
    return ShardTokens([artifact.path / s["file"] for s in shards], [s["tokens"] for s in shards])


def split_languages(artifact: Artifact, split: str) -> list[str | None]:
    """The languages a split's shards are labelled with (None for shards written without one)."""
    return sorted({s.get("language") for s in split_shards(artifact, split)}, key=lambda lang: lang or "")
