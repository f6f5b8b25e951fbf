"""Writes versions' rows from what their objects say about themselves: all of them, or one whose row was lost.

``s3repofs rebuild`` (ops/rebuild.py) reads the objects and writes every row into an empty database;
``fsck --repair`` (ops/unrecorded.py) adopts an object whose row a restore lost, into the live one
(``insert_versions``, ``ensure_directories``, ``advance_ids``). This module owns the SQL. Every version is
written as expired (its history), then the newest version of each path is published in one
statement: the same expired -> published transition a re-publish makes, checked once for all of
them. Directories are the implicit ancestors of the versions' paths, path locks those of the
published paths, hosts the versions' origin hosts. Memory is flat in the number of versions: rows
go in batches, and the publishing and the derived tables are statements the database runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from ..domain.lifecycle import ARCHIVE_CLASSES, State, Storage, Tier, check_transition
from ..domain.paths import DirPath
from .db import Database, Tx

BATCH = 500  # rows per INSERT: 22 columns each, far under SQLite's 32,766 parameters


@dataclass(frozen=True)
class RecoveredVersion:
    """A version as its object describes it."""

    id: int
    file_type: str
    dir: str
    name: str
    tier: str
    bucket: str
    s3_key: str
    size: int
    md5: str
    xxh3: str | None
    origin_host: str
    mode: int
    uid: int
    gid: int
    created_at: float
    uploaded_at: float  # when the object was stored (its Last-Modified)
    archived_at: float | None = None  # tier archived: when (its Last-Modified, which the archiving copy set)
    thaw_requested_at: float | None = None  # archived with a restore asked for, or done: thawing


_COLUMNS = ("id", "file_type", "dir", "name", "state", "storage", "tier", "bucket", "s3_key", "size", "md5", "xxh3",
            "origin_host", "mode", "uid", "gid", "publish_pending", "created_at", "uploaded_at", "expired_at",
            "archived_at", "thaw_requested_at")


def insert_versions(db: Database, versions: Iterable[RecoveredVersion], expired_at: float,
                    duplicate: Callable[[RecoveredVersion], None]) -> int:
    """Write every version as expired at ``expired_at``, in batches; how many were written. A version
    whose id is taken (an object copied under another key) is not written: ``duplicate`` hears of it.
    The database's primary key finds them, so no set of every id is held here."""
    written, batch = 0, []
    for version in versions:
        batch.append(version)
        if len(batch) == BATCH:
            written += _insert(db, batch, expired_at, duplicate)
            batch = []
    if batch:
        written += _insert(db, batch, expired_at, duplicate)
    return written


def _insert(db: Database, versions: list[RecoveredVersion], expired_at: float,
            duplicate: Callable[[RecoveredVersion], None]) -> int:
    rows, keys = {}, {}
    for v in versions:  # an id twice in one batch: the first listed keeps it
        if v.id in rows:
            duplicate(v)
            continue
        rows[v.id] = (v.id, v.file_type, v.dir, v.name, State.EXPIRED.value, Storage.UPLOADED.value, v.tier, v.bucket,
                      v.s3_key, v.size, v.md5, v.xxh3, v.origin_host, v.mode, v.uid, v.gid, 0, v.created_at,
                      v.uploaded_at, expired_at, v.archived_at, v.thaw_requested_at)
        keys[v.id] = v
    placeholders = "(" + ", ".join("?" * len(_COLUMNS)) + ")"
    sql = f"""INSERT INTO versions ({', '.join(_COLUMNS)}) VALUES {', '.join([placeholders] * len(rows))}
              ON CONFLICT (id) DO NOTHING RETURNING id"""
    inserted = {row["id"] for row in db.run(lambda tx: tx.all(sql, [x for row in rows.values() for x in row]))}
    for version_id in rows.keys() - inserted:
        duplicate(keys[version_id])
    return len(inserted)


def rows_of_ids(db: Database, ids: Iterable[int]) -> dict[int, dict]:
    """The ``s3_key``, ``size`` and ``md5`` of each version of ``ids`` the database holds, by id."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    placeholders = ", ".join("?" * len(ids))
    rows = db.run(lambda tx: tx.all(f"SELECT id, s3_key, size, md5 FROM versions WHERE id IN ({placeholders})", ids),
                  write=False)
    return {row.pop("id"): row for row in rows}


def publish_newest(db: Database) -> int:
    """Publish the newest version of each path (by creation, then id); how many were published."""
    check_transition("the newest version of each rebuilt path", State.EXPIRED, State.PUBLISHED)

    def run(tx: Tx) -> int:
        return tx.execute(f"""UPDATE versions SET state = '{State.PUBLISHED}', published_at = uploaded_at,
                                  expired_at = NULL
                              WHERE id IN (SELECT id FROM (
                                  SELECT id, ROW_NUMBER() OVER (PARTITION BY file_type, dir, name
                                                                ORDER BY created_at DESC, id DESC) AS newness
                                  FROM versions) ranked WHERE newness = 1)""")

    return db.run(run)


def derive_tables(db: Database, now: float) -> int:
    """Fill directories, path_locks and hosts from the versions written; how many directories."""
    db.run(lambda tx: tx.execute(f"""INSERT INTO path_locks (file_type, dir, name)
                                     SELECT file_type, dir, name FROM versions WHERE state = '{State.PUBLISHED}'"""))
    db.run(lambda tx: tx.execute("""INSERT INTO hosts (name, first_seen, last_seen)
                                    SELECT origin_host, MIN(created_at), MAX(created_at) FROM versions
                                    GROUP BY origin_host"""))
    return _insert_directories(db, now)


def _insert_directories(db: Database, now: float) -> int:
    """Every ancestor of every version's directory, a page of distinct directories at a time."""
    inserted, after = 0, ("", "")
    while True:
        page = db.run(lambda tx: tx.all(
            """SELECT DISTINCT file_type, dir FROM versions WHERE file_type > ? OR (file_type = ? AND dir > ?)
               ORDER BY file_type, dir LIMIT 1000""", (after[0], after[0], after[1])), write=False)
        if not page:
            return inserted
        inserted += ensure_directories(db, [DirPath(row["file_type"], row["dir"]) for row in page], now)
        after = (page[-1]["file_type"], page[-1]["dir"])


def ensure_directories(db: Database, directories: Iterable[DirPath], now: float) -> int:
    """Create each of ``directories`` and its ancestors that does not exist yet (implicit, created at
    ``now``), in one transaction; how many were created. Rebuild's for every version's directory, and
    fsck's for a version it adopts."""
    rows = sorted({(d.file_type, d.dir, d.parent_dir) for directory in directories for d in directory.ancestors()},
                  key=lambda r: (r[0], r[1]))
    conflict = f"ON CONFLICT (file_type, {db.dialect.indexed('dir')}) DO NOTHING"

    def insert(tx: Tx) -> int:
        count = 0
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            count += tx.execute(f"""INSERT INTO directories (file_type, dir, parent, created_at)
                                    VALUES {", ".join(["(?, ?, ?, ?)"] * len(chunk))} {conflict}""",
                                [value for row in chunk for value in (*row, now)])
        return count

    return db.run(insert)


def advance_ids(db: Database) -> None:
    """Let the next new version take an id past every row written here (SQLite's AUTOINCREMENT already
    does). Never moves the sequence back: ids it handed out may be in objects whose rows are not (yet) here."""
    if db.kind == "postgresql":
        db.run(lambda tx: tx.execute("""SELECT setval(pg_get_serial_sequence('versions', 'id'),
                                                      GREATEST((SELECT COALESCE(MAX(id), 0) + 1 FROM versions),
                                                               nextval(pg_get_serial_sequence('versions', 'id'))),
                                                      false)"""))


def tier_of(storage_class: str) -> str:
    return Tier.ARCHIVED.value if storage_class in ARCHIVE_CLASSES else Tier.FRESH.value
