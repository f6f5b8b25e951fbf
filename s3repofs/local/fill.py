"""Filling the cache: one download per object however many readers ask, which they may read while it arrives.

A download writes a temp file beside the object's (see ``transfer.Download``: readers wait only for
the bytes they ask for) and renames it under the object's key once verified. Concurrent openers of
one object share one download. A landed object is made durable by the next checkpoint, not by an
fsync of its own (see ``checkpoint``); so is a staged file that an upload moved into the cache
(``adopt``).

Lock order: ``objects.lock`` guards the downloads in flight too, and is never held while waiting
on a download or on slow I/O.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import metrics
from .checkpoint import Checkpoints
from .objects import ObjectIndex, open_noatime
from .transfer import Download

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)

# After a download this large, freed buffers go back to the system: glibc keeps the chunks of every
# thread that handled it in that thread's arena (one cold read of 256 MiB with 1 MiB chunks and
# glibc's own settings: 38 MB kept; see mount.daemon.tune_malloc for the daemon's).
TRIM_AFTER = 16 * 1024 * 1024

# start(fd) -> the Download that will write the object into the file open at fd
StartDownload = Callable[[int], Download]


@dataclass
class _Fill:
    """A download in flight and the temp file it writes; ``landed`` is set once it is renamed into
    place (or has failed)."""

    download: Download
    tmp: Path
    landed: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None  # why it did not land, if it did not


class Fills:
    def __init__(self, objects: ObjectIndex, checkpoints: Checkpoints, download_threads: int) -> None:
        self.objects = objects
        self.checkpoints = checkpoints
        self._fills: dict[str, _Fill] = {}  # key -> its download in flight
        self._download_threads = download_threads
        self._runner: Executor | None = None

    def open(self, key: str, size: int, start: StartDownload) -> tuple[int, Download | None]:
        """A read-only fd of the object, pinned until ``objects.unpin(key)``, and the download still
        writing it (None once complete). Starts the download if nobody has; joins it otherwise."""
        self.objects.pin(key)
        try:
            fill, _started = self._fill_unless_present(key, size, start)
            _count_lookup(fill)
            if fill is not None:
                with self.objects.lock:  # still in flight: its fd is open until it lands, which takes the lock
                    if self._fills.get(key) is fill:
                        return os.dup(fill.download.fd), fill.download
                self._wait_landed(fill)  # it landed (or failed) just now
            return open_noatime(self.objects.path(key)), None
        except BaseException:
            self.objects.unpin(key)
            raise

    def fetch(self, key: str, size: int, start: StartDownload) -> Path:
        """The verified cached file of ``key``, downloading it first if needed (blocks)."""
        self.objects.pin(key)
        try:
            fill, _started = self._fill_unless_present(key, size, start)
            _count_lookup(fill)
            if fill is not None:
                self._wait_landed(fill)
        finally:
            self.objects.unpin(key)
        return self.objects.path(key)

    def prefetch(self, key: str, size: int, start: StartDownload) -> Download | None:
        """Start downloading ``key`` in the background unless it is cached or on its way; the download
        if this call started it."""
        fill, started = self._fill_unless_present(key, size, start)
        return fill.download if started else None

    def adopt(self, key: str, staged: Path, size: int) -> None:
        """Move an uploaded, verified staging file into the cache (no second download needed)."""
        path = self.objects.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, path)
        with self.objects.lock:
            self._index_landed(key, size)
        self.checkpoints.landed()  # its rename is made durable by the next checkpoint
        self.objects.evict()

    # -- downloads ------------------------------------------------------------------------------

    def _fill_unless_present(self, key: str, size: int, start: StartDownload) -> tuple[_Fill | None, bool]:
        """The download of ``key`` in flight, started if needed, or None if the object is cached; and
        whether this call started it.

        The temp file is created without the lock held (file creation waits for the journal while
        other downloads fsync); if another thread registered a download meanwhile, ours is dropped."""
        with self.objects.lock:
            fill = self._fills.get(key)
            if fill is not None or self.objects.present(key, size):
                return fill, False
        new = self._new_fill(key, size, start)
        with self.objects.lock:
            fill = self._fills.get(key)
            if fill is None and not self.objects.present(key, size):
                self._launch(key, new)
                return new, True
        os.close(new.download.fd)
        new.tmp.unlink(missing_ok=True)
        return fill, False

    def _new_fill(self, key: str, size: int, start: StartDownload) -> _Fill:
        """Create the temp file and its download (not started yet)."""
        tmp = self.objects.temp_path(key)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            return _Fill(start(fd), tmp)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise

    def _launch(self, key: str, fill: _Fill) -> None:
        """Register and start the download. (``objects.lock`` held.)"""
        self._fills[key] = fill
        self.objects.reserve(fill.download.size)
        if self._runner is None:
            self._runner = ThreadPoolExecutor(self._download_threads, thread_name_prefix="download")
        self._runner.submit(self._run, key, fill)

    def _run(self, key: str, fill: _Fill) -> None:
        download = fill.download
        landed = True
        try:
            download.run()
            # Not fsynced here, nor through atomic_write: the next checkpoint makes it durable.
            os.replace(fill.tmp, self.objects.path(key))
        except BaseException as exc:
            log.warning("download of %s failed: %s", key, exc)
            fill.error = exc
            landed = False
            with suppress(OSError):
                fill.tmp.unlink(missing_ok=True)
        finally:
            with self.objects.lock:
                del self._fills[key]
                self.objects.release(download.size)
                if landed:
                    self._index_landed(key, download.size)
                os.close(download.fd)  # readers hold their own duplicates
            if landed:
                self.checkpoints.landed()
            if download.size >= TRIM_AFTER:
                _libc.malloc_trim(0)
            try:
                self.objects.evict()
            finally:
                fill.landed.set()

    def _index_landed(self, key: str, size: int) -> None:
        """Make a landed object visible, and due for the next checkpoint. (``objects.lock`` held.)"""
        self.objects.landed(key, size)
        self.checkpoints.note_landed(self.objects.path(key))

    @staticmethod
    def _wait_landed(fill: _Fill) -> None:
        fill.landed.wait()
        if fill.error is not None:
            raise fill.error


def _count_lookup(fill: _Fill | None) -> None:
    """A reader's open: a hit if the object was whole in the cache, a miss if it waits for a download."""
    (metrics.CACHE_HITS if fill is None else metrics.CACHE_MISSES).inc()
