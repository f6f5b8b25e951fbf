"""Holds the process's metrics on one prometheus_client registry, which every layer updates and every view reads.

The layers update the instruments below where the work already happens: the FUSE layer's ``translated``
decorator (operations and their latency), the cache's fills (hits, misses), a download's chunks, the
repository's uploads, the S3 store's error table (request latency), the database's ``run`` and the
retry loops. The mount's daemon binds the gauges that are read, not counted (``watch``), and shows the
registry three ways, all the same text (``exposition``): an HTTP endpoint or a textfile
(``mount/exporter.py``) and the control file ``MOUNTPOINT/.stats`` (``mount/control.py``), which
``read_mount_stats`` reads back for ``s3repofs stats`` and ``s3repofs umount``.

Metrics are always collected, so the FUSE path pays for them on every request: each operation binds
its labelled child once, when it is decorated, and a request costs one observation. What a warm request
touches (its latency, a cache hit, the bytes it reads) is counted per thread, without a lock (``_PerThread``),
and summed only when the registry is read.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import threading
from bisect import bisect_left
from pathlib import Path
from threading import get_ident
from typing import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from .errors import RepoError

STATS_NAME = ".stats"  # the control file at the mount's root

# The ``*_created`` series (a Unix time per counter) would double the text for nothing a rate needs.
prometheus_client.disable_created_metrics()

REGISTRY = CollectorRegistry()
prometheus_client.ProcessCollector(registry=REGISTRY)  # process_*: the daemon's memory, CPU and descriptors

# Seconds: a warm FUSE request takes tens of microseconds, a cold open or an upload seconds.
LATENCY_BUCKETS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


class _PerThread:
    """Numbers that many threads add to without a lock: each thread adds to a row of its own, found by its
    thread id, and a reader sums the rows. A row has one writer, the one live thread with its id (a thread
    started later with the id of one that ended takes its row over, counts and all).

    Why not a lock: on warm reads of 4 KiB files (an open and a release each, ~180 us of daemon CPU), a
    lock per observation and prometheus_client's Counter (a lock per increment) cost the daemon ~0.7 % more
    CPU per file than these (benchmarks/metrics_cost.py): in the daemon, where each request finds the CPU's
    caches cold, every instruction added costs several times what it costs in a loop."""

    __slots__ = ("_rows", "_width", "_lock")

    def __init__(self, width: int) -> None:
        self._rows: dict[int, list] = {}
        self._width = width
        self._lock = threading.Lock()  # taken to add a row, and to copy the list of rows for a reader

    def _new_row(self) -> list:
        """The calling thread's row, made on its first use (``self._rows.get(get_ident())`` finds it after)."""
        with self._lock:
            return self._rows.setdefault(get_ident(), [0] * self._width)

    def _totals(self) -> list:
        with self._lock:
            rows = list(self._rows.values())
        return [sum(column) for column in zip(*rows)] if rows else [0] * self._width


class _LatencyChild(_PerThread):
    """One label value's histogram: per thread, a count per bucket (the last one past every bound: +Inf),
    then the sum."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(len(LATENCY_BUCKETS) + 2)

    def observe(self, seconds: float) -> None:
        row = self._rows.get(get_ident()) or self._new_row()
        row[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bound >= seconds: Prometheus's "le"
        row[-1] += seconds

    def snapshot(self) -> tuple[list[int], float]:
        totals = self._totals()
        return totals[:-1], totals[-1]


class Latencies:
    """A histogram of seconds by one label, exposed as prometheus_client's Histogram is (the same samples),
    but observed for a fraction of its cost: one bisect and no lock (``_PerThread``), where Histogram takes
    a lock per bucket and for the sum (~2.5 us a call here). Every FUSE request observes one."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self._children: dict[str, _LatencyChild] = {}
        self._lock = threading.Lock()
        REGISTRY.register(self)

    def labels(self, value: str) -> _LatencyChild:
        """The child of one label value (shown from now on, at 0 until observed): bind it once, observe often."""
        with self._lock:
            return self._children.setdefault(value, _LatencyChild())

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            children = list(self._children.items())
        for value, child in children:
            counts, total = child.snapshot()
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric([value], buckets, total)
        yield family


class HotCounter(_PerThread):
    """A counter without labels, exposed as prometheus_client's Counter is (the same samples), for what a
    warm request counts (a cache hit, the bytes it reads): added to per thread, without a lock."""

    __slots__ = ("name", "documentation")

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(1)
        self.name, self.documentation = name, documentation
        REGISTRY.register(self)

    def inc(self, amount: float = 1) -> None:
        row = self._rows.get(get_ident()) or self._new_row()
        row[0] += amount

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=float(self._totals()[0]))


FUSE_SECONDS = Latencies("s3repofs_fuse_operation_seconds", "FUSE operations served, and how long each took", "op")
FUSE_ERRORS = Counter("s3repofs_fuse_errors", "FUSE operations answered with an error, by errno",
                      ["op", "errno"], registry=REGISTRY)

CACHE_READ_BYTES = HotCounter("s3repofs_cache_read_bytes", "Bytes the mount served to readers from this host's "
                              "cache (or a version staged here)")
DOWNLOADED_BYTES = HotCounter("s3repofs_downloaded_bytes", "Bytes downloaded from the object store into the cache")
UPLOADED_BYTES = Counter("s3repofs_uploaded_bytes", "Bytes of versions uploaded to the object store",
                         registry=REGISTRY)
CACHE_HITS = HotCounter("s3repofs_cache_hits", "Opens of an uploaded version found whole in the cache")
CACHE_MISSES = HotCounter("s3repofs_cache_misses", "Opens of an uploaded version that had to wait for a download "
                          "(started, or joined)")
CACHE_BYTES = Gauge("s3repofs_cache_bytes", "Bytes in the cache: cached objects and downloads in flight",
                    registry=REGISTRY)
CACHE_OBJECTS = Gauge("s3repofs_cache_objects", "Objects in the cache", registry=REGISTRY)
CACHE_MAX_BYTES = Gauge("s3repofs_cache_max_bytes", "The cache's bound (cache_max_bytes)", registry=REGISTRY)

UPLOADS = Counter("s3repofs_uploads", "Versions uploaded to the object store and verified", registry=REGISTRY)
UPLOAD_FAILURES = Counter("s3repofs_upload_failures", "Uploads of a version that failed (it stays staged)",
                          registry=REGISTRY)
UPLOADS_IN_FLIGHT = Gauge("s3repofs_uploads_in_flight", "Uploads running now in a writer's close() or fsync()",
                          registry=REGISTRY)
UPLOADS_LEFT_TO_RETRY = Gauge("s3repofs_uploads_left_to_retry", "Versions whose upload failed here, left to the "
                              "background retry", registry=REGISTRY)

RETRIES = Counter("s3repofs_retries", "Attempts made again after a transient failure, by kind", ["kind"],
                  registry=REGISTRY)
# Each kind's child, bound here once (and shown from the start, at 0).
REQUEST_RETRIES = RETRIES.labels(kind="s3_request")  # an S3 request, by the HTTP client (botocore or s3http)
PART_RETRIES = RETRIES.labels(kind="download_part")  # the rest of a download's part, asked for again
DIGEST_RETRIES = RETRIES.labels(kind="download_digest")  # a whole object downloaded again: its digest did not match
TRANSACTION_RETRIES = RETRIES.labels(kind="db_transaction")  # a database transaction run again
STAGED_UPLOAD_RETRIES = RETRIES.labels(kind="staged_upload")  # a staged version's upload tried again

DB_SECONDS = Latencies("s3repofs_db_transaction_seconds", "Database transactions (Database.run, retries "
                       "included), by access", "access")
DB_READ_SECONDS = DB_SECONDS.labels("read")
DB_WRITE_SECONDS = DB_SECONDS.labels("write")
S3_SECONDS = Latencies("s3repofs_s3_request_seconds", "S3 store operations, from the request to the end of its "
                       "answer (a download's: its last byte), by operation", "operation")


class StatsUnavailableError(RepoError):
    """A mount's metrics cannot be read: not an s3repofs mount, or its daemon is gone."""

    errno = _errno.ENOENT
    exit_status = 3


def exposition() -> bytes:
    """The registry in Prometheus's text format: what the endpoint, the textfile and ``.stats`` show."""
    return prometheus_client.generate_latest(REGISTRY)


def watch(cache_usage: Callable, upload_counts: Callable) -> None:
    """Read the gauges from this process's cache (``LocalCache.usage``) and mount (``Tree.upload_counts``) at
    each exposition: what they already track, never a scan of the disk."""
    CACHE_BYTES.set_function(lambda: cache_usage().used_bytes)
    CACHE_OBJECTS.set_function(lambda: cache_usage().objects)
    CACHE_MAX_BYTES.set_function(lambda: cache_usage().max_bytes)
    UPLOADS_IN_FLIGHT.set_function(lambda: upload_counts().in_flight)
    UPLOADS_LEFT_TO_RETRY.set_function(lambda: upload_counts().left_to_retry)


def errno_name(number: int | None) -> str:
    """``ENOENT`` for 2: the value of the ``errno`` label."""
    return _errno.errorcode.get(number, str(number)) if number else "EIO"


# -- reading a mount's metrics back -------------------------------------------------------------------


def read_mount_stats(mountpoint: str | os.PathLike) -> dict[str, float]:
    """The metrics of the mount at ``mountpoint``, read from its control file: every sample by its name as
    Prometheus writes it, labels included (sorted), e.g. ``s3repofs_uploads_in_flight`` or
    ``s3repofs_fuse_operation_seconds_count{op="read"}``. StatsUnavailableError if there is no s3repofs
    mount there (or its daemon is gone)."""
    path = Path(mountpoint) / STATS_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StatsUnavailableError(f"{mountpoint}: not an s3repofs mount (no {STATS_NAME} there)") from None
    except OSError as exc:  # ENOTCONN: the daemon died with the mount in place
        raise StatsUnavailableError(f"{mountpoint}: cannot read {STATS_NAME}: {exc.strerror or exc}") from None
    return parse_samples(text)


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text as {sample key: value} (see ``read_mount_stats``; ``sample_key`` makes the keys)."""
    return {sample_key(sample.name, sample.labels): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample_key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


_KEY = re.compile(r"([^{]+)(?:\{(.*)\})?")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def split_key(key: str) -> tuple[str, dict[str, str]]:
    """The sample name and labels of a ``sample_key`` (label values here never hold a quote)."""
    name, labels = _KEY.fullmatch(key).groups()
    return name, dict(_LABEL.findall(labels or ""))
