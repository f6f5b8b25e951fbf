"""Write sessions: a writer stages a new version, its flush stores it, and a failed flush hands it to the retry.

A write handle is a ``WriteSession`` over one staged version at a time (copy-on-write: stored bytes
are never modified). Its ``Stage`` says where it stands:

    UNCHANGED ──write──> CHANGED ──flush──> STORED ─────────write──> CHANGED (a new version)
                            │                                          ^
                            └──flush fails──> LEFT_TO_RETRY ──write────┘

- UNCHANGED: opened for writing, nothing changed yet; the version is a copy of the stored bytes, and
  the release discards it.
- CHANGED: created, truncated or written. The next flush stores it; a created or truncated file that
  was never written is stored only at its last flush (``final``: release or fsync), because a shell's
  ``echo x > f`` closes a duplicate of the descriptor before it writes.
- STORED: a flush uploaded, verified and, in ``published/``, published it.
- LEFT_TO_RETRY: its flush failed; the bytes are fsynced in staging and the retry thread owns the
  version (``Writes.retryable``).

``Writes`` does the sessions' work against the repository: new versions, flushes, the failed flush's
handoff (``_after_failed_flush``) and the retry's bookkeeping.

Concurrency: a session's ``lock`` is held for its whole flush (an upload), never by a stat. ``Writes._lock``
guards the retry bookkeeping only; neither is held while the other is taken.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterator

from ..domain.content import AppendDigest, Content, file_content, read_back
from ..domain.lifecycle import State, Storage
from ..domain.paths import RepoPath
from ..errors import LifecycleError, RepoError, UnavailableError
from ..local.transfer import pwrite_all
from ..meta.metastore import Version
from ..repo import S3Repo
from .metadata import MetadataView

log = logging.getLogger(__name__)

MAX_FILE_SIZE = 5 * 1024**4  # S3's largest object


class Stage(Enum):
    """Where a write session stands (see the module's docstring)."""

    UNCHANGED = "unchanged"
    CHANGED = "changed"
    STORED = "stored"
    LEFT_TO_RETRY = "left to retry"


# The moves a session may make; any other is a bug. A write after STORED or LEFT_TO_RETRY goes on in
# a new version, CHANGED from its start.
MOVES = {
    Stage.UNCHANGED: {Stage.CHANGED},
    Stage.CHANGED: {Stage.CHANGED, Stage.STORED, Stage.LEFT_TO_RETRY},
    Stage.STORED: {Stage.CHANGED},
    Stage.LEFT_TO_RETRY: {Stage.CHANGED},
}


@dataclass(frozen=True)
class UploadCounts:
    in_flight: int  # being uploaded now, by a writer's close() or fsync
    left_to_retry: int  # failed here, staged, retried by the background thread (and at the next start)


class StageError(RuntimeError):
    """A write session was asked to make a move its stage does not allow: a bug in the mount."""


@dataclass
class WriteSession:
    mount_path: str
    state: State  # where the version goes on flush: published or unpublished
    version: Version
    fd: int
    digest: AppendDigest  # of the bytes written to fd, hashed as they arrive
    stage: Stage = Stage.CHANGED
    wrote: bool = False  # a write or ftruncate arrived through this handle (in any of its versions)
    unlinked: bool = False  # its name was removed: its bytes stay the descriptor's, and are never stored
    times_set: bool = False  # utimens set the file's mtime: its version records it when stored
    write_error: int = 0  # the errno of a write or truncate that failed: its bytes are not what was meant
    retired_fds: list[int] = field(default_factory=list)  # of earlier versions of this handle, closed at release
    lock: threading.Lock = field(default_factory=threading.Lock)

    def move(self, to: Stage) -> None:
        if to not in MOVES[self.stage]:
            raise StageError(f"{self.mount_path}: a write session cannot move from {self.stage.name} to {to.name}")
        self.stage = to

    def changed(self) -> None:
        """A write or ftruncate arrived (after ``Writes.continue_if_settled``)."""
        self.move(Stage.CHANGED)
        self.wrote = True

    @property
    def filling(self) -> bool:
        """Is the writer still filling its version (not stored, not left to the retry)?"""
        return self.stage in (Stage.UNCHANGED, Stage.CHANGED)

    @property
    def to_store(self) -> bool:
        """Do its bytes differ from what is stored (changed, or left to the retry)?"""
        return self.stage in (Stage.CHANGED, Stage.LEFT_TO_RETRY)


def _copy_whole(source: int, target: int) -> int:
    """Copy the file behind descriptor ``source`` into the empty file behind ``target``; its size."""
    size, copied = os.fstat(source).st_size, 0
    for chunk in read_back(source, 0, size):
        pwrite_all(target, chunk, copied)
        copied += len(chunk)
    if copied < size:
        raise OSError(errno.EIO, "the file was cut short while it was copied")
    return copied


class Writes:
    """The write sessions' work against the repository, and what the retry thread may take over."""

    def __init__(self, repo: S3Repo, metadata: MetadataView, started: float,
                 being_written: Callable[[], set[int]]) -> None:
        self.repo = repo
        self.metadata = metadata
        self.started = started
        self._being_written = being_written  # every version an open write handle holds
        self._lock = threading.Lock()
        self._failed_uploads: set[int] = set()  # versions whose upload failed at a flush here
        self._unmarked_publishes: set[int] = set()  # failed publishes whose publish_pending the database missed
        self._uploading = 0  # flushes storing a version now (a stop waits for them: stats, systemd's ExecStop)

    def upload_counts(self) -> UploadCounts:
        """Uploads running now in a writer's close() or fsync, and versions left to the retry thread."""
        with self._lock:
            return UploadCounts(in_flight=self._uploading, left_to_retry=len(self._failed_uploads))

    # -- a session's life ------------------------------------------------------------------------

    def new_version(self, path: RepoPath, mode: int, uid: int, gid: int,
                    copy_of: int | None = None) -> tuple[Version, int, AppendDigest]:
        """A new unpublished version of ``path`` with its writer's descriptor and digest: empty, or a
        copy of the file behind descriptor ``copy_of``, made under the writer's lock (no retry takes a
        half copy). If anything fails, no version is left behind."""
        version = self.repo.add_file(str(path), mode=mode, uid=uid, gid=gid).version
        fd = -1
        try:
            fd = self.repo.open_staged(version)
            digest = AppendDigest(fd)  # of the empty file add_file made
            if copy_of is not None:
                digest.appended(0, _copy_whole(copy_of, fd))
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with suppress(RepoError, OSError):
                self.repo.discard(version)
            raise
        return version, fd, digest

    def write(self, session: WriteSession, offset: int, write_to: Callable[[int], int]) -> int:
        """``write_to(fd)`` on the session's staged file; the bytes it wrote at ``offset``."""
        with session.lock:
            self._continue_if_settled(session)
            session.changed()
            try:
                written = write_to(session.fd)
            except OSError as exc:
                session.write_error = exc.errno or errno.EIO
                raise
            session.digest.appended(offset, written)
            return written

    def truncate(self, session: WriteSession, length: int) -> None:
        with session.lock:
            self._continue_if_settled(session)
            session.changed()
            os.ftruncate(session.fd, length)
            session.digest.spoil()

    def _continue_if_settled(self, session: WriteSession) -> None:
        """More writes after a flush stored the bytes, or handed them to the retry (which may find them
        stored already, even published: a commit's answer can be lost): those bytes stay as they are,
        and the writer continues in a new version with a copy of what its descriptor holds (wherever the
        old version's file has gone meanwhile: into the cache, or away)."""
        if session.filling:
            return
        old = session.version
        version, fd, digest = self.new_version(old.path, old.mode, old.uid, old.gid, copy_of=session.fd)
        # The old descriptor stays open until release: libfuse may still be reading it for a read
        # answered a moment ago (read_buf), and a closed number could be reused by another file. It
        # gives up its writer's hold: the old version may be the retry's.
        self.repo.release_staged(session.fd)
        session.retired_fds.append(session.fd)
        session.digest.stop()
        session.fd, session.digest, session.version = fd, digest, version
        session.move(Stage.CHANGED)
        if session.unlinked:  # a file without a name: its new bytes live in the descriptor alone
            self.discard_quietly(version)

    def flush(self, session: WriteSession, final: bool) -> None:
        """Upload, verify and (in published/) publish what the session wrote; errors reach close().
        A file created or truncated but never written waits for the last flush (``final``)."""
        with session.lock:
            if session.unlinked or not session.to_store or not (session.wrote or final):
                return
            if session.write_error:  # a full disk, say: storing what did get written would publish half a file
                raise OSError(session.write_error, f"{session.mount_path}: not stored: a write to it failed "
                              f"({os.strerror(session.write_error)})")
            if session.stage is Stage.LEFT_TO_RETRY:  # another close or fsync: not uploaded again beside the retry
                raise UnavailableError(f"{session.mount_path}: version {session.version.id} is left to the retry "
                                       "after a failed upload")
            version = session.version
            content = None
            set_mtime = os.fstat(session.fd).st_mtime_ns if session.times_set else None
            try:
                content = session.digest.content()
                # The repository holds the staged file against writers while it uploads it: ours,
                # under session.lock, writes no more, and after a failure the bytes are the retry's.
                self.repo.release_staged(session.fd)
                with self._counted_upload():
                    if session.state == State.PUBLISHED:
                        version = self.repo.publish(version, content=content)
                    else:
                        version = self.repo.upload(version, content=content)
            except (RepoError, OSError) as exc:  # S3 or the database, or the local disk (EIO, ENOSPC)
                version = self._after_failed_flush(session, version, content, exc)
                if version is None:
                    raise
            finally:
                self.metadata.forget(session.mount_path, parent_changed=False)
            if session.state == State.PUBLISHED:  # it left unpublished/, and the version it replaced is in expired/
                self.metadata.changed_behind_kernel(session.mount_path, State.UNPUBLISHED, State.EXPIRED)
            session.version = version
            session.move(Stage.STORED)  # before anything else can fail: the file is a cached object now
            if set_mtime is not None:
                self._record_mtime(session, set_mtime)
            if version.state == State.UNPUBLISHED:  # (one published meanwhile, by id, has left unpublished/)
                try:
                    self._discard_older_staged(version)
                except (RepoError, OSError) as exc:  # they stay in unpublished/, where they were
                    log.warning("%s: older staged versions not discarded: %s", session.mount_path, exc)

    @contextmanager
    def _counted_upload(self) -> Iterator[None]:
        with self._lock:
            self._uploading += 1
        try:
            yield
        finally:
            with self._lock:
                self._uploading -= 1

    def finish(self, session: WriteSession) -> None:
        """At release: store what is still to store, discard what will never be."""
        if not session.filling:  # stored, or left to the retry thread (not tried again at once)
            return
        if session.unlinked or session.write_error:  # unlinked, or its bytes are not what was meant: they go
            self.discard_quietly(session.version)
            return
        if session.stage is Stage.UNCHANGED:  # opened for writing, never written: there is nothing to keep
            self.repo.discard(session.version)
            return
        try:
            self.flush(session, final=True)  # created or truncated, never written (touch)
        except (RepoError, OSError):
            pass  # logged by the flush; the version stays staged and is retried

    def _record_mtime(self, session: WriteSession, mtime_ns: int) -> None:
        """The mtime a user set on a file being written (cp -p, rsync), kept with its stored version."""
        try:
            session.version = self.repo.set_attrs(session.version.id, mtime_ns=mtime_ns)
            session.times_set = False
        except RepoError as exc:  # the bytes are stored; only the time is lost
            log.warning("%s: version %d keeps its own mtime: %s", session.mount_path, session.version.id, exc)

    def _discard_older_staged(self, version: Version) -> None:
        for older in self.repo.versions_at(version.path):
            if older.state == State.UNPUBLISHED and older.id < version.id and older.id not in self._being_written():
                self.repo.discard(older)

    def discard_quietly(self, version: Version) -> None:
        """Discard a version unless it left unpublished meanwhile (published by another call, say)."""
        try:
            self.repo.discard(version)
        except LifecycleError:
            pass

    # -- a failed flush's handoff to the retry ---------------------------------------------------

    def _after_failed_flush(self, session: WriteSession, version: Version, content: Content | None,
                            failure: Exception) -> Version | None:
        """What became of a version whose flush failed. The version as recorded if the flush's work was
        done after all (the answer to a commit can be lost): the bytes this session wrote (``content``,
        None if unknown) stored and, for a file written in published/, published. Otherwise None: the
        retry thread takes the version over, marked for publishing as far as the database allows."""
        publishing = session.state == State.PUBLISHED
        try:
            recorded = self.repo.recorded_version(version.id)
        except RepoError as exc:
            log.error("%s: what became of version %d is unknown: %s", session.mount_path, version.id, exc)
            self._keep_for_retry(session, version, failure)
            if publishing:
                self._mark_later(version)
            return None
        uploaded = recorded.storage == Storage.UPLOADED
        if uploaded and content is None:
            content = self._staged_content(recorded)
        as_written = uploaded and content is not None and (recorded.size, recorded.md5) == (content.size, content.md5)
        done = (State.PUBLISHED, State.EXPIRED) if publishing else (State.UNPUBLISHED, State.PUBLISHED, State.EXPIRED)
        if as_written and recorded.state in done:
            log.warning("%s: version %d was %s after all (the answer was lost: %s)", session.mount_path,
                        version.id, recorded.state if publishing else "stored", failure)
            self.repo.cache_uploaded(recorded)
            return recorded
        self._keep_for_retry(session, recorded, failure)
        if uploaded and not as_written:  # the staged file is not that object: keep it
            log.error("%s: version %d is stored with bytes other than these, which stay in %s", session.mount_path,
                      version.id, self.repo.staged_path(recorded))
            return None
        try:
            if as_written:  # stored, but its publishing failed
                self.repo.cache_uploaded(recorded)
            if publishing and recorded.state == State.UNPUBLISHED:
                self.repo.set_publish_pending(version.id, True)
        except RepoError as exc:
            log.error("%s: version %d is marked for publishing later: %s", session.mount_path, version.id, exc)
            if publishing:
                self._mark_later(version)
        return None

    def _staged_content(self, version: Version) -> Content | None:
        try:
            return file_content(self.repo.staged_path(version))
        except OSError:  # moved into the cache meanwhile, or unreadable: unknown
            return None

    def _keep_for_retry(self, session: WriteSession, version: Version, failure: Exception) -> None:
        """After a failed flush the staged bytes may be the only copy: they are made durable on this disk
        and the retry thread takes the version over. More writes go to a new version."""
        log.error("%s: version %d kept in staging (unpublished/), will retry: %s",
                  session.mount_path, version.id, failure)
        session.version = version
        session.move(Stage.LEFT_TO_RETRY)
        with self._lock:
            self._failed_uploads.add(version.id)
        try:
            os.fsync(session.fd)
        except OSError as exc:
            log.error("%s: version %d may not survive a crash: %s", session.mount_path, version.id, exc)

    def _mark_later(self, version: Version) -> None:
        with self._lock:
            self._unmarked_publishes.add(version.id)

    # -- the retry's bookkeeping -----------------------------------------------------------------

    def mark_unmarked_publishes(self) -> None:
        """Mark for publishing (publish_pending) the versions whose publish failed at a flush while the
        database could not take the mark either. The retry thread calls this before each pass."""
        with self._lock:
            unmarked = sorted(self._unmarked_publishes)
        for version_id in unmarked:
            try:
                self.repo.set_publish_pending(version_id, True)
            except RepoError:
                return  # still unreachable: the next pass tries again
            with self._lock:
                self._unmarked_publishes.discard(version_id)

    def call_off_publish(self, version_id: int) -> None:
        """The version is not to be published after all (its name was removed)."""
        with self._lock:
            self._unmarked_publishes.discard(version_id)

    def retryable(self, version: Version) -> bool:
        """May the retry thread upload this staged version? Only if its upload failed here, or it was
        left from before this mount started (a crash); never while a writer may still be filling it
        (a version is staged a moment before its writer is registered)."""
        if version.id in self._being_written():
            return False
        with self._lock:
            return version.id in self._failed_uploads or version.created_at < self.started

    def retry_staged_uploads(self) -> int:
        """The repository's retry of staged uploads (see ``retryable``), with what it published shown
        at once: the mount's and the kernel's entries of those paths are forgotten."""

        def done_with(version: Version) -> None:
            with self._lock:
                self._failed_uploads.discard(version.id)
            path = f"/{State.PUBLISHED}/{version.path}"
            self.metadata.forget(path, parent_changed=False)
            self.metadata.changed_behind_kernel(path)

        return self.repo.retry_staged_uploads(self.retryable, done_with)
