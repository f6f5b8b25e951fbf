"""This host's local content behind one object: the staging area and the cache of verified objects.

``LocalCache`` composes the parts, each in its own module, and is what the repository and the mount
call:

- ``staging``: staged versions (never evicted) and the flock protocol between writers and uploads;
- ``objects``: the verified objects in ``cache/objects``, an LRU index bounded by bytes, with pins;
- ``fill``: downloads into the cache, one per object, readable while they arrive;
- ``checkpoint``: making landed objects durable every few seconds, and what a start-up after a crash drops;
- ``holdings``: the verified copies that arrived and left since the repository last recorded them.

Lock order: one lock, ``ObjectIndex.lock``, guards the index, the downloads in flight and the list
of objects landed since the last checkpoint; it is never held while waiting on a download or on
slow I/O.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Iterator

from .checkpoint import Checkpoints
from .fill import Fills, StartDownload
from .holdings import Holdings
from .objects import CacheUsage, ObjectIndex
from .staging import Staging
from .transfer import Download

__all__ = ["CacheUsage", "LocalCache", "StartDownload"]


class LocalCache:
    def __init__(self, local_root: Path, max_bytes: int, download_threads: int = 16,
                 clock: Callable[[], float] = time.time) -> None:
        self.staging = Staging(local_root / "staging")
        self.holdings = Holdings(clock)
        self.objects = ObjectIndex(local_root / "cache" / "objects", max_bytes, self.holdings)
        self.checkpoints = Checkpoints(local_root / "cache", self.objects)
        self.fills = Fills(self.objects, self.checkpoints, download_threads)
        self.objects_dir = self.objects.dir
        self._ready = False
        self._prepare_lock = threading.Lock()

    def prepare(self) -> None:
        """Create the directories and rebuild the index from disk, without what a crash may have left
        incomplete (see ``checkpoint``). Safe to call from many threads and processes at once: the
        first does the work."""
        with self._prepare_lock:
            if not self._ready:
                for directory in (self.objects.dir, self.staging.dir):
                    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                self.checkpoints.recover()
                self.objects.evict()
                self._ready = True

    @property
    def ready(self) -> bool:
        """Has ``prepare`` indexed what is on disk (so ``usage`` and ``cached_keys`` are the cache's)?"""
        return self._ready

    def close(self) -> None:
        """Checkpoint what landed unsynced (a clean stop keeps every cached object) and stop syncing."""
        self.checkpoints.close()

    # -- staging --------------------------------------------------------------------------------

    def staging_path(self, key: str) -> Path:
        return self.staging.path(key)

    def staged_keys(self) -> Iterator[str]:
        """See ``Staging.keys``."""
        return self.staging.keys()

    def open_staged_for_writing(self, key: str, truncate: bool = False) -> int:
        """See ``Staging.open_for_writing``."""
        return self.staging.open_for_writing(key, truncate)

    @staticmethod
    def release_staged(fd: int) -> None:
        """See ``Staging.release``."""
        Staging.release(fd)

    def claim_staged(self, key: str, wait: float = 0.0) -> AbstractContextManager[bool]:
        """See ``Staging.claim``."""
        return self.staging.claim(key, wait)

    # -- objects --------------------------------------------------------------------------------

    def object_path(self, key: str) -> Path:
        return self.objects.path(key)

    def has(self, key: str) -> bool:
        return self.objects.has(key)

    def open_object(self, key: str, size: int, start: StartDownload) -> tuple[int, Download | None]:
        """See ``Fills.open``: a pinned fd of the object, and its download if still in flight."""
        return self.fills.open(key, size, start)

    def fetch(self, key: str, size: int, start: StartDownload) -> Path:
        """The verified cached file of ``key``, downloading it first if needed (blocks)."""
        return self.fills.fetch(key, size, start)

    def prefetch(self, key: str, size: int, start: StartDownload) -> Download | None:
        """Start downloading ``key`` in the background unless it is cached or on its way."""
        return self.fills.prefetch(key, size, start)

    def adopt(self, key: str, staged: Path, size: int) -> None:
        """Move an uploaded, verified staging file into the cache (no second download needed)."""
        self.fills.adopt(key, staged, size)

    def pin(self, key: str) -> None:
        self.objects.pin(key)

    def unpin(self, key: str) -> None:
        self.objects.unpin(key)

    def usage(self) -> CacheUsage:
        return self.objects.usage()

    def cached_keys(self) -> list[str]:
        """The keys of every object in the index now."""
        return self.objects.keys()

    def drop(self, key: str) -> bool:
        """See ``ObjectIndex.drop``: remove one cached object found bad."""
        return self.objects.drop(key)

    def clear(self) -> int:
        """Remove every cached object that is not open; returns how many were removed."""
        return self.objects.clear()
