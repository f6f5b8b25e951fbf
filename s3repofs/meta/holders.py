"""The ``holders`` table: which hosts hold a verified copy of which version in their cache.

A host's rows follow its cache: ``record`` applies a batch of changes noted by the cache
(local/holdings.py), keyed by object key (``versions.s3_key`` is unique), in one transaction, and can
then rewrite the host's rows to match the keys its cache holds (a mount's start: a wiped cache
directory must not leave claims behind). Every statement handles up to ``BATCH`` keys, so 100,000
cached objects cost a few hundred statements, not 100,000, and every write is deferred (``Tx.defer``):
on PostgreSQL they travel together with the COMMIT, one round trip. Each transaction is idempotent
(upserts and deletes), so ``Database.run`` may run it again.

A row says a host *had* a verified copy when it last told: whether the host is still there is its
heartbeat's (``hosts.last_seen``), which ``Holder.live`` reads against ``host_gone_after``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

from .db import Database, Tx

# Keys per statement. A held key is three parameters: SQLite before 3.32 allowed 999 in all.
BATCH = 300


@dataclass(frozen=True)
class Holder:
    """A host's verified copy of a version: when it was verified, and the host's last heartbeat."""

    version_id: int
    host: str
    verified_at: float
    last_seen: float | None  # None: the host never recorded a heartbeat
    live: bool  # heard of within host_gone_after

    def as_dict(self) -> dict:
        return {"host": self.host, "verified_at": self.verified_at, "last_seen": self.last_seen, "live": self.live}


class HolderRecords:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, host: str, changes: Mapping[str, tuple[bool, float]], cached: Sequence[str] | None = None,
               now: float = 0.0, figures: tuple[int, int, int] | None = None) -> None:
        """In one transaction: for each ``key -> (held, when)`` of ``changes``, add (or date again) or remove
        ``host``'s row of the key's version; then, if ``cached`` is given, make ``host``'s rows exactly those
        of the versions of those keys (a row added so is dated ``now``). Keys of no version are ignored.
        ``figures``: the cache's (bytes, objects, bound) now, for ``hosts.cache_*`` (as the heartbeat writes
        them: a command's host is current as of its last recorded change, not only of its start)."""
        held = [(key, when) for key, (is_held, when) in changes.items() if is_held]
        gone = [key for key, (is_held, _when) in changes.items() if not is_held]

        def run(tx: Tx) -> None:
            for batch in _batches(held):
                self._upsert(tx, host, batch)
            for batch in _batches(gone):
                self._delete(tx, host, batch)
            if cached is not None:
                self._replace(tx, host, cached, now)
            if figures is not None:
                tx.defer("UPDATE hosts SET cache_bytes = ?, cache_objects = ?, cache_bound = ? WHERE name = ?",
                           (*figures, host))

        self.db.run(run)

    def of_versions(self, version_ids: Iterable[int], gone_before: float) -> dict[int, list[Holder]]:
        """The holders of each version (most recently verified first); a host whose last heartbeat is before
        ``gone_before`` (or that has none) is not live."""
        found: dict[int, list[Holder]] = {}

        def run(tx: Tx) -> None:
            for batch in _batches(sorted(set(version_ids))):
                for row in tx.all(
                        f"""SELECT h.version_id, h.host, h.verified_at, hosts.last_seen FROM holders h
                            LEFT JOIN hosts ON hosts.name = h.host
                            WHERE h.version_id IN ({_marks(batch)}) ORDER BY h.version_id, h.verified_at DESC""",
                        batch):
                    live = row["last_seen"] is not None and row["last_seen"] >= gone_before
                    found.setdefault(row["version_id"], []).append(Holder(**row, live=live))

        self.db.run(run, write=False)
        return found

    def per_host(self) -> dict[str, int]:
        """How many versions each host holds."""
        rows = self.db.run(lambda tx: tx.all("SELECT host, COUNT(*) AS n FROM holders GROUP BY host"), write=False)
        return {row["host"]: row["n"] for row in rows}

    def drop_host(self, host: str, gone_before: float) -> int:
        """Delete ``host``'s rows if it is still gone (no heartbeat at or after ``gone_before``); how many."""
        return self.db.run(lambda tx: tx.execute(
            """DELETE FROM holders WHERE host = ?
               AND NOT EXISTS (SELECT 1 FROM hosts WHERE name = ? AND last_seen >= ?)""",
            (host, host, gone_before)))

    # -- statements -----------------------------------------------------------------------------

    @staticmethod
    def _upsert(tx: Tx, host: str, batch: list[tuple[str, float]]) -> None:
        # The keys twice: a join with the VALUES alone is planned as a scan of versions (PostgreSQL, without
        # fresh statistics: 40 ms a statement at 100,000 versions); the IN list makes it an index lookup.
        tx.defer(
            f"""WITH landed (s3_key, verified_at) AS (VALUES {', '.join(['(?, ?)'] * len(batch))})
                INSERT INTO holders (version_id, host, verified_at)
                SELECT v.id, ?, landed.verified_at FROM landed JOIN versions v ON v.s3_key = landed.s3_key
                WHERE v.s3_key IN ({_marks(batch)})
                ON CONFLICT (version_id, host) DO UPDATE SET verified_at = excluded.verified_at""",
            [value for pair in batch for value in pair] + [host] + [key for key, _when in batch])

    @staticmethod
    def _delete(tx: Tx, host: str, keys: list[str]) -> None:
        tx.defer(f"""DELETE FROM holders WHERE host = ?
                       AND version_id IN (SELECT id FROM versions WHERE s3_key IN ({_marks(keys)}))""",
                   [host, *keys])

    def _replace(self, tx: Tx, host: str, cached: Sequence[str], now: float) -> None:
        recorded = {row["s3_key"] for row in tx.all(
            "SELECT v.s3_key FROM holders h JOIN versions v ON v.id = h.version_id WHERE h.host = ?", (host,))}
        keep = set(cached)
        for batch in _batches(sorted(recorded - keep)):
            self._delete(tx, host, batch)
        for batch in _batches(sorted(keep - recorded)):
            tx.defer(f"""INSERT INTO holders (version_id, host, verified_at)
                           SELECT id, ?, ? FROM versions WHERE s3_key IN ({_marks(batch)})
                           ON CONFLICT (version_id, host) DO NOTHING""", [host, now, *batch])


def _marks(values: Sequence) -> str:
    return ", ".join("?" * len(values))


def _batches(values: Sequence) -> Iterator[list]:
    for start in range(0, len(values), BATCH):
        yield list(values[start:start + BATCH])
