"""How a long operation reports how far it got: a bar on a terminal, a log line per tenth otherwise.

Operations (gc, backup, restore, fsck, rebuild) and the transfers of ``add``, ``get`` and ``cache
prefetch`` call ``progress(what, total)`` and ``advance(n)`` on what it returns; they never know where
the report goes. On a terminal (stderr a tty) that is a tqdm bar, with the rate and the time left;
under cron or systemd, where a bar is noise in the journal, one INFO line each time another 10 % is
done, and one at the end. ``quiet=True`` (``--quiet``, ``--json``, tests) reports nothing.

Bytes arrive from the threads of a transfer (a multipart upload's parts, a download's), so reporters
take a lock; ``Share`` counts one file's bytes within a report (see there).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Protocol

log = logging.getLogger("s3repofs.progress")


class Progress(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Progress": ...

    def __exit__(self, *exc: object) -> None: ...


def progress(what: str, total: int | None, *, unit: str = "it", quiet: bool = False) -> Progress:
    """A reporter of ``total`` steps (None: unknown, as for a bucket being listed) of ``what``."""
    if quiet:
        return _Silent()
    if sys.stderr.isatty():
        from tqdm import tqdm

        in_bytes = unit == "B"  # 1.50MB/s (in units of 1024) rather than 1572864B/s
        return _Bar(tqdm(total=total, desc=what, unit=unit, unit_scale=in_bytes,
                         unit_divisor=1024 if in_bytes else 1000, leave=False, file=sys.stderr))
    return _LogLines(what, total, unit)


class Share:
    """The callback a transfer of one file of ``size`` bytes reports its bytes to, within ``report``
    (which may count several files). ``done()`` advances the report by whatever the callback was not
    told: a file found in the cache, or staged here, is not transferred and reports nothing as it
    goes; a download begun before this one asked reports only what arrives from then on. A transfer
    that rewinds (a retried request) reports a negative count."""

    def __init__(self, report: Progress, size: int) -> None:
        self._report, self._left = report, size
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self._left -= n
        self._report.advance(n)

    def done(self) -> None:
        with self._lock:
            left, self._left = self._left, 0
        if left:
            self._report.advance(left)


class _Silent:
    def advance(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        """Say more than the count (``3 of 10 files`` beside the bytes)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Bar(_Silent):
    def __init__(self, bar) -> None:
        self._bar = bar
        self._lock = threading.Lock()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self._bar.update(n)

    def note(self, text: str) -> None:
        with self._lock:
            self._bar.set_postfix_str(text, refresh=False)
            # Drawn now unless the bar was drawn less than mininterval ago (as an update is): the last
            # note may come after the last bytes.
            if time.time() - self._bar.last_print_t >= self._bar.mininterval:
                self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LogLines(_Silent):
    """One log line per tenth of ``total`` done (per 10,000 steps when the total is unknown)."""

    UNKNOWN_TOTAL_STEP = 10_000

    def __init__(self, what: str, total: int | None, unit: str) -> None:
        self._what, self._total, self._unit = what, total, unit
        self._done = 0
        self._reported = 0  # tenths reported (steps, when the total is unknown)
        self._note = ""
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self._done += n
            if self._total:
                tenths = min(10, self._done * 10 // self._total)
                if tenths > self._reported and tenths < 10:
                    self._reported = tenths
                    log.info("%s: %d %% (%d of %d %s%s)", self._what, tenths * 10, self._done, self._total,
                             self._unit, self._note)
            elif self._total is None and self._done // self.UNKNOWN_TOTAL_STEP > self._reported:
                self._reported = self._done // self.UNKNOWN_TOTAL_STEP
                log.info("%s: %d %s so far", self._what, self._done, self._unit)

    def note(self, text: str) -> None:
        with self._lock:
            self._note = f"; {text}"

    def close(self) -> None:
        log.info("%s: done, %d %s%s in %.1f s", self._what, self._done, self._unit, self._note,
                 time.monotonic() - self._started)

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
