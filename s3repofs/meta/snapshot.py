"""Stream a consistent copy of every metadata table out of a database, and load one into an empty database.

The format (one JSON value per line, UTF-8)::

    {"s3repofs_snapshot": 1, "schema_version": 4, "database": "postgresql", "next_version_id": 1235}
    {"table": "hosts", "columns": ["name", "first_seen", "last_seen"]}
    ["host-a", 1767225600.0, 1767229200.5]          one array per row, in the header's column order
    ...                                             the next table's header, its rows, and so on
    {"end": {"schema_version": 1, "hosts": 2, ...}} rows per table: a file cut short has no end line

``dump`` reads every table in one read transaction (PostgreSQL: REPEATABLE READ, rows fetched from a
server-side cursor a thousand at a time; SQLite: one read transaction), so memory stays flat however
many versions there are. ``load`` creates the schema at this code's SCHEMA_VERSION and inserts rows in
batches, columns matched by name: a snapshot of an older schema lacks the newer columns, which take
their defaults (that is how an older backup is migrated). Engines may differ: a PostgreSQL snapshot
loads into SQLite and back.

Directory mtimes survive a load unchanged. The triggers of schema migration 3 move a directory's
mtime when a version is inserted in it or a subdirectory under it. SQLite fires them row by row, as each
row goes in, so versions are loaded before directories, and directories deepest first (a child's dir is
always longer than its parent's): no row a trigger would touch exists yet when it fires. PostgreSQL fires
a multi-row INSERT's row triggers when the statement ends, after its parents went in too, so there the
load switches the tables' triggers off (it has just created them, in the same transaction).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ..errors import NotEmptyError, RepoError, VerificationError
from . import schema
from .db import Database, Tx

FORMAT = 1
BATCH = 1000

# Every table of the schema, in the order they are dumped and loaded, and the order of their rows. A
# migration that adds a table adds it here too (dump refuses a table it does not know, rather than
# leave it out of a backup). Directories come deepest first: see the module's docstring.
TABLES: dict[str, str] = {
    "schema_version": "version",
    "hosts": "name",
    "versions": "id",
    "tags": "version_id, key",
    "directories": "length(dir) DESC, file_type, dir",
    "path_locks": "file_type, dir, name",
    "claims": "version_id, task",
    "claims_done": "version_id, task",
    "holders": "version_id, host",
}
# The tables a later schema added, by the version that added them: a database not yet migrated (backed up as
# it is) has none of them.
ADDED_IN = {"claims": 6, "claims_done": 6, "holders": 6}
CONTENT_TABLES = ("versions", "tags", "directories", "path_locks")  # what makes a database not empty
NOT_LOADED = ("schema_version",)  # the target's own, written by schema.migrate


class SnapshotError(VerificationError):
    """A snapshot that cannot be loaded as it is: cut short, out of order, or from a newer schema."""


@dataclass(frozen=True)
class Header:
    schema_version: int
    database: str
    next_version_id: int  # ids below this were handed out: a restored database never hands them out again


@contextmanager
def reading(db: Database) -> Iterator["Reader"]:
    """One consistent read of ``db`` (a read transaction), to count and then dump the same rows. SnapshotError if
    the database holds a table this code does not know, or lacks one."""
    with db.transaction(write=False) as tx:
        check_tables(tx)
        yield Reader(tx)


class Reader:
    """The tables of a database as one read transaction sees them (``reading``)."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx
        self.header: Header | None = None  # once dumped

    def counts(self) -> dict[str, int]:
        return {table: self._tx.scalar(f"SELECT COUNT(*) FROM {table}") for table in tables_of(self._tx)}

    def dump(self, write_line: Callable[[str], None],
             advance: Callable[[int], None] = lambda n: None) -> dict[str, int]:
        """Write the snapshot, line by line (each without its newline); the rows per table."""
        tx = self._tx
        self.header = Header(schema.current_version(tx), tx.kind, _next_version_id(tx))
        write_line(json.dumps({"s3repofs_snapshot": FORMAT, "schema_version": self.header.schema_version,
                               "database": tx.kind, "next_version_id": self.header.next_version_id}))
        counts = {}
        for table in tables_of(tx):
            names, order = columns(tx, table), TABLES[table]
            write_line(json.dumps({"table": table, "columns": names}))
            counts[table] = 0
            for row in tx.stream(f"SELECT {', '.join(names)} FROM {table} ORDER BY {order}", batch=BATCH):
                write_line(json.dumps(row, ensure_ascii=False))
                counts[table] += 1
                if counts[table] % BATCH == 0:
                    advance(BATCH)
            advance(counts[table] % BATCH)
        write_line(json.dumps({"end": counts}))
        return counts


def dump(db: Database, write_line: Callable[[str], None]) -> dict[str, int]:
    """Write a consistent snapshot of every table of ``db`` through ``write_line``; the rows per table.
    SnapshotError if the database holds a table this code does not know."""
    with reading(db) as reader:
        return reader.dump(write_line)


def load(db: Database, lines: Iterable[str], *, replace: bool = False, expected: dict[str, int] | None = None,
         advance: Callable[[int], None] = lambda n: None) -> tuple[Header, dict[str, int]]:
    """Load a snapshot into ``db`` in one transaction: nothing is left half-loaded. The database must hold
    no repository content (NotEmptyError), unless ``replace``, which drops the repository's tables first.
    Returns the snapshot's header and the rows per table as the loaded database counts them, checked
    against the snapshot's own count and ``expected`` (a manifest's) before the commit: SnapshotError if
    they differ, or the snapshot is cut short."""
    with db.transaction(write=True) as tx:
        if not replace:
            refuse_content(db, content_rows(tx))
        _drop_tables(tx)
        schema.migrate(tx, db.dialect)
        _switch_triggers(tx, "DISABLE")
        header, written = _insert_all(tx, iter(lines), advance)
        _switch_triggers(tx, "ENABLE")
        _advance_id_sequence(tx, header.next_version_id)
        loaded = {table: tx.scalar(f"SELECT COUNT(*) FROM {table}") for table in TABLES if table not in NOT_LOADED}
        for claimed, source in ((written, "the snapshot's rows"), (expected, "the manifest's rows")):
            # a snapshot of an older schema names none of the tables added since: they stay empty
            if claimed is not None and loaded != {t: claimed.get(t, 0) for t in loaded}:
                raise SnapshotError(f"{source} {claimed} were loaded as {loaded}")
        return header, loaded


def read_rows(lines: Iterable[str], table: str) -> Iterator[dict]:
    """The rows of one table of a snapshot, as dicts by column name (the snapshot's own columns)."""
    names: list[str] | None = None
    for line in lines:
        value = _parse(line)
        if isinstance(value, dict):
            if names is not None:
                return  # the next table's header: ours is done
            if value.get("table") == table:
                names = value["columns"]
        elif names is not None:
            yield dict(zip(names, value))


def content_rows(tx: Tx) -> dict[str, int]:
    """Rows in each table that holds repository content (none if the database has no repository)."""
    present = set(tables(tx))
    return {table: tx.scalar(f"SELECT COUNT(*) FROM {table}") if table in present else 0 for table in CONTENT_TABLES}


def refuse_content(db: Database, rows: dict[str, int]) -> None:
    """NotEmptyError if ``rows`` (``content_rows``) say that ``db`` holds a repository."""
    if any(rows.values()):
        held = ", ".join(f"{n} {table}" for table, n in rows.items() if n)
        raise NotEmptyError(f"{db.describe()} is not empty ({held}): restore into an empty database, "
                            "or replace its contents with --force")


def tables(tx: Tx) -> list[str]:
    """The tables of the database's current schema (SQLite's own left out)."""
    if tx.kind == "postgresql":
        rows = tx.all("SELECT tablename AS name FROM pg_tables WHERE schemaname = current_schema()")
    else:
        rows = tx.all("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    return sorted(row["name"] for row in rows)


def tables_of(tx: Tx) -> list[str]:
    """The tables a snapshot of the database in ``tx`` holds, in TABLES' order: those of its schema version."""
    version = schema.current_version(tx)
    return [table for table in TABLES if ADDED_IN.get(table, 0) <= version]


def check_tables(tx: Tx) -> None:
    """SnapshotError unless the database holds exactly the tables a snapshot of its schema version knows."""
    found = set(tables(tx))
    if not found:
        raise RepoError("the database holds no repository: nothing to back up")
    unknown = sorted(found - set(TABLES))
    if unknown:
        raise SnapshotError(f"table {unknown[0]} is not one meta/snapshot.py knows: a backup would leave it out "
                            "(add it to TABLES)")
    missing = sorted(set(tables_of(tx)) - found)
    if missing:
        raise SnapshotError(f"the database lacks the table {missing[0]}: it is not a whole repository")


def columns(tx: Tx, table: str) -> list[str]:
    """The table's columns, in their order."""
    if tx.kind == "postgresql":
        rows = tx.all("""SELECT column_name AS name FROM information_schema.columns
                         WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position""",
                      (table,))
    else:
        rows = tx.all(f"SELECT name FROM pragma_table_info('{table}') ORDER BY cid")
    return [row["name"] for row in rows]


def _next_version_id(tx: Tx) -> int:
    """The id the database would hand the next version (at least): past every id ever handed out, rows since
    deleted included."""
    highest = tx.scalar("SELECT MAX(id) FROM versions") or 0
    if tx.kind == "postgresql":
        sequence = tx.scalar("SELECT pg_get_serial_sequence('versions', 'id')")
        used = tx.scalar(f"SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {sequence}")
    else:
        used = tx.scalar("SELECT seq FROM sqlite_sequence WHERE name = 'versions'")
    return max(highest, used or 0) + 1


def _advance_id_sequence(tx: Tx, next_id: int) -> None:
    """Make the database hand out ids from ``next_id`` on (PostgreSQL's identity; SQLite's AUTOINCREMENT)."""
    if tx.kind == "postgresql":
        tx.execute("SELECT setval(pg_get_serial_sequence('versions', 'id'), ?, false)", (next_id,))
    else:
        tx.execute("DELETE FROM sqlite_sequence WHERE name = 'versions'")
        tx.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('versions', ?)", (next_id - 1,))


def _switch_triggers(tx: Tx, switch: str) -> None:
    """PostgreSQL: switch the triggers that move directory mtimes off (DISABLE) or on (ENABLE); see the
    module's docstring. SQLite needs no switch: its rows go in one at a time, in an order that leaves its
    triggers nothing to touch."""
    if tx.kind == "postgresql":
        for table in ("versions", "directories"):
            tx.execute(f"ALTER TABLE {table} {switch} TRIGGER USER")


def _drop_tables(tx: Tx) -> None:
    """Drop the repository's tables (dependents first), so that the schema is created anew."""
    present = set(tables(tx))
    for table in reversed(TABLES):
        if table in present:
            tx.execute(f"DROP TABLE {table}")


def _insert_all(tx: Tx, lines: Iterator[str], advance: Callable[[int], None]) -> tuple[Header, dict[str, int]]:
    """Insert every row of the snapshot; its header and the rows read per table (checked against its end line)."""
    header = _read_header(next(lines, ""))
    if header.schema_version > schema.SCHEMA_VERSION:
        raise SnapshotError(f"the snapshot is of schema version {header.schema_version}, newer than this "
                            f"s3repofs understands ({schema.SCHEMA_VERSION}): upgrade s3repofs")
    written: dict[str, int] = {}
    current: _TableLoad | None = None
    for line in lines:
        value = _parse(line)
        if isinstance(value, list):
            if current is None:
                raise SnapshotError("the snapshot has a row before any table's header")
            current.add(value)
            continue
        if current is not None:
            written[current.table] = current.finish()
        if "end" in value:
            if value["end"] != written:
                raise SnapshotError(f"the snapshot says it holds {value['end']} rows, but {written} were read")
            return header, written
        table = value.get("table")
        if table not in TABLES or table in written:
            raise SnapshotError(f"the snapshot holds an unknown or repeated table {table!r}")
        current = _TableLoad(tx, table, value.get("columns") or [], advance)
    raise SnapshotError("the snapshot is cut short: it has no end line")


class _TableLoad:
    """The rows of one table of a snapshot on their way into the database: checked, then inserted in batches
    by column name, so that the columns the snapshot lacks (it is of an older schema) take their defaults."""

    def __init__(self, tx: Tx, table: str, names: list[str], advance: Callable[[int], None]) -> None:
        extra = [name for name in names if name not in columns(tx, table)]
        if extra:
            raise SnapshotError(f"the snapshot's table {table} has a column {extra[0]!r} this schema lacks")
        self.table, self.rows = table, 0
        self._tx, self._names, self._advance = tx, names, advance
        self._batch: list[tuple] = []
        self._dir_index = names.index("dir") if table == "directories" else None
        self._last_dir_length: int | None = None

    def add(self, row: list) -> None:
        if len(row) != len(self._names):
            raise SnapshotError(f"a row of the snapshot's table {self.table} has {len(row)} values, "
                                f"its header {len(self._names)} columns")
        if self._dir_index is not None:  # deepest first, or SQLite's triggers would move the mtimes
            length = len(row[self._dir_index])
            if self._last_dir_length is not None and length > self._last_dir_length:
                raise SnapshotError("the snapshot's directories are not in deepest-first order")
            self._last_dir_length = length
        self.rows += 1
        if self.table not in NOT_LOADED:
            self._batch.append(tuple(row))
            if len(self._batch) == BATCH:
                self._flush()

    def finish(self) -> int:
        """Insert what is left; the rows read."""
        self._flush()
        return self.rows

    def _flush(self) -> None:
        if self._batch:
            self._tx.insert_many(self.table, self._names, self._batch)
            self._advance(len(self._batch))
            self._batch = []


def _read_header(line: str) -> Header:
    value = _parse(line) if line else None
    if not isinstance(value, dict) or value.get("s3repofs_snapshot") != FORMAT:
        raise SnapshotError("not an s3repofs snapshot (or of an unknown format): its first line is not its header")
    try:
        return Header(int(value["schema_version"]), str(value["database"]), int(value.get("next_version_id", 1)))
    except (KeyError, TypeError, ValueError):
        raise SnapshotError("the snapshot's header is incomplete") from None


def _parse(line: str):
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SnapshotError(f"the snapshot has a line that is not JSON ({exc.msg})") from None
    if not isinstance(value, (list, dict)):
        raise SnapshotError("the snapshot has a line that is neither a header nor a row")
    return value
