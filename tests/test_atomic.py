"""Atomic file replacement: the new contents or the old, never a mix, and durable when asked."""

from __future__ import annotations

import os

import pytest

from s3repofs.local.atomic import atomic_write


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on, in order."""
    paths: list[str] = []
    real = os.fsync

    def recording_fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return paths


def test_the_new_contents_replace_the_old(tmp_path):
    target = tmp_path / "file"
    target.write_bytes(b"old")
    written = atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents" and written.st_size == len(b"new contents")
    atomic_write(target, lambda f: f.write(b"from a writer"))
    assert target.read_bytes() == b"from a writer"
    assert os.listdir(tmp_path) == ["file"]


def test_a_new_file_gets_the_mode_less_the_umask(tmp_path):
    atomic_write(tmp_path / "private", b"x", mode=0o600)
    assert os.stat(tmp_path / "private").st_mode & 0o777 == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "file"
    target.write_bytes(b"old")

    def failing(f):
        f.write(b"half of it")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["file"]


def test_a_durable_write_fsyncs_the_file_then_its_directory(tmp_path, fsynced):
    target = tmp_path / "file"
    atomic_write(target, b"data")
    assert len(fsynced) == 2
    assert os.path.dirname(fsynced[0]) == str(tmp_path) and fsynced[0] != str(target)  # the temp file
    assert fsynced[1] == str(tmp_path)  # after the rename


def test_a_write_that_need_not_be_durable_fsyncs_nothing(tmp_path, fsynced):
    atomic_write(tmp_path / "file", b"data", durable=False)
    assert fsynced == [] and (tmp_path / "file").read_bytes() == b"data"
