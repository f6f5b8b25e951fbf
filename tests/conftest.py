# Server fixtures: a real PostgreSQL and a real S3-protocol server (moto), both on loopback,
# started once per session; each test gets its own database and bucket.
# Other fixtures are added below by the package author.

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from servers import PostgresServer, S3Server, start_postgres, start_s3_server


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    name = f"test_{uuid.uuid4().hex}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)  # WITH (FORCE): connections left open don't block it


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """The name of a fresh, empty bucket on s3_server, emptied and deleted after the test."""
    name = f"test-{uuid.uuid4().hex}"
    s3_server.create_bucket(name)
    yield name
    s3_server.delete_bucket(name)


pytest_plugins = ["repo_fixtures"]
