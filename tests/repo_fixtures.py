"""Repository fixtures: one test body against every metadata engine and object store.

Backends: SQLite or a real PostgreSQL; a local object directory or a real S3-protocol server
(moto's standalone server, over HTTP on loopback). Each test gets its own database and bucket.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from s3repofs import S3Repo
from s3repofs.ops import backup as backup_ops
from s3repofs.ops import restore as restore_ops

BACKENDS = ["sqlite-local", "sqlite-s3", "postgres-local", "postgres-s3"]


def make_config(request, tmp_path, backend: str) -> dict:
    database, store = backend.split("-")
    config: dict = {"local_root": str(tmp_path / "root"), "host_name": "test-host"}
    if database == "postgres":
        config["database"] = request.getfixturevalue("pg_url")
    else:
        config["database"] = f"sqlite:///{tmp_path / 'repo.db'}"
    if store == "s3":
        server = request.getfixturevalue("s3_server")
        config.update(default_s3_bucket=request.getfixturevalue("s3_bucket"), s3_endpoint_url=server.endpoint_url,
                      s3_access_key=server.access_key, s3_secret_key=server.secret_key, s3_region=server.region)
    else:
        config["object_dir"] = str(tmp_path / "objects")
    return config


@pytest.fixture(params=BACKENDS)
def repo_config(request, tmp_path) -> dict:
    """The configuration (a dict) of a fresh, not yet created repository."""
    return make_config(request, tmp_path, request.param)


@pytest.fixture(params=["sqlite-local", "postgres-s3"])
def repo_config_pair(request, tmp_path) -> dict:
    """Like repo_config, only the embedded engines and the production ones (for slower tests)."""
    return make_config(request, tmp_path, request.param)


@pytest.fixture
def repo(repo_config):
    repo = S3Repo(repo_config)
    repo.create_repository()
    yield repo
    repo.close()


def undo_migration_6(tx) -> None:
    """Drop what migration 6 added (it adds columns, which cannot be added twice)."""
    for table in ("claims", "claims_done", "holders"):
        tx.execute(f"DROP TABLE {table}")
    tx.execute("DROP INDEX versions_thawing")
    tx.execute("ALTER TABLE versions DROP COLUMN thaw_requested_at")
    for column in ("cache_bytes", "cache_objects", "cache_bound"):
        tx.execute(f"ALTER TABLE hosts DROP COLUMN {column}")


def back_to_schema_1(tx) -> None:
    """Undo migrations 2, 3 and 6 in a transaction: the database as a schema-1 repository left it (4 and 5
    only index, and can run again)."""
    undo_migration_6(tx)
    on = {"versions_touch_dir": "versions", "versions_touch_dirs": "versions",
          "directories_touch_parent": "directories", "directories_touch_parent_gone": "directories"}
    for trigger, table in on.items():  # migration 3's
        tx.execute(f"DROP TRIGGER IF EXISTS {trigger}" + (f" ON {table}" if tx.kind == "postgresql" else ""))
    tx.execute("ALTER TABLE versions DROP COLUMN mtime_ns")
    tx.execute("ALTER TABLE directories DROP COLUMN mtime_ns")
    tx.execute("ALTER TABLE versions DROP COLUMN xxh3")
    tx.execute("UPDATE schema_version SET version = 1")


@pytest.fixture
def empty_database(request, tmp_path):
    """A function: an engine ("sqlite" or "postgres") -> the URL of a new, empty database (dropped afterwards)."""
    made: list[str] = []

    def make(kind: str) -> str:
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'restored-{uuid.uuid4().hex}.db'}"
        server = request.getfixturevalue("postgres_server")
        name = f"restored_{uuid.uuid4().hex}"
        made.append(name)
        return server.create_database(name)

    yield make
    for name in made:
        request.getfixturevalue("postgres_server").drop_database(name)


@pytest.fixture
def restored_behind(repo_config_pair, empty_database):
    """A repository restored from a backup older than its newest writes (SQLite and a local store, PostgreSQL
    and the S3 server): t/a published (version ``a1``), the backup, then t/new/b published (``b``) and a new
    version of t/a (``a2``); then the backup restored into a new database, which ``config`` names (with
    ``orphan_grace`` 0). The objects of b and a2 are in the store; their rows are not in that database."""
    config = {**repo_config_pair, "orphan_grace": 0}
    with S3Repo(config) as repo:
        repo.create_repository()
        a1 = repo.add_file(path="t/a").touch(b"A, first").publish()
        backup_ops.backup(repo)
        b = repo.add_file(path="t/new/b").touch(b"B, published after the backup").publish()
        a2 = repo.add_file(path="t/a").touch(b"A, second").publish()
        restored = empty_database("sqlite" if config["database"].startswith("sqlite") else "postgres")
        restore_ops.restore(repo, None, restored)
    return SimpleNamespace(config={**config, "database": restored}, a1=a1.version, b=b.version, a2=a2.version,
                           data={"t/a": b"A, second", "t/new/b": b"B, published after the backup"})
