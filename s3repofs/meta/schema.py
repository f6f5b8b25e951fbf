"""The database schema: its migrations, one per version, and the function that applies them.

``SCHEMA_VERSION`` is the version this code needs; ``migrate`` takes a database from whatever version
it is at (0: none) to it. The literal states in the DDL are the schema's history: a migration that
has shipped is never edited, so it does not follow the enums of domain/lifecycle.py.
"""

from __future__ import annotations

from ..errors import RepoError
from .db import Dialect, Tx

SCHEMA_VERSION = 6
_SQLITE_NOW = "CAST((julianday('now') - 2440587.5) * 86400e9 AS INTEGER)"  # ns since the epoch, as time.time_ns()
_SQLITE_TOUCHED = f"mtime_ns = max({_SQLITE_NOW}, coalesce(mtime_ns, 0) + 1)"


# Each migration takes the schema from version N-1 to N. Never edit one that has shipped: add the next.
# A migration of one engine only is a dict of statements by dialect name.
MIGRATIONS: dict[int, list[str] | dict[str, list[str]]] = {
    1: [
        """CREATE TABLE hosts (
            name       TEXT PRIMARY KEY,
            first_seen {real} NOT NULL,
            last_seen  {real} NOT NULL
        )""",
        """CREATE TABLE versions (
            id           {id},
            file_type    TEXT NOT NULL,
            dir          TEXT NOT NULL,
            name         TEXT NOT NULL,
            state        TEXT NOT NULL CHECK (state IN
                           ('unpublished', 'published', 'expired', 'discarded', 'purged')),
            storage      TEXT NOT NULL CHECK (storage IN ('local', 'uploaded', 'missing')),
            tier         TEXT NOT NULL DEFAULT 'fresh' CHECK (tier IN ('fresh', 'archived')),
            bucket       TEXT NOT NULL,
            s3_key       TEXT NOT NULL UNIQUE,
            size         {bigint},
            md5          TEXT,
            origin_host  TEXT NOT NULL,
            mode         INTEGER NOT NULL,
            uid          INTEGER NOT NULL,
            gid          INTEGER NOT NULL,
            -- set when a writer asked for publication but the upload failed: retried, then published
            publish_pending INTEGER NOT NULL DEFAULT 0,
            created_at   {real} NOT NULL,
            uploaded_at  {real},
            published_at {real},
            expired_at   {real},
            archived_at  {real},
            purged_at    {real}
        )""",
        # The database, not the code, guarantees one published version per path.
        """CREATE UNIQUE INDEX one_published_per_path ON versions (file_type, dir, name)
            WHERE state = 'published'""",
        # Listing a directory in one state is an equality lookup on this index.
        "CREATE INDEX versions_by_dir ON versions (file_type, dir, state, name)",
        "CREATE INDEX versions_by_state ON versions (state, created_at)",
        """CREATE TABLE tags (
            version_id {bigint} NOT NULL REFERENCES versions (id) ON DELETE CASCADE,
            key        TEXT NOT NULL,
            value      TEXT NOT NULL,
            PRIMARY KEY (version_id, key)
        )""",
        # Directories: every ancestor of every version (implicit) and those made by mkdir (explicit).
        # A type's top directory has dir = '' and parent NULL.
        """CREATE TABLE directories (
            file_type  TEXT NOT NULL,
            dir        TEXT NOT NULL,
            parent     TEXT,
            explicit   INTEGER NOT NULL DEFAULT 0,
            mode       INTEGER NOT NULL DEFAULT 493,
            uid        INTEGER NOT NULL DEFAULT 0,
            gid        INTEGER NOT NULL DEFAULT 0,
            created_at {real} NOT NULL,
            PRIMARY KEY (file_type, dir)
        )""",
        "CREATE INDEX directories_by_parent ON directories (parent, file_type)",
        # One row per path that was ever published: publishers serialize on it (SELECT ... FOR UPDATE).
        """CREATE TABLE path_locks (
            file_type TEXT NOT NULL,
            dir       TEXT NOT NULL,
            name      TEXT NOT NULL,
            PRIMARY KEY (file_type, dir, name)
        )""",
    ],
    # The digest downloads are verified with (see content.Content); rows without one fall back to md5.
    2: ["ALTER TABLE versions ADD COLUMN xxh3 TEXT"],
    # Times, in integer nanoseconds (a float loses what rsync and cp -p compare): a version's mtime as a user
    # set it (utimens; NULL: its creation), and a directory's mtime,
    # the last time an entry was added to it or removed from it in any state tree (NULL: its creation),
    # kept by triggers so that every change of a row, by any code on any host, moves it (forward, by at
    # least 1 ns, even within one tick of the database's clock: a poller sees every change).
    3: {"sqlite": [
        "ALTER TABLE versions ADD COLUMN mtime_ns INTEGER",
        "ALTER TABLE directories ADD COLUMN mtime_ns INTEGER",
        f"""CREATE TRIGGER IF NOT EXISTS versions_touch_dir AFTER INSERT ON versions BEGIN
            UPDATE directories SET {_SQLITE_TOUCHED} WHERE file_type = NEW.file_type AND dir = NEW.dir; END""",
        f"""CREATE TRIGGER IF NOT EXISTS versions_touch_dirs AFTER UPDATE OF state, file_type, dir, name ON versions
            WHEN OLD.state <> NEW.state OR OLD.file_type <> NEW.file_type OR OLD.dir <> NEW.dir OR OLD.name <> NEW.name
            BEGIN
            UPDATE directories SET {_SQLITE_TOUCHED} WHERE (file_type = NEW.file_type AND dir = NEW.dir)
                OR (file_type = OLD.file_type AND dir = OLD.dir); END""",
        f"""CREATE TRIGGER IF NOT EXISTS directories_touch_parent AFTER INSERT ON directories
            WHEN NEW.parent IS NOT NULL BEGIN
            UPDATE directories SET {_SQLITE_TOUCHED}
            WHERE file_type = NEW.file_type AND dir = NEW.parent; END""",
        f"""CREATE TRIGGER IF NOT EXISTS directories_touch_parent_gone AFTER DELETE ON directories
            WHEN OLD.parent IS NOT NULL BEGIN
            UPDATE directories SET {_SQLITE_TOUCHED}
            WHERE file_type = OLD.file_type AND dir = OLD.parent; END""",
    ], "postgresql": [
        "ALTER TABLE versions ADD COLUMN IF NOT EXISTS mtime_ns BIGINT",
        "ALTER TABLE directories ADD COLUMN IF NOT EXISTS mtime_ns BIGINT",
        # md5(dir): how migration 4 indexes it (a dir can outgrow a btree entry).
        """CREATE OR REPLACE FUNCTION s3repofs_touch_dirs() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE _now BIGINT := (extract(epoch FROM clock_timestamp()) * 1e9)::BIGINT;
            BEGIN
                IF TG_TABLE_NAME = 'versions' THEN
                    UPDATE directories SET mtime_ns = GREATEST(_now, coalesce(mtime_ns, 0) + 1)
                    WHERE file_type = NEW.file_type AND md5(dir) = md5(NEW.dir) AND dir = NEW.dir;
                    IF TG_OP = 'UPDATE' AND (OLD.file_type, OLD.dir) IS DISTINCT FROM (NEW.file_type, NEW.dir) THEN
                        UPDATE directories SET mtime_ns = GREATEST(_now, coalesce(mtime_ns, 0) + 1)
                        WHERE file_type = OLD.file_type AND md5(dir) = md5(OLD.dir) AND dir = OLD.dir;
                    END IF;
                ELSIF TG_OP = 'INSERT' THEN
                    UPDATE directories SET mtime_ns = GREATEST(_now, coalesce(mtime_ns, 0) + 1)
                    WHERE file_type = NEW.file_type AND md5(dir) = md5(NEW.parent) AND dir = NEW.parent;
                ELSE
                    UPDATE directories SET mtime_ns = GREATEST(_now, coalesce(mtime_ns, 0) + 1)
                    WHERE file_type = OLD.file_type AND md5(dir) = md5(OLD.parent) AND dir = OLD.parent;
                END IF;
                RETURN NULL;
            END $$""",
        "DROP TRIGGER IF EXISTS versions_touch_dir ON versions",
        """CREATE TRIGGER versions_touch_dir AFTER INSERT ON versions
            FOR EACH ROW EXECUTE FUNCTION s3repofs_touch_dirs()""",
        "DROP TRIGGER IF EXISTS versions_touch_dirs ON versions",
        """CREATE TRIGGER versions_touch_dirs AFTER UPDATE OF state, file_type, dir, name ON versions FOR EACH ROW
            WHEN ((OLD.state, OLD.file_type, OLD.dir, OLD.name) IS DISTINCT FROM
                  (NEW.state, NEW.file_type, NEW.dir, NEW.name))
            EXECUTE FUNCTION s3repofs_touch_dirs()""",
        "DROP TRIGGER IF EXISTS directories_touch_parent ON directories",
        """CREATE TRIGGER directories_touch_parent AFTER INSERT OR DELETE ON directories
            FOR EACH ROW EXECUTE FUNCTION s3repofs_touch_dirs()""",
    ]},
    # Paths up to PATH_MAX: a dir can take 4,095 bytes, and a PostgreSQL btree entry has room for 2,704
    # ("index row size exceeds btree maximum"), so its indexes hold md5(dir) and md5(parent) instead, and
    # queries name the same expression (MetaStore._is). A unique index on md5 refuses only two different
    # dirs with one md5 (a crafted collision, of valid UTF-8 without '/' or NUL). SQLite has no such limit.
    # Each statement can run again: the schema 1 test re-runs it on an already migrated database.
    4: {"postgresql": [
        "DROP INDEX IF EXISTS one_published_per_path",
        """CREATE UNIQUE INDEX one_published_per_path ON versions (file_type, md5(dir), name)
            WHERE state = 'published'""",
        "DROP INDEX IF EXISTS versions_by_dir",
        "CREATE INDEX versions_by_dir ON versions (file_type, md5(dir), state, name)",
        "ALTER TABLE directories DROP CONSTRAINT IF EXISTS directories_pkey",
        "DROP INDEX IF EXISTS directories_by_dir",
        "CREATE UNIQUE INDEX directories_by_dir ON directories (file_type, md5(dir))",
        "DROP INDEX IF EXISTS directories_by_parent",
        "CREATE INDEX directories_by_parent ON directories (md5(parent), file_type)",
        "CREATE INDEX IF NOT EXISTS directories_types ON directories (file_type) WHERE parent IS NULL",
        "ALTER TABLE path_locks DROP CONSTRAINT IF EXISTS path_locks_pkey",
        "DROP INDEX IF EXISTS path_locks_by_path",
        "CREATE UNIQUE INDEX path_locks_by_path ON path_locks (file_type, md5(dir), name)",
    ]},
    # find (MetaStore.find_sql): versions by tag, and by publication time, without a scan of versions
    # (date tags are ranges of created_at: versions_by_state). A value is at most 2,048 bytes (domain/tags.py).
    5: [
        "CREATE INDEX IF NOT EXISTS tags_by_key ON tags (key, value, version_id)",
        "CREATE INDEX IF NOT EXISTS versions_by_published ON versions (published_at)",
    ],
    # Processing claims, archive thaws, and who holds what (issue 15):
    # - claims: a lease on a version for a task (repo.claim, repo.lock, flock on the mount); a holder renews
    #   expires_at while it lives, so a lease whose holder died runs out. claims_done: the versions a task
    #   completed, which claim() never hands out again for that task.
    # - thaw_requested_at: an archived version whose restore was asked for (shown as tier "thawing"); the tier
    #   column keeps its check (SQLite cannot alter one), so thawing is this column, not a third tier value.
    # - holders: the hosts whose cache holds a verified copy of a version; hosts.cache_*: each host's cache.
    6: [
        """CREATE TABLE IF NOT EXISTS claims (
            version_id {bigint} NOT NULL REFERENCES versions (id) ON DELETE CASCADE,
            task       TEXT NOT NULL,
            holder     TEXT NOT NULL,
            host       TEXT NOT NULL,
            pid        INTEGER NOT NULL,
            claimed_at {real} NOT NULL,
            expires_at {real} NOT NULL,
            PRIMARY KEY (version_id, task)
        )""",
        "CREATE INDEX IF NOT EXISTS claims_by_holder ON claims (holder)",
        """CREATE TABLE IF NOT EXISTS claims_done (
            version_id {bigint} NOT NULL REFERENCES versions (id) ON DELETE CASCADE,
            task       TEXT NOT NULL,
            host       TEXT NOT NULL,
            done_at    {real} NOT NULL,
            PRIMARY KEY (version_id, task)
        )""",
        "ALTER TABLE versions ADD COLUMN thaw_requested_at {real}",
        """CREATE INDEX IF NOT EXISTS versions_thawing ON versions (thaw_requested_at)
            WHERE thaw_requested_at IS NOT NULL""",
        """CREATE TABLE IF NOT EXISTS holders (
            version_id  {bigint} NOT NULL REFERENCES versions (id) ON DELETE CASCADE,
            host        TEXT NOT NULL,
            verified_at {real} NOT NULL,
            PRIMARY KEY (version_id, host)
        )""",
        "CREATE INDEX IF NOT EXISTS holders_by_host ON holders (host)",
        "ALTER TABLE hosts ADD COLUMN cache_bytes {bigint}",
        "ALTER TABLE hosts ADD COLUMN cache_objects {bigint}",
        "ALTER TABLE hosts ADD COLUMN cache_bound {bigint}",
    ],
}


def migrate(tx: Tx, dialect: Dialect) -> int:
    """Create or migrate the schema to SCHEMA_VERSION in ``tx``; idempotent and safe to run concurrently.
    RepoError if the database's schema is newer than this code."""
    if tx.kind == "postgresql":
        tx.execute("SELECT pg_advisory_xact_lock(7303521)")  # one migrator at a time
    tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    current = tx.scalar("SELECT MAX(version) FROM schema_version") or 0
    if current > SCHEMA_VERSION:
        raise RepoError(
            f"the database schema is version {current}, newer than this s3repofs "
            f"understands ({SCHEMA_VERSION}): upgrade s3repofs"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        statements = MIGRATIONS[version]
        if isinstance(statements, dict):
            statements = statements.get(tx.kind, [])
        for statement in statements:
            tx.execute(dialect.ddl(statement))
        tx.execute("DELETE FROM schema_version")
        tx.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    return SCHEMA_VERSION


def current_version(tx: Tx) -> int:
    """The schema version of the database, 0 if the repository was never created."""
    if tx.kind == "postgresql":
        exists = tx.scalar("SELECT to_regclass('schema_version') IS NOT NULL")
    else:
        exists = tx.scalar("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'")
    return (tx.scalar("SELECT MAX(version) FROM schema_version") or 0) if exists else 0
