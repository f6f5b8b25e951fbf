"""Adding a local file by copy or by move (repo.add_file(source=, move=), `s3repofs add --move`):
a move on one file system is a rename, across file systems a copy then an unlink, and nothing is lost
if the process dies at any step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from test_cli import assert_clean_failure, config_file, run  # noqa: F401 (config_file: a fixture)

from s3repofs import S3Repo
from s3repofs.domain.lifecycle import State, Storage
from s3repofs.errors import NotFoundError, TransientStoreError, UsageError
from s3repofs.local.intake import CannotMoveError
from s3repofs.ops import copy as copy_ops

SHM = Path("/dev/shm")
WORKTREE = str(Path(__file__).resolve().parents[1])
MTIME_NS = 1_700_000_000_123_456_789


def make_source(directory: Path, data: bytes, mode: int = 0o640) -> Path:
    source = directory / f"src-{uuid.uuid4().hex}.bin"
    source.write_bytes(data)
    source.chmod(mode)
    os.utime(source, ns=(MTIME_NS, MTIME_NS))
    return source


@pytest.fixture
def shm_dir():
    """A directory on another file system than the test's (tmpfs)."""
    directory = SHM / f"s3repofs-test-{uuid.uuid4().hex}"
    directory.mkdir()
    yield directory
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


def staged_files(repo: S3Repo) -> list[str]:
    return list(repo.cache.staged_keys())


def test_add_file_copies_source_keeping_mode_and_mtime(repo, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 7)
    source = make_source(tmp_path, data, 0o640)
    rf = repo.add_file("raw/a/copy.bin", source=source)
    assert source.read_bytes() == data
    assert rf.version.mode == 0o640 and rf.version.mtime_ns == MTIME_NS
    assert rf.read_bytes() == data
    rf.publish()
    published = repo.require_file("raw/a/copy.bin")
    assert published.read_bytes() == data and published.version.mtime_ns == MTIME_NS


def test_move_on_one_file_system_is_a_rename(repo, tmp_path):
    data = os.urandom(100_000)
    source = make_source(tmp_path, data)
    inode = source.stat().st_ino
    rf = repo.add_file("raw/moved.bin", source=source, move=True)
    assert not source.exists()
    staged = repo.staged_path(rf.version)
    assert staged.stat().st_ino == inode  # the same file: no byte copied
    assert rf.version.mtime_ns == MTIME_NS and rf.version.mode == 0o640
    rf.publish()
    assert repo.require_file("raw/moved.bin").read_bytes() == data


def test_move_across_file_systems_copies_then_unlinks(repo, tmp_path, shm_dir):
    data = os.urandom(200_000)
    source = make_source(shm_dir, data)
    assert source.stat().st_dev != (tmp_path / "root").stat().st_dev
    inode = source.stat().st_ino
    rf = repo.add_file("raw/across.bin", source=source, move=True)
    assert not source.exists()
    assert repo.staged_path(rf.version).stat().st_ino != inode
    assert rf.read_bytes() == data and rf.version.mtime_ns == MTIME_NS
    rf.publish()
    assert repo.require_file("raw/across.bin").read_bytes() == data


def test_a_source_with_other_names_is_copied_not_renamed(repo, tmp_path):
    source = make_source(tmp_path, b"linked")
    other = tmp_path / "other-name"
    os.link(source, other)
    rf = repo.add_file("raw/linked.bin", source=source, move=True)
    assert not source.exists() and other.read_bytes() == b"linked"
    assert repo.staged_path(rf.version).stat().st_ino != other.stat().st_ino
    with open(other, "ab") as f:  # a write through the other name does not change the version
        f.write(b"!")
    assert rf.read_bytes() == b"linked"


@pytest.mark.parametrize("move", [False, True])
def test_sources_that_are_not_regular_files_are_refused_before_anything(repo, tmp_path, move):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(make_source(tmp_path, b"x"))
    with pytest.raises(UsageError, match="is a directory"):
        repo.add_file("raw/d", source=tmp_path, move=move)
    with pytest.raises(UsageError, match="not a regular file"):
        repo.add_file("raw/f", source=fifo, move=move)
    with pytest.raises(NotFoundError, match="no such local file"):
        repo.add_file("raw/m", source=tmp_path / "missing", move=move)
    if move:
        with pytest.raises(UsageError, match="symbolic link"):
            repo.add_file("raw/l", source=link, move=True)
        assert link.exists()
    else:
        assert repo.add_file("raw/l", source=link).read_bytes() == b"x"
    assert [rf.path for rf in repo.list_files(states=list(State))] == ([] if move else ["raw/l"])


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a read-only bind mount: not even root can unlink a file in it."""
    writable, read_only = tmp_path / "rw", tmp_path / "ro"
    writable.mkdir()
    read_only.mkdir()
    source = make_source(writable, b"stuck")
    subprocess.run(["mount", "--bind", str(writable), str(read_only)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(read_only)], check=True)
        yield read_only / source.name
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


def test_a_move_of_a_file_that_cannot_be_unlinked_is_refused_before_anything(repo, read_only_dir):
    with pytest.raises(CannotMoveError, match="cannot move it .*nothing was done"):
        repo.add_file("raw/stuck.bin", source=read_only_dir, move=True)
    assert repo.list_files(states=list(State)) == [] and staged_files(repo) == []
    assert repo.add_file("raw/stuck.bin", source=read_only_dir).read_bytes() == b"stuck"  # a copy is fine


def failing_put(*args, **kwargs):
    raise TransientStoreError("the store is down (injected)")


@pytest.mark.parametrize("where", ["same-fs", "cross-fs"])
def test_a_move_whose_upload_fails_is_undone(repo_config_pair, tmp_path, shm_dir, monkeypatch, where):
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        data = os.urandom(50_000)
        source = make_source(tmp_path if where == "same-fs" else shm_dir, data)
        inode = source.stat().st_ino
        monkeypatch.setattr(repo.store, "put", failing_put)
        with pytest.raises(TransientStoreError, match="nothing was moved: .* is where it was"):
            copy_ops.add(repo, source, "raw/fails.bin", move=True)
        assert source.read_bytes() == data and source.stat().st_ino == inode
        assert [rf.state for rf in repo.list_files(states=list(State))] == [State.DISCARDED]
        assert staged_files(repo) == []


def test_a_failed_move_whose_source_name_was_taken_keeps_the_bytes_staged(repo, tmp_path, monkeypatch):
    source = make_source(tmp_path, b"keep me")

    def put_then_take_the_name(*args, **kwargs):
        source.write_bytes(b"someone else's")
        failing_put()

    monkeypatch.setattr(repo.store, "put", put_then_take_the_name)
    with pytest.raises(TransientStoreError, match="not undone .* keeps the bytes staged at"):
        copy_ops.add(repo, source, "raw/taken.bin", move=True)
    (version,) = [rf.version for rf in repo.list_files(states=list(State))]
    assert (version.state, version.storage) == (State.UNPUBLISHED, Storage.LOCAL)
    assert repo.staged_path(version).read_bytes() == b"keep me"
    monkeypatch.undo()
    assert repo.retry_staged_uploads() == 1
    assert repo.get_version(version.id).read_bytes() == b"keep me"


# -- a crash between any two steps loses nothing ---------------------------------------------------

# The child adds by move through ops.copy.add (the command's path) and dies (os._exit, as a kill -9
# does) at the step named: before or after each thing a move does.
CRASH_CHILD = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from s3repofs import S3Repo, repo as repo_module
    from s3repofs.local import intake
    from s3repofs.ops import copy as copy_ops

    config, source, point = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def die_around(owner, name, when):
        real = getattr(owner, name)
        def wrapper(*args, **kwargs):
            if when == "before":
                os._exit(9)
            result = real(*args, **kwargs)
            os._exit(9)
        setattr(owner, name, wrapper)

    when, name = point.split(":")
    repo = S3Repo(config)
    owners = {"rename_in": repo_module, "copy_in": repo_module, "unlink_source": intake.Intake,
              "insert_version": repo.meta, "put": repo.store, "mark_uploaded": repo.meta}
    die_around(owners[name], name, when)
    copy_ops.add(repo, source, "raw/crash.bin", move=True)
    os._exit(0)
""")

CRASH_POINTS = ["before:insert_version", "after:insert_version", "before:rename_in", "after:rename_in",
                "after:copy_in", "after:put", "after:mark_uploaded", "before:unlink_source"]


@pytest.mark.parametrize("where", ["same-fs", "cross-fs"])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_at_any_step_of_a_move_loses_nothing(repo_config_pair, tmp_path, shm_dir, where, point):
    if where == "same-fs" and point == "after:copy_in" or where == "cross-fs" and point.endswith("rename_in"):
        pytest.skip("a step this move does not take")
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
    data = os.urandom(300_000)
    source = make_source(tmp_path if where == "same-fs" else shm_dir, data)
    child = subprocess.run([sys.executable, "-c", CRASH_CHILD, json.dumps(repo_config_pair), str(source), point],
                           capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": WORKTREE})
    assert child.returncode == 9, child.stderr.decode()

    with S3Repo(repo_config_pair) as repo:
        repo.ensure_ready()
        versions = [rf.version for rf in repo.list_files(states=list(State))]
        at_source = source.exists() and source.read_bytes() == data
        repo.retry_staged_uploads()  # what a mount on this host does with what a crash left
        kept = [repo.get_version(v.id) for v in versions]
        in_repo = [rf for rf in kept if rf.storage == Storage.UPLOADED and rf.read_bytes() == data]
        assert at_source or in_repo, (point, versions)


# -- the command ------------------------------------------------------------------------------------

def test_add_move_prints_json_and_removes_the_source(config_file, tmp_path, shm_dir):  # noqa: F811
    for directory in (tmp_path, shm_dir):
        data = os.urandom(10_000)
        source = make_source(directory, data)
        added = run("add", "--move", "--json", "--publish", str(source), "raw/", config=config_file)
        assert added.returncode == 0, added.stderr
        info = json.loads(added.stdout)
        assert (info["path"], info["state"], info["size"], info["mode"]) == (f"raw/{source.name}", "published",
                                                                            10_000, 0o640)
        assert not source.exists()
        assert run("cat", info["path"], config=config_file).stdout == data


def test_add_refuses_bad_sources_in_one_line(config_file, tmp_path, read_only_dir):  # noqa: F811
    assert_clean_failure(run("add", str(tmp_path), "raw/x", config=config_file), 2, "is a directory")
    assert_clean_failure(run("add", str(tmp_path / "nope"), "raw/x", config=config_file), 3, "no such local file")
    assert_clean_failure(run("add", "--move", str(read_only_dir), "raw/x", config=config_file), 1,
                         "cannot move it", "nothing was done")
    assert json.loads(run("ls", "--state", "all", "--json", config=config_file).stdout) == []
