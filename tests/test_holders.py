"""Who holds what: each host's verified cache copies recorded in ``holders`` (local/holdings.py, meta/holders.py),
shown by ``info`` and ``status``, used by ``fsck --repair`` to say where a lost object can be copied from, and
dropped by gc for hosts long gone.

Two "hosts" are two S3Repo on one repository (one database, one store), each with its own host name and cache.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from mount_helper import fuse_available, mounted, wait_for, write_config
from test_cli import run
from test_fsck import delete

from s3repofs import S3Repo
from s3repofs.domain.lifecycle import Storage
from s3repofs.meta.db import Database, Tx
from s3repofs.meta.holders import BATCH
from s3repofs.mount.daemon import run_background
from s3repofs.mount.tree import Tree
from s3repofs.ops import cache as cache_ops
from s3repofs.ops import fsck, gc
from s3repofs.ops.fsck import Kind, Outcome

# A database nobody answers at: what a flush meets while the database is down.
UNREACHABLE = "postgresql://nobody@127.0.0.1:9/nothing"


def host(config: dict, name: str, **more) -> S3Repo:
    """Another host of the repository of ``config``: its own name and cache directory."""
    repo = S3Repo({**config, "local_root": f"{config['local_root']}-{name}", "host_name": name, **more})
    repo.ensure_ready()
    return repo


def holders(repo: S3Repo, rf) -> dict[str, float]:
    """host -> verified_at of the recorded holders of ``rf``'s version."""
    return {h.host: h.verified_at for h in repo.holders([rf.id]).get(rf.id, [])}


def rows_of(repo: S3Repo, name: str) -> int:
    return repo.holder_records.per_host().get(name, 0)


def publish_files(repo: S3Repo, count: int, size: int = 10, prefix: str = "t/f") -> list:
    return [repo.add_file(path=f"{prefix}{i}").touch(bytes([65 + i % 26]) * size).publish() for i in range(count)]


def count_write_transactions(repo: S3Repo, monkeypatch) -> list[bool]:
    """The write transactions ``repo`` runs from now on (one entry each)."""
    writes: list[bool] = []
    run_original = repo.db.run

    def counted(fn, write=True, one_trip=False):
        if write:
            writes.append(True)
        return run_original(fn, write, one_trip)

    monkeypatch.setattr(repo.db, "run", counted)
    return writes


# -- recording ------------------------------------------------------------------------------------------


def test_a_download_records_the_host_once_recorded(repo_config):
    with S3Repo(repo_config) as a:
        a.create_repository()
        f = a.add_file(path="t/a").touch(b"bytes").publish()
        assert a.record_holders()
        assert set(holders(a, f)) == {"test-host"}  # the uploader kept its staged file as a cache copy
        b = host(repo_config, "hostB")
        before = time.time()
        assert b.get_file("t/a").read_bytes() == b"bytes"
        assert set(holders(a, f)) == {"test-host"}  # noted, not yet recorded
        b.close()  # a command's repository records what it noted when it closes
        recorded = holders(a, f)
        assert set(recorded) == {"test-host", "hostB"} and before <= recorded["hostB"] <= time.time()


def test_an_eviction_removes_the_holder(repo_config):
    with S3Repo({**repo_config, "cache_max_bytes": 1000}) as repo:
        repo.create_repository()
        first, second, third = publish_files(repo, 3, size=400)  # the third evicts the first
        assert repo.record_holders()
        assert [bool(holders(repo, f)) for f in (first, second, third)] == [False, True, True]
        assert repo.local_file(first.version)  # read again: it comes back, and the second goes
        assert repo.record_holders()
        assert [bool(holders(repo, f)) for f in (first, second, third)] == [True, False, True]
        assert cache_ops.clear(repo) == 2
        assert rows_of(repo, "test-host") == 0


def test_a_copy_failing_its_rehash_is_no_longer_recorded(repo_config_pair):
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        f = repo.add_file(path="t/rot").touch(b"good bytes").publish()
        assert repo.record_holders() and holders(repo, f)
        repo.cache.object_path(f.s3_key).write_bytes(b"rotten byte")
        delete(repo, f.s3_key)
        [done] = fsck.repair(repo, fsck.check(repo, quiet=True), quiet=True).repairs
        assert done.outcome == Outcome.MARKED_MISSING and "evicted" in done.detail
        assert repo.record_holders() and not holders(repo, f)


def test_many_downloads_are_recorded_in_one_transaction(repo_config, monkeypatch):
    with S3Repo(repo_config) as a:
        a.create_repository()
        files = publish_files(a, 20)
        b = host(repo_config, "hostB")
        try:
            for f in files:
                b.local_file(f.version)
            assert rows_of(a, "hostB") == 0 and b.cache.holdings.pending == 20
            writes = count_write_transactions(b, monkeypatch)
            assert b.record_holders()
            assert len(writes) == 1
            assert rows_of(a, "hostB") == 20 and b.cache.holdings.pending == 0
            assert b.record_holders() and len(writes) == 1  # nothing waiting: no transaction at all
        finally:
            b.close()


def test_enough_waiting_changes_are_recorded_at_once_in_the_background(repo_config_pair):
    with S3Repo(repo_config_pair) as a:
        a.create_repository()
        files = publish_files(a, 5)
        b = host(repo_config_pair, "hostB")
        try:
            b.cache.holdings.flush_at = 5
            for f in files[:4]:
                b.local_file(f.version)
            time.sleep(0.2)
            assert rows_of(a, "hostB") == 0
            b.local_file(files[4].version)
            assert wait_for(lambda: rows_of(a, "hostB") == 5)
        finally:
            b.close()


def test_a_failed_flush_keeps_the_changes_and_never_fails_a_read(repo_config_pair, caplog):
    with S3Repo(repo_config_pair) as a:
        a.create_repository()
        publish_files(a, 3)
        b = host(repo_config_pair, "hostB")
        try:
            working = b.holder_records.db
            b.holder_records.db = Database(UNREACHABLE)  # the database goes away for the holders' writes
            b.cache.holdings.flush_at = 2  # the background flush fails too, off the readers' threads
            assert [b.get_file(f"t/f{i}").read_bytes() for i in range(3)] == [b"A" * 10, b"B" * 10, b"C" * 10]
            assert not b.record_holders()
            assert "kept for the next try" in caplog.text
            assert b.cache.holdings.pending == 3 and rows_of(a, "hostB") == 0
            b.holder_records.db = working  # back
            assert b.record_holders()
            assert rows_of(a, "hostB") == 3 and b.cache.holdings.pending == 0
        finally:
            b.close()


def test_too_many_waiting_changes_become_a_rewrite_from_the_cache(repo_config_pair):
    with S3Repo(repo_config_pair) as a:
        a.create_repository()
        files = publish_files(a, 4)
        b = host(repo_config_pair, "hostB")
        try:
            b.cache.holdings.max_pending = 2
            for f in files:
                b.local_file(f.version)
            # the third forgot the first three: the fourth waits alone, and the cache's contents are to be rewritten
            assert b.cache.holdings.pending == 1 and b.cache.holdings.stale
            assert b.record_holders()
            assert rows_of(a, "hostB") == 4
        finally:
            b.close()


def test_reconcile_replaces_the_hosts_rows_by_what_its_cache_holds(repo_config):
    with S3Repo(repo_config) as a:
        a.create_repository()
        files = publish_files(a, 3)
        b = host(repo_config, "hostB")
        for f in files:
            b.local_file(f.version)
        b.close()
        assert rows_of(a, "hostB") == 3
        shutil.rmtree(b.config.local_root / "cache")  # wiped while nothing ran
        b = host(repo_config, "hostB")
        try:
            assert b.record_holders()
            assert rows_of(a, "hostB") == 3  # changes alone know nothing of the wipe
            assert b.record_holders(reconcile=True)
            assert rows_of(a, "hostB") == 0
            b.local_file(files[0].version)
            a.db.run(lambda tx: tx.execute("DELETE FROM holders"))  # rows lost: a restored database, say
            assert b.record_holders(reconcile=True)
            assert set(holders(a, files[0])) == {"hostB"} and rows_of(a, "hostB") == 1
        finally:
            b.close()


def cache_rows(repo: S3Repo, count: int) -> list[str]:
    """``count`` objects in the cache of ``repo``, each of a version row (written in one transaction): their keys."""
    keys = [f"t/{i:032x}" for i in range(count)]
    rows = [("t", "", key[2:], "expired", "uploaded", "b", key, "x", 0o644, 0, 0, 1.0) for key in keys]
    repo.db.run(lambda tx: tx.insert_many("versions", ["file_type", "dir", "name", "state", "storage", "bucket",
                                                       "s3_key", "origin_host", "mode", "uid", "gid", "created_at"],
                                          rows))
    for key in keys:
        path = repo.cache.object_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    repo.cache.objects.load(written_before=float("inf"))
    return keys


def test_reconciling_a_large_cache_takes_a_few_statements(repo_config_pair, monkeypatch):
    """2,000 cached objects: a statement per BATCH of them, not one per object."""
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        cache_rows(repo, 2000)
        statements: list[str] = []
        execute, defer = Tx.execute, Tx.defer

        def executed(tx, sql, params=(), prepared=False):
            statements.append(sql)
            return execute(tx, sql, params, prepared)

        def deferred(tx, sql, params=()):
            if tx._dialect.batches:  # else it is executed at once, and counted there
                statements.append(sql)
            return defer(tx, sql, params)

        monkeypatch.setattr(Tx, "execute", executed)
        monkeypatch.setattr(Tx, "defer", deferred)
        assert repo.record_holders(reconcile=True)
        monkeypatch.undo()
        # one read of the host's rows, an insert per BATCH, the host's figures (and a PostgreSQL COMMIT)
        assert len([s for s in statements if "holders" in s]) == 1 + -(-2000 // BATCH), statements
        assert rows_of(repo, "test-host") == 2000


# -- the mount ------------------------------------------------------------------------------------------


def test_the_background_pass_reconciles_first_then_records(repo):
    files = publish_files(repo, 2)
    repo.cache.clear()
    assert repo.record_holders() and rows_of(repo, "test-host") == 0
    for f in files:  # rows this host's cache cannot back (a cache wiped while nothing ran, say)
        repo.holder_records.record("test-host", {f.s3_key: (True, 1.0)})
    stop = threading.Event()
    worker = threading.Thread(target=run_background, args=(repo, Tree(repo, metadata_ttl=1.0), stop, 0.02))
    worker.start()
    try:
        assert wait_for(lambda: rows_of(repo, "test-host") == 0)  # the first pass: reconciled
        repo.local_file(files[0].version)
        assert wait_for(lambda: set(holders(repo, files[0])) == {"test-host"})  # a later pass: recorded
    finally:
        stop.set()
        worker.join()


@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3")
def test_a_file_read_through_the_mount_is_recorded(repo_config_pair, tmp_path):
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        f = repo.add_file(path="t/m").touch(b"mounted bytes").publish()
        other = repo.add_file(path="t/other").touch(b"other").publish()
    mount_config = {**repo_config_pair, "local_root": str(tmp_path / "mount-root"), "host_name": "mount-host"}
    with S3Repo(repo_config_pair) as repo:  # a claim the mount's cache cannot back: its first pass drops it
        repo.holder_records.record("mount-host", {other.s3_key: (True, 1.0)})
        assert set(holders(repo, other)) == {"test-host", "mount-host"}
    with mounted(mount_config, tmp_path) as mnt:
        with S3Repo(repo_config_pair) as repo:
            assert wait_for(lambda: set(holders(repo, other)) == {"test-host"}, timeout=10)
        assert (mnt / "published/t/m").read_bytes() == b"mounted bytes"
    with S3Repo(repo_config_pair) as repo:  # recorded at the latest when the mount stopped
        assert set(holders(repo, f)) == {"test-host", "mount-host"}
        mount_host = next(h for h in repo.meta.hosts() if h["name"] == "mount-host")
        assert mount_host["cache_objects"] is not None  # its heartbeat carries its cache's figures


# -- fsck: where a lost object can be copied from -------------------------------------------------------


def test_fsck_names_the_hosts_with_copies_and_their_repair_restores(repo_config):
    with S3Repo(repo_config) as a:
        a.create_repository()
        f = a.add_file(path="t/lost").touch(b"precious").publish()
        with host(repo_config, "hostB") as b:
            assert b.get_file("t/lost").read_bytes() == b"precious"
        cache_ops.clear(a)  # this host's copy is gone too
        delete(a, f.s3_key)

        [finding] = fsck.check(a, quiet=True).findings
        assert finding.kind == Kind.MISSING and [h.host for h in finding.holders] == ["hostB"]
        assert "verified copies on: hostB (seen " in finding.detail
        [done] = fsck.repair(a, fsck.check(a, quiet=True), quiet=True).repairs
        assert done.outcome == Outcome.MARKED_MISSING
        assert "verified copies on: hostB (seen 0 s ago); run `s3repofs fsck --repair` there" in done.detail
        assert a.get_version(f.id).storage == Storage.MISSING

        with host(repo_config, "hostB") as b:  # on hostB: the existing repair puts the object back
            report = fsck.check(b, quiet=True)
            assert [x.kind for x in report.findings] == [Kind.MARKED_MISSING]
            assert "verified copies on: hostB (this host)" in report.findings[0].detail
            [done] = fsck.repair(b, report, quiet=True).repairs
            assert done.outcome == Outcome.REUPLOADED
        assert a.get_version(f.id).storage == Storage.UPLOADED
        assert a.get_file("t/lost").read_bytes() == b"precious"
        assert fsck.check(a, quiet=True).clean


def test_fsck_says_when_the_host_with_a_copy_is_gone(repo_config_pair):
    with S3Repo(repo_config_pair) as a:
        a.create_repository()
        f = a.add_file(path="t/lost").touch(b"precious").publish()
        with host(repo_config_pair, "hostB") as b:
            b.local_file(f.version)
        a.db.run(lambda tx: tx.execute("UPDATE hosts SET last_seen = 0 WHERE name = 'hostB'"))
        cache_ops.clear(a)
        delete(a, f.s3_key)
        [done] = fsck.repair(a, fsck.check(a, quiet=True), quiet=True).repairs
        assert "verified copies on: hostB (gone: last seen " in done.detail
        assert not fsck.check(a, quiet=True).findings[0].holders[0].live


# -- gc ---------------------------------------------------------------------------------------------------


def test_gc_drops_the_holder_rows_of_hosts_gone(repo_config_pair):
    with S3Repo(repo_config_pair) as a:
        a.create_repository()
        files = publish_files(a, 2)
        assert a.record_holders()
        for name in ("hostB", "hostC"):
            with host(repo_config_pair, name) as other:
                for f in files:
                    other.local_file(f.version)
        a.db.run(lambda tx: tx.execute("UPDATE hosts SET last_seen = 0 WHERE name = 'hostB'"))
        plan = gc.plan(a)
        assert [item.key for item in plan.holders] == ["hostB"]
        assert plan.as_dict()["categories"]["holders"]["count"] == 1
        result = gc.execute(a, plan)
        assert result.removed["holders"] == 1
        assert a.holder_records.per_host() == {"test-host": 2, "hostC": 2}
        assert not gc.plan(a).holders


# -- the commands -----------------------------------------------------------------------------------------


def test_info_status_and_fsck_show_the_holders(repo_config_pair, tmp_path):
    config_a = write_config(repo_config_pair, tmp_path / "a.json")
    config_b = write_config({**repo_config_pair, "local_root": str(tmp_path / "b"), "host_name": "hostB"},
                            tmp_path / "b.json")
    source = tmp_path / "data.csv"
    source.write_bytes(b"a,b\n1,2\n")
    assert run("init", config=str(config_a)).returncode == 0
    assert run("add", "--publish", str(source), "t/data.csv", config=str(config_a)).returncode == 0
    assert run("get", "t/data.csv", str(tmp_path / "copy"), config=str(config_b)).returncode == 0

    info = run("info", "t/data.csv", config=str(config_a))
    assert info.returncode == 0, info.stderr
    line = next(x for x in info.stdout.decode().splitlines() if x.strip().startswith("holders"))
    assert "test-host (this host; verified " in line and "hostB (seen " in line
    [record] = json.loads(run("info", "t/data.csv", "--json", config=str(config_a)).stdout)
    assert {h["host"]: h["live"] for h in record["holders"]} == {"test-host": True, "hostB": True}
    assert all(h["verified_at"] and h["last_seen"] for h in record["holders"])

    status = run("status", config=str(config_a))
    assert status.returncode == 0, status.stderr
    text = status.stdout.decode()
    assert "hosts:      2" in text
    line = next(x for x in text.splitlines() if x.startswith("  hostB: "))
    assert line.startswith("  hostB: seen ") and line.endswith("; cache 8 B of 10.0 GiB, 1 objects; holds 1 versions")
    hosts = {h["name"]: h for h in json.loads(run("status", "--json", config=str(config_a)).stdout)["hosts"]}
    assert hosts["hostB"]["versions_held"] == 1 and hosts["hostB"]["cache_objects"] == 1
    assert hosts["hostB"]["cache_bound"] == 10 * 1024**3 and hosts["hostB"]["live"] is True

    assert run("cache", "clear", config=str(config_a)).returncode == 0
    key = record["s3_key"]
    with S3Repo(repo_config_pair) as repo:
        delete(repo, key)
    checked = run("fsck", "--repair", config=str(config_a))
    assert checked.returncode == fsck.FINDINGS_EXIT_STATUS
    out = checked.stdout.decode()
    assert "verified copies on: hostB (seen " in out and "run `s3repofs fsck --repair` there" in out
    report = json.loads(run("fsck", "--json", config=str(config_a)).stdout)
    assert [h["host"] for h in report["findings"][0]["holders"]] == ["hostB"]
    assert run("fsck", "--repair", config=str(config_b)).returncode == fsck.FINDINGS_EXIT_STATUS
    assert run("fsck", config=str(config_a)).returncode == 0
    assert run("cat", "t/data.csv", config=str(config_a)).stdout == b"a,b\n1,2\n"
