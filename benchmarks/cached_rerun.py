"""Wall seconds of a fully cached re-run of the pipeline, first line to last, as `make run` runs it.

    .venv/bin/python benchmarks/cached_rerun.py [--preset quickstart] [--set KEY=VALUE ...] [--ephemeral] [--compare]

Runs `python -m flows --server` (what `make run` runs: the local Prefect API kept in .prefect/, started on first
use) twice in a row on the same artifacts directory; the first run builds or refreshes every stage, the second finds
them all cached, and its wall time is the figure. `--ephemeral` runs without `--server` (Prefect's temporary API,
started per run), and `--compare` times both kinds of cached run alternately, N rounds (`--rounds`), so load moves
them equally and their ratio holds under load. The last line is `cached re-run: <seconds> s`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_flow(preset: str, overrides: list[str], server: bool, cached: bool = True) -> float:
    cmd = [sys.executable, "-m", "flows", "--preset", preset, *[a for kv in overrides for a in ("--set", kv)]]
    if server:
        cmd.append("--server")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if server:
        env.pop("PREFECT_API_URL", None)
    else:  # on a loaded machine the temporary API can take longer than Prefect's 20 s default to answer
        env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if cached and "Cached" not in done.stdout + done.stderr:  # a figure for a run that was not the cached one
        print("note: no stage of this run reported Cached", file=sys.stderr)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ephemeral", action="store_true", help="Prefect's temporary API per run, not --server")
    parser.add_argument("--compare", action="store_true", help="alternate cached runs with and without --server")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = not args.ephemeral
    first = run_flow(args.preset, args.overrides, server, cached=False)
    print(f"first run: {first:.1f} s", flush=True)
    if args.compare:
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for kind in (True, False):
                times[kind].append(run_flow(args.preset, args.overrides, kind))
        local, temporary = statistics.median(times[True]), statistics.median(times[False])
        print(f"cached, local API (--server): median {local:.1f} s of {times[True]}")
        print(f"cached, temporary API:        median {temporary:.1f} s of {times[False]}")
        print(f"ratio local/temporary: {local / temporary:.2f}")
    second = run_flow(args.preset, args.overrides, server)
    print(f"cached re-run: {second:.1f} s")


if __name__ == "__main__":
    main()
