"""The mounted tree, used with os calls and ordinary tools: every row of DESIGN.md's semantics table."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
from mount_helper import daemon_log, fuse_available, mounted, s3repofs, wait_for, write_config
from repo_fixtures import make_config

pytestmark = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3 (./scripts/setup)")


@pytest.fixture
def mnt(repo_config_pair, tmp_path):
    with mounted(repo_config_pair, tmp_path) as mountpoint:
        (mountpoint / "published" / "docs").mkdir()
        yield mountpoint


def xattrs(path) -> dict:
    return {name: os.getxattr(path, name).decode() for name in os.listxattr(path)}


def test_top_level_shows_the_three_states(mnt):
    assert sorted(os.listdir(mnt)) == ["expired", "published", "unpublished"]
    assert os.listdir(mnt / "published") == ["docs"]
    assert os.listdir(mnt / "expired") == ["docs"]


def test_cp_into_published_publishes_on_close(mnt, tmp_path):
    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(300_000))
    subprocess.run(["cp", str(source), str(mnt / "published/docs/data.bin")], check=True)
    target = mnt / "published/docs/data.bin"
    assert target.read_bytes() == source.read_bytes()
    attrs = xattrs(target)
    assert attrs["user.s3repo.state"] == "published"
    assert attrs["user.s3repo.md5"] == hashlib.md5(source.read_bytes()).hexdigest()
    assert attrs["user.s3repo.size"] == "300000"
    listing = subprocess.run(["ls", "-l", str(mnt / "published/docs")], capture_output=True, text=True, check=True)
    assert "300000" in listing.stdout and "data.bin" in listing.stdout
    dump = subprocess.run(["getfattr", "-d", str(target)], capture_output=True, text=True, check=True)
    assert "user.s3repo.s3_key=" in dump.stdout and "user.s3repo.origin_host=" in dump.stdout


def test_overwrite_then_read_at_once_never_serves_stale_bytes(mnt):
    path = mnt / "published/docs/f.txt"
    for content in (b"aaaa", b"bbbb", b"cc", b"dddddddd", b"eeeeeeee"):
        path.write_bytes(content)
        assert path.read_bytes() == content
        assert os.stat(path).st_size == len(content)


def test_an_open_handle_keeps_reading_the_version_it_opened(mnt):
    path = mnt / "published/docs/f.txt"
    path.write_bytes(b"old version")
    with open(path, "rb") as reader:
        path.write_bytes(b"new version!")
        assert reader.read() == b"old version"
    assert path.read_bytes() == b"new version!"


def test_write_in_unpublished_then_mv_publishes(mnt):
    staged = mnt / "unpublished/docs/draft.txt"
    staged.write_text("draft")
    assert not (mnt / "published/docs/draft.txt").exists()
    assert xattrs(staged)["user.s3repo.state"] == "unpublished"
    os.rename(staged, mnt / "published/docs/final.txt")
    assert (mnt / "published/docs/final.txt").read_text() == "draft"
    assert not staged.exists()


def test_rm_expires_and_mv_back_republishes(mnt):
    path = mnt / "published/docs/f.txt"
    path.write_text("v1")
    os.unlink(path)
    assert not path.exists()
    assert (mnt / "expired/docs/f.txt").read_text() == "v1"
    os.rename(mnt / "expired/docs/f.txt", path)
    assert path.read_text() == "v1"


def test_republishing_an_expired_version_expires_the_current_one(mnt):
    path = mnt / "published/docs/f.txt"
    path.write_text("v1")
    path.write_text("v2")
    assert (mnt / "expired/docs/f.txt").read_text() == "v1"
    os.rename(mnt / "expired/docs/f.txt", path)
    assert path.read_text() == "v1"
    assert (mnt / "expired/docs/f.txt").read_text() == "v2"


def test_setfattr_publishes_and_expires(mnt):
    staged = mnt / "unpublished/docs/x.txt"
    staged.write_text("x")
    subprocess.run(["setfattr", "-n", "user.s3repo.state", "-v", "published", str(staged)], check=True)
    published = mnt / "published/docs/x.txt"
    assert published.read_text() == "x"
    os.setxattr(published, "user.s3repo.state", b"expired")
    assert not published.exists() and (mnt / "expired/docs/x.txt").exists()


def test_rm_in_unpublished_discards(mnt):
    staged = mnt / "unpublished/docs/x.txt"
    staged.write_text("x")
    os.unlink(staged)
    assert not staged.exists()
    assert not (mnt / "expired/docs/x.txt").exists()


def test_writing_over_a_staged_path_replaces_it(mnt):
    staged = mnt / "unpublished/docs/x.txt"
    staged.write_text("one")
    staged.write_text("two")
    assert staged.read_text() == "two"


def test_append_to_a_published_file_makes_a_new_version(mnt):
    path = mnt / "published/docs/log.txt"
    path.write_text("line 1\n")
    version = xattrs(path)["user.s3repo.version"]
    with open(path, "a") as f:
        f.write("line 2\n")
    assert path.read_text() == "line 1\nline 2\n"
    assert xattrs(path)["user.s3repo.version"] != version
    assert (mnt / "expired/docs/log.txt").read_text() == "line 1\n"


def test_mkdir_p_and_rmdir(mnt, tmp_path):
    deep = mnt / "published/docs/2026/11"
    os.makedirs(deep)
    (deep / "a.txt").write_text("a")
    assert os.listdir(mnt / "published/docs") == ["2026"]
    with pytest.raises(OSError) as info:
        os.rmdir(deep)
    assert info.value.errno == errno.ENOTEMPTY
    os.makedirs(mnt / "published/docs/empty")
    os.rmdir(mnt / "published/docs/empty")
    assert not (mnt / "published/docs/empty").exists()
    os.mkdir(mnt / "published/newtype")
    assert "newtype" in os.listdir(mnt / "unpublished")


def test_chmod_and_chown_are_stored(mnt):
    path = mnt / "published/docs/secret.txt"
    path.write_text("s")
    os.chmod(path, 0o600)
    os.chown(path, 1234, 5678)
    st = os.stat(path)
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 1234, 5678)


def test_refused_operations_get_the_right_errno(mnt):
    path = mnt / "published/docs/f.txt"
    path.write_text("x")
    os.unlink(path)
    expired = mnt / "expired/docs/f.txt"
    with pytest.raises(OSError) as info:
        os.open(expired, os.O_WRONLY)
    assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    (mnt / "published/docs/g.txt").write_text("g")
    with pytest.raises(OSError) as info:
        os.link(mnt / "published/docs/g.txt", mnt / "published/docs/h.txt")
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        (mnt / "published/loose.txt").write_text("no type")
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        os.rename(mnt / "published/docs/g.txt", mnt / "unpublished/docs/g.txt")
    assert info.value.errno == errno.EPERM


def test_df_and_rsync_work(mnt, tmp_path):
    subprocess.run(["df", str(mnt)], check=True, capture_output=True)
    source = tmp_path / "tree"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("a")
    (source / "sub/b.txt").write_text("b" * 10000)
    subprocess.run(["rsync", "-a", f"{source}/", str(mnt / "published/docs/tree/")], check=True)
    assert (mnt / "published/docs/tree/a.txt").read_text() == "a"
    assert (mnt / "published/docs/tree/sub/b.txt").read_text() == "b" * 10000
    assert sorted(os.listdir(mnt / "published/docs/tree")) == ["a.txt", "sub"]


def test_a_published_file_survives_a_remount_with_an_empty_cache(repo_config_pair, tmp_path):
    data = os.urandom(2_000_000)
    with mounted(repo_config_pair, tmp_path) as mnt:
        os.mkdir(mnt / "published/raw")
        (mnt / "published/raw/blob").write_bytes(data)
    shutil.rmtree(tmp_path / "root" / "cache")
    with mounted(repo_config_pair, tmp_path) as mnt:
        assert (mnt / "published/raw/blob").read_bytes() == data


def test_mount_refuses_bad_mountpoints(repo_config_pair, tmp_path):
    config = str(write_config(repo_config_pair, tmp_path / "c.json"))
    s3repofs("init", "--config", config)
    missing = s3repofs("mount", str(tmp_path / "nope"), "--config", config, check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    busy = s3repofs("mount", str(full), "--config", config, check=False)
    assert busy.returncode != 0 and "not empty" in busy.stderr
    with mounted(repo_config_pair, tmp_path) as mnt:
        twice = s3repofs("mount", str(mnt), "--config", config, check=False)
        assert twice.returncode != 0 and "already a mountpoint" in twice.stderr
        assert "Traceback" not in twice.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_mount_the_kernel_refuses_is_one_line_that_names_the_missing_privilege(request, tmp_path):
    config = str(write_config(make_config(request, tmp_path, "sqlite-local"), tmp_path / "c.json"))
    s3repofs("init", "--config", config)
    (tmp_path / "mnt").mkdir()
    log = tmp_path / "mount.log"
    # No capabilities, and no way to gain them through the setuid fusermount3: the mount(2) fails.
    refused = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", sys.executable,
                              "-m", "s3repofs", "mount", str(tmp_path / "mnt"), "--config", config, "--log", str(log)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "CAP_SYS_ADMIN" in refused.stderr, refused.stderr
    assert "internal error" not in refused.stderr and "Traceback" not in log.read_text()
    assert not os.path.ismount(tmp_path / "mnt")


def test_two_mounts_of_one_repository_see_each_other(request, tmp_path):
    first = {**make_config(request, tmp_path / "a", "postgres-s3"), "metadata_ttl": 1.0}
    second = {**first, "local_root": str(tmp_path / "b" / "root"), "host_name": "second-host"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with mounted(first, tmp_path / "a") as one, mounted(second, tmp_path / "b") as two:
        os.mkdir(one / "published/shared")
        data = os.urandom(100_000)
        (one / "published/shared/f.bin").write_bytes(data)
        seen = wait_for(lambda: (two / "published/shared/f.bin").exists(), timeout=1.5)
        assert seen, "the second mount did not see the publish within the metadata TTL"
        assert (two / "published/shared/f.bin").read_bytes() == data
        os.unlink(two / "published/shared/f.bin")
        assert wait_for(lambda: (one / "expired/shared/f.bin").exists(), timeout=1.5)
        assert wait_for(lambda: not (one / "published/shared/f.bin").exists(), timeout=1.5)
        assert (two / "expired/shared/f.bin").exists()


def test_failed_upload_returns_eio_keeps_the_bytes_and_retries(request, tmp_path):
    from servers import start_s3_server

    server = start_s3_server(tmp_path / "s3")
    server.create_bucket("flaky-bucket")
    config = {**make_config(request, tmp_path, "sqlite-local"), "object_dir": None}
    config.pop("object_dir")
    config.update(default_s3_bucket="flaky-bucket", s3_endpoint_url=server.endpoint_url, s3_access_key="testing",
                  s3_secret_key="testing")
    try:
        with mounted(config, tmp_path) as mnt:
            os.mkdir(mnt / "published/docs")
            server.stop()
            fd = os.open(mnt / "published/docs/f.txt", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"precious")
            with pytest.raises(OSError) as info:
                os.close(fd)
            assert info.value.errno == errno.EIO
            assert (mnt / "unpublished/docs/f.txt").read_bytes() == b"precious"
            # the failed writer's path disappears from published/ once the kernel releases the handle
            assert wait_for(lambda: not (mnt / "published/docs/f.txt").exists())
            assert "will retry" in daemon_log(tmp_path)
    finally:
        server.stop()


@contextmanager
def small_disk(path, size: str = "20m"):
    """A tmpfs of ``size`` at ``path``: a disk that fills up quickly."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path) -> None:
    """Write ``path`` until its disk is full."""
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while f.write(bytes(1 << 20)):
                pass


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_full_local_disk_reports_enospc_at_close_and_create_never_eio(request, tmp_path):
    """The embedded default's layout: staging, cache, object directory and SQLite on one small disk."""
    with small_disk(tmp_path / "disk") as disk:
        config = {**make_config(request, tmp_path, "sqlite-local"), "local_root": str(disk / "root"),
                  "object_dir": str(disk / "objects"), "database": f"sqlite:///{disk / 'repo.db'}"}
        with mounted(config, tmp_path) as mnt:
            os.mkdir(mnt / "published/t")
            fd = os.open(mnt / "published/t/big", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, os.urandom(12 << 20))  # fits in staging, but its copy in the object directory does not
            with pytest.raises(OSError) as info:
                os.close(fd)
            assert info.value.errno == errno.ENOSPC
            assert os.stat(mnt / "unpublished/t/big").st_size == 12 << 20  # kept for the retry
            fill(disk / "filler")
            failures = set()
            for i in range(20):
                try:
                    (mnt / f"published/t/small{i}").write_bytes(b"x" * 4096)
                except OSError as exc:
                    failures.add(exc.errno)
            assert failures == {errno.ENOSPC}
            os.unlink(disk / "filler")
            (mnt / "published/t/later").write_bytes(b"x" * 4096)  # space is back
            assert (mnt / "published/t/later").read_bytes() == b"x" * 4096
        assert "(EIO)" not in daemon_log(tmp_path)


def test_truncate_makes_a_new_published_version(mnt):
    path = mnt / "published/docs/t.txt"
    path.write_text("0123456789")
    os.truncate(path, 4)
    assert path.read_text() == "0123"
    assert (mnt / "expired/docs/t.txt").read_text() == "0123456789"


def test_readers_never_see_bytes_still_being_written(mnt):
    path = mnt / "published/docs/w.txt"
    path.write_text("old")
    with open(path, "w") as writer:
        writer.write("partial new")
        writer.flush()
        assert path.read_text() == "old"
    assert path.read_text() == "partial new"


def test_mkdir_refuses_a_type_name_files_could_not_use(mnt):
    with pytest.raises(OSError) as info:
        os.mkdir(mnt / "published/bad type")
    assert info.value.errno == errno.EINVAL


def test_paths_reach_path_max_with_the_mount_point_and_no_further(mnt):
    """mkdir -p of a deep tree of random names (incompressible, some not ASCII), a file whose absolute
    path is PATH_MAX - 1 bytes, and ENAMETOOLONG from the daemon one byte further (through a directory
    descriptor: the kernel itself refuses a longer absolute path)."""
    base = os.fsencode(mnt / "published/docs")
    chance = random.Random(11)
    names = []
    while len(base) + sum(len(n) + 1 for n in names) < 4095 - 1 - 200:  # leaves the file 20 to 200 bytes
        names.append("".join(chance.choice("abcdefghijklmnopqrstuvwxyz0123456789é中") for _ in range(60)).encode())
    deep = base + b"/" + b"/".join(names)
    subprocess.run(["mkdir", "-p", deep], check=True)
    room = 4095 - len(deep) - 1  # what PATH_MAX leaves the file's name (its NUL aside)
    at_limit = deep + b"/" + b"f" * room
    with open(at_limit, "wb") as f:
        f.write(b"at the limit")
    assert open(at_limit, "rb").read() == b"at the limit"
    assert os.listdir(deep) == [b"f" * room]
    directory = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            os.open(b"g" * (room + 1), os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=directory)
        assert info.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as info:
            os.mkdir(b"g" * (room + 1), dir_fd=directory)
        assert info.value.errno == errno.ENAMETOOLONG
    finally:
        os.close(directory)


def test_a_name_that_is_not_utf8_is_refused_with_eilseq_and_a_log_line(mnt, tmp_path):
    """Names are stored as UTF-8 text (PostgreSQL TEXT holds no arbitrary bytes): other bytes are refused."""
    docs = os.fsencode(mnt / "published/docs")
    (mnt / "published/docs/good.txt").write_text("g")
    attempts = [lambda name: os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644)), os.mkdir,
                lambda name: os.rename(docs + b"/good.txt", name)]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt(docs + b"/bad\xffname")
        assert info.value.errno == errno.EILSEQ
    with pytest.raises(FileNotFoundError):  # a name the repository cannot hold does not exist
        os.stat(docs + b"/bad\xffname")
    assert os.listdir(docs) == [b"good.txt"]
    assert "invalid name b'bad\\xffname': not valid UTF-8 (names are stored as UTF-8 text) (EILSEQ)" in daemon_log(
        tmp_path)


def test_ls_l_shows_every_entry_from_the_listing_and_xattr_namespaces(mnt):
    directory = mnt / "published/docs/many"
    directory.mkdir()
    for i in range(50):
        (directory / f"f{i:02}").write_bytes(b"x" * i)
    listing = subprocess.run(["ls", "-ln", str(directory)], capture_output=True, text=True, check=True).stdout
    sizes = {line.split()[-1]: int(line.split()[4]) for line in listing.splitlines()[1:]}
    assert sizes == {f"f{i:02}": i for i in range(50)}
    with pytest.raises(OSError) as unsupported:  # tells ls and cp to stop asking: no labels, no ACLs
        os.getxattr(directory / "f01", "security.selinux")
    assert unsupported.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as absent:
        os.getxattr(directory / "f01", "user.s3repo.nothing")
    assert absent.value.errno == errno.ENODATA


def test_a_large_cold_file_downloads_in_parts_and_reads_byte_exact_anywhere(repo_config_pair, tmp_path):
    config = {**repo_config_pair, "download_part_size": 1024 * 1024}
    data = os.urandom(6 * 1024 * 1024 + 7)
    with mounted(config, tmp_path) as mnt:
        os.mkdir(mnt / "published/raw")
        (mnt / "published/raw/blob").write_bytes(data)
    shutil.rmtree(tmp_path / "root" / "cache")
    with mounted(config, tmp_path) as mnt:
        with open(mnt / "published/raw/blob", "rb") as f:  # the middle first, while parts still arrive
            f.seek(4 * 1024 * 1024 + 5)
            assert f.read(100_000) == data[4 * 1024 * 1024 + 5:][:100_000]
            f.seek(0)
            assert f.read() == data
        assert (mnt / "published/raw/blob").read_bytes() == data


def test_umount_cleans_up_after_a_daemon_that_died(repo_config_pair, tmp_path):
    import signal

    with mounted(repo_config_pair, tmp_path) as mnt:
        pid_file = next((tmp_path / "root").glob("mount-*.pid"))
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        assert wait_for(lambda: not os.path.ismount(mnt))  # ENOTCONN: the kernel still lists it
        result = s3repofs("umount", str(mnt), "--config", str(tmp_path / "mnt.json"), check=False)
        assert result.returncode == 0, result.stderr
        assert os.listdir(mnt) == []
