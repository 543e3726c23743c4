"""Command line: `python -m flows [--preset NAME|FILE.yaml] [--set key=value ...] [--no-wait]`.

The configuration is validated before Prefect starts, so a wrong key exits with status 2 having written nothing;
so does a Prefect API that PREFECT_API_URL names and nothing answers at.
The artifacts directory's lock is taken before Prefect starts too: a second run on the same directory waits for the
first, or with `--no-wait` exits at once (status 1) naming the holder. A failure the user can fix (a project error:
a 404, a bad checksum, a diverged run, a split too short) is printed as one line with exit status 1; Ctrl-C is
one line and status 130 (the re-run resumes), SIGTERM (or a closed terminal) one line and status 143, training
checkpointing the step it was on; a traceback means a bug.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")

from pipeline_config.loader import ConfigError, load_config, split_overrides  # noqa: E402
from flows.preflight import prefect_api_down, unrunnable  # noqa: E402

GO_ON = "run the same command again; finished stages come from the cache and training resumes from its last checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m flows`, shared with `scriptorium run`."""
    parser.add_argument("--preset", default="quickstart", help="preset name in pipeline_config/presets or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one knob, e.g. --set train.max_steps=300 (repeatable)")
    parser.add_argument("--sets", default="", metavar="'KEY=VALUE ...'",
                        help="several overrides in one string, split into words as a shell does (what `make run "
                        "SET=...` passes); a word without KEY= continues the value before it")
    parser.add_argument("--no-wait", action="store_true",
                        help="fail at once if another run holds the artifacts directory, instead of waiting for it")
    parser.add_argument("--server", action="store_true",
                        help="record the run in a local Prefect API kept running in .prefect/ (started detached on "
                        "first use; flows/local_api.py) instead of a temporary one started for this run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description="Run the build-model flow.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The `--set` overrides, then those of `--sets`, in the order they apply."""
    return [*args.overrides, *split_overrides(args.sets)]


def run(args: argparse.Namespace) -> int:
    """Validate the configuration, then run build-model and print its summary; the exit status."""
    try:
        overrides = overrides_of(args)
        cfg = load_config(args.preset, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    why = unrunnable(cfg)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    try:
        with _stop_on_sigterm(), contextlib.ExitStack() as api:
            url = None if os.environ.get("PREFECT_API_URL") else _api_for_this_run(args.server, api)
            if url:
                os.environ["PREFECT_API_URL"] = url
            down = prefect_api_down()
            if down:
                print(f"error: {down}", file=sys.stderr)
                return 2
            return _build(args, cfg, overrides)
    except KeyboardInterrupt:  # Prefect has already marked the run Crashed; what the user needs is how to go on
        print(f"interrupted: {GO_ON}", file=sys.stderr)
        return 130
    except Stopped as exc:
        print(f"stopped by {exc.name}: {GO_ON}", file=sys.stderr)
        return 128 + exc.signum


class Stopped(BaseException):
    """SIGTERM, or SIGHUP, arrived: raised where Prefect, having recorded the run Crashed, sends the signal on to the
    handler it found (ours), instead of the process dying there; so the API outlives the run's last log lines."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (`kill`, `docker stop`, a cancelled CI job) ends the run as Ctrl-C does: Prefect records it Crashed,
    training checkpoints its step (tasks/training/interrupts.py), then `Stopped` unwinds the run here, so the
    temporary API is stopped after the last log lines reached it; the status is 143. (Prefect itself re-sends the
    signal to the handler it found, which by default killed the process on the spot.)

    A closed terminal (SIGHUP: an ssh session dropping), whose default ended the process at once and left the run
    'Running' in Prefect for good, is turned into SIGTERM, and what went to the terminal goes to /dev/null from then on
    (writing to a hung-up terminal fails). Signals that are ignored (nohup) or handled already are left as they are."""
    def stopped(signum, frame) -> None:
        raise Stopped(signum)

    def hung_up(signum, frame) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in ttys:
            os.dup2(null, fd)
        os.close(null)
        signal.raise_signal(signal.SIGTERM)

    ttys = [fd for fd in (1, 2) if os.isatty(fd)]  # now: a hung-up terminal no longer says it is one
    main = threading.current_thread() is threading.main_thread()  # the only thread Python sets handlers from
    ours = {signum: handler for signum, handler in ((signal.SIGTERM, stopped), (signal.SIGHUP, hung_up))
            if main and signal.getsignal(signum) is signal.SIG_DFL}
    for signum, handler in ours.items():
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum in ours:
            signal.signal(signum, signal.SIG_DFL)


def _api_for_this_run(server: bool, api: contextlib.ExitStack) -> str | None:
    """The Prefect API to record this run in, where PREFECT_API_URL names none: with `--server`, the local one
    (found or started, flows/local_api.py); otherwise, or if that does not answer, a temporary one that `api` stops.
    None: Prefect starts its own temporary API (it did not answer in time, or Prefect was imported already, so its
    settings are read and a URL set now would not be seen)."""
    from flows.local_api import HOME, ensure_local_api, temporary_api

    if "prefect" in sys.modules:  # `main()` called in a process that uses Prefect already (a test)
        return None
    return (ensure_local_api(HOME) if server else None) or api.enter_context(temporary_api())


def _build(args: argparse.Namespace, cfg, overrides: list[str]) -> int:
    from tasks.stage import PipelineError, hold_artifacts, redact

    try:
        with hold_artifacts(cfg.artifacts_dir, wait=not args.no_wait):
            from flows.build_model import build_model

            summary = build_model(preset=args.preset, overrides=overrides)
    except PipelineError as exc:
        print(f"error: {redact(' '.join(str(exc).split()))}", file=sys.stderr)
        return 1
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    registered = summary["registered"]
    print()
    print("stages:   " + ", ".join(f"{name} {state}" for name, state in summary["stages"].items()))
    print(f"model:    {registered['model_name']} version {registered['version']}"
          f"{' (champion)' if registered['champion'] else ''}")
    print(f"mlflow:   run {registered['run_id']} in {registered['tracking_uri']}")
    print("metrics:  " + ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items() if isinstance(v, float)))
    print(f"sample:   {summary['sample']}")


if __name__ == "__main__":
    sys.exit(main())
