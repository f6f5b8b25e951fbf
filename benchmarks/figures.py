"""The figures: each measures s3repofs through the mount beside a baseline measured in the same run.

A figure function takes the ``Bench`` of one S3 server and adds ``Result`` rows as soon as each is
measured, so a failure later in a figure keeps what was measured before it. Repetitions: each
value and each baseline is the median of ``sizes.reps`` runs (3 unless --quick).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable

import seed
from boto3.s3.transfer import TransferConfig
from harness import (
    MB,
    MIB,
    Mount,
    RssSampler,
    drop_caches,
    log,
    median,
    read_file,
    s3repofs,
    timed,
    write_config,
    write_file,
)
from report import Result, Target, failed

SMALL = 4096  # the small files of figures 2 and 4
WRITE_SMALL = 64 * 1024  # the files published one after another in figure 5
# Figure 4's cold target: twice the best peer measured on each server (files/s).
BEST_PEER_FILES_PER_S = {"moto": 181, "s3rver": 360}  # rclone with its full VFS cache, cold


@dataclass(frozen=True)
class Sizes:
    big: int  # the large file of figures 1 and 2 (bytes)
    listing: int  # files in figure 3's directory
    stats: int  # of which figure 3 stats this many
    small: int  # small files read in figure 4
    writes: int  # 64 KiB files published in figure 5
    write_big: int  # the large file published in figure 5 (bytes)
    scale_dir: int  # files in figure 6's measured directory
    scale_stats: int  # of which figure 6 stats this many
    scale_low: int  # total versions, first measurement of figure 6
    scale_high: int  # total versions, second measurement of figure 6
    reps: int


FULL = Sizes(big=256 * MIB, listing=10_000, stats=1_000, small=2_000, writes=200, write_big=64 * MIB,
             scale_dir=1_000, scale_stats=100, scale_low=10_000, scale_high=1_000_000, reps=3)
QUICK = Sizes(big=16 * MIB, listing=500, stats=100, small=200, writes=20, write_big=16 * MIB,
              scale_dir=1_000, scale_stats=100, scale_low=10_000, scale_high=20_000, reps=1)


@dataclass
class Bench:
    """One S3 server's run: its servers, repository, mount and results."""

    server: str  # moto or s3rver
    s3: Any  # the S3 server (endpoint_url, access_key, secret_key, client())
    pg: Any  # the PostgreSQL server (create_database)
    work: Path
    sizes: Sizes
    sampler: RssSampler
    drop_reason: str | None  # why dropping the page cache is impossible here, or None
    bucket: str = "bench"
    db_url: str = ""
    mount: Mount | None = None
    mounts: list[Mount] = field(default_factory=list)  # every mount made, for cleanup
    results: list[Result] = field(default_factory=list)
    keys: dict[str, Any] = field(default_factory=dict)  # S3 keys of seeded files
    client: Any = None  # boto3 client for the baselines
    notes: list[str] = field(default_factory=list)  # remarks on the whole run (daemon log errors...)

    def add(self, result: Result) -> None:
        self.results.append(result)
        log(f"  {result.figure} {result.name}: {_fmt(result.value)} {result.unit}"
            + (f" (baseline {_fmt(result.baseline)}, ratio {_fmt(result.ratio)})" if result.baseline else "")
            + (f" [{result.note}]" if result.note else ""))

    def config(self, db_url: str, local_root: Path, **extra: Any) -> dict:
        return {"database": db_url, "default_s3_bucket": self.bucket, "s3_endpoint_url": self.s3.endpoint_url,
                "s3_access_key": self.s3.access_key, "s3_secret_key": self.s3.secret_key,
                "local_root": str(local_root), **extra}

    def new_mount(self, name: str, db_url: str) -> Mount:
        """Write the config of a repository on ``db_url``, init it, and return its (unmounted) Mount."""
        local_root = self.work / f"{name}-root"
        config_path = write_config(self.work / f"{name}.json", self.config(db_url, local_root))
        s3repofs("init", "--config", str(config_path))
        mount = Mount(config_path, local_root, self.work / f"{name}-mnt", self.work / f"{name}.log", self.sampler)
        self.mounts.append(mount)
        return mount

    def r(self, figure: str, name: str, value: float | None, unit: str, **kw: Any) -> Result:
        return Result(self.server, figure, name, value, unit, reps=kw.pop("reps", self.sizes.reps), **kw)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def mib(n: int) -> str:
    return f"{n // MIB} MiB"


def reps(b: Bench, fn: Callable[[], float]) -> float:
    """The median of ``b.sizes.reps`` calls of ``fn``."""
    return median([fn() for _ in range(b.sizes.reps)])


def mb_per_s(size: int, seconds: float) -> float:
    return size / MB / seconds


# --------------------------------------------------------------------------------------------
# Set-up shared by the figures
# --------------------------------------------------------------------------------------------

BIG = "bench/big/big.bin"
SMALL_4K = "bench/big/small4k.bin"  # beside the big file: its cold open is figure 2's TTFB baseline
# Read first after each cold remount (see cold_read); in a directory of its own so that no
# read-ahead of a directory's files (the daemon's prefetcher) can warm the measured files.
PRIMER = "bench/primer/primer4k.bin"
SMALL_DIR = "bench/small"
LIST_DIR = "bench/list"


def prepare(b: Bench, figures: list[str]) -> None:
    """Create the bucket, the repository and what the chosen figures read, then mount.

    Files are published before the mount, through the API with its own local_root, so the daemon
    starts with an empty cache and no cached metadata.
    """
    b.s3.create_bucket(b.bucket)
    b.client = b.s3.client()
    b.db_url = b.pg.create_database(f"bench_{b.server}")
    b.mount = b.new_mount("main", b.db_url)
    repo = seed.open_repo(b.config(b.db_url, b.work / "seeder-root", host_name=seed.ORIGIN_HOST))
    try:
        if {"warm", "cold"} & set(figures):
            took, b.keys["big"] = timed(lambda: seed.publish_random_file(repo, BIG, b.sizes.big))
            log(f"  seeded {mib(b.sizes.big)} file in {took:.1f} s")
            b.keys["small4k"] = seed.publish_bytes(repo, SMALL_4K, os.urandom(SMALL))
            b.keys["primer"] = seed.publish_bytes(repo, PRIMER, os.urandom(SMALL))
        if "small" in figures:
            paths = [f"{SMALL_DIR}/s{i:06d}.bin" for i in range(b.sizes.small)]
            took, b.keys["small"] = timed(lambda: seed.publish_many(repo, paths, SMALL))
            log(f"  seeded {len(paths)} small files through the API in {took:.1f} s")
        if "listing" in figures:
            rows = seed.flat_directory("bench", LIST_DIR.split("/", 1)[1], b.sizes.listing, "list")
            took, _ = timed(lambda: seed.insert_versions(b.db_url, b.bucket, rows))
            names = [f"f{i:07d}.dat" for i in range(b.sizes.listing)]
            seed.local_directory(b.work / "local-list", names)
            log(f"  inserted {b.sizes.listing} listing rows in {took:.1f} s")
    finally:
        repo.close()
    b.mount.mount()


def ls_l(directory: Path) -> float:
    """Seconds of ``ls -l DIR > /dev/null`` (a subprocess, as a user runs it)."""
    took, result = timed(lambda: subprocess.run(["ls", "-l", str(directory)], stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE, text=True))
    if result.returncode != 0:
        raise RuntimeError(f"ls -l {directory} failed: {result.stderr.strip()}")
    return took


def stat_all(paths: list[Path], size: int | None = None) -> float:
    """Seconds to os.stat every path (checking the size, if given)."""
    start = time.perf_counter()
    for path in paths:
        st = os.stat(path)
        if size is not None and st.st_size != size:
            raise RuntimeError(f"{path}: size {st.st_size}, expected {size}")
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# 1. Warm sequential read
# --------------------------------------------------------------------------------------------

def wait_for_cache_file(mount: Mount, path: Path, size: int, timeout: float = 60) -> Path:
    """The daemon's cache file of ``path``: a download lands (is verified and renamed into place)
    only after the reader has had its bytes, so it may appear a moment after the read ends."""
    cache_file = mount.cache_file(path)
    deadline = time.monotonic() + timeout
    while not (cache_file.is_file() and cache_file.stat().st_size == size):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no cache file {cache_file} of {size} bytes {timeout:.0f} s after reading {path}")
        time.sleep(0.05)
    return cache_file


def warm_read(b: Bench) -> None:
    """Reading the cached file through the mount vs reading the daemon's cache file directly."""
    size = b.sizes.big
    path = b.mount.published / BIG
    if read_file(path) != size:  # the first read fetches it; the kernel keeps the pages
        raise RuntimeError(f"{path}: short read")
    cache_file = wait_for_cache_file(b.mount, path, size)
    read_file(cache_file)

    def rate(p: Path) -> Callable[[], float]:
        def once() -> float:
            took, got = timed(lambda: read_file(p))
            if got != size:
                raise RuntimeError(f"read {got} bytes from {p}, expected {size}")
            return mb_per_s(size, took)
        return once

    direct = reps(b, rate(cache_file))
    mounted = reps(b, rate(path))
    b.add(b.r("1a", f"warm read {mib(size)}, page cache", mounted, "MB/s", baseline=direct,
              baseline_name="reading the daemon's cache file directly, page cache",
              target=Target("ratio", ">=", 0.6)))

    name = f"read {mib(size)} after drop_caches"
    if b.drop_reason:
        b.add(failed(b.server, "1b", name, "MB/s", f"n/a: {b.drop_reason}", Target("ratio", ">=", 0.45)))
        return

    def direct_cold() -> float:
        drop_caches()
        return rate(cache_file)()

    def mounted_cold() -> float:
        b.mount.remount(drop=True)  # a fresh daemon; the object stays in its disk cache
        return rate(path)()

    direct = reps(b, direct_cold)
    mounted = reps(b, mounted_cold)
    b.add(b.r("1b", name, mounted, "MB/s", baseline=direct,
              baseline_name="reading the cache file directly after drop_caches",
              target=Target("ratio", ">=", 0.45),
              note="mount: fresh remount after drop_caches, object in the daemon's disk cache"))


# --------------------------------------------------------------------------------------------
# 2. Cold read and time to first byte
# --------------------------------------------------------------------------------------------

def cold_read(b: Bench) -> None:
    """Fresh daemon, empty cache: read the big file through the mount vs boto3 downloads of it."""
    size = b.sizes.big
    directory = b.mount.published / BIG.rpartition("/")[0]
    big, small, primer = (b.mount.published / p for p in (BIG, SMALL_4K, PRIMER))
    rates, ttfb_big, ttfb_small = [], [], []
    for _ in range(b.sizes.reps):
        b.mount.remount(clear_cache=True)
        # The directory's lookup and the daemon's first database and S3 connections are paid once
        # per mount, not per file: pay them on the primer so both first-byte times compare files.
        os.stat(directory)
        read_file(primer)
        ttfb_small.append(first_byte(small)[0])
        first, total = first_byte(big, read_rest=True)
        ttfb_big.append(first)
        rates.append(mb_per_s(size, total))
    key = b.keys["big"]
    get = reps(b, lambda: mb_per_s(size, timed(lambda: get_object(b.client, b.bucket, key, size))[0]))
    b.add(b.r("2a", f"cold read {mib(size)}", median(rates), "MB/s", baseline=get,
              baseline_name="boto3 get_object, one stream, body read fully", target=Target("ratio", ">=", 1.0),
              note="cold: remount with the daemon's cache emptied; time from open() to EOF"))
    parallel = TransferConfig(max_concurrency=8, multipart_chunksize=8 * MIB)
    download = reps(b, lambda: mb_per_s(size, timed(lambda: download_file(b, key, parallel))[0]))
    b.add(b.r("2b", f"cold read {mib(size)} vs parallel", median(rates), "MB/s", baseline=download,
              baseline_name="boto3 download_file, 8 threads x 8 MiB parts, to a local file"))
    b.add(b.r("2c", f"first byte of cold {mib(size)} file", median(ttfb_big) * 1000, "ms",
              baseline=median(ttfb_small) * 1000, baseline_name="first byte of a cold 4 KiB file",
              target=Target("ratio", "<=", 2.0), note="open() + read(4096) after a fresh mount"))
    # What the server itself allows 2c: a server that prepares a whole object before its first byte
    # (moto does) delays any client's first byte of a large object, ranged GET or not.
    served_big = median([boto3_first_byte(b.client, b.bucket, key) for _ in range(b.sizes.reps)])
    served_small = median([boto3_first_byte(b.client, b.bucket, b.keys["small4k"]) for _ in range(b.sizes.reps)])
    b.add(b.r("2d", f"boto3 first byte of the {mib(size)} object", served_big * 1000, "ms",
              baseline=served_small * 1000, baseline_name="boto3 first byte of the 4 KiB object",
              note="the server's own ratio: get_object + read(4096)"))
    # The mount lands every byte in its disk cache; 2a's baseline keeps none. This one lands them too.
    one_get = TransferConfig(use_threads=False, multipart_threshold=2 * size)  # written to the file as it arrives
    landed = reps(b, lambda: mb_per_s(size, timed(lambda: download_file(b, key, one_get))[0]))
    b.add(b.r("2e", f"cold read {mib(size)} vs one stream to a file", median(rates), "MB/s", baseline=landed,
              baseline_name="boto3 download_file, one stream, to a local file"))


def first_byte(path: Path, read_rest: bool = False) -> tuple[float, float]:
    """(seconds to open + read the first 4096 bytes, seconds to EOF if ``read_rest``)."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        if len(os.read(fd, 4096)) == 0:
            raise RuntimeError(f"{path}: empty")
        first = time.perf_counter() - start
        if read_rest:
            view = memoryview(bytearray(MIB))
            total = 4096
            while n := os.readv(fd, [view]):
                total += n
            if total != os.fstat(fd).st_size:
                raise RuntimeError(f"{path}: read {total} bytes of {os.fstat(fd).st_size}")
    finally:
        os.close(fd)
    return first, time.perf_counter() - start


def boto3_first_byte(client: Any, bucket: str, key: str) -> float:
    """Seconds from get_object until its first 4096 bytes are read."""
    start = time.perf_counter()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        if len(body.read(4096)) == 0:
            raise RuntimeError(f"get_object {key}: empty")
        return time.perf_counter() - start
    finally:
        body.close()  # the rest is not read: the connection is dropped, not reused


def get_object(client: Any, bucket: str, key: str, size: int) -> None:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    got = 0
    while chunk := body.read(MIB):
        got += len(chunk)
    if got != size:
        raise RuntimeError(f"get_object {key}: {got} bytes, expected {size}")


def download_file(b: Bench, key: str, config: TransferConfig) -> None:
    dest = b.work / "download.tmp"
    try:
        b.client.download_file(b.bucket, key, str(dest), Config=config)
    finally:
        dest.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# 3. Listing and stat of a large directory
# --------------------------------------------------------------------------------------------

def listing(b: Bench) -> None:
    """`ls -l` and os.stat of a directory of many files, cold (fresh mount) and warm (again at once),
    beside the same on a local directory of empty files with the same names."""
    n, k = b.sizes.listing, b.sizes.stats
    directory, local = b.mount.published / LIST_DIR, b.work / "local-list"
    names = [f"f{i:07d}.dat" for i in range(n)]
    sample = names[:: n // k][:k]
    cold, warm, base = [], [], []
    for _ in range(b.sizes.reps):
        b.mount.remount()
        cold.append(ls_l(directory))
        warm.append(ls_l(directory))
        base.append(ls_l(local))
    if len(os.listdir(directory)) != n:
        raise RuntimeError(f"{directory} lists {len(os.listdir(directory))} entries, expected {n}")
    base_name = f"ls -l of a local directory of {n:,} empty files"
    b.add(b.r("3a", f"ls -l {n:,} files, cold", median(cold), "s", baseline=median(base), baseline_name=base_name,
              target=Target("value", "<=", 1.0)))
    b.add(b.r("3b", f"ls -l {n:,} files, warm", median(warm), "s", baseline=median(base), baseline_name=base_name,
              target=Target("value", "<=", 0.3)))
    cold, warm, base = [], [], []
    for _ in range(b.sizes.reps):
        b.mount.remount()
        cold.append(stat_all([directory / name for name in sample], 4096))
        warm.append(stat_all([directory / name for name in sample], 4096))
        base.append(stat_all([local / name for name in sample]))
    base_name = f"os.stat of {k:,} local files"
    b.add(b.r("3c", f"stat {k:,} of them, cold", median(cold), "s", baseline=median(base), baseline_name=base_name))
    b.add(b.r("3d", f"stat {k:,} of them, warm", median(warm), "s", baseline=median(base), baseline_name=base_name))


# --------------------------------------------------------------------------------------------
# 4. Many small files
# --------------------------------------------------------------------------------------------

def cat_all(directory: Path) -> int:
    """Like `cat DIR/*`: list the directory, then open, read and close each file in name order."""
    view = memoryview(bytearray(128 * 1024))  # cat's buffer size
    return sum(read_file(directory / name, view) for name in sorted(os.listdir(directory)))


def small_files(b: Bench) -> None:
    n = b.sizes.small
    directory = b.mount.published / SMALL_DIR
    cold, warm = [], []
    for _ in range(b.sizes.reps):
        b.mount.remount(clear_cache=True)
        took, total = timed(lambda: cat_all(directory))
        if total != n * SMALL:
            raise RuntimeError(f"read {total} bytes from {directory}, expected {n * SMALL}")
        cold.append(n / took)
        warm.append(n / timed(lambda: cat_all(directory))[0])
    keys = b.keys["small"]

    def get_all() -> float:
        start = time.perf_counter()
        for key in keys:
            b.client.get_object(Bucket=b.bucket, Key=key)["Body"].read()
        return n / (time.perf_counter() - start)

    base = reps(b, get_all)
    peer = BEST_PEER_FILES_PER_S.get(b.server)
    b.add(b.r("4a", f"read {n:,} x 4 KiB files, cold", median(cold), "files/s", baseline=base,
              baseline_name="boto3 get_object of the same objects, one after another",
              target=Target("value", ">=", 2 * peer) if peer else None,
              note=f"like cat DIR/* (listing included); target: 2 x best peer ({peer} files/s)"))
    b.add(b.r("4b", f"read {n:,} x 4 KiB files, warm", median(warm), "files/s", baseline=base,
              baseline_name="boto3 get_object of the same objects, one after another",
              target=Target("value", ">=", 3000)))


# --------------------------------------------------------------------------------------------
# 5. Publishing through the mount
# --------------------------------------------------------------------------------------------

def check_published(path: Path, size: int) -> None:
    state = os.getxattr(path, "user.s3repo.state")
    if state != b"published" or os.stat(path).st_size != size:
        raise RuntimeError(f"{path}: {state!r}, {os.stat(path).st_size} bytes after close; expected published, "
                           f"{size} bytes")


def publish(b: Bench) -> None:
    """Files written into published/ one after another (each close returns once durable) vs put_object."""
    n, size = b.sizes.writes, WRITE_SMALL
    base_dir = b.mount.published / "bench" / "writes"
    base_dir.mkdir(parents=True, exist_ok=True)
    rep_no = iter(range(1_000))

    def mount_small() -> float:
        directory = base_dir / f"small{next(rep_no)}"
        directory.mkdir()
        payloads = [os.urandom(size) for _ in range(n)]
        took, _ = timed(lambda: [write_file(directory / f"w{i:05d}.bin", data) for i, data in enumerate(payloads)])
        for i in range(n):
            check_published(directory / f"w{i:05d}.bin", size)
        return n / took

    def boto_small() -> float:
        prefix = f"baseline/put64k/{next(rep_no)}"
        payloads = [os.urandom(size) for _ in range(n)]
        took, _ = timed(lambda: [b.client.put_object(Bucket=b.bucket, Key=f"{prefix}/{i}", Body=data)
                                 for i, data in enumerate(payloads)])
        return n / took

    mounted, base = reps(b, mount_small), reps(b, boto_small)
    b.add(b.r("5a", f"publish {n} x 64 KiB files", mounted, "files/s", baseline=base,
              baseline_name="boto3 put_object of as many 64 KiB objects, one after another",
              target=Target("ratio", ">=", 1.0), note="open, write, close (returns once durable), one after another"))

    big = b.sizes.write_big

    def mount_big() -> float:
        path = base_dir / f"big{next(rep_no)}.bin"
        data = os.urandom(big)
        took, _ = timed(lambda: write_file(path, data))
        check_published(path, big)
        return mb_per_s(big, took)

    def boto_big() -> float:
        data = os.urandom(big)
        key = f"baseline/put-big/{next(rep_no)}"
        return mb_per_s(big, timed(lambda: b.client.put_object(Bucket=b.bucket, Key=key, Body=data))[0])

    mounted, base = reps(b, mount_big), reps(b, boto_big)
    b.add(b.r("5b", f"publish one {mib(big)} file", mounted, "MB/s", baseline=base,
              baseline_name=f"boto3 put_object of one {mib(big)} body", target=Target("ratio", ">=", 1.0),
              note="1 MiB writes, time from open() until close() returns"))


# --------------------------------------------------------------------------------------------
# 6. Metadata scale
# --------------------------------------------------------------------------------------------

def scale(b: Bench) -> None:
    """Cold `ls -l` and stat of a fixed directory with few vs many versions in the database.

    A repository of its own (database, local_root, mount), so the other figures' rows do not count.
    """
    s = b.sizes
    url = b.pg.create_database(f"scale_{b.server}")
    mount = b.new_mount("scale", url)
    directory = mount.published / "scale" / "fixed"
    sample = [directory / f"f{i:07d}.dat" for i in range(0, s.scale_dir, s.scale_dir // s.scale_stats)]

    def measure() -> tuple[float, float]:
        ls, st = [], []
        for _ in range(s.reps):
            mount.remount()
            ls.append(ls_l(directory))
            mount.remount()
            st.append(stat_all(sample, 4096))
        mount.umount()
        return median(ls), median(st)

    fixed = seed.flat_directory("scale", "fixed", s.scale_dir, "fixed")
    low_rows = s.scale_low - s.scale_dir
    took_low, _ = timed(lambda: seed.insert_versions(url, b.bucket, chain(fixed, seed.filler(0, low_rows, "scale"))))
    check_count(url, s.scale_low)
    b.add(b.r("6a", f"insert {s.scale_low:,} versions", took_low, "s", reps=1,
              note="COPY in one transaction, plus ANALYZE"))
    ls_low, stat_low = measure()

    high_rows = s.scale_high - s.scale_low
    took_high, _ = timed(lambda: seed.insert_versions(url, b.bucket, seed.filler(low_rows, high_rows, "scale")))
    check_count(url, s.scale_high)
    b.add(b.r("6b", f"insert {high_rows:,} more versions", took_high, "s", reps=1,
              note=f"{high_rows / took_high:,.0f} rows/s; ~70% expired, ~25% published, in 21 types"))
    ls_high, stat_high = measure()

    at = f"{s.scale_high:,} vs {s.scale_low:,} versions"
    b.add(b.r("6c", f"cold ls -l {s.scale_dir:,} files, {at}", ls_high, "s", baseline=ls_low,
              baseline_name=f"the same with {s.scale_low:,} versions in the database",
              target=Target("ratio", "<=", 1.5)))
    b.add(b.r("6d", f"cold stat {len(sample)} files, {at}", stat_high, "s", baseline=stat_low,
              baseline_name=f"the same with {s.scale_low:,} versions in the database",
              target=Target("ratio", "<=", 1.5)))


def check_count(url: str, expected: int) -> None:
    count = seed.count_versions(url)
    if count != expected:
        raise RuntimeError(f"the scale database holds {count} versions, expected {expected}")


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

def memory(b: Bench) -> Result:
    s = b.sampler
    return b.r("7", "daemon peak RSS", s.peak_kb * 1024 / MB if s.peak_kb else None, "MB",
               baseline=s.idle_kb * 1024 / MB if s.idle_kb else None,
               baseline_name="a daemon's RSS right after mounting", target=Target("value", "<=", 150),
               reps=1, note=f"max over every daemon of this server, sampled every 0.2 s and VmHWM; "
                            f"peak: {s.peak_where}")


# name -> (figure number, function), in the order they run
FIGURES: dict[str, tuple[str, Callable[[Bench], None]]] = {
    "warm": ("1", warm_read),
    "cold": ("2", cold_read),
    "listing": ("3", listing),
    "small": ("4", small_files),
    "publish": ("5", publish),
    "scale": ("6", scale),
}
