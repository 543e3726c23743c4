"""`python -m flows --server`'s local Prefect API: started once (detached, 127.0.0.1), found again while healthy, and
stopped by `flows.local_api stop`. A real Prefect server in a temporary PREFECT_HOME."""
from __future__ import annotations

import json
import os
import re
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


def _without_an_api(home: Path) -> dict[str, str]:
    """The environment of a run given no Prefect API, so that it starts a temporary one keeping its runs in `home`."""
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    return env


def _set(overrides: list[str]) -> list[str]:
    """`python -m flows`' arguments for these overrides."""
    return [x for o in overrides for x in ("--set", o)]


def test_the_run_that_starts_the_local_api_is_recorded_by_it(tmp_path):
    """The first `--server` run (the one that has to start the server) must land in that server's database, not in a
    temporary API's: nothing may import Prefect (and so read PREFECT_API_URL) before the URL is set."""
    home = tmp_path / "local"
    env = _without_an_api(tmp_path / "elsewhere")  # where a temporary API would keep its runs
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


def _run_until_training(tmp_path: Path, small_corpus: Path) -> tuple[subprocess.Popen, list[str]]:
    """`python -m flows` without --server or PREFECT_API_URL (so on a temporary API), in its own process group as a
    shell starts a job, with a tiny model set to train for long; returns once training has begun, with the lines so
    far."""
    from tests.conftest import tiny_overrides

    overrides = [*tiny_overrides(tmp_path / "artifacts", small_corpus), "train.max_steps=1000000"]
    run = subprocess.Popen([sys.executable, "-m", "flows", *_set(overrides)], cwd=REPO,
                           env=_without_an_api(tmp_path / "prefect-home"),  # a temporary API keeps its runs there
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in run.stdout:
        lines.append(line)
        if "train: step" in line:
            return run, lines
    raise AssertionError("the run ended before training:\n" + "".join(lines)[-3000:])


def _temporary_api_of(lines: list[str]) -> str:
    return next(re.search(r"http://127\.0\.0\.1:\d+/api", line)[0] for line in lines if "temporary API" in line)


def test_ctrl_c_in_a_terminal_stops_a_run_on_the_temporary_api_in_one_line(tmp_path, small_corpus):
    """Ctrl-C in a terminal signals the whole foreground process group. The temporary API Prefect starts was in that
    group, so it died with the run, and the run then spent minutes retrying it to record the crash, printing
    tracebacks ('Error logging to API'). The temporary API now stays out of the terminal's reach until the run has
    recorded its end, and then stops with it."""
    run, lines = _run_until_training(tmp_path, small_corpus)
    url = _temporary_api_of(lines)
    try:
        assert local_api.healthy(url, timeout=30)  # busy recording the training run, it may take a while to answer
        os.killpg(run.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        rest, _ = run.communicate(timeout=180)
    finally:
        run.kill()
    out = "".join(lines) + rest
    assert run.returncode == 130, out[-3000:]
    assert "interrupted: run the same command again" in out
    assert "Finished in state Crashed" in out  # the API was there to record how the run ended
    assert "Traceback" not in out and "Error logging to API" not in out, out[-3000:]
    assert not local_api.healthy(url)  # and it stopped with the run


def test_sigterm_stops_a_run_in_one_line_as_ctrl_c_does(tmp_path, small_corpus):
    """SIGTERM (`kill`, `docker stop`, a CI job cancelled): Prefect records the run Crashed, then killed the process
    with the signal at once, so the log lines it still held never reached the API and the temporary API was left to
    notice its parent gone. Now the run ends as on Ctrl-C: one line, the API stopped on the way out, status 143."""
    run, lines = _run_until_training(tmp_path, small_corpus)
    url = _temporary_api_of(lines)
    try:
        assert local_api.healthy(url, timeout=30)
        run.send_signal(signal.SIGTERM)
        rest, _ = run.communicate(timeout=180)
    finally:
        run.kill()
    out = "".join(lines) + rest
    assert run.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM: run the same command again" in out
    assert "Finished in state Crashed" in out and "stopping at step" in out  # training checkpointed its step
    assert "Traceback" not in out and "Error logging to API" not in out, out[-3000:]
    assert not local_api.healthy(url)  # stopped by the run, not later by its watchdog
    train_dir = next((tmp_path / "artifacts" / "train").glob("*/"))  # unfinished: generate takes its checkpoint
    sample = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--model", str(train_dir), "--prompt",
                             "the dog", "--max-new-tokens", "4"], cwd=REPO, capture_output=True, text=True)
    assert sample.returncode == 0 and "training has not finished" in sample.stderr, sample.stderr[-2000:]


def test_the_temporary_api_does_not_outlive_a_killed_run_and_the_next_run_records_the_crash(tmp_path, small_corpus):
    """Out of the terminal's process group, the temporary API would be left running by a run that dies without
    cleaning up (SIGKILL, or SIGHUP when the terminal closes): it watches its parent and stops when that is gone.
    A SIGKILLed run cannot tell Prefect how it ended, so Prefect showed it 'Running' for good (its stages too). The
    next run on the same artifacts directory finds it in the lock the dead run left behind and records it Crashed."""
    import sqlite3

    from tasks.stage import lock_holder
    from tests.conftest import tiny_overrides

    run, lines = _run_until_training(tmp_path, small_corpus)
    url = _temporary_api_of(lines)
    try:
        assert local_api.healthy(url, timeout=30)
        run.kill()
        run.wait(timeout=30)
        deadline = time.monotonic() + 60
        while local_api.healthy(url) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not local_api.healthy(url)
    finally:
        run.kill()
    database = tmp_path / "prefect-home" / "prefect.db"
    with sqlite3.connect(database) as db:
        ((killed, name),) = [(run_id, name) for (run_id, name, state) in
                             db.execute("SELECT id, name, state_name FROM flow_run") if state == "Running"]
    assert lock_holder(tmp_path / "artifacts").endswith(f"(Prefect flow run '{name}')")  # what a waiting run says
    overrides = tiny_overrides(tmp_path / "artifacts", small_corpus)
    again = subprocess.run([sys.executable, "-m", "flows", *_set(overrides)], cwd=REPO,
                           env=_without_an_api(tmp_path / "prefect-home"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "ended without saying how" in again.stdout + again.stderr
    with sqlite3.connect(database) as db:
        states = dict(db.execute("SELECT id, state_name FROM flow_run"))
        assert states.pop(killed) == "Crashed" and list(states.values()) == ["Completed"]
        assert ("Running",) not in db.execute("SELECT state_name FROM task_run").fetchall()


HANG_UP_LAUNCHER = (  # a terminal's session: the run leads it, with the pseudo-terminal as its controlling terminal
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'flows', *sys.argv[1:]])"
)


def test_closing_the_terminal_stops_a_run_as_sigterm_does(tmp_path, small_corpus):
    """Closing the terminal (an ssh session dropping) sends SIGHUP, whose default ended the run at once: Prefect kept
    it 'Running' for good and training lost its steps since the last checkpoint. Now the run stops as on SIGTERM:
    the step in progress is checkpointed, Prefect records the run Crashed, and the temporary API stops. A real
    pseudo-terminal, closed under the run."""
    import pty
    import sqlite3

    from tests.conftest import tiny_overrides

    overrides = [*tiny_overrides(tmp_path / "artifacts", small_corpus), "train.max_steps=1000000",
                 "train.checkpoint_interval=1000000"]  # the only checkpoint there can be is the one the stop writes
    master, terminal = pty.openpty()
    run = subprocess.Popen([sys.executable, "-c", HANG_UP_LAUNCHER, *_set(overrides)], cwd=REPO,
                           env=_without_an_api(tmp_path / "prefect-home"), stdin=terminal, stdout=terminal,
                           stderr=terminal)
    os.close(terminal)
    out = b""
    try:
        while b"train: step" not in out:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the run ended and closed the terminal
                chunk = b""
            assert chunk, "the run ended before training:\n" + out.decode(errors="replace")[-3000:]
            out += chunk
        url = _temporary_api_of(out.decode(errors="replace").splitlines())
        os.close(master)  # the terminal goes away: the kernel sends the run SIGHUP
        master = None
        assert run.wait(timeout=180) == 128 + signal.SIGTERM
    finally:
        run.kill()
        if master is not None:
            os.close(master)
    assert json.loads(next((tmp_path / "artifacts" / "train").glob("*/checkpoints/latest.json")).read_text())["step"]
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:  # Prefect's own record of the run
        assert [state for (state,) in db.execute("SELECT state_name FROM flow_run")] == ["Crashed"]
    assert not local_api.healthy(url)
