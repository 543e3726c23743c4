"""Ctrl-C and SIGTERM during training: finish the step, write a checkpoint, then stop as the signal would have.

Without this a stop loses every step since the last checkpoint (up to `checkpoint_interval` of them: minutes on a
large model), and SIGTERM is what `kill`, `docker stop`, a CI cancel and a deployment run cancelled in Prefect send.
The first SIGINT or SIGTERM is only noted, and the handlers that were there before are put back at once, so a second
one acts as it always did (Python's KeyboardInterrupt; Prefect's TerminationSignal, which marks the run Crashed or
Cancelled). At the end of the step the loop writes a checkpoint and sends the noted signal again, to those handlers.

Only where Python can set a handler (the main thread). Under torchrun, which sends the signal on to every rank, the
ranks agree after each step on whether any of them noted one (`distributed.agreed`), so all stop after the same step
and rank 0 checkpoints it; a rank that noted none is sent the agreed signal. A signal the process ignores (SIG_IGN: a
background job of a non-interactive shell ignores SIGINT) stays ignored.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The signal noted while a step ran (`signum`, None if none), and how to send it on once the step is saved."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self.sent = False
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._restore()  # a second Ctrl-C stops at once
        # Said at once, since a step can take minutes on a large model; written to the descriptor, not logged: a
        # handler that runs while the logging queue's lock is held would wait on it for good.
        if self.announce:
            with contextlib.suppress(OSError):
                os.write(2, f"train: {self.name}: stopping once the step in progress is checkpointed (again to stop "
                            "now)\n".encode())

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def resend(self, signum: int | None = None) -> None:
        """Deliver the noted signal (or `signum`, the one the ranks agreed on) to the handlers that were there before
        (KeyboardInterrupt for SIGINT)."""
        self._restore()
        self.signum = signum or self.signum
        self.sent = True
        signal.raise_signal(self.signum)


@contextlib.contextmanager
def stop_at_step_end(announce: bool = True) -> Iterator[StopRequest]:
    """Note SIGINT/SIGTERM instead of acting on them while the block runs (saying so on stderr if `announce`); the
    block checks `signum` after each step and calls `resend()`. A signal noted after the last check is sent when the
    block ends without an error."""
    request = StopRequest(announce)
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            previous = signal.getsignal(signum)
            if previous is not None and previous is not signal.SIG_IGN:  # None: set from C, not ours to wrap
                request._previous[signum] = previous
                signal.signal(signum, request._note)
    try:
        yield request
    finally:
        request._restore()
    if request.signum is not None and not request.sent:
        request.resend()
