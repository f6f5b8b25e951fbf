"""fsck (ops/fsck.py, ``s3repofs fsck``): what it finds, what --repair mends, and what it marks lost.

Objects are damaged behind the repository's back, in the store itself: deleted, cut short, or
overwritten with other bytes of the same size (through boto3 on the S3 server, or the local store's
file). Every body runs on SQLite and PostgreSQL, on the local store and the S3 server.
"""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
import time

import pytest
import xxhash
from mount_helper import daemon_log, fuse_available, mounted, write_config

from s3repofs import S3Repo
from s3repofs.domain.content import Content
from s3repofs.domain.lifecycle import Storage
from s3repofs.errors import ObjectMissingError
from s3repofs.objects.s3 import PATH_OBJECT_SUFFIX, S3Store
from s3repofs.ops import fsck
from s3repofs.ops.fsck import Kind, Outcome
from s3repofs.repo import object_description

DAY = 86400


# -- damaging objects in the store itself ------------------------------------------------------------


def overwrite(repo: S3Repo, key: str, data: bytes) -> None:
    """Replace the object's bytes directly in the store (its description stays, as a bad disk leaves it)."""
    if isinstance(repo.store, S3Store):
        repo.store.client.put_object(Bucket=repo.store.bucket, Key=key, Body=data)
    else:
        (repo.store.root / "data" / key).write_bytes(data)


def delete(repo: S3Repo, key: str) -> None:
    if isinstance(repo.store, S3Store):
        repo.store.client.delete_object(Bucket=repo.store.bucket, Key=key)
    else:
        (repo.store.root / "data" / key).unlink()


def put_raw(repo: S3Repo, key: str, data: bytes, tmp_path, description: dict | None = None) -> None:
    source = tmp_path / "raw"
    source.write_bytes(data)
    repo.store.put(key, source, len(data), hashlib.md5(data).hexdigest(), description or {})


def publish(repo: S3Repo, path: str, data: bytes):
    return repo.add_file(path=path).touch(data).publish()


def _content(data: bytes) -> Content:
    return Content(len(data), hashlib.md5(data).hexdigest(), xxhash.xxh3_128(data).hexdigest())


def found(report) -> set[tuple[str, str]]:
    return {(f.kind, f.path) for f in report.findings}


# -- the check ---------------------------------------------------------------------------------------


def test_a_clean_repository_has_no_findings(repo):
    publish(repo, "t/a", b"a")
    publish(repo, "t/b", b"b1")
    publish(repo, "t/b", b"b2")  # expires the first: expired versions are checked too
    repo.add_file(path="t/up").touch(b"up").upload()  # unpublished, uploaded
    repo.add_file(path="t/staged").touch(b"s")  # staged on this (live) host
    empty = publish(repo, "u/empty", b"")
    for deep in (False, True):
        report = fsck.check(repo, deep=deep, quiet=True)
        assert report.clean and report.findings == []
        assert (report.versions, report.objects) == (6, 5)
    assert fsck.check(repo, "u", quiet=True).versions == 1
    assert fsck.check(repo, empty.path, deep=True, quiet=True).clean


def test_missing_wrong_size_and_corrupt_objects_are_found(repo):
    gone, short, bad, good = (publish(repo, f"t/d/{name}", name.encode() * 100)
                              for name in ("gone", "short", "bad", "good"))
    delete(repo, gone.s3_key)
    overwrite(repo, short.s3_key, b"x" * 10)
    overwrite(repo, bad.s3_key, b"X" * bad.file_size)  # the same size: only a digest sees it

    report = fsck.check(repo, quiet=True)
    assert found(report) == {(Kind.MISSING, "t/d/gone"), (Kind.WRONG_SIZE, "t/d/short")}
    wrong = next(f for f in report.findings if f.kind == Kind.WRONG_SIZE)
    assert (wrong.version, wrong.key, wrong.detail) == (
        short.id, short.s3_key, "10 bytes, recorded 500; verified copies on: test-host (this host)")

    deep = fsck.check(repo, deep=True, quiet=True)
    assert found(deep) == found(report) | {(Kind.CORRUPT, "t/d/bad")}
    corrupt = next(f for f in deep.findings if f.kind == Kind.CORRUPT)
    assert corrupt.detail.startswith("xxh3 ") and bad.version.xxh3 in corrupt.detail
    assert not fsck.check(repo, "t/d/good", deep=True, quiet=True).findings
    assert found(fsck.check(repo, "t/d/bad", deep=True, quiet=True)) == {(Kind.CORRUPT, "t/d/bad")}


def test_a_version_recorded_without_xxh3_is_checked_with_md5(repo):
    old = publish(repo, "t/old", b"old bytes")
    repo.db.run(lambda tx: tx.execute("UPDATE versions SET xxh3 = NULL WHERE id = ?", (old.id,)))
    assert fsck.check(repo, deep=True, quiet=True).clean
    overwrite(repo, old.s3_key, b"OLD BYTES")
    [finding] = fsck.check(repo, deep=True, quiet=True).findings
    assert finding.kind == Kind.CORRUPT and finding.detail.startswith("md5 ") and old.md5 in finding.detail


def test_orphans_are_reported_but_not_backups_nor_path_objects(repo, tmp_path):
    kept = publish(repo, "t/kept", b"k")
    described = publish(repo, "t/sub/x", b"x").version  # an orphan that says it is a version of t/sub/x:
    put_raw(repo, "t/0123orphan", b"x", tmp_path, object_description(described, _content(b"x")))  # a copy of it
    put_raw(repo, "u/stray", b"?", tmp_path)
    put_raw(repo, repo.config.backup_prefix + "2026/manifest.json", b"{}", tmp_path)
    put_raw(repo, kept.s3_key + PATH_OBJECT_SUFFIX, b"t/kept", tmp_path)  # beside a referenced object

    report = fsck.check(repo, quiet=True)
    assert {(f.kind, f.key) for f in report.findings} == {(Kind.ORPHAN, "t/0123orphan"), (Kind.ORPHAN, "u/stray")}
    orphan = next(f for f in report.findings if f.key == "t/0123orphan")
    assert orphan.path == "t/sub/x" and orphan.version is None
    assert orphan.detail == f"1 bytes, no version references it, describes itself as version {described.id}"
    # A prefix lists its type's keys; deeper, only orphans that describe themselves under it.
    assert {f.key for f in fsck.check(repo, "t", quiet=True).findings} == {"t/0123orphan"}
    assert {f.key for f in fsck.check(repo, "t/sub", quiet=True).findings} == {"t/0123orphan"}
    assert fsck.check(repo, "t/other", quiet=True).clean

    # Other bytes under the same id: the id was handed out again after the row was lost (not a copy).
    other = b"lost and found"
    put_raw(repo, "t/0124other", other, tmp_path, object_description(described, _content(other)))
    [taken] = [f for f in fsck.check(repo, "t/sub", quiet=True).findings if f.key == "t/0124other"]
    assert (taken.kind, taken.version, taken.path) == (Kind.UNRECORDED, described.id, "t/sub/x")
    assert taken.detail.endswith(f"it cannot be adopted: version {described.id} is another object's "
                                 f"({described.s3_key}): the id was handed out again since the row was lost")
    [done] = fsck.repair(repo, fsck.check(repo, "t/sub", quiet=True), quiet=True).repairs
    assert done.outcome == Outcome.NOT_ADOPTED and repo.meta.get(described.id).s3_key == described.s3_key


def test_staged_versions_of_a_gone_host_are_reported(repo_config, tmp_path):
    def host(name: str, last_seen: float) -> S3Repo:
        other = S3Repo({**repo_config, "local_root": str(tmp_path / name)}, host_name=name,
                       clock=lambda: last_seen)
        other.ensure_ready()
        other.meta.register_host(name)
        return other

    with S3Repo(repo_config) as repo:
        repo.create_repository()
        gone, alive = host("gone-host", time.time() - 2 * DAY), host("alive-host", time.time() - 60)
        stranded = gone.add_file(path="t/stranded").touch(b"s")
        gone.add_file(path="t/uploaded").touch(b"u").upload()  # its bytes are in the store: nothing lost
        alive.add_file(path="t/alive").touch(b"a")
        repo.add_file(path="t/mine").touch(b"m")  # this host is alive: it runs fsck
        unknown = S3Repo({**repo_config, "local_root": str(tmp_path / "unknown")}, host_name="unrecorded-host")
        unrecorded = unknown.add_file(path="u/unrecorded").touch(b"?")
        # Its heartbeat's row gone, as after a rebuild from the bucket (origin hosts, but no hosts table).
        repo.db.run(lambda tx: tx.execute("DELETE FROM hosts WHERE name = 'unrecorded-host'"))

        report = fsck.check(repo, quiet=True)
        assert found(report) == {(Kind.HOST_GONE, "t/stranded"), (Kind.HOST_GONE, "u/unrecorded")}
        by_path = {f.path: f for f in report.findings}
        assert by_path["t/stranded"].version == stranded.id
        assert "staged on gone-host, last seen" in by_path["t/stranded"].detail
        assert by_path["u/unrecorded"].version == unrecorded.id
        assert "a host never recorded" in by_path["u/unrecorded"].detail
        assert found(fsck.check(repo, "u", quiet=True)) == {(Kind.HOST_GONE, "u/unrecorded")}
        assert fsck.repair(repo, report, quiet=True).repairs == []  # its bytes are on that host: nothing to do
        for other in (gone, alive, unknown):
            other.close()


def test_the_versions_are_read_a_page_at_a_time(repo, monkeypatch):
    for i in range(7):
        publish(repo, f"t/f{i}", b"%d" % i)
    delete(repo, repo.get_file("t/f6").s3_key)
    pages = []
    scan = repo.meta.scan_versions
    monkeypatch.setattr(repo.meta, "scan_versions", lambda after, limit, prefix: pages.append(after) or scan(
        after, limit, prefix))
    report = fsck.check(repo, page_size=3, quiet=True)
    assert report.versions == 7 and found(report) == {(Kind.MISSING, "t/f6")}
    assert len(pages) == 4 and pages[0] == 0 and pages == sorted(pages)


def test_a_version_purged_while_it_is_checked_is_not_reported(repo, monkeypatch):
    f = publish(repo, "t/purged", b"p")
    head = repo.store.head

    def gc_first(key: str):  # gc purges the version and deletes its object between the page's read and the HEAD
        if key == f.s3_key:
            repo.db.run(lambda tx: tx.execute("UPDATE versions SET state = 'purged' WHERE id = ?", (f.id,)))
            delete(repo, key)
        return head(key)

    monkeypatch.setattr(repo.store, "head", gc_first)
    report = fsck.check(repo, quiet=True)
    assert report.versions == 1 and report.clean


# -- the repair --------------------------------------------------------------------------------------


def test_repair_reuploads_from_the_cache_copy(repo):
    data = {name: name.encode() * 1000 for name in ("gone", "short", "bad")}
    files = {name: publish(repo, f"t/{name}", payload) for name, payload in data.items()}
    descriptions = {name: repo.store.head(f.s3_key).description for name, f in files.items()}
    for name, f in files.items():
        assert f.read_bytes() == data[name]  # read, so this host has a verified copy in its cache
        assert repo.cache.object_path(f.s3_key).exists()
    delete(repo, files["gone"].s3_key)
    overwrite(repo, files["short"].s3_key, b"short")
    overwrite(repo, files["bad"].s3_key, b"B" * len(data["bad"]))

    report = fsck.check(repo, deep=True, quiet=True)
    assert {f.kind for f in report.findings} == {Kind.MISSING, Kind.WRONG_SIZE, Kind.CORRUPT}
    result = fsck.repair(repo, report, quiet=True)
    assert [r.outcome for r in result.repairs] == [Outcome.REUPLOADED] * 3
    assert all("from this host's cache" in r.detail for r in result.repairs)

    assert fsck.check(repo, deep=True, quiet=True).clean
    assert repo.cache.clear() >= 3  # the next reads download from the store, and verify
    for name, f in files.items():
        assert repo.get_file(f"t/{name}").read_bytes() == data[name]
        assert repo.store.head(f.s3_key).description == descriptions[name]  # as the first upload described it
        assert repo.get_file(f"t/{name}").storage == Storage.UPLOADED


def test_a_copy_that_does_not_match_is_not_used(repo):
    f = publish(repo, "t/rotten", b"good bytes")
    repo.cache.object_path(f.s3_key).write_bytes(b"rotten byte")  # this host's disk went bad too
    delete(repo, f.s3_key)
    [done] = fsck.repair(repo, fsck.check(repo, quiet=True), quiet=True).repairs
    assert done.outcome == Outcome.MARKED_MISSING
    assert repo.store.head(f.s3_key) is None
    # Evicted, so no reader on this host is served those bytes.
    assert done.detail.endswith("; this host's cache copy failed its re-hash and was evicted")
    assert not repo.cache.object_path(f.s3_key).exists() and not repo.cache.has(f.s3_key)


def test_without_a_local_copy_a_version_is_marked_missing_until_another_host_has_one(repo_config, tmp_path):
    with S3Repo(repo_config) as repo:
        repo.create_repository()
        lost = publish(repo, "t/lost", b"precious")
        other = S3Repo({**repo_config, "local_root": str(tmp_path / "other")}, host_name="other-host")
        assert other.get_file("t/lost").read_bytes() == b"precious"  # the other host has it in its cache
        repo.cache.clear()
        delete(repo, lost.s3_key)

        result = fsck.repair(repo, fsck.check(repo, quiet=True), quiet=True)
        assert [(r.outcome, r.finding.kind) for r in result.repairs] == [(Outcome.MARKED_MISSING, Kind.MISSING)]
        missing = repo.get_file("t/lost")
        assert (missing.state, missing.storage) == ("published", Storage.MISSING)
        with pytest.raises(ObjectMissingError, match=r"^t/lost: version \d+: object lost; see fsck"):
            missing.read_bytes()
        assert ObjectMissingError.errno == errno.EIO
        report = fsck.check(repo, quiet=True)
        assert [(f.kind, f.path) for f in report.findings] == [(Kind.MARKED_MISSING, "t/lost")]
        assert [r.outcome for r in fsck.repair(repo, report, quiet=True).repairs] == [Outcome.STILL_MISSING]

        # The other host still has a verified copy: its fsck --repair puts the object back.
        [done] = fsck.repair(other, fsck.check(other, quiet=True), quiet=True).repairs
        assert done.outcome == Outcome.REUPLOADED and "cache" in done.detail
        assert repo.get_file("t/lost").storage == Storage.UPLOADED
        assert repo.get_file("t/lost").read_bytes() == b"precious"
        assert fsck.check(repo, deep=True, quiet=True).clean
        other.close()


def test_repair_skips_a_version_purged_since_the_check(repo):
    f = publish(repo, "t/p", b"p")
    delete(repo, f.s3_key)
    report = fsck.check(repo, quiet=True)
    repo.db.run(lambda tx: tx.execute("UPDATE versions SET state = 'purged' WHERE id = ?", (f.id,)))  # as gc would
    [done] = fsck.repair(repo, report, quiet=True).repairs
    assert done.outcome == Outcome.SKIPPED and repo.store.head(f.s3_key) is None
    assert fsck.check(repo, quiet=True).clean  # a purged version's object is meant to be gone


# -- the command -------------------------------------------------------------------------------------


def run(*args: str, config: str):
    return subprocess.run([sys.executable, "-m", "s3repofs", *args, "--config", config], capture_output=True,
                          text=True, timeout=120)


def test_the_command_exit_status_json_and_repair(repo_config_pair, tmp_path):
    config = str(write_config(repo_config_pair, tmp_path / "s3repo.json"))
    assert run("init", config=config).returncode == 0
    clean = run("fsck", config=config)
    assert clean.returncode == 0 and "no findings" in clean.stdout, clean.stderr
    for name in ("kept", "lost"):
        (tmp_path / name).write_bytes(name.encode() * 50)
        assert run("add", str(tmp_path / name), f"t/{name}", "--publish", config=config).returncode == 0
    with S3Repo(repo_config_pair) as repo:
        kept, lost = repo.get_file("t/kept"), repo.get_file("t/lost")
        delete(repo, kept.s3_key)  # this host's cache keeps a copy (add put it there)
        delete(repo, lost.s3_key)
        repo.cache.object_path(lost.s3_key).unlink()  # and of this one none

    checked = run("fsck", config=config)
    assert checked.returncode == fsck.FINDINGS_EXIT_STATUS == 8, checked.stderr
    assert f"missing        t/kept  version {kept.id}  {kept.s3_key}  not in " in checked.stdout
    assert checked.stdout.splitlines()[-1] == "fsck of the whole repository: 2 versions, 0 objects: 2 missing"
    as_json = run("fsck", "t", "--json", config=config)
    assert as_json.returncode == 8
    report = json.loads(as_json.stdout)
    assert report["counts"] == {"missing": 2} and report["clean"] is False and report["repair"] is None
    assert {(f["kind"], f["path"], f["version"]) for f in report["findings"]} == {
        ("missing", "t/kept", kept.id), ("missing", "t/lost", lost.id)}

    repaired = run("fsck", "--repair", "--json", config=config)
    outcomes = {r["path"]: r["outcome"] for r in json.loads(repaired.stdout)["repair"]["repairs"]}
    assert outcomes == {"t/kept": "re-uploaded", "t/lost": "marked missing"}
    again = run("fsck", config=config)
    assert again.returncode == 8 and f"marked-missing t/lost  version {lost.id}" in again.stdout
    assert "t/kept" not in again.stdout

    listing = run("ls", "--state", "all", config=config).stdout.splitlines()
    assert [line.endswith("t/lost  [missing]") for line in listing] == [False, True]
    ls_json = json.loads(run("ls", "--state", "all", "--json", config=config).stdout)
    assert {f["path"]: f["storage"] for f in ls_json} == {"t/kept": "uploaded", "t/lost": "missing"}
    cat = run("cat", "t/lost", config=config)
    assert cat.returncode == 6 and cat.stderr.startswith("s3repofs: t/lost: version") and \
        "object lost; see fsck" in cat.stderr and cat.stderr.count("\n") == 1
    assert run("cat", "t/kept", config=config).stdout == "kept" * 50
    assert "--repair" in run("fsck", "--help", config=config).stdout


def test_versions_whose_rows_a_restore_lost_are_unrecorded_then_adopted_and_published_again(restored_behind,
                                                                                                  tmp_path):
    lost = restored_behind
    a1, b, a2 = lost.a1, lost.b, lost.a2
    config = str(write_config(lost.config, tmp_path / "restored.json"))
    checked = run("fsck", config=config)
    assert checked.returncode == 8, checked.stderr
    for v in (b, a2):
        assert (f"unrecorded     {v.path}  version {v.id}  {v.s3_key}  object describes version {v.id} of {v.path}; "
                "the database has no such version") in checked.stdout
    assert checked.stdout.splitlines()[-1].endswith("1 versions, 5 objects: 2 unrecorded")  # and a backup

    repaired = run("fsck", "--repair", config=config)
    assert repaired.returncode == 8, repaired.stderr  # what the check found; the next fsck says what is left
    assert (f"adopted        t/new/b  version {b.id}  adopted as expired: `s3repofs publish t/new/b` publishes it "
            "again") in repaired.stdout
    assert (f"adopted        t/a  version {a2.id}  adopted as expired: t/a has published version {a1.id}: "
            f"`s3repofs publish --version {a2.id} t/a` publishes this one instead") in repaired.stdout
    assert repaired.stdout.splitlines()[-1].startswith("repair: 0 re-uploaded") and "2 adopted" in repaired.stdout
    again = run("fsck", "--deep", config=config)
    assert again.returncode == 0 and "3 versions, 5 objects: no findings" in again.stdout, again.stdout + again.stderr

    with S3Repo(lost.config) as repo:
        for v in (b, a2):  # the row the object describes, under its original id
            adopted = repo.meta.get(v.id)
            assert (adopted.state, adopted.storage, adopted.s3_key, adopted.path) == ("expired", "uploaded", v.s3_key,
                                                                                      v.path)
            assert (adopted.size, adopted.md5, adopted.xxh3, adopted.created_at) == (v.size, v.md5, v.xxh3,
                                                                                      v.created_at)
            assert (adopted.origin_host, adopted.mode, adopted.uid, adopted.gid) == (v.origin_host, v.mode, v.uid,
                                                                                      v.gid)
        assert repo.get_dir(b.path.parent) is not None  # t/new, which only b's path made
        assert repo.get_file("t/new/b") is None  # nothing published behind the operator's back

    assert run("publish", "t/new/b", config=config).stdout == f"published t/new/b (version {b.id})\n"
    assert run("publish", "--version", str(a2.id), "t/a", config=config).returncode == 0
    with S3Repo(lost.config) as repo:
        repo.cache.clear()  # read from the store, verified against the adopted rows
        for path, data in lost.data.items():
            assert repo.get_file(path).read_bytes() == data
        fresh = repo.add_file(path="t/new/c").touch(b"after the adoption").publish()
        assert fresh.id > max(b.id, a2.id)
        assert fsck.check(repo, deep=True, quiet=True).clean


# -- through a mount ---------------------------------------------------------------------------------


@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3")
def test_a_repaired_file_reads_back_through_a_mount_and_a_lost_one_is_eio(repo_config_pair, tmp_path):
    config = repo_config_pair
    reader = {**config, "local_root": str(tmp_path / "reader-root"), "host_name": "reader"}  # an empty cache
    with mounted(config, tmp_path, "writer") as mnt:
        (mnt / "published" / "m").mkdir()
        (mnt / "published" / "m" / "kept").write_bytes(b"K" * 100_000)
        (mnt / "published" / "m" / "lost").write_bytes(b"L" * 100)
    with S3Repo(config) as repo:
        kept, lost = repo.get_file("m/kept"), repo.get_file("m/lost")
        overwrite(repo, kept.s3_key, b"k" * 100_000)  # corrupt, the same size
        delete(repo, lost.s3_key)
        repo.cache.object_path(lost.s3_key).unlink()
        report = fsck.check(repo, deep=True, quiet=True)
        assert found(report) == {(Kind.CORRUPT, "m/kept"), (Kind.MISSING, "m/lost")}
        outcomes = {r.finding.path: r.outcome for r in fsck.repair(repo, report, quiet=True).repairs}
        assert outcomes == {"m/kept": Outcome.REUPLOADED, "m/lost": Outcome.MARKED_MISSING}
    with mounted(reader, tmp_path, "reader") as mnt:
        assert (mnt / "published" / "m" / "kept").read_bytes() == b"K" * 100_000  # downloaded and verified
        with pytest.raises(OSError) as refused:
            (mnt / "published" / "m" / "lost").read_bytes()
        assert refused.value.errno == errno.EIO
        assert "m/lost: version" in daemon_log(tmp_path, "reader") and "object lost; see fsck" in \
            daemon_log(tmp_path, "reader")
