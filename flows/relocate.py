"""`scriptorium relocate`: point a moved artifacts directory's MLflow store at its files again.

The pipeline's default MLflow store (`artifacts/mlflow/mlflow.db`) records where each run's and model's files are as
absolute `file://` URIs under `artifacts/mlflow/artifacts`, as MLflow always does. Prefect's cache survives moving
(or copying) the artifacts directory, since its records are relative; the MLflow store did not: the registered
versions could not be loaded from the new place, and the next run wrote its version's files back at the old path
(re-creating it). `moved_from` finds that before any stage runs (`flows/preflight.py` stops the run, naming this
command), and `relocate` rewrites the prefix in the columns MLflow reads files from (experiments, runs, logged models,
model versions), in one SQLite transaction under the artifacts lock. Only the default store is concerned: a store at
`register.tracking_uri` has its own artifact root.
"""
from __future__ import annotations

import contextlib
import sqlite3
import urllib.parse
from pathlib import Path

from tasks.stage import hold_artifacts

STORE = Path("mlflow") / "mlflow.db"
FILES = Path("mlflow") / "artifacts"
COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
           ("model_versions", "storage_location"), ("model_versions", "source"))


def files_uri(root: Path) -> str:
    """Where the default store under `root` should keep its files: `<root>/mlflow/artifacts` as a file:// URI."""
    return (Path(root).resolve() / FILES).as_uri()


def moved_from(root: Path) -> str | None:
    """The `file://` URI the default store under `root` keeps its files at, when that is not under `root` now (read
    only; None when there is no store, or it is where it was made)."""
    db = Path(root).resolve() / STORE
    if not db.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as connection:
            locations = [row[0] for row in connection.execute("SELECT artifact_location FROM experiments")]
    except sqlite3.Error as err:
        if "locked" in str(err):
            raise
        return None  # not a store MLflow made: register says what is wrong with it
    here = files_uri(root)
    for location in locations:
        location = (location or "").rstrip("/")
        if location.startswith("file://") and location.endswith("/" + FILES.as_posix()) and location != here:
            return location
    return None


def moved_message(root: Path, old: str) -> str:
    was = urllib.parse.unquote(old.removeprefix("file://").removesuffix("/" + FILES.as_posix()))
    return (f"artifacts_dir {Path(root).resolve()} was moved or copied from {was}: its MLflow store keeps the "
            f"registered versions' files at {old}, so they cannot be loaded from here and this run would register "
            f"into the old place; run `scriptorium relocate --artifacts-dir {root}` to point the store at its files "
            "here (or move the folder back)")


def relocate(root: Path) -> tuple[str | None, dict[str, int]]:
    """Rewrite the old prefix to this place in every file location the store holds; returns the old prefix (None when
    the store is where it was made) and the rows changed per column. One transaction: all rows move, or none."""
    root = Path(root).resolve()
    with hold_artifacts(root):
        old = moved_from(root)
        if old is None:
            return None, {}
        new, changed = files_uri(root), {}
        with contextlib.closing(sqlite3.connect(root / STORE)) as connection, connection:  # one transaction
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, column in COLUMNS:
                if table not in tables:
                    continue
                cursor = connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 (names from COLUMNS)
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, old, len(old) + 1, old + "/"))
                changed[f"{table}.{column}"] = cursor.rowcount
        return old, changed
