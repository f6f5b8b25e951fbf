"""How a long operation reports how far it got: a bar on a terminal, a log line per tenth otherwise.

Operations (gc, backup, restore, fsck, rebuild) call ``progress(what, total)`` and ``advance(n)`` on
what it returns; they never know where the report goes. On a terminal (stderr a tty) that is a tqdm
bar; under cron or systemd, where a bar is noise in the journal, one INFO line each time another 10 %
is done, and one at the end. ``quiet=True`` (``--json``, tests) reports nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Protocol

log = logging.getLogger("s3repofs.progress")


class Progress(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Progress": ...

    def __exit__(self, *exc: object) -> None: ...


def progress(what: str, total: int | None, *, unit: str = "it", quiet: bool = False) -> Progress:
    """A reporter of ``total`` steps (None: unknown, as for a bucket being listed) of ``what``."""
    if quiet:
        return _Silent()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return _Bar(tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B", leave=False, file=sys.stderr))
    return _LogLines(what, total, unit)


class _Silent:
    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Bar(_Silent):
    def __init__(self, bar) -> None:
        self._bar = bar

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

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
        self._started = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._total:
            tenths = min(10, self._done * 10 // self._total)
            if tenths > self._reported and tenths < 10:
                self._reported = tenths
                log.info("%s: %d %% (%d of %d %s)", self._what, tenths * 10, self._done, self._total, self._unit)
        elif self._total is None and self._done // self.UNKNOWN_TOTAL_STEP > self._reported:
            self._reported = self._done // self.UNKNOWN_TOTAL_STEP
            log.info("%s: %d %s so far", self._what, self._done, self._unit)

    def close(self) -> None:
        log.info("%s: done, %d %s in %.1f s", self._what, self._done, self._unit,
                 time.monotonic() - self._started)

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
