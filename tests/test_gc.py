"""gc (ops/gc.py): what each category plans and deletes, what it leaves alone, and that nothing live is lost,
also while a mount uploads and another host publishes; the hosts' heartbeat it relies on; the CLI.

Time is moved by ``now=`` (and S3Repo's clock), never by sleeping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from pathlib import Path

import pytest
from mount_helper import fuse_available, mounted, s3repofs, write_config

from s3repofs import S3Repo
from s3repofs.domain.content import file_content
from s3repofs.domain.lifecycle import VISIBLE_STATES, State
from s3repofs.errors import GcRefusedError
from s3repofs.mount.daemon import run_background
from s3repofs.mount.tree import Tree
from s3repofs.ops import gc
from s3repofs.ops.gc import GcItem, GcPlan

DAY = 86400.0
LATER = 40 * DAY  # past every default: unpublished_ttl (7 d), expired_retention (30 d), orphan_grace (1 d)


class Clock:
    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def keys_in_store(repo: S3Repo) -> set[str]:
    return {obj.key for obj in repo.store.list()}


def published_file(repo: S3Repo, path: str, data: bytes):
    return repo.add_file(path=path).touch(data).publish()


def read(repo: S3Repo, version) -> bytes:
    return Path(repo.local_file(version)).read_bytes()


def assert_every_live_object_exists(repo: S3Repo) -> None:
    """Every uploaded version in a live state has its object, with its recorded size and md5."""
    for version in repo.meta.search(states=VISIBLE_STATES):
        if version.storage == "uploaded":
            info = repo.store.head(version.s3_key)
            assert info is not None, f"{version.path}: version {version.id} ({version.state}) lost its object"
            assert info.size == version.size
            repo.cache.clear()
            assert file_content(repo.local_file(version)).md5 == version.md5


def run_gc(repo: S3Repo, **kwargs) -> gc.GcResult:
    return gc.execute(repo, gc.plan(repo, **kwargs))


# -- each category ------------------------------------------------------------------------------------


def test_expired_versions_past_retention_are_purged_and_their_rows_kept(repo):
    clock = repo.meta.clock = Clock()
    old = published_file(repo, "t/a", b"one")
    new = published_file(repo, "t/a", b"two")  # expires the first
    young = published_file(repo, "t/b", b"three")
    clock.now += 10 * DAY
    young.expire()
    assert gc.plan(repo, now=clock.now).expired == []

    plan = gc.plan(repo, now=clock.now + repo.config.expired_retention - DAY)
    assert [item.version_id for item in plan.expired] == [old.id]
    assert plan.size("expired") == 3
    result = gc.execute(repo, plan)

    assert result.removed["expired"] == 1 and result.bytes_freed == 3
    purged = repo.meta.get(old.id)
    assert purged.state == State.PURGED and purged.purged_at == clock.now and purged.md5 == old.md5
    assert repo.store.head(old.version.s3_key) is None
    assert repo.meta.get(young.id).state == State.EXPIRED and repo.store.head(young.version.s3_key)
    assert read(repo, repo.meta.get(new.id)) == b"two"
    assert_every_live_object_exists(repo)


def test_stale_unpublished_versions_of_this_host_are_discarded_with_staged_file_and_object(repo):
    staged = repo.add_file(path="t/staged").touch(b"local bytes")
    uploaded = repo.add_file(path="t/uploaded").touch(b"uploaded bytes").upload()
    staged_file = repo.staged_path(staged.version)
    assert staged_file.exists() and repo.store.head(uploaded.version.s3_key)
    assert gc.plan(repo).unpublished == []  # younger than unpublished_ttl

    plan = gc.plan(repo, now=time.time() + LATER)
    assert sorted(item.path for item in plan.unpublished) == ["t/staged", "t/uploaded"]
    assert plan.size("unpublished") == len(b"local bytes") + len(b"uploaded bytes")
    result = gc.execute(repo, plan)

    assert result.removed["unpublished"] == 2
    assert {repo.meta.get(staged.id).state, repo.meta.get(uploaded.id).state} == {State.DISCARDED}
    assert not staged_file.exists()
    assert repo.store.head(uploaded.version.s3_key) is None


def test_objects_of_discarded_and_purged_versions_are_leftovers_to_delete(repo):
    discarded = repo.add_file(path="t/d").touch(b"d").upload()
    repo.meta.discard(discarded.id)  # as an upload that lost a race with a discard leaves it
    published_file(repo, "t/p", b"p1")
    purged = repo.get_file("t/p")
    published_file(repo, "t/p", b"p2")
    assert repo.meta.purge(purged.id, expired_before=time.time() + 1)  # a gc stopped before its delete
    plan = gc.plan(repo)
    assert sorted(item.version_id for item in plan.leftover) == sorted([discarded.id, purged.id])
    gc.execute(repo, plan)
    assert repo.store.head(discarded.version.s3_key) is None and repo.store.head(purged.version.s3_key) is None
    assert repo.meta.get(discarded.id).state == State.DISCARDED  # rows stay
    assert_every_live_object_exists(repo)


def test_orphan_objects_go_after_the_grace_and_backups_are_never_touched(repo, tmp_path):
    published_file(repo, "t/kept", b"kept")
    source = tmp_path / "orphan"
    source.write_bytes(b"no row names me")
    content = file_content(source)
    repo.store.put("t/orphan", source, content.size, content.md5, {})
    backup = repo.config.backup_prefix + "2026/backup.gz"
    repo.store.put(backup, source, content.size, content.md5, {})

    young = gc.plan(repo)
    assert young.orphan == [] and young.kept == {"orphan: younger than orphan_grace": 1}
    plan = gc.plan(repo, now=time.time() + 2 * DAY)
    assert [item.key for item in plan.orphan] == ["t/orphan"]
    assert gc.execute(repo, plan).removed["orphan"] == 1
    assert keys_in_store(repo) == {repo.get_file("t/kept").version.s3_key, backup}
    assert_every_live_object_exists(repo)


def test_objects_whose_rows_a_restore_lost_are_kept_and_a_foreign_object_is_deleted(restored_behind, tmp_path,
                                                                                      caplog):
    """After a restore of a backup older than the newest writes, the objects of the versions written since
    have no row: they describe versions the database lacks, so gc keeps them (fsck --repair adopts them)."""
    lost = restored_behind
    with S3Repo(lost.config) as repo:
        assert repo.meta.rows_of_keys([lost.b.s3_key, lost.a2.s3_key]) == {}
        source = tmp_path / "foreign"
        source.write_bytes(b"not written by s3repofs")
        content = file_content(source)
        repo.store.put("t/foreign", source, content.size, content.md5, {})  # no description: an orphan

        with caplog.at_level(logging.WARNING, logger="s3repofs.ops.gc"):
            plan = gc.plan(repo, now=time.time() + 1)
        assert [item.key for item in plan.orphan] == ["t/foreign"]
        assert sorted((i.key, i.version_id, i.path, i.size) for i in plan.unrecorded) == sorted([
            (lost.b.s3_key, lost.b.id, "t/new/b", lost.b.size), (lost.a2.s3_key, lost.a2.id, "t/a", lost.a2.size)])
        assert plan.kept == {"orphan: describes a version the database lacks (see fsck)": 2}
        assert (f"gc: keeping object {lost.b.s3_key}: object describes version {lost.b.id} of t/new/b; the database "
                "has no such version: run `s3repofs fsck --repair` to adopt it") in caplog.text
        result = gc.execute(repo, plan)
        assert result.removed["orphan"] == 1
        versions = {key for key in keys_in_store(repo) if not key.startswith(gc.RESERVED_PREFIX)}
        assert versions == {lost.a1.s3_key, lost.b.s3_key, lost.a2.s3_key}

        # A version written before the repair takes b's id again (the restore set the sequence back):
        # b's object is still kept, and fsck says why it cannot be adopted.
        reused = published_file(repo, "t/c", b"written after the restore")
        assert reused.id == lost.b.id
        again = gc.plan(repo, now=time.time() + 1)
        assert sorted(item.key for item in again.unrecorded) == sorted([lost.a2.s3_key, lost.b.s3_key])
        assert again.orphan == []

    config = str(write_config(lost.config, tmp_path / "restored.json"))
    as_json = json.loads(s3repofs("gc", "--dry-run", "--json", "--config", config).stdout)
    assert {item["version_id"] for item in as_json["plan"]["unrecorded"]} == {lost.b.id, lost.a2.id}
    text = s3repofs("gc", "--dry-run", "-v", "--config", config).stdout
    assert "unrecorded          2" in text and f"describes version {lost.a2.id} t/a" in text


def test_staged_files_no_unpublished_local_version_holds_are_removed(repo):
    live = repo.add_file(path="t/live").touch(b"still staged")
    gone = repo.add_file(path="t/gone").touch(b"discarded elsewhere")
    repo.meta.discard(gone.id)  # as a discard on another host leaves the origin's staged file
    rowless = repo.cache.staging_path("t/" + "0" * 32)
    rowless.write_bytes(b"")  # a crash between add_file's (empty) file and its row
    lost = repo.cache.staging_path("t/" + "1" * 32)
    lost.write_bytes(b"written, then its row lost by a restore of an older backup")

    plan = gc.plan(repo, now=time.time() + 60)  # the row-less files may still be getting their rows
    assert [item.key for item in plan.staging] == [gone.version.s3_key]
    assert plan.kept == {"staging: no row yet, may be being created": 2}
    plan = gc.plan(repo, now=time.time() + 2 * DAY)
    assert sorted(item.key for item in plan.staging) == sorted([gone.version.s3_key, "t/" + "0" * 32])
    assert plan.kept == {"staging: bytes with no row (a lost version?): copy it out and add it again": 1}
    assert gc.execute(repo, plan).removed["staging"] == 2
    assert not rowless.exists() and not repo.staged_path(gone.version).exists()
    assert repo.staged_path(live.version).read_bytes() == b"still staged"
    assert lost.read_bytes().startswith(b"written")  # never deleted: it may be the only copy


# -- what is left alone -------------------------------------------------------------------------------


def test_a_staged_version_held_by_a_writer_is_left_alone(repo):
    rf = repo.add_file(path="t/w").touch(b"being written")
    planned_before = gc.plan(repo, now=time.time() + LATER)
    assert [item.version_id for item in planned_before.unpublished] == [rf.id]
    fd = repo.open_staged(rf.version)  # a writer, as the mount holds one for each open write handle
    try:
        held = gc.plan(repo, now=time.time() + LATER)
        assert held.unpublished == [] and held.staging == []
        assert held.kept == {"unpublished: held by a writer or an upload": 1}
        result = gc.execute(repo, planned_before)  # planned before the writer came
        assert result.skipped == {"unpublished: held by a writer or an upload": 1}
        assert repo.meta.get(rf.id).state == State.UNPUBLISHED and repo.staged_path(rf.version).exists()
    finally:
        repo.release_staged(fd)
        os.close(fd)
    assert run_gc(repo, now=time.time() + LATER).removed["unpublished"] == 1


def test_another_hosts_staged_versions_wait_until_it_is_gone(repo_config, tmp_path):
    start = Clock()
    here = S3Repo(repo_config, clock=start)
    here.create_repository()
    there_config = {**repo_config, "host_name": "other-host", "local_root": str(tmp_path / "other")}
    there = S3Repo(there_config, clock=Clock(start.now))
    try:
        staged = there.add_file(path="t/there").touch(b"staged on the other host")
        uploaded = there.add_file(path="t/there-up").touch(b"uploaded by it").upload()
        stale = start.now + LATER  # past unpublished_ttl
        there.meta.clock.now = stale - DAY / 2  # its heartbeat, half a day before: alive
        there.heartbeat()
        alive = gc.plan(here, now=stale)
        assert alive.unpublished == [] and alive.kept == {"unpublished: staged on a host still alive": 2}

        gone = gc.plan(here, now=stale + DAY)  # not heard of for 1.5 days (host_gone_after: 1 d)
        assert sorted(item.version_id for item in gone.unpublished) == [staged.id, uploaded.id]
        result = gc.execute(here, gone)
        assert result.removed["unpublished"] == 2
        assert here.store.head(uploaded.version.s3_key) is None
        # Its own gc, when it comes back, removes its staged file of the version discarded here.
        assert there.staged_path(staged.version).exists()
        assert run_gc(there).removed["staging"] == 1 and not there.staged_path(staged.version).exists()
    finally:
        here.close()
        there.close()


def test_a_host_back_between_plan_and_execute_keeps_its_versions(repo_config, tmp_path):
    clock = Clock()
    here = S3Repo(repo_config)
    here.create_repository()
    there = S3Repo({**repo_config, "host_name": "other-host", "local_root": str(tmp_path / "other")}, clock=clock)
    try:
        staged = there.add_file(path="t/there").touch(b"x")
        plan = gc.plan(here, now=clock.now + LATER)
        assert [item.version_id for item in plan.unpublished] == [staged.id]
        clock.now += LATER
        there.heartbeat()
        assert gc.execute(here, plan).skipped == {"unpublished: its host is back": 1}
        assert here.meta.get(staged.id).state == State.UNPUBLISHED
    finally:
        here.close()
        there.close()


def test_an_expired_version_republished_between_plan_and_execute_keeps_its_object(repo):
    first = published_file(repo, "t/a", b"first")
    published_file(repo, "t/a", b"second")
    plan = gc.plan(repo, now=time.time() + LATER)
    assert [item.version_id for item in plan.expired] == [first.id]
    repo.publish(repo.meta.get(first.id))  # mv expired/t/a published/t/a
    result = gc.execute(repo, plan)
    assert result.removed["expired"] == 0
    assert result.skipped == {"expired: no longer expired since before the cutoff": 1}
    assert repo.get_file("t/a").id == first.id
    repo.cache.clear()
    assert read(repo, repo.meta.get(first.id)) == b"first"
    assert_every_live_object_exists(repo)


def test_execute_never_deletes_an_object_a_live_version_references(repo):
    published = published_file(repo, "t/a", b"published")
    expired = published_file(repo, "t/b", b"expired").expire()
    staged = repo.add_file(path="t/c").touch(b"uploaded, unpublished").upload()
    live = [GcItem(f.version.s3_key, 1, f.id) for f in (published, expired, staged)]
    wrong = GcPlan(time.time(), 0.0, [], [], live, live, [])  # a plan gone wrong: live keys as leftovers, orphans
    result = gc.execute(repo, wrong)
    assert result.removed["leftover"] == result.removed["orphan"] == 0
    assert result.skipped == {"leftover: object referenced by a live version": 3,
                              "orphan: object referenced by a live version": 3}
    assert_every_live_object_exists(repo)


def test_gc_refuses_when_a_retained_backup_is_older_than_expired_retention(repo):
    now = time.time()
    retention = repo.config.expired_retention
    gc.plan(repo, now=now, oldest_backup_at=now - retention + 3600)  # the backups are younger: fine
    with pytest.raises(GcRefusedError) as refused:
        gc.plan(repo, now=now, oldest_backup_at=now - retention - 3600)
    message = str(refused.value)
    assert "expired_retention (2.592e+06 s)" in message and "backup_keep 7" in message
    assert f"{retention + 3600:.0f} s old" in message
    assert refused.value.exit_status == 2


def test_nothing_live_is_deleted_by_gc_at_its_most_aggressive(repo):
    for i in range(6):
        published_file(repo, f"t/{i % 3}", f"version {i}".encode())
    repo.add_file(path="t/staged").touch(b"staged")
    repo.expire(repo.get_file("t/0").version)
    result = run_gc(repo, now=time.time() + LATER)
    assert result.removed["expired"] == 4 and result.removed["unpublished"] == 1
    assert_every_live_object_exists(repo)
    assert {f.path: read(repo, f.version) for f in repo.list_files("t")} == {
        "t/1": b"version 4", "t/2": b"version 5"}


# -- the heartbeat ------------------------------------------------------------------------------------


def _last_seen(repo: S3Repo, host: str) -> float | None:
    return next((h["last_seen"] for h in repo.meta.hosts() if h["name"] == host), None)


def test_opening_a_repository_records_the_hosts_heartbeat(repo_config):
    S3Repo(repo_config).create_repository()
    clock = Clock(time.time() + 1000)
    with S3Repo(repo_config, clock=clock) as repo:
        repo.ensure_ready()
        assert _last_seen(repo, "test-host") == clock.now


def test_the_mounts_background_pass_records_the_heartbeat(repo):
    clock = Clock()
    repo.meta.clock = clock
    stop = threading.Event()
    worker = threading.Thread(target=run_background, args=(repo, Tree(repo, metadata_ttl=1.0), stop, 0.02))
    worker.start()
    try:
        for _ in range(3):
            clock.now += 60
            deadline = time.monotonic() + 5
            while _last_seen(repo, repo.host) != clock.now and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _last_seen(repo, repo.host) == clock.now
    finally:
        stop.set()
        worker.join()


# -- the command --------------------------------------------------------------------------------------


def test_cli_dry_run_deletes_nothing_and_json_reports_plan_and_result(repo_config_pair, tmp_path):
    config = {**repo_config_pair, "expired_retention": 0, "orphan_grace": 0}
    path = str(write_config(config, tmp_path / "gc.json"))
    s3repofs("init", "--config", path)
    for data in (b"first", b"second"):
        source = tmp_path / "data"
        source.write_bytes(data)
        s3repofs("add", str(source), "t/a", "--publish", "--config", path)
    with S3Repo(config) as repo:
        before = keys_in_store(repo)

    dry = json.loads(s3repofs("gc", "--dry-run", "--json", "--config", path).stdout)
    assert dry["result"] is None
    assert dry["plan"]["categories"]["expired"]["count"] == 1
    assert dry["plan"]["categories"]["expired"]["items"][0]["path"] == "t/a"
    text = s3repofs("gc", "--dry-run", "--config", path, "-v").stdout
    assert "gc plan" in text and "expired" in text and "t/a" in text
    with S3Repo(config) as repo:
        assert keys_in_store(repo) == before

    done = json.loads(s3repofs("gc", "--json", "--config", path).stdout)
    assert done["result"]["removed"]["expired"] == 1 and done["result"]["bytes_freed"] == len(b"first")
    with S3Repo(config) as repo:
        assert keys_in_store(repo) == {repo.get_file("t/a").version.s3_key}
    again = s3repofs("gc", "--config", path)
    assert "removed 0 unpublished, 0 expired" in again.stdout and again.stderr == ""


# -- the race -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3 (./scripts/setup)")
def test_gc_racing_a_mount_and_another_host_loses_nothing_published(repo_config_pair, tmp_path):
    """gc at its most aggressive (orphan_grace, ttls and retention 0) runs again and again while a mount
    on this host writes and overwrites files in published/ and another host publishes through the API:
    afterwards every published version's object exists and reads back byte-exact."""
    config = {**repo_config_pair, "orphan_grace": 0, "unpublished_ttl": 0, "expired_retention": 0,
              "metadata_ttl": 1.0}
    other_config = {**config, "host_name": "other-host", "local_root": str(tmp_path / "other")}
    expected: dict[str, bytes] = {}
    failures: list[BaseException] = []
    writing = threading.Event()
    writing.set()

    def guarded(work):
        def run():
            try:
                work()
            except BaseException as exc:  # reported by the test, not lost in a thread
                failures.append(exc)
        return threading.Thread(target=run)

    with mounted(config, tmp_path) as mnt, S3Repo(config) as here, S3Repo(other_config) as there:
        os.makedirs(mnt / "published/race")
        there.ensure_ready()

        def mount_writes():
            for i in range(40):
                data = random.randbytes(random.randint(1, 50_000))
                (mnt / f"published/race/m{i % 8}").write_bytes(data)
                expected[f"race/m{i % 8}"] = data

        def host_publishes():
            for i in range(40):
                data = random.randbytes(random.randint(1, 50_000))
                published_file(there, f"race/o{i % 8}", data)
                expected[f"race/o{i % 8}"] = data

        purged = []

        def collect():
            while writing.is_set():
                purged.append(run_gc(here).removed["expired"])

        writers = [guarded(mount_writes), guarded(host_publishes)]
        collector = guarded(collect)
        for thread in (*writers, collector):
            thread.start()
        for thread in writers:
            thread.join()
        writing.clear()
        collector.join()
        assert failures == []
        run_gc(here)

        assert len(purged) >= 2 and sum(purged) > 0, "gc never ran during the writes, or purged nothing"
        published = {str(v.path): v for v in here.meta.search(states=[State.PUBLISHED])}
        assert set(published) == set(expected)
        here.cache.clear()
        for path, data in expected.items():
            version = published[path]
            info = here.store.head(version.s3_key)
            assert info is not None and info.size == len(data), f"{path}: version {version.id} lost its object"
            assert read(here, version) == data, path
            assert hashlib.md5((mnt / "published" / path).read_bytes()).hexdigest() == version.md5
        assert_every_live_object_exists(here)
