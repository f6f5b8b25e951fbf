"""SQL connections for SQLite (stdlib) and PostgreSQL (psycopg2) behind one small interface.

``Database.run(fn)`` calls ``fn(tx)`` inside one transaction and retries it when the engine reports a
transient conflict (serialization failure, deadlock, SQLite's "database is locked") or the
connection breaks, so callers write each transaction once, as JuiceFS does with its ``txn()``.

A connection that breaks while the statement that commits is on its way leaves the outcome unknown:
the server may have committed and only the answer been lost. The transaction then runs again with
``tx.rerun`` set, and must find out what the first attempt did: every transaction here is either
idempotent (running it twice leaves what running it once does, and returns the same), or, where it
is not (an insert, a state change that refuses its own target state), checks ``tx.rerun`` and
counts its work found done as done. The re-run reads under the same row locks as the first attempt,
so it waits for a first attempt that is still running on a server that has not noticed the break.
SQLite runs in-process: it loses no answers, and retries only what did not commit.

SQL is written with ``?`` placeholders and portable syntax; the few dialect differences live in ``Dialect``.
The hot reads of the mount (a lookup, a listing) run ``prepared``: PostgreSQL parses and plans them once per
connection, not at every call (planning cost more than executing a lookup: 0.17 ms against 0.04 ms).

Thread safety: connections are never shared between threads at the same time; they come from a
small blocking pool, one per running transaction.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from .. import metrics
from ..config import mask_url, url_password
from ..errors import DatabaseUnavailableError, NoSpaceError, OutcomeUnknownError

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_ATTEMPTS = 20


class Tx:
    """One transaction's cursor, returning rows as dicts.

    Statements whose results are not needed can be ``defer``red: they travel with the next statement
    in one round trip (PostgreSQL; SQLite runs them at once, it has no round trips). A write
    transaction on PostgreSQL opens with a deferred BEGIN, so it costs no round trip of its own.
    """

    def __init__(self, cursor: Any, dialect: "Dialect", begin: str = "", one_trip: bool = False) -> None:
        self._cursor = cursor
        self._dialect = dialect
        self._begin = begin  # sent with the first statement, then cleared
        self._deferred: list[tuple[str, tuple]] = []
        self.opened = False  # the BEGIN reached the server: the transaction must be ended
        self.sent = False  # a statement reached the server
        self.committing = False  # the statement that commits was sent: if its answer is lost, so is the outcome
        self.rerun = False  # an earlier attempt of this transaction may have committed (module docstring)
        # The server runs one query string as one transaction: everything goes in a single execute.
        self.one_trip = one_trip

    @property
    def kind(self) -> str:
        return self._dialect.name

    def execute(self, sql: str, params: tuple | list = (), prepared: bool = False) -> int:
        """Run ``sql`` (after anything deferred). ``prepared``: a statement run often, parsed and planned
        once per connection (PostgreSQL; SQLite caches its statements itself)."""
        if self.one_trip and self.sent:
            raise RuntimeError("a one-trip transaction defers every statement but its last")
        text = self._dialect.prepared(self._cursor, sql, len(params)) if prepared else self._dialect.translate(sql)
        statements = [*self._deferred, (text, tuple(params))]
        if self._begin:
            statements.insert(0, (self._begin, ()))
            self._begin, self.opened = "", True
        self._deferred = []
        self.committing = self.committing or self.one_trip
        self._cursor.execute("; ".join(text for text, _ in statements),
                             tuple(value for _, values in statements for value in values))
        self.sent = True
        if prepared:
            self._dialect.answered(self._cursor)
        return self._cursor.rowcount  # of the last statement

    def defer(self, sql: str, params: tuple | list = ()) -> None:
        """Run ``sql`` before the next statement, in its round trip; its result is not seen."""
        if self._dialect.batches:
            self._deferred.append((self._dialect.translate(sql), tuple(params)))
        else:
            self.execute(sql, params)

    @property
    def pending(self) -> bool:
        """Are deferred statements waiting to be sent?"""
        return bool(self._deferred)

    def all(self, sql: str, params: tuple | list = (), prepared: bool = False) -> list[dict]:
        self.execute(sql, params, prepared)
        names = [d[0] for d in self._cursor.description]
        return [dict(zip(names, row)) for row in self._cursor.fetchall()]

    def insert_many(self, table: str, columns: list[str], rows: list[tuple]) -> None:
        """Insert ``rows`` (values in the order of ``columns``) into ``table``, in as few round trips as the
        engine allows."""
        if self._begin or self._deferred:
            self.execute("SELECT 1")  # the BEGIN and anything deferred go first
        self._dialect.insert_many(self._cursor, table, columns, rows)
        self.sent = True

    def stream(self, sql: str, params: tuple | list = (), batch: int = 1000) -> Iterator[tuple]:
        """The rows of a query as tuples, fetched ``batch`` at a time: memory stays at one batch however many
        rows there are. The transaction runs no other statement until the rows are consumed."""
        return self._dialect.stream(self, self._cursor, sql, params, batch)

    def one(self, sql: str, params: tuple | list = (), prepared: bool = False) -> dict | None:
        rows = self.all(sql, params, prepared)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: tuple | list = ()) -> Any:
        self.execute(sql, params)
        row = self._cursor.fetchone()
        return row[0] if row else None


class Dialect:
    name = ""
    snapshot_begin = ""  # what makes a read transaction see one snapshot throughout (Database.transaction)
    batches = False  # several statements per round trip (Tx.defer)
    for_update = ""  # row-lock clause appended to SELECTs that guard a read-modify-write

    def translate(self, sql: str) -> str:
        return sql

    def prepared(self, cursor: Any, sql: str, count: int) -> str:
        """The text that runs ``sql`` (with ``count`` parameters) as a statement prepared on the cursor's
        connection; ``answered(cursor)`` once the server has answered it."""
        return self.translate(sql)

    def answered(self, cursor: Any) -> None:
        pass

    def ddl(self, sql: str) -> str:
        return sql.format(**self.types)

    def insert_many(self, cursor: Any, table: str, columns: list[str], rows: list[tuple]) -> None:
        cursor.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                           rows)

    def stream(self, tx: Tx, cursor: Any, sql: str, params: tuple | list, batch: int) -> Iterator[tuple]:
        tx.execute(sql, params)
        while rows := cursor.fetchmany(batch):
            yield from rows

    def indexed(self, column: str) -> str:
        """What the indexes on a path column (dir, parent) hold: the column itself, or an expression of it."""
        return column

    types: dict[str, str] = {}


class SQLiteDialect(Dialect):
    name = "sqlite"
    types = {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "bigint": "INTEGER", "real": "REAL"}

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN ourselves, so a write transaction can take the
            # write lock up front (BEGIN IMMEDIATE) instead of failing half-way on upgrade.
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a committed publish survives power loss
            conn.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as exc:
            raise DatabaseUnavailableError(f"cannot open SQLite database {self.path}: {exc}") from None
        return conn

    def begin(self, conn: sqlite3.Connection, write: bool, one_trip: bool = False) -> Tx:
        cursor = conn.cursor()  # SQLite has no round trips: a one-trip transaction is an ordinary one
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        return Tx(cursor, self)

    def commit(self, tx: Tx) -> None:
        tx.committing = True
        tx.execute("COMMIT")

    def reusable(self, conn: sqlite3.Connection) -> bool:
        """After a failure: roll back what is open; may the connection serve the next transaction?"""
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return True

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)

    def is_disconnect(self, exc: BaseException) -> bool:
        return False

    def is_disk_full(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL

    def integrity_errors(self) -> tuple[type, ...]:
        return (sqlite3.IntegrityError,)

    def describe(self) -> str:
        return f"SQLite database {self.path}"

    def clean(self, exc: BaseException) -> str:
        return str(exc)


class PostgresDialect(Dialect):
    name = "postgresql"
    batches = True
    snapshot_begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    for_update = " FOR UPDATE"
    types = {"id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "bigint": "BIGINT",
             "real": "DOUBLE PRECISION"}

    def __init__(self, url: str) -> None:
        import psycopg2  # imported here so SQLite-only installs never need it loaded

        self._psycopg2 = psycopg2
        self.url = url
        self._names: dict[str, str] = {}  # of each prepared statement's SQL, the same on every connection
        self._naming = threading.Lock()

        class Connection(psycopg2.extensions.connection):
            """A connection that knows which statements it has prepared."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.prepared: set[str] = set()
                self.preparing = False  # a PREPARE was sent and not answered: did it take?

        self._connection_class = Connection

    def translate(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def prepared(self, cursor: Any, sql: str, count: int) -> str:
        """``EXECUTE name (%s, ...)``, preceded on the connection's first use of the statement by its
        ``PREPARE``, in the same round trip. If that round trip fails, whether the PREPARE took is unknown:
        the connection is marked, and forgets every statement it prepared before it is reused (``reusable``)."""
        name = self._names.get(sql) or self._name(sql)
        execute = f"EXECUTE {name} ({', '.join(['%s'] * count)})" if count else f"EXECUTE {name}"
        conn = cursor.connection
        if name in conn.prepared:
            return execute
        numbers = iter(range(1, count + 1))
        numbered = re.sub(r"\?", lambda _: f"${next(numbers)}", sql.replace("%", "%%"))
        conn.prepared.add(name)
        conn.preparing = True
        return f"PREPARE {name} AS {numbered}; {execute}"

    def answered(self, cursor: Any) -> None:
        cursor.connection.preparing = False

    def _name(self, sql: str) -> str:
        with self._naming:
            return self._names.setdefault(sql, f"s3repofs_{len(self._names) + 1}")

    def insert_many(self, cursor: Any, table: str, columns: list[str], rows: list[tuple]) -> None:
        from psycopg2.extras import execute_values

        # One INSERT of many rows, in one round trip: twice as fast as as many INSERTs of one row.
        execute_values(cursor, f"INSERT INTO {table} ({', '.join(columns)}) VALUES %s", rows,
                       page_size=max(1, len(rows)))

    def stream(self, tx: Tx, cursor: Any, sql: str, params: tuple | list, batch: int) -> Iterator[tuple]:
        # A server-side cursor, declared in SQL: psycopg2's named cursors refuse our autocommit connections.
        tx.execute(f"DECLARE s3repofs_stream NO SCROLL CURSOR FOR {sql}", params)
        while True:
            tx.execute(f"FETCH FORWARD {int(batch)} FROM s3repofs_stream")
            rows = cursor.fetchall()
            if not rows:
                break
            yield from rows
        tx.execute("CLOSE s3repofs_stream")

    def indexed(self, column: str) -> str:
        # A btree entry holds at most 2,704 bytes; a dir up to 4,095 (see meta's migration 4).
        return f"md5({column})"

    def connect(self) -> Any:
        try:
            conn = self._psycopg2.connect(self.url, connect_timeout=10, application_name="s3repofs",
                                          connection_factory=self._connection_class)
            # We open transactions ourselves: psycopg2's implicit BEGIN and its COMMIT are a round
            # trip each, which a one-statement read does not need (its statement is atomic anyway).
            conn.autocommit = True
        except self._psycopg2.Error as exc:
            raise DatabaseUnavailableError(f"cannot connect to {self.describe()}: {self.clean(exc)}") from None
        return conn

    def begin(self, conn: Any, write: bool, one_trip: bool = False) -> Tx:
        """A write opens its transaction with its first statement, in the same round trip; a read runs
        each statement on its own (every read transaction here is one statement). A one-trip write
        sends no BEGIN or COMMIT: PostgreSQL runs the statements of one query string as one
        transaction, committed (or rolled back) as a whole when it ends."""
        if one_trip:
            return Tx(conn.cursor(), self, one_trip=True)
        return Tx(conn.cursor(), self, "BEGIN" if write else "")

    def commit(self, tx: Tx) -> None:
        if tx.one_trip:
            if not tx.sent and tx.pending:
                tx.execute("SELECT 1")  # the deferred statements, as one transaction
        elif tx.opened or tx.pending:
            tx.committing = True
            tx.execute("COMMIT")  # with any statements still deferred (and their BEGIN)

    def reusable(self, conn: Any) -> bool:
        """After a failure: roll back what is open; may the connection serve the next transaction?
        Judged by the connection's own state (no round trip): a closed connection, or one whose
        state is unknown (it broke mid-query), is dropped; one left in a transaction, aborted or
        not (a failed ``BEGIN; ...`` string), is rolled back first."""
        extensions = self._psycopg2.extensions
        if conn.closed:
            return False
        status = conn.get_transaction_status()
        if status == extensions.TRANSACTION_STATUS_UNKNOWN:
            return False
        if status != extensions.TRANSACTION_STATUS_IDLE:
            conn.cursor().execute("ROLLBACK")
        if conn.preparing:  # a PREPARE that may or may not have taken (PREPARE is not undone by a rollback)
            conn.cursor().execute("DEALLOCATE ALL")
            conn.prepared.clear()
            conn.preparing = False
        return conn.get_transaction_status() == extensions.TRANSACTION_STATUS_IDLE

    def is_transient(self, exc: BaseException) -> bool:
        code = getattr(exc, "pgcode", None)
        return code in ("40001", "40P01", "55P03")  # serialization failure, deadlock, lock not available

    def is_disconnect(self, exc: BaseException) -> bool:
        return isinstance(exc, (self._psycopg2.OperationalError, self._psycopg2.InterfaceError)) and not getattr(
            exc, "pgcode", None
        )

    def is_disk_full(self, exc: BaseException) -> bool:
        return getattr(exc, "pgcode", None) == "53100"  # disk_full

    def integrity_errors(self) -> tuple[type, ...]:
        return (self._psycopg2.IntegrityError,)

    def describe(self) -> str:
        return f"PostgreSQL database {mask_url(self.url)}"

    def clean(self, exc: BaseException) -> str:
        message = " ".join(str(exc).split())
        password = url_password(self.url)
        return message.replace(password, "***") if password else message


class Database:
    """A pool of connections to one database, and transactions with retry."""

    def __init__(self, url: str, max_connections: int = 16) -> None:
        if url.startswith("sqlite:///"):
            # sqlite:///abs/path and sqlite:////abs/path (SQLAlchemy's spelling) name the same file
            self.dialect: Any = SQLiteDialect(Path("/" + url[len("sqlite://"):].lstrip("/")))
        else:
            self.dialect = PostgresDialect(url)
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._all: set = set()
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        return self.dialect.name

    def describe(self) -> str:
        return self.dialect.describe()

    def run(self, fn: Callable[[Tx], T], write: bool = True, one_trip: bool = False) -> T:
        """Run ``fn(tx)`` in one transaction, retrying transient conflicts; commit and return its result.

        ``one_trip``: ``fn`` defers every statement but its last, and decides nothing after that one
        (it is committed as it returns): the whole transaction is one round trip.

        A transaction whose commit may have gone through without its answer runs again with
        ``tx.rerun`` set (see the module's docstring); if it cannot, the error says the outcome is unknown.
        Its time, retries included, is observed in ``s3repofs_db_transaction_seconds``."""
        started = time.perf_counter()
        try:
            return self._run(fn, write, one_trip)
        finally:
            (metrics.DB_WRITE_SECONDS if write else metrics.DB_READ_SECONDS).observe(time.perf_counter() - started)

    def _run(self, fn: Callable[[Tx], T], write: bool, one_trip: bool) -> T:
        rerun = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            tx = None
            try:
                with self._transaction(write, one_trip) as tx:
                    tx.rerun = rerun
                    return fn(tx)
            except Exception as exc:
                disconnect = self.dialect.is_disconnect(exc)
                if disconnect and tx is not None and tx.committing:
                    rerun = True
                    log.warning("%s: the connection broke while a commit was on its way (%s); the transaction "
                                "runs again to find out what it did", self.describe(), self.dialect.clean(exc))
                if attempt == MAX_ATTEMPTS or not (disconnect or self.dialect.is_transient(exc)):
                    raise self._final(exc, rerun) from None
                log.debug("retrying transaction after %s (attempt %d)", exc, attempt)
                metrics.TRANSACTION_RETRIES.inc()
                time.sleep(min(0.5, 0.005 * 2**attempt) * random.random())
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Tx]:
        """One transaction that is never retried, for work that cannot run twice (a stream read once): a
        failure raises as ``run``'s last attempt would. A read sees one snapshot of the database throughout
        (PostgreSQL: REPEATABLE READ READ ONLY; SQLite's read transactions always do); it commits when the
        block ends, and rolls back if the block raises."""
        try:
            with self._transaction(write) as tx:
                if not write and self.dialect.snapshot_begin:
                    tx.execute(self.dialect.snapshot_begin)
                    tx.opened = True  # so that the commit ends it
                yield tx
        except Exception as exc:
            raise self._final(exc, False) from None

    def close(self) -> None:
        with self._lock:
            for conn in list(self._all):
                try:
                    conn.close()
                except Exception:  # closing a broken connection can fail; nothing to do about it
                    pass
            self._all.clear()
        while not self._idle.empty():
            self._idle.get_nowait()

    @contextmanager
    def _transaction(self, write: bool, one_trip: bool = False) -> Iterator[Tx]:
        conn = self._acquire()
        healthy = False
        try:
            tx = self.dialect.begin(conn, write, one_trip)
            yield tx
            self.dialect.commit(tx)
            healthy = True
        finally:
            if not healthy:
                healthy = self._reusable(conn)
            self._release(conn, healthy)

    def _reusable(self, conn: Any) -> bool:
        try:
            return self.dialect.reusable(conn)
        except Exception:  # the connection is broken; it is dropped, not reused
            return False

    def _acquire(self) -> Any:
        if not self._slots.acquire(timeout=60):
            raise DatabaseUnavailableError(f"{self.describe()}: no free connection after 60 s")
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        try:
            conn = self.dialect.connect()
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._all.add(conn)
        return conn

    def _release(self, conn: Any, healthy: bool) -> None:
        if healthy:
            self._idle.put(conn)
        else:
            with self._lock:
                self._all.discard(conn)
            try:
                conn.close()
            except Exception:
                pass
        self._slots.release()

    def _final(self, exc: Exception, rerun: bool) -> Exception:
        """The error a transaction that is not tried again ends with. A violated constraint stays as it is:
        the code should have kept it, and its traceback is what finds the bug."""
        if self._is_db_error(exc) and not isinstance(exc, self.dialect.integrity_errors()):
            error = NoSpaceError if self.dialect.is_disk_full(exc) else DatabaseUnavailableError
            exc = error(f"{self.describe()}: {self.dialect.clean(exc)}")
        if rerun and isinstance(exc, DatabaseUnavailableError):
            return OutcomeUnknownError(f"{exc} (and the commit of an earlier attempt, whose answer was lost, "
                                       "may have gone through)")
        return exc

    def _is_db_error(self, exc: BaseException) -> bool:
        if isinstance(exc, sqlite3.Error):
            return True
        return self.kind == "postgresql" and isinstance(exc, self.dialect._psycopg2.Error)
