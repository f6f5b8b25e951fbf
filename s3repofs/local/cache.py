"""The host's local content: verified objects (``cache/objects``, evictable) and staged versions
(``staging``, never evicted).

Objects are keyed by their store key, which is unique per version and never reused: a cached file
can never be stale, only absent. Downloads write a temp file that readers may already use (see
``transfer.Download``); it is renamed into place only once verified, so a file under its key is
always complete. Concurrent openers of one object share one download. The cache is bounded by
bytes (downloads in flight count too) and evicts the least recently used objects that nobody
holds open. The files on disk are the truth: the index is rebuilt from them at start-up, and an
object placed by another process (``s3repofs cache prefetch``) is found on first use.

Crash safety without an fsync per download (which cost 2,000 cold small files a third of their
speed): downloads land unsynced, and every few seconds while they do, a checkpoint makes them
durable. Every object last written before the time recorded in ``cache/SYNCED`` is durable. At
start-up, objects written after it (the process died before syncing them) are deleted and
downloaded again when needed; closing the cache checkpoints, so a clean stop loses nothing.

A checkpoint after many landings syncs the whole file system (syncfs) and then records when it
began in SYNCED. After a few (a CLI command's download, a quiet daemon) it fsyncs just those
objects and then dates each one's mtime back before the recorded time: a syncfs waits for every
dirty byte on the file system, a busy database's too. Dating back touches no other process's
objects, and if the new mtime is lost in a crash, the object only looks new and is fetched again.

Lock order: ``_lock`` (the index) is never held while waiting on a download or on slow I/O.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import BeingWrittenError, ReadOnlyError, RepoError
from .transfer import Download

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)

LAYOUT_VERSION = "2"  # 2: objects are made durable by checkpoints (SYNCED); 1: each was fsynced
FILL_PREFIX = ".fill-"
SYNC_INTERVAL = 5.0  # seconds between checkpoints while downloads land
# Trust only what was written this long before a checkpoint began: a file's time comes from the
# kernel's coarse clock, up to a tick (4-10 ms) behind time.time(); on a file system that keeps
# whole seconds, up to a second.
SYNC_MARGIN = 0.05
COARSE_SYNC_MARGIN = 2.0
# A checkpoint fsyncs up to this many objects one by one; after more, one syncfs is cheaper.
FSYNC_EACH_UP_TO = 64
# After a download this large, freed buffers go back to the system: glibc keeps the chunks of every
# thread that handled it in that thread's arena (one cold read of 256 MiB with 1 MiB chunks and
# glibc's own settings: 38 MB kept; see fs.tune_malloc for the daemon's).
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


@dataclass(frozen=True)
class CacheUsage:
    objects: int
    used_bytes: int  # cached objects and downloads in flight
    max_bytes: int


class LocalCache:
    def __init__(self, local_root: Path, max_bytes: int, download_threads: int = 16) -> None:
        self.objects_dir = local_root / "cache" / "objects"
        self.staging_dir = local_root / "staging"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self._used = 0  # bytes of every indexed object and every download in flight
        self._pins: dict[str, int] = {}  # key -> open handles; pinned objects are never evicted
        self._fills: dict[str, _Fill] = {}
        self._fill_numbers = itertools.count()  # temp files of one process never share a name
        self._synced_file = local_root / "cache" / "SYNCED"
        self._unsynced = threading.Event()  # an object landed since the last checkpoint
        self._last_landed = 0.0
        self._landed_since: list[Path] | None = []  # since the last checkpoint; None: too many to list
        self._synced_at: float | None = None  # the time in SYNCED, once known
        self._margin = SYNC_MARGIN
        self._holder: int | None = None  # fd of cache/lock, shared-locked while this process uses the cache
        self._closing = threading.Event()
        self._syncer: threading.Thread | None = None
        self._download_threads = download_threads
        self._runner: Executor | None = None
        self._ready = False
        self._prepare_lock = threading.Lock()

    # -- set-up ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directories and rebuild the index from disk, least recently used first as far
        as access times tell (the daemon reads without updating them: mostly oldest download first).
        Safe to call from many threads and processes at once: the first does the work."""
        with self._prepare_lock:
            if not self._ready:
                self._prepare()
                self._ready = True

    def _prepare(self) -> None:
        for directory in (self.objects_dir, self.staging_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        layout = self._read_layout()
        # Every process using this cache holds a shared lock on it; only one that finds itself alone
        # may judge what a crash left (a live process's newest objects are unsynced, not lost).
        self._holder = os.open(self.objects_dir.parent / "lock", os.O_RDWR | os.O_CREAT, 0o600)
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
        found, lost = [], 0
        for key, path in self._walk():
            try:
                st = path.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            if st.st_mtime >= synced:  # landed after the last checkpoint: perhaps not whole on disk
                path.unlink(missing_ok=True)
                lost += 1
                continue
            found.append((st.st_atime, key, st.st_size))
        if lost:
            log.warning("cache: %d object(s) written after the last sync were dropped (an unclean stop); "
                        "they are downloaded again when read", lost)
        with self._lock:
            for _atime, key, size in sorted(found):
                self._index(key, size)
        if layout == "1":  # its objects were each fsynced: record that as a checkpoint, once
            self._checkpoint()
        if layout != LAYOUT_VERSION:
            self._write_whole(self.objects_dir.parent / "LAYOUT", LAYOUT_VERSION + "\n")
        fcntl.flock(self._holder, fcntl.LOCK_SH)
        self._evict()

    def _read_layout(self) -> str | None:
        """The cache's layout version (None for a new cache); RepoError for one this code does not know."""
        try:
            layout = (self.objects_dir.parent / "LAYOUT").read_text().strip()
        except FileNotFoundError:
            return None
        if layout not in ("1", LAYOUT_VERSION):
            raise RepoError(f"cache {self.objects_dir.parent} has an unknown layout: move it aside")
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

    def _checkpoint(self) -> float:
        """Make every object written so far durable, then say so in SYNCED; when it counts as begun."""
        began = time.time() - self._margin
        fd = os.open(self.objects_dir, os.O_RDONLY)
        try:
            if _libc.syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), f"syncfs {self.objects_dir}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)
        written = self._write_whole(self._synced_file, f"{began!r}\n")
        self._synced_at = began
        if written.st_mtime_ns % 1_000_000_000 == 0:
            # Whole-second file times (ext3, FAT, some NFS): a file may look up to 1 s older than it is.
            self._margin = COARSE_SYNC_MARGIN
        return began

    def _write_whole(self, path: Path, text: str) -> os.stat_result:
        """Replace ``path`` by ``text`` durably (temp, fsync, rename, fsync of the directory)."""
        tmp = path.with_name(f".{path.name}-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
            written = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_path(path.parent)
        return written

    def _note_landed(self, path: Path) -> None:
        """(``_lock`` held, in the same hold that makes the object visible: a checkpoint taking the
        list must not miss it.)"""
        if self._landed_since is not None:
            self._landed_since.append(path)
            if len(self._landed_since) > FSYNC_EACH_UP_TO:
                self._landed_since = None

    def _make_durable(self, objects: list[Path], synced_at: float) -> None:
        """fsync each object and its directory (the rename that placed it), then date its mtime back
        before ``synced_at`` (the time in SYNCED): a later start-up trusts it as checkpointed."""
        back = synced_at - 2 * COARSE_SYNC_MARGIN
        for directory in {path.parent for path in objects}:
            with suppress(FileNotFoundError):
                _fsync_path(directory)
        for path in objects:
            try:
                fd = _open_noatime(path)
            except FileNotFoundError:  # evicted meanwhile
                continue
            try:
                os.fsync(fd)
                os.utime(fd, ns=(time.time_ns(), int(back * 1e9)))  # the access time orders the LRU index
            finally:
                os.close(fd)

    def _landed(self) -> None:
        """An object landed unsynced: the next checkpoint covers it."""
        self._last_landed = time.time()
        self._unsynced.set()
        if self._syncer is None:
            with self._lock:
                if self._syncer is None:
                    self._syncer = threading.Thread(target=self._sync_loop, name="cache-sync", daemon=True)
                    self._syncer.start()

    def _sync_loop(self) -> None:
        while not self._closing.wait(SYNC_INTERVAL):
            if self._unsynced.is_set():
                self._sync_now()

    def _sync_now(self, closing: bool = False) -> None:
        self._unsynced.clear()
        with self._lock:
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
                with self._lock:
                    self._landed_since = None  # they are not in the next list: it syncs everything again
                self._unsynced.set()
        except OSError as exc:
            log.error("cache: checkpoint failed (%s): objects written since the last one are dropped", exc)
            with self._lock:
                self._landed_since = None
            self._drop_unsynced()

    def _drop_unsynced(self) -> None:
        """After a failed checkpoint: its objects may have lost bytes on their way to disk (a failed
        fsync reports a failed write, once), and a later checkpoint that succeeds would vouch for
        them. Forget and delete every object written since the last good one, as a start-up after a
        crash would; they are downloaded again when read."""
        since = self._synced_at if self._synced_at is not None else 0.0
        with self._lock:
            keys = list(self._sizes)
        for key in keys:
            path = self.object_path(key)
            try:
                if os.stat(path).st_mtime < since:
                    continue
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cache: %s: %s", path, exc)
            with self._lock:
                self._unindex(key)

    def close(self) -> None:
        """Checkpoint what landed unsynced (a clean stop keeps every cached object) and stop syncing."""
        self._closing.set()
        if self._syncer is not None:
            self._syncer.join()  # a checkpoint it is making finishes first
        if self._unsynced.is_set():
            self._sync_now(closing=True)
        if self._holder is not None:
            os.close(self._holder)  # releases this process's hold on the cache
            self._holder = None

    def _walk(self):
        """(key, path) of every cached object; removes temp files that no live process is writing."""
        for dirpath, _dirs, files in os.walk(self.objects_dir):
            for name in files:
                path = Path(dirpath) / name
                if name.startswith(FILL_PREFIX):
                    if not _writer_alive(name):
                        path.unlink(missing_ok=True)  # an interrupted download
                    continue
                yield path.relative_to(self.objects_dir).as_posix(), path

    # -- staging --------------------------------------------------------------------------------

    def staging_path(self, key: str) -> Path:
        return self.staging_dir / key.replace("/", "%")

    def open_staged_for_writing(self, key: str, truncate: bool = False) -> int:
        """A writer's descriptor of a staged file. It holds a shared lock on the file for as long as it
        is open, in whichever process: no retry takes a version while it is being written
        (``claim_staged``). ReadOnlyError if a retry has taken it (it is being uploaded, or was)."""
        path = self.staging_path(key)
        fd = os.open(path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ReadOnlyError(f"{key}: this staged version is being uploaded; add a new version") from None
            except OSError:  # a file system without flock: the retry cannot tell, as before there were locks
                pass
            with suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    if truncate:
                        os.ftruncate(fd, 0)
                    return fd
            raise ReadOnlyError(f"{key}: this staged version was uploaded meanwhile; add a new version")
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def release_staged(fd: int) -> None:
        """Give up a writer's lock (``open_staged_for_writing``) before its descriptor is closed."""
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def claim_staged(self, key: str, wait: float = 0.0) -> Iterator[bool]:
        """Hold the staged file against writers and other uploads (an exclusive lock) until the block
        ends, for its upload. Yields False if there is no staged file (any more: uploaded meanwhile).
        Waits up to ``wait`` seconds for a writer to close or another upload to end, then raises
        BeingWrittenError."""
        path = self.staging_path(key)
        try:
            fd = os.open(path, os.O_RDWR)  # NFS emulates flock with locks that need write access
        except FileNotFoundError:
            fd = -1
        if fd < 0:
            yield False
            return
        try:
            if not _lock_within(fd, wait):
                raise BeingWrittenError(f"{key}: a writer still has this staged version open, or it is being uploaded")
            try:
                still_staged = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                still_staged = False
            yield still_staged
        finally:
            os.close(fd)

    # -- objects --------------------------------------------------------------------------------

    def object_path(self, key: str) -> Path:
        return self.objects_dir / key

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._sizes

    def open_object(self, key: str, size: int, start: StartDownload) -> tuple[int, Download | None]:
        """A read-only fd of the object, pinned until ``unpin(key)``, and the download still writing
        it (None once complete). Starts the download if nobody has; joins it otherwise."""
        self.pin(key)
        try:
            fill, _started = self._fill_unless_present(key, size, start)
            if fill is not None:
                with self._lock:  # still in flight: its fd is open until it lands, which takes the lock
                    if self._fills.get(key) is fill:
                        return os.dup(fill.download.fd), fill.download
                fill.landed.wait()  # it landed (or failed) just now
                if fill.error is not None:
                    raise fill.error
            return _open_noatime(self.object_path(key)), None
        except BaseException:
            self.unpin(key)
            raise

    def fetch(self, key: str, size: int, start: StartDownload) -> Path:
        """The verified cached file of ``key``, downloading it first if needed (blocks)."""
        self.pin(key)
        try:
            fill, _started = self._fill_unless_present(key, size, start)
            if fill is not None:
                fill.landed.wait()
                if fill.error is not None:
                    raise fill.error
        finally:
            self.unpin(key)
        return self.object_path(key)

    def prefetch(self, key: str, size: int, start: StartDownload) -> Download | None:
        """Start downloading ``key`` in the background unless it is cached or on its way."""
        fill, started = self._fill_unless_present(key, size, start)
        return fill.download if started else None

    def adopt(self, key: str, staged: Path, size: int) -> None:
        """Move an uploaded, verified staging file into the cache (no second download needed)."""
        path = self.object_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, path)
        with self._lock:
            self._index(key, size)
            self._note_landed(path)
        self._landed()  # its rename is made durable by the next checkpoint
        self._evict()

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

    def usage(self) -> CacheUsage:
        with self._lock:
            return CacheUsage(len(self._sizes), self._used, self.max_bytes)

    def clear(self) -> int:
        """Remove every cached object that is not open; returns how many were removed."""
        with self._lock:
            victims = [k for k in self._sizes if k not in self._pins]
            for key in victims:
                self._unindex(key)
                self.object_path(key).unlink(missing_ok=True)
        return len(victims)

    # -- internals (``_lock`` held where noted) -------------------------------------------------

    def _fill_unless_present(self, key: str, size: int, start: StartDownload) -> tuple[_Fill | None, bool]:
        """The download of ``key`` in flight, started if needed, or None if the object is cached; and
        whether this call started it.

        The temp file is created without the lock held (file creation waits for the journal while
        other downloads fsync); if another thread registered a download meanwhile, ours is dropped."""
        with self._lock:
            fill = self._fills.get(key)
            if fill is not None or self._present(key, size):
                return fill, False
        new = self._new_fill(key, size, start)
        with self._lock:
            fill = self._fills.get(key)
            if fill is None and not self._present(key, size):
                self._launch(key, new)
                return new, True
        os.close(new.download.fd)
        new.tmp.unlink(missing_ok=True)
        return fill, False

    def _present(self, key: str, size: int) -> bool:
        """Is the complete object on disk? Marks it recently used. (``_lock`` held.)"""
        try:
            on_disk = os.stat(self.object_path(key)).st_size
        except FileNotFoundError:
            on_disk = None
        if on_disk != size:
            # Removed behind our back (an operator cleaning up), or cut short: download it again.
            self._unindex(key)
            return False
        if key in self._sizes:
            self._sizes.move_to_end(key)
        else:  # placed by another process (s3repofs cache prefetch)
            self._index(key, size)
        return True

    def _new_fill(self, key: str, size: int, start: StartDownload) -> _Fill:
        """Create the temp file and its download (not started yet)."""
        path = self.object_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{FILL_PREFIX}{path.name}-{os.getpid()}.{next(self._fill_numbers)}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            return _Fill(start(fd), tmp)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise

    def _launch(self, key: str, fill: _Fill) -> None:
        """Register and start the download. (``_lock`` held.)"""
        self._fills[key] = fill
        self._used += fill.download.size
        if self._runner is None:
            self._runner = ThreadPoolExecutor(self._download_threads, thread_name_prefix="download")
        self._runner.submit(self._run, key, fill)

    def _run(self, key: str, fill: _Fill) -> None:
        download = fill.download
        landed = True
        try:
            download.run()
            os.replace(fill.tmp, self.object_path(key))  # made durable by the next checkpoint
        except BaseException as exc:
            log.warning("download of %s failed: %s", key, exc)
            fill.error = exc
            landed = False
            with suppress(OSError):
                fill.tmp.unlink(missing_ok=True)
        finally:
            with self._lock:
                del self._fills[key]
                self._used -= download.size
                if landed:
                    self._index(key, download.size)
                    self._note_landed(self.object_path(key))
                os.close(download.fd)  # readers hold their own duplicates
            if landed:
                self._landed()
            if download.size >= TRIM_AFTER:
                _libc.malloc_trim(0)
            try:
                self._evict()
            finally:
                fill.landed.set()

    def _index(self, key: str, size: int) -> None:
        """(``_lock`` held.)"""
        self._unindex(key)
        self._sizes[key] = size
        self._used += size

    def _unindex(self, key: str) -> None:
        """(``_lock`` held.)"""
        size = self._sizes.pop(key, None)
        if size is not None:
            self._used -= size

    def _evict(self) -> None:
        victims = []
        with self._lock:
            excess = self._used - self.max_bytes
            for key, size in self._sizes.items():  # least recently used first
                if excess <= 0:
                    break
                if key not in self._pins:
                    victims.append(key)
                    excess -= size
            for key in victims:  # unlinked under the lock: an open racing with eviction re-downloads
                self._unindex(key)
                log.debug("cache: evicting %s", key)
                with suppress(OSError):
                    self.object_path(key).unlink(missing_ok=True)


def _lock_within(fd: int, wait: float) -> bool:
    """Take an exclusive flock on ``fd`` within ``wait`` seconds (True also where flock is not supported)."""
    deadline, delay = time.monotonic() + wait, 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(2 * delay, 0.1)
        except OSError:  # no flock here (see open_staged_for_writing)
            return True


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_noatime(path: Path) -> int:
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
