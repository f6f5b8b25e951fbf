"""POSIX calls on a real mount that ordinary programs rely on: ftruncate, unlink of open files, times,
and names the daemon changed by itself (setfattr) that the kernel must not remember."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import mfusepy
import pytest
from mount_helper import daemon_log, fuse_available, mounted, wait_for
from repo_fixtures import make_config

from s3repofs import S3Repo
from s3repofs.mount.fuse import Operations
from s3repofs.mount.tree import Tree

pytestmark = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3 (./scripts/setup)")


@pytest.fixture
def mnt(request, tmp_path):
    """A mount of the embedded engines: these behaviours are the tree's, whatever the database."""
    with mounted(make_config(request, tmp_path, "sqlite-local"), tmp_path) as mountpoint:
        (mountpoint / "published" / "t").mkdir()
        yield mountpoint


@pytest.fixture
def mnt_each(repo_config_pair, tmp_path):
    """A mount of each database engine: for what the database itself keeps (times, by triggers)."""
    with mounted(repo_config_pair, tmp_path) as mountpoint:
        (mountpoint / "published" / "t").mkdir()
        yield mountpoint


def setfattr(path, value: str) -> None:
    subprocess.run(["setfattr", "-n", "user.s3repo.state", "-v", value, str(path)], check=True)


def test_ftruncate_cuts_the_bytes_of_its_own_handle(mnt, tmp_path):
    path = mnt / "published/t/f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"eleven byte")
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_size == 3
        assert os.pread(fd, 100, 0) == b"ele"
    finally:
        os.close(fd)
    assert path.read_bytes() == b"ele"
    assert os.stat(path).st_size == 3
    assert os.getxattr(path, "user.s3repo.size") == b"3"
    assert "superseded" not in daemon_log(tmp_path)


def test_ftruncate_in_unpublished_then_rm_leaves_nothing(mnt):
    path = mnt / "unpublished/t/u"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"some bytes")
        os.ftruncate(fd, 4)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"some"
    os.unlink(path)
    assert os.listdir(mnt / "unpublished/t") == []
    assert not path.exists()


def test_a_path_expired_by_setfattr_can_be_written_again_at_once(mnt):
    path = mnt / "published/t/a"
    path.write_bytes(b"1")
    setfattr(path, "expired")
    path.write_bytes(b"2")  # the kernel must not still believe the old file exists (OPEN, no O_CREAT)
    assert path.read_bytes() == b"2"
    assert (mnt / "expired/t/a").read_bytes() == b"1"


def test_a_path_published_by_setfattr_can_be_staged_again_at_once(mnt):
    staged = mnt / "unpublished/t/u"
    staged.write_bytes(b"first")
    setfattr(staged, "published")
    staged.write_bytes(b"second")
    assert staged.read_bytes() == b"second"
    assert (mnt / "published/t/u").read_bytes() == b"first"


def test_the_kernel_forgets_a_name_the_daemon_changed_by_itself(mnt):
    published = mnt / "published/t/c"
    published.write_bytes(b"old")
    assert os.stat(published).st_size == 3  # the kernel now holds the entry for the entry timeout (2.5 s)
    staged = mnt / "unpublished/t/c"
    staged.write_bytes(b"newer bytes")
    setfattr(staged, "published")  # a call on unpublished/t/c changes published/t/c behind the kernel
    assert wait_for(lambda: os.stat(published).st_size == 11, timeout=1.0)
    assert published.read_bytes() == b"newer bytes"


def test_an_open_of_a_name_that_has_gone_asks_the_kernel_to_look_again(repo):
    # The kernel sends OPEN (without O_CREAT) only for a name it believes exists: ESTALE makes it look
    # the name up again and retry, as CREATE if the caller asked for O_CREAT.
    tree = Tree(repo, metadata_ttl=3600)
    tree.mkdir("/published/t", 0o755, 0, 0)
    operations = Operations(tree)
    for flags in (os.O_WRONLY, os.O_RDONLY):
        with pytest.raises(mfusepy.FuseOSError) as raised:
            operations.open("/published/t/gone", flags)
        assert raised.value.errno == errno.ESTALE
    with pytest.raises(mfusepy.FuseOSError) as raised:
        operations.getattr("/published/t/gone")
    assert raised.value.errno == errno.ENOENT  # a lookup's answer stays ENOENT
    tree.create("/published/t/new", 0o644, 0, 0)  # a name the kernel would find again: not stale
    with pytest.raises(mfusepy.FuseOSError) as raised:
        operations.open("/published/t/new", os.O_RDONLY)
    assert raised.value.errno == errno.ENOENT


def test_rm_of_a_file_open_for_reading_removes_the_name_at_once(mnt):
    path = mnt / "published/t/r"
    path.write_bytes(b"read me")
    with open(path, "rb") as reader:
        os.unlink(path)
        assert not path.exists()
        assert reader.read() == b"read me"
        assert os.fstat(reader.fileno()).st_nlink == 0
    assert os.listdir(mnt / "expired/t") == ["r"]  # no .fuse_hidden* left behind
    assert (mnt / "expired/t/r").read_bytes() == b"read me"


def test_unlink_of_a_file_being_written_in_published_keeps_the_descriptor_and_stores_nothing(mnt):
    path = mnt / "published/t/w"
    path.write_bytes(b"published before")
    fd = os.open(path, os.O_RDWR | os.O_TRUNC)
    try:
        os.write(fd, b"never published")
        os.unlink(path)  # at once: no EBUSY after a wait
        assert not path.exists()
        assert os.pread(fd, 100, 0) == b"never published"
        os.write(fd, b"!")
        assert os.fstat(fd).st_size == 16
    finally:
        os.close(fd)
    assert not path.exists()
    assert os.listdir(mnt / "unpublished/t") == []
    assert (mnt / "expired/t/w").read_bytes() == b"published before"


def test_unlink_of_a_file_being_written_in_unpublished_brings_no_older_version_back(mnt):
    path = mnt / "unpublished/t/d/u"
    os.makedirs(path.parent)
    path.write_bytes(b"older")
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"newer")
        os.unlink(path)
        assert os.pread(fd, 100, 0) == b"newer"
    finally:
        os.close(fd)
    assert not path.exists()
    assert os.listdir(path.parent) == []
    os.rmdir(path.parent)


def test_a_file_closed_then_unlinked_before_its_release_stays_gone(mnt):
    path = mnt / "published/t/late"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x")
    os.fsync(fd)  # stored and published
    os.unlink(path)
    os.write(fd, b"y")  # a new version of a file without a name
    os.close(fd)
    assert not path.exists()
    assert os.listdir(mnt / "unpublished/t") == []
    assert (mnt / "expired/t/late").read_bytes() == b"x"


def test_touch_and_cp_p_set_the_mtime_stat_shows(mnt_each, tmp_path):
    path = mnt_each / "published/t/f"
    path.write_bytes(b"x")
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    assert os.stat(path).st_mtime_ns == 1_600_000_000_123_456_789
    source = tmp_path / "source"
    source.write_bytes(b"copied with its times")
    os.utime(source, ns=(1_500_000_000_987_654_321, 1_500_000_000_987_654_321))
    subprocess.run(["cp", "-p", str(source), str(mnt_each / "published/t/copy")], check=True)
    assert os.stat(mnt_each / "published/t/copy").st_mtime_ns == 1_500_000_000_987_654_321
    touched = mnt_each / "published/t/touched"
    subprocess.run(f"echo y > {touched}; touch -d '2020-01-02 03:04:05' {touched}", shell=True, check=True)
    with S3Repo(str(tmp_path / "mnt.json")) as repo:  # what is stored, not what the kernel still caches
        stored = repo.get_file("t/touched").version
    assert time.gmtime(stored.mtime_ns / 1e9).tm_year == 2020  # touch opens, then futimens
    assert touched.read_bytes() == b"y\n"
    before = time.time_ns()
    subprocess.run(["touch", str(path)], check=True)
    assert os.stat(path).st_mtime_ns >= before
    path.write_bytes(b"a new version has its own time")
    assert os.stat(path).st_mtime_ns >= before


def test_rsync_a_twice_copies_nothing_the_second_time(mnt_each, tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        (source / name).write_bytes(os.urandom(1000))
        os.utime(source / name, (1_600_000_000, 1_600_000_000))  # rsync compares whole seconds
    target = mnt_each / "published/t/dst"
    command = ["rsync", "-a", "--itemize-changes", f"{source}/", f"{target}/"]
    first = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert sum(line.startswith(">f") for line in first.splitlines()) == 3
    second = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert [line for line in second.splitlines() if line.startswith(">f")] == []
    assert (target / "sub/c").read_bytes() == (source / "sub/c").read_bytes()


def test_a_directory_shows_when_entries_come_and_go_and_counts_its_subdirectories(mnt_each):
    directory = mnt_each / "published/t/d"
    directory.mkdir()
    assert os.stat(directory).st_nlink == 2
    seen = [os.stat(directory).st_mtime_ns]

    def moved() -> bool:
        time.sleep(0.002)  # the database's clock must move past the last change
        seen.append(os.stat(directory).st_mtime_ns)
        return seen[-1] > seen[-2]

    time.sleep(0.01)
    (directory / "f").write_bytes(b"x")
    assert moved()
    time.sleep(0.01)
    os.unlink(directory / "f")
    assert moved()
    time.sleep(0.01)
    (directory / "sub").mkdir()
    assert moved() and os.stat(directory).st_nlink == 3
    assert os.stat(mnt_each / "published/t").st_nlink == 3
    time.sleep(0.01)
    (directory / "sub").rmdir()
    assert moved() and os.stat(directory).st_nlink == 2
    assert os.stat(mnt_each).st_nlink == 5 and os.stat(mnt_each / "published").st_nlink == 3
