"""``s3repofs stats MOUNTPOINT``: print a mount's metrics (ops/stats.py) as a compact table, or as JSON."""

from __future__ import annotations

import argparse
import json

from ..ops import stats as stats_ops
from ..ops.stats import Latency


def add_commands(add, commands: dict) -> None:
    p = add("stats", "Show what the mount at MOUNTPOINT has done: FUSE operations and their latency, bytes, "
                     "cache hits, uploads, retries, database and S3 latency (read from MOUNTPOINT/.stats).")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print JSON")
    commands["stats"] = cmd_stats


def cmd_stats(args: argparse.Namespace) -> int:
    stats = stats_ops.gather(args.mountpoint)
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
        return 0
    from .main import human

    print(f"{'FUSE operation':<16}{'count':>10}{'mean':>10}{'p99':>10}  errors")
    for op, latency in sorted(stats.fuse.items(), key=lambda item: -item[1].count):
        errors = ", ".join(f"{name} {n}" for name, n in sorted(stats.fuse_errors.get(op, {}).items()))
        print(f"{op:<16}{_latency_columns(latency)}  {errors or '-'}")
    sizes = stats.bytes
    print(f"bytes:     {human(sizes['cache_read'])} read from the cache, {human(sizes['downloaded'])} downloaded, "
          f"{human(sizes['uploaded'])} uploaded")
    cache = stats.cache
    ratio = "-" if cache["hit_ratio"] is None else f"{cache['hit_ratio']:.1%}"
    print(f"cache:     {ratio} hits ({cache['hits']} hits, {cache['misses']} misses); {cache['objects']} objects, "
          f"{human(cache['bytes'])} of {human(cache['max_bytes'])}")
    uploads = stats.uploads
    print(f"uploads:   {uploads['in_flight']} in flight, {uploads['left_to_retry']} left to retry, "
          f"{uploads['failed']} failed, {uploads['done']} done")
    print("retries:   " + ", ".join(f"{kind.replace('_', ' ')} {n}" for kind, n in stats.retries.items()))
    print("database:  " + _latency_line(stats.database, "transactions"))
    print("S3:        " + _latency_line(stats.s3, "requests"))
    return 0


def _latency_columns(latency: Latency) -> str:
    return f"{latency.count:>10}{_duration(latency.mean_seconds):>10}{_duration(latency.p99_seconds):>10}"


def _latency_line(by_kind: dict[str, Latency], what: str) -> str:
    if not by_kind:
        return f"no {what}"
    return "; ".join(f"{kind} {latency.count} (mean {_duration(latency.mean_seconds)}, p99 "
                     f"{_duration(latency.p99_seconds)})" for kind, latency in by_kind.items())


def _duration(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"
