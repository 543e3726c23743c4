"""Prefect artifacts from inside a stage: progress while it runs, markdown or a table when it ends.

Prefect's own artifact API (`prefect.artifacts`), so they show on the flow run's and task run's Artifacts tabs and,
by key, on the Artifacts page (one version per run). Every call here is a no-op outside a flow or task run (a test
or a benchmark calling a stage function) or when `report.prefect_artifacts` is off, and an error from the Prefect API
is logged once and swallowed: what a person looks at must never fail the work.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import re
import time
from typing import Any, Callable, Iterator

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("scriptorium_prefect_artifacts", default=True)
_warned: list[str] = []
PROGRESS_EVERY_S = 2.0  # a progress artifact is one API call per update: at most one every this many seconds


@contextlib.contextmanager
def reporting(enabled: bool) -> Iterator[None]:
    """Publish artifacts (when inside a run) or not, for the block: `report.prefect_artifacts` around a stage."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def in_run() -> bool:
    """Whether an artifact made now has a flow or task run to belong to (and publishing is on)."""
    if not _ENABLED.get():
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def artifact_key(text: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from any label: "shard: chunks tokenized" ->
    "shard-chunks-tokenized"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "scriptorium"


def _call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """A Prefect artifact call that never fails the stage: the first error is logged, the call returns None."""
    try:
        return fn(**kwargs, _sync=True)
    except Exception as exc:  # the API is down, slow, or refuses the artifact: the stage goes on regardless
        if not _warned:
            _warned.append(type(exc).__name__)
            logging.getLogger("scriptorium").warning("Prefect artifact not published (%s: %s); the run goes on",
                                                     type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc)
                                                     else "")
        return None


def publish(key: str, *, markdown: str | None = None, table: list[dict[str, Any]] | None = None,
            description: str | None = None) -> bool:
    """A markdown or table artifact under `key`; False when there is no run to attach it to (or it failed)."""
    if not in_run():
        return False
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if table is not None:
        made = _call(create_table_artifact, table=_plain(table), key=artifact_key(key), description=description)
    else:
        made = _call(create_markdown_artifact, markdown=markdown or "", key=artifact_key(key), description=description)
    return made is not None


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table cells Prefect's JSON accepts: non-finite floats become None, other values stay."""
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()} for row in rows]


class Progress:
    """A Prefect progress artifact for a loop of `total` units: `update(done, detail)` as it goes.

    Created only inside a run; updates are throttled to one every `PROGRESS_EVERY_S` seconds, the last one (done ==
    total) always goes out. Outside a run every method does nothing, at the cost of one check."""

    def __init__(self, key: str, total: int, what: str):
        self.total, self.what, self._last = max(int(total), 0), what, -math.inf
        self.id = None
        if in_run():
            from prefect.artifacts import create_progress_artifact

            self.id = _call(create_progress_artifact, progress=0.0, key=artifact_key(key),
                            description=f"{what}: 0/{self.total}")

    def update(self, done: int, detail: str = "") -> None:
        if self.id is None:
            return
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY_S and done < self.total:
            return
        self._last = now
        from prefect.artifacts import update_progress_artifact

        percent = 100.0 * min(done / self.total, 1.0) if self.total else 100.0
        description = f"{self.what}: {done}/{self.total}" + (f", {detail}" if detail else "")
        if _call(update_progress_artifact, artifact_id=self.id, progress=percent, description=description) is None:
            self.id = None  # the API failed once: stop calling it for this loop
