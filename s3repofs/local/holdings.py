"""The changes to what this host's cache holds, queued in memory until a writer records them in one batch.

The cache notes each verified copy that arrives (a download whose digest checked, a staged file moved
in after its verified upload) and each that leaves (evicted by the bound, cleared, dropped after failing
a re-hash, found gone from disk, lost by a crash). ``flush`` hands what was noted since the last flush
to the writer (the repository's: this host's rows of the ``holders`` table, one transaction) as one
``Batch``. A writer that fails gets its batch back, under whatever was noted since, and the next flush
tries again: a failed flush never fails the read that noted a change.

Only the last change of each object is kept, so the queue grows with the objects that changed, not
with the reads; past ``max_pending`` objects it forgets them all and marks itself ``stale``: the next
flush asks the writer to rewrite this host's rows from the cache's contents instead (as a mount does
at start, when nothing says what changed while it was not running).

Flushes: the caller's (a mount's background pass, a repository's close), and one in a thread of its own
once ``flush_at`` objects are waiting (not again for ``RETRY_AFTER`` s after one failed). One flush
runs at a time, so batches are written in the order they were taken.

Lock order: noting happens with ``ObjectIndex.lock`` held (in the hold that changes the index, so a
snapshot of the index taken under that lock agrees with what was noted); this module's lock is taken
inside it, and nothing waits while holding it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

FLUSH_AT = 1000  # objects waiting: flush now, in the background
MAX_PENDING = 100_000  # objects waiting: forget them and rewrite every row at the next flush
RETRY_AFTER = 30.0  # seconds without a background flush after one failed (the database is away)


@dataclass(frozen=True)
class Batch:
    """What to write: the last change of each object (key -> (held, when)), and whether to rewrite every
    row of this host from the cache's contents after applying them."""

    changes: dict[str, tuple[bool, float]]
    reconcile: bool = False

    def __len__(self) -> int:
        return len(self.changes)


Writer = Callable[[Batch], None]


class Holdings:
    def __init__(self, clock: Callable[[], float] = time.time, flush_at: int = FLUSH_AT,
                 max_pending: int = MAX_PENDING) -> None:
        self.clock = clock
        self.flush_at = flush_at
        self.max_pending = max_pending
        self.writer: Writer | None = None  # set by the repository; without one, changes wait (bounded)
        self._lock = threading.Lock()
        self._changes: dict[str, tuple[bool, float]] = {}
        self._stale = False
        self._flushing = threading.Lock()  # one flush at a time
        self._background = False  # a background flush is started or running
        self._quiet_until = 0.0  # no background flush before this (time.monotonic) after one failed

    def arrived(self, key: str) -> None:
        """A verified copy of ``key`` is in the cache now."""
        self._note(key, True)

    def left(self, key: str) -> None:
        """The copy of ``key`` is gone from the cache."""
        self._note(key, False)

    def mark_stale(self) -> None:
        """Have the next flush rewrite every row of this host from the cache's contents."""
        with self._lock:
            self._stale = True

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._changes)

    @property
    def stale(self) -> bool:
        with self._lock:
            return self._stale

    def flush(self) -> bool:
        """Hand what is waiting to the writer, as one batch; True if it took it (or nothing waited). A
        writer's exception is logged, not raised: the batch waits for the next flush."""
        with self._flushing:
            batch = self._take()
            if batch is None:
                return True
            try:
                self.writer(batch)
            except Exception as exc:
                self._put_back(batch)
                log.warning("recording %d change(s) of this host's cache failed; kept for the next try: %s",
                            len(batch), exc)
                return False
            return True

    # -- internals ------------------------------------------------------------------------------

    def _note(self, key: str, held: bool) -> None:
        with self._lock:
            self._changes[key] = (held, self.clock())
            if len(self._changes) > self.max_pending:
                self._forget()
            due = (len(self._changes) >= self.flush_at and self.writer is not None and not self._background
                   and time.monotonic() >= self._quiet_until)
            if due:
                self._background = True
        if due:  # off the reader's thread: a slow or failing database never holds up a read
            threading.Thread(target=self._flush_in_background, name="holders-flush", daemon=True).start()

    def _flush_in_background(self) -> None:
        try:
            if not self.flush():
                with self._lock:
                    self._quiet_until = time.monotonic() + RETRY_AFTER
        finally:
            with self._lock:
                self._background = False

    def _take(self) -> Batch | None:
        with self._lock:
            if (not self._changes and not self._stale) or self.writer is None:
                return None
            batch = Batch(self._changes, self._stale)
            self._changes, self._stale = {}, False
            return batch

    def _put_back(self, batch: Batch) -> None:
        """A batch the writer refused goes back under what was noted since (which is newer)."""
        with self._lock:
            self._changes = {**batch.changes, **self._changes}
            self._stale = self._stale or batch.reconcile
            if len(self._changes) > self.max_pending:
                self._forget()

    def _forget(self) -> None:
        """Too many changes waiting (the database away for long): drop them, rewrite everything later."""
        log.warning("more than %d changes of this host's cache wait to be recorded: the next flush rewrites "
                    "this host's holder rows from the cache's contents instead", self.max_pending)
        self._changes, self._stale = {}, True
