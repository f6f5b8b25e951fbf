"""The metadata store: the queries of versions, directories, tags and hosts (the schema is schema.py's).

Every method is one transaction (``Database.run``), and each can run twice: when the answer to its
commit is lost, ``Database.run`` runs it again with ``tx.rerun`` set. Most are idempotent as they
stand; an insert and a state change that would refuse its own result find what the first attempt
did instead (``insert_version``, ``_change_state``, ``remove_dir``). Lock order, to stay deadlock-free: a path's
``path_locks`` row first, then the ``versions`` rows of that path. Publishing is atomic: lock the
path, expire its published version, publish the new one, commit; the partial unique index
``one_published_per_path`` makes "at most one published version per path" a fact of the database,
not of this code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable, Sequence

from ..domain.content import Content
from ..domain.lifecycle import VISIBLE_STATES, State, Storage, Tier, check_transition
from ..domain.paths import DirPath, RepoPath
from ..errors import LifecycleError, NotEmptyError, NotFoundError, RepoError
from . import schema
from .db import Database, Tx
from .find import FindQuery, find_condition


@dataclass(frozen=True)
class Version:
    """One row of ``versions``: an immutable file version and its lifecycle facts."""

    id: int
    file_type: str
    dir: str
    name: str
    state: str  # a State (read back as the str it equals), likewise storage a Storage and tier a Tier
    storage: str
    tier: str
    bucket: str
    s3_key: str
    size: int | None
    md5: str | None
    origin_host: str
    mode: int
    uid: int
    gid: int
    publish_pending: int
    created_at: float
    uploaded_at: float | None
    published_at: float | None
    expired_at: float | None
    archived_at: float | None
    purged_at: float | None
    xxh3: str | None = None
    mtime_ns: int | None = None  # as a user set it (utimens); None: its creation
    thaw_requested_at: float | None = None  # an archived version whose restore was asked for: "thawing"

    @property
    def modified_ns(self) -> int:
        return int(self.created_at * 1e9) if self.mtime_ns is None else self.mtime_ns

    @property
    def path(self) -> RepoPath:
        return RepoPath(self.file_type, self.dir, self.name)

    @property
    def shown_tier(self) -> Tier:
        """The tier as the code and the CLI show it: archived with a restore asked for is thawing."""
        if self.tier == Tier.ARCHIVED and self.thaw_requested_at is not None:
            return Tier.THAWING
        return Tier(self.tier)


@dataclass(frozen=True)
class Directory:
    file_type: str
    dir: str
    explicit: bool
    mode: int
    uid: int
    gid: int
    created_at: float
    mtime_ns: int | None = None  # an entry added or removed last, or as a user set it; None: its creation
    subdirs: int = 0  # how many directories it holds (its link count is 2 more)

    @property
    def name(self) -> str:
        return (self.dir.rpartition("/")[2] if self.dir else self.file_type)

    @property
    def modified_ns(self) -> int:
        return int(self.created_at * 1e9) if self.mtime_ns is None else self.mtime_ns


_VERSION_COLUMNS = ", ".join(f.name for f in fields(Version))
_VISIBLE = ", ".join(f"'{state}'" for state in VISIBLE_STATES)
_DIR_COLUMNS = ", ".join(f.name for f in fields(Directory) if f.name != "subdirs")


def _version(row: dict | None) -> Version | None:
    return _selected_version(row) if row else None


def _selected_version(row: dict) -> Version:
    """The Version of a row selected with ``_VERSION_COLUMNS`` (a fresh dict, one key per field): the dict
    becomes the instance's attributes. Equal to ``Version(**row)`` at a fifth of its cost (a frozen
    dataclass's __init__ sets its 25 fields one by one through object.__setattr__), which a listing
    of 10,000 files paid 10,000 times."""
    version = object.__new__(Version)
    object.__setattr__(version, "__dict__", row)
    return version


def _directory(row: dict) -> Directory:
    return Directory(**{**row, "explicit": bool(row["explicit"])})


class MetaStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        # A directory's columns, and how many directories it holds (for its link count, st_nlink).
        child, parent = db.dialect.indexed("child.parent"), db.dialect.indexed("directories.dir")
        self._dir_columns = f"""{_DIR_COLUMNS}, (SELECT COUNT(*) FROM directories child
            WHERE {child} = {parent} AND child.parent = directories.dir
                AND child.file_type = directories.file_type) AS subdirs"""

    # -- schema ---------------------------------------------------------------------------------

    def create_schema(self) -> int:
        """Create or migrate the schema to SCHEMA_VERSION; idempotent and safe to run concurrently."""
        return self.db.run(lambda tx: schema.migrate(tx, self.db.dialect))

    def schema_version(self) -> int:
        """The schema version of the database, 0 if the repository was never created."""
        return self.db.run(schema.current_version, write=False)

    # -- hosts ----------------------------------------------------------------------------------

    def register_host(self, name: str, cache: tuple[int, int, int] | None = None) -> None:
        """Record that host ``name`` is alive now; ``cache``: its cache's (bytes, objects, bound), if known
        (else the recorded figures stay)."""
        now = self.clock()
        cache_bytes, cache_objects, cache_bound = cache or (None, None, None)
        self.db.run(lambda tx: tx.execute(
            """INSERT INTO hosts (name, first_seen, last_seen, cache_bytes, cache_objects, cache_bound)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen,
                   cache_bytes = COALESCE(excluded.cache_bytes, hosts.cache_bytes),
                   cache_objects = COALESCE(excluded.cache_objects, hosts.cache_objects),
                   cache_bound = COALESCE(excluded.cache_bound, hosts.cache_bound)""",
            (name, now, now, cache_bytes, cache_objects, cache_bound),
        ))

    def hosts(self) -> list[dict]:
        """Every host heard of: name, first_seen, last_seen, and its cache's cache_bytes, cache_objects and
        cache_bound as its last heartbeat gave them (None if it never did)."""
        return self.db.run(lambda tx: tx.all(
            """SELECT name, first_seen, last_seen, cache_bytes, cache_objects, cache_bound
               FROM hosts ORDER BY name"""), write=False)

    # -- versions -------------------------------------------------------------------------------

    def insert_version(self, path: RepoPath, *, bucket: str, s3_key: str, origin_host: str,
                       mode: int, uid: int, gid: int, mtime_ns: int | None = None) -> Version:
        """Write the intent row of a new unpublished version, before any byte of it is uploaded.
        ``mtime_ns``: its modification time, if not its creation (a local file added keeps its own)."""
        now = self.clock()

        insert_sql = f"""INSERT INTO versions (file_type, dir, name, state, storage, bucket, s3_key,
                              origin_host, mode, uid, gid, mtime_ns, created_at)
                          VALUES (?, ?, ?, '{State.UNPUBLISHED}', '{Storage.LOCAL}', ?, ?, ?, ?, ?, ?, ?, ?)"""
        values = (path.file_type, path.dir, path.name, bucket, s3_key, origin_host, mode, uid, gid, mtime_ns, now)

        def insert(tx: Tx) -> Version:
            self._ensure_dirs(tx, path.parent, now)
            if not tx.rerun:
                return Version(**tx.one(f"{insert_sql} RETURNING {_VERSION_COLUMNS}", values))
            # The key is this call's, unique per version: a row holding it is the first attempt's.
            tx.defer(f"{insert_sql} ON CONFLICT (s3_key) DO NOTHING", values)
            row = tx.one(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE s3_key = ? AND created_at = ?", (s3_key, now))
            if row is None:
                raise RepoError(f"{path}: object key {s3_key} is taken by another version")
            return Version(**row)

        return self.db.run(insert, one_trip=True)

    def get(self, version_id: int) -> Version:
        row = self.db.run(lambda tx: tx.one(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE id = ?",
                                            (version_id,)), write=False)
        if row is None:
            raise NotFoundError(f"no version {version_id}")
        return Version(**row)

    def find(self, path: RepoPath, state: str = State.PUBLISHED) -> Version | None:
        """The newest version of ``path`` in ``state`` (the only one, for published)."""
        at_path, params = self._at(path)
        return self.db.run(lambda tx: _version(tx.one(
            f"""SELECT {_VERSION_COLUMNS} FROM versions WHERE {at_path} AND state = ?
                ORDER BY id DESC LIMIT 1""",
            (*params, state), prepared=True,
        )), write=False)

    def history(self, path: RepoPath) -> list[Version]:
        at_path, params = self._at(path)
        rows = self.db.run(lambda tx: tx.all(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE {at_path} ORDER BY id", params), write=False)
        return [Version(**r) for r in rows]

    def mark_uploaded(self, version_id: int, content: Content) -> Version:
        """Record that a staged version's bytes (``content``) are stored and verified."""
        now = self.clock()

        def run(tx: Tx) -> Version:
            self._mark_uploaded(tx, version_id, content, now)
            return self._lock_version(tx, version_id)

        return self.db.run(run)

    def _mark_uploaded(self, tx: Tx, version_id: int, content: Content, now: float) -> None:
        check_transition(f"version {version_id}", Storage.LOCAL, Storage.UPLOADED)  # made where the row is local
        changed = tx.execute(f"""UPDATE versions SET size = ?, md5 = ?, xxh3 = ?, storage = '{Storage.UPLOADED}',
                                     uploaded_at = ?
                                 WHERE id = ? AND storage = '{Storage.LOCAL}' AND state = '{State.UNPUBLISHED}'""",
                             (content.size, content.md5, content.xxh3, now, version_id))
        if changed:
            return
        version = self._lock_version(tx, version_id)
        if version.storage == Storage.UPLOADED and (version.size, version.md5) == (content.size, content.md5):
            return  # a retry of an upload that had been recorded
        raise LifecycleError(f"{version.path}: version {version_id} is {version.state} "
                             f"and {version.storage}; its content is immutable")

    def publish(self, version_id: int, path: RepoPath | None = None, uploaded: Content | None = None,
                unless_superseded: bool = False) -> tuple[Version, Version | None]:
        """Publish a verified version (optionally at a new path), expiring the path's current one.

        ``uploaded`` (the staged bytes' Content) records, in the same transaction, that a staged version has just
        been stored and verified (one commit per publish instead of two). With ``unless_superseded`` (a
        retry's), only a version still unpublished and pending publication is published, and not if it
        was created before the path's published one: that one stays unpublished, its ``publish_pending``
        cleared. The returned version is then not published (at its own path only: no ``path`` with it).
        Returns ``(published, expired_or_None)``.
        Raises LifecycleError if the version is not uploaded and verified, or was discarded or
        purged. Concurrent publishers of one path are serialized on the path's lock row, so exactly
        one version ends published.
        """
        if unless_superseded and path is not None:
            raise ValueError("unless_superseded publishes a version at its own path only")
        now = self.clock()

        def run(tx: Tx) -> tuple[Version, Version | None]:
            unlocked = tx.one(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE id = ?", (version_id,))
            if unlocked is None:
                raise NotFoundError(f"no version {version_id}")
            target = path or Version(**unlocked).path
            self._lock_path(tx, target)  # lock order: the path first, then its versions
            if uploaded is not None:
                self._mark_uploaded(tx, version_id, uploaded, now)
            version = self._lock_version(tx, version_id)  # re-read under the path lock
            if unless_superseded and not (version.state == State.UNPUBLISHED and version.publish_pending):
                return version, None  # done meanwhile (another mount's retry), or expired since: as it is
            check_transition(f"{version.path}: version {version_id}", version.state, State.PUBLISHED)
            if version.storage != Storage.UPLOADED:
                raise LifecycleError(f"{version.path}: version {version_id} is not uploaded and verified; "
                                     "it cannot be published")
            if version.state == State.PUBLISHED and target == version.path:  # by a first attempt, too (tx.rerun)
                return version, self._expired_by(tx, version) if tx.rerun else None
            current = self._published(tx, target)
            if unless_superseded and current is not None and current.id > version.id:  # ids: in order of creation
                tx.execute("UPDATE versions SET publish_pending = 0 WHERE id = ?", (version_id,))
                return replace(version, publish_pending=0), None
            if current is not None:
                check_transition(f"{current.path}: version {current.id}", current.state, State.EXPIRED)
                tx.execute(f"UPDATE versions SET state = '{State.EXPIRED}', expired_at = ? WHERE id = ?",
                           (now, current.id))
            if target != version.path:
                self._ensure_dirs(tx, target.parent, now)
            tx.execute(
                f"""UPDATE versions SET state = '{State.PUBLISHED}', published_at = ?, expired_at = NULL,
                        publish_pending = 0, file_type = ?, dir = ?, name = ? WHERE id = ?""",
                (now, target.file_type, target.dir, target.name, version_id),
            )
            expired = replace(current, state=State.EXPIRED, expired_at=now) if current is not None else None
            return replace(version, state=State.PUBLISHED, published_at=now, expired_at=None, publish_pending=0,
                           file_type=target.file_type, dir=target.dir, name=target.name), expired

        return self.db.run(run)

    def publish_staged(self, staged: Version, content: Content) -> tuple[Version, Version | None]:
        """``publish(staged.id, uploaded=content)`` for the common case, a staged version just
        stored and published at its own path, in one round trip (seven before). ``staged`` is the
        caller's copy of the row; if the row is no longer that (moved, published or discarded
        meanwhile), nothing changes and the general ``publish`` decides.

        Atomic without a decision in between: with the path lock and the version's row lock held,
        the current version is expired only if the staged row is as expected, and the staged row is
        published under the same condition, so both happen or neither."""
        now = self.clock()
        path = staged.path
        # The transitions the UPDATEs below make, where their conditions hold.
        check_transition(f"{path}: its published version", State.PUBLISHED, State.EXPIRED)
        check_transition(f"{path}: version {staged.id}", State.UNPUBLISHED, State.PUBLISHED)
        check_transition(f"{path}: version {staged.id}", Storage.LOCAL, Storage.UPLOADED)
        where_path, at_path = self._at(path)
        as_staged = f"id = ? AND state = '{State.UNPUBLISHED}' AND storage = '{Storage.LOCAL}' AND {where_path}"

        def run(tx: Tx) -> list[dict]:
            self._lock_path(tx, path)
            tx.defer("SELECT id FROM versions WHERE id = ?" + self.db.dialect.for_update, (staged.id,))
            tx.defer(f"""UPDATE versions SET state = '{State.EXPIRED}', expired_at = ?
                         WHERE {where_path} AND state = '{State.PUBLISHED}' AND id <> ?
                             AND EXISTS (SELECT 1 FROM versions WHERE {as_staged})""",
                     (now, *at_path, staged.id, staged.id, *at_path))
            tx.defer(f"""UPDATE versions SET size = ?, md5 = ?, xxh3 = ?, storage = '{Storage.UPLOADED}',
                             uploaded_at = ?, state = '{State.PUBLISHED}', published_at = ?, expired_at = NULL,
                             publish_pending = 0
                         WHERE {as_staged}""",
                     (content.size, content.md5, content.xxh3, now, now, staged.id, *at_path))
            return tx.all(f"""SELECT {_VERSION_COLUMNS} FROM versions
                              WHERE id = ? OR ({where_path} AND state = '{State.EXPIRED}' AND expired_at = ?)""",
                          (staged.id, *at_path, now))

        rows = [Version(**row) for row in self.db.run(run, one_trip=True)]
        published = next((v for v in rows if v.id == staged.id and v.state == State.PUBLISHED), None)
        if published is None or published.published_at != now:
            return self.publish(staged.id, uploaded=content)
        return published, next((v for v in rows if v.id != staged.id), None)

    def expire(self, version_id: int) -> Version:
        """Withdraw a published version (it stays readable in expired/)."""
        return self._change_state(version_id, State.EXPIRED, "expired_at = ?")

    def discard(self, version_id: int) -> Version:
        """Throw away an unpublished version (gc deletes its object later)."""
        return self._change_state(version_id, State.DISCARDED, "expired_at = ?, publish_pending = 0")

    def _change_state(self, version_id: int, target: State, assignments: str) -> Version:
        """Move a version to state ``target``, setting ``assignments`` (their one ``?`` is the time).
        LifecycleError if the lifecycle's TRANSITIONS do not lead there from its state, except on a
        re-run (tx.rerun) that finds it in ``target``: the first attempt's commit went through."""
        now = self.clock()

        def run(tx: Tx) -> Version:
            version = self._lock_version(tx, version_id)
            if tx.rerun and version.state == target:
                return version
            check_transition(f"{version.path}: version {version_id}", version.state, target)
            tx.execute(f"UPDATE versions SET state = '{target}', {assignments} WHERE id = ?", (now, version_id))
            return self._lock_version(tx, version_id)

        return self.db.run(run)

    def move_unpublished(self, version_id: int, path: RepoPath) -> Version:
        """Give an unpublished version another path (a rename inside ``unpublished/``)."""
        now = self.clock()

        def run(tx: Tx) -> Version:
            version = self._lock_version(tx, version_id)
            if version.state != State.UNPUBLISHED:
                raise LifecycleError(f"{version.path}: version {version_id} is {version.state}; it cannot be moved")
            self._ensure_dirs(tx, path.parent, now)
            tx.execute("UPDATE versions SET file_type = ?, dir = ?, name = ? WHERE id = ?",
                       (path.file_type, path.dir, path.name, version_id))
            return self._lock_version(tx, version_id)

        return self.db.run(run)

    def set_publish_pending(self, version_id: int, pending: bool) -> None:
        self.db.run(lambda tx: tx.execute("UPDATE versions SET publish_pending = ? WHERE id = ?",
                                          (int(pending), version_id)))

    def staged_on(self, host: str) -> list[Version]:
        """Unpublished versions of ``host`` not yet uploaded, or uploaded but waiting to be published."""
        rows = self.db.run(lambda tx: tx.all(
            f"""SELECT {_VERSION_COLUMNS} FROM versions
                WHERE state = '{State.UNPUBLISHED}' AND origin_host = ?
                    AND (storage = '{Storage.LOCAL}' OR publish_pending = 1)
                ORDER BY id""",
            (host,)), write=False)
        return [Version(**r) for r in rows]

    def set_attrs(self, version_id: int, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, mtime_ns: int | None = None) -> Version:
        """chmod/chown/utimens of a version (its attributes only; content stays immutable)."""

        def run(tx: Tx) -> Version:
            version = self._lock_version(tx, version_id)
            tx.execute("UPDATE versions SET mode = ?, uid = ?, gid = ?, mtime_ns = ? WHERE id = ?",
                       (version.mode if mode is None else mode & 0o7777, version.uid if uid is None else uid,
                        version.gid if gid is None else gid, version.mtime_ns if mtime_ns is None else mtime_ns,
                        version_id))
            return self._lock_version(tx, version_id)

        return self.db.run(run)

    def list_dir(self, directory: DirPath, state: str, after: str = "", limit: int | None = None) -> list[Version]:
        """The versions visible in one directory of one state's tree (newest per name), by name;
        only names after ``after``, at most ``limit`` of them (an indexed range scan either way)."""
        page, limited = (" LIMIT ?", (limit,)) if limit is not None else ("", ())
        in_dir, at_dir = self._in(directory)
        if state == State.PUBLISHED:
            sql = f"""SELECT {_VERSION_COLUMNS} FROM versions
                      WHERE {in_dir} AND state = '{State.PUBLISHED}' AND name > ? ORDER BY name{page}"""
            params = (*at_dir, after, *limited)
        else:
            sql = f"""SELECT {_VERSION_COLUMNS} FROM versions WHERE id IN (
                          SELECT MAX(id) FROM versions WHERE {in_dir} AND state = ? AND name > ?
                          GROUP BY name)
                      ORDER BY name{page}"""
            params = (*at_dir, state, after, *limited)
        return [_selected_version(r) for r in self.db.run(lambda tx: tx.all(sql, params, prepared=True), write=False)]

    def search(self, file_type: str | None = None, dir_prefix: str | None = None,
               states: Iterable[str] = VISIBLE_STATES, limit: int | None = None) -> list[Version]:
        """Versions under a type and directory prefix, for reports (ls, gc, fsck); ordered by path and id."""
        states = tuple(states)
        clauses = [f"state IN ({', '.join('?' * len(states))})"]
        params: list = list(states)
        if file_type is not None:
            clauses.append("file_type = ?")
            params.append(file_type)
        if dir_prefix:
            # substr, not LIKE: no wildcard escaping, and no dependence on the database's collation
            clauses.append("(dir = ? OR substr(dir, 1, ?) = ?)")
            params += [dir_prefix, len(dir_prefix) + 1, dir_prefix + "/"]
        sql = (f"SELECT {_VERSION_COLUMNS} FROM versions WHERE {' AND '.join(clauses)} "
               "ORDER BY file_type, dir, name, id")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [Version(**r) for r in self.db.run(lambda tx: tx.all(sql, params), write=False)]

    def counts(self) -> dict[str, int]:
        rows = self.db.run(lambda tx: tx.all("SELECT state, COUNT(*) AS n FROM versions GROUP BY state"),
                           write=False)
        return {r["state"]: r["n"] for r in rows}

    # -- gc (ops/gc.py) --------------------------------------------------------------------------

    def unpublished_before(self, cutoff: float) -> list[Version]:
        """Unpublished versions created before ``cutoff``, oldest first (index versions_by_state)."""
        return self._in_state_before(State.UNPUBLISHED, "created_at", cutoff)

    def expired_before(self, cutoff: float) -> list[Version]:
        """Expired versions whose expiry is older than ``cutoff``, oldest expiry first."""
        return self._in_state_before(State.EXPIRED, "expired_at", cutoff)

    def _in_state_before(self, state: State, time_column: str, cutoff: float) -> list[Version]:
        rows = self.db.run(lambda tx: tx.all(
            f"""SELECT {_VERSION_COLUMNS} FROM versions
                WHERE state = '{state}' AND {time_column} < ? ORDER BY {time_column}, id""",
            (cutoff,)), write=False)
        return [Version(**r) for r in rows]

    def rows_of_keys(self, keys: Sequence[str]) -> dict[str, dict]:
        """The ``id``, ``state`` and ``storage`` of the version of each of ``keys`` that one holds, by key."""
        if not keys:
            return {}
        rows = self.db.run(lambda tx: tx.all(
            f"SELECT s3_key, id, state, storage FROM versions WHERE s3_key IN ({', '.join('?' * len(keys))})",
            tuple(keys)), write=False)
        return {r.pop("s3_key"): r for r in rows}

    def purge(self, version_id: int, expired_before: float) -> bool:
        """Mark a version purged if it is still expired, since before ``expired_before``: one expired
        again later, or published meanwhile, is left as it is (the condition is the UPDATE's own, so a
        concurrent re-publish is either before it, and wins, or after it, and is refused). True if
        this call purged it. The caller deletes the object afterwards: once purged, nothing can
        publish the version again."""
        check_transition(f"version {version_id}", State.EXPIRED, State.PURGED)  # made where the row is expired
        now = self.clock()

        def run(tx: Tx) -> bool:
            changed = tx.execute(f"""UPDATE versions SET state = '{State.PURGED}', purged_at = ?
                                     WHERE id = ? AND state = '{State.EXPIRED}' AND expired_at < ?""",
                                 (now, version_id, expired_before))
            if changed or not tx.rerun:
                return bool(changed)
            return tx.scalar("SELECT purged_at FROM versions WHERE id = ?", (version_id,)) == now  # the first attempt's

        return self.db.run(run)

    # -- archive tiers (ops/archive.py): fresh -> archived -> thawing -> fresh (or back to archived) ---

    def archive(self, version_id: int) -> Version:
        """Record that an uploaded, published or expired version's object is in an archive class (the
        caller moved it there first). A version archived already is returned as it is."""
        check_transition(f"version {version_id}", Tier.FRESH, Tier.ARCHIVED)  # made where the row is fresh
        now = self.clock()
        return self._change_tier(version_id, f"""UPDATE versions SET tier = '{Tier.ARCHIVED}', archived_at = ?,
                                                     thaw_requested_at = NULL
                                                 WHERE id = ? AND tier = '{Tier.FRESH}'
                                                     AND storage = '{Storage.UPLOADED}'
                                                     AND state IN ('{State.PUBLISHED}', '{State.EXPIRED}')""",
                                 (now, version_id), Tier.ARCHIVED)

    def request_thaw(self, version_id: int) -> Version:
        """Record that an archived version's restore was asked for (it is thawing, ``thaw_requested_at``)."""
        check_transition(f"version {version_id}", Tier.ARCHIVED, Tier.THAWING)
        return self._change_tier(version_id, f"""UPDATE versions SET thaw_requested_at = ?
                                                 WHERE id = ? AND tier = '{Tier.ARCHIVED}'
                                                     AND thaw_requested_at IS NULL""",
                                 (self.clock(), version_id), Tier.THAWING)

    def finish_thaw(self, version_id: int) -> Version:
        """Record that a thawing version's object is back in the standard class: fresh for good."""
        check_transition(f"version {version_id}", Tier.THAWING, Tier.FRESH)
        return self._change_tier(version_id, f"""UPDATE versions SET tier = '{Tier.FRESH}', archived_at = NULL,
                                                     thaw_requested_at = NULL
                                                 WHERE id = ? AND tier = '{Tier.ARCHIVED}'
                                                     AND thaw_requested_at IS NOT NULL""",
                                 (version_id,), Tier.FRESH)

    def lapse_thaw(self, version_id: int) -> Version:
        """Record that a thawing version's restored copy expired before the thaw was finished: archived."""
        check_transition(f"version {version_id}", Tier.THAWING, Tier.ARCHIVED)
        return self._change_tier(version_id, f"""UPDATE versions SET thaw_requested_at = NULL
                                                 WHERE id = ? AND tier = '{Tier.ARCHIVED}'
                                                     AND thaw_requested_at IS NOT NULL""",
                                 (version_id,), Tier.ARCHIVED)

    def _change_tier(self, version_id: int, update: str, params: tuple, target: Tier) -> Version:
        """Run ``update`` (its WHERE holds the row's expected tier); LifecycleError unless it changed the row
        or the row is in ``target`` already (a re-run, or another host's change meanwhile)."""

        def run(tx: Tx) -> Version:
            tx.execute(update, params)
            version = self._lock_version(tx, version_id)
            if version.shown_tier != target:
                raise LifecycleError(f"{version.path}: version {version_id} is {version.state}, {version.storage} "
                                     f"and {version.shown_tier}; it cannot become {target}")
            return version

        return self.db.run(run)

    def thawing(self, limit: int, after_id: int = 0) -> list[Version]:
        """Up to ``limit`` thawing versions with ids above ``after_id``, by id (the partial index
        versions_thawing holds only them: few, however many versions there are)."""
        return [Version(**r) for r in self.db.run(lambda tx: tx.all(
            f"""SELECT {_VERSION_COLUMNS} FROM versions WHERE thaw_requested_at IS NOT NULL AND id > ?
                ORDER BY id LIMIT ?""", (after_id, limit)), write=False)]

    def archivable(self, created_before: float, file_type: str | None = None) -> list[Version]:
        """Fresh, uploaded, published or expired versions created before ``created_before`` (of ``file_type``
        if given), oldest first: ``s3repofs archive --older-than``'s candidates."""
        of_type, params = (" AND file_type = ?", (file_type,)) if file_type else ("", ())
        return [Version(**r) for r in self.db.run(lambda tx: tx.all(
            f"""SELECT {_VERSION_COLUMNS} FROM versions
                WHERE state IN ('{State.PUBLISHED}', '{State.EXPIRED}') AND created_at < ?
                    AND tier = '{Tier.FRESH}' AND storage = '{Storage.UPLOADED}'{of_type}
                ORDER BY created_at, id""", (created_before, *params)), write=False)]

    # -- fsck (ops/fsck.py): versions a page at a time, objects lost and found ---------------------

    def scan_versions(self, after_id: int, limit: int, prefix: DirPath | None = None) -> list[Version]:
        """Up to ``limit`` versions in a visible state (unpublished, published, expired), any storage, with
        ids above ``after_id``, by id: a walk of the whole table one page at a time (``after_id`` = the last
        id of the page before), in constant memory. ``prefix``: only versions under it, or at it exactly."""
        where, params = self._scope(prefix)
        return [Version(**r) for r in self.db.run(lambda tx: tx.all(
            f"""SELECT {_VERSION_COLUMNS} FROM versions WHERE id > ? AND state IN ({_VISIBLE}){where}
                ORDER BY id LIMIT ?""", (after_id, *params, limit)), write=False)]

    def count_versions(self, prefix: DirPath | None = None) -> int:
        """How many versions ``scan_versions`` walks."""
        where, params = self._scope(prefix)
        return self.db.run(lambda tx: tx.scalar(
            f"SELECT COUNT(*) FROM versions WHERE state IN ({_VISIBLE}){where}", params), write=False)

    def mark_missing(self, version_id: int) -> Version:
        """Record that an uploaded version's object is lost and no verified copy was found to restore it."""
        return self._change_storage(version_id, Storage.UPLOADED, Storage.MISSING)

    def mark_restored(self, version_id: int) -> Version:
        """Record that a version recorded missing has its object (verified) in the store again."""
        return self._change_storage(version_id, Storage.MISSING, Storage.UPLOADED)

    def _change_storage(self, version_id: int, old: Storage, new: Storage) -> Version:
        def run(tx: Tx) -> Version:
            version = self._lock_version(tx, version_id)
            if version.storage == new:  # by a first attempt (tx.rerun), or by another fsck meanwhile
                return version
            if version.storage != old:
                raise LifecycleError(f"{version.path}: version {version_id} is {version.storage}, not {old}")
            check_transition(f"{version.path}: version {version_id}", version.storage, new)
            tx.execute("UPDATE versions SET storage = ? WHERE id = ?", (str(new), version_id))
            return self._lock_version(tx, version_id)

        return self.db.run(run)

    def _scope(self, prefix: DirPath | None) -> tuple[str, tuple]:
        """`` AND ...``: versions under ``prefix`` (a type, or a type's directory), or at it as a file path."""
        if prefix is None:
            return "", ()
        if not prefix.dir:
            return " AND file_type = ?", (prefix.file_type,)
        parent, _, name = prefix.dir.rpartition("/")
        # substr, not LIKE: no wildcard escaping, and no dependence on the database's collation
        return (" AND file_type = ? AND (dir = ? OR substr(dir, 1, ?) = ? OR (dir = ? AND name = ?))",
                (prefix.file_type, prefix.dir, len(prefix.dir) + 1, prefix.dir + "/", parent, name))

    # -- tags -----------------------------------------------------------------------------------

    def set_tag(self, version_id: int, key: str, value: str) -> None:
        self.db.run(lambda tx: tx.execute(
            """INSERT INTO tags (version_id, key, value) VALUES (?, ?, ?)
               ON CONFLICT (version_id, key) DO UPDATE SET value = excluded.value""",
            (version_id, key, value),
        ))

    def tags(self, version_id: int) -> dict[str, str]:
        rows = self.db.run(lambda tx: tx.all("SELECT key, value FROM tags WHERE version_id = ? ORDER BY key",
                                             (version_id,)), write=False)
        return {r["key"]: r["value"] for r in rows}

    def remove_tag(self, version_id: int, key: str) -> bool:
        """Remove a version's tag; True if it had it."""
        return bool(self.db.run(lambda tx: tx.execute("DELETE FROM tags WHERE version_id = ? AND key = ?",
                                                      (version_id, key))))

    def copy_tags(self, from_id: int, to_id: int) -> None:
        """Give version ``to_id`` every tag of ``from_id`` (a tag it has already keeps its value)."""
        self.db.run(lambda tx: tx.execute(
            """INSERT INTO tags (version_id, key, value) SELECT ?, key, value FROM tags WHERE version_id = ?
               ON CONFLICT (version_id, key) DO NOTHING""", (to_id, from_id)))

    def find_page(self, query: FindQuery, after_id: int, limit: int) -> list[Version]:
        """Up to ``limit`` versions that match ``query`` with ids above ``after_id``, by id (keyset paging:
        ``after_id`` is the last id of the page before)."""
        sql, params = self.find_sql(query, after_id, limit)
        return [Version(**r) for r in self.db.run(lambda tx: tx.all(sql, params), write=False)]

    def find_sql(self, query: FindQuery, after_id: int, limit: int) -> tuple[str, list]:
        """``find_page``'s statement (the plan test EXPLAINs it): ``find_condition`` within ``query.prefix``."""
        where, params = self.find_where(query, after_id)
        return f"SELECT {_VERSION_COLUMNS} FROM versions WHERE {where} ORDER BY id LIMIT {int(limit)}", params

    def find_where(self, query: FindQuery, after_id: int) -> tuple[str, list]:
        """The condition on ``versions`` of ``find_sql``, for statements that add to it (meta/claims.py)."""
        condition, params = find_condition(query, after_id)
        where, scope_params = self._scope(query.prefix)
        return condition + where, params + list(scope_params)

    # -- directories ----------------------------------------------------------------------------

    def list_types(self) -> list[Directory]:
        rows = self.db.run(lambda tx: tx.all(
            f"SELECT {self._dir_columns} FROM directories WHERE parent IS NULL ORDER BY file_type", prepared=True),
            write=False)
        return [_directory(r) for r in rows]

    def list_subdirs(self, directory: DirPath) -> list[Directory]:
        under, params = self._under(directory)
        rows = self.db.run(lambda tx: tx.all(
            f"SELECT {self._dir_columns} FROM directories WHERE {under} ORDER BY dir", params, prepared=True),
            write=False)
        return [_directory(r) for r in rows]

    def get_dir(self, directory: DirPath) -> Directory | None:
        return self.db.run(lambda tx: self._get_dir(tx, directory), write=False)

    def make_dir(self, directory: DirPath, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Directory:
        now = self.clock()

        in_dir, at_dir = self._in(directory)

        def run(tx: Tx) -> Directory:
            self._ensure_dirs(tx, directory, now)
            tx.execute(f"UPDATE directories SET explicit = 1, mode = ?, uid = ?, gid = ? WHERE {in_dir}",
                       (mode, uid, gid, *at_dir))
            return self._get_dir(tx, directory)

        return self.db.run(run)

    def set_dir_attrs(self, directory: DirPath, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, mtime_ns: int | None = None) -> Directory:
        in_dir, at_dir = self._in(directory)

        def run(tx: Tx) -> Directory:
            current = self._get_dir(tx, directory)
            if current is None:
                raise NotFoundError(f"{directory}: no such directory")
            tx.execute(f"UPDATE directories SET mode = ?, uid = ?, gid = ?, mtime_ns = ? WHERE {in_dir}",
                       (current.mode if mode is None else mode & 0o7777, current.uid if uid is None else uid,
                        current.gid if gid is None else gid, current.mtime_ns if mtime_ns is None else mtime_ns,
                        *at_dir))
            return self._get_dir(tx, directory)

        return self.db.run(run)

    def remove_dir(self, directory: DirPath) -> None:
        """Remove an empty directory: no subdirectory and no visible version in any state."""

        in_dir, at_dir = self._in(directory)
        under, params = self._under(directory)

        def run(tx: Tx) -> None:
            if tx.one(f"SELECT 1 FROM directories WHERE {in_dir}", at_dir) is None:
                if tx.rerun:  # removed by the first attempt
                    return
                raise NotFoundError(f"{directory}: no such directory")
            child = tx.one(f"SELECT 1 FROM directories WHERE {under} LIMIT 1", params)
            version = tx.one(
                f"""SELECT 1 FROM versions WHERE {in_dir}
                    AND state IN ({_VISIBLE}) LIMIT 1""", at_dir)
            if child or version:
                raise NotEmptyError(f"{directory}: directory not empty")
            tx.execute(f"DELETE FROM directories WHERE {in_dir}", at_dir)

        self.db.run(run)

    # -- helpers (inside a transaction) ---------------------------------------------------------

    def _ensure_dirs(self, tx: Tx, directory: DirPath, now: float) -> None:
        rows = [(d.file_type, d.dir, d.parent_dir, now) for d in directory.ancestors()]
        # One multi-row statement, sent with the next one: no round trip of its own, however deep the path.
        tx.defer(f"""INSERT INTO directories (file_type, dir, parent, created_at)
                     VALUES {", ".join(["(?, ?, ?, ?)"] * len(rows))}
                     ON CONFLICT (file_type, {self.db.dialect.indexed("dir")}) DO NOTHING""",
                 [value for row in rows for value in row])

    def _get_dir(self, tx: Tx, directory: DirPath) -> Directory | None:
        in_dir, at_dir = self._in(directory)
        row = tx.one(f"SELECT {self._dir_columns} FROM directories WHERE {in_dir}", at_dir, prepared=True)
        return _directory(row) if row else None

    def _lock_path(self, tx: Tx, path: RepoPath) -> None:
        # An upsert that always writes the row: it creates the lock row if needed and holds its row
        # lock until commit, sent with the next statement (SQLite locks the whole database for a writer anyway).
        tx.defer(f"""INSERT INTO path_locks (file_type, dir, name) VALUES (?, ?, ?)
                     ON CONFLICT (file_type, {self.db.dialect.indexed("dir")}, name)
                     DO UPDATE SET name = excluded.name""",
                 (path.file_type, path.dir, path.name))

    def _lock_version(self, tx: Tx, version_id: int) -> Version:
        row = tx.one(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE id = ?" + self.db.dialect.for_update,
                     (version_id,))
        if row is None:
            raise NotFoundError(f"no version {version_id}")
        return Version(**row)

    def _expired_by(self, tx: Tx, published: Version) -> Version | None:
        """The version that publishing ``published`` expired (in the same transaction, at the same time)."""
        at_path, params = self._at(published.path)
        return _version(tx.one(
            f"""SELECT {_VERSION_COLUMNS} FROM versions
                WHERE {at_path} AND state = '{State.EXPIRED}' AND expired_at = ? AND id <> ?""",
            (*params, published.published_at, published.id),
        ))

    def _published(self, tx: Tx, path: RepoPath) -> Version | None:
        at_path, params = self._at(path)
        return _version(tx.one(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE {at_path} AND state = '{State.PUBLISHED}'"
            + self.db.dialect.for_update, params))

    # -- conditions on a path, as the indexes find them -------------------------------------------

    def _is(self, column: str, value: str) -> tuple[str, tuple]:
        """``column = value``, written the way the column is indexed: on PostgreSQL by md5(column)
        (migration 4: a dir may be longer than a btree entry), and compared in full as well."""
        key = self.db.dialect.indexed(column)
        if key == column:
            return f"{column} = ?", (value,)
        return f"{key} = {self.db.dialect.indexed('?')} AND {column} = ?", (value, value)

    def _in(self, directory: DirPath) -> tuple[str, tuple]:
        """The rows of ``directory`` (versions in it, or the directory's own row)."""
        is_dir, params = self._is("dir", directory.dir)
        return f"file_type = ? AND {is_dir}", (directory.file_type, *params)

    def _at(self, path: RepoPath) -> tuple[str, tuple]:
        in_dir, params = self._in(path.parent)
        return f"{in_dir} AND name = ?", (*params, path.name)

    def _under(self, directory: DirPath) -> tuple[str, tuple]:
        """The subdirectories of ``directory``."""
        is_parent, params = self._is("parent", directory.dir)
        return f"{is_parent} AND file_type = ?", (*params, directory.file_type)
