"""Fault injection: SIGKILL the pipeline at a random moment of a random stage, re-run it, check nothing is lost or stale.

    .venv/bin/python benchmarks/faults.py [--n 20] [--seed 0] [--keep DIR]

One artifacts directory lives through all N rounds, as a nightly deployment's does. Each round picks a stage at
random, changes one knob of that stage (so it and everything after it have work to do), starts `python -m flows`,
waits for the stage before it to finish (Prefect's `Finished in state` line), sleeps a random fraction of the chosen
stage's duration (measured on a clean first run), and sends SIGKILL. Then it runs the same command to the end and
checks:

- the re-run completes (exit 0);
- every manifest's files match their sizes and checksums, and every Prefect cache record is JSON, not a pickle;
- no story index appears twice in the synthesize journal;
- the MLflow store has one model version per lineage fingerprint and no RUNNING run;
- the champion alias is on the version with the best (lowest) validation bits per byte.

It prints one line per round (where the kill landed, what failed) and last `faults survived: K/N`. A Prefect server is
started once for all runs (each `python -m flows` would otherwise start its own); a round takes about 30-60 s on two
idle cores, so the default 20 rounds take 10-20 minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import closing, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.stage import PIPELINE, RESULTS_DIR, file_sha256, read_jsonl, trusted_record  # noqa: E402

SAMPLE = REPO / "data" / "tinystories-sample" / "stories.jsonl"
FINISHED = re.compile(r"Task run '(\w+)' - Finished in state (\w+)")


def base_overrides(artifacts: Path, corpus: Path) -> list[str]:
    """Quickstart shrunk to seconds per stage (the test suite's tiny configuration, with three stories)."""
    return [
        f"artifacts_dir={artifacts}", f"acquire.sources={json.dumps([{'path': str(corpus)}])}",
        "acquire.byte_budget=200000", "synthesize.n=3", "synthesize.max_tokens=48", "synthesize.quality.min_words=10",
        "tokenizer.vocab_size=320", "train.model.n_layer=1", "train.model.n_embd=32", "train.model.n_head=2",
        "train.model.block_size=32", "train.batch_size=4", "train.max_steps=30", "train.warmup_steps=2",
        "train.eval_interval=10", "train.eval_batches=2", "train.checkpoint_interval=5", "train.track_emissions=false",
        "evaluate.max_batches=2", "evaluate.max_new_tokens=8", "evaluate.prompts=[once upon a time]",
        "export.formats=[]",
    ]


def knob(stage: str, round_: int) -> list[str]:
    """An override that gives `stage` (and what follows it) new work in this round."""
    return {
        "acquire": [f"acquire.byte_budget={200000 - 997 * round_}"],
        "synthesize": [f"synthesize.n={3 + round_ % 3}"],
        "tokenizer": [f"tokenizer.vocab_size={320 + round_}"],
        "shard": [f"shard.val_fraction={0.05 + 0.001 * round_:.3f}"],
        "train": [f"train.seed={round_}"],
        "evaluate": [f"train.seed={round_}", f"evaluate.seed={round_}"],
        "export": [f"train.seed={round_}"],
        "register": [f"train.seed={round_}"],
    }[stage]


@contextmanager
def prefect_server(home: Path):
    """A Prefect API for every run of the benchmark, on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        else:
            raise SystemExit("the Prefect server did not start within two minutes")
        yield {**env, "PREFECT_API_URL": url}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


class Run:
    """`python -m flows` with its merged output read line by line (with arrival times) on a thread."""

    def __init__(self, overrides: list[str], env: dict[str, str]):
        command = [sys.executable, "-m", "flows", *[x for o in overrides for x in ("--set", o)]]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def finished(self) -> list[tuple[float, str, str]]:
        """(time, stage, state) of every `Finished in state` line so far."""
        return [(t, *m.groups()) for t, line in list(self.lines) if (m := FINISHED.search(line))]

    def wait(self) -> int:
        code = self.process.wait()
        self.reader.join(timeout=10)
        return code


def calibrate(overrides: list[str], env: dict[str, str]) -> dict[str, float]:
    """Seconds each stage took in a clean first run (from one `Finished` line to the next)."""
    run = Run(overrides, env)
    started = time.monotonic()
    if run.wait() != 0:
        raise SystemExit("the clean first run failed:\n" + "\n".join(line for _, line in run.lines[-40:]))
    durations, previous = {}, started
    for at, stage, _state in run.finished():
        durations[stage], previous = max(at - previous, 0.5), at
    return durations


def kill_during(stage: str, overrides: list[str], env: dict[str, str], durations: dict[str, float],
                rng: random.Random) -> str:
    """Start a run, SIGKILL it a random moment into `stage`; returns where the kill landed."""
    run = Run(overrides, env)
    before = PIPELINE[: PIPELINE.index(stage)]
    deadline = time.monotonic() + 600
    while run.process.poll() is None and time.monotonic() < deadline:
        done = {s for _, s, _ in run.finished()}
        if all(s in done for s in before if s in durations):
            break
        time.sleep(0.05)
    time.sleep(rng.uniform(0, durations.get(stage, 5.0)))
    if run.process.poll() is not None:
        run.wait()
        return "after the run ended (no kill)"
    run.process.send_signal(signal.SIGKILL)
    run.wait()
    done = [s for _, s, _ in run.finished()]
    running = next((s for s in PIPELINE if s in durations and s not in done), "the end")
    return f"in {running}" if running != "the end" else "after the last stage"


def check(artifacts: Path) -> list[str]:
    """Every invariant that does not hold, in words (empty when all hold)."""
    problems = []
    for manifest in sorted(artifacts.glob("*/*/manifest.json")):
        data = json.loads(manifest.read_text())
        for name, entry in data.get("files", {}).items():
            path = manifest.parent / name
            if not path.is_file() or path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
                problems.append(f"{path} does not match its manifest")
    problems += [f"{r} is not a JSON record" for r in (artifacts / RESULTS_DIR).glob("*") if not trusted_record(r)]
    for journal in artifacts.glob("synthesize/*/stories.jsonl"):
        indices = [record["index"] for record in read_jsonl(journal)]
        if len(indices) != len(set(indices)):
            problems.append(f"{journal} lists a story index twice")
    return problems + check_registry(artifacts / "mlflow" / "mlflow.db")


def check_registry(database: Path) -> list[str]:
    """One version per lineage fingerprint, no RUNNING run, and the champion on the best val_bpb."""
    if not database.is_file():
        return ["no MLflow store"]
    with closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as db:
        running = db.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
        per_lineage = db.execute(
            "SELECT t.value, COUNT(v.version) FROM tags t JOIN model_versions v ON v.run_id = t.run_uuid "
            "WHERE t.key = 'scriptorium.fingerprint' GROUP BY t.value HAVING COUNT(v.version) > 1").fetchall()
        figures = dict(db.execute(
            "SELECT v.version, m.value FROM model_versions v JOIN latest_metrics m ON m.run_uuid = v.run_id "
            "WHERE m.key = 'val_bpb' AND m.is_nan = 0").fetchall())
        champion = db.execute("SELECT version FROM registered_model_aliases WHERE alias = 'champion'").fetchone()
    problems = [f"{running} RUNNING run(s)"] if running else []
    problems += [f"lineage {fp[:12]} has {count} versions" for fp, count in per_lineage]
    if figures and (champion is None or not math.isclose(figures.get(champion[0], math.inf), min(figures.values()))):
        problems.append(f"champion is v{champion[0] if champion else None}, the best val_bpb is "
                        f"v{min(figures, key=figures.get)}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20, help="rounds (each: a killed run, then a run to the end)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stage and moment choices")
    parser.add_argument("--keep", type=Path, help="work in this directory (kept) instead of a temporary one")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.keep or Path(tempfile.mkdtemp(prefix="scriptorium-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    corpus.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:150]) + "\n", encoding="utf-8")
    base = base_overrides(work / "artifacts", corpus)
    survived = 0
    with prefect_server(work / "prefect-home") as env:
        durations = calibrate(base, env)
        print("clean run: " + ", ".join(f"{s} {d:.1f}s" for s, d in durations.items()), flush=True)
        for round_ in range(1, args.n + 1):
            stage = rng.choice([s for s in PIPELINE if s in durations])
            overrides = base + knob(stage, round_)
            landed = kill_during(stage, overrides, env, durations, rng)
            rerun = Run(overrides, env)
            code = rerun.wait()
            problems = ([f"re-run exited {code}: " + " | ".join(line for _, line in rerun.lines[-3:])] if code else [])
            problems += check(work / "artifacts")
            survived += not problems
            print(f"round {round_:2d}: {stage:10s} killed {landed:28s} {'ok' if not problems else '; '.join(problems)}",
                  flush=True)
    print(f"faults survived: {survived}/{args.n}")


if __name__ == "__main__":
    main()
