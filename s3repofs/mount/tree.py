"""The mounted tree: ``published/``, ``unpublished/`` and ``expired/`` over the repository.

Everything the mount does is decided here, without FUSE, so it is tested without a mount; ``fuse.py``
only translates calls and errnos. Paths are mount paths (``/published/<type>/<dirs>/<name>``).

Handles: a read handle holds the version it opened (its cache file is pinned and open), so a new
version published at the same path never changes what an open reader sees. A write handle stages a
new version (copy-on-write: published bytes are never modified); its last flush uploads, verifies and,
in ``published/``, publishes it, so ``close()`` returns only once the version is durable.

Concurrency: ``_lock`` guards the handle tables and the metadata cache; it is never held across
database or store I/O.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Callable

from cachetools import LRUCache, TTLCache

from ..domain.content import AppendDigest, Content, file_content, read_back
from ..domain.paths import MAX_PATH_BYTES, DirPath, RepoPath, split_components
from ..errors import (
    AlreadyExistsError,
    BadHandleError,
    CrossDeviceError,
    DatabaseUnavailableError,
    FileTooLargeError,
    InvalidPathError,
    IsDirectoryError,
    LifecycleError,
    NamespaceNotSupportedError,
    NameTooLongError,
    NoAttributeError,
    NotDirectoryError,
    NotFoundError,
    NotSupportedError,
    NotYetWrittenError,
    ReadOnlyError,
    RepoError,
    UnavailableError,
)
from ..local.prefetch import Prefetcher
from ..local.transfer import pwrite_all
from ..meta.metastore import Directory, Version
from ..repo import S3Repo, VersionReader
from .lastknown import LastKnown, Outage

log = logging.getLogger(__name__)

STATES = ("published", "unpublished", "expired")
# libfuse renames a file unlinked while open to this name until its last close (unless hard_remove):
# the tree takes that rename for the unlink, and answers for the open file under the name.
HIDDEN_PREFIX = ".fuse_hidden"
MAX_FILE_SIZE = 5 * 1024**4  # S3's largest object
XATTR_PREFIX = "user.s3repo."
MISSING = object()


@dataclass(frozen=True)
class Location:
    """A mount path, parsed: the state tree it is in and its components below the state."""

    state: str | None  # None for the mount's root
    parts: tuple[str, ...]

    @property
    def file(self) -> RepoPath | None:
        return RepoPath(self.parts[0], "/".join(self.parts[1:-1]), self.parts[-1]) if len(self.parts) >= 2 else None

    @property
    def directory(self) -> DirPath | None:
        return DirPath(self.parts[0], "/".join(self.parts[1:])) if self.parts else None


@dataclass(frozen=True)
class Entry:
    is_dir: bool
    mode: int  # permission bits
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    version: Version | None = None
    nlink: int = 1  # a file's: 0 once unlinked while open; a directory's: 2 + its subdirectories

    def stat(self) -> dict:
        kind = stat.S_IFDIR if self.is_dir else stat.S_IFREG
        return {"st_mode": kind | self.mode, "st_nlink": self.nlink, "st_uid": self.uid,
                "st_gid": self.gid, "st_size": self.size, "st_mtime": self.mtime_ns, "st_ctime": self.ctime_ns,
                "st_atime": self.mtime_ns, "st_blocks": (self.size + 511) // 512, "st_blksize": 1024 * 1024}


def _ns(seconds: float | None) -> int:
    return int((seconds or 0) * 1e9)


def file_entry(version: Version, state: str) -> Entry:
    mode = version.mode & (0o7555 if state == "expired" else 0o7777)  # expired/ is read-only
    changed = version.expired_at if state == "expired" else version.published_at or version.created_at
    modified = version.modified_ns
    return Entry(False, mode, version.uid, version.gid, version.size or 0, modified,
                 max(_ns(changed), modified), version)


def _copy_whole(source: int, target: int) -> int:
    """Copy the file behind descriptor ``source`` into the empty file behind ``target``; its size."""
    size, copied = os.fstat(source).st_size, 0
    for chunk in read_back(source, 0, size):
        pwrite_all(target, chunk, copied)
        copied += len(chunk)
    if copied < size:
        raise OSError(errno.EIO, "the file was cut short while it was copied")
    return copied


def dir_entry(directory: Directory, state: str) -> Entry:
    mode = directory.mode & (0o7555 if state == "expired" else 0o7777)
    modified = directory.modified_ns
    return Entry(True, mode, directory.uid, directory.gid, 0, modified, modified, nlink=2 + directory.subdirs)


@dataclass
class ReadHandle:
    mount_path: str
    entry: Entry  # what was opened: fstat answers it, whatever the path shows later
    reader: VersionReader  # holds the cached object open (and pinned) until release
    keep_pages: bool = False  # the kernel's cached pages of the path are this version's: keep them
    unlinked: bool = False

    @property
    def version(self) -> Version:
        return self.entry.version


@dataclass
class WriteHandle:
    mount_path: str
    state: str  # where the version goes on flush: published or unpublished
    version: Version
    fd: int
    digest: AppendDigest  # of the bytes written to fd, hashed as they arrive
    dirty: bool = True
    written: bool = False  # a write arrived since the version started
    sealed: bool = False  # flushed: further writes start a new version
    failed: bool = False  # the last flush failed: the retry owns the version; further writes start a new one
    unlinked: bool = False  # its name was removed: its bytes stay the descriptor's, and are never stored
    times_set: bool = False  # utimens set the file's mtime: its version records it when stored
    write_error: int = 0  # the errno of a write or truncate that failed: its bytes are not what was meant
    retired_fds: list[int] = field(default_factory=list)  # of earlier versions of this handle, closed at release
    lock: threading.Lock = field(default_factory=threading.Lock)


class Tree:
    def __init__(self, repo: S3Repo, metadata_ttl: float = 1.0, started: float | None = None,
                 max_path_bytes: int = MAX_PATH_BYTES) -> None:
        """``max_path_bytes``: of a mount path (``/published/<type>/...``), what the mount point leaves of PATH_MAX."""
        self.repo = repo
        self.max_path_bytes = max_path_bytes
        self._lock = threading.Lock()
        self._entries: TTLCache = TTLCache(maxsize=200_000, ttl=metadata_ttl)
        # Directory listings (mount path -> sorted (name, Entry)): a repeated `ls -l` is no query.
        self._listings: TTLCache = TTLCache(maxsize=64, ttl=metadata_ttl)
        # The last answers, however old: what reads are served from while the database is unreachable.
        self._known = LastKnown()
        self._outage = Outage(self._known.describe)
        self._handles: dict[int, ReadHandle | WriteHandle] = {}
        self._writers: dict[str, WriteHandle] = {}  # mount path -> newest open writer
        # libfuse's hidden name -> the unlinked open file: its writer, if any, and its entry when unlinked
        self._hidden: dict[str, tuple[WriteHandle | None, Entry]] = {}
        # Mount path -> the version whose bytes the kernel may cache for it: an open keeps the kernel's
        # pages only for the same version (mtime can be set by users, so it cannot say which bytes they are).
        self._pages: LRUCache = LRUCache(maxsize=100_000)
        self._next_fh = 1
        self.started = started or time.time()
        self._root_time = _ns(self.started)
        self._failed_uploads: set[int] = set()  # versions whose upload failed at a flush here
        self._unmarked_publishes: set[int] = set()  # failed publishes whose publish_pending the database missed
        self._generation = 0  # bumped by every local change (forget)
        # Set by the FUSE layer: makes the kernel forget a mount path's entry (see _changed_behind_kernel).
        self.invalidate_entry: Callable[[str], None] | None = None
        config = repo.config
        self.prefetcher = Prefetcher(repo, config.prefetch_files, config.prefetch_max_size, self._list_ahead)

    # -- paths and lookups ----------------------------------------------------------------------

    def parse(self, path: str | None) -> Location:
        if path is None:  # libfuse names no path for a file unlinked while open
            raise NotFoundError("the file was removed while open")
        if len(path.encode("utf-8", "surrogateescape")) > self.max_path_bytes:
            raise NameTooLongError(f"{path[:60]}...: longer than the {self.max_path_bytes} bytes the mount point "
                                   "leaves of PATH_MAX")
        parts = split_components(path.strip("/")) if path.strip("/") else []
        if not parts:
            return Location(None, ())
        if parts[0] not in STATES:
            raise NotFoundError(f"{path}: not in published/, unpublished/ or expired/")
        return Location(parts[0], tuple(parts[1:]))

    def lookup(self, path: str) -> Entry:
        """The entry at ``path``; NotFoundError if there is none."""
        with self._lock:
            writer = self._writers.get(path)
            cached = self._entries.get(path)
            generation = self._generation
            hidden = self._hidden.get(path) if HIDDEN_PREFIX in path else None
        if hidden is not None:
            return self._unlinked_entry(*hidden)
        if writer is not None and (entry := self._writer_entry(writer)) is not None:
            return entry
        if cached is MISSING:
            raise NotFoundError(f"{path}: no such file or directory")
        if cached is not None:
            return cached
        try:
            entry = self._query(self.parse(path))
        except InvalidPathError as exc:
            if isinstance(exc, NameTooLongError):
                raise
            entry = None  # a name the repository could never hold simply does not exist
        except DatabaseUnavailableError:
            return self._last_known(path)
        with self._lock:
            if generation == self._generation:  # nothing changed here while we queried
                self._entries[path] = MISSING if entry is None else entry
                self._known.learn(path, MISSING if entry is None else entry)
        if entry is None:
            raise NotFoundError(f"{path}: no such file or directory")
        return entry

    def _query(self, loc: Location) -> Entry | None:
        if loc.state is None:
            return Entry(True, 0o755, 0, 0, 0, self._root_time, self._root_time, nlink=2 + len(STATES))
        if not loc.parts:  # a state's tree: one directory per type
            types = len(self._outage.ask(self.repo.meta.list_types))
            mode = 0o555 if loc.state == "expired" else 0o755
            return Entry(True, mode, 0, 0, 0, self._root_time, self._root_time, nlink=2 + types)
        # Files first, in their own query: most lookups find one. (One query for both, tried, cost
        # every hit 90 us more on PostgreSQL here than the 120 us it saved a miss.)
        if loc.file is not None:
            version = self._outage.ask(self.repo.meta.find, loc.file, loc.state)
            if version is not None:
                return self._file_entry(version, loc.state)
        directory = self._outage.ask(self.repo.meta.get_dir, loc.directory)
        return dir_entry(directory, loc.state) if directory else None

    def _last_known(self, path: str) -> Entry:
        """The entry this mount last knew at ``path``, stale, while the database cannot say:
        DatabaseUnavailableError if it knew none, NotFoundError if it knew there was none. (The outage's
        cause was logged once, when it began.)"""
        known = self._known.path(path)
        if known is None:
            raise DatabaseUnavailableError(f"{path}: not known to this mount while the database is unreachable")
        self._outage.served()
        if known is MISSING:
            raise NotFoundError(f"{path}: no such file or directory (as last known)")
        return known

    def _file_entry(self, version: Version, state: str) -> Entry:
        entry = file_entry(version, state)
        if version.size is None and version.storage == "local":  # staged here: its size is on disk
            try:
                return replace(entry, size=os.stat(self.repo.cache.staging_path(version.s3_key)).st_size)
            except FileNotFoundError:
                pass  # staged on another host
        return entry

    def _writer_entry(self, writer: WriteHandle) -> Entry | None:
        """The attributes of a file being written (None once its writer has closed)."""
        # No lock: a flush holds the writer's lock for a whole upload, and stat must not wait for it.
        v = writer.version
        if writer.sealed:  # flushed: the stored version (its file is a cache object now, whose mtime the cache sets)
            return file_entry(v, writer.state)
        try:
            st = os.fstat(writer.fd)
        except OSError:  # closed meanwhile (fd -1)
            return None
        return Entry(False, v.mode, v.uid, v.gid, st.st_size, st.st_mtime_ns, st.st_mtime_ns, v)

    def _unlinked_entry(self, writer: WriteHandle | None, entry: Entry) -> Entry:
        # Once its writer is released, readers may still be open: the entry as it was unlinked.
        current = self._writer_entry(writer) if writer is not None else None
        return replace(current or entry, nlink=0)

    def getattr(self, path: str | None, fh: int | None = None) -> dict:
        """The attributes of ``path``, or of an open handle's file (fstat): its own bytes, even once its
        name is gone (``path`` is None then)."""
        handle = self._handles.get(fh) if fh else None
        entry = None
        if isinstance(handle, WriteHandle):
            entry = self._writer_entry(handle)
        elif isinstance(handle, ReadHandle) and path is None:
            # Only once unlinked: while the name lives, its attributes are the path's (one kernel inode
            # serves every reader of the path; the older version's size would cut the newer's reads short).
            entry = handle.entry
        if entry is not None:
            return replace(entry, nlink=0).stat() if handle.unlinked else entry.stat()
        if path is None:
            raise BadHandleError(f"file handle {fh} is closed")
        return self.lookup(path).stat()

    def readdir(self, path: str) -> list[tuple[str, Entry]]:
        """The directory's entries by name, with their attributes (one query, whatever their number)."""
        loc = self.parse(path)
        entry = self.lookup(path)
        if not entry.is_dir:
            raise NotDirectoryError(f"{path}: not a directory")
        if loc.state is None:  # by lookup: cached, and from the last-known entries while the database is down
            return [(state, self.lookup(f"/{state}")) for state in STATES]
        base = path.rstrip("/")
        with self._lock:
            listed = self._listings.get(base)
            generation = self._generation
        if listed is None:
            try:
                listed = self._list(loc)
            except DatabaseUnavailableError:
                listed = self._last_listing(base)
            else:
                with self._lock:
                    if generation == self._generation:  # nothing changed here while we queried
                        self._listings[base] = listed
                        for name, child in listed:  # a listing answers the lookups that follow it (ls -l)
                            self._entries[f"{base}/{name}"] = child
                        self._known.learn_listing(base, listed)
        prefix = base + "/"
        with self._lock:
            writers = [w for p, w in self._writers.items() if p.startswith(prefix) and "/" not in p[len(prefix):]]
        if not writers:
            return listed
        found = dict(listed)
        for writer in writers:
            if (entry := self._writer_entry(writer)) is not None:
                found[writer.mount_path[len(prefix):]] = entry
        return sorted(found.items())

    def _last_listing(self, base: str) -> list[tuple[str, Entry]]:
        """The listing this mount last saw of ``base``, stale, while the database cannot say."""
        listed = self._known.listing(base)
        if listed is None:
            raise DatabaseUnavailableError(f"{base}: never listed by this mount while the database is unreachable")
        self._outage.served()
        return listed

    def _list(self, loc: Location) -> list[tuple[str, Entry]]:
        found: dict[str, Entry] = {}
        ask, meta = self._outage.ask, self.repo.meta
        if not loc.parts:
            for directory in ask(meta.list_types):
                found[directory.file_type] = dir_entry(directory, loc.state)
        else:
            for directory in ask(meta.list_subdirs, loc.directory):
                found[directory.name] = dir_entry(directory, loc.state)
            for version in ask(meta.list_dir, loc.directory, loc.state):
                found[version.name] = self._file_entry(version, loc.state)
        return sorted(found.items())

    def _list_ahead(self, directory: DirPath, after: str, limit: int) -> list[Version]:
        """The published files after ``after`` in ``directory``, for the prefetcher. Like a listing, they
        answer the lookups that follow: the reader opens them next, perhaps after the listing's entries expired."""
        with self._lock:
            generation = self._generation
        versions = self._outage.ask(lambda: self.repo.meta.list_dir(directory, "published", after=after, limit=limit))
        entries = [(f"/published/{version.path}", self._file_entry(version, "published")) for version in versions]
        with self._lock:
            if generation == self._generation:  # nothing changed here while we queried
                self._entries.update(entries)
        return versions

    def forget(self, *paths: str) -> None:
        """Forget cached entries of these mount paths in every state's tree, after a change made here
        (a publish changes published/ and expired/ at once). Other hosts' changes age out by TTL."""
        with self._lock:
            self._generation += 1  # a query begun before this change must not store its answer
            for path in paths:
                below_state = path.strip("/").partition("/")[2]
                parent = below_state.rpartition("/")[0]
                for state in STATES:
                    same, above = f"/{state}/{below_state}".rstrip("/"), f"/{state}/{parent}".rstrip("/")
                    self._entries.pop(same, None)
                    self._entries.pop(above, None)  # its mtime and link count move with its entries
                    self._listings.pop(same, None)
                    self._listings.pop(above, None)
                    self._known.forget(same, above)

    def _changed_behind_kernel(self, path: str, *states: str) -> None:
        """``path`` (a mount path) changed in these state trees (all three if none are named) by something
        other than the kernel's own call on that name: the kernel must not keep its entry (DESIGN.md's
        FUSE facts: it would send OPEN without O_CREAT for a path that has gone, say)."""
        invalidate = self.invalidate_entry
        if invalidate is None:
            return
        below_state = path.strip("/").partition("/")[2]
        for state in states or STATES:
            invalidate(f"/{state}/{below_state}")

    # -- reading --------------------------------------------------------------------------------

    def open(self, path: str, flags: int, uid: int = 0, gid: int = 0) -> int:
        if flags & os.O_ACCMODE == os.O_RDONLY:
            return self._open_read(path)
        return self._open_write(path, flags, uid, gid)

    def _open_read(self, path: str) -> int:
        # The stored version (cached or queried), never an open writer's: readers see the old or the
        # new version, never bytes still being written.
        with self._lock:
            entry = self._entries.get(path)
        stale = False
        if not isinstance(entry, Entry) or entry.is_dir:
            try:
                entry = self._query(self.parse(path))
            except DatabaseUnavailableError:
                entry, stale = self._last_known(path), True
        if entry is not None and self._in_progress(entry.version):
            entry = None if stale else self._stored_entry(path)  # (a listing shows the writer's version)
        if entry is None:
            with self._lock:
                being_written = path in self._writers
            if being_written:
                raise NotYetWrittenError(f"{path}: not yet closed by its writer")
            raise NotFoundError(f"{path}: no such file")
        if entry.is_dir:
            raise IsDirectoryError(f"{path}: is a directory")
        # From the last-known metadata, only what this host holds: its verified cache, or its staging.
        reader = self.repo.open_version(entry.version, cached_only=stale)
        try:
            if not stale:
                self.prefetcher.opened(entry.version)
            with self._lock:
                keep = self._pages.get(path) == entry.version.id
                self._pages[path] = entry.version.id
            return self._add_handle(ReadHandle(path, entry, reader, keep_pages=keep))
        except BaseException:
            reader.close()
            raise

    def _in_progress(self, version: Version | None) -> bool:
        """Is an open writer still filling ``version``? Only an unpublished one can be: reads of published
        and expired files (the hot path) never walk the handles."""
        return version is not None and version.state == "unpublished" and version.id in self._versions_in_progress()

    def _versions_in_progress(self) -> set[int]:
        """The versions open writers are still filling (not those a flush stored or left to the retry)."""
        with self._lock:
            return {h.version.id for h in self._handles.values()
                    if isinstance(h, WriteHandle) and not (h.sealed or h.failed)}

    def _stored_entry(self, path: str) -> Entry | None:
        """What ``path`` shows once its writers' unfinished bytes are set aside: the published version
        in published/, the newest staged version a writer has finished with in unpublished/."""
        loc = self.parse(path)
        if loc.file is None or loc.state == "expired":
            return None
        if loc.state == "published":
            version = self.repo.meta.find(loc.file, "published")
            return self._file_entry(version, "published") if version else None
        in_progress = self._versions_in_progress()
        for version in reversed(self.repo.meta.history(loc.file)):
            if version.state == "unpublished" and version.id not in in_progress:
                return self._file_entry(version, "unpublished")
        return None

    def readable_fd(self, fh: int, size: int, offset: int) -> int:
        """The file descriptor holding the handle's bytes, once [offset, offset + size) is there
        (waits for a download still writing them): the FUSE layer lets libfuse read it directly."""
        handle = self._handle(fh)
        if isinstance(handle, ReadHandle):
            try:
                return handle.reader.ready(size, offset)
            except RepoError:  # a failed download may have served bytes it could not verify: the kernel
                self._drop_pages(handle.mount_path)  # must not keep them for the next open
                raise
        return handle.fd

    def keeps_pages(self, fh: int) -> bool:
        """May the kernel keep its cached pages of this handle's file at open (FOPEN_KEEP_CACHE)? Only a
        reader of the version whose bytes they are; writers and other versions start afresh."""
        handle = self._handles.get(fh)
        return isinstance(handle, ReadHandle) and handle.keep_pages

    def _drop_pages(self, path: str) -> None:
        with self._lock:
            self._pages.pop(path, None)

    # -- writing --------------------------------------------------------------------------------

    def create(self, path: str, mode: int, uid: int, gid: int) -> int:
        loc = self._writable(path)
        if loc.file is None:
            raise LifecycleError(f"{path}: files live under a type directory (<state>/<type>/<name>)")
        try:  # the kernel looked the parent up just before: usually answered from the cache
            parent = self.lookup(path.rstrip("/").rpartition("/")[0])
        except NotFoundError:
            parent = None
        if parent is None or not parent.is_dir:
            raise NotFoundError(f"{path}: no such directory {loc.file.parent}")
        return self._start_writer(path, loc.state, *self._new_version(loc.file, mode & 0o7777, uid, gid))

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
        if self._in_progress(source):  # another writer's bytes so far: copy what is stored
            stored = self._stored_entry(path)
            source = stored.version if stored else None
        keep = not flags & os.O_TRUNC
        if keep and source is not None:
            with open(self.repo.local_file(source), "rb") as copied:
                new = self._new_version(loc.file, shown.mode, shown.uid, shown.gid, copy_of=copied.fileno())
        else:
            new = self._new_version(loc.file, shown.mode, shown.uid, shown.gid)
        # O_TRUNC made a change already; a kept copy changes only when written
        return self._start_writer(path, loc.state, *new, dirty=not keep)

    def _new_version(self, path: RepoPath, mode: int, uid: int, gid: int,
                     copy_of: int | None = None) -> tuple[Version, int, AppendDigest]:
        """A new unpublished version of ``path`` with its writer's descriptor and digest: empty, or a
        copy of the file behind descriptor ``copy_of``, made under the writer's lock (no retry takes a
        half copy). If anything fails, no version is left behind."""
        version = self.repo.add_file(str(path), mode=mode, uid=uid, gid=gid).version
        fd = -1
        try:
            fd = self.repo.cache.open_staged_for_writing(version.s3_key)
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

    def _start_writer(self, path: str, state: str, version: Version, fd: int, digest: AppendDigest,
                      dirty: bool = True) -> int:
        handle = WriteHandle(path, state, version, fd, digest, dirty=dirty)
        with self._lock:
            self._writers[path] = handle
            self._pages.pop(path, None)  # the kernel drops its pages at a writer's open
        self.forget(path)
        return self._add_handle(handle)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        return self.write_with(fh, offset, lambda fd: os.pwrite(fd, data, offset))

    def write_with(self, fh: int, offset: int, write_to: Callable[[int], int]) -> int:
        """Write at ``offset`` by calling ``write_to(fd)`` on the staged file's descriptor, which
        returns the bytes written (the FUSE layer lets libfuse copy them in C)."""
        if offset >= MAX_FILE_SIZE:
            raise FileTooLargeError(f"write at {offset}: a file holds at most {MAX_FILE_SIZE} bytes")
        handle = self._write_handle(fh)
        with handle.lock:
            if handle.sealed or handle.failed:
                self._continue_in_new_version(handle)
            handle.dirty = handle.written = True
            try:
                written = write_to(handle.fd)
            except OSError as exc:
                handle.write_error = exc.errno or errno.EIO
                raise
            handle.digest.appended(offset, written)
            return written

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if length > MAX_FILE_SIZE:  # truncate -s 1E would have the flush hash an exabyte of holes
            raise FileTooLargeError(f"{path}: {length} bytes: a file holds at most {MAX_FILE_SIZE}, as an S3 object")
        if fh:
            handle = self._write_handle(fh)
            with handle.lock:
                if handle.sealed or handle.failed:
                    self._continue_in_new_version(handle)
                handle.dirty = handle.written = True
                os.ftruncate(handle.fd, length)
                handle.digest.spoil()
            return
        # truncate(1) on a path: a new version with the truncated bytes, published at once
        new = self._open_write(path, os.O_WRONLY, 0, 0)
        try:
            handle = self._write_handle(new)
            os.ftruncate(handle.fd, length)
            handle.digest.spoil()
            handle.dirty = handle.written = True
            self.flush(new)
        finally:
            self.release(new)

    def flush(self, fh: int, final: bool = False) -> None:
        """Upload, verify and (in published/) publish what this handle wrote; errors reach close().

        A file created or truncated but not yet written is left for the release (``final``): a shell's
        ``echo x > f`` closes a duplicate of the descriptor before writing, and publishing the empty
        file at that flush would show readers a state the writer never meant.
        """
        handle = self._handles.get(fh)
        if isinstance(handle, WriteHandle):
            self._flush(handle, final)

    def _flush(self, handle: WriteHandle, final: bool) -> None:
        with handle.lock:
            if handle.unlinked or not handle.dirty or not (handle.written or final):
                return
            if handle.write_error:  # a full disk, say: storing what did get written would publish half a file
                raise OSError(handle.write_error, f"{handle.mount_path}: not stored: a write to it failed "
                              f"({os.strerror(handle.write_error)})")
            if handle.failed:  # another close or fsync of it: not uploaded again at once, beside the retry
                raise UnavailableError(f"{handle.mount_path}: version {handle.version.id} is left to the retry "
                                       "after a failed upload")
            version = handle.version
            content = None
            set_mtime = os.fstat(handle.fd).st_mtime_ns if handle.times_set else None
            try:
                content = handle.digest.content()
                # The repository holds the staged file against writers while it uploads it: ours,
                # under handle.lock, writes no more, and after a failure the bytes are the retry's.
                self.repo.cache.release_staged(handle.fd)
                if handle.state == "published":
                    version = self.repo.publish(version, content=content)
                else:
                    version = self.repo.upload(version, content=content)
            except (RepoError, OSError) as exc:  # S3 or the database, or the local disk (EIO, ENOSPC)
                version = self._after_failed_flush(handle, version, content, exc)
                if version is None:
                    raise
            finally:
                self.forget(handle.mount_path)
            if handle.state == "published":  # it left unpublished/, and the version it replaced is in expired/
                self._changed_behind_kernel(handle.mount_path, "unpublished", "expired")
            handle.version = version
            handle.dirty = handle.failed = False
            handle.sealed = True  # before anything else can fail: the file is a cached object now
            if set_mtime is not None:
                self._record_mtime(handle, set_mtime)
            if version.state == "unpublished":  # (one published meanwhile, by id, has left unpublished/)
                try:
                    self._discard_older_staged(version)
                except (RepoError, OSError) as exc:  # they stay in unpublished/, where they were
                    log.warning("%s: older staged versions not discarded: %s", handle.mount_path, exc)

    def _record_mtime(self, handle: WriteHandle, mtime_ns: int) -> None:
        """The mtime a user set on a file being written (cp -p, rsync), kept with its stored version."""
        try:
            handle.version = self.repo.meta.set_attrs(handle.version.id, mtime_ns=mtime_ns)
            handle.times_set = False
        except RepoError as exc:  # the bytes are stored; only the time is lost
            log.warning("%s: version %d keeps its own mtime: %s", handle.mount_path, handle.version.id, exc)

    def _after_failed_flush(self, handle: WriteHandle, version: Version, content: Content | None,
                            failure: Exception) -> Version | None:
        """What became of a version whose flush failed. The version as recorded if the flush's work was
        done after all (the answer to a commit can be lost): the bytes this handle wrote (``content``,
        None if unknown) stored and, for a file written in published/, published. Otherwise None: the
        retry thread takes the version over, marked for publishing as far as the database allows."""
        try:
            recorded = self.repo.meta.get(version.id)
        except RepoError as exc:
            log.error("%s: what became of version %d is unknown: %s", handle.mount_path, version.id, exc)
            self._keep_for_retry(handle, version, failure)
            if handle.state == "published":
                self._mark_later(version)
            return None
        if recorded.storage == "uploaded" and content is None:
            content = self._staged_content(recorded)
        as_written = recorded.storage == "uploaded" and content is not None and (
            recorded.size, recorded.md5) == (content.size, content.md5)
        done = ("published", "expired") if handle.state == "published" else ("unpublished", "published", "expired")
        if as_written and recorded.state in done:
            log.warning("%s: version %d was %s after all (the answer was lost: %s)", handle.mount_path,
                        version.id, recorded.state if handle.state == "published" else "stored", failure)
            self.repo.cache_uploaded(recorded)
            return recorded
        self._keep_for_retry(handle, recorded, failure)
        if recorded.storage == "uploaded" and not as_written:  # the staged file is not that object: keep it
            log.error("%s: version %d is stored with bytes other than these, which stay in %s", handle.mount_path,
                      version.id, self.repo.cache.staging_path(recorded.s3_key))
            return None
        try:
            if as_written:  # stored, but its publishing failed
                self.repo.cache_uploaded(recorded)
            if handle.state == "published" and recorded.state == "unpublished":
                self.repo.meta.set_publish_pending(version.id, True)
        except RepoError as exc:
            log.error("%s: version %d is marked for publishing later: %s", handle.mount_path, version.id, exc)
            if handle.state == "published":
                self._mark_later(version)
        return None

    def _mark_later(self, version: Version) -> None:
        with self._lock:
            self._unmarked_publishes.add(version.id)

    def mark_unmarked_publishes(self) -> None:
        """Mark for publishing (publish_pending) the versions whose publish failed at a flush while the
        database could not take the mark either. The retry thread calls this before each pass."""
        with self._lock:
            unmarked = sorted(self._unmarked_publishes)
        for version_id in unmarked:
            try:
                self.repo.meta.set_publish_pending(version_id, True)
            except RepoError:
                return  # still unreachable: the next pass tries again
            with self._lock:
                self._unmarked_publishes.discard(version_id)

    def _staged_content(self, version: Version) -> Content | None:
        try:
            return file_content(self.repo.cache.staging_path(version.s3_key))
        except OSError:  # moved into the cache meanwhile, or unreadable: unknown
            return None

    def _keep_for_retry(self, handle: WriteHandle, version: Version, failure: Exception) -> None:
        """After a failed flush the staged bytes may be the only copy: they are made durable on this disk
        and the retry thread takes the version over. More writes go to a new version
        (``_continue_in_new_version``)."""
        log.error("%s: version %d kept in staging (unpublished/), will retry: %s",
                  handle.mount_path, version.id, failure)
        handle.version = version
        handle.failed = True
        with self._lock:
            self._failed_uploads.add(version.id)
        try:
            os.fsync(handle.fd)
        except OSError as exc:
            log.error("%s: version %d may not survive a crash: %s", handle.mount_path, version.id, exc)

    def _discard_older_staged(self, version: Version) -> None:
        for older in self.repo.meta.history(version.path):
            if older.state == "unpublished" and older.id < version.id and older.id not in self.versions_being_written():
                self.repo.discard(older)

    def _continue_in_new_version(self, handle: WriteHandle) -> None:
        """More writes after a flush stored the bytes, or handed them to the retry (which may find them
        stored already, even published: a commit's answer can be lost): those bytes stay as they are,
        and the writer continues in a new version with a copy of what its descriptor holds (wherever the
        old version's file has gone meanwhile: into the cache, or away)."""
        old = handle.version
        version, fd, digest = self._new_version(old.path, old.mode, old.uid, old.gid, copy_of=handle.fd)
        # The old descriptor stays open until release: libfuse may still be reading it for a read
        # answered a moment ago (read_buf), and a closed number could be reused by another file. It
        # gives up its writer's lock: the old version may be the retry's.
        self.repo.cache.release_staged(handle.fd)
        handle.retired_fds.append(handle.fd)
        handle.digest.stop()
        handle.fd, handle.digest = fd, digest
        handle.version, handle.sealed, handle.failed = version, False, False
        if handle.unlinked:  # a file without a name: its new bytes live in the descriptor alone
            self._discard_quietly(version)

    def release(self, fh: int) -> None:
        handle = self._handles.get(fh)
        try:
            if isinstance(handle, WriteHandle):
                self._finish_writer(handle)
        finally:  # whatever the last flush met, the handle and its descriptors go
            self._drop_handle(fh, handle)

    def _drop_handle(self, fh: int, handle: ReadHandle | WriteHandle | None) -> None:
        with self._lock:
            self._handles.pop(fh, None)
            if isinstance(handle, WriteHandle) and self._writers.get(handle.mount_path) is handle:
                del self._writers[handle.mount_path]
                # Another writer of the name still open (truncate of the path beside it, a second open)
                # is its writer again: stat shows its bytes, utimens and chmod reach its version.
                others = [h for h in self._handles.values() if isinstance(h, WriteHandle)
                          and h.mount_path == handle.mount_path and not h.unlinked]
                if others:
                    self._writers[handle.mount_path] = others[-1]
        if isinstance(handle, ReadHandle):
            handle.reader.close()
        elif isinstance(handle, WriteHandle):
            handle.digest.stop()
            fd, handle.fd = handle.fd, -1  # a concurrent stat of this writer now finds it closed
            for number in (fd, *handle.retired_fds):
                os.close(number)
            self.forget(handle.mount_path)

    def _finish_writer(self, handle: WriteHandle) -> None:
        if handle.sealed or handle.failed:  # a failed upload is not tried again at once: the retry thread will
            return
        if handle.unlinked or handle.write_error:  # unlinked, or its bytes are not what was meant: they go
            self._discard_quietly(handle.version)
            return
        if not handle.dirty:  # opened for writing, never written: there is nothing to keep
            self.repo.discard(handle.version)
            return
        try:
            self._flush(handle, final=True)  # created or truncated, never written (touch)
        except (RepoError, OSError):
            pass  # logged by _flush; the version stays staged and is retried

    def fsync(self, fh: int) -> None:
        self.flush(fh, final=True)

    # -- namespace changes ----------------------------------------------------------------------

    def unlink(self, path: str) -> None:
        """Remove the name at once, as POSIX does, even if files are open under it: open readers read on
        the version they opened, open writers write on into bytes that are never stored (discarded at
        release). In published/ the published version is expired; in unpublished/ every staged version
        of the path is discarded, so no older one comes back under the name."""
        with self._lock:
            if self._hidden.pop(path, None) is not None:  # libfuse, at the last close of an unlinked file
                return
        loc = self.parse(path)
        entry = self.lookup(path)
        if entry.is_dir:
            raise IsDirectoryError(f"{path}: is a directory")
        if loc.state == "expired":
            raise ReadOnlyError(f"{path}: expired versions are read-only (gc purges them)")
        writers = self._unlink_writers(path)
        try:
            if loc.state == "published":
                self._expire_published(loc.file, found=bool(writers))
            else:
                self._discard_staged(loc.file, path)
        finally:
            self.forget(path)
        if loc.state == "published":
            self._changed_behind_kernel(path, "expired")

    def _hide(self, path: str, hidden: str) -> None:
        """libfuse's rename of a file open here to a hidden name, instead of unlinking it: the unlink,
        and the hidden name kept for the open file's attributes (fstat) until libfuse unlinks it."""
        entry = self.lookup(path)
        with self._lock:
            writer = self._writers.get(path)
        self.unlink(path)
        with self._lock:
            self._hidden[hidden] = (writer, entry)

    def _unlink_writers(self, path: str) -> list[WriteHandle]:
        """Detach the open handles of ``path`` from the name: writers' bytes will never be stored."""
        with self._lock:
            opened = [h for h in self._handles.values() if h.mount_path == path]
            for handle in opened:
                handle.unlinked = True
            self._writers.pop(path, None)
            writers = [h for h in opened if isinstance(h, WriteHandle)]
        for writer in writers:
            with writer.lock:  # a flush in progress finishes first; none starts after this
                if not (writer.sealed or writer.failed):
                    self._discard_quietly(writer.version)
        return writers

    def _expire_published(self, path: RepoPath, found: bool) -> None:
        """rm in published/: expire what is published, and call off what a failed close left for the retry
        to publish there, so the name does not come back (those bytes stay in unpublished/)."""
        current = None
        for version in self.repo.meta.history(path):
            if version.state == "published":
                current = version
            elif version.state == "unpublished" and version.publish_pending:
                self.repo.meta.set_publish_pending(version.id, False)
                found = True
            with self._lock:
                self._unmarked_publishes.discard(version.id)
        if current is not None:
            self.repo.expire(current)
        elif not found:
            raise NotFoundError(f"/published/{path}: no such file")

    def _discard_staged(self, path: RepoPath, mount_path: str) -> None:
        """Discard every unpublished version of ``path``, but those other names' writers are filling (a
        file being written in published/ is staged under the same path). This name's own writers count
        for nothing: their versions, even one stored at a close whose release has not come yet, go too."""
        with self._lock:
            elsewhere = {h.version.id for h in self._handles.values()
                         if isinstance(h, WriteHandle) and h.mount_path != mount_path}
        for version in self.repo.meta.history(path):
            if version.state == "unpublished" and version.id not in elsewhere:
                self._discard_quietly(version)

    def _discard_quietly(self, version: Version) -> None:
        """Discard a version unless it left unpublished meanwhile (published by another call, say)."""
        try:
            self.repo.discard(version)
        except LifecycleError:
            pass

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
        moves = {
            ("unpublished", "published"), ("expired", "published"), ("published", "published"),
            ("unpublished", "unpublished"),
        }
        if (src.state, dst.state) not in moves:
            raise LifecycleError(f"{old} -> {new}: a {src.state} file cannot be moved into {dst.state}/")
        if self.repo.meta.get_dir(dst.file.parent) is None:
            raise NotFoundError(f"{new}: no such directory")
        try:
            if dst.state == "published":
                self.repo.publish(version, dst.file)
            else:
                try:
                    target = self.lookup(new)
                except NotFoundError:
                    target = None
                if target is not None and target.version is not None and target.version.id != version.id:
                    self.repo.discard(target.version)
                self.repo.meta.move_unpublished(version.id, dst.file)
        finally:
            self.forget(old, new)
        if dst.state == "published":  # the version it replaced, if any, is in expired/ now
            self._changed_behind_kernel(new, "expired")

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        loc = self.parse(path)
        if loc.state is None or not loc.parts:
            raise LifecycleError(f"{path}: the mount's top directories are fixed")
        if loc.state == "expired":
            raise ReadOnlyError(f"{path}: expired/ is read-only")
        try:
            self.lookup(path)
        except NotFoundError:
            pass
        else:
            raise AlreadyExistsError(f"{path}: already exists")
        directory = DirPath.parse("/".join(loc.parts))  # validates the type name too
        try:
            self.repo.meta.make_dir(directory, mode & 0o7777, uid, gid)
        finally:
            self.forget(path)

    def rmdir(self, path: str) -> None:
        loc = self.parse(path)
        if loc.state is None or not loc.parts:
            raise LifecycleError(f"{path}: the mount's top directories are fixed")
        if loc.state == "expired":
            raise ReadOnlyError(f"{path}: expired/ is read-only")
        entry = self.lookup(path)
        if not entry.is_dir:
            raise NotDirectoryError(f"{path}: not a directory")
        try:
            self.repo.meta.remove_dir(loc.directory)
        finally:
            self.forget(path)

    def utimens(self, path: str | None, mtime_ns: int | None, fh: int | None = None) -> None:
        """touch, cp -p, rsync -t, make: set the modification time (``mtime_ns`` None leaves it, UTIME_OMIT;
        access times are not kept). A file being written takes it at once, and its version records it once
        its bytes are stored (a later write moves it on, as on any file); a stored version and a directory
        record it at once."""
        handle = self._handles.get(fh) if fh else None
        with self._lock:
            writer = handle if isinstance(handle, WriteHandle) else self._writers.get(path)
        if writer is not None:
            with writer.lock:
                if writer.unlinked or not (writer.sealed or writer.failed):
                    if mtime_ns is not None:
                        os.utime(writer.fd, ns=(mtime_ns, mtime_ns))
                        writer.times_set = not writer.unlinked
                    if writer.unlinked or writer.dirty or mtime_ns is None:
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
        if loc.state == "expired":
            raise ReadOnlyError(f"{path}: expired/ is read-only")
        if loc.state is None or not loc.parts:
            raise LifecycleError(f"{path}: the mount's top directories are fixed")
        entry = self.lookup(path)
        with self._lock:
            writer = self._writers.get(path)
        try:
            if writer is not None:
                writer.version = self.repo.meta.set_attrs(writer.version.id, **attrs)
                if not (writer.dirty or writer.sealed):  # an unchanged copy: the stored version is the file
                    stored = self._stored_entry(path)
                    if stored is not None:
                        self.repo.meta.set_attrs(stored.version.id, **attrs)
            elif entry.is_dir:
                self.repo.meta.set_dir_attrs(loc.directory, **attrs)
            else:
                self.repo.meta.set_attrs(entry.version.id, **attrs)
        finally:
            self.forget(path)

    # -- extended attributes --------------------------------------------------------------------

    def listxattr(self, path: str) -> list[str]:
        entry = self.lookup(path)
        if entry.is_dir:
            return []
        names = [key for key, value in _xattr_values(entry.version).items() if value is not None]
        return [XATTR_PREFIX + key for key in (*names, "tags")]

    def getxattr(self, path: str, name: str) -> bytes:
        if not name.startswith("user."):  # security.*, system.*: never a query
            raise NamespaceNotSupportedError(f"{path}: {name}: only user.* attributes are supported")
        if not name.startswith(XATTR_PREFIX):
            raise NoAttributeError(f"{path}: no attribute {name}")
        entry = self.lookup(path)
        key = name[len(XATTR_PREFIX):]
        if entry.is_dir:
            value = None
        elif key == "tags":  # the only attribute that costs a query
            value = json.dumps(self.repo.meta.tags(entry.version.id), sort_keys=True)
        else:
            value = _xattr_values(entry.version).get(key)
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
            if key == "state" and text == "published":
                if loc.state == "published":
                    return
                self.repo.publish(entry.version)
            elif key == "state" and text == "expired":
                if loc.state != "published":
                    raise LifecycleError(f"{path}: only a published version can be expired")
                self.repo.expire(entry.version)
            elif key == "state":
                raise InvalidPathError(f"{path}: {name} takes 'published' or 'expired', not {text!r}")
            elif key.startswith("tag.") and len(key) > 4:
                self.repo.meta.set_tag(entry.version.id, key[4:], text)
            else:
                raise NotSupportedError(f"{path}: {name} cannot be set")
        finally:
            self.forget(path)
            if key == "state":
                self._changed_behind_kernel(path)

    def statfs(self) -> dict:
        st = os.statvfs(self.repo.config.local_root)
        return {name: getattr(st, name) for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                      "f_files", "f_ffree", "f_favail", "f_namemax")}

    # -- helpers --------------------------------------------------------------------------------

    def _writable(self, path: str) -> Location:
        loc = self.parse(path)
        if loc.state == "expired":
            raise ReadOnlyError(f"{path}: expired versions are read-only")
        if loc.state is None or not loc.parts:
            raise LifecycleError(f"{path}: the mount's top directories are fixed")
        return loc

    def _add_handle(self, handle: ReadHandle | WriteHandle) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        return fh

    def _handle(self, fh: int) -> ReadHandle | WriteHandle:
        handle = self._handles.get(fh)
        if handle is None:
            raise RepoError(f"unknown file handle {fh}")
        return handle

    def _write_handle(self, fh: int) -> WriteHandle:
        handle = self._handle(fh)
        if not isinstance(handle, WriteHandle):
            raise BadHandleError(f"file handle {fh} is open read-only")
        return handle

    def retryable(self, version: Version) -> bool:
        """May the retry thread upload this staged version? Only if its upload failed here, or it was
        left from before this mount started (a crash); never while a writer may still be filling it
        (a version is staged a moment before its writer is registered)."""
        if version.id in self.versions_being_written():
            return False
        with self._lock:
            return version.id in self._failed_uploads or version.created_at < self.started

    def retry_staged_uploads(self) -> int:
        """The repository's retry of staged uploads (see ``retryable``), with what it published shown
        at once: the mount's and the kernel's entries of those paths are forgotten."""

        def done_with(version: Version) -> None:
            path = f"/published/{version.path}"
            self.forget(path)
            self._changed_behind_kernel(path)

        return self.repo.retry_staged_uploads(self.retryable, done_with)

    def versions_being_written(self) -> set[int]:
        """Every version an open write handle holds (a path may have several writers)."""
        with self._lock:
            return {h.version.id for h in self._handles.values() if isinstance(h, WriteHandle)}

    def flush_all(self, on_error: Callable[[str, Exception], None] | None = None) -> None:
        """Flush every written handle (at unmount)."""
        with self._lock:
            handles = [fh for fh, h in self._handles.items() if isinstance(h, WriteHandle)]
        for fh in handles:
            try:
                self.flush(fh)
            except (RepoError, OSError) as exc:  # logged by the flush; the others are flushed all the same
                if on_error:
                    on_error(str(fh), exc)


def _xattr_values(v: Version) -> dict:
    """The ``user.s3repo.*`` attributes held in the version's row (``tags`` is read separately)."""
    return {"state": v.state, "md5": v.md5, "size": v.size, "s3_key": v.s3_key, "origin_host": v.origin_host,
            "version": v.id, "published_at": v.published_at, "tier": v.tier}
