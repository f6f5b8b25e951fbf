"""The figures: each measures s3repofs through the mount beside a baseline measured in the same run,
and beside its peers (s3fs, rclone, JuiceFS) measured the same way over the same files.

A figure function takes the ``Bench`` of one S3 server and adds ``Result`` rows as soon as each is
measured, so a failure later in a figure keeps what was measured before it. Repetitions: each
value and each baseline is the median of ``sizes.reps`` runs (3 unless --quick). s3repofs's mount
and a peer's are measured by the same functions (both have ``root`` and ``remount``); a peer is
unmounted as soon as its part of a figure ends.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable

import peers
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
from peers import PeerMount
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
    peer_names: list[str] = field(default_factory=list)  # the peers chosen whose binary is here
    peers: list[PeerMount] = field(default_factory=list)  # those set up on this server, with their files
    files: dict[str, str] = field(default_factory=dict)  # path -> S3 key of each real file seeded
    peer_cache: dict[str, Any] = field(default_factory=dict)  # peer values shared by two figures

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
    """Create the bucket, the repository and what the chosen figures read, give the peers the same
    files, then mount.

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
            b.files[BIG] = b.keys["big"]
        if {"small", "parallel"} & set(figures):
            paths = small_paths(b)
            took, b.keys["small"] = timed(lambda: seed.publish_many(repo, paths, SMALL))
            b.files.update(zip(paths, b.keys["small"]))
            log(f"  seeded {len(paths)} small files through the API in {took:.1f} s")
        if "listing" in figures:
            rows = seed.flat_directory("bench", LIST_DIR.split("/", 1)[1], b.sizes.listing, "list")
            took, _ = timed(lambda: seed.insert_versions(b.db_url, b.bucket, rows))
            seed.local_directory(b.work / "local-list", listing_names(b))
            log(f"  inserted {b.sizes.listing} listing rows in {took:.1f} s")
    finally:
        repo.close()
    prepare_peers(b, figures)
    b.mount.mount()


def small_paths(b: Bench) -> list[str]:
    return [f"{SMALL_DIR}/s{i:06d}.bin" for i in range(b.sizes.small)]


def listing_names(b: Bench) -> list[str]:
    return [f"f{i:07d}.dat" for i in range(b.sizes.listing)]


def prepare_peers(b: Bench, figures: list[str]) -> None:
    """Set up each chosen peer on this server and give it the files s3repofs has: the same bytes for
    the files the figures read, blank 4 KiB files for the listing (s3repofs's are rows without
    objects). A peer whose set-up fails is left out of this server's figures, with the reason noted."""
    wanted = {"warm", "cold", "listing", "small", "parallel", "publish"} & set(figures)
    if not b.peer_names or not wanted:
        return
    blanks = [f"{LIST_DIR}/{name}" for name in listing_names(b)] if "listing" in figures else []
    files = peers.Files(dict(b.files), blanks, SMALL)
    seeded: set[str] = set()  # buckets already given the files (s3fs and rclone share one)
    for name in b.peer_names:
        peer = None
        try:
            peer = peers.new_peer(name, b.work / "peers", b.s3, b.pg, b.server)
            b.peers.append(peer)  # from here on run.py cleans it up, on Ctrl-C too
            if not (peer.kind.plain and peer.bucket in seeded):
                took, _ = timed(lambda: peers.seed(peer, b.client, b.bucket, files))
                log(f"  gave {name} the same {len(files.copies)} files and {len(files.blanks)} blank ones "
                    f"in {took:.1f} s" + (" (in the bucket it shares with the other plain peers)"
                                          if peer.kind.plain else " (through its mount)"))
                seeded.add(peer.bucket)
        except Exception as exc:  # noqa: BLE001 - the other peers and s3repofs go on
            log(f"  ! peer {name}: set-up failed: {exc}")
            b.notes.append(f"peer {name}: set-up failed, its column is n/a on {b.server}: {exc}")
            if peer is not None:
                peer.cleanup()
                b.peers.remove(peer)


def measure_peers(b: Bench, what: str, measure: Callable[[PeerMount], Any]) -> dict[str, Any]:
    """``measure(peer)`` for every peer set up on this server, each unmounted afterwards; a peer that
    fails gets None (its error logged and noted), and the others go on."""
    values: dict[str, Any] = {}
    for peer in b.peers:
        try:
            values[peer.name] = value = measure(peer)
            log(f"    {peer.name}: {', '.join(map(_fmt, value)) if isinstance(value, tuple) else _fmt(value)}")
        except Exception as exc:  # noqa: BLE001 - one peer's failure must not stop the figure
            log(f"  ! {peer.name} failed in {what}: {exc}; its log ends: {peer.log_tail(3)}")
            b.notes.append(f"peer {peer.name} failed in {what}: {exc}")
            values[peer.name] = None
        finally:
            peer.umount()
    return values


def column(values: dict[str, Any], index: int | None = None) -> dict[str, float | None]:
    """One figure's peer values out of ``measure_peers``' (an item of each tuple when ``index`` is given)."""
    return {name: (v if index is None or v is None else v[index]) for name, v in values.items()}


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
        return lambda: read_rate(p, size)

    direct = reps(b, rate(cache_file))
    mounted = reps(b, rate(path))
    b.add(b.r("1a", f"warm read {mib(size)}, page cache", mounted, "MB/s", baseline=direct,
              baseline_name="reading the daemon's cache file directly, page cache",
              target=Target("ratio", ">=", 0.6), peers=column(peer_big_reads(b), 1),
              note="peers: read again at once after a cold read of a fresh mount"))

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


def read_rate(path: Path, size: int) -> float:
    """MB/s of reading ``path`` whole (1 MiB reads), which must hold ``size`` bytes."""
    took, got = timed(lambda: read_file(path))
    if got != size:
        raise RuntimeError(f"read {got} bytes from {path}, expected {size}")
    return mb_per_s(size, took)


def peer_big_reads(b: Bench) -> dict[str, tuple[float, float] | None]:
    """Each peer's (cold, warm) MB/s on the big file, measured once for figures 1a and 2a: per
    repetition a fresh mount with an emptied cache, the directory looked up (as s3repofs's cold read
    does), the file read whole (cold), then again at once (warm)."""
    if "big" not in b.peer_cache:
        size = b.sizes.big

        def measure(peer: PeerMount) -> tuple[float, float]:
            path = peer.root / BIG
            cold, warm = [], []
            for _ in range(b.sizes.reps):
                peer.remount(clear_cache=True)
                os.stat(path.parent)
                cold.append(read_rate(path, size))
                warm.append(read_rate(path, size))
            return median(cold), median(warm)

        b.peer_cache["big"] = measure_peers(b, f"the {mib(size)} reads", measure)
    return b.peer_cache["big"]


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
              note="cold: remount with the daemon's cache emptied; time from open() to EOF",
              peers=column(peer_big_reads(b), 0)))
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
    beside the same on a local directory of empty files with the same names, and on each peer."""
    n, k = b.sizes.listing, b.sizes.stats
    local = b.work / "local-list"
    names = listing_names(b)
    sample = names[:: n // k][:k]

    def measure(mount: Mount | PeerMount) -> tuple[float, float, float, float]:
        return list_and_stat(b, mount, mount.root / LIST_DIR, sample)

    ls_cold, ls_warm, stat_cold, stat_warm = measure(b.mount)
    on_peers = measure_peers(b, "the listing", measure)
    ls_base = median([ls_l(local) for _ in range(b.sizes.reps)])
    stat_base = median([stat_all([local / name for name in sample]) for _ in range(b.sizes.reps)])
    base_name = f"ls -l of a local directory of {n:,} empty files"
    b.add(b.r("3a", f"ls -l {n:,} files, cold", ls_cold, "s", baseline=ls_base, baseline_name=base_name,
              target=Target("value", "<=", 1.0), peers=column(on_peers, 0)))
    b.add(b.r("3b", f"ls -l {n:,} files, warm", ls_warm, "s", baseline=ls_base, baseline_name=base_name,
              target=Target("value", "<=", 0.3), peers=column(on_peers, 1)))
    base_name = f"os.stat of {k:,} local files"
    b.add(b.r("3c", f"stat {k:,} of them, cold", stat_cold, "s", baseline=stat_base, baseline_name=base_name,
              peers=column(on_peers, 2)))
    b.add(b.r("3d", f"stat {k:,} of them, warm", stat_warm, "s", baseline=stat_base, baseline_name=base_name,
              peers=column(on_peers, 3)))


def list_and_stat(b: Bench, mount: Mount | PeerMount, directory: Path,
                  sample: list[str]) -> tuple[float, float, float, float]:
    """Medians of (ls -l cold, ls -l warm, stat of the sample cold, warm), each repetition of each a
    fresh mount with its cache emptied."""
    ls_cold, ls_warm, stat_cold, stat_warm = [], [], [], []
    for _ in range(b.sizes.reps):
        mount.remount(clear_cache=True)
        ls_cold.append(ls_l(directory))
        ls_warm.append(ls_l(directory))
    if len(os.listdir(directory)) != b.sizes.listing:
        raise RuntimeError(f"{directory} lists {len(os.listdir(directory))} entries, expected {b.sizes.listing}")
    for _ in range(b.sizes.reps):
        mount.remount(clear_cache=True)
        stat_cold.append(stat_all([directory / name for name in sample], SMALL))
        stat_warm.append(stat_all([directory / name for name in sample], SMALL))
    return median(ls_cold), median(ls_warm), median(stat_cold), median(stat_warm)


# --------------------------------------------------------------------------------------------
# 4. Many small files
# --------------------------------------------------------------------------------------------

def cat_all(directory: Path) -> int:
    """Like `cat DIR/*`: list the directory, then open, read and close each file in name order."""
    view = memoryview(bytearray(128 * 1024))  # cat's buffer size
    return sum(read_file(directory / name, view) for name in sorted(os.listdir(directory)))


def small_files(b: Bench) -> None:
    n = b.sizes.small

    def measure(mount: Mount | PeerMount) -> tuple[float, float]:
        return cat_cold_warm(b, mount.root / SMALL_DIR, mount)

    cold, warm = measure(b.mount)
    on_peers = measure_peers(b, "the small files", measure)
    keys = b.keys["small"]

    def get_all() -> float:
        start = time.perf_counter()
        for key in keys:
            b.client.get_object(Bucket=b.bucket, Key=key)["Body"].read()
        return n / (time.perf_counter() - start)

    base = reps(b, get_all)
    peer = BEST_PEER_FILES_PER_S.get(b.server)
    b.add(b.r("4a", f"read {n:,} x 4 KiB files, cold", cold, "files/s", baseline=base,
              baseline_name="boto3 get_object of the same objects, one after another",
              target=Target("value", ">=", 2 * peer) if peer else None, peers=column(on_peers, 0),
              note=f"like cat DIR/* (listing included); target: 2 x best peer ({peer} files/s)"))
    b.add(b.r("4b", f"read {n:,} x 4 KiB files, warm", warm, "files/s", baseline=base,
              baseline_name="boto3 get_object of the same objects, one after another",
              target=Target("value", ">=", 3000), peers=column(on_peers, 1)))


def cat_cold_warm(b: Bench, directory: Path, mount: Mount | PeerMount) -> tuple[float, float]:
    """Medians of files/s of cat_all over ``directory``: cold (fresh mount, cache emptied), then warm."""
    n = b.sizes.small
    cold, warm = [], []
    for _ in range(b.sizes.reps):
        mount.remount(clear_cache=True)
        took, total = timed(lambda: cat_all(directory))
        if total != n * SMALL:
            raise RuntimeError(f"read {total} bytes from {directory}, expected {n * SMALL}")
        cold.append(n / took)
        warm.append(n / timed(lambda: cat_all(directory))[0])
    return median(cold), median(warm)


# --------------------------------------------------------------------------------------------
# 5. Publishing through the mount
# --------------------------------------------------------------------------------------------

def check_published(path: Path, size: int) -> None:
    state = os.getxattr(path, "user.s3repo.state")
    if state != b"published" or os.stat(path).st_size != size:
        raise RuntimeError(f"{path}: {state!r}, {os.stat(path).st_size} bytes after close; expected published, "
                           f"{size} bytes")


def check_durable(b: Bench, mount: Mount | PeerMount, path: Path, size: int) -> None:
    """That a file whose close() returned is durable: published for s3repofs; for a peer that stores a
    file as one object, that object is in S3 with every byte (checked right after the close, so a
    peer whose close returned before its upload fails here); JuiceFS's blocks have no such name, so
    only its size is checked (it runs without --writeback: close() waits for the upload)."""
    if not isinstance(mount, PeerMount):
        check_published(path, size)
        return
    if mount.kind.plain:
        key = path.relative_to(mount.root).as_posix()
        stored = b.client.head_object(Bucket=mount.bucket, Key=key)["ContentLength"]
        if stored != size:
            raise RuntimeError(f"{mount.name}: s3://{mount.bucket}/{key} holds {stored} bytes after close, "
                               f"expected {size}")
    elif os.stat(path).st_size != size:
        raise RuntimeError(f"{path}: {os.stat(path).st_size} bytes after close, expected {size}")


def publish(b: Bench) -> None:
    """Files written one after another (each close returns once durable) vs put_object: into
    s3repofs's published/, and into each peer's mount (a fresh mount for each repetition)."""
    n, size, big = b.sizes.writes, WRITE_SMALL, b.sizes.write_big
    rep_no = iter(range(1_000))

    def small_rate(mount: Mount | PeerMount) -> float:
        directory = mount.root / "bench" / "writes" / f"small{next(rep_no)}"
        directory.mkdir(parents=True)
        payloads = [os.urandom(size) for _ in range(n)]
        paths = [directory / f"w{i:05d}.bin" for i in range(n)]
        took, _ = timed(lambda: [write_file(path, data) for path, data in zip(paths, payloads)])
        for path in reversed(paths):  # the last close first: its upload is the one that could still run
            check_durable(b, mount, path, size)
        return n / took

    def big_rate(mount: Mount | PeerMount) -> float:
        path = mount.root / "bench" / "writes" / f"big{next(rep_no)}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(big)
        took, _ = timed(lambda: write_file(path, data))
        check_durable(b, mount, path, big)
        return mb_per_s(big, took)

    def on_peer(peer: PeerMount) -> tuple[float, float]:
        return tuple(median([fresh(peer, rate) for _ in range(b.sizes.reps)]) for rate in (small_rate, big_rate))

    def fresh(peer: PeerMount, rate: Callable[[PeerMount], float]) -> float:
        peer.remount(clear_cache=True)
        return rate(peer)

    def boto_small() -> float:
        prefix = f"baseline/put64k/{next(rep_no)}"
        payloads = [os.urandom(size) for _ in range(n)]
        took, _ = timed(lambda: [b.client.put_object(Bucket=b.bucket, Key=f"{prefix}/{i}", Body=data)
                                 for i, data in enumerate(payloads)])
        return n / took

    def boto_big() -> float:
        data = os.urandom(big)
        key = f"baseline/put-big/{next(rep_no)}"
        return mb_per_s(big, timed(lambda: b.client.put_object(Bucket=b.bucket, Key=key, Body=data))[0])

    mounted_small = reps(b, lambda: small_rate(b.mount))
    mounted_big = reps(b, lambda: big_rate(b.mount))
    on_peers = measure_peers(b, "the writes", on_peer)
    b.add(b.r("5a", f"publish {n} x 64 KiB files", mounted_small, "files/s", baseline=reps(b, boto_small),
              baseline_name="boto3 put_object of as many 64 KiB objects, one after another",
              target=Target("ratio", ">=", 1.0), peers=column(on_peers, 0),
              note="open, write, close (returns once durable), one after another"))
    b.add(b.r("5b", f"publish one {mib(big)} file", mounted_big, "MB/s", baseline=reps(b, boto_big),
              baseline_name=f"boto3 put_object of one {mib(big)} body", target=Target("ratio", ">=", 1.0),
              peers=column(on_peers, 1), note="1 MiB writes, time from open() until close() returns"))


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
# 8. Parallel work
# --------------------------------------------------------------------------------------------

WORKERS = 8  # readers (cat processes under xargs -P) and writer processes of figure 8; boto3's threads


def parallel(b: Bench) -> None:
    """Eight readers over cold small files (`xargs -P8 cat`) and eight writer processes, beside boto3
    with eight threads doing the same GETs / PUTs: a daemon that serialises its callers (a global
    lock, one connection, one thread) falls behind here, however fast it is for one caller."""
    n, writes = b.sizes.small, b.sizes.writes
    rep_no = iter(range(1_000))

    def read_rate(mount: Mount | PeerMount) -> float:
        mount.remount(clear_cache=True)
        return xargs_cat(mount.root / SMALL_DIR, n)

    def write_rate(mount: Mount | PeerMount) -> float:
        if isinstance(mount, PeerMount):
            mount.remount(clear_cache=True)
        directory = mount.root / "bench" / "parallel" / f"w{next(rep_no)}"
        directory.mkdir(parents=True)
        paths = [directory / f"p{i:05d}.bin" for i in range(writes)]
        took = parallel_writes(paths, WRITE_SMALL)
        for path in reversed(paths):
            check_durable(b, mount, path, WRITE_SMALL)
        return writes / took

    def on_mount(mount: Mount | PeerMount) -> tuple[float, float]:
        return reps(b, lambda: read_rate(mount)), reps(b, lambda: write_rate(mount))

    mounted_read, mounted_write = on_mount(b.mount)
    on_peers = measure_peers(b, "the parallel work", on_mount)
    keys = b.keys["small"]

    def boto_gets() -> float:
        with ThreadPoolExecutor(WORKERS) as pool:
            took, _ = timed(lambda: list(pool.map(
                lambda key: b.client.get_object(Bucket=b.bucket, Key=key)["Body"].read(), keys)))
        return n / took

    def boto_puts() -> float:
        prefix = f"baseline/parallel/{next(rep_no)}"
        payloads = [os.urandom(WRITE_SMALL) for _ in range(writes)]
        with ThreadPoolExecutor(WORKERS) as pool:
            took, _ = timed(lambda: list(pool.map(
                lambda item: b.client.put_object(Bucket=b.bucket, Key=f"{prefix}/{item[0]}", Body=item[1]),
                enumerate(payloads))))
        return writes / took

    b.add(b.r("8a", f"read {n:,} x 4 KiB cold files, {WORKERS} readers", mounted_read, "files/s",
              baseline=reps(b, boto_gets), baseline_name=f"boto3 get_object of the same objects, {WORKERS} threads",
              peers=column(on_peers, 0), note=f"listing, then xargs -P{WORKERS} cat; fresh mount, cache emptied"))
    b.add(b.r("8b", f"publish {writes} x 64 KiB files, {WORKERS} writer processes", mounted_write, "files/s",
              baseline=reps(b, boto_puts), baseline_name=f"boto3 put_object of as many objects, {WORKERS} threads",
              peers=column(on_peers, 1), note="each close() returns once durable"))


def xargs_cat(directory: Path, n: int) -> float:
    """files/s of listing ``directory`` and reading every file with ``xargs -P8 cat`` (to /dev/null)."""
    batch = math.ceil(n / (4 * WORKERS))  # four batches per reader: none idles while others work
    start = time.perf_counter()
    names = sorted(os.listdir(directory))
    result = subprocess.run(["xargs", "-0", f"-P{WORKERS}", f"-n{batch}", "cat"], input=b"\0".join(
        name.encode() for name in names), cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.perf_counter() - start
    if result.returncode != 0 or len(names) != n:
        raise RuntimeError(f"xargs cat in {directory} ({len(names)} files, expected {n}) failed "
                           f"({result.returncode}): {result.stderr.decode(errors='replace').strip()[-300:]}")
    return n / took


def parallel_writes(paths: list[Path], size: int) -> float:
    """Seconds for WORKERS processes (forked, their data ready) to write ``paths`` between them, each
    file opened, written and closed in turn; from the start signal until the last process exits."""
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(WORKERS + 1)
    workers = [context.Process(target=_writer, args=(paths[i::WORKERS], size, ready), daemon=True)
               for i in range(WORKERS)]
    for worker in workers:
        worker.start()
    ready.wait(timeout=60)
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    took = time.perf_counter() - start
    failures = [w.exitcode for w in workers if w.exitcode != 0]
    if failures:
        raise RuntimeError(f"{len(failures)} of {WORKERS} writer processes failed (exit {failures[0]})")
    return took


def _writer(paths: list[Path], size: int, ready: Any) -> None:
    """One writer process: its payloads made before the start signal, then written one after another."""
    payloads = [os.urandom(size) for _ in paths]
    ready.wait(timeout=60)
    for path, data in zip(paths, payloads):
        write_file(path, data)


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
    "parallel": ("8", parallel),
}
