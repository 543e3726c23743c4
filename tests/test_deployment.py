"""The deployment path as users run it: prefect.yaml, a `process` work pool, a worker, and `prefect deployment run`.

Everything here is the real thing, driven through the `prefect` command line as a user types it: a Prefect server
(`prefect server start`) on a free loopback port with its own PREFECT_HOME and database, `prefect work-pool create`,
`prefect --no-prompt deploy --all` from the repository root on the repository's own prefect.yaml, `prefect worker
start`, and `prefect deployment run build-model/on-demand --param overrides='[...]' --watch` with the tiny
configuration of tests/conftest.py (artifacts and MLflow store in a temporary directory).

What it proves:
- prefect.yaml deploys as written, and the server's `build-model/nightly` has the cron and time zone prefect.yaml
  gives it; the server's scheduler turns that schedule into runs at the times the cron names in that zone;
- the pull step points the deployments at this checkout, so a worker started in another directory runs it;
- the on-demand run completes with every stage Completed and registers a new model version in the run's MLflow store;
- the same run again is all Cached, registers nothing, and says so in one log line.

The nightly deployment is paused once its schedule is checked, so no nightly run (quickstart on the real artifacts
directory) can reach the worker, whatever the time of day the test runs.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import httpx
import yaml

from pipeline_config import load_config
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parent.parent
PREFECT = Path(sys.executable).with_name("prefect")
SERVER_STARTUP_SECONDS = 180  # a new database is migrated on first start: 12-17 s idle, far more on a busy machine
RUN_SECONDS = 300


def test_deploy_then_run_on_demand_from_the_cli_on_a_real_server(tmp_path, small_corpus):
    project = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    declared = {spec["name"]: spec for spec in project["deployments"]}
    pool = declared["on-demand"]["work_pool"]["name"]
    artifacts = tmp_path / "artifacts"
    overrides = tiny_overrides(artifacts, small_corpus)

    with _prefect_server(tmp_path) as (env, api):
        _prefect(env, "work-pool", "create", pool, "--type", "process")
        deployed_at = datetime.datetime.now(datetime.timezone.utc)
        _prefect(env, "--no-prompt", "deploy", "--all", cwd=REPO)

        nightly = json.loads(_prefect(env, "deployment", "inspect", "build-model/nightly", "--output", "json"))
        assert [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in nightly["schedules"]] == [
            (s["cron"], s["timezone"]) for s in declared["nightly"]["schedules"]
        ]
        assert nightly["work_pool_name"] == pool and nightly["parameters"] == declared["nightly"]["parameters"]
        [pull_step] = nightly["pull_steps"]
        assert Path(pull_step["prefect.deployments.steps.set_working_directory"]["directory"]) == REPO
        _check_scheduled_runs(api, nightly, after=deployed_at)
        httpx.post(f"{api}/deployments/{nightly['id']}/pause_deployment", trust_env=False).raise_for_status()

        with _background(tmp_path / "worker.log", env, PREFECT, "worker", "start", "--pool", pool, "--type", "process",
                         cwd=tmp_path):
            first = _run_on_demand(env, api, overrides, tmp_path / "worker.log")
            assert set(_stage_states(first).values()) == {"Completed"} and "register" in _stage_states(first)
            registered = _model_versions(artifacts)
            assert registered == [(load_config("quickstart", overrides).register.model_name, 1)]

            second = _run_on_demand(env, api, overrides, tmp_path / "worker.log")
            assert _stage_states(second) == dict.fromkeys(_stage_states(first), "Cached")
            assert "nothing changed since the last run" in second and "nothing changed" not in first
            assert _model_versions(artifacts) == registered  # no new version


def _run_on_demand(env: dict[str, str], api: str, overrides: list[str], worker_log: Path) -> str:
    """`prefect deployment run build-model/on-demand --param overrides='[...]' --watch`; the run's log once it ends."""
    args = ["deployment", "run", "build-model/on-demand", "--param", f"overrides={json.dumps(overrides)}",
            "--watch", "--watch-timeout", str(RUN_SECONDS)]
    output = _prefect(env, *args, timeout=RUN_SECONDS + 60, log=worker_log)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)
    flow_run = httpx.get(f"{api}/flow_runs/{flow_run_id}", trust_env=False).json()
    assert flow_run["state"]["type"] == "COMPLETED", _tail(worker_log)
    return _flow_run_log(api, flow_run_id)


def _flow_run_log(api: str, flow_run_id: str, wait: float = 30) -> str:
    """The flow's own log messages (not its tasks') from the API, up to the engine's last one (`Finished in state
    ...`); they arrive in batches, the last ones as the run's process exits, after the run's state says it ended."""
    deadline = time.monotonic() + wait
    while True:
        logs = httpx.post(f"{api}/logs/filter", trust_env=False, json={
            "logs": {"flow_run_id": {"any_": [flow_run_id]}, "task_run_id": {"is_null_": True}},
            "sort": "TIMESTAMP_ASC", "limit": 200,
        }).json()
        text = "\n".join(entry["message"] for entry in logs)
        if "Finished in state Completed" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def _check_scheduled_runs(api: str, deployment: dict, after: datetime.datetime, wait: float = 60) -> None:
    """The scheduler created the deployment's next runs: consecutive dates of its cron in its time zone, from the
    first one after the deployment was made."""
    from prefect.server.schemas.schedules import CronSchedule

    [schedule] = deployment["schedules"]
    deadline = time.monotonic() + wait
    while True:
        runs = httpx.post(f"{api}/flow_runs/filter", trust_env=False, json={
            "deployments": {"id": {"any_": [deployment["id"]]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 3,
        }).json()
        if len(runs) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {run["state"]["type"] for run in runs} == {"SCHEDULED"} and len(runs) == 3
    starts = [datetime.datetime.fromisoformat(run["expected_start_time"]) for run in runs]
    assert starts[0] > after
    assert starts == asyncio.run(CronSchedule(**schedule["schedule"]).get_dates(n=3, start=starts[0]))


def _stage_states(log: str) -> dict[str, str]:
    """{stage: state name} from the flow's `build-model: stages acquire=Completed, ...` line."""
    found = re.search(r"build-model: stages (.*)", log)
    assert found, f"no `build-model: stages` line in the flow run's log:\n{log}"
    return dict(item.split("=", 1) for item in found.group(1).split(", "))


def _model_versions(artifacts: Path) -> list[tuple[str, int]]:
    """(name, version) of every registered model version in the run's SQLite MLflow store."""
    with closing(sqlite3.connect(f"{(artifacts / 'mlflow' / 'mlflow.db').as_uri()}?mode=ro", uri=True)) as db:
        return db.execute("SELECT name, version FROM model_versions ORDER BY name, version").fetchall()


@contextmanager
def _prefect_server(tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    """`prefect server start --host 127.0.0.1` on a free port, its own PREFECT_HOME; (env for clients, API URL)."""
    for attempt in range(3):  # the free port can be taken between our probe and the server's bind
        port = _free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = _environment(tmp_path / "prefect-home", api)
        log = tmp_path / f"server-{attempt}.log"
        with _background(log, env, PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port),
                         "--no-ui", cwd=tmp_path) as server:
            if _healthy(api, server):
                yield env, api
                return
        if "address already in use" not in log.read_text(errors="replace").lower():
            break
    raise AssertionError(f"the Prefect server did not answer on {api}/health:\n{_tail(log)}")


def _healthy(api: str, server: subprocess.Popen) -> bool:
    deadline = time.monotonic() + SERVER_STARTUP_SECONDS
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{api}/health", timeout=5, trust_env=False).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return False


def _environment(home: Path, api: str) -> dict[str, str]:
    """This process's environment without its Prefect settings, pointed at the test's server and home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    return {
        **env,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick the run up within a second (default 10)
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        "COLUMNS": "200",  # no wrapped lines in what the CLI prints
    }


def _prefect(env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 120,
             log: Path | None = None) -> str:
    """Run the `prefect` command line; its standard output, or a failure that shows all it printed (and the worker's
    log tail)."""
    done = subprocess.run([str(PREFECT), *args], env=env, cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{output[-4000:]}" + (
        f"\nworker log:\n{_tail(log)}" if log else "")
    return done.stdout


@contextmanager
def _background(log: Path, env: dict[str, str], *command: str | Path, cwd: Path) -> Iterator[subprocess.Popen]:
    """A long-running process in its own process group, stopped (with its children) when the block ends."""
    with open(log, "wb") as out:
        process = subprocess.Popen([str(c) for c in command], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            yield process
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM twice (a Prefect worker ignores the first one), then SIGKILL, to the whole process group."""
    for sig, grace in ((signal.SIGTERM, 3), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path | None, lines: int = 60) -> str:
    if path is None or not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def test_serve_names_a_bad_cron_time_zone_or_preset_in_one_line_before_serving(capsys, monkeypatch):
    """`python -m flows.serve` checks what it was given before it talks to any API (none answers here)."""
    import pytest

    from flows import serve

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    cases = [(["--cron", "every night"], "--cron 'every night': not a cron expression"),
             (["--timezone", "Mars/Olympus"], "--timezone 'Mars/Olympus': not an IANA time zone"),
             (["--preset", "nope"], "error: deployment nightly: unknown preset 'nope'")]
    for argv, says in cases:
        with pytest.raises(SystemExit) as exited:
            serve.main(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and says in err and "Traceback" not in err
