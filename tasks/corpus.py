"""The training corpus as downstream stages see it: acquire's documents followed by synthesize's accepted stories.

Both stages write their own format (Parquet for acquired documents, an append-only JSONL for stories, because stories
arrive one at a time and must survive a kill); this is the one place that reads them back as `{text, language}`.
"""
from __future__ import annotations

import json
from typing import Iterator

import pyarrow.parquet as pq

from tasks.artifacts import Artifact

DOCUMENTS = "documents.parquet"
STORIES = "stories.jsonl"


def documents(artifact: Artifact | None) -> list[dict[str, str]]:
    if artifact is None:
        return []
    return pq.read_table(artifact.path / DOCUMENTS, columns=["text", "language"]).to_pylist()


def stories(artifact: Artifact | None) -> list[dict[str, str]]:
    """Accepted stories with index < the requested n (a larger earlier run may have left more on disk)."""
    if artifact is None or not (artifact.path / STORIES).is_file():
        return []
    wanted = artifact.manifest.get("config", {}).get("n")
    return [
        {"text": record["text"], "language": record.get("language", "en")}
        for record in _json_lines(artifact.path / STORIES)
        if wanted is None or record.get("index", 0) < wanted
    ]


def _json_lines(path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # a torn last line from a killed writer
                continue


def corpus(documents_artifact: Artifact | None, stories_artifact: Artifact | None) -> list[dict[str, str]]:
    return documents(documents_artifact) + stories(stories_artifact)
