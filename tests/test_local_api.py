"""`python -m flows --server`'s local Prefect API: started once (detached, 127.0.0.1), found again while healthy, and
stopped by `flows.local_api stop`. A real Prefect server in a temporary PREFECT_HOME."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows import local_api

REPO = Path(__file__).resolve().parent.parent


def test_the_local_api_starts_once_is_reused_and_stops(tmp_path):
    url = local_api.ensure_local_api(tmp_path)
    try:
        assert url and url.startswith("http://127.0.0.1:") and local_api.healthy(url)
        pid = json.loads((tmp_path / local_api.RECORD).read_text())["pid"]
        assert local_api.ensure_local_api(tmp_path) == url  # found, not started again
        assert json.loads((tmp_path / local_api.RECORD).read_text())["pid"] == pid
        assert (tmp_path / "prefect.db").exists()  # its database lives in the home it was given
    finally:
        assert local_api.stop(tmp_path)
    deadline = time.monotonic() + 30
    while local_api.healthy(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not local_api.healthy(url) and not (tmp_path / local_api.RECORD).exists()
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is this test process's child
    except ChildProcessError:
        pass


FIRST_RUN = """
import json, os, sys, urllib.request
from pathlib import Path
from flows.local_api import ensure_local_api

url = ensure_local_api(Path(sys.argv[1]))  # what `python -m flows --server` does before it imports Prefect
os.environ["PREFECT_API_URL"] = url
from prefect import flow

@flow(name="first-run-probe")
def probe():
    return 1

probe()
request = urllib.request.Request(f"{url}/flow_runs/filter", data=b"{}", headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as reply:
    print(json.dumps([run["state_type"] for run in json.loads(reply.read())]))
"""


def test_the_run_that_starts_the_local_api_is_recorded_by_it(tmp_path):
    """The first `--server` run (the one that has to start the server) must land in that server's database, not in a
    temporary API's: nothing may import Prefect (and so read PREFECT_API_URL) before the URL is set."""
    home = tmp_path / "local"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "elsewhere")}  # where a temporary API would keep its runs
    env.pop("PREFECT_API_URL", None)
    try:
        done = subprocess.run([sys.executable, "-c", FIRST_RUN, str(home)], env=env, capture_output=True, text=True,
                              timeout=240, cwd=REPO)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == ["COMPLETED"]
        assert "Starting temporary server" not in done.stderr + done.stdout
    finally:
        pid = json.loads((home / local_api.RECORD).read_text())["pid"]
        local_api.stop(home)
        _reap(pid)


def _servers_in(home: Path) -> list[int]:
    """Pids of the processes running in `home` (the local API runs with it as its working directory)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == home:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_runs_starting_at_once_share_one_local_api(tmp_path):
    """Three `--server` runs starting together: one server is started and all three use it; none is left orphaned
    (started, then dropped from the record, so that `flows.local_api stop` could not find it)."""
    home = tmp_path / "local"
    probe = "import sys, pathlib, flows.local_api as api; print(api.ensure_local_api(pathlib.Path(sys.argv[1])))"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    runs = [subprocess.Popen([sys.executable, "-c", probe, str(home)], env=env, stdout=subprocess.PIPE, text=True,
                             cwd=REPO) for _ in range(3)]
    try:
        urls = {run.communicate(timeout=240)[0].strip() for run in runs}
        assert len(urls) == 1 and urls.pop().startswith("http://127.0.0.1:")
        assert len(_servers_in(home.resolve())) == 1
    finally:
        local_api.stop(home)
        for pid in _servers_in(home.resolve()):
            os.killpg(pid, signal.SIGTERM)


def test_stop_leaves_alone_a_process_that_took_a_dead_servers_pid(tmp_path):
    """After a reboot the record can name a pid that now belongs to something else: `stop` drops the record and
    signals nothing that is not the server it started."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        (tmp_path / local_api.RECORD).write_text(json.dumps({"url": "http://127.0.0.1:9/api", "pid": other.pid}))
        assert local_api.stop(tmp_path)
        assert not (tmp_path / local_api.RECORD).exists()
        time.sleep(0.5)
        assert other.poll() is None  # still running: not ours to stop
    finally:
        other.kill()
        other.wait()


def test_the_command_line_starts_and_stops_the_api_of_the_home_it_is_given(tmp_path):
    """`python -m flows.local_api [start|stop] [--home DIR]`: the home is honoured for both (it was read only from a
    second argument, so `python -m flows.local_api DIR` started the repository's API instead)."""
    home = tmp_path / "home"
    command = [sys.executable, "-m", "flows.local_api"]
    run = {"capture_output": True, "text": True, "cwd": tmp_path, "env": {**os.environ, "PYTHONPATH": str(REPO)}}
    started = subprocess.run([*command, "--home", str(home)], timeout=240, **run)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        url = started.stdout.strip()
        assert local_api.healthy(url) and json.loads((home / local_api.RECORD).read_text())["url"] == url
    finally:
        stopped = subprocess.run([*command, "stop", "--home", str(home)], timeout=60, **run)
    assert stopped.stdout.strip() == "stopped" and not (home / local_api.RECORD).exists()
    assert local_api.HOME == REPO / ".prefect"  # the default: what `python -m flows --server` uses, from any directory
