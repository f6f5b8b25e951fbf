"""The mount's flock(2) locks: an open file's lock is ``repo.lock``'s lease (task "default") on the version it
opened, so that ``flock(1)`` on a mounted file excludes holders on every host, and ``repo.lock`` or a claim of
that version in any program.

Semantics (docs/commands.md, "flock on the mount"):
- The lock belongs to the open file (FUSE's file handle), as flock(2)'s does: two opens of one file conflict,
  even in one process; LOCK_EX on a handle that holds the lock succeeds at once.
- LOCK_SH is taken as LOCK_EX: a lease has one holder.
- The lease lasts ``FLOCK_LEASE`` seconds and a thread renews it while held; it ends at LOCK_UN and when the
  handle is released (the last close of the open file: libfuse's high-level API passes the kernel's
  "flock_release" on to release(), and no LOCK_UN before it). A killed daemon's leases run out.
- A blocking LOCK_EX waits in its worker thread, polling the database (backing off to 1 s), until it gets the
  lease, the caller is interrupted (a signal: Ctrl-C, ``flock -w``'s timer; the kernel's INTERRUPT answers
  EINTR), or the handle is released. It cannot end its turn early and let the caller ask again: the kernel
  turns a lock's EINTR into a restart that, with no signal pending, reaches the caller as errno 512. Each
  waiter holds one of libfuse's workers (10 by default), so at most ``MAX_WAITERS`` wait at once; one more
  is refused with ENOLCK ("no locks available") and a log line, rather than leave the mount no worker.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import threading
from typing import Callable

from ..errors import CallerError, LockedError, RepoError
from ..leases import Lock
from ..repofile import RepoFile

log = logging.getLogger("s3repofs.mount")

FLOCK_LEASE = 60.0
MAX_WAITERS = 4


class FlockInterruptedError(CallerError):
    """A blocking flock whose caller was interrupted (a signal) while it waited."""

    errno = errno.EINTR
    expected = True


class TooManyWaitersError(CallerError):
    """A blocking flock beyond ``MAX_WAITERS`` waiting at once: refused so the mount keeps workers to serve."""

    errno = errno.ENOLCK


class FlockTable:
    """The leases held by the mount's open files, by handle number (handle numbers are never reused)."""

    def __init__(self, repo, lease: float = FLOCK_LEASE, max_waiters: int = MAX_WAITERS) -> None:
        self.repo = repo
        self.lease = lease
        self.max_waiters = max_waiters
        self._mutex = threading.Lock()  # guards the two tables; never held across a database call
        self._held: dict[int, Lock] = {}
        self._waiting: dict[int, int] = {}  # handle -> flocks on it waiting for their lease
        self._gone: set[int] = set()  # waiting handles that were released meanwhile

    def flock(self, fh: int, rf: RepoFile, op: int, interrupted: Callable[[], bool] = lambda: False) -> None:
        """Do flock ``op`` (LOCK_SH/LOCK_EX/LOCK_UN, with LOCK_NB) for handle ``fh`` opened on ``rf``'s version.
        LockedError (EWOULDBLOCK) if another holder has it and LOCK_NB is set; FlockInterruptedError (EINTR)
        if ``interrupted()`` or the handle's release ends a blocking wait; TooManyWaitersError (ENOLCK)."""
        if op & fcntl.LOCK_UN:
            self.unlock(fh)
            return
        with self._mutex:
            if fh in self._held:
                return
        nowait = bool(op & fcntl.LOCK_NB)
        lock = self.repo.lock(rf, nowait=nowait, lease=self.lease)
        if nowait:
            lock.acquire()
            self._keep(fh, lock, gone=False)
        else:
            self._wait_for(fh, lock, interrupted)
        log.info("flock: %s (version %d) locked by handle %d", rf.path, rf.id, fh)

    def _wait_for(self, fh: int, lock: Lock, interrupted: Callable[[], bool]) -> None:
        with self._mutex:
            if sum(self._waiting.values()) >= self.max_waiters:
                raise TooManyWaitersError(f"flock: {lock.file.path}: {self.max_waiters} flocks already wait on this "
                                          "mount; refused (ENOLCK) so that it keeps workers to serve")
            self._waiting[fh] = self._waiting.get(fh, 0) + 1
        try:
            lock.acquire(nowait=False, timeout=None, cancelled=lambda: interrupted() or fh in self._gone)
        except LockedError:  # cancelled: interrupted, or the handle was released
            raise FlockInterruptedError(f"flock: {lock.file.path}: the wait was interrupted") from None
        finally:
            gone = self._stop_waiting(fh)
        self._keep(fh, lock, gone)

    def _stop_waiting(self, fh: int) -> bool:
        """One wait on ``fh`` ended; was the handle released meanwhile?"""
        with self._mutex:
            gone = fh in self._gone
            self._waiting[fh] -= 1
            if not self._waiting[fh]:
                del self._waiting[fh]
                self._gone.discard(fh)
        return gone

    def _keep(self, fh: int, lock: Lock, gone: bool) -> None:
        with self._mutex:
            keep = not gone and fh not in self._held  # (a second LOCK_EX on the handle, at the same time)
            if keep:
                self._held[fh] = lock
        if not keep:
            lock.release()

    def unlock(self, fh: int) -> None:
        """LOCK_UN: end the handle's lease, if it holds one."""
        with self._mutex:
            lock = self._held.pop(fh, None)
        if lock is not None:
            self._end(lock)

    def release_handle(self, fh: int) -> None:
        """The handle is released (its open file's last close): end its lease and stop a wait for one."""
        with self._mutex:
            lock = self._held.pop(fh, None)
            if fh in self._waiting:
                self._gone.add(fh)
        if lock is not None:
            self._end(lock)

    def release_all(self) -> None:
        """At unmount: end every lease the mount holds."""
        with self._mutex:
            locks = list(self._held.values())
            self._held.clear()
        for lock in locks:
            self._end(lock)

    def _end(self, lock: Lock) -> None:
        try:
            if not lock.release():
                log.warning("flock: the lease of %s (version %d) was lost while held: it ran out and another "
                            "holder took it", lock.file.path, lock.file.id)
        except RepoError as exc:  # the lease runs out by itself
            log.warning("flock: cannot end the lease of %s (version %d): %s", lock.file.path, lock.file.id, exc)

    def held(self) -> dict[int, int]:
        """{handle: version id} of the leases held now."""
        with self._mutex:
            return {fh: lock.file.id for fh, lock in self._held.items()}
