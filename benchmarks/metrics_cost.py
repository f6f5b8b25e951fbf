#!/usr/bin/env python3
"""Measures what one version of s3repofs costs the daemon per warm small file against another, in paired rounds.

Two (or more) mounts are up at once, each run by its own code (``A``, ``B``...: directories holding an
``s3repofs`` package, e.g. ``git archive HEAD s3repofs | tar -x -C DIR``), each over a repository of its
own of the same kind (the local object store and SQLite) holding the same number of small files, read
twice first so they are warm (whole in the daemon's cache, their pages kept by the kernel). Each round
then reads every file once, as ``cat`` does, the mounts taking turns a few files at a time (A's first ten
files, B's, C's, A's next ten...), so a busy machine's load falls on every mount alike. Each round notes
each daemon's CPU time (the sum of its threads' run time, /proc/PID/task/*/schedstat, in ns) and the time
its files took; the result is each code's CPU per file over A's, with the spread of the ratios per block
of rounds, and the same from /proc/PID/stat's utime+stime over the whole run as a check.

Give A twice for an A/A run: its ratio is the noise floor of the machine at the time.

    sudo python3 benchmarks/metrics_cost.py /tmp/code-main /tmp/code-main       # A/A
    sudo python3 benchmarks/metrics_cost.py /tmp/code-nometrics /tmp/code-main  # B/A
    sudo python3 benchmarks/metrics_cost.py /tmp/nometrics /tmp/nometrics /tmp/main /tmp/mine  # all at once
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import is_mounted, log, read_file  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class CodeMount:
    """A repository of its own (local store, SQLite) mounted by the s3repofs package in ``code``."""

    def __init__(self, name: str, code: Path, work: Path) -> None:
        self.name, self.code, self.work = name, code, work
        self.mountpoint = work / "mnt"
        self.config = work / "config.json"
        self.pid: int | None = None

    def s3repofs(self, *args: str) -> None:
        """Run the CLI of this code (and the daemon it forks) on the CPUs this process may use (``--cpu``)."""
        env = {**os.environ, "PYTHONPATH": str(self.code)}
        result = subprocess.run([sys.executable, "-m", "s3repofs", *args], capture_output=True, text=True,
                                env=env, cwd="/", timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"[{self.name}] s3repofs {args[0]} failed: {result.stderr.strip()}")

    def mount(self, files: int, size: int) -> None:
        self.mountpoint.mkdir(parents=True)
        self.config.write_text(json.dumps({
            "local_root": str(self.work / "root"), "database": f"sqlite:///{self.work}/repo.db",
            "object_dir": str(self.work / "objects"), "host_name": self.name}))
        self.s3repofs("init", "--config", str(self.config))
        self.s3repofs("mount", str(self.mountpoint), "--config", str(self.config), "--log", str(self.work / "log"))
        self.pid = int(next((self.work / "root").glob("mount-*.pid")).read_text())
        self.directory.mkdir()
        for i in range(files):
            (self.directory / f"f{i:04}").write_bytes(os.urandom(size))

    @property
    def directory(self) -> Path:
        return self.mountpoint / "published" / "small"

    def umount(self) -> None:
        if is_mounted(self.mountpoint):
            try:
                self.s3repofs("umount", str(self.mountpoint), "--config", str(self.config))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log(f"  ! {exc}; unmounting lazily")
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)

    def run_ns(self) -> int:
        """CPU time the daemon's live threads have run, in ns (precise, unlike the clock ticks of stat)."""
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):  # a thread that just ended
                pass
        return total

    def ticks_seconds(self) -> float:
        """utime + stime of the whole process (ended threads included), in seconds."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def warm(mounts: list[CodeMount]) -> None:
    """Read every file twice: whole in the daemon's cache, its pages kept by the kernel."""
    buffer = memoryview(bytearray(128 * 1024))
    for mount in mounts:
        for _ in range(2):
            for name in os.listdir(mount.directory):
                read_file(mount.directory / name, buffer)


def measure(mounts: list[CodeMount], rounds: int, files: int, burst: int) -> dict[str, dict[str, list[float]]]:
    """Per round and mount: daemon CPU per file (us) and files per second. Within a round the mounts take
    turns, ``burst`` files at a time, always in the same order (A B C A B C ...), so the machine's load
    falls on all alike and each daemon follows the same kind of neighbour.

    Why bursts: a daemon serving one file after another mount's keeps less of itself in the CPU's caches
    and pays ~15 % more CPU for it; turns of one file each, in an order reversed at every turn (A B C C B
    A), gave the middle mounts that penalty and the ends not (an A/A pair measured 1.15)."""
    buffer = memoryview(bytearray(128 * 1024))
    names = sorted(os.listdir(mounts[0].directory))
    results = {m.name: {"cpu_us": [], "files_s": []} for m in mounts}
    for _ in range(rounds):
        cpu = {m.name: m.run_ns() for m in mounts}
        seconds = {m.name: 0.0 for m in mounts}
        for first in range(0, len(names), burst):
            for mount in mounts:
                started = time.perf_counter()
                for name in names[first:first + burst]:
                    read_file(mount.directory / name, buffer)
                seconds[mount.name] += time.perf_counter() - started
        for mount in mounts:
            results[mount.name]["cpu_us"].append((mount.run_ns() - cpu[mount.name]) / 1000 / files)
            results[mount.name]["files_s"].append(files / seconds[mount.name])
    return results


def block_ratios(a: list[float], b: list[float], block: int) -> list[float]:
    """B over A, per block of ``block`` rounds (one round is too short to mean much alone)."""
    return [sum(b[i:i + block]) / sum(a[i:i + block]) for i in range(0, len(a) - block + 1, block)]


def spread(ratios: list[float]) -> str:
    if len(ratios) < 2:
        return f"{ratios[0]:.3f} (one block)"
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return f"{median:.3f} (quartiles {q1:.3f}-{q3:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}, n={len(ratios)})"


def report(mounts: list[CodeMount], results: dict, ticks: dict[str, float], args: argparse.Namespace) -> None:
    print(f"{args.rounds} rounds of {args.files} files of {args.size} bytes, the mounts taking turns "
          f"{args.burst} files at a time")
    for mount in mounts:
        r = results[mount.name]
        print(f"  {mount.name} = {mount.code}: daemon CPU {statistics.mean(r['cpu_us']):6.1f} us/file (schedstat), "
              f"{ticks[mount.name] / (args.files * args.rounds) * 1e6:6.1f} (utime+stime); "
              f"median {statistics.median(r['files_s']):6.0f} files/s")
    a = mounts[0]
    for b in mounts[1:]:
        ra, rb = results[a.name], results[b.name]
        print(f"{b.name}/{a.name} daemon CPU per file: {sum(rb['cpu_us']) / sum(ra['cpu_us']):.3f} overall, "
              f"{ticks[b.name] / ticks[a.name]:.3f} by utime+stime; per block of {args.block} rounds "
              f"{spread(block_ratios(ra['cpu_us'], rb['cpu_us'], args.block))}")
        print(f"{b.name}/{a.name} files/s per block: {spread(block_ratios(ra['files_s'], rb['files_s'], args.block))}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/metrics_cost.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("codes", type=Path, nargs="+", metavar="DIR",
                        help="directories holding the s3repofs package of A (the reference), B, ... "
                             "(A twice: an A/A run)")
    parser.add_argument("--rounds", type=int, default=80, help="rounds (default 80)")
    parser.add_argument("--files", type=int, default=200, help="files per mount read in a round (default 200)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per file (default 4096)")
    parser.add_argument("--burst", type=int, default=10, help="files read from one mount before the next "
                        "mount's turn (default 10)")
    parser.add_argument("--block", type=int, default=10, help="rounds per ratio in the spread (default 10)")
    parser.add_argument("--cpu", type=int, default=os.cpu_count() - 1,
                        help="the CPU every daemon and the reader run on (default: the last one; -1: any). "
                             "Left free, the scheduler places each daemon its own way, and two daemons of the "
                             "same code differed by up to 15 %%")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (daemon logs)")
    args = parser.parse_args(argv)
    if len(args.codes) < 2:
        parser.error("give at least two directories (the same one twice for an A/A run)")
    for code in args.codes:
        if not (code / "s3repofs" / "__init__.py").is_file():
            parser.error(f"no s3repofs package in {code}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks/metrics_cost.py: run as root (FUSE mounts)", file=sys.stderr)
        return 2
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})  # inherited by the CLI, and so by the daemons it forks
    base = Path(tempfile.mkdtemp(prefix="s3repofs-metrics-cost-"))
    mounts = [CodeMount(chr(ord("A") + i), code.resolve(), base / chr(ord("A") + i))
              for i, code in enumerate(args.codes)]
    try:
        for mount in mounts:
            log(f"mounting {mount.name} ({mount.code}) and writing {args.files} files")
            mount.mount(args.files, args.size)
        warm(mounts)
        log(f"{args.rounds} rounds")
        ticks = {m.name: m.ticks_seconds() for m in mounts}
        results = measure(mounts, args.rounds, args.files, args.burst)
        ticks = {m.name: m.ticks_seconds() - ticks[m.name] for m in mounts}
    finally:
        for mount in mounts:
            mount.umount()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    report(mounts, results, ticks, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
