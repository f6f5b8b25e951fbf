"""POSIX calls on a real mount that ordinary programs rely on: ftruncate, unlink of open files, times,
and names the daemon changed by itself (setfattr) that the kernel must not remember."""

from __future__ import annotations

import os

import pytest
from mount_helper import daemon_log, fuse_available, mounted

pytestmark = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3 (./scripts/setup)")


@pytest.fixture
def mnt(repo_config_pair, tmp_path):
    with mounted(repo_config_pair, tmp_path) as mountpoint:
        (mountpoint / "published" / "t").mkdir()
        yield mountpoint


def state(path) -> str:
    return os.getxattr(path, "user.s3repo.state").decode()


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
