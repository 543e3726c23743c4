"""The synthesize stage's output is a journal, not a result: stories are appended the moment they are judged.

One fsynced JSON line per record, so a killed run loses at most the stories being decoded at that instant. Reading
follows the pipeline's one rule for JSON-lines files (`tasks.stage.read_jsonl`: a torn last line is dropped, a bad
line before it is an error); before appending, a torn tail is cut off so the next record starts on a line of its own.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from tasks.stage import TornFileError, read_jsonl, seal_jsonl
from tasks.synthesis.backend import SynthesizeError


class Journal:
    """An append-only JSON-lines file of records."""

    def __init__(self, path: Path, log: logging.Logger):
        self.path = path
        self.log = log
        self._handle = None

    def read(self) -> list[dict[str, Any]]:
        """Every complete record; a torn last line is cut off the file so appending can go on."""
        try:
            records = read_jsonl(self.path, self.log)
        except TornFileError as err:
            raise SynthesizeError(str(err)) from None
        seal_jsonl(self.path)
        return records

    def append(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            self._handle = open(self.path, "ab")
        self._handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def touch(self) -> None:
        self.path.touch(exist_ok=True)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
