"""The database unreachable under a mount: reads and listings of what this mount knew go on, stale and
read-only, from its last metadata and its verified cache; writes fail with EIO; all resumes when the
database is back. Against a private PostgreSQL that the tests stop and start (the session's shared
server is left alone)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
import time
import uuid

import pytest
from mount_helper import daemon_log, fuse_available, mounted, wait_for
from servers import start_postgres

from s3repofs import S3Repo
from s3repofs.errors import DatabaseUnavailableError, NotFoundError, RepoError
from s3repofs.mount.lastknown import PROBE_INTERVAL, LastKnown, Outage
from s3repofs.mount.tree import Tree

TTL = 0.05  # the tree's metadata cache: gone by the time the database is


@pytest.fixture(scope="module")
def pausable_postgres(tmp_path_factory):
    server = start_postgres(tmp_path_factory.mktemp("postgres-paused"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pausable_url(pausable_postgres):
    name = f"test_{uuid.uuid4().hex}"
    url = pausable_postgres.create_database(name)
    try:
        yield url
    finally:
        pausable_postgres.resume()  # a failed test may have left it paused
        pausable_postgres.drop_database(name)


@pytest.fixture
def repo(pausable_url, tmp_path):
    repo = S3Repo({"local_root": str(tmp_path / "root"), "host_name": "test-host", "database": pausable_url,
                   "object_dir": str(tmp_path / "objects")})
    repo.create_repository()
    yield repo
    repo.close()


def write(tree: Tree, path: str, data: bytes) -> None:
    fh = tree.create(path, 0o644, 0, 0)
    tree.write(fh, data, 0)
    tree.flush(fh)
    tree.release(fh)


def read(tree: Tree, path: str) -> bytes:
    fh = tree.open(path, os.O_RDONLY)
    try:
        return os.pread(tree.readable_fd(fh, 1 << 20, 0), 1 << 20, 0)
    finally:
        tree.release(fh)


def names(tree: Tree, path: str) -> list[str]:
    return [name for name, _entry in tree.readdir(path)]


def eio(call, *args) -> RepoError:
    with pytest.raises(RepoError) as raised:
        call(*args)
    assert raised.value.errno == errno.EIO, raised.value
    return raised.value


def outage_lines(caplog) -> tuple[list[str], list[str]]:
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return ([m for m in lines if m.startswith("database unreachable")],
            [m for m in lines if m.startswith("database reachable again")])


def test_reads_and_listings_of_what_this_mount_knew_go_on_while_the_database_is_down(
        repo, pausable_postgres, caplog):
    tree = Tree(repo, metadata_ttl=TTL)
    tree.mkdir("/published/t", 0o755, 0, 0)
    tree.mkdir("/published/never_listed", 0o755, 0, 0)
    write(tree, "/published/t/f", b"written here")
    assert names(tree, "/published/t") == ["f"] and names(tree, "/published") == ["never_listed", "t"]
    assert tree.lookup("/published/t/f").size == 12
    with pytest.raises(NotFoundError):
        tree.lookup("/published/t/absent")
    time.sleep(2 * TTL)
    caplog.set_level(logging.WARNING)
    pausable_postgres.pause()

    assert names(tree, "/published/t") == ["f"] and names(tree, "/published") == ["never_listed", "t"]
    assert tree.lookup("/published/t/f").size == 12 and tree.lookup("/published/t").is_dir
    assert read(tree, "/published/t/f") == b"written here"
    with pytest.raises(NotFoundError):  # known not to exist
        tree.lookup("/published/t/absent")
    assert "never listed" in str(eio(tree.readdir, "/published/never_listed"))
    assert "not known to this mount" in str(eio(tree.lookup, "/published/t/unknown"))
    eio(tree.create, "/published/t/new", 0o644, 0, 0)
    eio(tree.open, "/published/t/f", os.O_WRONLY | os.O_TRUNC)
    eio(tree.unlink, "/published/t/f")
    assert len(outage_lines(caplog)[0]) == 1  # one line for the whole outage, not one per call

    pausable_postgres.resume()
    time.sleep(PROBE_INTERVAL)  # the next probe of the database is due
    write(tree, "/published/t/g", b"after")
    assert names(tree, "/published/t") == ["f", "g"] and read(tree, "/published/t/g") == b"after"
    down, back = outage_lines(caplog)
    assert len(down) == 1 and len(back) == 1
    assert "known paths" in down[0] and "answers came from the last metadata" in back[0]


def test_a_version_not_in_this_hosts_cache_is_not_read_from_stale_metadata(repo, pausable_postgres):
    tree = Tree(repo, metadata_ttl=TTL)
    tree.mkdir("/published/t", 0o755, 0, 0)
    write(tree, "/published/t/f", b"bytes")
    tree.lookup("/published/t/f")
    repo.cache.clear()  # evicted since (the store still holds it)
    time.sleep(2 * TTL)
    pausable_postgres.pause()
    assert "not in this host's cache" in str(eio(tree.open, "/published/t/f", os.O_RDONLY))
    assert tree.lookup("/published/t/f").size == 5  # its attributes are still known


def test_a_change_made_here_drops_what_was_known_of_the_path(repo, pausable_postgres):
    tree = Tree(repo, metadata_ttl=TTL)
    tree.mkdir("/published/t", 0o755, 0, 0)
    write(tree, "/published/t/f", b"old")
    assert names(tree, "/published/t") == ["f"] and tree.lookup("/published/t/f").size == 3
    write(tree, "/published/t/f", b"newer")  # not looked up or listed again before the outage
    time.sleep(2 * TTL)
    pausable_postgres.pause()
    eio(tree.lookup, "/published/t/f")  # not the old version: unknown
    eio(tree.readdir, "/published/t")


def test_while_down_the_database_is_asked_once_per_probe_interval(repo, pausable_postgres, monkeypatch):
    tree = Tree(repo, metadata_ttl=TTL)
    tree.mkdir("/published/t", 0o755, 0, 0)
    write(tree, "/published/t/f", b"bytes")
    assert names(tree, "/published/t") == ["f"]
    time.sleep(2 * TTL)
    pausable_postgres.pause()
    repo.db.close()  # its idle connections are broken now; the next query connects
    attempts = []
    connect = repo.db.dialect.connect
    monkeypatch.setattr(repo.db.dialect, "connect", lambda: attempts.append(1) or connect())
    started = time.monotonic()
    for _ in range(50):  # behind a dropped route each attempt would wait for the connect timeout
        assert tree.lookup("/published/t/f").size == 5
        assert names(tree, "/published/t") == ["f"]
    assert len(attempts) <= 1 + (time.monotonic() - started) / PROBE_INTERVAL


def test_while_a_probe_waits_for_the_database_other_queries_fail_at_once():
    now = [0.0]
    outage = Outage(lambda: "nothing known", probe_interval=1.0, clock=lambda: now[0])
    refused, release = DatabaseUnavailableError("refused"), threading.Event()

    def fail():
        raise refused

    def hang():  # a database behind a dropped route: the probe waits for the connect timeout
        release.wait(10)
        raise refused

    with pytest.raises(DatabaseUnavailableError):
        outage.ask(fail)
    now[0] = 1.5
    probe = threading.Thread(target=lambda: pytest.raises(DatabaseUnavailableError, outage.ask, hang))
    probe.start()
    wait_for(lambda: outage._probing)
    now[0] = 3.0  # another probe would be due, but one is waiting
    asked = []
    with pytest.raises(DatabaseUnavailableError):
        outage.ask(asked.append, 1)
    release.set()
    probe.join()
    assert asked == [] and outage.down
    now[0] = 4.5
    assert outage.ask(lambda: "answer") == "answer" and not outage.down


def test_what_is_known_is_bounded():
    known = LastKnown(max_paths=3, max_listed=4)
    for name in "abcd":
        known.learn(f"/published/t/{name}", name)
    assert known.path("/published/t/a") is None and known.path("/published/t/d") == "d"
    big = [(name, name) for name in "wxyz"]
    known.learn_listing("/published/big", big, dict(big))  # 4 names + 1 > 4: not kept
    assert known.listing("/published/big") is None
    known.learn_listing("/published/small", [("x", "x")], {"x": "x"})
    assert known.listing("/published/small") == [("x", "x")] and known.path("/published/small/x") == "x"
    assert known.describe() == "3 known paths and 1 directory listed"


def test_the_newer_of_a_paths_answer_and_its_directorys_listing_is_known():
    known = LastKnown()
    known.learn("/published/t/a", "looked up first")
    known.learn_listing("/published/t", [("a", "listed then")], {"a": "listed then"})
    assert known.path("/published/t/a") == "listed then"
    known.learn("/published/t/a", "looked up last")
    assert known.path("/published/t/a") == "looked up last"
    assert known.path("/published/t/b") is None


# -- a real mount -------------------------------------------------------------------------------


@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3 (./scripts/setup)")
def test_a_mount_serves_cat_and_ls_while_postgresql_is_stopped(pausable_url, pausable_postgres, s3_server,
                                                               s3_bucket, tmp_path):
    config = {"local_root": str(tmp_path / "root"), "host_name": "test-host", "database": pausable_url,
              "default_s3_bucket": s3_bucket, "s3_endpoint_url": s3_server.endpoint_url,
              "s3_access_key": s3_server.access_key, "s3_secret_key": s3_server.secret_key,
              "s3_region": s3_server.region, "metadata_ttl": 1.0}
    with mounted(config, tmp_path) as mnt:
        (mnt / "published/docs").mkdir()
        (mnt / "published/docs/f.txt").write_bytes(b"written before the outage\n")
        assert os.listdir(mnt / "published/docs") == ["f.txt"]
        pausable_postgres.pause()
        time.sleep(1.2)  # the kernel's entries and the daemon's cache have expired: every call reaches the tree
        cat = subprocess.run(["cat", str(mnt / "published/docs/f.txt")], capture_output=True)
        assert cat.returncode == 0 and cat.stdout == b"written before the outage\n", cat.stderr
        ls = subprocess.run(["ls", "-l", str(mnt / "published/docs")], capture_output=True, text=True)
        assert ls.returncode == 0 and "f.txt" in ls.stdout, ls.stderr
        with pytest.raises(OSError) as raised:
            (mnt / "published/docs/g.txt").write_bytes(b"no database")
        assert raised.value.errno == errno.EIO
        pausable_postgres.resume()

        def written() -> bool:
            try:
                (mnt / "published/docs/g.txt").write_bytes(b"database back")
            except OSError:
                return False
            return True

        assert wait_for(written, timeout=15, interval=0.5)
        assert (mnt / "published/docs/g.txt").read_bytes() == b"database back"
        assert sorted(os.listdir(mnt / "published/docs")) == ["f.txt", "g.txt"]
    log = daemon_log(tmp_path)
    assert log.count("database unreachable: serving") == 1 and log.count("database reachable again") == 1, log


def test_the_mounts_root_lists_while_the_database_is_down(repo, pausable_postgres):
    tree = Tree(repo, metadata_ttl=TTL)
    tree.mkdir("/published/t", 0o755, 0, 0)
    assert names(tree, "/") == ["published", "unpublished", "expired"]
    time.sleep(2 * TTL)
    pausable_postgres.pause()
    assert names(tree, "/") == ["published", "unpublished", "expired"]  # ls of the mount point
    assert tree.readdir("/")[0][1].nlink == 3
