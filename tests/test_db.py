"""Transactions and round trips: what reaches PostgreSQL, and connections after failures."""

from __future__ import annotations

import errno

import pytest

from s3repofs.errors import DatabaseUnavailableError, NoSpaceError
from s3repofs.meta.db import Database, PostgresDialect


class RecordingCursor:
    rowcount = 0
    description = [("x",)]

    def __init__(self, connection: "RecordingConnection") -> None:
        self.connection = connection
        self.sent = connection.sent

    def execute(self, sql: str, params: tuple = ()) -> None:
        self.sent.append(sql)

    def fetchall(self) -> list:
        return [(1,)]


class RecordingConnection:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.prepared: set[str] = set()
        self.preparing = False

    def cursor(self) -> RecordingCursor:
        return RecordingCursor(self)


def statements_of(write: bool, one_trip: bool, body) -> list[str]:
    dialect, conn = PostgresDialect("postgresql://u@127.0.0.1/db"), RecordingConnection()
    tx = dialect.begin(conn, write, one_trip)
    body(tx)
    dialect.commit(tx)
    return conn.sent


def test_a_read_is_one_round_trip_without_begin_or_commit():
    assert statements_of(False, False, lambda tx: tx.one("SELECT ?", (1,))) == ["SELECT %s"]


def test_a_write_sends_begin_and_deferred_statements_with_its_first_statement():
    def body(tx):
        tx.defer("LOCK ?", (1,))
        tx.one("UPDATE ?", (2,))
        tx.execute("UPDATE again")

    assert statements_of(True, False, body) == ["BEGIN; LOCK %s; UPDATE %s", "UPDATE again", "COMMIT"]


def test_a_write_of_only_deferred_statements_commits_them_in_one_trip():
    assert statements_of(True, False, lambda tx: tx.defer("INSERT x")) == ["BEGIN; INSERT x; COMMIT"]
    assert statements_of(True, False, lambda tx: None) == []


def test_a_one_trip_write_is_one_string_and_refuses_a_second_one():
    def body(tx):
        tx.defer("A")
        tx.one("B")

    assert statements_of(True, True, body) == ["A; B"]
    with pytest.raises(RuntimeError, match="one-trip"):
        statements_of(True, True, lambda tx: (tx.execute("A"), tx.execute("B")))


@pytest.mark.parametrize("write", [False, True])
def test_a_failed_statement_leaves_the_pooled_connection_usable(pg_url, write):
    db = Database(pg_url, max_connections=1)  # one connection: the next transaction gets the same one
    try:
        with pytest.raises(DatabaseUnavailableError, match="division by zero"):
            db.run(lambda tx: tx.one("SELECT 1 / 0 AS x"), write=write)
        assert db.run(lambda tx: tx.scalar("SELECT 41 + 1")) == 42
        assert db.run(lambda tx: tx.scalar("SELECT 7"), write=False) == 7
    finally:
        db.close()


def test_a_prepared_statement_is_prepared_with_its_first_execute_then_only_executed():
    dialect, conn = PostgresDialect("postgresql://u@127.0.0.1/db"), RecordingConnection()
    for n in (1, 2):
        tx = dialect.begin(conn, False)
        tx.one("SELECT ? + 1, '100%' WHERE ? > 0", (n, n), prepared=True)
        dialect.commit(tx)
    assert conn.sent == ["PREPARE s3repofs_1 AS SELECT $1 + 1, '100%%' WHERE $2 > 0; EXECUTE s3repofs_1 (%s, %s)",
                         "EXECUTE s3repofs_1 (%s, %s)"]


def test_prepared_statements_answer_as_plain_ones(pg_url):
    db = Database(pg_url, max_connections=1)
    try:
        for n in (1, 2, 3):
            assert db.run(lambda tx: tx.one("SELECT ? + 1 AS x, '100%' AS y", (n,), prepared=True),
                          write=False) == {"x": n + 1, "y": "100%"}
        assert db.run(lambda tx: tx.scalar("SELECT COUNT(*) FROM pg_prepared_statements")) == 1
    finally:
        db.close()


def test_a_failed_first_execute_leaves_the_statement_preparable_again(pg_url):
    # The PREPARE took (PostgreSQL does not undo it), the EXECUTE failed: the connection forgets what it
    # prepared, and the next use prepares it again rather than failing on "already exists".
    db = Database(pg_url, max_connections=1)
    try:
        with pytest.raises(DatabaseUnavailableError, match="division by zero"):
            db.run(lambda tx: tx.one("SELECT 1 / ? AS x", (0,), prepared=True), write=False)
        assert db.run(lambda tx: tx.one("SELECT 1 / ? AS x", (1,), prepared=True), write=False) == {"x": 1}
        with pytest.raises(DatabaseUnavailableError, match="division by zero"):  # in a write transaction too
            db.run(lambda tx: (tx.defer("SELECT 1"), tx.one("SELECT 2 / ? AS x", (0,), prepared=True)))
        assert db.run(lambda tx: tx.one("SELECT 2 / ? AS x", (2,), prepared=True)) == {"x": 1}
    finally:
        db.close()


def test_a_closed_connection_is_dropped_not_pooled_again(pg_url):
    db = Database(pg_url, max_connections=1)
    try:
        db.run(lambda tx: tx.scalar("SELECT 1"))
        (conn,) = list(db._all)
        conn.close()  # as if the server had gone away
        assert db.run(lambda tx: tx.scalar("SELECT 2"), write=False) == 2  # retried on a new connection
        assert conn not in db._all
    finally:
        db.close()


def test_a_full_sqlite_disk_is_enospc_not_eio(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'full.db'}", max_connections=1)
    try:
        db.run(lambda tx: tx.execute("CREATE TABLE t (x TEXT)"))
        # SQLite answers SQLITE_FULL ("database or disk is full") at the page limit as on a full disk
        db.run(lambda tx: tx.execute(f"PRAGMA max_page_count = {tx.scalar('PRAGMA page_count')}"))
        with pytest.raises(NoSpaceError, match="database or disk is full") as info:
            db.run(lambda tx: tx.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,)))
        assert info.value.errno == errno.ENOSPC
    finally:
        db.close()
