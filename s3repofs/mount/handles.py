"""The mount's open files: the handle table, each path's current writer, and what the kernel caches per path.

A read handle holds the version it opened (its cache file is pinned and open), so a new version
published at the same path never changes what an open reader sees; a write handle is a write session
(``writes.py``). A path's writer is the newest open writer of that name: stat shows its bytes, and
utimens and chmod reach its version. libfuse renames a file unlinked while open to a hidden name
(``HIDDEN_PREFIX``) until its last close: the table answers for the open file under that name.

Concurrency: ``_lock`` guards the tables; it is never held across I/O, nor while a session's lock is taken.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from cachetools import LRUCache

from ..errors import BadHandleError, RepoError
from ..meta.metastore import Version
from ..repo import VersionReader
from .entries import Entry
from .writes import WriteSession

# libfuse renames a file unlinked while open to this name until its last close (unless hard_remove).
HIDDEN_PREFIX = ".fuse_hidden"


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
class GeneratedHandle:
    """An open control file (``control.py``): its content, generated at open, in an anonymous file."""

    mount_path: str
    fd: int


Handle = ReadHandle | WriteSession | GeneratedHandle


class Handles:
    """The open handles by number, and by path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[int, Handle] = {}
        self._writers: dict[str, WriteSession] = {}  # mount path -> newest open writer
        # libfuse's hidden name -> the unlinked open file: its writer, if any, and its entry when unlinked
        self._hidden: dict[str, tuple[WriteSession | None, Entry]] = {}
        # Mount path -> the version whose bytes the kernel may cache for it: an open keeps the kernel's
        # pages only for the same version (mtime can be set by users, so it cannot say which bytes they are).
        self._pages: LRUCache = LRUCache(maxsize=100_000)
        self._next_fh = 1

    # -- by number -------------------------------------------------------------------------------

    def add(self, handle: Handle) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        return fh

    def get(self, fh: int | None) -> Handle | None:
        return self._handles.get(fh) if fh else None

    def require(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise RepoError(f"unknown file handle {fh}")
        return handle

    def require_writer(self, fh: int) -> WriteSession:
        handle = self.require(fh)
        if not isinstance(handle, WriteSession):
            raise BadHandleError(f"file handle {fh} is open read-only")
        return handle

    def write_handles(self) -> list[int]:
        with self._lock:
            return [fh for fh, h in self._handles.items() if isinstance(h, WriteSession)]

    def drop(self, fh: int, handle: Handle | None) -> None:
        """Forget the handle and close its descriptors (its reader, or its session's files)."""
        with self._lock:
            self._handles.pop(fh, None)
            if isinstance(handle, WriteSession) and self._writers.get(handle.mount_path) is handle:
                del self._writers[handle.mount_path]
                # Another writer of the name still open (truncate of the path beside it, a second open)
                # is its writer again: stat shows its bytes, utimens and chmod reach its version.
                others = [h for h in self._handles.values() if isinstance(h, WriteSession)
                          and h.mount_path == handle.mount_path and not h.unlinked]
                if others:
                    self._writers[handle.mount_path] = others[-1]
        if isinstance(handle, ReadHandle):
            handle.reader.close()
        elif isinstance(handle, GeneratedHandle):
            os.close(handle.fd)
        elif isinstance(handle, WriteSession):
            handle.digest.stop()
            fd, handle.fd = handle.fd, -1  # a concurrent stat of this writer now finds it closed
            for number in (fd, *handle.retired_fds):
                os.close(number)

    # -- by path ---------------------------------------------------------------------------------

    def start_writer(self, session: WriteSession) -> int:
        """Register a new write session as its path's writer; its handle number."""
        with self._lock:
            self._writers[session.mount_path] = session
            self._pages.pop(session.mount_path, None)  # the kernel drops its pages at a writer's open
        return self.add(session)

    def writer(self, path: str | None) -> WriteSession | None:
        with self._lock:
            return self._writers.get(path)

    def writers_in(self, directory: str) -> list[WriteSession]:
        """The writers of the names directly in ``directory`` (a mount path)."""
        prefix = directory + "/"
        with self._lock:
            return [w for p, w in self._writers.items() if p.startswith(prefix) and "/" not in p[len(prefix):]]

    def detach(self, path: str) -> list[WriteSession]:
        """Mark the open handles of ``path`` unlinked and take the name's writer away; its writers."""
        with self._lock:
            opened = [h for h in self._handles.values() if h.mount_path == path]
            for handle in opened:
                handle.unlinked = True
            self._writers.pop(path, None)
            return [h for h in opened if isinstance(h, WriteSession)]

    def hide(self, hidden: str, writer: WriteSession | None, entry: Entry) -> None:
        with self._lock:
            self._hidden[hidden] = (writer, entry)

    def hidden(self, path: str) -> tuple[WriteSession | None, Entry] | None:
        if HIDDEN_PREFIX not in path:
            return None
        with self._lock:
            return self._hidden.get(path)

    def unhide(self, path: str) -> bool:
        """libfuse unlinks a hidden name at the last close of its file: True if ``path`` was one."""
        with self._lock:
            return self._hidden.pop(path, None) is not None

    # -- versions being written ------------------------------------------------------------------

    def versions_being_written(self) -> set[int]:
        """Every version an open write handle holds (a path may have several writers)."""
        with self._lock:
            return {h.version.id for h in self._handles.values() if isinstance(h, WriteSession)}

    def versions_in_progress(self) -> set[int]:
        """The versions open writers are still filling (not those a flush stored or left to the retry)."""
        with self._lock:
            return {h.version.id for h in self._handles.values() if isinstance(h, WriteSession) and h.filling}

    def versions_written_elsewhere(self, path: str) -> set[int]:
        """The versions write handles of names other than ``path`` hold."""
        with self._lock:
            return {h.version.id for h in self._handles.values()
                    if isinstance(h, WriteSession) and h.mount_path != path}

    # -- the kernel's pages ----------------------------------------------------------------------

    def opened_pages(self, path: str, version_id: int) -> bool:
        """A reader opens ``version_id`` at ``path``: may the kernel keep the pages it caches for the
        path (they are that version's)? From now on they are."""
        with self._lock:
            keep = self._pages.get(path) == version_id
            self._pages[path] = version_id
        return keep

    def drop_pages(self, path: str) -> None:
        with self._lock:
            self._pages.pop(path, None)
