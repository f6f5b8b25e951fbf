"""Repository fixtures: one test body against every metadata engine and object store.

Backends: SQLite or a real PostgreSQL; a local object directory or a real S3-protocol server
(moto's standalone server, over HTTP on loopback). Each test gets its own database and bucket.
"""

from __future__ import annotations

import pytest

from s3repofs import S3Repo

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


def back_to_schema_1(tx) -> None:
    """Undo migrations 2 and 3 in a transaction: the database as a schema-1 repository left it."""
    on = {"versions_touch_dir": "versions", "versions_touch_dirs": "versions",
          "directories_touch_parent": "directories", "directories_touch_parent_gone": "directories"}
    for trigger, table in on.items():  # migration 3's
        tx.execute(f"DROP TRIGGER IF EXISTS {trigger}" + (f" ON {table}" if tx.kind == "postgresql" else ""))
    tx.execute("ALTER TABLE versions DROP COLUMN mtime_ns")
    tx.execute("ALTER TABLE directories DROP COLUMN mtime_ns")
    tx.execute("ALTER TABLE versions DROP COLUMN xxh3")
    tx.execute("UPDATE schema_version SET version = 1")
