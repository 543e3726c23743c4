"""`flows/prune.py`'s choice of what to keep, on stage directories written with the pipeline's own manifests."""
from __future__ import annotations

import json
import os
from pathlib import Path

from flows.prune import plan, prune
from tasks.stage import MANIFEST, write_manifest


def _stage(root: Path, stage: str, key: str, when: int, downloads: tuple[str, ...] = (), **upstream: str) -> str:
    """A finished stage directory whose manifest was written at `when`; returns its fingerprint."""
    (root / stage / key).mkdir(parents=True)
    (root / stage / key / "weights.bin").write_bytes(b"\0" * 100)
    fields = {"cache_key": key, "upstream": upstream, "version": key, "downloads": list(downloads)}
    artifact = write_manifest(root / stage / key, stage, fields)
    os.utime(root / stage / key / MANIFEST, (when, when))
    return artifact.fingerprint


def _names(entries) -> set[str]:
    return {f"{e.stage}/{e.path.name}" for e in entries}


def test_what_was_finished_after_the_oldest_kept_version_stays_even_outside_its_lineage(tmp_path):
    """A run that failed after the newest version (its train finished, nothing registered) is to be re-run: its
    train and the older shard it read stay, as does the shard a stopped training run names. The older version's own
    train goes; the shard both versions read stays."""
    shard = _stage(tmp_path, "shard", "s", 100)
    _stage(tmp_path, "register", "r1", 300, train=_stage(tmp_path, "train", "t1", 200, shard=shard))
    _stage(tmp_path, "register", "r2", 500, train=_stage(tmp_path, "train", "t2", 400, shard=shard))
    _stage(tmp_path, "train", "t3", 600, shard=_stage(tmp_path, "shard", "s0", 50))  # on an older shard: it stays
    (tmp_path / "train" / "t4" / "checkpoints").mkdir(parents=True)  # unfinished: no manifest, resumed later
    (tmp_path / "train" / "t4" / "upstream.json").write_text(json.dumps({"shard": _stage(tmp_path, "shard", "s1", 60)}))

    newest = plan(tmp_path, keep=1)
    assert _names(newest.removed) == {"register/r1", "train/t1"}
    assert _names(newest.kept) == {"shard/s", "train/t2", "register/r2", "train/t3", "shard/s0", "shard/s1"}
    assert _names(newest.unfinished) == {"train/t4"} and _names(newest.roots) == {"register/r2"}
    assert plan(tmp_path, keep=2).removed == []


def test_a_download_goes_with_the_last_acquire_directory_that_read_it(tmp_path):
    """Two byte budgets over the same two remote files, then a corpus of one of them: the folder only the old acquire
    read goes, the shared one stays; while an acquire directory is unfinished (maybe resuming a download), none go."""
    for folder in ("aaa", "bbb", "hf/org/tiny/main"):
        (tmp_path / "acquire" / ".downloads" / folder).mkdir(parents=True)
        (tmp_path / "acquire" / ".downloads" / folder / "data.jsonl").write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    _stage(tmp_path, "acquire", "a0", 50, downloads=("aaa", "bbb", "../../elsewhere", str(tmp_path / "elsewhere")))
    old = _stage(tmp_path, "acquire", "a1", 100, downloads=("aaa", "bbb", "hf/org/tiny/main"))
    new = _stage(tmp_path, "acquire", "a2", 300, downloads=("bbb",))
    _stage(tmp_path, "register", "r1", 200, acquire=old)
    _stage(tmp_path, "register", "r2", 400, acquire=new)

    result = plan(tmp_path, keep=1)
    assert _names(result.removed) == {"acquire/a0", "acquire/a1", "register/r1"}
    assert sorted(e.path.relative_to(tmp_path / "acquire" / ".downloads").as_posix() for e in result.downloads) == \
        ["aaa", "hf/org/tiny/main"]
    assert ".downloads" not in {e.path.name for e in result.kept + result.unfinished}
    (tmp_path / "acquire" / "a3").mkdir()
    assert plan(tmp_path, keep=1).downloads == []
    (tmp_path / "acquire" / "a3").rmdir()
    prune(tmp_path, keep=1)
    assert sorted(p.name for p in (tmp_path / "acquire" / ".downloads").iterdir()) == ["bbb"]
    assert (tmp_path / "elsewhere").is_dir()  # a manifest is data: a folder it names outside .downloads stays


def test_without_a_register_artifact_nothing_is_old(tmp_path):
    _stage(tmp_path, "train", "t1", 200, shard=_stage(tmp_path, "shard", "s", 100))
    nothing = plan(tmp_path, keep=1)
    assert nothing.removed == [] and _names(nothing.kept) == {"shard/s", "train/t1"}


def test_prune_does_not_touch_a_directory_a_run_holds(tmp_path, capsys):
    """Another process holds the artifacts lock (as a run does): `--no-wait` says who in one line and removes
    nothing; a directory that does not exist is named, not created."""
    import subprocess
    import sys

    from flows.cli import main as cli

    shard = _stage(tmp_path, "shard", "s", 100)
    _stage(tmp_path, "register", "r1", 300, train=_stage(tmp_path, "train", "t1", 200, shard=shard))
    _stage(tmp_path, "register", "r2", 500, shard=shard)
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert cli(["prune", "--artifacts-dir", str(tmp_path), "--keep", "1", "--no-wait"]) == 1
        assert "is in use by" in capsys.readouterr().err
        assert (tmp_path / "train" / "t1" / MANIFEST).is_file()
    finally:
        holder.kill()
        holder.wait()
    assert cli(["prune", "--artifacts-dir", str(tmp_path / "nowhere")]) == 1
    assert "no such artifacts directory" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
