"""A local Prefect API that `make run` starts once and re-uses, so a cached re-run does not wait for a server.

Without `PREFECT_API_URL` every `python -m flows` starts a temporary API (a uvicorn subprocess that migrates its
SQLite database, ~5-8 s on 2 cores, and on a busy machine sometimes more than Prefect's 20 s startup limit) and stops
it at exit. `python -m flows --server` instead talks to a server that outlives the run:

- the API recorded in `.prefect/local-api.json` is used as it is if it answers `/health`;
- otherwise one is started detached (its own session, so Ctrl-C on a run does not stop it), bound to 127.0.0.1 on a
  free port, with its database in `.prefect/` (PREFECT_HOME, git-ignored: the same database `make server` shows in
  its UI), its log in `.prefect/local-api.log`, and recorded in `.prefect/local-api.json`. (A port is not probed
  for someone else's server: an API that answers there may keep its runs in another database.)
- if it does not answer within `START_TIMEOUT_S`, the run goes on with a temporary API, as without `--server`;
- runs starting at once take turns on `.prefect/local-api.lock`, so one server is started, not one each.

Without `--server`, a run's temporary API is started here too (`temporary_api`), not by Prefect: Prefect starts its
temporary server in the run's process group, so Ctrl-C in a terminal (which signals the whole group) killed it with
the run, and the run then spent minutes retrying it to record the crash, printing tracebacks; and a run killed with
SIGKILL left it running for good. This one runs in its own process group, is stopped when the run ends, and stops
itself when the run's process is gone (it watches its parent). Its database is Prefect's temporary one (in
PREFECT_HOME, where Prefect's would have kept the run). If it does not answer in time, Prefect starts its own.

The runs are recorded by Prefect either way. `python -m flows.local_api stop` stops the server this started (the pid
in the record is signalled only while it is still that server: after a reboot it may be anyone's). Only the standard
library is imported here, and Prefect is not: this runs before the caller sets PREFECT_API_URL, which Prefect reads
once, on import; and it must cost nothing when the server is up.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"
HOME = Path(__file__).resolve().parent.parent / ".prefect"  # what `python -m flows --server` uses
RECORD = "local-api.json"
LOCK = "local-api.lock"
APP = "prefect.server.api.server:create_app"
START_TIMEOUT_S = 60.0


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as reply:  # noqa: S310 (our own 127.0.0.1 URL)
            return reply.status == 200
    except (OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _server_env(**settings: str) -> dict[str, str]:
    """The environment of an API this module starts: ours, with the settings Prefect gives its temporary server (no
    UI, no background services, no analytics) and `settings`, and no PREFECT_API_URL."""
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **settings}
    env.pop("PREFECT_API_URL", None)
    return env


def _answers(url: str, process: subprocess.Popen) -> bool:
    """Wait until the API `process` serves at `url` answers (True), or it exits or START_TIMEOUT_S passes (False)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not healthy(url) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return healthy(url)


def _start(home: Path) -> tuple[str, subprocess.Popen]:
    """Launch the API detached; returns its URL and process."""
    port = _free_port()
    # Where prefect is installed, without importing it: an import here would read its settings before the caller sets
    # PREFECT_API_URL, and the run that started the server would then go to a temporary API after all.
    site = Path(importlib.util.find_spec("prefect").origin).parent.parent
    log = open(home / "local-api.log", "ab")  # noqa: SIM115 (the child keeps the descriptor)
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(site), "--factory", APP, "--host", HOST, "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env=_server_env(PREFECT_HOME=str(home)), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        start_new_session=True, cwd=home,
    )
    log.close()
    return f"http://{HOST}:{port}/api", process


def ensure_local_api(home: Path) -> str | None:
    """The URL of a healthy local API (found or started), or None: use the temporary one. Two runs starting at once
    take turns on a lock, so the second finds the server the first started instead of starting (and orphaning) one."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        return _find_or_start(home)


def _find_or_start(home: Path) -> str | None:
    record = home / RECORD
    try:
        known = json.loads(record.read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        known = None
    if known and healthy(known):
        return known
    url, process = _start(home)
    tmp = record.with_name(RECORD + ".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": process.pid}))
    os.replace(tmp, record)
    return url if _answers(url, process) else None


@contextlib.contextmanager
def temporary_api() -> Iterator[str | None]:
    """A Prefect API for one run: its URL while the `with` block runs (None if it did not answer in time: then
    Prefect starts its own), stopped when the block ends. See the module's docstring for why not Prefect's own."""
    root = str(Path(__file__).resolve().parent.parent)  # this checkout, installed or not
    path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    port = _free_port()
    command = [sys.executable, "-m", "flows.local_api", "serve", "--port", str(port), "--parent", str(os.getpid())]
    process = subprocess.Popen(command, env=_server_env(PREFECT__SERVER_FINAL="1", PYTHONPATH=path),
                               stdin=subprocess.DEVNULL, process_group=0)  # its own group: out of Ctrl-C's reach
    url = f"http://{HOST}:{port}/api"
    try:
        if not _answers(url, process):
            yield None
            return
        print(f"Prefect: a temporary API for this run on {url} (`--server` keeps one between runs)", file=sys.stderr)
        yield url
    finally:
        _drain_prefect()
        end_process_group(process)


def _drain_prefect() -> None:
    """Send what Prefect still holds for the API (log lines, events) while the API is there: its workers flush at
    interpreter exit otherwise, after the API has stopped, and retry it for minutes ('Error logging to API')."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=30)


def end_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group `process` leads (started with process_group=0 or start_new_session), then SIGKILL
    if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _serve(port: int, parent: int) -> None:
    """Run the API (uvicorn, as Prefect runs its temporary server) until SIGTERM or until `parent` is gone."""
    import threading

    import uvicorn

    def watch() -> None:
        while os.getppid() == parent:  # a dead parent's children are handed to another process
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own shutdown

    threading.Thread(target=watch, daemon=True).start()
    uvicorn.run(APP, factory=True, host=HOST, port=port, log_level="error", lifespan="on")


def _is_the_server(pid: int, url: str) -> bool:
    try:
        return APP.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists() and healthy(url)  # no procfs (macOS): trust an answering API
    except OSError:
        return False


def stop(home: Path) -> bool:
    """Stop the server recorded in `home` (the one `ensure_local_api` started)."""
    try:
        known = json.loads((home / RECORD).read_text())
        pid, url = int(known["pid"]), str(known["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if _is_the_server(pid, url):  # a record outliving its server (a reboot) may name a pid reused by anything
        try:
            os.killpg(pid, signal.SIGTERM)  # its own session: uvicorn and nothing else
        except ProcessLookupError:
            pass
    (home / RECORD).unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.local_api", description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", choices=("start", "stop", "serve"), default="start",
                        help="start: find or start the API and print its URL; stop: stop the one started here; serve: "
                        "(what temporary_api runs) serve an API on --port until --parent is gone")
    parser.add_argument("--home", type=Path, default=HOME, help=f"its PREFECT_HOME (default: {HOME})")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.action == "serve":
        _serve(args.port, args.parent)
        return 0
    home = args.home.resolve()
    if args.action == "stop":
        print("stopped" if stop(home) else f"no local API recorded in {home}")
        return 0
    url = ensure_local_api(home)
    print(url or "could not start a local API")
    return 0 if url else 1


if __name__ == "__main__":
    sys.exit(main())
