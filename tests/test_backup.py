"""Backup and restore of the metadata: every table comes back row for row, on every engine and store, across
engines, from an older schema; what is corrupt, missing or in the way is refused with a clear error.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mount_helper import fuse_available, mounted, s3repofs
from repo_fixtures import back_to_schema_1

from s3repofs import S3Repo
from s3repofs.config import load_config
from s3repofs.domain.paths import DirPath
from s3repofs.errors import NotEmptyError, NotFoundError, StoreUnavailableError, VerificationError
from s3repofs.meta import snapshot
from s3repofs.meta.db import Database
from s3repofs.meta.schema import SCHEMA_VERSION
from s3repofs.ops import backup as backup_ops
from s3repofs.ops import restore as restore_ops

SCALE_SCRIPT = Path(__file__).with_name("backup_scale.py")


def engine(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


def populate(repo: S3Repo) -> dict[str, bytes]:
    """A repository with something in every table and every state; the published paths and their bytes."""
    published = {}
    for i in range(6):
        path = f"story_data/2026/{i % 3}/deep/file-{i}.json"
        repo.add_file(path=path).touch(f"first {i}").publish()
        published[path] = f"first {i}".encode()
    newer = repo.add_file(path="story_data/2026/0/deep/file-0.json").touch("newer").publish()  # expires the first
    published["story_data/2026/0/deep/file-0.json"] = b"newer"
    newer.tag("source", "crawler")
    newer.tag("lang", "ünïcode ✓")
    repo.add_file(path="other/staged.bin").touch(b"\x00staged").upload()  # unpublished
    withdrawn = repo.add_file(path="other/gone.txt").touch("gone").publish()
    withdrawn.expire()
    repo.set_attrs(newer.id, mode=0o600, mtime_ns=1_234_567_890_123_456_789)
    repo.make_dir(DirPath("other", "empty/and/deeper"), 0o750, 1000, 1000)
    assert repo.record_holders()  # holders: the copies this host's cache keeps (else recorded when it closes)
    return published


def table_rows(url: str) -> dict[str, list[tuple]]:
    """Every row of every table, by the columns of the current schema."""
    db = Database(url)
    try:  # sorted here: the engines' collations may order text differently
        with db.transaction(write=False) as tx:
            return {table: sorted(tx.stream(f"SELECT {', '.join(snapshot.columns(tx, table))} FROM {table}"), key=repr)
                    for table in snapshot.TABLES}
    finally:
        db.close()


def test_backup_then_restore_into_an_empty_database_reproduces_every_table(repo, empty_database):
    populate(repo)
    made = backup_ops.backup(repo).backup
    listing = backup_ops.list_backups(repo)
    assert [b.name for b in listing.backups] == [made.name] and not listing.corrupt and not listing.incomplete
    assert made.rows["versions"] == 9 and made.rows["tags"] == 2 and made.schema_version == SCHEMA_VERSION

    target = empty_database(engine(repo.config.database_url))
    result = restore_ops.restore(repo, None, target)
    assert result.plan.backup == made and result.rows["versions"] == 9 and result.migrated_from is None
    original = table_rows(repo.config.database_url)
    assert table_rows(target) == original
    assert any(row[-1] for row in original["directories"])  # mtimes were there to be kept


def test_a_restored_repository_serves_its_files_and_never_reuses_a_version_id(repo_config_pair, empty_database):
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        published = populate(repo)
        highest = repo.add_file(path="other/last.txt").touch("last").id
        repo.db.run(lambda tx: tx.execute("DELETE FROM versions WHERE id = ?", (highest,)))  # as a later gc may
        backup_ops.backup(repo)
    target = empty_database(engine(repo_config_pair["database"]))
    restore_ops.restore(load_config(repo_config_pair), None, target)
    with S3Repo({**repo_config_pair, "database": target}) as restored:
        restored.cache.clear()
        assert {path: restored.get_file(path).read_bytes() for path in published} == published
        assert restored.add_file(path="other/new.txt").touch("new").publish().id == highest + 1


@pytest.mark.parametrize("source", ["sqlite-local", "postgres-s3"])
def test_a_backup_restores_into_the_other_engine(request, tmp_path, source, empty_database):
    from repo_fixtures import make_config

    config = make_config(request, tmp_path, source)
    with S3Repo(config) as repo:
        repo.create_repository()
        published = populate(repo)
        backup_ops.backup(repo)
    other = "postgres" if source.startswith("sqlite") else "sqlite"
    target = empty_database(other)
    restore_ops.restore(load_config(config), None, target)
    assert table_rows(target) == table_rows(config["database"])
    with S3Repo({**config, "database": target}) as restored:
        assert restored.get_file("story_data/2026/0/deep/file-0.json").read_bytes() == b"newer"
        restored.add_file(path="other/after.txt").touch("after").publish()
        back = empty_database(engine(config["database"]))
        backup_ops.backup(restored)
        restore_ops.restore(restored, None, back)
    with S3Repo({**config, "database": back}) as restored_again:
        assert {p: restored_again.get_file(p).read_bytes() for p in published} == published


def test_retention_keeps_the_newest_backup_keep_and_drops_stale_incomplete_ones(repo_config_pair):
    with S3Repo({**repo_config_pair, "backup_keep": 2}) as repo:
        repo.create_repository()
        store = backup_ops.BackupStore(repo.config)
        day = 86400.0
        stale = "20200101T000000.000000Z-crashed"  # a snapshot whose manifest never came: a failed backup
        fresh = "29990101T000000.000000Z-running"  # one still being written
        for name in (stale, fresh):
            source = repo.config.local_root / name
            source.write_bytes(b"partial")
            store.store.put(store.snapshot_key(name), source, 7, hashlib.md5(b"partial").hexdigest(), {})
        made = [backup_ops.backup(repo, clock=lambda i=i: 1_800_000_000 + i * day) for i in range(4)]
        listing = backup_ops.list_backups(repo)
    assert [b.name for b in listing.backups] == [r.backup.name for r in made[-2:]]
    assert made[0].deleted == [stale] and made[1].deleted == []
    assert made[2].deleted == [made[0].backup.name] and made[3].deleted == [made[1].backup.name]
    assert listing.incomplete == [fresh]
    assert backup_ops.oldest_backup_time(repo) == made[2].backup.created_at == 1_800_000_000 + 2 * day


def test_restore_refuses_a_database_that_holds_a_repository_unless_forced(repo_config_pair, empty_database):
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        populate(repo)
        backup_ops.backup(repo)
    target = empty_database(engine(repo_config_pair["database"]))
    with S3Repo({**repo_config_pair, "database": target}) as other:
        other.create_repository()  # an initialised, empty repository is empty: restoring into it is fine
        restore_ops.restore(other, None, target)
        other.add_file(path="other/extra.txt").touch("extra").publish()
    before = table_rows(target)
    with pytest.raises(NotEmptyError, match="not empty .*10 versions.*--force"):
        restore_ops.restore(load_config(repo_config_pair), None, target)
    assert table_rows(target) == before
    plan = restore_ops.plan_restore(load_config(repo_config_pair), None, target, force=True)
    assert plan.replaces and plan.target_rows["versions"] == 10
    restore_ops.execute(load_config(repo_config_pair), plan)
    assert table_rows(target) == table_rows(repo_config_pair["database"])


def rewrite(store: backup_ops.BackupStore, key: str, data: bytes, tmp_path: Path) -> None:
    source = tmp_path / f"rewrite-{uuid.uuid4().hex}"
    source.write_bytes(data)
    store.store.put(key, source, len(data), hashlib.md5(data).hexdigest(), {})


def read_object(store: backup_ops.BackupStore, key: str) -> bytes:
    size = store.store.head(key).size
    return b"".join(store.store.stream(key, 0, size, size))


def test_a_corrupt_manifest_is_reported_and_never_restored(repo_config_pair, empty_database, tmp_path):
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        populate(repo)
        older = backup_ops.backup(repo).backup
        newer = backup_ops.backup(repo).backup
        store = backup_ops.BackupStore(repo.config)
        rewrite(store, store.manifest_key(newer.name), b"{not json", tmp_path)
        listing = backup_ops.list_backups(repo)
    assert [b.name for b in listing.backups] == [older.name] and "corrupt" in listing.corrupt[newer.name]
    target = empty_database(engine(repo_config_pair["database"]))
    config = load_config(repo_config_pair)
    with pytest.raises(VerificationError, match=f"backup {newer.name} cannot be restored: the manifest .* corrupt"):
        restore_ops.restore(config, newer.name, target)
    with pytest.raises(VerificationError, match=f"the newest backup {newer.name} cannot be restored"):
        restore_ops.restore(config, None, target)
    result = restore_ops.restore(config, None, target, newest_intact=True)
    assert result.plan.backup == older and result.plan.skipped[0].backup == newer.name


def test_a_corrupted_backup_body_is_detected_and_nothing_is_loaded(repo_config_pair, empty_database, tmp_path):
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        populate(repo)
        made = backup_ops.backup(repo).backup
        store = backup_ops.BackupStore(repo.config)
    target = empty_database(engine(repo_config_pair["database"]))
    config = load_config(repo_config_pair)
    good = read_object(store, store.snapshot_key(made.name))
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    rewrite(store, store.snapshot_key(made.name), bytes(flipped), tmp_path)
    with pytest.raises(VerificationError, match=f"backup {made.name} is corrupt: .*sha256"):
        restore_ops.restore(config, made.name, target)
    assert not any(table_rows_if_any(target).values())


def table_rows_if_any(url: str) -> dict[str, int]:
    db = Database(url)
    try:
        with db.transaction(write=False) as tx:
            return snapshot.content_rows(tx)
    finally:
        db.close()


def test_a_manifest_whose_row_counts_disagree_leaves_the_target_empty(repo_config_pair, empty_database, tmp_path):
    """The load checks the rows per table against the manifest before it commits: nothing half-loaded."""
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        populate(repo)
        made = backup_ops.backup(repo).backup
        store = backup_ops.BackupStore(repo.config)
    manifest = json.loads(read_object(store, store.manifest_key(made.name)))
    manifest["rows"]["versions"] += 1
    rewrite(store, store.manifest_key(made.name), json.dumps(manifest).encode(), tmp_path)
    target = empty_database(engine(repo_config_pair["database"]))
    with pytest.raises(snapshot.SnapshotError, match="manifest's rows"):
        restore_ops.restore(load_config(repo_config_pair), None, target)
    db = Database(target)
    with db.transaction(write=False) as tx:
        assert snapshot.tables(tx) == []  # not even the schema: the load was one transaction
    db.close()


def test_a_backup_of_an_older_schema_restores_and_is_migrated(repo_config_pair, empty_database):
    """A database at schema version 1 (no xxh3, no mtime_ns) is backed up as it is, and restored at the current."""
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        published = populate(repo)

        repo.db.run(back_to_schema_1)
    with S3Repo(repo_config_pair) as old:  # not made ready: that would migrate it
        made = backup_ops.backup(old).backup
    assert made.schema_version == 1
    target = empty_database(engine(repo_config_pair["database"]))
    result = restore_ops.restore(load_config(repo_config_pair), None, target)
    assert result.migrated_from == 1
    with S3Repo({**repo_config_pair, "database": target}) as restored:
        assert restored.meta.schema_version() == SCHEMA_VERSION
        restored.cache.clear()
        assert {p: restored.get_file(p).read_bytes() for p in published} == published
        assert restored.get_file("story_data/2026/1/deep/file-1.json").version.xxh3 is None
        assert restored.add_file(path="other/new.txt").touch("new").publish().version.xxh3


def test_newest_intact_skips_a_backup_whose_published_object_is_gone(repo_config_pair, empty_database):
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        populate(repo)
        intact = backup_ops.backup(repo).backup
        lost = repo.add_file(path="story_data/lost.txt").touch("lost").publish()
        broken = backup_ops.backup(repo).backup
        repo.store.delete(lost.s3_key)
    target = empty_database(engine(repo_config_pair["database"]))
    plan = restore_ops.plan_restore(load_config(repo_config_pair), None, target, newest_intact=True)
    assert plan.backup == intact
    assert [(s.backup, lost.s3_key in s.reason) for s in plan.skipped] == [(broken.name, True)]
    restore_ops.execute(load_config(repo_config_pair), plan)
    assert table_rows_if_any(target)["versions"] == intact.versions


@pytest.fixture
def backup_bucket(s3_server):
    name = f"backups-{uuid.uuid4().hex}"
    s3_server.create_bucket(name)
    yield name
    s3_server.delete_bucket(name)


def test_backups_go_to_backup_s3_bucket_and_a_missing_one_is_named(repo_config_pair, s3_server, backup_bucket):
    config = {**repo_config_pair, "backup_s3_bucket": backup_bucket, "s3_endpoint_url": s3_server.endpoint_url,
              "s3_access_key": s3_server.access_key, "s3_secret_key": s3_server.secret_key,
              "s3_region": s3_server.region}
    with S3Repo(config) as repo:
        repo.create_repository()
        populate(repo)
        made = backup_ops.backup(repo).backup
        keys = {info.key for info in backup_ops.BackupStore(repo.config).store.list("")}
        assert keys == {f"_s3repofs/backups/{made.name}.jsonl.gz", f"_s3repofs/backups/{made.name}.manifest.json"}
        assert not [info.key for info in repo.store.list("_s3repofs/")]  # not in the objects' store
    with S3Repo({**config, "backup_s3_bucket": "no-such-bucket-here"}) as repo:
        with pytest.raises(StoreUnavailableError, match="backup_s3_bucket 'no-such-bucket-here'.*does not exist"):
            backup_ops.backup(repo)


def test_no_backups_and_an_unknown_name_are_clear_errors(repo, empty_database):
    target = empty_database("sqlite")
    with pytest.raises(NotFoundError, match="no backups in"):
        restore_ops.restore(repo, None, target)
    backup_ops.backup(repo)
    with pytest.raises(NotFoundError, match=r"no backup named 2001.* \(`s3repofs backup list` shows them\)"):
        restore_ops.restore(repo, "20010101T000000.000000Z-nobody", target)


def test_dump_refuses_a_table_it_does_not_know(repo):
    repo.db.run(lambda tx: tx.execute("CREATE TABLE added_by_a_future_migration (x INTEGER)"))
    with pytest.raises(snapshot.SnapshotError, match=r"added_by_a_future_migration .* \(add it to TABLES\)"):
        snapshot.dump(repo.db, lambda line: None)


def test_a_snapshot_cut_short_is_refused(repo, empty_database):
    populate(repo)
    lines: list[str] = []
    snapshot.dump(repo.db, lines.append)
    target = Database(empty_database("sqlite"))
    with pytest.raises(snapshot.SnapshotError, match="cut short"):
        snapshot.load(target, lines[:-3])
    snapshot.load(target, lines)
    target.close()


# -- the command line -----------------------------------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "s3repofs", *args], capture_output=True, text=True, timeout=180)


def test_the_commands_back_up_list_and_restore_with_json_and_clear_errors(repo_config_pair, empty_database,
                                                                        tmp_path):
    config = tmp_path / "s3repo.json"
    config.write_text(json.dumps(repo_config_pair))
    config.chmod(0o600)
    # restore reads only the configuration: the repository's own database is not needed (not even created)
    assert run("restore", "--to", empty_database("sqlite"), "--config", str(config)).returncode == 3
    assert run("init", "--config", str(config)).returncode == 0
    with S3Repo(repo_config_pair) as repo:
        populate(repo)
    no_backups = run("restore", "--to", empty_database("sqlite"), "--config", str(config))
    assert no_backups.returncode == 3 and no_backups.stderr.startswith("s3repofs: no backups in")
    made = json.loads(run("backup", "--json", "--config", str(config)).stdout)
    assert made["rows"]["versions"] == 9 and made["deleted"] == []
    listed = json.loads(run("backup", "list", "--json", "--config", str(config)).stdout)
    assert [b["name"] for b in listed["backups"]] == [made["name"]]
    assert made["name"] in run("backup", "list", "--config", str(config)).stdout

    target = empty_database(engine(repo_config_pair["database"]))
    dry = run("restore", "--to", target, "--dry-run", "--config", str(config))
    assert dry.returncode == 0 and f"restore backup {made['name']}" in dry.stdout
    assert not any(table_rows_if_any(target).values())
    restored = run("restore", made["name"], "--to", target, "--json", "--config", str(config))
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["rows"]["versions"] == 9

    again = run("restore", "--to", target, "--config", str(config))
    assert again.returncode == 1 and "is not empty" in again.stderr and again.stderr.count("\n") == 1
    forced = run("restore", "--to", target, "--force", "--config", str(config))
    assert forced.returncode == 0 and "replacing what it holds: 9 versions" in forced.stdout
    unknown = run("restore", "nope", "--to", target, "--force", "--config", str(config))
    assert unknown.returncode == 3 and "no backup named nope" in unknown.stderr
    unreachable = run("restore", "--to", "postgresql://nobody:secret@127.0.0.1:1/gone", "--config", str(config))
    assert unreachable.returncode == 5 and "cannot connect" in unreachable.stderr
    assert "secret" not in unreachable.stderr and "Traceback" not in unreachable.stderr
    assert run("restore", "--to", "mysql://x/y", "--config", str(config)).returncode == 2
    assert run("restore", "x", "--newest-intact", "--to", target, "--config", str(config)).returncode == 2

    store = backup_ops.BackupStore(load_config(repo_config_pair))
    rewrite(store, store.manifest_key(made["name"]), b"[]", tmp_path)
    corrupt = run("restore", "--to", target, "--force", "--config", str(config))
    assert corrupt.returncode == 6 and "corrupt" in corrupt.stderr
    for command in (["backup"], ["backup", "list"], ["restore"]):
        assert run(*command, "--help").returncode == 0


@pytest.mark.skipif(not fuse_available(), reason="needs FUSE")
def test_database_lost_then_restored_serves_every_published_file_through_a_mount(request, tmp_path,
                                                                                postgres_server):
    """The disaster: the database is dropped; a new, empty one of the same name is restored from the backup,
    and every published file reads back byte for byte through a mount."""
    from repo_fixtures import make_config

    config = make_config(request, tmp_path, "postgres-s3")
    config_path = tmp_path / "s3repo.json"
    config_path.write_text(json.dumps(config))
    with mounted(config, tmp_path, "before") as mnt:
        files = {f"story_data/{d}/f{i}.bin": bytes([i]) * (1000 * i + 1) for d in ("a", "a/b") for i in range(5)}
        for path, data in files.items():
            (mnt / "published" / path).parent.mkdir(parents=True, exist_ok=True)
            (mnt / "published" / path).write_bytes(data)
    s3repofs("backup", "--config", str(config_path))

    name = config["database"].rpartition("/")[2]
    postgres_server.drop_database(name)
    assert postgres_server.create_database(name) == config["database"]
    s3repofs("restore", "--to", config["database"], "--config", str(config_path))

    with mounted({**config, "local_root": str(tmp_path / "other-host")}, tmp_path, "after") as mnt:
        assert {path: (mnt / "published" / path).read_bytes() for path in files} == files


# -- memory ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_backup_and_restore_memory_stays_flat_in_the_number_of_versions(kind, empty_database):
    """Peak RSS of a backup and a restore (through ops, into the local store) hardly grows from 5,000 to
    50,000 versions: rows stream, a thousand at a time (reading them all at once grows it by ~90 MB)."""
    def measure(versions: int) -> dict:
        source, target = empty_database(kind), empty_database(kind)
        out = subprocess.run([sys.executable, str(SCALE_SCRIPT), source, target, str(versions)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    small, large = measure(5_000), measure(50_000)
    assert large["versions"] == 50_000 and large["size"] > 5 * small["size"]
    for phase in ("backup_rss_growth", "restore_rss_growth"):
        assert large[phase] - small[phase] < 25 * 1024**2, (small, large)


def test_a_snapshot_is_gzip_of_json_lines(repo):
    made = backup_ops.backup(repo).backup
    store = backup_ops.BackupStore(repo.config)
    body = read_object(store, store.snapshot_key(made.name))
    lines = gzip.decompress(body).decode().splitlines()
    assert json.loads(lines[0])["s3repofs_snapshot"] == 1 and json.loads(lines[-1])["end"] == made.rows
    assert hashlib.sha256(body).hexdigest() == made.sha256


def test_gc_refuses_while_a_kept_backup_is_older_than_expired_retention(repo_config_pair, tmp_path):
    """`s3repofs gc` asks ops/backup for the oldest backup kept: a restore of it must find its objects."""
    config = {**repo_config_pair, "expired_retention": 3600, "backup_keep": 1}
    config_path = tmp_path / "s3repo.json"
    config_path.write_text(json.dumps(config))
    config_path.chmod(0o600)
    with S3Repo(config) as repo:
        repo.create_repository()
        assert run("gc", "--dry-run", "--config", str(config_path)).returncode == 0
        backup_ops.backup(repo, clock=lambda: time.time() - 2 * 3600)
        refused = run("gc", "--dry-run", "--config", str(config_path))
        assert refused.returncode == 2 and "expired_retention" in refused.stderr, refused.stderr
        backup_ops.backup(repo)  # keeps one: the old backup goes
        assert run("gc", "--dry-run", "--config", str(config_path)).returncode == 0
