"""Processing leases this process holds: ``repo.claim``'s Claim and ``repo.lock``'s Lock, renewed on a thread
while held, so that only a holder that dies lets its leases run out.

    with repo.claim(file_type="story_data", tags_all={"lang": "en"}, limit=10, lease=300) as files:
        for rf in files:          # empty when nothing is left
            process(rf)
    # normal exit: the files are recorded done for the task and the leases end, in one transaction;
    # an exception: the leases end and the files are free again at once

A lease is on a version for a task (``task="default"``): leases of different tasks do not exclude each other.
A thread renews the leases every third of ``lease``; if a renewal finds one gone (it ran out while the database
or this process stalled, and another holder took it, or it was released), the exit raises ClaimLostError naming
those files and does not record them done. The SQL and the clock it uses are meta/claims.py's.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING, Callable

from .errors import ClaimLostError, LockedError, NotFoundError, RepoError, UsageError
from .meta.claims import Holder, Lease, LeaseStore
from .meta.find import FindQuery
from .repofile import RepoFile

if TYPE_CHECKING:
    from .repo import S3Repo

log = logging.getLogger(__name__)

DEFAULT_TASK = "default"
DEFAULT_LEASE = 300.0
_NAMED = 10  # files an error names before it says "and N more"


def new_holder(host: str, token: str | None = None) -> Holder:
    """A holder of this process; ``token`` names it (the CLI's --holder), else a new unique one."""
    return Holder(token or f"{host}:{os.getpid()}:{uuid.uuid4().hex[:12]}", host, os.getpid())


def check_lease(lease: float, limit: int = 1) -> None:
    if not lease > 0:
        raise UsageError(f"a lease of {lease} s: it must be a positive number of seconds")
    if limit < 1:
        raise UsageError(f"a limit of {limit}: claim at least 1 file")


class _Renewal:
    """A daemon thread calling ``renew`` every ``interval`` seconds until stopped; a failure is logged and the next
    turn tries again (the lease lasts 3 intervals)."""

    def __init__(self, renew: Callable[[], None], interval: float, name: str) -> None:
        self._renew = renew
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self._renew()
            except RepoError as exc:
                log.warning("cannot renew leases (%s): retrying in %.0f s", exc, self._interval)
            except Exception:  # the thread must keep renewing whatever one turn met
                log.exception("cannot renew leases")

    def stop(self) -> None:
        """Stop, and wait for a renewal on its way (its answer is then not mistaken for a lost lease)."""
        self._stopped.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)


def _named(files: list[RepoFile]) -> str:
    named = ", ".join(f"{rf.path} (version {rf.id})" for rf in files[:_NAMED])
    return named + (f" and {len(files) - _NAMED} more" if len(files) > _NAMED else "")


def _lost_error(files: list[RepoFile], task: str) -> ClaimLostError:
    return ClaimLostError(f"lost the lease of task {task!r} on {_named(files)}: it ran out and another holder took "
                          "it, or it was released; not recorded as done")


class Claim:
    """Leases on up to ``limit`` versions that match a query, for one task (``repo.claim``). Leases are taken by
    ``acquire()`` (or entering the ``with`` block, which also renews them while it runs) and end with
    ``complete()`` (recorded done) or ``release()`` (free again), for one file or all."""

    def __init__(self, repo: S3Repo, query: FindQuery, *, task: str, limit: int, lease: float,
                 holder: str | None = None) -> None:
        check_lease(lease, limit)
        self.repo = repo
        self.query = query
        self.task = task
        self.limit = limit
        self.lease = lease
        self.holder = new_holder(repo.host, holder)
        self.files: list[RepoFile] = []
        self.expires_at: float | None = None  # the database's time the leases end if not renewed
        self._held: dict[int, RepoFile] = {}
        self._lost: dict[int, RepoFile] = {}
        self._lock = threading.Lock()  # guards _held and _lost against the renewal thread
        self._renewal: _Renewal | None = None

    @property
    def store(self) -> LeaseStore:
        return self.repo.leases

    def acquire(self) -> list[RepoFile]:
        """Take the leases (no renewal: the ``with`` block renews); the files, empty when nothing is left."""
        versions, self.expires_at = self.store.claim(self.query, self.task, self.holder, self.limit, self.lease)
        self.files = [RepoFile(self.repo, v) for v in versions]
        with self._lock:
            self._held = {rf.id: rf for rf in self.files}
        if self.files:
            log.info("claimed %d file(s) for task %r as %s", len(self.files), self.task, self.holder.token)
        return list(self.files)

    def renew(self) -> None:
        """Push the leases' end ``lease`` seconds ahead; a lease found gone is lost (the exit raises for it)."""
        renewed = self.store.renew(self.holder.token, self.lease)
        with self._lock:
            lost = [self._held.pop(vid) for vid in list(self._held) if vid not in renewed]
            self._lost.update((rf.id, rf) for rf in lost)
            if renewed:
                self.expires_at = max(renewed.values())
        if lost:
            log.warning("%s", _lost_error(lost, self.task))

    def held(self) -> list[RepoFile]:
        with self._lock:
            return list(self._held.values())

    def complete(self, rf: RepoFile | None = None) -> None:
        """Record ``rf`` (else every file still held) done for the task and end its lease; ClaimLostError, after
        recording the others, for a file whose lease was lost."""
        targets, lost = self._take_out(rf)
        done = set(self.store.complete(self.holder.token, self.holder.host, [f.id for f in targets])
                   if targets else ())
        lost += [f for f in targets if f.id not in done]
        if lost:
            raise _lost_error(lost, self.task)

    def release(self, rf: RepoFile | None = None) -> None:
        """End the lease of ``rf`` (else of every file still held) without recording it: free again at once."""
        targets, _lost = self._take_out(rf)
        if targets:
            self.store.release(self.holder.token, [f.id for f in targets])

    def _take_out(self, rf: RepoFile | None) -> tuple[list[RepoFile], list[RepoFile]]:
        """The files to end (``rf``, or all held) and those of them already lost, no longer held either way."""
        with self._lock:
            if rf is None:
                targets, lost = list(self._held.values()), list(self._lost.values())
                self._held.clear()
                self._lost.clear()
                return targets, lost
            if rf.id in self._lost:
                return [], [self._lost.pop(rf.id)]
            if rf.id not in self._held:
                raise NotFoundError(f"{rf.path}: version {rf.id} is not held by this claim")
            return [self._held.pop(rf.id)], []

    def __enter__(self) -> list[RepoFile]:
        files = self.acquire()
        if files:
            self._renewal = _Renewal(self.renew, self.lease / 3, f"claim-{self.holder.token}")
        return files

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._renewal is not None:
            self._renewal.stop()
            self._renewal = None
        if exc_type is None:
            self.complete()
            return
        try:
            self.release()
        except RepoError as error:  # the block's own exception is the one to see; the leases will run out
            log.warning("cannot release the leases of %s after an error: %s", self.holder.token, error)


class Lock:
    """The lease of one version for a task (``repo.lock``), whether done for it or not; it excludes a claim of
    the same task on that version, and the claim excludes it."""

    def __init__(self, repo: S3Repo, rf: RepoFile, *, task: str, lease: float, nowait: bool,
                 timeout: float | None) -> None:
        check_lease(lease)
        self.repo = repo
        self.file = rf
        self.task = task
        self.lease = lease
        self.nowait = nowait
        self.timeout = timeout
        self.holder = new_holder(repo.host)
        self.expires_at: float | None = None
        self.lost = False
        self._renewal: _Renewal | None = None

    def acquire(self, nowait: bool | None = None, timeout: float | None = None,
                cancelled: Callable[[], bool] = lambda: False) -> "Lock":
        """Take the lease, and renew it until ``release()``. Held by another holder: LockedError at once with
        ``nowait``, else polled (backing off to 1 s) until taken, ``timeout`` seconds passed, or ``cancelled()``."""
        nowait = self.nowait if nowait is None else nowait
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while (expires := self.repo.leases.lock(self.file.id, self.task, self.holder, self.lease)) is None:
            left = None if deadline is None else deadline - time.monotonic()
            if nowait or (left is not None and left <= 0) or cancelled():
                raise self._locked_error()
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 1.0)
        self.expires_at = expires
        self._renewal = _Renewal(self._renew, self.lease / 3, f"lock-{self.holder.token}")
        return self

    def _renew(self) -> None:
        renewed = self.repo.leases.renew(self.holder.token, self.lease)
        if self.file.id in renewed:
            self.expires_at = renewed[self.file.id]
        elif not self.lost:
            self.lost = True
            log.warning("%s", _lost_error([self.file], self.task))

    def _locked_error(self) -> LockedError:
        lease = self.repo.leases.holder_of(self.file.id, self.task)
        by = (f"by {lease.holder} (host {lease.host}, pid {lease.pid}) until "
              f"{dt.datetime.fromtimestamp(lease.expires_at, dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC" if lease
              else "by another holder")
        return LockedError(f"{self.file.path}: version {self.file.id} is locked for task {self.task!r} {by}")

    def release(self) -> bool:
        """End the lease; False if it was lost before (ran out and taken, or released by someone else)."""
        if self._renewal is not None:
            self._renewal.stop()
            self._renewal = None
        held = bool(self.repo.leases.release(self.holder.token, [self.file.id]))
        self.lost = self.lost or not held
        return not self.lost

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.release() and exc_type is None:
            raise _lost_error([self.file], self.task)


def release_holder(repo: S3Repo, token: str, paths: list[str] | None = None, done: bool = False,
                   dry_run: bool = False) -> list[Lease]:
    """End the leases of holder ``token`` (all, or those on ``paths``), recording them done for their task with
    ``done``; the leases ended (with ``dry_run``: that would end, and none is). NotFoundError, before anything
    ends, for a path it holds no lease on; a lease lost meanwhile raises after the others ended: ClaimLostError
    with ``done`` (the work is not recorded), NotFoundError without."""
    leases = repo.leases.leases_of(token)
    wanted = {p.strip("/") for p in paths or []}
    if wanted:
        leases = [lease for lease in leases if lease.path in wanted]
        if missing := sorted(wanted - {lease.path for lease in leases}):
            raise NotFoundError(f"holder {token} holds no lease on {', '.join(missing[:_NAMED])}")
    if dry_run:
        return leases
    ids = [lease.version_id for lease in leases]
    ended = set(repo.leases.complete(token, repo.host, ids) if done else repo.leases.release(token, ids))
    if lost := [lease.path for lease in leases if lease.version_id not in ended]:
        error = ClaimLostError if done else NotFoundError
        raise error(f"holder {token} lost its lease on {', '.join(lost[:_NAMED])} meanwhile"
                    + (": not recorded as done" if done else ""))
    return leases
