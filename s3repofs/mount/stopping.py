"""Stops the mount's daemon on SIGTERM or SIGINT without losing an upload: waits (bounded) for the uploads in
flight, then ends the FUSE session.

Why not libfuse's own handler: it ends the session loop at once, and the multithreaded loop then
pthread_cancel()s its workers. libfuse 3.14 (Debian 12) disables cancellation while a worker runs a
request, so a close() still uploading finishes there; older libfuse (2.9) leaves it enabled, and a thread
cancelled inside a Python callback unwinds through the interpreter's C frames, which crashes it. Waiting
first leaves no request running when the loop ends, whatever the version, and lets the operator see what
the stop waits for: a log line and the STATUS= that ``systemctl status`` shows.

The signals are blocked in every thread (the mask is inherited: block them before any thread starts) and
received by one thread of ours with sigtimedwait(), so no libfuse or Python handler ever runs. A second
signal during the wait ends the session at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable

from .notify import Notifier

log = logging.getLogger("s3repofs.mount")

SIGNALS = {signal.SIGTERM, signal.SIGINT}
# How long a stop waits for uploads in flight. s3repofs@.service's TimeoutStopSec must be longer (systemd
# then kills the daemon, and the upload is retried from the staged copy at the next start).
STOP_WAIT = 600.0
POLL = 0.5


class GracefulStop:
    def __init__(self, uploads_in_flight: Callable[[], int], notifier: Notifier, wait: float = STOP_WAIT) -> None:
        self._uploads_in_flight = uploads_in_flight
        self._notifier = notifier
        self._wait = wait
        self._end_session: Callable[[], None] | None = None
        self._session_started = threading.Event()
        self._released = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_mask: set | None = None

    def hold_signals(self) -> None:
        """Block SIGTERM and SIGINT in this thread and every thread it starts from now on, and receive them in
        a thread of ours. Call from the main thread before any other thread starts."""
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        self._thread = threading.Thread(target=self._receive, name="stop-on-signal", daemon=True)
        self._thread.start()

    def session_started(self, end_session: Callable[[], None]) -> None:
        """The FUSE session is running; ``end_session`` makes its loop return."""
        self._end_session = end_session
        self._session_started.set()

    def release(self) -> None:
        """The session is over: stop receiving, and restore the signal mask."""
        self._released.set()
        self._session_started.set()  # a stop still waiting for the session has nothing left to end
        if self._thread is not None:
            self._thread.join()
        if self._old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)

    def _receive(self) -> None:
        while not self._released.is_set():
            signo = _signal_within(POLL)
            if signo is not None:
                self._stop(signo)
                return

    def _stop(self, signo: int) -> None:
        in_flight = self._uploads_in_flight()
        log.info("%s received: stopping: %d upload(s) in flight", signal.Signals(signo).name, in_flight)
        self._notifier.stopping(f"stopping: {in_flight} uploads in flight")
        self._wait_for_uploads(in_flight)
        self._session_started.wait()
        if self._end_session is not None and not self._released.is_set():
            self._end_session()

    def _wait_for_uploads(self, in_flight: int) -> None:
        deadline = time.monotonic() + self._wait
        while in_flight:
            if time.monotonic() > deadline:
                log.warning("stopping with %d upload(s) still in flight after %.0f s", in_flight, self._wait)
                return
            if _signal_within(POLL) is not None:
                log.warning("second signal: stopping with %d upload(s) in flight", in_flight)
                return
            now = self._uploads_in_flight()
            if now != in_flight:
                log.info("stopping: %d upload(s) in flight", now)
                self._notifier.status(f"stopping: {now} uploads in flight")
            in_flight = now


def _signal_within(timeout: float) -> int | None:
    """One of SIGNALS received within ``timeout`` seconds, or None. A wait that a tracer (py-spy, gdb)
    interrupts can return a siginfo that names no signal asked for: that is not a stop."""
    received = signal.sigtimedwait(SIGNALS, timeout)
    return received.si_signo if received is not None and received.si_signo in SIGNALS else None
