"""Running as a systemd service: the unit files, `s3repofs systemd install`, readiness and status through
$NOTIFY_SOCKET, a stop that loses no upload, and logs in the journal's form.

This machine's PID 1 is not systemd: the units are checked with `systemd-analyze verify`, and the service's
ExecStart runs here as systemd would run it (its command line from the installed unit, NOTIFY_SOCKET and
JOURNAL_STREAM set by the test).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from mount_helper import fuse_available, mounted, s3repofs, wait_for, write_config
from repo_fixtures import make_config

from s3repofs import S3Repo
from s3repofs.cli import journal
from s3repofs.cli import mount as mount_cli
from s3repofs.cli.main import main
from s3repofs.ops import units

UNIT_DIR = Path(__file__).resolve().parents[1] / "systemd"
# What `systemd install` picks here: /usr/local/bin/s3repofs when scripts/setup linked it to this installation
# (as in CI), else the s3repofs beside this Python.
EXECUTABLE = units.installed_executable()
needs_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3")


def install_units(dest: Path, *extra: str) -> subprocess.CompletedProcess:
    return s3repofs("systemd", "install", "--dest", str(dest), *extra)


def instance_names(directory: Path) -> list[str]:
    """Every unit in ``directory``, templates as the instance ``test``."""
    return sorted(path.name.replace("@.", "@test.") for path in directory.iterdir() if not path.name.startswith("."))


# -- the unit files and their installation -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (the systemd package)")
def test_every_unit_passes_systemd_analyze_verify(tmp_path):
    dest = tmp_path / "units"
    install_units(dest, "--config", "test")
    names = instance_names(dest)
    assert len(names) == len(list(UNIT_DIR.iterdir())) >= 7
    for name in names:
        # verify checks that each Exec*= command exists: the installed units name this Python's s3repofs.
        result = subprocess.run(["systemd-analyze", "verify", name], capture_output=True, text=True,
                                env={**os.environ, "SYSTEMD_UNIT_PATH": f"{dest}:"})
        # verify warns (an unknown key, a bad value) and still exits 0: any output is a failure.
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), name


def test_install_names_the_installation_and_the_config(tmp_path):
    dest = tmp_path / "units"
    executable = tmp_path / "venv" / "bin" / "s3repofs"  # another installation's command: the units name it
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    install = ("--config", "media", "--executable", str(executable))
    result = install_units(dest, *install)
    service = (dest / "s3repofs@.service").read_text()
    assert f"ExecStart={executable} mount --foreground --config %i -o ${{MOUNT_OPTIONS}} ${{MOUNTPOINT}}" in service
    assert "/usr/local/bin/s3repofs" not in "".join(p.read_text() for p in dest.iterdir())
    assert "What=media\n" in (dest / "mnt-s3repo.mount").read_text()
    assert "systemctl enable --now s3repofs@media.service" in result.stdout
    assert "systemctl enable --now s3repofs-backup@media.timer s3repofs-gc@media.timer" in result.stdout
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in dest.iterdir())
    again = install_units(dest, *install)  # the same units: nothing to change
    assert re.findall(r"^  (\w+) +\S+\.(?:service|timer|mount|automount)$", again.stdout, re.MULTILINE) == ["keep"] * 7


@pytest.mark.skipif(units.systemd_running(), reason="systemd runs here")
def test_install_without_systemd_running_says_so_and_reloads_nothing(tmp_path):
    result = install_units(tmp_path / "units", "--config", "media")
    assert "systemd is not running here" in result.stdout
    assert "systemctl daemon-reload\n" in result.stdout  # a command to run later, not one that was run
    assert "daemon-reload: done" not in result.stdout


def test_install_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    result = s3repofs("systemd", "install", "--dest", str(tmp_path / "units"), "--dry-run", "--json")
    plan = json.loads(result.stdout)
    assert plan["dry_run"] and plan["executable"] == EXECUTABLE and plan["source"] == str(UNIT_DIR)
    assert {u["action"] for u in plan["units"]} == {"create"} and len(plan["units"]) == 7
    assert not (tmp_path / "units").exists()


def test_install_refuses_a_config_that_cannot_name_a_unit(tmp_path):
    result = s3repofs("systemd", "install", "--dest", str(tmp_path), "--config", "/etc/s3repofs/x.json", check=False)
    assert result.returncode == 2 and "take a config NAME" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_setup_installs_the_unit_files_where_install_finds_them():
    # setup.py's arguments, without building anything: setuptools.setup replaced by a print.
    probe = ("import json, setuptools; setuptools.setup = lambda **kw: print(json.dumps(kw['data_files'])); "
             "exec(open('setup.py').read())")
    result = subprocess.run([sys.executable, "-c", probe], cwd=UNIT_DIR.parent, capture_output=True, text=True)
    (target, files), = json.loads(result.stdout)
    assert target == "share/s3repofs/systemd"
    assert sorted(Path(f).name for f in files) == sorted(p.name for p in UNIT_DIR.iterdir())


def test_an_installed_package_finds_its_units_under_its_prefix(tmp_path):
    """No checkout beside the package: the units come from <prefix>/share/s3repofs/systemd."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    shared = venv / "share/s3repofs/systemd"
    shutil.copytree(UNIT_DIR, shared)
    shutil.copytree(UNIT_DIR.parent / "s3repofs", tmp_path / "site/s3repofs")
    python = venv / "bin/python"
    (venv / "bin/s3repofs").write_text(f"#!{python}\nfrom s3repofs.cli import main\nraise SystemExit(main())\n")
    (venv / "bin/s3repofs").chmod(0o755)
    result = subprocess.run([str(python), "-m", "s3repofs", "systemd", "install", "--dest", str(tmp_path / "u")],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert result.returncode == 0, result.stderr
    assert f"units from {shared} to" in result.stdout
    assert f"ExecStart={venv}/bin/s3repofs mount" in (tmp_path / "u/s3repofs@.service").read_text()


# -- logs ----------------------------------------------------------------------------------------------


def test_journal_lines_carry_their_syslog_priority_and_no_timestamp():
    formatter = journal.JournalFormatter()

    def line(level, message, exc_info=None):
        return formatter.format(logging.LogRecord("s3repofs.mount", level, __file__, 1, message, (), exc_info))

    assert line(logging.INFO, "mounted /mnt/x") == "<6>s3repofs.mount: mounted /mnt/x"
    assert line(logging.WARNING, "slow") == "<4>s3repofs.mount: slow"
    assert line(logging.ERROR, "lost") == "<3>s3repofs.mount: lost"
    assert line(logging.DEBUG, "detail") == "<7>s3repofs.mount: detail"
    try:
        raise ValueError("boom")
    except ValueError:
        lines = line(logging.ERROR, "failed", sys.exc_info()).splitlines()
    assert len(lines) > 3 and all(one.startswith("<3>") for one in lines)  # journald: one entry per line


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path):
    probe = "from s3repofs.cli import journal; print(journal.stderr_is_journal())"
    with open(tmp_path / "err", "w") as err:
        st = os.fstat(err.fileno())

        def run(value):
            env = {**os.environ, "JOURNAL_STREAM": value}
            return subprocess.run([sys.executable, "-c", probe], stderr=err, env=env, capture_output=False,
                                  stdout=subprocess.PIPE, text=True).stdout.strip()

        assert run(f"{st.st_dev}:{st.st_ino}") == "True"
        assert run(f"{st.st_dev}:{st.st_ino + 1}") == "False"  # inherited, but stderr is another file
        assert run("") == "False"


def test_uploads_in_flight_reads_the_gauge_of_the_stats_file(tmp_path):
    assert mount_cli.uploads_in_flight(tmp_path) == 0  # no .stats: looks idle
    (tmp_path / ".stats").write_text("# TYPE s3repofs_uploads_in_flight gauge\ns3repofs_uploads_in_flight 3.0\n"
                                     "s3repofs_uploads_in_flight_total 9\n")
    assert mount_cli.uploads_in_flight(tmp_path) == 3


# -- the service's ExecStart, as systemd runs it ----------------------------------------------------------


class NotifySocket:
    """A socket like systemd's $NOTIFY_SOCKET (abstract, as systemd's own is not): records each message."""

    def __init__(self) -> None:
        self.name = f"@s3repofs-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.messages: list[dict[str, str]] = []

    def receive(self, key: str, timeout: float = 60.0, on_message=None) -> dict[str, str]:
        """The next message holding ``key`` (calling ``on_message`` on each as it arrives)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            message = dict(line.split("=", 1) for line in data.splitlines())
            self.messages.append(message)
            if on_message:
                on_message(message)
            if key in message:
                return message
        raise AssertionError(f"no {key} from the daemon within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def service_command(tmp_path: Path, config: dict, mountpoint: Path | None = None,
                    unit: str = "s3repofs@.service") -> tuple[list[str], dict]:
    """The unit's ExecStart for the instance ``svc``, from the installed unit, and the environment systemd would
    give it (the config found by NAME, MOUNTPOINT and MOUNT_OPTIONS set as the unit sets them)."""
    if not (tmp_path / "units").exists():
        install_units(tmp_path / "units")
    lines = (tmp_path / "units" / unit).read_text().splitlines()
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    # Environment=KEY=VALUE lines, then MOUNTPOINT as /etc/s3repofs/NAME.env would set it.
    variables = dict(line.removeprefix("Environment=").split("=", 1) for line in lines
                     if line.startswith("Environment="))
    variables["MOUNTPOINT"] = str(mountpoint)
    config_home = tmp_path / "config-home"
    (config_home / "s3repofs").mkdir(parents=True, exist_ok=True)
    write_config(config, config_home / "s3repofs/svc.json")
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: variables[m[1]], arg.replace("%i", "svc"))
            for arg in shlex.split(exec_start.removeprefix("ExecStart="))]
    return argv, {**os.environ, "XDG_CONFIG_HOME": str(config_home)}


def with_unit_privileges(argv: list[str], unit: Path) -> list[str]:
    """``argv`` run with the unit's CapabilityBoundingSet= and NoNewPrivileges=, through setpriv(1)."""
    settings = dict(line.split("=", 1) for line in unit.read_text().splitlines() if "=" in line and line[0] != "#")
    caps = ",".join(f"+{cap.removeprefix('CAP_').lower()}" for cap in settings["CapabilityBoundingSet"].split())
    no_new_privs = ["--no-new-privs"] if settings["NoNewPrivileges"] == "yes" else []
    return ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", *no_new_privs, *argv]


def start_service(argv: list[str], env: dict, notify: NotifySocket, stderr_path: Path) -> subprocess.Popen:
    with open(stderr_path, "w") as stderr:
        st = os.fstat(stderr.fileno())
        env = {**env, "NOTIFY_SOCKET": notify.name, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)


def answered_before_ready(process: subprocess.Popen, mountpoint: Path) -> bool:
    """Called when READY=1 arrives: with the daemon frozen (SIGSTOP), is the mountpoint our FUSE mount, and
    does a stat of its root answer? It can only from the kernel's attribute cache, so only if the tree had
    answered one before READY=1 (a READY=1 sent in libfuse's init, before the kernel's INIT is answered,
    leaves the stat waiting)."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        fields = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        if [f[f.index("-") + 1] for f in fields if f[4] == str(mountpoint)] != ["fuse.s3repofs"]:
            return False
        root: list = []
        probe = threading.Thread(target=lambda: root.append(os.stat(mountpoint).st_ino), daemon=True)
        probe.start()
        probe.join(timeout=1.0)
        return root == [1]  # libfuse's root node
    finally:
        os.kill(process.pid, signal.SIGCONT)


def stop_for_good(process: subprocess.Popen, mountpoint: Path) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    if mount_cli._in_mount_table(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


@needs_fuse
def test_the_service_says_ready_once_the_mount_answers_then_status_then_stopping(request, tmp_path):
    config = make_config(request, tmp_path, "sqlite-local")
    s3repofs("init", "--config", str(write_config(config, tmp_path / "init.json")))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    argv, env = service_command(tmp_path, config, mountpoint)
    assert argv == [EXECUTABLE, "mount", "--foreground", "--config", "svc", "-o", "default_permissions",
                    str(mountpoint)]
    # The unit's capabilities and no_new_privs (the hardening that needs no systemd) leave the mount working.
    argv = with_unit_privileges(argv, tmp_path / "units/s3repofs@.service")
    notify = NotifySocket()
    process = start_service(argv, env, notify, tmp_path / "stderr")
    try:
        answered = []
        ready = notify.receive("READY", on_message=lambda m: "READY" in m and answered.append(
            answered_before_ready(process, mountpoint)))
        assert answered == [True]
        assert ready["STATUS"] == f"serving {mountpoint}: 0 uploads in flight, 0 left to retry"
        assert sorted(os.listdir(mountpoint)) == ["expired", "published", "unpublished"]
        process.send_signal(signal.SIGTERM)
        stopping = notify.receive("STOPPING")
        assert stopping["STATUS"] == "stopping: 0 uploads in flight"
        assert process.wait(timeout=60) == 0
        assert not os.path.ismount(mountpoint)
    finally:
        stop_for_good(process, mountpoint)
        notify.close()
    log = (tmp_path / "stderr").read_text()
    # JOURNAL_STREAM named its stderr: every line in the journal's form, INFO included.
    assert f"<6>s3repofs.mount: mounted {mountpoint}" in log
    assert "<6>s3repofs.mount: SIGTERM received: stopping: 0 upload(s) in flight" in log
    assert "Traceback" not in log
    assert all(line.startswith("<") for line in log.splitlines() if line.startswith("s3repofs"))


def test_the_gc_and_backup_services_run_their_command_with_their_privileges(request, tmp_path):
    config = make_config(request, tmp_path, "sqlite-local")
    init_config = write_config(config, tmp_path / "init.json")
    s3repofs("init", "--config", str(init_config))
    for unit in ("s3repofs-backup@.service", "s3repofs-gc@.service"):
        argv, env = service_command(tmp_path, config, unit=unit)
        assert argv[1:] == [unit.split("@")[0].removeprefix("s3repofs-"), "--config", "svc"]
        result = subprocess.run(with_unit_privileges(argv, tmp_path / "units" / unit), env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, f"{unit}: {result.stderr}"
    backups = json.loads(s3repofs("backup", "list", "--json", "--config", str(init_config)).stdout)
    assert len(backups["backups"]) == 1


@pytest.fixture
def slow_s3(request, tmp_path):
    """A repository on PostgreSQL and moto, reached through a proxy that can hold each PUT for seconds."""
    from faultproxy import FaultProxy

    config = make_config(request, tmp_path, "postgres-s3")
    with FaultProxy(config["s3_endpoint_url"], kinds=["latency"], methods=["PUT"], min_latency=3.0,
                    max_latency=3.0) as proxy:
        yield {**config, "s3_endpoint_url": proxy.endpoint_url}, proxy


def close_in_thread(path: Path, data: bytes) -> tuple[threading.Thread, list]:
    """Write ``data`` to ``path`` and close it in a thread; the outcome (None, or the error) lands in the list."""
    outcome: list = []

    def write() -> None:
        try:
            with open(path, "wb") as f:
                f.write(data)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    return thread, outcome


def assert_durable(config: dict, repo_path: str, data: bytes) -> None:
    repo = S3Repo(config)
    try:
        version = repo.require_file(repo_path)
        assert (version.storage, version.file_size) == ("uploaded", len(data))
        assert repo.store.head(version.s3_key).size == len(data)
    finally:
        repo.close()


@needs_fuse
def test_sigterm_waits_for_the_upload_in_flight_and_loses_nothing(slow_s3, tmp_path):
    config, proxy = slow_s3
    s3repofs("init", "--config", str(write_config(config, tmp_path / "init.json")))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    argv, env = service_command(tmp_path, config, mountpoint)
    notify = NotifySocket()
    process = start_service(argv, env, notify, tmp_path / "stderr")
    data = os.urandom(300_000)
    try:
        notify.receive("READY")
        (mountpoint / "published/docs").mkdir()
        proxy.configure(rate=1.0)  # from now on each PUT waits 3 s
        writer, outcome = close_in_thread(mountpoint / "published/docs/f.bin", data)
        assert wait_for(lambda: proxy.injected["latency"] >= 1, timeout=30)  # the upload is in flight
        process.send_signal(signal.SIGTERM)
        assert notify.receive("STOPPING")["STATUS"] == "stopping: 1 uploads in flight"
        writer.join(timeout=60)
        assert outcome == [None]  # the close() succeeded
        assert process.wait(timeout=60) == 0
    finally:
        stop_for_good(process, mountpoint)
        notify.close()
    proxy.configure(rate=0.0)
    assert_durable(config, "docs/f.bin", data)
    log = (tmp_path / "stderr").read_text()
    assert "SIGTERM received: stopping: 1 upload(s) in flight" in log
    assert "stopping: 0 upload(s) in flight" in log  # it waited for the upload, then ended the session
    assert "Traceback" not in log


@needs_fuse
def test_umount_waits_while_only_uploads_in_flight_keep_the_mount_busy(slow_s3, tmp_path, monkeypatch, capsys):
    config, proxy = slow_s3
    data = os.urandom(200_000)
    with mounted(config, tmp_path) as mnt:
        (mnt / "published/docs").mkdir()
        proxy.configure(rate=1.0)
        writer, outcome = close_in_thread(mnt / "published/docs/g.bin", data)
        assert wait_for(lambda: proxy.injected["latency"] >= 1, timeout=30)
        # Until the mount's .stats control file exists here, the count comes from the writer we started.
        monkeypatch.setattr(mount_cli, "uploads_in_flight", lambda mountpoint: int(writer.is_alive()))
        assert main(["umount", str(mnt), "--config", str(tmp_path / "mnt.json")]) == 0
        out = capsys.readouterr().out
        assert f"{mnt}: waiting for 1 upload(s) in flight" in out and f"unmounted {mnt}" in out
        writer.join(timeout=30)
        assert outcome == [None]
    proxy.configure(rate=0.0)
    assert_durable(config, "docs/g.bin", data)


@needs_fuse
def test_a_background_mount_with_log_dash_logs_to_its_stderr_in_the_journal_form(tmp_path):
    """What the mount helper's log=- asks for: the daemon keeps the stderr it was given (a mount unit's: the
    journal)."""
    config = write_config(make_config(None, tmp_path, "sqlite-local"), tmp_path / "c.json")
    s3repofs("init", "--config", str(config))
    (tmp_path / "mnt").mkdir()
    try:
        with open(tmp_path / "stderr", "w") as stderr:  # stdout: a pipe, read to its end
            result = subprocess.run([sys.executable, "-m", "s3repofs", "mount", "--config", str(config), "--log",
                                     "-", str(tmp_path / "mnt")], stderr=stderr, stdout=subprocess.PIPE, text=True,
                                    timeout=60)
        assert result.returncode == 0 and "log stderr" in result.stdout
    finally:
        s3repofs("umount", "--if-mounted", "--config", str(config), str(tmp_path / "mnt"))
    log = (tmp_path / "stderr").read_text()
    assert f"<6>s3repofs.mount: mounted {tmp_path / 'mnt'}" in log and "<6>s3repofs.mount: unmounted" in log
    assert not (tmp_path / "root/mount.log").exists()


@needs_fuse
def test_umount_if_mounted_succeeds_quietly_on_a_mountpoint_that_is_not_one(tmp_path):
    result = s3repofs("umount", "--if-mounted", str(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert s3repofs("umount", str(tmp_path), check=False).returncode == 1
