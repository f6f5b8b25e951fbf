"""The mount's metrics (s3repofs/metrics.py): counted where the work happens, with real parts (SQLite and
PostgreSQL, a local store and moto's S3 server, a fault proxy for retries), and shown three ways by a real
mount: MOUNTPOINT/.stats, ``s3repofs stats`` and the ``-o metrics=`` endpoint or textfile."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading
import urllib.request
import uuid
from pathlib import Path

import psycopg2
import pytest
from faultproxy import FaultProxy
from mount_helper import fuse_available, mounted, s3repofs, wait_for, write_config
from prometheus_client.parser import text_string_to_metric_families
from repo_fixtures import make_config

from s3repofs import S3Repo, metrics
from s3repofs.errors import StoreUnavailableError
from s3repofs.meta.db import Database
from s3repofs.mount.daemon import pid_file
from s3repofs.objects import retry
from s3repofs.ops.stats import latencies, quantile

needs_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3")


def sample(name: str, **labels: str) -> float:
    """One sample of this process's metrics, read through their exposition, as every view reads them."""
    return metrics.parse_samples(metrics.exposition().decode()).get(metrics.sample_key(name, labels), 0.0)


# -- counted where the work happens ------------------------------------------------------------------------


def test_an_upload_counts_the_version_and_its_bytes(repo):
    uploads, uploaded = sample("s3repofs_uploads_total"), sample("s3repofs_uploaded_bytes_total")
    repo.add_file("t/a").touch(os.urandom(1000)).upload()
    assert sample("s3repofs_uploads_total") == uploads + 1
    assert sample("s3repofs_uploaded_bytes_total") == uploaded + 1000


def test_a_cold_read_downloads_and_misses_and_a_warm_read_hits(repo):
    repo.add_file("t/a").touch(os.urandom(5000)).publish()
    repo.cache.clear()  # the upload kept the file as cached: this host reads it as another would
    hits, misses = sample("s3repofs_cache_hits_total"), sample("s3repofs_cache_misses_total")
    downloaded = sample("s3repofs_downloaded_bytes_total")

    repo.require_file("t/a").read_bytes()
    assert (sample("s3repofs_cache_hits_total"), sample("s3repofs_cache_misses_total")) == (hits, misses + 1)
    assert sample("s3repofs_downloaded_bytes_total") == downloaded + 5000

    repo.require_file("t/a").read_bytes()
    assert (sample("s3repofs_cache_hits_total"), sample("s3repofs_cache_misses_total")) == (hits + 1, misses + 1)
    assert sample("s3repofs_downloaded_bytes_total") == downloaded + 5000


def test_database_transactions_and_s3_requests_are_timed(repo):
    writes = sample("s3repofs_db_transaction_seconds_count", access="write")
    reads = sample("s3repofs_db_transaction_seconds_count", access="read")
    uploads = sample("s3repofs_s3_request_seconds_count", operation="upload")
    downloads = sample("s3repofs_s3_request_seconds_count", operation="download")
    repo.add_file("t/a").touch(b"abc").publish()
    repo.cache.clear()
    assert repo.require_file("t/a").read_bytes() == b"abc"

    assert sample("s3repofs_db_transaction_seconds_count", access="write") > writes
    assert sample("s3repofs_db_transaction_seconds_count", access="read") > reads
    assert sample("s3repofs_db_transaction_seconds_sum", access="write") > 0
    on_s3 = repo.config.object_dir is None  # the local store makes no S3 requests
    assert sample("s3repofs_s3_request_seconds_count", operation="upload") == uploads + on_s3
    assert sample("s3repofs_s3_request_seconds_count", operation="download") == downloads + on_s3


@pytest.mark.parametrize("fault, kind", [("503", "s3_request"), ("truncate", "download_part")])
def test_s3_retries_are_counted_by_kind(s3_server, tmp_path, monkeypatch, fault, kind):
    monkeypatch.setattr(retry, "BACKOFF_BASE", 0.005)
    bucket = f"test-{uuid.uuid4().hex}"
    s3_server.create_bucket(bucket)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        config = {"local_root": str(tmp_path / "writer"), "database": f"sqlite:///{tmp_path / 'repo.db'}",
                  **s3_server.repo_keys(bucket, proxy.endpoint_url)}
        with S3Repo(config) as writer:
            writer.create_repository()
            for name in "abc":
                writer.add_file(f"t/{name}").touch(os.urandom(20_000)).publish()
        # Every object's GET spoiled once: each read succeeds at its second attempt.
        proxy.configure(rate=1.0, kinds=[fault], methods=["GET"], at_most_once=True)
        before = {k: sample("s3repofs_retries_total", kind=k) for k in ("s3_request", "download_part")}
        with S3Repo({**config, "local_root": str(tmp_path / "reader")}) as reader:
            for name in "abc":
                reader.require_file(f"t/{name}").read_bytes()
        assert proxy.injected[fault] == 3
    s3_server.delete_bucket(bucket)
    after = {k: sample("s3repofs_retries_total", kind=k) for k in before}
    assert {k: after[k] - before[k] for k in before} == {k: 3 if k == kind else 0 for k in before}


def test_a_failed_upload_is_counted_with_its_request_retries(s3_server, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(retry, "BACKOFF_BASE", 0.005)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        config = {"local_root": str(tmp_path / "root"), "database": f"sqlite:///{tmp_path / 'repo.db'}",
                  **s3_server.repo_keys(s3_bucket, proxy.endpoint_url)}
        with S3Repo(config) as repo:
            repo.create_repository()
            rf = repo.add_file("t/a").touch(b"never stored")
            proxy.configure(rate=1.0, kinds=["503"], methods=["PUT"])  # every PUT refused: S3 is down
            failures, uploads = sample("s3repofs_upload_failures_total"), sample("s3repofs_uploads_total")
            retried = sample("s3repofs_retries_total", kind="s3_request")
            with pytest.raises(StoreUnavailableError):
                rf.upload()
    assert sample("s3repofs_upload_failures_total") == failures + 1
    assert sample("s3repofs_uploads_total") == uploads
    assert sample("s3repofs_retries_total", kind="s3_request") == retried + retry.ATTEMPTS - 1


def test_a_database_conflict_is_retried_and_counted(pg_url):
    db = Database(pg_url)
    db.run(lambda tx: tx.execute("CREATE TABLE held (id INTEGER)"))
    holder = psycopg2.connect(pg_url)
    holder.cursor().execute("LOCK TABLE held")  # in holder's open transaction, until its rollback
    threading.Timer(0.2, holder.rollback).start()
    before = sample("s3repofs_retries_total", kind="db_transaction")
    try:
        db.run(lambda tx: tx.execute("LOCK TABLE held NOWAIT"))  # lock_not_available (55P03) until the rollback
    finally:
        holder.close()
        db.close()
    assert sample("s3repofs_retries_total", kind="db_transaction") > before


def test_latencies_are_read_back_from_the_histogram_buckets():
    buckets = [(0.001, 0.0), (0.003, 50.0), (0.01, 100.0), (float("inf"), 100.0)]
    assert quantile(0.99, buckets) == pytest.approx(0.003 + 0.007 * 49 / 50)
    assert quantile(0.5, buckets) == pytest.approx(0.003)
    assert quantile(0.99, [(0.001, 0.0), (float("inf"), 10.0)]) == 0.001  # past the last bound: that bound
    child = metrics.S3_SECONDS.labels("test-operation")
    for seconds in (0.002, 0.002, 0.02):
        child.observe(seconds)
    found = latencies(metrics.parse_samples(metrics.exposition().decode()), "s3repofs_s3_request_seconds",
                      "operation")["test-operation"]
    assert (found.count, found.mean_seconds) == (3, pytest.approx(0.008))
    assert 0.01 < found.p99_seconds <= 0.03



def test_counts_from_many_threads_add_up_also_after_the_threads_end():
    """Hot counters and latencies are counted per thread without a lock; a reader sums every thread's."""
    hits = sample("s3repofs_cache_hits_total")
    child = metrics.FUSE_SECONDS.labels("test-threads")

    def count():
        for _ in range(1000):
            metrics.CACHE_HITS.inc()
            child.observe(0.0002)

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    count()  # and this thread's own
    assert sample("s3repofs_cache_hits_total") == hits + 9000
    assert sample("s3repofs_fuse_operation_seconds_count", op="test-threads") == 9000
    assert sample("s3repofs_fuse_operation_seconds_bucket", op="test-threads", le="0.0003") == 9000
    assert sample("s3repofs_fuse_operation_seconds_sum", op="test-threads") == pytest.approx(1.8)

# -- a real mount: .stats, s3repofs stats, the endpoint ---------------------------------------------------


@pytest.fixture
def mnt(repo_config_pair, tmp_path):
    with mounted(repo_config_pair, tmp_path) as mountpoint:
        (mountpoint / "published" / "docs").mkdir()
        yield mountpoint


@needs_fuse
def test_stats_file_is_read_only_and_never_listed(mnt):
    stats = mnt / ".stats"
    assert os.stat(stats).st_mode == 0o100444
    assert "s3repofs_uploads_in_flight 0.0" in stats.read_text().splitlines()
    assert ".stats" not in os.listdir(mnt)
    assert ".stats" not in subprocess.run(["ls", "-a", str(mnt)], capture_output=True, text=True, check=True).stdout
    assert ".stats" not in subprocess.run(["find", str(mnt)], capture_output=True, text=True, check=True).stdout
    with pytest.raises(OSError) as refused:
        open(stats, "w")
    assert refused.value.errno == errno.EROFS


@needs_fuse
def test_stats_move_after_writes_and_reads(mnt):
    def value(stats, name, **labels):
        return stats.get(metrics.sample_key(name, labels), 0.0)

    before = metrics.read_mount_stats(mnt)
    data = os.urandom(100_000)
    (mnt / "published/docs/f.bin").write_bytes(data)
    assert (mnt / "published/docs/f.bin").read_bytes() == data
    after = metrics.read_mount_stats(mnt)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("s3repofs_uploads_total") == 1
    assert moved("s3repofs_uploaded_bytes_total") == len(data)
    assert moved("s3repofs_cache_read_bytes_total") == len(data)
    assert moved("s3repofs_cache_hits_total") == 1  # the upload kept the written file as cached
    assert moved("s3repofs_fuse_operation_seconds_count", op="write") >= 1
    assert moved("s3repofs_fuse_operation_seconds_count", op="read") >= 1
    assert moved("s3repofs_cache_objects") == 1
    assert value(after, "s3repofs_uploads_in_flight") == 0


@needs_fuse
def test_stats_command_prints_a_table_and_json(mnt, tmp_path):
    (mnt / "published/docs/f.txt").write_text("hello")
    table = s3repofs("stats", str(mnt)).stdout
    assert "FUSE operation" in table and "\nwrite " in table
    assert "uploads:   0 in flight, 0 left to retry, 0 failed, 1 done" in table
    report = json.loads(s3repofs("stats", str(mnt), "--json").stdout)
    assert report["uploads"] == {"done": 1, "failed": 0, "in_flight": 0, "left_to_retry": 0}
    assert report["fuse"]["write"]["count"] >= 1 and report["fuse"]["write"]["p99_seconds"] > 0
    assert set(report["retries"]) == {"s3_request", "download_part", "download_digest", "db_transaction",
                                      "staged_upload"}

    elsewhere = s3repofs("stats", str(tmp_path), check=False)
    assert elsewhere.returncode == 3
    assert elsewhere.stderr == f"s3repofs: {tmp_path}: not an s3repofs mount (no .stats there)\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its sockets, found in /proc/net/tcp{,6} in state LISTEN)."""
    sockets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            sockets.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in sockets:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def daemon_pid(config: dict, mountpoint: Path) -> int:
    with S3Repo(config) as repo:
        return int(pid_file(repo, mountpoint).read_text())


@needs_fuse
def test_the_endpoint_serves_what_stats_shows(request, tmp_path):
    config, port = make_config(request, tmp_path, "sqlite-local"), free_port()
    with mounted(config, tmp_path, options=f"metrics=127.0.0.1:{port}") as mountpoint:
        assert listening_ports(daemon_pid(config, mountpoint)) == {port}
        served = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        shown = (mountpoint / ".stats").read_text()
    names = {family.name for family in text_string_to_metric_families(served)}
    assert names == {family.name for family in text_string_to_metric_families(shown)}
    assert {"s3repofs_fuse_operation_seconds", "s3repofs_uploads_in_flight", "s3repofs_cache_hits"} <= names


@needs_fuse
def test_a_mount_without_the_option_opens_no_port(request, tmp_path):
    config = make_config(request, tmp_path, "sqlite-local")
    with mounted(config, tmp_path) as mountpoint:
        assert listening_ports(daemon_pid(config, mountpoint)) == set()


@needs_fuse
def test_the_textfile_is_written_and_removed_at_unmount(request, tmp_path):
    config, textfile = make_config(request, tmp_path, "sqlite-local"), tmp_path / "s3repofs.prom"
    with mounted(config, tmp_path, options=f"metrics={textfile}") as mountpoint:
        assert "s3repofs_uploads_in_flight 0.0" in textfile.read_text().splitlines()
        assert listening_ports(daemon_pid(config, mountpoint)) == set()
    assert wait_for(lambda: not textfile.exists())


@needs_fuse
def test_a_bad_metrics_option_or_a_taken_port_fails_the_mount_in_one_line(request, tmp_path):
    config_path = write_config(make_config(request, tmp_path, "sqlite-local"), tmp_path / "c.json")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    s3repofs("init", "--config", str(config_path))
    mount = ("mount", str(mountpoint), "--config", str(config_path), "--log", str(tmp_path / "mount.log"), "-o")

    bad = s3repofs(*mount, "metrics=nowhere", check=False)
    assert (bad.returncode, bad.stderr) == (2, "s3repofs: -o metrics=nowhere: not HOST:PORT (e.g. 127.0.0.1:9567) "
                                               "nor an absolute path\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = s3repofs(*mount, f"metrics=127.0.0.1:{port}", check=False)
    assert refused.returncode == 1
    assert f"metrics endpoint http://127.0.0.1:{port}/metrics: Address already in use" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    assert not os.path.ismount(mountpoint)
