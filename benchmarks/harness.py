"""What every figure needs: a repository configuration, a real mount that can be made cold, the
daemon's memory, the kernel's page cache, and timing.

The mount is driven exactly as users drive it (``python -m s3repofs mount/umount``), so the
numbers include everything a user pays for. A mount is never left behind: ``Mount.cleanup`` falls
back to ``fusermount3 -u -z`` and runs from ``finally`` blocks, on Ctrl-C too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
MB = 1_000_000  # throughput and memory are reported in MB (10^6 bytes), sizes in MiB
LOG_RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The s3repofs command
# --------------------------------------------------------------------------------------------

CODE_ROOT = REPO_ROOT  # the directory holding the s3repofs package under test
PROFILE_DIR: Path | None = None  # --profile: every daemon is sampled by py-spy into this directory


def use_code(root: Path) -> None:
    """Measure the s3repofs package in ``root`` (default: this work tree), here and in the daemons,
    whatever is installed in site-packages."""
    global CODE_ROOT
    if not (root / "s3repofs" / "__init__.py").is_file():
        raise SystemExit(f"benchmarks: no s3repofs package in {root}")
    CODE_ROOT = root.resolve()
    sys.path.insert(0, str(CODE_ROOT))


def s3repofs_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{CODE_ROOT}{os.pathsep}{path}" if path else str(CODE_ROOT)}


def s3repofs(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m s3repofs ARGS``; raise with its stderr if it fails."""
    result = subprocess.run([sys.executable, "-m", "s3repofs", *args], capture_output=True, text=True,
                            timeout=timeout, env=s3repofs_env(), cwd="/")
    if result.returncode != 0:
        raise RuntimeError(f"s3repofs {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def write_config(path: Path, config: dict) -> Path:
    """The JSON config, readable by root only (it holds the S3 secret)."""
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------------------------
# Memory of the daemons
# --------------------------------------------------------------------------------------------

def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """Samples VmRSS of every registered daemon every 0.2 s in a thread, and keeps the maximum.

    Sampling misses spikes shorter than the interval, so ``Mount`` also reports each daemon's VmHWM
    (the kernel's own high-water mark) just before unmounting it; the peak is the larger of the two.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._pids: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.phase = "setup"
        self.peak_kb = 0
        self.peak_where = ""
        self.idle_kb: int | None = None  # RSS of the first daemon right after it mounted
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def add(self, pid: int) -> None:
        with self._lock:
            self._pids[pid] = self.phase
        if self.idle_kb is None:
            self.idle_kb = proc_status_kb(pid, "VmRSS")

    def remove(self, pid: int) -> None:
        self.record(proc_status_kb(pid, "VmHWM"), f"VmHWM, daemon ending after {self.phase}")
        with self._lock:
            self._pids.pop(pid, None)

    def record(self, kb: int | None, where: str) -> None:
        with self._lock:
            if kb is not None and kb > self.peak_kb:
                self.peak_kb, self.peak_where = kb, where

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                pids = list(self._pids)
            for pid in pids:
                self.record(proc_status_kb(pid, "VmRSS"), f"VmRSS during {self.phase}")


# --------------------------------------------------------------------------------------------
# The page cache
# --------------------------------------------------------------------------------------------

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    DROP_CACHES.write_text("3\n")


def _cached_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return 0


def check_drop_caches(scratch: Path) -> str | None:
    """None if dropping the page cache works here, else why not (a container may refuse or ignore it).

    Proof, not trust: a 64 MiB file just read must leave the cache when it is dropped.
    """
    probe = scratch / "drop-caches-probe"
    try:
        with open(probe, "wb") as f:
            for _ in range(64):
                f.write(os.urandom(MIB))
        read_file(probe)
        before = _cached_kb()
        drop_caches()
        after = _cached_kb()
    except OSError as exc:
        return f"cannot drop caches: {exc.strerror or exc}"
    finally:
        probe.unlink(missing_ok=True)
    if before - after < 48 * 1024:
        return f"writing {DROP_CACHES} had no effect (Cached {before} kB -> {after} kB)"
    return None


# --------------------------------------------------------------------------------------------
# Reading and timing
# --------------------------------------------------------------------------------------------

def read_file(path: Path | str, buffer: memoryview | None = None) -> int:
    """Read a whole file sequentially in 1 MiB reads (or the size of ``buffer``, reused by callers
    reading many files, as cat reuses its buffer); returns the bytes read."""
    view = buffer if buffer is not None else memoryview(bytearray(MIB))
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [view]):
            total += n
    finally:
        os.close(fd)
    return total


def write_file(path: Path | str, data: bytes | memoryview, block: int = MIB) -> None:
    """Create (or truncate) ``path`` and write ``data`` in ``block``-sized writes, then close, like cp.

    On the mount, close() returns only once the version is uploaded, verified and published, and an
    upload failure is raised here (EIO)."""
    view = memoryview(data)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < len(view):
            offset += os.write(fd, view[offset:offset + block])
    finally:
        os.close(fd)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


# --------------------------------------------------------------------------------------------
# A mount
# --------------------------------------------------------------------------------------------

def mount_points() -> list[str]:
    """Every mount point in the kernel's table."""
    with open("/proc/self/mounts") as f:
        return [line.split()[1].encode().decode("unicode_escape") for line in f]  # \040 for a space, etc.


def is_mounted(path: Path) -> bool:
    """Whether something is mounted at ``path``, from the kernel's table: os.path.ismount answers
    False for a FUSE mount whose daemon died (stat fails with ENOTCONN), which must be unmounted too."""
    return os.path.realpath(path) in mount_points()


def mounts_under(base: Path) -> list[str]:
    """Whatever is still mounted inside ``base``: such a directory must not be deleted, since deleting
    would reach through the mount into a bucket or a repository."""
    root = os.path.realpath(base) + os.sep
    return [point for point in mount_points() if point.startswith(root)]


def remount(mount, clear_cache: bool = False, drop: bool = False) -> None:
    """A fresh daemon and fresh kernel state for ``mount`` (ours or a peer's: umount, clear_cache, mount).

    ``clear_cache``: empty the daemon's cache, so the next open downloads; ``drop``: drop the page cache
    while nothing is mounted.
    """
    mount.umount()
    if clear_cache:
        mount.clear_cache()
    if drop:
        drop_caches()
    mount.mount()


class Mount:
    """One repository mounted at ``mountpoint`` by a real daemon, remountable cold or warm."""

    def __init__(self, config_path: Path, local_root: Path, mountpoint: Path, log_path: Path,
                 sampler: RssSampler) -> None:
        self.config_path = config_path
        self.local_root = local_root
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.sampler = sampler
        self.pid: int | None = None
        self._cleared = 0  # times the cache was emptied (see clear_cache)
        mountpoint.mkdir(parents=True, exist_ok=True)

    @property
    def published(self) -> Path:
        return self.mountpoint / "published"

    @property
    def root(self) -> Path:
        """Where the files the figures read are (as ``PeerMount.root`` is a peer's)."""
        return self.published

    @property
    def objects_dir(self) -> Path:
        return self.local_root / "cache" / "objects"

    def mount(self) -> None:
        s3repofs("mount", str(self.mountpoint), "--config", str(self.config_path), "--log", str(self.log_path),
                 timeout=120)
        self.pid = self._daemon_pid()
        if self.pid is not None:
            self.sampler.add(self.pid)
            if PROFILE_DIR is not None:
                self._profile(self.pid)

    def _profile(self, pid: int) -> None:
        """Sample the daemon with py-spy (wall clock, idle threads too) until it exits, as collapsed
        stacks: ``<dir>/<mount>-<pid>.txt``, one line per stack and its sample count."""
        out = PROFILE_DIR / f"{self.mountpoint.name}-{pid}.txt"
        subprocess.Popen(["py-spy", "record", "--idle", "--threads", "--format", "raw", "--rate", "250",
                          "--pid", str(pid), "--output", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def umount(self) -> None:
        """Unmount with ``s3repofs umount`` (which waits for the daemon); lazily if that fails."""
        if self.pid is not None:
            self.sampler.remove(self.pid)
        try:
            if is_mounted(self.mountpoint):
                s3repofs("umount", str(self.mountpoint), "--config", str(self.config_path), timeout=120)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log(f"  ! {exc}; unmounting lazily")
            self._lazy_umount()
        self.pid = None

    def remount(self, clear_cache: bool = False, drop: bool = False) -> None:
        """A fresh daemon and fresh kernel state for this mount (``remount``)."""
        remount(self, clear_cache, drop)

    def clear_cache(self) -> None:
        """Take every cached object out of the cache (the LAYOUT file and the directory stay): large
        ones deleted, small ones moved aside.

        Deleting thousands of small files would slow the next mount's downloads: ext4 without a
        journal (this kind of machine) will not reuse an inode freed in the last 60 s or more, and
        scans past each one, so a fresh mount creating 2,000 files right after the harness deleted
        2,000 paid 0.4 ms more of kernel time per file from the third mount on. Moving a large file
        aside would leave its dirty pages to be written back during the next measurement instead
        (cold reads of 256 MiB on s3rver: 370-390 MB/s, against 411-413 deleted). Whatever is moved
        aside goes with the run's directory at its end.
        """
        if not self.objects_dir.is_dir():
            return
        self._cleared += 1
        aside = self.local_root / "cleared" / str(self._cleared)
        aside.mkdir(parents=True)
        for path in self.objects_dir.rglob("*"):
            if path.is_file() and path.stat().st_size >= MIB:
                path.unlink()
        for child in self.objects_dir.iterdir():
            child.rename(aside / child.name)

    def cache_file(self, mount_path: Path) -> Path:
        """The daemon's cache file of the version at ``mount_path`` (named by its S3 key)."""
        key = os.getxattr(mount_path, "user.s3repo.s3_key").decode()
        return self.objects_dir / key

    def _daemon_pid(self) -> int | None:
        for pid_file in sorted(self.local_root.glob("mount-*.pid")):
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            if os.path.exists(f"/proc/{pid}"):
                return pid
        return None

    def _lazy_umount(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        time.sleep(0.5)

    def cleanup(self) -> None:
        """Leave nothing behind, whatever state we are in (called from finally, on Ctrl-C too).

        A mount that was interrupted half-way may come up after we looked, so a daemon we started
        that is still alive gets a few seconds to mount (then is unmounted) or is terminated.
        """
        try:
            self.umount()
        except BaseException as exc:  # noqa: BLE001 - cleanup must go on
            log(f"  ! unmount of {self.mountpoint} failed: {exc}")
        pid = self._daemon_pid()
        deadline = time.monotonic() + 5
        while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            if is_mounted(self.mountpoint):
                self._lazy_umount()
            time.sleep(0.1)
        if pid is not None and os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGTERM)
        if is_mounted(self.mountpoint):
            self._lazy_umount()

    def log_problems(self) -> tuple[list[str], int]:
        """The daemon's logged errors (with their tracebacks), and how many warnings it logged."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return [], 0
        records: list[str] = []  # a record starts with a timestamp; traceback lines belong to it
        for line in text.splitlines():
            if LOG_RECORD_START.match(line) or not records:
                records.append(line)
            else:
                records[-1] += "\n" + line
        errors = [r for r in records if " ERROR " in r.split("\n")[0] or " CRITICAL " in r.split("\n")[0]
                  or "Traceback" in r]
        warnings = sum(1 for r in records if " WARNING " in r.split("\n")[0])
        return errors, warnings
