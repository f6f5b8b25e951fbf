"""The server fixtures work: real PostgreSQL and real S3 over loopback TCP."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import psycopg2
import pytest
from servers import PostgresServer, S3Server


def test_pg_url_is_a_fresh_database(pg_url: str) -> None:
    parts = urlsplit(pg_url)
    assert parts.scheme == "postgresql" and parts.hostname == "127.0.0.1"
    with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
        cur.execute("SELECT current_database()")
        assert cur.fetchone() == (parts.path.lstrip("/"),)
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert cur.fetchone() == (0,)
    conn.close()


def test_drop_database_disconnects_users(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database("test_drop_me")
    conn = psycopg2.connect(url)
    try:
        postgres_server.drop_database("test_drop_me")  # despite conn still being open
    finally:
        conn.close()
    with pytest.raises(psycopg2.OperationalError, match="does not exist"):
        psycopg2.connect(url)


def test_s3_bucket_round_trip(s3_server: S3Server, s3_bucket: str) -> None:
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", s3_bucket)
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    client = s3_server.client()
    assert client.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0
    client.put_object(Bucket=s3_bucket, Key="dir/hello.txt", Body=b"hello, s3")
    assert client.get_object(Bucket=s3_bucket, Key="dir/hello.txt")["Body"].read() == b"hello, s3"
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["dir/hello.txt"]
