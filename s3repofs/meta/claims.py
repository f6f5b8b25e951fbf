"""The SQL of processing leases: claim, lock, renew, release and complete versions for a task (tables ``claims``
and ``claims_done``, schema 6), every time read from the database's clock.

A lease is a row of ``claims`` keyed by (version, task): at most one holder per version and task, which the
primary key, not this code, guarantees. A lease is live while ``expires_at`` is ahead of the database's clock;
a holder renews it, so the lease of a holder that died runs out and the next claimer or locker takes the row
over (an upsert whose ``DO UPDATE`` applies only to an expired row, or to the same holder's). Hosts' clocks
differ: every comparison and every new ``expires_at`` is computed in SQL with the database's clock
(``clock_timestamp()`` on PostgreSQL; SQLite runs on this host, its clock is this host's).

Concurrency of ``claim``: on PostgreSQL the candidates are selected ``FOR NO KEY UPDATE OF versions SKIP
LOCKED``, so claimers running at once pick different rows without waiting for each other; a row a claimer
picked whose lease another claimer committed after this statement's snapshot is refused by the upsert (its
``RETURNING`` leaves it out), and the claimer selects again after it, until it has ``limit`` or nothing is
left. On SQLite the write transaction (BEGIN IMMEDIATE) serializes claimers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..domain.paths import RepoPath
from .db import Database, Tx
from .find import FindQuery
from .metastore import _VERSION_COLUMNS, MetaStore, Version

_NOW = {"postgresql": "extract(epoch FROM clock_timestamp())::double precision",
        "sqlite": "((julianday('now') - 2440587.5) * 86400.0)"}

# A lease is taken when no one holds it, when its holder let it run out, or when its holder asks again.
_TAKE = """ON CONFLICT (version_id, task) DO UPDATE SET holder = excluded.holder, host = excluded.host,
        pid = excluded.pid, claimed_at = excluded.claimed_at, expires_at = excluded.expires_at
    WHERE claims.expires_at <= excluded.claimed_at OR claims.holder = excluded.holder
    RETURNING version_id, expires_at"""


@dataclass(frozen=True)
class Holder:
    """Who takes a lease: a token unique to the claim or lock, and the host and process it runs in."""

    token: str
    host: str
    pid: int


@dataclass(frozen=True)
class Lease:
    """One live or expired lease of ``claims``, with its version's path (for messages and the CLI)."""

    version_id: int
    task: str
    holder: str
    host: str
    pid: int
    expires_at: float
    path: str


class LeaseStore:
    """The leases of one database. Each method is one transaction (``Database.run``), safe to run again."""

    def __init__(self, db: Database, meta: MetaStore) -> None:
        self.db = db
        self.meta = meta
        self.now = _NOW[db.kind]

    def claim(self, query: FindQuery, task: str, holder: Holder, limit: int,
              lease: float) -> tuple[list[Version], float | None]:
        """Lease up to ``limit`` versions that match ``query`` (as ``repo.find`` does), are not done for ``task``
        and have no live lease of ``task``, lowest id first; the versions and when their leases end."""

        def run(tx: Tx) -> tuple[list[Version], float | None]:
            if tx.rerun:  # an earlier attempt may have committed: what it took is this claim's
                held, expires_at = self._held(tx, holder.token, task)
                if held:
                    return held, expires_at
            taken: list[Version] = []
            expires: float | None = None
            after = 0
            while len(taken) < limit:
                candidates = self._candidates(tx, query, task, after, limit - len(taken))
                if not candidates:
                    break
                won = self._take(tx, [v.id for v in candidates], task, holder, lease)
                self._drop_done(tx, won, task, holder.token)
                taken += [v for v in candidates if v.id in won]
                expires = max(won.values(), default=expires)
                after = candidates[-1].id
            return taken, expires

        return self.db.run(run)

    def _candidates(self, tx: Tx, query: FindQuery, task: str, after: int, limit: int) -> list[Version]:
        where, params = self.meta.find_where(query, after)
        skip_locked = " FOR NO KEY UPDATE OF versions SKIP LOCKED" if tx.kind == "postgresql" else ""
        rows = tx.all(
            f"""SELECT {_VERSION_COLUMNS} FROM versions WHERE {where}
                AND NOT EXISTS (SELECT 1 FROM claims_done d WHERE d.version_id = versions.id AND d.task = ?)
                AND NOT EXISTS (SELECT 1 FROM claims c WHERE c.version_id = versions.id AND c.task = ?
                                AND c.expires_at > {self.now})
                ORDER BY id LIMIT {int(limit)}{skip_locked}""",
            [*params, task, task])
        return [Version(**r) for r in rows]

    def _take(self, tx: Tx, version_ids: list[int], task: str, holder: Holder, lease: float) -> dict[int, float]:
        """Upsert the leases; {version id: expires_at} of those taken (a live lease of another holder is not)."""
        values = ", ".join(f"(?, ?, ?, ?, ?, {self.now}, {self.now} + ?)" for _ in version_ids)
        params = [p for vid in version_ids for p in (vid, task, holder.token, holder.host, holder.pid, lease)]
        rows = tx.all(f"""INSERT INTO claims (version_id, task, holder, host, pid, claimed_at, expires_at)
                          VALUES {values} {_TAKE}""", params)
        return {r["version_id"]: float(r["expires_at"]) for r in rows}

    def _drop_done(self, tx: Tx, won: dict[int, float], task: str, token: str) -> None:
        """Give back the leases just taken on versions a holder completed after the candidates' snapshot.

        The upsert finds no row to conflict with once that holder's ``complete`` deleted its lease, and the
        candidates' snapshot may predate the commit that recorded it done. That commit precedes this statement
        (the insert waited for the deletion), whose own snapshot therefore sees what it recorded."""
        if not won:
            return
        marks = ", ".join("?" * len(won))
        rows = tx.all(f"SELECT version_id FROM claims_done WHERE task = ? AND version_id IN ({marks})", [task, *won])
        done = [r["version_id"] for r in rows]
        if done:
            tx.execute(f"DELETE FROM claims WHERE holder = ? AND version_id IN ({', '.join('?' * len(done))})",
                       [token, *done])
            for vid in done:
                del won[vid]

    def _held(self, tx: Tx, token: str, task: str) -> tuple[list[Version], float | None]:
        rows = tx.all(f"""SELECT {_VERSION_COLUMNS}, c.expires_at AS lease_expires FROM versions
                          JOIN claims c ON c.version_id = versions.id WHERE c.holder = ? AND c.task = ?
                          ORDER BY id""", (token, task))
        expires = max((float(r.pop("lease_expires")) for r in rows), default=None)
        return [Version(**r) for r in rows], expires

    def lock(self, version_id: int, task: str, holder: Holder, lease: float) -> float | None:
        """Take the lease of one version for ``task`` (done or not); when it ends, or None if another holder
        has a live one."""
        won = self.db.run(lambda tx: self._take(tx, [version_id], task, holder, lease))
        return won.get(version_id)

    def renew(self, token: str, lease: float) -> dict[int, float]:
        """Push the end of every lease of ``token`` to ``lease`` seconds from now; {version id: expires_at} of
        those it still holds (a lease that ran out and was taken, or was released, is not among them)."""
        rows = self.db.run(lambda tx: tx.all(
            f"UPDATE claims SET expires_at = {self.now} + ? WHERE holder = ? RETURNING version_id, expires_at",
            (lease, token)))
        return {r["version_id"]: float(r["expires_at"]) for r in rows}

    def release(self, token: str, version_ids: list[int] | None = None) -> list[int]:
        """End the leases of ``token`` (all, or those of ``version_ids``) without recording anything; the
        versions it still held."""
        return self.db.run(lambda tx: [vid for vid, _task in self._delete(tx, token, version_ids)])

    def complete(self, token: str, host: str, version_ids: list[int] | None = None) -> list[int]:
        """End the leases of ``token`` (all, or those of ``version_ids``) and record their versions done for
        their task, in one transaction; the versions it still held, which are the ones recorded."""

        def run(tx: Tx) -> list[int]:
            ended = self._delete(tx, token, version_ids)
            if tx.rerun and version_ids:  # an earlier attempt may have committed: what it recorded is done
                ended += self._done_by(tx, host, version_ids)
            if ended:
                values = ", ".join(f"(?, ?, ?, {self.now})" for _ in ended)
                tx.execute(f"""INSERT INTO claims_done (version_id, task, host, done_at) VALUES {values}
                               ON CONFLICT (version_id, task) DO NOTHING""",
                           [p for vid, task in ended for p in (vid, task, host)])
            return sorted({vid for vid, _task in ended})

        return self.db.run(run)

    def _delete(self, tx: Tx, token: str, version_ids: list[int] | None) -> list[tuple[int, str]]:
        if version_ids is not None and not version_ids:
            return []
        only = f" AND version_id IN ({', '.join('?' * len(version_ids))})" if version_ids else ""
        rows = tx.all(f"DELETE FROM claims WHERE holder = ?{only} RETURNING version_id, task",
                      [token, *(version_ids or [])])
        return [(r["version_id"], r["task"]) for r in rows]

    def _done_by(self, tx: Tx, host: str, version_ids: list[int]) -> list[tuple[int, str]]:
        rows = tx.all(f"""SELECT version_id, task FROM claims_done WHERE host = ?
                          AND version_id IN ({', '.join('?' * len(version_ids))})""", [host, *version_ids])
        return [(r["version_id"], r["task"]) for r in rows]

    def holder_of(self, version_id: int, task: str) -> Lease | None:
        """The live lease of a version for ``task``, if any (to say who holds it)."""
        rows = self._leases("c.version_id = ? AND c.task = ? AND c.expires_at > " + self.now, (version_id, task))
        return rows[0] if rows else None

    def leases_of(self, token: str) -> list[Lease]:
        """Every lease of ``token``, live or run out (but not yet taken by another holder), by version id."""
        return self._leases("c.holder = ?", (token,))

    def _leases(self, condition: str, params: tuple) -> list[Lease]:
        rows = self.db.run(lambda tx: tx.all(
            f"""SELECT c.version_id, c.task, c.holder, c.host, c.pid, c.expires_at, v.file_type, v.dir, v.name
                FROM claims c JOIN versions v ON v.id = c.version_id WHERE {condition} ORDER BY c.version_id""",
            params), write=False)
        return [Lease(r["version_id"], r["task"], r["holder"], r["host"], r["pid"], float(r["expires_at"]),
                      str(RepoPath(r["file_type"], r["dir"], r["name"]))) for r in rows]
