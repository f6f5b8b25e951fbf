"""The mounted tree: what each operation on ``published/``, ``unpublished/`` and ``expired/`` does.

Everything the mount does is decided here, without FUSE, so it is tested without a mount; ``fuse.py``
only translates calls and errnos. Paths are mount paths (``/published/<type>/<dirs>/<name>``). The
tree is the facade the FUSE glue calls, over its parts:

- ``entries``: mount paths parsed, and the attributes a path shows;
- ``metadata``: the cached view of the repository's metadata, and its invalidation;
- ``lookups``: what each path shows now, the stored entry or an open writer's bytes;
- ``handles``: the open files (a reader keeps the version it opened, whatever is published later);
- ``writes``: write sessions, whose last flush uploads, verifies and, in ``published/``, publishes
  the version, so ``close()`` returns only once it is durable.

The tree itself decides the namespace: what a name shows while it is being written, and what unlink,
rename, mkdir, rmdir, chmod, utimens and the extended attributes do in each state's tree.

Concurrency: each part guards its own state with its own lock, held only for moments: never across
database or store I/O, and never while another part's lock is taken (a session's lock, held for a
whole flush, is the one exception: the handle table's and the metadata view's are taken inside it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

from .. import metrics
from ..domain.content import AppendDigest
from ..domain.lifecycle import State
from ..domain.paths import MAX_PATH_BYTES, DirPath, RepoPath
from ..errors import (
    AlreadyExistsError,
    CrossDeviceError,
    DatabaseUnavailableError,
    FileTooLargeError,
    InvalidPathError,
    IsDirectoryError,
    LifecycleError,
    NamespaceNotSupportedError,
    NoAttributeError,
    NotDirectoryError,
    NotFoundError,
    NotSupportedError,
    NotYetWrittenError,
    ReadOnlyError,
    RepoError,
)
from ..local.prefetch import Prefetcher
from ..meta.metastore import Version
from ..repo import S3Repo
from ..repofile import RepoFile
from .control import STATS_PATH, StatsFile
from .entries import STATES, TAG_PREFIX, XATTR_PREFIX, Entry, Location, ns, tag_key, xattr_values
from .flocks import FlockTable
from .handles import HIDDEN_PREFIX, GeneratedHandle, Handles, ReadHandle
from .lookups import Lookups
from .metadata import MetadataView
from .writes import MAX_FILE_SIZE, Stage, UploadCounts, Writes, WriteSession

log = logging.getLogger(__name__)

__all__ = ["MAX_FILE_SIZE", "STATES", "Entry", "Tree"]

# The moves ``rename`` makes (from one state's tree into another's): a publish, a re-publish, a
# rename in published/ (published at the new path), a rename of a staged version.
MOVES = {
    (State.UNPUBLISHED, State.PUBLISHED), (State.EXPIRED, State.PUBLISHED), (State.PUBLISHED, State.PUBLISHED),
    (State.UNPUBLISHED, State.UNPUBLISHED),
}


class UnsupportedFileKindError(LifecycleError):
    """Hard links, symbolic links and special files (EPERM): a repository file is one version's bytes at
    one path. Logged as a warning: a tool that counted on a link has failed."""

    log_level = logging.WARNING


class Tree:
    def __init__(self, repo: S3Repo, metadata_ttl: float = 1.0, started: float | None = None,
                 max_path_bytes: int = MAX_PATH_BYTES) -> None:
        """``max_path_bytes``: of a mount path (``/published/<type>/...``), what the mount point leaves of PATH_MAX."""
        self.repo = repo
        self.started = started or time.time()
        self.metadata = MetadataView(repo, metadata_ttl, ns(self.started), max_path_bytes)
        self.handles = Handles()
        self.writes = Writes(repo, self.metadata, self.started, self.handles.versions_being_written)
        self.lookups = Lookups(repo, self.metadata, self.handles)
        config = repo.config
        self.prefetcher = Prefetcher(repo, config.prefetch_files, config.prefetch_max_size, self.metadata.list_ahead)
        self.stats_file = StatsFile()
        self.flocks = FlockTable(repo)

    @property
    def invalidate_entry(self) -> Callable[[str], None] | None:
        """Set by the FUSE layer: makes the kernel forget a mount path's entry (``changed_behind_kernel``)."""
        return self.metadata.invalidate_entry

    @invalidate_entry.setter
    def invalidate_entry(self, invalidate: Callable[[str], None] | None) -> None:
        self.metadata.invalidate_entry = invalidate

    # -- paths and lookups ----------------------------------------------------------------------

    def parse(self, path: str | None) -> Location:
        return self.metadata.parse(path)

    def forget(self, *paths: str) -> None:
        self.metadata.forget(*paths)

    def lookup(self, path: str) -> Entry:
        """The entry at ``path``; NotFoundError if there is none."""
        return self.lookups.lookup(path)

    def getattr(self, path: str | None, fh: int | None = None) -> Entry:
        """The attributes of ``path``, or of an open handle's file (fstat): its own bytes, even once its
        name is gone (``path`` is None then)."""
        if path == STATS_PATH:
            return self.stats_file.entry()
        return self.lookups.getattr(path, fh)

    def readdir(self, path: str) -> list[tuple[str, Entry]]:
        """The directory's entries by name, with their attributes (one query, whatever their number)."""
        return self.lookups.readdir(path)

    # -- reading --------------------------------------------------------------------------------

    def open(self, path: str, flags: int, uid: int = 0, gid: int = 0) -> int:
        if path == STATS_PATH:
            return self.handles.add(GeneratedHandle(path, self.stats_file.open(flags)))
        if flags & os.O_ACCMODE == os.O_RDONLY:
            return self._open_read(path)
        return self._open_write(path, flags, uid, gid)

    def _open_read(self, path: str) -> int:
        # The stored version (cached or queried), never an open writer's: readers see the old or the
        # new version, never bytes still being written.
        entry = self.metadata.cached_file(path)
        stale = False
        if entry is None:
            try:
                entry = self.metadata.query(self.parse(path))
            except DatabaseUnavailableError:
                entry, stale = self.metadata.last_known(path), True
        if entry is not None and self.lookups.in_progress(entry.version):
            entry = None if stale else self.lookups.stored_entry(path)  # (a listing shows the writer's version)
        if entry is None:
            if self.handles.writer(path) is not None:
                raise NotYetWrittenError(f"{path}: not yet closed by its writer")
            raise NotFoundError(f"{path}: no such file")
        if entry.is_dir:
            raise IsDirectoryError(f"{path}: is a directory")
        # From the last-known metadata, only what this host holds: its verified cache, or its staging.
        reader = self.repo.open_version(entry.version, cached_only=stale)
        try:
            if not stale:
                self.prefetcher.opened(entry.version)
            keep = self.handles.opened_pages(path, entry.version.id)
            return self.handles.add(ReadHandle(path, entry, reader, keep_pages=keep))
        except BaseException:
            reader.close()
            raise

    def readable_fd(self, fh: int, size: int, offset: int) -> int:
        """The file descriptor holding the handle's bytes, once [offset, offset + size) is there
        (waits for a download still writing them): the FUSE layer lets libfuse read it directly."""
        handle = self.handles.require(fh)
        if isinstance(handle, ReadHandle):
            try:
                fd = handle.reader.ready(size, offset)
                metrics.CACHE_READ_BYTES.inc(max(0, min(size, handle.entry.size - offset)))
                return fd
            except RepoError:  # a failed download may have served bytes it could not verify: the kernel
                self.handles.drop_pages(handle.mount_path)  # must not keep them for the next open
                raise
        return handle.fd

    def keeps_pages(self, fh: int) -> bool:
        """May the kernel keep its cached pages of this handle's file at open (FOPEN_KEEP_CACHE)? Only a
        reader of the version whose bytes they are; writers and other versions start afresh."""
        handle = self.handles.get(fh)
        return isinstance(handle, ReadHandle) and handle.keep_pages

    def bypasses_pages(self, fh: int) -> bool:
        """Must the kernel send every read of this handle to the daemon (FOPEN_DIRECT_IO)? A control file's:
        its content, generated at open, has no size the kernel could have known before."""
        return isinstance(self.handles.get(fh), GeneratedHandle)

    # -- writing --------------------------------------------------------------------------------

    def create(self, path: str, mode: int, uid: int, gid: int) -> int:
        loc = self._writable(path)
        if loc.file is None:
            raise LifecycleError(f"{path}: files live under a type directory (<state>/<type>/<name>)")
        if self.metadata.lookup_dir(path.rstrip("/").rpartition("/")[0]) is None:
            raise NotFoundError(f"{path}: no such directory {loc.file.parent}")
        return self._start_writer(path, loc.state, *self.writes.new_version(loc.file, mode & 0o7777, uid, gid))

    def _open_write(self, path: str, flags: int, uid: int, gid: int) -> int:
        loc = self._writable(path)
        try:
            entry = self.lookup(path)
        except NotFoundError:
            if flags & os.O_CREAT:  # the kernel thought the path existed (expired a moment ago)
                return self.create(path, 0o644, uid, gid)
            raise
        if entry.is_dir:
            raise IsDirectoryError(f"{path}: is a directory")
        shown = source = entry.version
        if self.lookups.in_progress(source):  # another writer's bytes so far: copy what is stored
            stored = self.lookups.stored_entry(path)
            source = stored.version if stored else None
        keep = not flags & os.O_TRUNC
        if keep and source is not None:
            with open(self.repo.local_file(source), "rb") as copied:
                new = self.writes.new_version(loc.file, shown.mode, shown.uid, shown.gid, copy_of=copied.fileno())
        else:
            new = self.writes.new_version(loc.file, shown.mode, shown.uid, shown.gid)
        # O_TRUNC made a change already; a kept copy changes only when written
        return self._start_writer(path, loc.state, *new, stage=Stage.UNCHANGED if keep else Stage.CHANGED)

    def _start_writer(self, path: str, state: State, version: Version, fd: int, digest: AppendDigest,
                      stage: Stage = Stage.CHANGED) -> int:
        handle = WriteSession(path, state, version, fd, digest, stage=stage)
        fh = self.handles.start_writer(handle)
        self.metadata.forget(path, parent_changed=False)
        return fh

    def write(self, fh: int, data: bytes, offset: int) -> int:
        return self.write_with(fh, offset, lambda fd: os.pwrite(fd, data, offset))

    def write_with(self, fh: int, offset: int, write_to: Callable[[int], int]) -> int:
        """Write at ``offset`` by calling ``write_to(fd)`` on the staged file's descriptor, which
        returns the bytes written (the FUSE layer lets libfuse copy them in C)."""
        if offset >= MAX_FILE_SIZE:
            raise FileTooLargeError(f"write at {offset}: a file holds at most {MAX_FILE_SIZE} bytes")
        return self.writes.write(self.handles.require_writer(fh), offset, write_to)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if length > MAX_FILE_SIZE:  # truncate -s 1E would have the flush hash an exabyte of holes
            raise FileTooLargeError(f"{path}: {length} bytes: a file holds at most {MAX_FILE_SIZE}, as an S3 object")
        if fh:
            self.writes.truncate(self.handles.require_writer(fh), length)
            return
        # truncate(1) on a path: a new version with the truncated bytes, published at once
        new = self._open_write(path, os.O_WRONLY, 0, 0)
        try:
            handle = self.handles.require_writer(new)
            os.ftruncate(handle.fd, length)
            handle.digest.spoil()
            handle.changed()
            self.flush(new)
        finally:
            self.release(new)

    def flush(self, fh: int, final: bool = False) -> None:
        """Upload, verify and (in published/) publish what this handle wrote; errors reach close().

        A file created or truncated but not yet written is left for the release (``final``): a shell's
        ``echo x > f`` closes a duplicate of the descriptor before writing, and publishing the empty
        file at that flush would show readers a state the writer never meant.
        """
        handle = self.handles.get(fh)
        if isinstance(handle, WriteSession):
            self.writes.flush(handle, final)

    def release(self, fh: int) -> None:
        handle = self.handles.get(fh)
        try:
            if isinstance(handle, WriteSession):
                self.writes.finish(handle)
        finally:  # whatever the last flush met, the handle and its descriptors go, and its flock's lease
            self.flocks.release_handle(fh)
            self.handles.drop(fh, handle)
            if isinstance(handle, WriteSession):
                self.metadata.forget(handle.mount_path, parent_changed=False)

    def fsync(self, fh: int) -> None:
        self.flush(fh, final=True)

    def flock(self, fh: int, op: int, interrupted: Callable[[], bool] = lambda: False) -> None:
        """flock(2) on an open file: the lease of the version it opened, for every host (flocks.py)."""
        handle = self.handles.get(fh)
        if not isinstance(handle, (ReadHandle, WriteSession)):
            raise NotSupportedError("flock: only a file of the repository can be locked, not a directory or a "
                                    "control file")
        self.flocks.flock(fh, RepoFile(self.repo, handle.version), op, interrupted)

    # -- namespace changes ----------------------------------------------------------------------

    def unlink(self, path: str) -> None:
        """Remove the name at once, as POSIX does, even if files are open under it: open readers read on
        the version they opened, open writers write on into bytes that are never stored (discarded at
        release). In published/ the published version is expired; in unpublished/ every staged version
        of the path is discarded, so no older one comes back under the name."""
        if self.handles.unhide(path):  # libfuse, at the last close of an unlinked file
            return
        loc = self.parse(path)
        entry = self.lookup(path)
        if entry.is_dir:
            raise IsDirectoryError(f"{path}: is a directory")
        if loc.state == State.EXPIRED:
            raise ReadOnlyError(f"{path}: expired versions are read-only (gc purges them)")
        writers = self._unlink_writers(path)
        try:
            if loc.state == State.PUBLISHED:
                self._expire_published(loc.file, found=bool(writers))
            else:
                self._discard_staged(loc.file, path)
        finally:
            self.metadata.forget(path)
        if loc.state == State.PUBLISHED:
            self.metadata.changed_behind_kernel(path, State.EXPIRED)

    def _hide(self, path: str, hidden: str) -> None:
        """libfuse's rename of a file open here to a hidden name, instead of unlinking it: the unlink,
        and the hidden name kept for the open file's attributes (fstat) until libfuse unlinks it."""
        entry = self.lookup(path)
        writer = self.handles.writer(path)
        self.unlink(path)
        self.handles.hide(hidden, writer, entry)

    def _unlink_writers(self, path: str) -> list[WriteSession]:
        """Detach the open handles of ``path`` from the name: writers' bytes will never be stored."""
        writers = self.handles.detach(path)
        for writer in writers:
            with writer.lock:  # a flush in progress finishes first; none starts after this
                if writer.filling:
                    self.writes.discard_quietly(writer.version)
        return writers

    def _expire_published(self, path: RepoPath, found: bool) -> None:
        """rm in published/: expire what is published, and call off what a failed close left for the retry
        to publish there, so the name does not come back (those bytes stay in unpublished/)."""
        current = None
        for version in self.repo.versions_at(path):
            if version.state == State.PUBLISHED:
                current = version
            elif version.state == State.UNPUBLISHED and version.publish_pending:
                self.repo.set_publish_pending(version.id, False)
                found = True
            self.writes.call_off_publish(version.id)
        if current is not None:
            self.repo.expire(current)
        elif not found:
            raise NotFoundError(f"/published/{path}: no such file")

    def _discard_staged(self, path: RepoPath, mount_path: str) -> None:
        """Discard every unpublished version of ``path``, but those other names' writers are filling (a
        file being written in published/ is staged under the same path). This name's own writers count
        for nothing: their versions, even one stored at a close whose release has not come yet, go too."""
        elsewhere = self.handles.versions_written_elsewhere(mount_path)
        for version in self.repo.versions_at(path):
            if version.state == State.UNPUBLISHED and version.id not in elsewhere:
                self.writes.discard_quietly(version)

    def rename(self, old: str, new: str) -> None:
        if new.rpartition("/")[2].startswith(HIDDEN_PREFIX):
            return self._hide(old, new)
        src, dst = self.parse(old), self.parse(new)
        entry = self.lookup(old)
        if entry.is_dir:
            raise CrossDeviceError(f"{old}: directories are moved by copying (mv does this by itself)")
        if dst.file is None or src.state is None:
            raise LifecycleError(f"{old} -> {new}: files live under <state>/<type>/")
        version = entry.version
        if (src.state, dst.state) not in MOVES:
            raise LifecycleError(f"{old} -> {new}: a {src.state} file cannot be moved into {dst.state}/")
        if self.repo.get_dir(dst.file.parent) is None:
            raise NotFoundError(f"{new}: no such directory")
        try:
            if dst.state == State.PUBLISHED:
                self.repo.publish(version, dst.file)
            else:
                try:
                    target = self.lookup(new)
                except NotFoundError:
                    target = None
                if target is not None and target.version is not None and target.version.id != version.id:
                    self.repo.discard(target.version)
                self.repo.move_staged(version.id, dst.file)
        finally:
            self.metadata.forget(old, new)
        if dst.state == State.PUBLISHED:  # the version it replaced, if any, is in expired/ now
            self.metadata.changed_behind_kernel(new, State.EXPIRED)

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        loc = self.parse(path)
        if loc.state is None or not loc.parts:
            raise LifecycleError(f"{path}: the mount's top directories are fixed")
        if loc.state == State.EXPIRED:
            raise ReadOnlyError(f"{path}: expired/ is read-only")
        try:
            self.lookup(path)
        except NotFoundError:
            pass
        else:
            raise AlreadyExistsError(f"{path}: already exists")
        directory = DirPath.parse("/".join(loc.parts))  # validates the type name too
        try:
            self.repo.make_dir(directory, mode & 0o7777, uid, gid)
        finally:
            self.metadata.forget(path)

    def rmdir(self, path: str) -> None:
        loc = self.parse(path)
        if loc.state is None or not loc.parts:
            raise LifecycleError(f"{path}: the mount's top directories are fixed")
        if loc.state == State.EXPIRED:
            raise ReadOnlyError(f"{path}: expired/ is read-only")
        entry = self.lookup(path)
        if not entry.is_dir:
            raise NotDirectoryError(f"{path}: not a directory")
        try:
            self.repo.remove_dir(loc.directory)
        finally:
            self.metadata.forget(path)

    def utimens(self, path: str | None, mtime_ns: int | None, fh: int | None = None) -> None:
        """touch, cp -p, rsync -t, make: set the modification time (``mtime_ns`` None leaves it, UTIME_OMIT;
        access times are not kept). A file being written takes it at once, and its version records it once
        its bytes are stored (a later write moves it on, as on any file); a stored version and a directory
        record it at once."""
        handle = self.handles.get(fh)
        writer = handle if isinstance(handle, WriteSession) else self.handles.writer(path)
        if writer is not None:
            with writer.lock:
                if writer.unlinked or writer.filling:
                    if mtime_ns is not None:
                        os.utime(writer.fd, ns=(mtime_ns, mtime_ns))
                        writer.times_set = not writer.unlinked
                    if writer.unlinked or writer.stage is Stage.CHANGED or mtime_ns is None:
                        return
            # touch opens the file for writing and sets the times on that descriptor: while nothing is
            # written, the path shows the stored version (the writer's copy is discarded at release)
            return self._set_attrs(writer.mount_path, mtime_ns=mtime_ns)
        if mtime_ns is None:
            self.lookup(path)
            return
        self._set_attrs(path, mtime_ns=mtime_ns)

    def chmod(self, path: str, mode: int) -> None:
        self._set_attrs(path, mode=mode & 0o7777)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._set_attrs(path, uid=None if uid < 0 else uid, gid=None if gid < 0 else gid)

    def _set_attrs(self, path: str, **attrs: int | None) -> None:
        loc = self.parse(path)
        if loc.state == State.EXPIRED:
            raise ReadOnlyError(f"{path}: expired/ is read-only")
        if loc.state is None or not loc.parts:
            raise LifecycleError(f"{path}: the mount's top directories are fixed")
        entry = self.lookup(path)
        writer = self.handles.writer(path)
        try:
            if writer is not None:
                # Under the session's lock: a flush, or the first write after one, replaces its version,
                # and this must not put the older one back.
                with writer.lock:
                    writer.version = self.repo.set_attrs(writer.version.id, **attrs)
                    unchanged = writer.stage is Stage.UNCHANGED
                if unchanged:  # an unchanged copy: the stored version is the file
                    stored = self.lookups.stored_entry(path)
                    if stored is not None:
                        self.repo.set_attrs(stored.version.id, **attrs)
            elif entry.is_dir:
                self.repo.set_dir_attrs(loc.directory, **attrs)
            else:
                self.repo.set_attrs(entry.version.id, **attrs)
        finally:
            self.metadata.forget(path)

    # -- extended attributes --------------------------------------------------------------------

    def listxattr(self, path: str) -> list[str]:
        if path == STATS_PATH:
            return []
        entry = self.lookup(path)
        if entry.is_dir:
            return []
        names = [key for key, value in xattr_values(entry.version).items() if value is not None]
        tags = [TAG_PREFIX + key for key in self.repo.tags(entry.version.id)]  # a query: as getfattr -d needs
        return [XATTR_PREFIX + key for key in (*names, "tags", *tags)]

    def getxattr(self, path: str, name: str) -> bytes:
        if not name.startswith("user."):  # security.*, system.*: never a query
            raise NamespaceNotSupportedError(f"{path}: {name}: only user.* attributes are supported")
        if not name.startswith(XATTR_PREFIX) or path == STATS_PATH:
            raise NoAttributeError(f"{path}: no attribute {name}")
        entry = self.lookup(path)
        key = name[len(XATTR_PREFIX):]
        if entry.is_dir:
            value = None
        elif key == "tags":  # the tags cost a query; the other attributes are the row's
            value = json.dumps(self.repo.tags(entry.version.id), sort_keys=True)
        elif tag_key(name):
            value = self.repo.tags(entry.version.id).get(tag_key(name))
        else:
            value = xattr_values(entry.version).get(key)
        if value is None:
            raise NoAttributeError(f"{path}: no attribute {name}")
        return str(value).encode()

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        loc = self.parse(path)
        entry = self.lookup(path)
        if entry.is_dir or not name.startswith(XATTR_PREFIX):
            raise NotSupportedError(f"{path}: only {XATTR_PREFIX}state and {XATTR_PREFIX}tag.* can be set")
        key, text = name[len(XATTR_PREFIX):], value.decode("utf-8", "replace").strip()
        try:
            if key == "state" and text == State.PUBLISHED:
                if loc.state == State.PUBLISHED:
                    return
                self.repo.publish(entry.version)
            elif key == "state" and text == State.EXPIRED:
                if loc.state != State.PUBLISHED:
                    raise LifecycleError(f"{path}: only a published version can be expired")
                self.repo.expire(entry.version)
            elif key == "state":
                raise InvalidPathError(f"{path}: {name} takes 'published' or 'expired', not {text!r}")
            elif tag_key(name):
                self.repo.set_tag(entry.version.id, tag_key(name), text)
            else:
                raise NotSupportedError(f"{path}: {name} cannot be set")
        finally:
            self.metadata.forget(path)
            if key == "state":
                self.metadata.changed_behind_kernel(path)

    def removexattr(self, path: str, name: str) -> None:
        """``setfattr -x``: a tag (``user.s3repo.tag.KEY``) is removed; no other attribute can be (a
        version's state changes by setting it)."""
        if not name.startswith("user."):
            raise NamespaceNotSupportedError(f"{path}: {name}: only user.* attributes are supported")
        key = tag_key(name)
        if key is None:
            raise NotSupportedError(f"{path}: {name} cannot be removed")
        entry = self.lookup(path)
        if entry.is_dir or not self.repo.remove_tag(entry.version.id, key):
            raise NoAttributeError(f"{path}: no attribute {name}")

    # -- what a repository cannot hold ------------------------------------------------------------

    def link(self, target: str, source: str) -> None:
        """``ln``: refused (EPERM); a version lives at one path (``cp`` makes another)."""
        raise UnsupportedFileKindError(f"{target} -> {source}: hard links are not supported")

    def symlink(self, target: str, source: str) -> None:
        """``ln -s``: refused (EPERM)."""
        raise UnsupportedFileKindError(f"{target} -> {source}: symbolic links are not supported")

    def readlink(self, path: str) -> str:
        """No symbolic link exists in the tree: NotFoundError."""
        raise NotFoundError(f"{path}: not a symbolic link")

    def mknod(self, path: str, mode: int) -> None:
        """Device files, FIFOs and sockets: refused (EPERM); regular files are made by ``create``."""
        raise UnsupportedFileKindError(f"{path}: only regular files and directories can be made")

    def statfs(self) -> dict:
        st = os.statvfs(self.repo.config.local_root)
        return {name: getattr(st, name) for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                      "f_files", "f_ffree", "f_favail", "f_namemax")}

    # -- helpers --------------------------------------------------------------------------------

    def _writable(self, path: str) -> Location:
        loc = self.parse(path)
        if loc.state == State.EXPIRED:
            raise ReadOnlyError(f"{path}: expired versions are read-only")
        if loc.state is None or not loc.parts:
            raise LifecycleError(f"{path}: the mount's top directories are fixed")
        return loc

    # -- for the retry thread and the unmount ---------------------------------------------------

    def retryable(self, version: Version) -> bool:
        """May the retry thread upload this staged version? (``Writes.retryable``)"""
        return self.writes.retryable(version)

    def retry_staged_uploads(self) -> int:
        return self.writes.retry_staged_uploads()

    def mark_unmarked_publishes(self) -> None:
        self.writes.mark_unmarked_publishes()

    def upload_counts(self) -> UploadCounts:
        """Uploads in flight and versions left to the retry (``Writes.upload_counts``)."""
        return self.writes.upload_counts()

    def versions_being_written(self) -> set[int]:
        """Every version an open write handle holds (a path may have several writers)."""
        return self.handles.versions_being_written()

    def flush_all(self, on_error: Callable[[str, Exception], None] | None = None) -> None:
        """Flush every written handle (at unmount)."""
        for fh in self.handles.write_handles():
            try:
                self.flush(fh)
            except (RepoError, OSError) as exc:  # logged by the flush; the others are flushed all the same
                if on_error:
                    on_error(str(fh), exc)

