"""Test data: real files through the Python API, and metadata-only versions through SQL.

Real files (what the read figures open) go through ``S3Repo.add_file().publish()`` so their objects,
rows and md5s are exactly what s3repofs itself writes.

Metadata-only versions (listing and scale figures) are bulk-inserted with PostgreSQL's COPY in one
transaction per batch: s3repofs has no public bulk API (``MetaStore.insert_version`` plus
``set_content``, ``mark_uploaded`` and ``publish`` are four transactions per version, which would take
minutes for a million rows), and listing or stat never reads an object, so their keys are fake.
The columns are those of ``s3repofs/meta/metastore.py`` (schema version 1).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import psycopg2
from harness import MIB

VERSION_COLUMNS = ("file_type", "dir", "name", "state", "storage", "tier", "bucket", "s3_key", "size", "md5",
                   "origin_host", "mode", "uid", "gid", "publish_pending", "created_at", "uploaded_at",
                   "published_at", "expired_at")
ORIGIN_HOST = "bench-seeder"


# --------------------------------------------------------------------------------------------
# Real files through the Python API
# --------------------------------------------------------------------------------------------

def open_repo(config: dict):
    """An S3Repo for seeding. Its own local_root and host name keep the daemon's cache and staged
    versions untouched: the daemon's cache holds only what the daemon itself fetched."""
    from s3repofs import S3Repo  # the package under test (harness.use_code put it on sys.path)

    return S3Repo(config)


def publish_bytes(repo, path: str, data: bytes) -> str:
    """Publish ``data`` at ``path``; returns the version's S3 key."""
    rf = repo.add_file(path=path)
    rf.touch(data)
    rf.publish()
    return rf.s3_key


def publish_random_file(repo, path: str, size: int) -> str:
    """Publish ``size`` random bytes at ``path``, written in 1 MiB blocks (never all in memory)."""
    rf = repo.add_file(path=path)
    with rf.open("wb") as f:
        for offset in range(0, size, MIB):
            f.write(os.urandom(min(MIB, size - offset)))
    rf.publish()
    return rf.s3_key


def publish_many(repo, paths: list[str], size: int, threads: int = 8) -> list[str]:
    """Publish distinct random ``size``-byte files at ``paths`` in parallel; returns their S3 keys."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda p: publish_bytes(repo, p, os.urandom(size)), paths))


# --------------------------------------------------------------------------------------------
# Metadata-only versions through SQL
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FakeVersion:
    file_type: str
    dir: str
    name: str
    state: str  # published, expired or unpublished
    key: str
    size: int = 4096


def _row(v: FakeVersion, bucket: str, now: float) -> str:
    """One line of COPY's text format (tab-separated, \\N for NULL); names hold no tab or backslash."""
    uploaded = v.state != "unpublished"
    values = (
        v.file_type, v.dir, v.name, v.state, "uploaded" if uploaded else "local", "fresh", bucket, v.key,
        v.size, hashlib.md5(v.key.encode()).hexdigest(), ORIGIN_HOST, 0o644, 0, 0, 0, now - 86400,
        now - 86000 if uploaded else None, now - 80000 if v.state != "unpublished" else None,
        now - 3600 if v.state == "expired" else None,
    )
    return "\t".join("\\N" if x is None else str(x) for x in values) + "\n"


def insert_versions(url: str, bucket: str, versions: Iterable[FakeVersion], batch: int = 200_000) -> int:
    """COPY versions in (and every directory they need), one transaction per batch; returns the count.

    Runs ANALYZE afterwards, as autovacuum would soon after such a load in production: without it the
    planner's statistics describe the empty table and the figures would measure a stale plan.
    """
    now = time.time()
    count = 0
    dirs: set[tuple[str, str]] = set()
    conn = psycopg2.connect(url)
    try:
        # Synthetic rows need no directory times: the triggers that keep them would cost an UPDATE per row.
        with conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE versions DISABLE TRIGGER USER")
        pending: list[FakeVersion] = []
        for v in versions:
            pending.append(v)
            if len(pending) >= batch:
                count += _copy_batch(conn, bucket, pending, dirs, now)
                pending = []
        if pending:
            count += _copy_batch(conn, bucket, pending, dirs, now)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE versions ENABLE TRIGGER USER")
            cur.execute("ANALYZE versions")
            cur.execute("ANALYZE directories")
    finally:
        conn.close()
    return count


def _copy_batch(conn, bucket: str, versions: list[FakeVersion], dirs: set[tuple[str, str]], now: float) -> int:
    text = io.StringIO("".join(_row(v, bucket, now) for v in versions))
    needed = {d for v in versions for d in _ancestors(v.file_type, v.dir)} - dirs
    with conn, conn.cursor() as cur:  # one transaction
        if needed:
            from psycopg2.extras import execute_values

            execute_values(cur, """INSERT INTO directories (file_type, dir, parent, created_at) VALUES %s
                                   ON CONFLICT (file_type, md5(dir)) DO NOTHING""",
                           [(t, d, None if d == "" else d.rpartition("/")[0], now) for t, d in sorted(needed)],
                           page_size=5000)
        cur.copy_expert(f"COPY versions ({', '.join(VERSION_COLUMNS)}) FROM STDIN", text)
    dirs |= needed
    return len(versions)


def _ancestors(file_type: str, directory: str) -> list[tuple[str, str]]:
    parts = directory.split("/") if directory else []
    return [(file_type, "/".join(parts[:i])) for i in range(len(parts) + 1)]


def count_versions(url: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM versions")
            return cur.fetchone()[0]
    finally:
        conn.close()


def flat_directory(file_type: str, directory: str, count: int, tag: str) -> Iterator[FakeVersion]:
    """``count`` published files in one directory: f0000000.dat, f0000001.dat, ..."""
    for i in range(count):
        yield FakeVersion(file_type, directory, f"f{i:07d}.dat", "published", f"{file_type}/fake-{tag}-{i}")


FILLER_TYPES = [f"type{i:02d}" for i in range(20)]


def filler(first: int, count: int, home_type: str) -> Iterator[FakeVersion]:
    """``count`` versions of a lived-in repository, numbered from ``first`` (so batches never collide).

    Each path has about four versions: three expired (superseded), then the published one; one path in
    twenty also has a staged (unpublished) version first. Paths spread over 21 types (the measured
    directory's type among them) and date directories ``YYYY/MM/DD`` of about 30 files each. So ~70 %
    of rows are expired, ~25 % published, ~1 % unpublished.
    """
    types = [*FILLER_TYPES, home_type]
    for i in range(first, first + count):
        path, nth = divmod(i, 4)
        file_type = types[path % len(types)]
        day = path // len(types) // 30  # ~30 paths per directory
        directory = f"{2015 + day // 336 % 10}/{day // 28 % 12 + 1:02d}/{day % 28 + 1:02d}"
        state = "published" if nth == 3 else ("unpublished" if nth == 0 and path % 20 == 0 else "expired")
        yield FakeVersion(file_type, directory, f"item{path:08d}.json", state, f"{file_type}/filler-{i}",
                          size=1000 + path % 50_000)


def local_directory(path: Path, names: Iterable[str]) -> Path:
    """A directory of empty local files, the baseline for listing and stat."""
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).touch()
    return path
