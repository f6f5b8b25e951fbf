"""The host's local content: verified objects (``cache/objects``, evictable) and staged versions
(``staging``, never evicted).

Objects are keyed by their store key, which is unique per version and never reused: a cached file
can never be stale, only absent. Fills are atomic (temp file, fsync, rename) and verified before the
rename; concurrent openers of one object share one download. The cache is bounded by bytes and
evicts the least recently used objects that nobody holds open.

Lock order: ``_lock`` (the index) is never held while waiting on a fill's per-key lock or on I/O.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import RepoError

log = logging.getLogger(__name__)

LAYOUT_VERSION = "1"


class LocalCache:
    def __init__(self, local_root: Path, max_bytes: int) -> None:
        self.objects_dir = local_root / "cache" / "objects"
        self.staging_dir = local_root / "staging"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self._pins: dict[str, int] = {}  # key -> open handles; pinned objects are never evicted
        self._fills: dict[str, threading.Lock] = {}
        self._ready = False

    # -- set-up ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directories and rebuild the index from disk (oldest access first)."""
        if self._ready:
            return
        for directory in (self.objects_dir, self.staging_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        layout = self.objects_dir.parent / "LAYOUT"
        if not layout.exists():
            layout.write_text(LAYOUT_VERSION + "\n")
        elif layout.read_text().strip() != LAYOUT_VERSION:
            raise RepoError(f"cache {self.objects_dir.parent} has an unknown layout: move it aside")
        found = []
        for dirpath, _dirs, files in os.walk(self.objects_dir):
            for name in files:
                full = Path(dirpath) / name
                if name.startswith(".fill-"):
                    full.unlink(missing_ok=True)  # an interrupted download
                    continue
                st = full.stat()
                found.append((st.st_atime, full.relative_to(self.objects_dir).as_posix(), st.st_size))
        with self._lock:
            for _atime, key, size in sorted(found):
                self._sizes[key] = size
        self._ready = True

    # -- staging --------------------------------------------------------------------------------

    def staging_path(self, key: str) -> Path:
        return self.staging_dir / key.replace("/", "%")

    # -- objects --------------------------------------------------------------------------------

    def object_path(self, key: str) -> Path:
        return self.objects_dir / key

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._sizes

    def fetch(self, key: str, size: int, fill: Callable[[BinaryIO], None]) -> Path:
        """The cached file of ``key``, calling ``fill(file)`` to download it if absent.

        ``fill`` must write exactly the verified bytes or raise; on error nothing enters the cache.
        """
        path = self.object_path(key)
        if self._touch(key):
            return path
        with self._fill_lock(key):
            if self._touch(key):  # another thread filled it while we waited
                return path
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".fill-{path.name}-{threading.get_ident()}"
            try:
                with open(tmp, "wb") as f:
                    fill(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self._add(key, size)
        return path

    def adopt(self, key: str, staged: Path, size: int) -> None:
        """Move an uploaded, verified staging file into the cache (no second download needed)."""
        path = self.object_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, path)
        self._add(key, size)

    @contextmanager
    def pinned(self, key: str) -> Iterator[None]:
        """Keep ``key`` from eviction while the block runs (an open file handle)."""
        self.pin(key)
        try:
            yield
        finally:
            self.unpin(key)

    def pin(self, key: str) -> None:
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        with self._lock:
            left = self._pins.get(key, 0) - 1
            if left > 0:
                self._pins[key] = left
            else:
                self._pins.pop(key, None)
        self._evict()

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def count(self) -> int:
        with self._lock:
            return len(self._sizes)

    def clear(self) -> int:
        """Remove every cached object that is not open; returns how many were removed."""
        with self._lock:
            victims = [k for k in self._sizes if k not in self._pins]
            for key in victims:
                del self._sizes[key]
        for key in victims:
            self.object_path(key).unlink(missing_ok=True)
        return len(victims)

    # -- internals ------------------------------------------------------------------------------

    def _touch(self, key: str) -> bool:
        with self._lock:
            if key not in self._sizes:
                return False
            self._sizes.move_to_end(key)
        if self.object_path(key).exists():
            return True
        with self._lock:  # removed behind our back (an operator cleaning up): fetch again
            self._sizes.pop(key, None)
        return False

    def _add(self, key: str, size: int) -> None:
        with self._lock:
            self._sizes[key] = size
            self._sizes.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        victims = []
        with self._lock:
            total = sum(self._sizes.values())
            for key in list(self._sizes):
                if total <= self.max_bytes:
                    break
                if key in self._pins or key in self._fills:
                    continue
                total -= self._sizes.pop(key)
                victims.append(key)
        for key in victims:
            log.debug("cache: evicting %s", key)
            self.object_path(key).unlink(missing_ok=True)

    @contextmanager
    def _fill_lock(self, key: str) -> Iterator[None]:
        with self._lock:
            lock = self._fills.setdefault(key, threading.Lock())
        with lock:
            yield
        with self._lock:
            if not lock.locked():
                self._fills.pop(key, None)
