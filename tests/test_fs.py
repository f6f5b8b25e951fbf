"""The FUSE layer's own additions to mfusepy (mount/fuse.py, libfuse.py, daemon.py), called as libfuse calls them."""

from __future__ import annotations

import ctypes
import errno
import logging
import os

import pytest
from repo_fixtures import make_config

from s3repofs import S3Repo
from s3repofs.mount import daemon, libfuse
from s3repofs.mount import fuse as fs
from s3repofs.mount.tree import Tree


class _Opened:
    def open(self, path, flags):
        return 7

    def keeps_pages(self, fh):
        return False

    def bypasses_pages(self, fh):
        return False


@pytest.mark.parametrize("flags, skips_flush", [(os.O_RDONLY, True), (os.O_WRONLY, False), (os.O_RDWR, False)])
def test_only_a_read_only_open_lets_the_kernel_skip_the_flush_at_close(flags, skips_flush):
    if not hasattr(fs.mfusepy.fuse_file_info, "noflush"):
        pytest.skip("this libfuse has no noflush")
    bindings = fs.FUSE.__new__(fs.FUSE)  # the method alone: no mount
    bindings.raw_fi, bindings.operations, bindings.encoding, bindings.errors = False, _Opened(), "utf-8", "strict"
    info = fs.mfusepy.fuse_file_info(flags=flags)
    assert bindings.open(b"/published/t/f", ctypes.pointer(info)) == 0
    assert info.fh == 7 and bool(info.noflush) == skips_flush


class _Generated(_Opened):
    def bypasses_pages(self, fh):  # a control file (.stats)
        return True


def test_a_control_file_is_opened_for_direct_io():
    bindings = fs.FUSE.__new__(fs.FUSE)
    bindings.raw_fi, bindings.operations, bindings.encoding, bindings.errors = False, _Generated(), "utf-8", "strict"
    info = fs.mfusepy.fuse_file_info(flags=os.O_RDONLY)
    assert bindings.open(b"/.stats", ctypes.pointer(info)) == 0
    assert (info.direct_io, info.keep_cache) == (1, 0)


ARENAS = (daemon.M_ARENA_MAX, 2)
MAPPED = (daemon.M_MMAP_THRESHOLD, 768 * 1024)
TRIMMED = (daemon.M_TRIM_THRESHOLD, 1536 * 1024)


@pytest.mark.parametrize("environment, expected", [
    ({}, [ARENAS, MAPPED, TRIMMED]),
    ({"MALLOC_ARENA_MAX": "8"}, [MAPPED, TRIMMED]),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, [MAPPED, TRIMMED]),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, [ARENAS, TRIMMED]),
    ({"MALLOC_TRIM_THRESHOLD_": "65536"}, [ARENAS, MAPPED]),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.arena_max=4"}, [TRIMMED]),
])
def test_the_daemon_tunes_malloc_unless_the_operator_chose(monkeypatch, environment, expected):
    calls = []

    class _Libc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))

    for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(daemon, "_libc", _Libc())
    daemon.tune_malloc()
    assert calls == expected


def test_threads_python_did_not_start_keep_a_bounded_number_of_thread_states(monkeypatch):
    """As libfuse's workers call back: each keeps its thread state, up to the bound, however many come and go."""
    before = libfuse._kept_states
    monkeypatch.setattr(libfuse, "KEPT_STATES_MAX", before + 3)
    libc = ctypes.CDLL(None)
    libc.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    libc.pthread_join.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
    kept = []

    @ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
    def worker(_argument):
        libfuse._keep_thread_state()
        libfuse._keep_thread_state()  # a second call on the same thread keeps nothing more
        kept.append(getattr(libfuse._thread_state, "kept", False))
        return None

    for _ in range(6):  # one after another: each thread exits, and its kept state stays behind
        thread = ctypes.c_ulong()
        assert libc.pthread_create(ctypes.byref(thread), None, ctypes.cast(worker, ctypes.c_void_p), None) == 0
        assert libc.pthread_join(thread.value, None) == 0
    assert kept == [True, True, True, False, False, False]
    assert libfuse._kept_states == before + 3


def test_errors_of_callers_are_logged_at_info_or_below_with_their_errno(request, tmp_path, caplog):
    """A file too large for the disk (EFBIG), a lifecycle refusal (EROFS, EPERM) and a miss (ENOENT) are
    the caller's business: one line each, below WARNING, and no traceback-like ``[Errno N]`` text."""
    repo = S3Repo(make_config(request, tmp_path, "sqlite-local"))
    repo.create_repository()
    operations = fs.Operations(Tree(repo, metadata_ttl=3600))
    operations.tree.mkdir("/published/t", 0o755, 0, 0)
    repo.add_file(path="t/f").touch(b"v1").publish()
    repo.add_file(path="t/g").touch(b"v1").publish().expire()
    caplog.set_level(logging.DEBUG, logger="s3repofs.mount")
    refusals = [
        (errno.EFBIG, lambda: operations.truncate("/published/t/f", 1 << 62)),  # past ext4's 16 TiB
        (errno.EROFS, lambda: operations.unlink("/expired/t/g")),
        (errno.EPERM, lambda: operations.rename("/published/t/f", "/expired/t/h")),
        (errno.ENOENT, lambda: operations.getattr("/published/t/missing")),
    ]
    for number, call in refusals:
        with pytest.raises(fs.mfusepy.FuseOSError) as info:
            call()
        assert info.value.errno == number
    repo.close()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "s3repofs.mount"]
    assert len(lines) == len(refusals), lines
    assert all(level < logging.WARNING and "Errno" not in text for level, text in lines), lines
    assert [text.rpartition("(")[2] for _, text in lines] == ["EFBIG)", "EROFS)", "EPERM)", "ENOENT)"]
