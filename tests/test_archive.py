"""Archive tiers: archive, thaw, the thaw's finish and lapse, reads of archived versions; on SQLite and
PostgreSQL, with the local store (which emulates the tiers) and the moto S3 server (over HTTP)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from repo_fixtures import make_config

from s3repofs import S3Repo
from s3repofs.domain.lifecycle import Tier
from s3repofs.errors import ArchivedError, ConfigError, LifecycleError, NotFoundError, UsageError
from s3repofs.objects.s3 import restore_ongoing
from s3repofs.ops import archive as archive_ops
from s3repofs.ops import fsck, gc


def published(repo: S3Repo, path: str, data: bytes):
    rf = repo.add_file(path=path).touch(data).publish()
    repo.cache.clear()  # as on a host that never read it
    return rf


def tier(repo: S3Repo, rf) -> str:
    return rf.refresh().tier


def archive(repo: S3Repo, *paths: str, **options):
    return archive_ops.execute_archive(repo, archive_ops.plan_archive(repo, paths, **options))


def thaw(repo: S3Repo, *paths: str, **options):
    return archive_ops.execute_thaw(repo, archive_ops.plan_thaw(repo, paths, **options))


def test_archive_thaw_and_read_again(repo):
    rf = published(repo, "t/a", b"cold data")
    assert archive(repo, "t/a").outcomes == {"archived": 1}
    assert tier(repo, rf) == Tier.ARCHIVED and rf.version.archived_at is not None
    assert repo.store.head(rf.s3_key).storage_class == "GLACIER"
    with pytest.raises(ArchivedError, match=r"t/a: version \d+ is archived; thaw it with `s3repofs thaw t/a`") as info:
        rf.read_bytes()
    assert info.value.errno == errno.ENOMEDIUM and info.value.exit_status == 7
    assert thaw(repo, "t/a").outcomes == {"thaw requested": 1}
    assert tier(repo, rf) == Tier.THAWING
    assert rf.read_bytes() == b"cold data"  # the open looks at the restore: done, so the thaw is finished
    assert tier(repo, rf) == Tier.FRESH and rf.version.archived_at is None
    assert repo.store.head(rf.s3_key).storage_class == "STANDARD"
    assert repo.store.head(rf.s3_key).description["path"] == "t/a"  # the copies kept the description


def test_a_copy_in_this_hosts_cache_is_served_archived_or_not(repo):
    rf = repo.add_file(path="t/a").touch(b"kept here").publish()  # uploaded from here: cached
    archive(repo, "t/a")
    assert rf.refresh().read_bytes() == b"kept here"
    assert repo.open_version(rf.version).read(100, 0) == b"kept here"


def test_thaw_without_paths_finishes_the_thaws_whose_restore_is_done(repo):
    rf = published(repo, "t/a", b"a")
    archive(repo, "t/a")
    thaw(repo, "t/a")
    plan = archive_ops.plan_thaw(repo)
    assert not plan.request and [item.path for item in plan.items] == ["t/a"]
    assert archive_ops.execute_thaw(repo, plan).outcomes == {"thawed": 1}
    assert tier(repo, rf) == Tier.FRESH


def test_the_mounts_pass_finishes_thaws_a_few_at_a_time_and_in_turn(repo):
    files = [published(repo, f"t/{n}", b"x") for n in range(5)]
    archive(repo, "t")
    thaw(repo, "t")
    assert repo.finish_thaws(limit=2) == 2 and repo.finish_thaws(limit=2) == 2
    assert [tier(repo, rf) for rf in files] == [Tier.FRESH] * 4 + [Tier.THAWING]
    assert repo.finish_thaws(limit=2) == 1 and repo.finish_thaws(limit=2) == 0


def test_archive_older_than_takes_only_old_uploaded_fresh_versions(repo):
    old = published(repo, "t/old", b"1")
    published(repo, "u/old", b"2")
    repo.add_file(path="t/staged").touch(b"3")  # unpublished: never archived
    now = repo.meta.clock()
    assert archive_ops.plan_archive(repo, older_than_days=1, now=now).items == []
    plan = archive_ops.plan_archive(repo, older_than_days=1, file_type="t", now=now + 2 * 86400)
    assert [item.path for item in plan.items] == ["t/old"]
    archive_ops.execute_archive(repo, plan)
    assert tier(repo, old) == Tier.ARCHIVED
    again = archive_ops.plan_archive(repo, ["t"], now=now)
    assert again.items == [] and again.left_out == {"archived already": 1}


def test_expired_versions_are_archived_and_thawed_by_state(repo):
    first = published(repo, "t/a", b"1")
    published(repo, "t/a", b"2")
    archive(repo, "t/a", states=["expired"])
    assert tier(repo, first) == Tier.ARCHIVED and repo.get_file("t/a").tier == Tier.FRESH
    with pytest.raises(ArchivedError, match="s3repofs thaw --state expired t/a"):
        first.read_bytes()
    assert thaw(repo, "t/a", states=["expired"]).outcomes == {"thaw requested": 1}


def test_bad_requests_are_refused_and_change_nothing(repo):
    staged = repo.add_file(path="t/a").touch(b"1")
    with pytest.raises(UsageError, match="name PATHs, or --older-than"):
        archive_ops.plan_archive(repo)
    with pytest.raises(UsageError, match="--older-than -1: a number of days"):
        archive_ops.plan_archive(repo, older_than_days=-1)
    with pytest.raises(NotFoundError, match="t/none: no published or expired version"):
        archive_ops.plan_archive(repo, ["t/none"])
    with pytest.raises(LifecycleError, match="only an uploaded published or expired version can be archived"):
        repo.archive(staged.version)
    with pytest.raises(UsageError, match="at least 1 day"):
        archive_ops.plan_thaw(repo, ["t/a"], days=0)
    assert tier(repo, staged) == Tier.FRESH


def test_archive_storage_class_must_need_a_restore(tmp_path):
    with pytest.raises(ConfigError, match="'archive_storage_class' must be one of GLACIER, DEEP_ARCHIVE"):
        S3Repo({"object_dir": str(tmp_path / "o"), "local_root": str(tmp_path), "archive_storage_class": "GLACIER_IR"})


def test_gc_fsck_and_publish_keep_working_with_archived_versions(repo):
    first = published(repo, "t/a", b"1")
    published(repo, "t/a", b"2")
    archive(repo, "t")
    report = fsck.check(repo, deep=True, quiet=True)
    assert report.clean, [f.line() for f in report.findings]
    repo.publish(first.refresh().version)  # a re-publish of an archived version: it stays archived
    assert repo.get_file("t/a").tier == Tier.ARCHIVED
    repo.get_file("t/a").expire()
    result = gc.execute(repo, gc.plan(repo, now=repo.meta.clock() + 400 * 86400))
    assert result.removed["expired"] == 2 and repo.store.head(first.s3_key) is None


# -- the local store's emulation: restores that take time, and lapse ---------------------------------------


@pytest.fixture
def local_repo(request, tmp_path):
    with S3Repo(make_config(request, tmp_path, "sqlite-local")) as repo:
        repo.create_repository()
        yield repo


def test_a_restore_in_progress_keeps_the_version_thawing(local_repo):
    repo = local_repo
    rf = published(repo, "t/a", b"a")
    archive(repo, "t/a")
    repo.store.restore_seconds = 3600
    thaw(repo, "t/a")
    assert repo.store.head(rf.s3_key).restore_ongoing is True
    with pytest.raises(ArchivedError, match="is thawing: readable once its restore is done"):
        rf.refresh().read_bytes()
    assert thaw(repo, "t/a").outcomes == {"still thawing": 1} and tier(repo, rf) == Tier.THAWING
    clock = repo.store.clock
    repo.store.clock = lambda: clock() + 3601
    assert rf.read_bytes() == b"a" and tier(repo, rf) == Tier.FRESH


def test_a_thaw_not_finished_before_its_copy_expires_lapses_and_can_be_asked_again(local_repo):
    repo = local_repo
    rf = published(repo, "t/a", b"a")
    archive(repo, "t/a")
    thaw(repo, "t/a", days=2)
    clock = repo.store.clock
    repo.store.clock = lambda: clock() + 3 * 86400
    assert archive_ops.execute_thaw(repo, archive_ops.plan_thaw(repo)).outcomes == {"lapsed": 1}
    assert tier(repo, rf) == Tier.ARCHIVED
    assert thaw(repo, "t/a").outcomes == {"thaw requested": 1}
    assert rf.read_bytes() == b"a"


# -- the S3 server: what moto answers ---------------------------------------------------------------------


@pytest.fixture
def s3_repo(request, tmp_path):
    with S3Repo(make_config(request, tmp_path, "sqlite-s3")) as repo:
        repo.create_repository()
        yield repo


def test_moto_answers_the_archive_requests_as_s3_does(s3_repo):
    repo, client, bucket = s3_repo, s3_repo.store.client, s3_repo.store.bucket
    rf = published(repo, "t/a", b"a")
    archive(repo, "t/a")
    head = client.head_object(Bucket=bucket, Key=rf.s3_key)
    assert head["StorageClass"] == "GLACIER" and "Restore" not in head
    with pytest.raises(ArchivedError, match="archived in S3 bucket"):  # GET: InvalidObjectState
        b"".join(repo.store.stream(rf.s3_key, 0, 1, 1))
    thaw(repo, "t/a")
    thaw(repo, "t/a")  # asked again: moto's restore is done at once, so it is finished here
    assert restore_ongoing('ongoing-request="true"') is True  # what S3 answers meanwhile (moto never does)
    assert tier(repo, rf) == Tier.FRESH
    assert client.head_object(Bucket=bucket, Key=rf.s3_key).get("StorageClass", "STANDARD") == "STANDARD"
    assert rf.read_bytes() == b"a"


def test_moto_reports_a_restored_copy(s3_repo):
    repo = s3_repo
    rf = published(repo, "t/a", b"a")
    repo.store.set_storage_class(rf.s3_key, "DEEP_ARCHIVE", 1)
    assert repo.store.head(rf.s3_key).restore_ongoing is None
    repo.store.request_restore(rf.s3_key, 1)
    info = repo.store.head(rf.s3_key)
    assert (info.storage_class, info.restore_ongoing) == ("DEEP_ARCHIVE", False)
    assert b"".join(repo.store.stream(rf.s3_key, 0, 1, 1)) == b"a"  # a restored copy is readable


# -- the command line -----------------------------------------------------------------------------------


def run(*args: str, config: str):
    return subprocess.run([sys.executable, "-m", "s3repofs", *args, "--config", config], capture_output=True,
                          timeout=120)


def test_the_commands_plan_archive_thaw_and_ls_shows_the_tier(repo_config_pair, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(repo_config_pair))
    config.chmod(0o600)
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        published(repo, "t/a", b"a")
    dry = run("archive", "t", "--dry-run", "--json", config=str(config))
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["result"] is None and json.loads(dry.stdout)["plan"]["count"] == 1
    assert json.loads(run("ls", "--json", config=str(config)).stdout)[0]["tier"] == "fresh"
    done = run("archive", "t", config=str(config))
    assert done.returncode == 0 and "archive: 1 archived" in done.stdout.decode(), done.stderr
    assert "[archived]" in run("ls", config=str(config)).stdout.decode()
    cat = run("cat", "t/a", config=str(config))
    assert cat.returncode == 7 and "`s3repofs thaw t/a`" in cat.stderr.decode()
    thawed = run("thaw", "t/a", "--json", config=str(config))
    assert json.loads(thawed.stdout)["result"]["outcomes"] == {"thaw requested": 1}, thawed.stderr
    assert json.loads(run("ls", "--json", config=str(config)).stdout)[0]["tier"] == "thawing"
    assert run("thaw", config=str(config)).stdout.decode().endswith("thaw: 1 thawed\n")
    assert run("cat", "t/a", config=str(config)).stdout == b"a"
    bad = run("archive", config=str(config))
    assert bad.returncode == 2 and bad.stderr.decode().count("\n") == 1


# -- the mount ---------------------------------------------------------------------------------------------


def test_the_mount_refuses_an_archived_file_with_enomedium_shows_the_tier_and_reads_it_once_thawed(
        repo_config_pair, tmp_path):
    from mount_helper import daemon_log, fuse_available, mounted, wait_for

    if not fuse_available():
        pytest.skip("needs /dev/fuse and fusermount3")
    config = {**repo_config_pair, "metadata_ttl": 0.2}
    with S3Repo(config) as repo:
        repo.create_repository()
        rf = published(repo, "t/a", b"cold")
        with mounted(config, tmp_path) as mnt:
            path = mnt / "published/t/a"

            def shown_tier() -> str:
                return os.getxattr(path, "user.s3repo.tier").decode()

            assert shown_tier() == "fresh"
            archive(repo, "t/a")
            assert wait_for(lambda: shown_tier() == "archived"), shown_tier()
            cat = subprocess.run(["cat", str(path)], capture_output=True)
            assert cat.returncode == 1 and b"No medium found" in cat.stderr
            with pytest.raises(OSError) as info:
                path.read_bytes()
            assert info.value.errno == errno.ENOMEDIUM
            assert (f"open: t/a: version {rf.id} is archived; thaw it with `s3repofs thaw t/a`, then read it"
                    " (hours later) (ENOMEDIUM)") in daemon_log(tmp_path)
            thaw(repo, "t/a")
            assert wait_for(lambda: shown_tier() == "thawing"), shown_tier()
            assert path.read_bytes() == b"cold"  # the open finds the restore done and finishes the thaw
            assert wait_for(lambda: shown_tier() == "fresh"), shown_tier()


# -- backup, restore and rebuild carry the tiers ----------------------------------------------------------


def test_backup_restore_and_rebuild_keep_archived_and_thawing_versions(repo_config_pair, empty_database):
    from s3repofs.config import load_config
    from s3repofs.ops import backup as backup_ops
    from s3repofs.ops import restore as restore_ops
    from s3repofs.ops.rebuild import rebuild

    engine = "sqlite" if repo_config_pair["database"].startswith("sqlite") else "postgres"
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        published(repo, "t/archived", b"a")
        published(repo, "t/thawing", b"t")
        published(repo, "t/fresh", b"f")
        archive(repo, "t/archived", "t/thawing")
        thaw(repo, "t/thawing")
        backup_ops.backup(repo)
        restored = empty_database(engine)
        restore_ops.restore(repo, None, restored)
    rebuilt = empty_database(engine)
    rebuild(load_config(repo_config_pair), rebuilt, quiet=True)
    for database in (restored, rebuilt):
        with S3Repo({**repo_config_pair, "database": database}) as copy:
            assert {f.path: f.tier for f in copy.list_files("t")} == {
                "t/archived": "archived", "t/thawing": "thawing", "t/fresh": "fresh"}, database
    with S3Repo({**repo_config_pair, "database": rebuilt}) as copy:
        assert copy.finish_thaws() == 1 and copy.require_file("t/thawing").read_bytes() == b"t"


def test_an_object_over_the_copy_limit_is_copied_in_parts_its_description_kept(s3_repo, monkeypatch):
    from s3repofs.objects import s3

    monkeypatch.setattr(s3, "COPY_OBJECT_LIMIT", 1024)
    monkeypatch.setattr(s3, "COPY_PART_SIZE", 5 * 1024**2)  # S3's smallest part
    rf = published(s3_repo, "t/big", b"x" * (6 * 1024**2))
    archive(s3_repo, "t/big")
    info = s3_repo.store.head(rf.s3_key)
    assert (info.storage_class, info.size, info.description["path"]) == ("GLACIER", 6 * 1024**2, "t/big")
    etag = s3_repo.store.client.head_object(Bucket=s3_repo.store.bucket, Key=rf.s3_key)["ETag"]
    assert etag.endswith('-2"')  # a multipart copy's, of two parts
    thaw(s3_repo, "t/big")
    assert rf.refresh().read_bytes() == b"x" * (6 * 1024**2) and tier(s3_repo, rf) == Tier.FRESH


def test_an_object_moved_before_its_row_was_recorded_is_recorded_by_the_next_archive_or_thaw(repo):
    rf = published(repo, "t/a", b"a")
    repo.store.set_storage_class(rf.s3_key, "GLACIER", 1)  # archive's copy, then a crash before its record
    assert repo.archive(rf.version).shown_tier == Tier.ARCHIVED
    thawing = repo.thaw(rf.refresh().version, 1)
    repo.store.set_storage_class(rf.s3_key, "STANDARD", 1)  # the finish's copy, then a crash before its record
    assert repo.check_thaw(thawing).shown_tier == Tier.FRESH
