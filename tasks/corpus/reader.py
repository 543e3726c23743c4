"""What the data stages wrote, as later stages read it: the corpus (acquire's documents followed by synthesize's
accepted stories) and the token shards.

Both stages write their own format (Parquet for acquired documents, an append-only JSONL for stories, because stories
arrive one at a time and must survive a kill); this is the one place that reads them back as `{text, language}`. The
file names come from the stages that write them. Shards are read back as numpy arrays (`load_split`).
"""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from tasks.acquire import DOCUMENTS
from tasks.stage import Artifact, read_jsonl
from tasks.synthesize import STORIES


def documents(artifact: Artifact | None) -> list[dict[str, str]]:
    if artifact is None:
        return []
    return pq.read_table(artifact.path / DOCUMENTS, columns=["text", "language"]).to_pylist()


def stories(artifact: Artifact | None) -> list[dict[str, str]]:
    """Accepted stories with index < the requested n (a larger earlier run may have left more on disk)."""
    if artifact is None:
        return []
    wanted = artifact.manifest.get("config", {}).get("n")
    return [
        {"text": record["text"], "language": record.get("language", "en")}
        for record in read_jsonl(artifact.path / STORIES)
        if wanted is None or record.get("index", 0) < wanted
    ]


def corpus(acquire: Artifact | None, synthesize: Artifact | None) -> list[dict[str, str]]:
    return documents(acquire) + stories(synthesize)


def load_split(artifact: Artifact, split: str) -> np.ndarray:
    """All tokens of a split as one array; a single shard is returned zero-copy (read-only)."""
    arrays = [
        pq.ParquetFile(artifact.path / s["file"]).read().column(0).chunk(0).to_numpy(zero_copy_only=True)
        for s in artifact.manifest["shards"]
        if s["split"] == split and s["tokens"] > 0
    ]
    if not arrays:
        raise ValueError(f"no {split} shards in {artifact.path}")
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
