"""mount.fuse.s3repofs: mount(8)'s options translated (pure), then real mounts by mount(8), fstab lines, umount(8)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from mount_helper import fuse_available, s3repofs, wait_for, write_config
from repo_fixtures import make_config

import s3repofs as package
from s3repofs import config as config_module
from s3repofs.cli import mounthelper
from s3repofs.cli.mount import MOUNT_OPTIONS, parse_options
from s3repofs.cli.mounthelper import resolve_source, translate_options, with_fsname
from s3repofs.errors import ConfigError, UsageError

HELPER = Path("/sbin/mount.fuse.s3repofs")  # mount(8) looks for helpers in /sbin only, whatever PATH says
CHECKOUT = Path(package.__file__).resolve().parents[1]


# --- option translation, without mounting ---

def test_mount8_and_systemd_options_are_dropped_ours_taken_fuse_kept():
    options = translate_options("rw,nosuid,_netdev,allow_other,config=/etc/s3repofs/prod.json,x-systemd.automount,"
                                "x-systemd.requires=network-online.target,nofail,noauto,auto,defaults,user,users,"
                                "owner,group,comment=systemd.wanted,relatime,uid=1000,gid=1000,log=/var/log/s3.log")
    assert options.config == "/etc/s3repofs/prod.json"
    assert options.log == "/var/log/s3.log"
    assert options.mount_options == "rw,nosuid,allow_other,uid=1000,gid=1000"
    assert set(options.dropped) == {"_netdev", "x-systemd.automount", "x-systemd.requires=network-online.target",
                                    "nofail", "noauto", "auto", "defaults", "user", "users", "owner", "group",
                                    "comment=systemd.wanted", "relatime"}
    assert parse_options(options.mount_options) == {"rw": True, "nosuid": True, "allow_other": True,
                                                    "uid": "1000", "gid": "1000"}


def test_an_unknown_option_is_passed_on_and_refused_in_one_line_unless_sloppy():
    options = translate_options("ro,bogus=1")
    assert options.mount_options == "ro,bogus=1"
    with pytest.raises(UsageError, match="unknown mount option 'bogus'"):
        parse_options(options.mount_options)
    sloppy = translate_options("ro,bogus=1,_netdev", sloppy=True)
    assert sloppy.mount_options == "ro" and sloppy.dropped == ("bogus=1", "_netdev")


def test_option_values_are_checked():
    with pytest.raises(UsageError, match="'config' needs a value"):
        translate_options("config=")
    with pytest.raises(UsageError, match="'uid' needs a value"):
        parse_options("uid")
    with pytest.raises(UsageError, match="'ro' takes no value"):
        parse_options("ro=1")


def test_fsname_is_the_source_unless_given_or_unsayable():
    assert with_fsname("ro", "prod") == "ro,fsname=prod"
    assert with_fsname("", "/etc/s3repofs/prod.json") == "fsname=/etc/s3repofs/prod.json"
    assert with_fsname("fsname=mine", "prod") == "fsname=mine"
    assert with_fsname("ro", "a,b") == "ro"


@pytest.fixture
def config_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG_DIR", tmp_path / "etc")
    (tmp_path / "xdg" / "s3repofs").mkdir(parents=True)
    return tmp_path / "xdg" / "s3repofs"


def test_source_is_a_file_a_name_or_the_default(config_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (config_dirs / "prod.json").write_text("{}")
    (tmp_path / "here.json").write_text("{}")
    assert resolve_source("prod") == str(config_dirs / "prod.json")
    assert resolve_source("here.json") == str(tmp_path / "here.json")  # absolute: the daemon must not need the cwd
    assert resolve_source("default") is None and resolve_source("s3repofs") is None
    (config_dirs / "default.json").write_text("{}")
    assert resolve_source("default") == str(config_dirs / "default.json")  # a config of that name wins
    with pytest.raises(ConfigError, match="no config named 'nope'"):
        resolve_source("nope")


def test_errors_are_one_line_with_mount8s_exit_statuses(config_dirs, tmp_path, capsys):
    config = write_config({"local_root": str(tmp_path / "root"), "object_dir": str(tmp_path / "objects")},
                          tmp_path / "c.json")
    (tmp_path / "mnt").mkdir()
    cases = [
        (["only-a-source"], 1, "the following arguments are required: MOUNTPOINT"),
        ([str(config), str(tmp_path / "mnt"), "-o", "bogus"], 1, "unknown mount option 'bogus'"),
        ([str(config), str(tmp_path / "mnt"), "-N", "/proc/1/ns/mnt"], 1, "-N (mount in another namespace)"),
        (["nope", str(tmp_path / "mnt")], 32, "no config named 'nope'"),
        ([str(config), str(tmp_path / "missing")], 32, "does not exist"),
    ]
    for argv, status, message in cases:
        assert mounthelper.main(argv) == status, argv
        err = capsys.readouterr().err
        assert err.startswith("mount.fuse.s3repofs: ") and message in err and err.count("\n") == 1, err
    assert mounthelper.main([str(config), str(tmp_path / "mnt"), "-f", "-o", "ro,_netdev"]) == 0  # -f: fake
    assert not os.path.ismount(tmp_path / "mnt")


# --- real mounts by mount(8) and fstab lines, unmounted by umount(8) ---

real_mount = pytest.mark.skipif(not fuse_available() or os.geteuid() != 0,
                                reason="needs /dev/fuse, fusermount3 (./scripts/setup) and root (for mount(8))")


@pytest.fixture
def helper_installed():
    if not os.access(HELPER, os.X_OK):
        pytest.fail(f"{HELPER} is missing: mount(8) finds its helpers only in /sbin; run ./scripts/setup")


def run(*command: str) -> subprocess.CompletedProcess:
    # mount(8) resets PATH for its helper but passes PYTHONPATH on: the helper runs the code under test.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(CHECKOUT), os.environ.get("PYTHONPATH"))))}
    # From / : mount(8) makes a SOURCE that names a file in its cwd (this checkout's s3repofs/) a path.
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd="/")


def in_mount_table(mountpoint: Path) -> list[str] | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mountpoint):
            return fields
    return None


def exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@contextmanager
def mounted_by(command: list[str], mountpoint: Path, log: Path):
    """Run mount(8); after the test, wait for the daemon to exit and check its log. The test unmounts with
    umount(8) itself; a failed test's mount is cleaned up here."""
    result = run(*command)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
    pid = int(re.search(rf"\[(\d+)\]: mounted {mountpoint}:", log.read_text()).group(1))
    if "-v" in command:
        assert f"mounted {mountpoint} (daemon pid {pid}, log {log}" in result.stdout
    try:
        yield pid
    finally:
        if in_mount_table(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        assert wait_for(lambda: exited(pid), timeout=60), f"the daemon {pid} did not exit"
        text = log.read_text()
        assert "Traceback" not in text, f"the daemon logged a traceback:\n{text}"
        assert f"unmounted {mountpoint}" in text


def umount(mountpoint: Path) -> None:
    # Right after a close the kernel may still hold the mount for a moment (about 1 umount in 50 here says
    # "target is busy"): umount(8) is tried again for up to 5 s, as an operator would.
    for _ in range(25):
        result = run("umount", str(mountpoint))
        if "target is busy" not in result.stderr:
            break
        time.sleep(0.2)
    assert result.returncode == 0, result.stderr
    assert in_mount_table(mountpoint) is None


@pytest.fixture
def setup_repo(helper_installed, tmp_path):
    def make(config: dict) -> tuple[Path, Path]:
        path = write_config(config, tmp_path / "c.json")
        s3repofs("init", "--config", str(path))
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        return path, mountpoint
    return make


@real_mount
def test_mount_t_fuse_s3repofs_then_umount(repo_config_pair, setup_repo, tmp_path):
    config, mountpoint = setup_repo(repo_config_pair)
    log = tmp_path / "daemon.log"
    options = f"rw,nosuid,nodev,noatime,_netdev,nofail,x-systemd.requires=network-online.target,comment=t,log={log}"
    command = ["mount", "-v", "-t", "fuse.s3repofs", str(config), str(mountpoint), "-o", options]
    with mounted_by(command, mountpoint, log):
        source, _, fstype, mount_options = in_mount_table(mountpoint)[:4]
        assert (source, fstype) == (str(config), "fuse.s3repofs")
        assert "rw" in mount_options.split(",") and "allow_other" not in mount_options  # allow_other is opt-in
        (mountpoint / "published" / "docs").mkdir()
        (mountpoint / "published" / "docs" / "a.txt").write_bytes(b"through mount(8)")
        assert (mountpoint / "published" / "docs" / "a.txt").read_bytes() == b"through mount(8)"
        umount(mountpoint)
    assert s3repofs("cat", "docs/a.txt", "--config", str(config)).stdout == "through mount(8)"


@real_mount
def test_an_fstab_line_mounts_and_mount_a_sees_it_mounted(request, setup_repo, tmp_path):
    config, mountpoint = setup_repo(make_config(request, tmp_path, "sqlite-local"))
    log = tmp_path / "daemon.log"
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# an fstab of the test's, never /etc/fstab\ns3repofs {mountpoint} fuse.s3repofs "
                     f"_netdev,allow_other,config={config},x-systemd.automount,nofail,ro,log={log} 0 0\n")
    with mounted_by(["mount", "-v", "--fstab", str(fstab), str(mountpoint)], mountpoint, log):
        source, _, fstype, mount_options = in_mount_table(mountpoint)[:4]
        assert (source, fstype) == ("s3repofs", "fuse.s3repofs")
        assert {"ro", "allow_other"} <= set(mount_options.split(","))
        assert sorted(os.listdir(mountpoint)) == ["expired", "published", "unpublished"]
        with pytest.raises(OSError) as refused:
            (mountpoint / "published" / "docs").mkdir()
        assert refused.value.errno == errno.EROFS
        again = run("mount", "--fstab", str(fstab), "-a")  # the mount table's source is fstab's: already mounted
        assert again.returncode == 0, again.stderr
        umount(mountpoint)


@real_mount
def test_mount8_reports_a_bad_option_or_config_in_one_line(request, setup_repo, tmp_path):
    config, mountpoint = setup_repo(make_config(request, tmp_path, "sqlite-local"))
    bad_option = run("mount", "-t", "fuse.s3repofs", str(config), str(mountpoint), "-o", "allow_other,bogus")
    assert bad_option.returncode == 1
    assert bad_option.stderr.startswith("mount.fuse.s3repofs: unknown mount option 'bogus'")
    assert bad_option.stderr.count("\n") == 1
    no_config = run("mount", "-t", "fuse.s3repofs", "no-such-config", str(mountpoint))
    assert no_config.returncode == 32 and "no config named 'no-such-config'" in no_config.stderr
    assert in_mount_table(mountpoint) is None


@real_mount
def test_mount_fuse3_calls_the_helper_the_same_way(request, setup_repo, tmp_path):
    config, mountpoint = setup_repo(make_config(request, tmp_path, "sqlite-local"))
    log = tmp_path / "daemon.log"
    command = ["mount", "-t", "fuse", f"mount.fuse.s3repofs#{config}", str(mountpoint), "-o", f"_netdev,log={log}"]
    with mounted_by(command, mountpoint, log):
        assert in_mount_table(mountpoint)[:3] == [str(config), str(mountpoint), "fuse.s3repofs"]
        umount(mountpoint)


def test_s3repofs_mount_refuses_an_unknown_option_in_one_line(tmp_path):
    (tmp_path / "mnt").mkdir()
    result = s3repofs("mount", str(tmp_path / "mnt"), "-o", "allow_other,bogus", check=False)
    assert result.returncode == 2 and result.stderr == f"s3repofs: unknown mount option 'bogus' (known: " \
        f"{', '.join(sorted(MOUNT_OPTIONS))})\n"
