"""Crash checkpoints of the cache: making downloaded objects durable every few seconds, and dropping at
start-up what a crash may have left incomplete.

An fsync per download would cost 2,000 cold small files a third of their speed: downloads land
unsynced, and every few seconds while they do, a checkpoint makes them durable. Every object last
written before the time recorded in ``cache/SYNCED`` is durable. At start-up, objects written after
it (the process died before syncing them) are deleted and downloaded again when needed; closing the
cache checkpoints, so a clean stop loses nothing.

A checkpoint after many landings syncs the whole file system (syncfs) and then records when it
began in SYNCED. After a few (a CLI command's download, a quiet daemon) it fsyncs just those
objects and then dates each one's mtime back before the recorded time: a syncfs waits for every
dirty byte on the file system, a busy database's too. Dating back touches no other process's
objects, and if the new mtime is lost in a crash, the object only looks new and is fetched again.

Every process using the cache holds a shared flock on ``cache/lock``; only one that finds itself
alone may judge what a crash left (a live process's newest objects are unsynced, not lost).

The list of objects landed since the last checkpoint is guarded by the index's lock (``ObjectIndex.lock``).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import threading
import time
from contextlib import suppress
from pathlib import Path

from ..errors import RepoError
from .atomic import atomic_write, fsync_directory
from .objects import ObjectIndex, open_noatime

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)

LAYOUT_VERSION = "2"  # 2: objects are made durable by checkpoints (SYNCED); 1: each is fsynced as it lands
SYNC_INTERVAL = 5.0  # seconds between checkpoints while downloads land
# Trust only what was written this long before a checkpoint began: a file's time comes from the
# kernel's coarse clock, up to a tick (4-10 ms) behind time.time(); on a file system that keeps
# whole seconds, up to a second.
SYNC_MARGIN = 0.05
COARSE_SYNC_MARGIN = 2.0
# A checkpoint fsyncs up to this many objects one by one; after more, one syncfs is cheaper.
FSYNC_EACH_UP_TO = 64


class Checkpoints:
    def __init__(self, cache_dir: Path, objects: ObjectIndex) -> None:
        self.cache_dir = cache_dir
        self.objects = objects
        self._synced_file = cache_dir / "SYNCED"
        self._unsynced = threading.Event()  # an object landed since the last checkpoint
        self._last_landed = 0.0
        self._landed_since: list[Path] | None = []  # since the last checkpoint; None: too many to list
        self._synced_at: float | None = None  # the time in SYNCED, once known
        self._margin = SYNC_MARGIN
        self._holder: int | None = None  # fd of cache/lock, shared-locked while this process uses the cache
        self._closing = threading.Event()
        self._syncer: threading.Thread | None = None

    # -- start and stop -------------------------------------------------------------------------

    def recover(self) -> None:
        """Take this process's hold on the cache, and load the object index without what the last
        crash may have left incomplete (unless another process holds the cache: it may still sync
        its newest objects). Upgrades a layout-1 cache. RepoError for a layout this code does not know."""
        layout = self._read_layout()
        self._holder = os.open(self.cache_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        recorded = self._last_checkpoint()
        self._synced_at = recorded or None
        if not alone:
            synced = float("inf")
        elif recorded is None:  # never checkpointed: a layout-1 cache had every object fsynced as it landed
            synced = float("inf") if layout == "1" else 0.0
        else:
            synced = recorded
        lost = self.objects.load(written_before=synced)
        if lost:
            log.warning("cache: %d object(s) written after the last sync were dropped (an unclean stop); "
                        "they are downloaded again when read", lost)
        if layout == "1":  # its objects were each fsynced: record that as a checkpoint, once
            self._checkpoint()
        if layout != LAYOUT_VERSION:
            atomic_write(self.cache_dir / "LAYOUT", f"{LAYOUT_VERSION}\n".encode(), mode=0o600)
        fcntl.flock(self._holder, fcntl.LOCK_SH)

    def close(self) -> None:
        """Checkpoint what landed unsynced (a clean stop keeps every cached object), stop syncing and
        release this process's hold on the cache."""
        self._closing.set()
        if self._syncer is not None:
            self._syncer.join()  # a checkpoint it is making finishes first
        if self._unsynced.is_set():
            self._sync_now(closing=True)
        if self._holder is not None:
            os.close(self._holder)
            self._holder = None

    def _read_layout(self) -> str | None:
        """The cache's layout version (None for a new cache); RepoError for one this code does not know."""
        try:
            layout = (self.cache_dir / "LAYOUT").read_text().strip()
        except FileNotFoundError:
            return None
        if layout not in ("1", LAYOUT_VERSION):
            raise RepoError(f"cache {self.cache_dir} has an unknown layout: move it aside")
        return layout

    def _last_checkpoint(self) -> float | None:
        """When the last checkpoint began (objects written before it are durable); None if no
        checkpoint was ever recorded."""
        try:
            return float(self._synced_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return 0.0  # unreadable: trust nothing

    # -- landings -------------------------------------------------------------------------------

    def note_landed(self, path: Path) -> None:
        """Count the object at ``path`` into the next checkpoint. (``objects.lock`` held, in the same
        hold that makes the object visible: a checkpoint taking the list must not miss it.)"""
        if self._landed_since is not None:
            self._landed_since.append(path)
            if len(self._landed_since) > FSYNC_EACH_UP_TO:
                self._landed_since = None

    def landed(self) -> None:
        """An object landed unsynced (``note_landed``): the next checkpoint, within SYNC_INTERVAL, covers it."""
        self._last_landed = time.time()
        self._unsynced.set()
        if self._syncer is None:
            with self.objects.lock:
                if self._syncer is None:
                    self._syncer = threading.Thread(target=self._sync_loop, name="cache-sync", daemon=True)
                    self._syncer.start()

    # -- checkpoints ----------------------------------------------------------------------------

    def _sync_loop(self) -> None:
        while not self._closing.wait(SYNC_INTERVAL):
            if self._unsynced.is_set():
                self._sync_now()

    def _sync_now(self, closing: bool = False) -> None:
        self._unsynced.clear()
        with self.objects.lock:
            landed, self._landed_since = self._landed_since, []
        # Dating back needs new objects to look newer than SYNCED: not so while the clock is behind it.
        few = landed is not None and self._synced_at is not None and time.time() - self._margin > self._synced_at
        try:
            if few:
                self._make_durable(landed, self._synced_at)
                return
            if closing:  # so that what landed a moment ago counts as written before the checkpoint
                time.sleep(max(0.0, self._margin - (time.time() - self._last_landed)))
            if self._checkpoint() <= self._last_landed:  # landed within the margin: the next one covers it
                with self.objects.lock:
                    self._landed_since = None  # they are not in the next list: it syncs everything again
                self._unsynced.set()
        except OSError as exc:
            log.error("cache: checkpoint failed (%s): objects written since the last one are dropped", exc)
            with self.objects.lock:
                self._landed_since = None
            self._drop_unsynced()

    def _checkpoint(self) -> float:
        """Make every object written so far durable, then say so in SYNCED; when it counts as begun."""
        began = time.time() - self._margin
        fd = os.open(self.objects.dir, os.O_RDONLY)
        try:
            if _libc.syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), f"syncfs {self.objects.dir}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)
        written = atomic_write(self._synced_file, f"{began!r}\n".encode(), mode=0o600)
        self._synced_at = began
        if written.st_mtime_ns % 1_000_000_000 == 0:
            # Whole-second file times (ext3, FAT, some NFS): a file may look up to 1 s older than it is.
            self._margin = COARSE_SYNC_MARGIN
        return began

    def _make_durable(self, objects: list[Path], synced_at: float) -> None:
        """fsync each object and its directory (the rename that placed it), then date its mtime back
        before ``synced_at`` (the time in SYNCED): a later start-up trusts it as checkpointed."""
        back = synced_at - 2 * COARSE_SYNC_MARGIN
        for directory in {path.parent for path in objects}:
            with suppress(FileNotFoundError):
                fsync_directory(directory)
        for path in objects:
            try:
                fd = open_noatime(path)
            except FileNotFoundError:  # evicted meanwhile
                continue
            try:
                os.fsync(fd)
                os.utime(fd, ns=(time.time_ns(), int(back * 1e9)))  # the access time orders the LRU index
            finally:
                os.close(fd)

    def _drop_unsynced(self) -> None:
        """After a failed checkpoint: its objects may have lost bytes on their way to disk (a failed
        fsync reports a failed write, once), and a later checkpoint that succeeds would vouch for
        them. Forget and delete every object written since the last good one, as a start-up after a
        crash would; they are downloaded again when read."""
        since = self._synced_at if self._synced_at is not None else 0.0
        for key in self.objects.keys():
            path = self.objects.path(key)
            try:
                if os.stat(path).st_mtime < since:
                    continue
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cache: %s: %s", path, exc)
            with self.objects.lock:
                self.objects.remove(key)
