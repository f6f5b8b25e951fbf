"""The mount's daemon: the process that serves one mount, from its start to its unmount.

It tunes malloc for long-lived transfers, builds the tree over the repository, serves FUSE until
unmounted, retries staged uploads that failed and records this host's heartbeat in the background,
and flushes every writer at unmount. Under systemd it reports readiness and what it is doing
(notify.py), and a SIGTERM waits for the uploads in flight before the session ends (stopping.py).
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Callable

from .. import metrics
from ..domain.paths import MAX_PATH_BYTES
from ..errors import RepoError
from ..repo import S3Repo
from .exporter import Exporter
from .notify import Notifier
from .stopping import GracefulStop

log = logging.getLogger("s3repofs.mount")

# The background pass: retry staged uploads, finish thaws whose restore is done, record the cache's changes
# (holders), and record the heartbeat (hosts.last_seen), which gc reads: a host unheard of for host_gone_after
# (a day by default, far longer than this) is gone.
RETRY_INTERVAL = 30.0

_libc = ctypes.CDLL(None)
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# What the daemon sets, unless the operator chose it: (parameter, value, environment variable, tunable).
_MALLOC_SETTINGS = (
    # 2 arenas for all threads (glibc: 8 per core, each keeping the freed buffers of its threads).
    (M_ARENA_MAX, 2, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
    # Buffers over 768 KiB are mapped and unmapped, never kept in the heap: libfuse's page-aligned 1 MiB
    # reply to each read otherwise fragments it for good (content.CHUNK stays under it). Figures 1 and 2
    # A/B in the same minutes: peak RSS 135-143 MB with glibc's sliding threshold, 72-73 MB with this
    # one; cold reads as fast, reads from the disk cache ~10 % slower (still 0.75 of reading the file).
    (M_MMAP_THRESHOLD, 768 * 1024, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    # A fixed mmap threshold also fixes the trim threshold at 128 KiB: each freed chunk would hand the
    # heap's top back and the next would fault it in again (4,000 reads of 512 KiB: 384,031 page
    # faults and 0.87 s, against 127 and 0.21 s with this). Twice the mmap threshold, as glibc would.
    (M_TRIM_THRESHOLD, 2 * 768 * 1024, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
)


def tune_malloc() -> None:
    """Keep the daemon's memory from creeping up with its transfers (see _MALLOC_SETTINGS). An
    operator's environment variable or glibc tunable wins; a C library without mallopt is left alone."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is None:
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    for parameter, value, variable, tunable in _MALLOC_SETTINGS:
        if variable not in os.environ and tunable not in tunables:
            mallopt(parameter, value)




def freeze_startup_objects() -> None:
    """Take what the daemon built to start (its modules, boto3's models: some 110,000 objects) out of the
    garbage collector's sight, once the startup's garbage is collected. Otherwise the first full collection
    comes during the first large listing and walks them all: a cold ``ls -l`` of 10,000 files spent 90-116
    of its 290 ms of CPU in it (190-215 ms with them frozen)."""
    gc.collect()
    gc.freeze()


def run_daemon(config, mountpoint: Path, options: dict, ready_fd: int | None, metrics_target=None) -> None:
    """``metrics_target``: where to serve the metrics besides ``.stats`` (``exporter.parse_target``), or None."""
    from .fuse import serve  # loads libfuse: only in the process that mounts
    from .tree import Tree

    tune_malloc()
    # A crash in C (libfuse, ctypes) leaves every thread's Python stack in the daemon's log, not just -11.
    faulthandler.enable()
    notifier = Notifier()  # systemd's Type=notify, when $NOTIFY_SOCKET is set
    repo = S3Repo(config)
    repo.ensure_ready()
    # Every path in the mount stays usable as an absolute path: at most PATH_MAX with the mount point's.
    tree = Tree(repo, metadata_ttl=repo.config.metadata_ttl / 2,
                max_path_bytes=MAX_PATH_BYTES - len(os.fsencode(mountpoint)))
    freeze_startup_objects()
    metrics.watch(repo.cache.usage, tree.upload_counts)
    exporter = Exporter(metrics_target) if metrics_target else None
    if exporter:
        exporter.start()
    pid_path = pid_file(repo, mountpoint)
    pid_path.write_text(f"{os.getpid()}\n")
    stop = threading.Event()
    stopper = GracefulStop(lambda: tree.upload_counts().in_flight, notifier)
    stopper.hold_signals()  # before serve() starts libfuse's threads: they inherit the blocked signals

    def status_now() -> str:
        return serving_status(mountpoint, tree.upload_counts())

    def report() -> None:
        notifier.status(status_now())

    def ready(end_session) -> None:
        log.info("mounted %s: %s", mountpoint, repo.describe())
        stopper.session_started(end_session)
        threading.Thread(target=announce_when_answering, args=(mountpoint, stop, ready_fd, notifier, status_now),
                         name="announce-ready", daemon=True).start()
        threading.Thread(target=run_background, args=(repo, tree, stop, RETRY_INTERVAL, report),
                         name="upload-retry", daemon=True).start()

    def finished() -> None:
        stop.set()
        notifier.stopping(f"stopping: {tree.upload_counts().in_flight} uploads in flight")
        tree.flush_all(lambda fh, exc: log.error("unmount: handle %s not uploaded: %s", fh, exc))
        _retry_once(repo, tree)
        log.info("unmounted %s", mountpoint)

    try:
        serve(tree, str(mountpoint), foreground_options=options, on_ready=ready, on_exit=finished)
    finally:
        stopper.release()
        pid_path.unlink(missing_ok=True)
        if exporter:
            exporter.stop()
        repo.close()


def announce_when_answering(mountpoint: Path, stop: threading.Event, ready_fd: int | None, notifier: Notifier,
                            status_now: Callable[[], str]) -> None:
    """Say "ready" (to the parent's pipe, and READY=1 to systemd) once the tree answers through the kernel.

    libfuse calls init before it answers the kernel's INIT, so the mount is not usable yet when init runs:
    wait until the mountpoint is a mount and a stat of its root (a GETATTR served by the tree) succeeds."""
    while not answers(mountpoint):
        if stop.wait(0.05):
            return
    if ready_fd is not None:
        report_to(ready_fd, "ready")
    notifier.ready(status_now())


def answers(mountpoint: Path) -> bool:
    """Whether ``mountpoint`` is a mount whose root answers a stat, asked by another process. Not by a thread
    of the daemon: once a worker has read its request, the kernel waits for the answer uninterruptibly, so a
    daemon killed meanwhile never ends (that thread holds /dev/fuse open, and with it the request) until
    the connection is aborted by hand."""
    tool = shutil.which("mountpoint")  # util-linux: stat()s the path and its parent
    if tool is None:
        return os.path.ismount(mountpoint)
    return subprocess.run([tool, "-q", str(mountpoint)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def serving_status(mountpoint: Path, counts) -> str:
    """The STATUS= line ``systemctl status`` shows while the mount serves."""
    return f"serving {mountpoint}: {counts.in_flight} uploads in flight, {counts.left_to_retry} left to retry"


def run_background(repo: S3Repo, tree, stop: threading.Event, interval: float = RETRY_INTERVAL,
                   report=None) -> None:
    """Every ``interval`` s until ``stop`` is set: record the heartbeat and the copies that arrived in or left
    the cache (the first pass makes this host's holder rows what the cache holds: it may have been wiped while
    nothing ran), retry staged uploads, ``report()``."""
    first = True
    while True:
        repo.record_holders(reconcile=first)
        first = False
        _heartbeat(repo)
        _retry_once(repo, tree)
        _finish_thaws(repo)
        if report is not None:
            report()
        if stop.wait(interval):
            return


def _heartbeat(repo: S3Repo) -> None:
    try:
        repo.heartbeat()
    except RepoError as exc:  # the database is away: the next pass records it
        log.warning("recording this host's heartbeat: %s", exc)


def _retry_once(repo: S3Repo, tree) -> None:
    try:
        tree.mark_unmarked_publishes()
        uploaded = tree.retry_staged_uploads()
        if uploaded:
            log.info("uploaded %d staged version(s) that had failed before", uploaded)
    except RepoError as exc:
        log.warning("retrying staged uploads: %s", exc)
    except Exception:
        log.exception("retrying staged uploads failed unexpectedly")


def _finish_thaws(repo: S3Repo) -> None:
    """Look at a few thawing versions (repo.THAW_CHECKS) and finish those whose restore is done."""
    try:
        finished = repo.finish_thaws()
        if finished:
            log.info("finished %d thaw(s) whose restore was done", finished)
    except RepoError as exc:
        log.warning("finishing thaws: %s", exc)


def pid_file(repo: S3Repo, mountpoint: Path) -> Path:
    digest = hashlib.sha1(str(mountpoint).encode()).hexdigest()[:12]
    return repo.config.local_root / f"mount-{digest}.pid"


def report_to(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode()[:4000])
        os.close(fd)
    except OSError:
        pass
