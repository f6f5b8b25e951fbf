"""The cache's verified objects in ``cache/objects``: an index of them, least recently used first, bounded by bytes.

Objects are keyed by their store key, which is unique per version and never reused: a cached file
can never be stale, only absent. A file under its key is always complete: a download writes a temp
file (named by ``temp_path``) and renames it into place once verified. The files on disk are the
truth: the index is rebuilt from them at start-up (``load``), and an object placed by another process
(``s3repofs cache prefetch``) is found on first use (``present``).

The index counts the bytes of every object and of every download in flight (``reserve``), and evicts
the least recently used objects that nobody holds open (``pin``) until they fit in ``max_bytes``.

It tells ``holdings`` (holdings.py) of each verified copy that lands (``landed``) and of each that
leaves (``remove``, and the objects ``load`` finds incomplete), in the same hold of ``lock`` that
changes the index. Objects indexed from disk (``load``, ``present``) are not news: the process that
placed them told, and a mount rewrites its host's records from the index at start.

``lock`` guards the index. The fills and the checkpoints take it too, so that an object stops being
in flight, becomes visible and is noted for the next checkpoint in one hold. It is never held while
waiting on a download or on slow I/O.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .holdings import Holdings

log = logging.getLogger(__name__)

FILL_PREFIX = ".fill-"  # temp files of downloads: .fill-<name>-<pid>.<n>


@dataclass(frozen=True)
class CacheUsage:
    objects: int
    used_bytes: int  # cached objects and downloads in flight
    max_bytes: int


class ObjectIndex:
    def __init__(self, directory: Path, max_bytes: int, holdings: Holdings | None = None) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.holdings = holdings or Holdings()
        self.lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self._used = 0  # bytes of every indexed object and every download in flight
        self._pins: dict[str, int] = {}  # key -> open handles; pinned objects are never evicted
        self._temp_numbers = itertools.count()  # temp files of one process never share a name

    def path(self, key: str) -> Path:
        return self.dir / key

    def temp_path(self, key: str) -> Path:
        """A new name for a download's temp file, beside the object's; ``load`` removes it once its
        process is gone."""
        path = self.path(key)
        return path.parent / f"{FILL_PREFIX}{path.name}-{os.getpid()}.{next(self._temp_numbers)}"

    def has(self, key: str) -> bool:
        with self.lock:
            return key in self._sizes

    def keys(self) -> list[str]:
        with self.lock:
            return list(self._sizes)

    def usage(self) -> CacheUsage:
        with self.lock:
            return CacheUsage(len(self._sizes), self._used, self.max_bytes)

    def pin(self, key: str) -> None:
        with self.lock:
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        with self.lock:
            left = self._pins.get(key, 0) - 1
            if left > 0:
                self._pins[key] = left
            else:
                self._pins.pop(key, None)
        self.evict()

    def clear(self) -> int:
        """Remove every cached object that is not open; returns how many were removed."""
        with self.lock:
            victims = [k for k in self._sizes if k not in self._pins]
            for key in victims:
                self.remove(key)
                self.path(key).unlink(missing_ok=True)
        return len(victims)

    def drop(self, key: str) -> bool:
        """Remove one cached object, open or not (one found bad: an open descriptor keeps its inode, and the
        next open downloads again, here and in every process sharing the cache); True if it was on disk."""
        with self.lock:
            self.remove(key)
            try:
                self.path(key).unlink()
            except FileNotFoundError:
                return False
            self.holdings.left(key)  # placed by another process, perhaps: not indexed here, gone all the same
        log.info("cache: dropped %s", key)
        return True

    def evict(self) -> None:
        """Remove the least recently used objects nobody holds open until the rest fit in ``max_bytes``."""
        victims = []
        with self.lock:
            excess = self._used - self.max_bytes
            for key, size in self._sizes.items():  # least recently used first
                if excess <= 0:
                    break
                if key not in self._pins:
                    victims.append(key)
                    excess -= size
            for key in victims:  # unlinked under the lock: an open racing with eviction re-downloads
                self.remove(key)
                log.debug("cache: evicting %s", key)
                with suppress(OSError):
                    self.path(key).unlink(missing_ok=True)

    def load(self, written_before: float) -> int:
        """Rebuild the index from disk, least recently used first as far as access times tell (the
        daemon reads without updating them: mostly oldest download first). An object last written at
        or after ``written_before`` is deleted instead (it may not be whole on disk). Returns how many
        were deleted."""
        found, lost = [], 0
        for key, path in self._walk():
            try:
                st = path.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            if st.st_mtime >= written_before:
                path.unlink(missing_ok=True)
                self.holdings.left(key)
                lost += 1
                continue
            found.append((st.st_atime, key, st.st_size))
        with self.lock:
            for _atime, key, size in sorted(found):
                self.add(key, size)
        return lost

    def _walk(self) -> Iterator[tuple[str, Path]]:
        """(key, path) of every cached object; removes temp files that no live process is writing."""
        for dirpath, _dirs, files in os.walk(self.dir):
            for name in files:
                path = Path(dirpath) / name
                if name.startswith(FILL_PREFIX):
                    if not _writer_alive(name):
                        path.unlink(missing_ok=True)  # an interrupted download
                    continue
                yield path.relative_to(self.dir).as_posix(), path

    # -- with ``lock`` held ---------------------------------------------------------------------

    def add(self, key: str, size: int) -> None:
        """Index an object found on disk."""
        self._unindex(key)
        self._sizes[key] = size
        self._used += size

    def landed(self, key: str, size: int) -> None:
        """Index a verified copy that just arrived (a download, an upload's staged file), and say so."""
        self.add(key, size)
        self.holdings.arrived(key)

    def remove(self, key: str) -> None:
        """Forget an object that leaves the cache (its file is, or is about to be, unlinked), and say so."""
        if self._unindex(key):
            self.holdings.left(key)

    def _unindex(self, key: str) -> bool:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._used -= size
        return size is not None

    def present(self, key: str, size: int) -> bool:
        """Is the complete object on disk? Marks it recently used."""
        try:
            on_disk = os.stat(self.path(key)).st_size
        except FileNotFoundError:
            on_disk = None
        if on_disk != size:
            # Removed behind our back (an operator cleaning up), or cut short: download it again.
            self.remove(key)
            return False
        if key in self._sizes:
            self._sizes.move_to_end(key)
        else:  # placed by another process (s3repofs cache prefetch)
            self.add(key, size)
        return True

    def reserve(self, size: int) -> None:
        """Count ``size`` bytes of a download in flight (``release`` when it ends)."""
        self._used += size

    def release(self, size: int) -> None:
        self._used -= size


def open_noatime(path: Path) -> int:
    """Open a cached object for reading without updating its access time: the first read of a file
    just downloaded would otherwise write its inode, and wait for the journal behind a checkpoint."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs the file's owner: a cache shared with another user
        return os.open(path, os.O_RDONLY)


def _writer_alive(fill_name: str) -> bool:
    """Is the process that named this temp file (``.fill-<name>-<pid>.<n>``) still running?"""
    try:
        os.kill(int(fill_name.rsplit("-", 1)[1].split(".")[0]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
