"""The local cache: bounded by bytes, pins, shared downloads, the index rebuilt from disk."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from mount_helper import wait_for

from s3repofs.errors import StoreUnavailableError
from s3repofs.local import checkpoint
from s3repofs.local.cache import LocalCache
from s3repofs.local.transfer import Download

PARTS = ThreadPoolExecutor(4)


def source(data: bytes, calls: list | None = None, gate: threading.Event | None = None):
    """A StartDownload over ``data`` that counts its downloads and can be held back."""
    md5 = ("md5", hashlib.md5(data).hexdigest())

    def fetch(start, end):
        if calls is not None:
            calls.append((start, end))
        if gate is not None:
            assert gate.wait(10)
        yield data[start:end]

    return lambda fd: Download(fd, len(data), md5, "test", fetch, 0, PARTS)


@pytest.fixture
def cache(tmp_path):
    cache = LocalCache(tmp_path, max_bytes=1000)
    cache.prepare()
    return cache


def test_least_recently_used_objects_are_evicted_by_bytes(cache):
    for key in ("t/a", "t/b", "t/c"):
        cache.fetch(key, 400, source(key[-1].encode() * 400))
    assert not cache.has("t/a") and cache.has("t/b") and cache.has("t/c")
    assert not cache.object_path("t/a").exists()
    cache.fetch("t/b", 400, source(b"b" * 400))  # touch b: c is now the oldest
    cache.fetch("t/d", 400, source(b"d" * 400))
    assert cache.has("t/b") and not cache.has("t/c") and cache.usage().used_bytes == 800


def test_open_objects_are_never_evicted(cache):
    fd, _download = cache.open_object("t/open", 600, source(b"x" * 600))
    cache.fetch("t/open", 600, source(b"x" * 600))  # joins that download and returns once it has landed
    cache.fetch("t/b", 600, source(b"y" * 600))
    cache.fetch("t/c", 100, source(b"c" * 100))
    assert cache.has("t/open")  # the least recently used, but open: b was evicted instead
    assert os.pread(fd, 1000, 0) == b"x" * 600 and not cache.has("t/b")
    os.close(fd)
    cache.unpin("t/open")
    assert cache.usage().used_bytes <= 1000


def test_concurrent_opens_share_one_download(cache):
    calls: list = []
    gate = threading.Event()
    start = source(b"z" * 500, calls, gate)
    opened = [cache.open_object("t/shared", 500, start) for _ in range(5)]
    gate.set()
    for fd, download in opened:
        assert download is not None
        download.wait(0, 500)
        assert os.pread(fd, 1000, 0) == b"z" * 500
        os.close(fd)
        cache.unpin("t/shared")
    assert len(calls) == 1


def test_a_failed_download_leaves_nothing(cache):
    def start(fd):
        def fetch(s, e):
            raise StoreUnavailableError("no store")
            yield b""
        return Download(fd, 10, ("md5", "0" * 32), "test", fetch, 0, PARTS)

    with pytest.raises(StoreUnavailableError):
        cache.fetch("t/x", 10, start)
    assert not cache.has("t/x") and cache.usage().used_bytes == 0
    assert wait_for(lambda: not list(cache.objects_dir.rglob("*x*")))


def test_the_index_is_rebuilt_from_disk(tmp_path, cache):
    cache.fetch("t/a", 300, source(b"a" * 300))
    stale = cache.objects_dir / "t" / ".fill-b-999999999.0"  # a dead process's interrupted download
    stale.write_bytes(b"partial")
    live = cache.objects_dir / "t" / f".fill-c-{os.getpid()}.0"  # a live process's download
    live.write_bytes(b"partial")
    cache.close()  # a clean stop: what landed is synced
    again = LocalCache(tmp_path, max_bytes=1000)
    again.prepare()
    assert again.has("t/a") and again.usage().used_bytes == 300
    assert not stale.exists() and live.exists()


def test_after_a_crash_objects_landed_since_the_last_checkpoint_are_dropped(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(checkpoint, "SYNC_INTERVAL", 3600.0)  # no checkpoint but the ones below
    cache.fetch("t/a", 300, source(b"a" * 300))
    cache.close()
    crashed = LocalCache(tmp_path, max_bytes=1000)
    crashed.prepare()  # t/a landed before the checkpoint of the clean stop: durable
    crashed.fetch("t/b", 300, source(b"b" * 300))  # lands after it, and the machine dies unsynced
    os.close(crashed.checkpoints._holder)  # the dead process no longer holds the cache
    again = LocalCache(tmp_path, max_bytes=1000)
    again.prepare()
    assert again.has("t/a") and not again.has("t/b") and not again.object_path("t/b").exists()
    calls: list = []
    assert again.fetch("t/b", 300, source(b"b" * 300, calls)).read_bytes() == b"b" * 300 and len(calls) == 1


class _CountingSyncfs:
    """The C library, counting syncfs calls."""

    def __init__(self, real) -> None:
        self.real, self.syncfs_calls = real, 0

    def syncfs(self, fd: int) -> int:
        self.syncfs_calls += 1
        return self.real.syncfs(fd)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def test_a_checkpoint_after_a_few_landings_fsyncs_only_them_and_they_survive_a_crash(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(checkpoint, "SYNC_INTERVAL", 3600.0)
    libc = _CountingSyncfs(checkpoint._libc)
    monkeypatch.setattr(checkpoint, "_libc", libc)
    cache.fetch("t/a", 300, source(b"a" * 300))
    cache.close()  # a new cache's first checkpoint records a time in SYNCED: a syncfs
    assert libc.syncfs_calls == 1
    synced = (tmp_path / "cache" / "SYNCED").read_text()
    crashed = LocalCache(tmp_path, max_bytes=1000)
    crashed.prepare()
    crashed.fetch("t/b", 300, source(b"b" * 300))
    crashed.checkpoints._sync_now()  # the checkpoint thread's turn
    assert libc.syncfs_calls == 1 and (tmp_path / "cache" / "SYNCED").read_text() == synced
    assert os.stat(crashed.object_path("t/b")).st_mtime < float(synced)
    crashed.fetch("t/c", 300, source(b"c" * 300))  # after the checkpoint: lost with the machine
    os.close(crashed.checkpoints._holder)
    again = LocalCache(tmp_path, max_bytes=1000)
    again.prepare()
    assert again.has("t/a") and again.has("t/b") and not again.has("t/c")
    assert again.object_path("t/b").read_bytes() == b"b" * 300


def test_a_checkpoint_after_many_landings_syncs_the_file_system(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(checkpoint, "SYNC_INTERVAL", 3600.0)
    monkeypatch.setattr(checkpoint, "FSYNC_EACH_UP_TO", 2)
    cache.fetch("t/first", 10, source(b"f" * 10))
    cache.close()
    libc = _CountingSyncfs(checkpoint._libc)
    monkeypatch.setattr(checkpoint, "_libc", libc)
    busy = LocalCache(tmp_path, max_bytes=1000)
    busy.prepare()
    before = float((tmp_path / "cache" / "SYNCED").read_text())
    for name in "abc":
        busy.fetch(f"t/{name}", 10, source(name.encode() * 10))
    busy.close()
    assert libc.syncfs_calls == 1 and float((tmp_path / "cache" / "SYNCED").read_text()) > before
    again = LocalCache(tmp_path, max_bytes=1000)
    again.prepare()
    assert all(again.has(f"t/{name}") for name in ("first", "a", "b", "c"))


def test_objects_landed_within_the_margin_of_a_file_system_sync_are_kept_by_a_clean_stop(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(checkpoint, "SYNC_INTERVAL", 3600.0)
    monkeypatch.setattr(checkpoint, "FSYNC_EACH_UP_TO", 2)
    cache.fetch("t/first", 10, source(b"f" * 10))
    cache.close()
    busy = LocalCache(tmp_path, max_bytes=1000)
    busy.prepare()
    for name in "abc":
        busy.fetch(f"t/{name}", 10, source(name.encode() * 10))
    busy.checkpoints._margin = 0.5  # they landed less than a margin before this checkpoint: it does not cover them
    busy.checkpoints._sync_now()
    busy.close()
    again = LocalCache(tmp_path, max_bytes=1000)
    again.prepare()
    assert all(again.has(f"t/{name}") for name in "abc")


def test_a_failed_checkpoint_drops_what_it_was_to_make_durable(tmp_path, cache, monkeypatch):
    import errno

    monkeypatch.setattr(checkpoint, "SYNC_INTERVAL", 3600.0)
    cache.fetch("t/old", 10, source(b"o" * 10))
    cache.close()
    live = LocalCache(tmp_path, max_bytes=1000)
    live.prepare()
    live.fetch("t/new", 10, source(b"n" * 10))

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    live.checkpoints._sync_now()
    monkeypatch.undo()
    assert live.has("t/old") and not live.has("t/new") and not live.object_path("t/new").exists()
    calls: list = []
    assert live.fetch("t/new", 10, source(b"n" * 10, calls)).read_bytes() == b"n" * 10 and len(calls) == 1
    live.close()


def test_a_process_starting_beside_a_live_one_keeps_its_unsynced_objects(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(checkpoint, "SYNC_INTERVAL", 3600.0)
    cache.fetch("t/new", 300, source(b"n" * 300))  # landed after the cache's last checkpoint
    other = LocalCache(tmp_path, max_bytes=1000)  # `s3repofs ls` while the mount runs, say
    other.prepare()
    assert other.has("t/new") and cache.object_path("t/new").read_bytes() == b"n" * 300
    other.close()


def test_a_cache_from_before_checkpoints_is_trusted(tmp_path):
    old = LocalCache(tmp_path, max_bytes=1000)  # every object of such a cache was fsynced as it landed
    old.objects_dir.mkdir(parents=True)
    (old.objects_dir.parent / "LAYOUT").write_text("1\n")
    (old.objects_dir / "t").mkdir()
    (old.objects_dir / "t" / "a").write_bytes(b"a" * 10)
    old.prepare()
    assert old.has("t/a") and (old.objects_dir.parent / "SYNCED").is_file()
    assert (old.objects_dir.parent / "LAYOUT").read_text() == "2\n"  # from now on, checkpoints decide
    (old.objects_dir.parent / "SYNCED").unlink()  # an operator deleted it: nothing is trusted
    old.close()
    again = LocalCache(tmp_path, max_bytes=1000)
    again.prepare()
    assert not again.has("t/a")


def test_an_object_placed_by_another_process_is_used(tmp_path, cache):
    other = LocalCache(tmp_path, max_bytes=1000)  # `s3repofs cache prefetch` in another process
    other.prepare()
    other.fetch("t/p", 100, source(b"p" * 100))
    calls: list = []
    assert cache.fetch("t/p", 100, source(b"p" * 100, calls)).read_bytes() == b"p" * 100
    assert calls == [] and cache.has("t/p")


def test_an_object_deleted_behind_our_back_is_downloaded_again(cache):
    path = cache.fetch("t/a", 3, source(b"abc"))
    path.unlink()
    calls: list = []
    assert cache.fetch("t/a", 3, source(b"abc", calls)).read_bytes() == b"abc" and len(calls) == 1


def test_clear_keeps_open_objects(cache):
    cache.fetch("t/a", 3, source(b"abc"))
    fd, _ = cache.open_object("t/b", 3, source(b"def"))
    cache.fetch("t/b", 3, source(b"def"))  # joins that download and returns once it has landed
    assert cache.clear() == 1 and not cache.has("t/a") and not cache.object_path("t/a").exists()
    assert cache.has("t/b") and cache.object_path("t/b").read_bytes() == b"def"
    os.close(fd)
    cache.unpin("t/b")


def test_threads_opening_one_cold_object_at_once_share_one_download(cache):
    calls: list = []
    start = source(b"q" * 700, calls)
    barrier = threading.Barrier(8)
    opened: list = []

    def open_it() -> None:
        barrier.wait()
        opened.append(cache.open_object("t/race", 700, start))

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.fetch("t/race", 700, start)  # returns once the download has landed
    assert len(calls) == 1 and len(opened) == 8
    for fd, _download in opened:
        assert os.pread(fd, 1000, 0) == b"q" * 700
        os.close(fd)
        cache.unpin("t/race")
    leftovers = [p.name for p in cache.objects_dir.rglob("*") if p.name.startswith(".fill-")]
    assert leftovers == []  # the temp files of the threads that lost the race are gone
