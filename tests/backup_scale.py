"""Measure a backup and a restore of N versions: time, size and peak RSS growth, printed as JSON.

    python3 tests/backup_scale.py SOURCE_DATABASE_URL EMPTY_TARGET_DATABASE_URL N

The source gets a repository of N published versions (rows written directly, with keys and digests as
random as real ones; no objects: backup and restore read only rows) in a local object store under a
temporary directory; it is backed up there and restored into the target. Run by tests/test_backup.py
(memory stays flat) and by hand (timings).
"""

from __future__ import annotations

import gc
import hashlib
import json
import resource
import sys
import tempfile
import time
import uuid

from s3repofs import S3Repo
from s3repofs.ops import backup as backup_ops
from s3repofs.ops import restore as restore_ops

BATCH = 1000
DIRS = 100


def fill(repo: S3Repo, versions: int) -> None:
    now = time.time()

    columns = ["file_type", "dir", "name", "state", "storage", "bucket", "s3_key", "size", "md5", "xxh3",
               "origin_host", "mode", "uid", "gid", "created_at", "uploaded_at", "published_at"]

    def insert(tx, start: int) -> None:
        tx.insert_many("versions", columns, [
            ("story_data", f"2026/{i % DIRS:03d}", f"file-{i:07d}.json", "published", "uploaded", "bucket",
             f"story_data/{uuid.uuid4().hex}", 1000 + i, hashlib.md5(b"%d" % i).hexdigest(),
             hashlib.md5(b"x%d" % i).hexdigest(), "host", 0o644, 0, 0, now + i, now + i, now + i)
            for i in range(start, min(start + BATCH, versions))])

    repo.db.run(lambda tx: tx.insert_many(
        "directories", ["file_type", "dir", "parent", "created_at"],
        [("story_data", "", None, now), ("story_data", "2026", "", now),
         *(("story_data", f"2026/{d:03d}", "2026", now) for d in range(DIRS))]))
    for start in range(0, versions, BATCH):
        repo.db.run(lambda tx: insert(tx, start))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(source: str, target: str, versions: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        config = {"local_root": f"{root}/root", "object_dir": f"{root}/objects", "database": source,
                  "host_name": "scale"}
        with S3Repo(config) as repo:
            repo.create_repository()
            fill(repo, versions)
            gc.collect()
            before = peak_rss()
            made = backup_ops.backup(repo)
            after_backup = peak_rss()
        started = time.monotonic()
        restored = restore_ops.restore(repo.config, None, target)
        restore_seconds = time.monotonic() - started
        assert restored.rows["versions"] == versions
        return {"versions": versions, "size": made.backup.size, "backup_s": round(made.seconds, 2),
                "restore_s": round(restore_seconds, 2), "backup_rss_growth": after_backup - before,
                "restore_rss_growth": peak_rss() - after_backup, "peak_rss": peak_rss()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
