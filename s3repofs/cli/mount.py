"""``s3repofs mount`` and ``s3repofs umount``: start the mount's daemon (mount/daemon.py), and stop it cleanly.

``mount`` checks everything it can before forking (mountpoint, configuration, database, bucket), so
errors reach the terminal as one line; the daemon then reports readiness (or its failure) through a
pipe, and ``mount`` returns only once the tree is mounted. Uploads happen in the writer's close(),
so an unmount never abandons a version; staged versions whose upload failed are retried by a
background thread and at start-up.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import RepoError, UsageError
from ..metrics import read_mount_stats
from ..mount.daemon import pid_file, report_to, run_daemon
from ..mount.exporter import parse_target
from ..repo import S3Repo
from . import journal

log = logging.getLogger("s3repofs.mount")

READY_TIMEOUT = 60.0
JOURNAL = "-"  # --log -: stderr, in the journal's form
# umount waits this long for uploads in flight (s3repofs@.service's TimeoutStopSec covers it), polling:
UPLOAD_WAIT = 600.0
UPLOAD_POLL = 0.5


class MountError(RepoError):
    exit_status = 1


def add_commands(add, commands: dict) -> None:
    p = add("mount", "Mount the repository at MOUNTPOINT (published/, unpublished/, expired/).")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, logging to stderr")
    p.add_argument("-o", dest="options", default="", metavar="OPTIONS",
                   help="comma-separated FUSE options, e.g. allow_other (opt-in), ro; metrics=HOST:PORT or "
                        "metrics=/abs/path.prom serves the mount's metrics (off by default)")
    p.add_argument("--log", metavar="FILE", help="daemon log file (default: <local_root>/mount.log; with -f: "
                   "stderr); '-': stderr in the journal's form (the default under systemd)")
    commands["mount"] = cmd_mount

    p = add("umount", "Unmount MOUNTPOINT and wait for its daemon to finish; while only uploads in flight keep "
                      "it busy, wait for them (saying how many remain).")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--if-mounted", action="store_true", help="succeed quietly when MOUNTPOINT is not mounted")
    commands["umount"] = cmd_umount


def check_mountpoint(path: Path) -> None:
    if not path.exists():
        raise MountError(f"mountpoint {path} does not exist")
    if not path.is_dir():
        raise MountError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mountpoint (unmount it first: s3repofs umount {path})")
    if any(path.iterdir()):
        raise MountError(f"mountpoint {path} is not empty")


# The -o options a mount takes: libfuse's that make sense for this tree, "flag" or "value" (key=value). Any
# other is refused here in one line; libfuse would refuse it only in the daemon's log ("failed: 3").
MOUNT_OPTIONS = {
    **dict.fromkeys(("ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "sync", "async", "dirsync",
                     "atime", "noatime", "allow_other", "allow_root", "default_permissions", "auto_unmount",
                     "kernel_cache", "auto_cache"), "flag"),
    **dict.fromkeys(("uid", "gid", "umask", "attr_timeout", "entry_timeout", "negative_timeout", "max_read",
                     "fsname", "subtype"), "value"),
    "metrics": "value",  # ours: HOST:PORT or /path.prom (mount/exporter.py), taken out before libfuse sees them
}


def parse_options(text: str) -> dict:
    """``-o``'s comma-separated options as {key: value, or True for a flag}, each checked against MOUNT_OPTIONS."""
    options: dict = {}
    for item in filter(None, (o.strip() for o in text.split(","))):
        key, sep, value = item.partition("=")
        kind = MOUNT_OPTIONS.get(key)
        if kind is None:
            raise UsageError(f"unknown mount option {key!r} (known: {', '.join(sorted(MOUNT_OPTIONS))})")
        if kind == "value" and not value:
            raise UsageError(f"mount option {key!r} needs a value: {key}=...")
        if kind == "flag" and sep:
            raise UsageError(f"mount option {key!r} takes no value")
        options[key] = value if sep else True
    return options


def fuse_options(repo: S3Repo, user_options: dict) -> dict:
    ttl = repo.config.metadata_ttl
    options = {
        "fsname": "s3repofs", "subtype": "s3repofs",
        "default_permissions": True,  # the kernel enforces the stored mode/uid/gid
        # Half the TTL in the kernel and half in our cache: another host's publish shows within the TTL.
        "attr_timeout": ttl / 2, "entry_timeout": ttl / 2, "negative_timeout": 0,
    }
    options.update(user_options)
    return options


@dataclass(frozen=True)
class Mounted:
    mountpoint: Path
    pid: int
    log_path: Path | None  # None: the daemon logs to stderr (--log -, the journal)


def cmd_mount(args: argparse.Namespace) -> int:
    mounted = start_mount(args.config, args.mountpoint, args.options, args.log, foreground=args.foreground)
    if mounted is not None:
        print(f"mounted {mounted.mountpoint} (daemon pid {mounted.pid}, log {mounted.log_path or 'stderr'})")
    return 0


def start_mount(config, mountpoint: str | Path, options_text: str = "", log_file: str | Path | None = None,
                foreground: bool = False) -> Mounted | None:
    """The one way to mount (``s3repofs mount`` and mount.fuse.s3repofs): check, fork the daemon, return once
    the tree is mounted. In the foreground, serve until unmounted, then end the process (exit status 0)."""
    mountpoint = Path(mountpoint).absolute()  # libfuse3 chdirs to /: every path must be absolute
    user_options = parse_options(options_text)
    check_mountpoint(mountpoint)
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        raise MountError("fusermount3 not found: install the fuse3 package")
    metrics_target = parse_target(user_options.pop("metrics", None))  # -o metrics=...: ours, not libfuse's
    repo = S3Repo(config)
    repo.ensure_ready()
    options = fuse_options(repo, user_options)
    to_journal = log_file == JOURNAL or (foreground and not log_file and journal.stderr_is_journal())
    log_path = None if to_journal else (Path(log_file).absolute() if log_file
                                        else repo.config.local_root / "mount.log")
    repo.close()
    if to_journal:
        journal.log_to_journal()
    if foreground:
        run_daemon(config, mountpoint, options, ready_fd=None, metrics_target=metrics_target)
        # Unmounted and flushed: end as the forked daemon does, without the interpreter's finalization,
        # which runs while threads of the mount (background passes, lease renewals) may still be in C code
        # (seen once under systemd: SIGSEGV after a clean stop).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.setsid()
        _detach(log_path)
        status = 0
        try:
            run_daemon(config, mountpoint, options, ready_fd=write_fd, metrics_target=metrics_target)
        except BaseException as exc:  # reported to the parent through the pipe, and logged
            log.error("mount failed: %s", exc, exc_info=not isinstance(exc, RepoError))
            report_to(write_fd, f"error: {exc}")
            status = 1
        os._exit(status)
    os.close(write_fd)
    message = _wait_ready(read_fd, pid)
    if message != "ready":
        where = "the journal" if to_journal else log_path
        raise MountError(f"mount of {mountpoint} failed: {message} (log: {where})")
    raise_read_ahead(mountpoint)  # "ready" came once the mount answered (daemon.announce_when_answering)
    return Mounted(mountpoint, pid, log_path)


def raise_read_ahead(mountpoint: Path, kb: int = 1024) -> None:
    """Let 1 MiB reads through (libfuse3). The kernel resets read_ahead_kb during mount; root only."""
    try:
        dev = os.stat(mountpoint).st_dev
        Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text(str(kb))
    except OSError as exc:
        log.debug("read_ahead_kb left as is: %s", exc)


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = Path(args.mountpoint).absolute()
    if not _in_mount_table(mountpoint):
        if args.if_mounted:
            return 0
        raise MountError(f"{mountpoint} is not mounted")
    pid = _daemon_pid(args, mountpoint)
    _unmount_when_uploaded(mountpoint)
    if pid is not None:
        deadline = time.monotonic() + READY_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    print(f"unmounted {mountpoint}")
    return 0


def _unmount_when_uploaded(mountpoint: Path, wait: float = UPLOAD_WAIT) -> None:
    """Unmount; while the mount is busy and uploads are in flight (a writer's close() keeps its file open
    until its upload is done), wait for them, saying how many remain, and try again."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    deadline = time.monotonic() + wait
    said = None
    while True:
        result = subprocess.run([tool, "-u", str(mountpoint)], capture_output=True, text=True)
        if result.returncode == 0:
            return
        reason = result.stderr.strip() or "fusermount failed"
        in_flight = uploads_in_flight(mountpoint) if "busy" in reason else 0
        if not in_flight or time.monotonic() > deadline:
            raise MountError(f"cannot unmount {mountpoint}: {reason}"
                             + (f" ({in_flight} upload(s) still in flight)" if in_flight else ""))
        if in_flight != said:
            print(f"{mountpoint}: waiting for {in_flight} upload(s) in flight", flush=True)
            said = in_flight
        time.sleep(UPLOAD_POLL)


def uploads_in_flight(mountpoint: Path) -> int:
    """How many uploads the mount's daemon has in flight (the gauge in its control file ``.stats``); 0 when
    its metrics cannot be read (the mount then looks idle)."""
    try:
        return int(read_mount_stats(mountpoint).get("s3repofs_uploads_in_flight", 0))
    except (RepoError, ValueError):  # not readable, or not Prometheus text
        return 0


def _in_mount_table(mountpoint: Path) -> bool:
    """Listed in /proc/self/mounts, even if its daemon died (then ismount() fails: ENOTCONN)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return os.path.ismount(mountpoint)
    target = str(mountpoint).replace(" ", "\\040")  # the table escapes spaces
    return any(line.split()[1] == target for line in lines if len(line.split()) > 1)


def _daemon_pid(args: argparse.Namespace, mountpoint: Path) -> int | None:
    try:
        repo = S3Repo(args.config)
        text = pid_file(repo, mountpoint).read_text().strip()
        repo.close()
        return int(text)
    except (OSError, ValueError, RepoError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # our own child (foreground tests, mount in the same process tree): reap it
        done, _status = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _detach(log_path: Path | None) -> None:
    """Leave the terminal: stdin from /dev/null, stdout and stderr to ``log_path`` (None: to stderr as
    inherited, logging in the journal's form already; not the inherited stdout, which a caller reading the
    command's output until its end, as $(...) does, would otherwise wait on for the daemon's life)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if log_path is None:
        os.dup2(2, 1)
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _wait_ready(fd: int, pid: int) -> str:
    import select

    chunks = []
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            data = os.read(fd, 4096)
            if not data:
                break
            chunks.append(data)
            if b"ready" in data:
                break
        elif not _alive(pid):
            break
    os.close(fd)
    text = b"".join(chunks).decode(errors="replace")
    if text.startswith("error: "):
        return text[len("error: "):]
    return "ready" if text == "ready" else (text or "the daemon exited before the mount was ready")
