"""A real mount through outages: its daemon killed with SIGKILL mid-upload, and PostgreSQL stopped
under it. What a writer's close() acknowledged survives both; while the database is away,
operations that need it fail with EIO and one log line, never a traceback."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time

import pytest
from mount_helper import daemon_log, fuse_available, mounted, wait_for
from repo_fixtures import make_config
from servers import start_postgres

from s3repofs import S3Repo

pytestmark = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3 (./scripts/setup)")


class Writers:
    """Threads writing new files into a directory of a mount, one after another, until the mount fails."""

    def __init__(self, directory, count: int) -> None:
        self.directory = directory
        self.acknowledged: dict[str, bytes] = {}  # close() succeeded
        self.written: dict[str, bytes] = {}  # every file begun, with all it was to hold
        self.closing = 0  # threads inside close() now
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._write, args=(n,), daemon=True) for n in range(count)]
        for thread in self._threads:
            thread.start()

    def _write(self, n: int) -> None:
        for k in range(1_000_000):
            name, data = f"w{n}-{k}", os.urandom(50_000 + (n * 7919 + k * 104_729) % 300_000)
            with self._lock:
                self.written[name] = data
            try:
                fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    with self._lock:
                        self.closing += 1
                    try:
                        os.close(fd)
                    finally:
                        with self._lock:
                            self.closing -= 1
            except OSError:  # the daemon is gone (ENOTCONN, ECONNABORTED)
                return
            with self._lock:
                self.acknowledged[name] = data

    def in_flight(self, at_least_done: int) -> bool:
        with self._lock:
            return len(self.acknowledged) >= at_least_done and self.closing > 0

    def join(self) -> None:
        for thread in self._threads:
            thread.join(10)


def test_every_close_acknowledged_before_a_kill_9_is_published_after_remount(request, tmp_path):
    config = make_config(request, tmp_path, "postgres-s3")
    with mounted(config, tmp_path) as mnt:
        os.mkdir(mnt / "published/docs")
        writers = Writers(mnt / "published/docs", 4)
        assert wait_for(lambda: writers.in_flight(at_least_done=8), timeout=15, interval=0.001)
        daemon = int(next((tmp_path / "root").glob("mount-*.pid")).read_text())
        os.kill(daemon, signal.SIGKILL)  # while a close() is in flight
        writers.join()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=True)
    assert 8 <= len(writers.acknowledged) < len(writers.written)

    with mounted(config, tmp_path) as mnt:
        for name, data in writers.acknowledged.items():  # every acknowledged close is published as written
            assert (mnt / "published/docs" / name).read_bytes() == data, name
        # The retry at start-up uploads what the kill left staged; a file whose close did not answer is
        # published whole or not at all, and what was cut short stays unpublished, as far as it was written.
        with S3Repo(config) as repo:
            assert wait_for(lambda: all(v.storage == "uploaded" for v in repo.meta.staged_on("test-host")), timeout=10)
        for name in os.listdir(mnt / "published/docs"):
            assert (mnt / "published/docs" / name).read_bytes() == writers.written[name], name
        for name in os.listdir(mnt / "unpublished/docs"):
            assert writers.written[name].startswith((mnt / "unpublished/docs" / name).read_bytes()), name


@pytest.fixture
def private_postgres(tmp_path):
    """A PostgreSQL server of this test's own, to stop and start without disturbing other tests."""
    # Commits written before they are acknowledged, as in production: an immediate stop loses none.
    server = start_postgres(tmp_path / "pg", synchronous_commit="on")
    yield server
    server.stop()


def readable(path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def expect_eio(operation) -> None:
    with pytest.raises(OSError) as info:
        operation()
    assert info.value.errno == errno.EIO, info.value


def test_a_postgresql_outage_under_a_mount_fails_cleanly_and_loses_nothing(private_postgres, tmp_path):
    config = {"local_root": str(tmp_path / "root"), "host_name": "test-host", "object_dir": str(tmp_path / "objects"),
              "database": private_postgres.create_database("repo")}
    with mounted(config, tmp_path) as mnt:
        docs = mnt / "published/docs"
        os.mkdir(docs)
        (docs / "before").write_bytes(b"acknowledged before the outage")
        straddling = open(docs / "straddling", "wb")  # opened before the outage, closed during it
        straddling.write(b"written before the outage")

        private_postgres.pause(crash=True)
        began = time.monotonic()
        expect_eio(straddling.close)
        expect_eio(lambda: (docs / "during").write_bytes(b"new"))
        expect_eio(lambda: os.mkdir(docs / "d"))
        expect_eio(lambda: os.unlink(docs / "before"))
        assert time.monotonic() - began < 10  # refused at once, not after timeouts
        assert "DatabaseUnavailable" not in daemon_log(tmp_path)  # one plain line each, no exception names
        assert "PostgreSQL database" in daemon_log(tmp_path)

        private_postgres.resume()
        # The mount probes a database it lost at most once a second: reads come back within that.
        assert wait_for(lambda: readable(docs / "before"), timeout=3.0) == b"acknowledged before the outage"
        (docs / "after").write_bytes(b"written after the outage")
        assert (docs / "after").read_bytes() == b"written after the outage"
        # not acknowledged, but not lost either: staged, for the retry to publish
        assert (mnt / "unpublished/docs/straddling").read_bytes() == b"written before the outage"
        os.unlink(docs / "before")
        assert (mnt / "expired/docs/before").read_bytes() == b"acknowledged before the outage"
    with S3Repo(config) as repo:  # the unmount's retry published what the failed close() had meant to
        assert repo.require_file("docs/straddling").read_bytes() == b"written before the outage"
