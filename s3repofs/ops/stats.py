"""``s3repofs stats``: a mount's metrics, read from its control file, summarised for a person (or as JSON).

Latencies come from the histograms' buckets the way Prometheus's ``histogram_quantile`` computes them: the
99th percentile is interpolated inside the bucket that holds it, so it is as coarse as the buckets
(``metrics.LATENCY_BUCKETS``, about three to a decade).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from .. import metrics


@dataclass(frozen=True)
class Latency:
    count: int
    mean_seconds: float
    p99_seconds: float  # estimated from the buckets; at most the last finite bound


@dataclass(frozen=True)
class MountStats:
    mountpoint: str
    fuse: dict[str, Latency]  # by FUSE operation, those served at least once
    fuse_errors: dict[str, dict[str, int]]  # operation -> errno name -> answers
    bytes: dict[str, int]  # cache_read, downloaded, uploaded
    cache: dict[str, float]  # hits, misses, hit_ratio (None before any open), objects, bytes, max_bytes
    uploads: dict[str, int]  # done, failed, in_flight, left_to_retry
    retries: dict[str, int]  # by kind
    database: dict[str, Latency]  # by access: read, write
    s3: dict[str, Latency]  # by store operation: upload, download, head, delete, list, access

    def as_dict(self) -> dict:
        return asdict(self)


def gather(mountpoint: str | os.PathLike) -> MountStats:
    """StatsUnavailableError if ``mountpoint`` is not an s3repofs mount (see ``metrics.read_mount_stats``)."""
    samples = metrics.read_mount_stats(mountpoint)

    def value(name: str, **labels: str) -> int:
        return int(samples.get(metrics.sample_key(name, labels), 0))

    hits, misses = value("s3repofs_cache_hits_total"), value("s3repofs_cache_misses_total")
    return MountStats(
        mountpoint=str(mountpoint),
        fuse=latencies(samples, "s3repofs_fuse_operation_seconds", "op"),
        fuse_errors=_errors(samples),
        bytes={"cache_read": value("s3repofs_cache_read_bytes_total"),
               "downloaded": value("s3repofs_downloaded_bytes_total"),
               "uploaded": value("s3repofs_uploaded_bytes_total")},
        cache={"hits": hits, "misses": misses, "hit_ratio": hits / (hits + misses) if hits + misses else None,
               "objects": value("s3repofs_cache_objects"), "bytes": value("s3repofs_cache_bytes"),
               "max_bytes": value("s3repofs_cache_max_bytes")},
        uploads={"done": value("s3repofs_uploads_total"), "failed": value("s3repofs_upload_failures_total"),
                 "in_flight": value("s3repofs_uploads_in_flight"),
                 "left_to_retry": value("s3repofs_uploads_left_to_retry")},
        retries=_by_label(samples, "s3repofs_retries_total", "kind"),
        database=latencies(samples, "s3repofs_db_transaction_seconds", "access"),
        s3=latencies(samples, "s3repofs_s3_request_seconds", "operation"))


def latencies(samples: dict[str, float], histogram: str, label: str) -> dict[str, Latency]:
    """Count, mean and 99th percentile of each ``label`` value of ``histogram`` that observed anything."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for name, labels, count in _split(samples):
        if name == histogram + "_bucket":
            buckets.setdefault(labels[label], []).append((float(labels["le"]), count))
    found = {}
    for value, bounds in sorted(buckets.items()):
        count = samples.get(metrics.sample_key(histogram + "_count", {label: value}), 0)
        if count:
            total = samples.get(metrics.sample_key(histogram + "_sum", {label: value}), 0.0)
            found[value] = Latency(int(count), total / count, quantile(0.99, sorted(bounds)))
    return found


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The ``q`` quantile of a histogram given as sorted (upper bound, cumulative count), +Inf last."""
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower  # past the last finite bound: its bound is all the buckets can tell
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return lower


def _by_label(samples: dict[str, float], counter: str, label: str) -> dict[str, int]:
    return {labels[label]: int(count) for name, labels, count in _split(samples) if name == counter}


def _errors(samples: dict[str, float]) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    for name, labels, count in _split(samples):
        if name == "s3repofs_fuse_errors_total" and count:
            found.setdefault(labels["op"], {})[labels["errno"]] = int(count)
    return found


def _split(samples: dict[str, float]) -> list[tuple[str, dict[str, str], float]]:
    return [(*metrics.split_key(key), value) for key, value in samples.items()]
