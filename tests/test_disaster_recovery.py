"""The four disasters of docs/disaster-recovery.md, each recovered by its documented command sequence.

An operator's view: every step is the `s3repofs` command in a subprocess, against real PostgreSQL and the
moto S3 server over HTTP, with the backups in a bucket of their own; damage is done to the bucket with
boto3 and to the database with DROP DATABASE, as a real disaster would; files read back through a mount
on a host with an empty cache, so their bytes come from the bucket.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from mount_helper import fuse_available, mounted, write_config

from s3repofs import S3Repo
from s3repofs.ops import backup as backup_ops

needs_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3")
FINDINGS = 8  # fsck's exit status when it found anything


@dataclass
class Host:
    """One machine of the repository: its own local_root (cache, staging) and host_name, one shared config."""

    name: str
    config: dict
    workdir: Path

    @property
    def config_path(self) -> str:
        return str(write_config(self.config, self.workdir / f"{self.name}.json"))

    def run(self, *args: str, status: int = 0) -> subprocess.CompletedProcess:
        """`s3repofs ARGS --config <this host's config>`, which must exit with `status`."""
        command = [sys.executable, "-m", "s3repofs", *args, "--config", self.config_path]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == status, f"s3repofs {' '.join(args)}: {result.returncode}\n{result.stderr}"
        assert "Traceback" not in result.stderr
        return result

    def point_at(self, **changes: str) -> None:
        """The operator edits the configuration (a new database, a new bucket)."""
        self.config = {**self.config, **changes}


@dataclass
class Site:
    """A repository on PostgreSQL and S3 with backups in their own bucket, and the hosts that use it."""

    request: pytest.FixtureRequest
    tmp_path: Path
    base: dict
    made_databases: list[str]
    made_buckets: list[str]

    def host(self, name: str, **changes: str) -> Host:
        config = {**self.base, "local_root": str(self.tmp_path / f"{name}-root"), "host_name": name, **changes}
        return Host(name, config, self.tmp_path)

    @property
    def postgres(self):
        return self.request.getfixturevalue("postgres_server")

    @property
    def s3(self):
        return self.request.getfixturevalue("s3_server")

    def new_database(self) -> str:
        name = f"dr_{uuid.uuid4().hex}"
        self.made_databases.append(name)
        return self.postgres.create_database(name)

    def lose_database(self) -> None:
        self.postgres.drop_database(self.base["database"].rpartition("/")[2])

    def new_bucket(self) -> str:
        name = f"dr-{uuid.uuid4().hex}"
        self.made_buckets.append(name)
        self.s3.create_bucket(name)
        return name

    def lose_bucket(self, bucket: str) -> None:
        """Every object deleted and the bucket itself gone (as a deleted account or region would leave it)."""
        self.s3.delete_bucket(bucket)

    def new_host_reads(self, host: Host, files: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, int]]:
        """Mount as `host` (an empty cache) and read every file: what read back, and the errno of what did not."""
        read, failed = {}, {}
        with mounted(host.config, self.tmp_path, host.name) as mnt:
            for path in files:
                try:
                    read[path] = (mnt / "published" / path).read_bytes()
                except OSError as exc:
                    failed[path] = exc.errno
        return read, failed


@pytest.fixture
def site(request, tmp_path, s3_server):
    from repo_fixtures import make_config

    backups = f"dr-backups-{uuid.uuid4().hex}"
    s3_server.create_bucket(backups)
    base = {**make_config(request, tmp_path, "postgres-s3"), "backup_s3_bucket": backups}
    made = Site(request, tmp_path, base, [], [backups])
    yield made
    for name in made.made_databases:
        made.postgres.drop_database(name)
    for name in made.made_buckets:
        s3_server.delete_bucket(name)


def publish(host: Host, files: dict[str, bytes]) -> None:
    """What happened before the disaster (not part of the recovery): through the API, a subprocess each is slow."""
    with S3Repo(host.config) as repo:
        repo.create_repository()
        for path, data in files.items():
            repo.add_file(path=path).touch(data).publish()


def read_on(host: Host, *paths: str) -> dict[str, bytes]:
    """Read published files on `host`, as its users would; its cache keeps a verified copy of each."""
    with S3Repo(host.config) as repo:
        return {path: repo.require_file(path).read_bytes() for path in paths}


def back_up(host: Host) -> None:
    with S3Repo(host.config) as repo:
        backup_ops.backup(repo)


def published(host: Host) -> dict[str, dict]:
    return {f["path"]: f for f in json.loads(host.run("ls", "--json").stdout)}


def repaired(host: Host) -> dict[str, str]:
    """`fsck --repair` on `host`: path -> outcome (re-uploaded, marked missing, ...)."""
    report = json.loads(host.run("fsck", "--repair", "--json", status=FINDINGS).stdout)
    return {r["path"]: r["outcome"] for r in report["repair"]["repairs"]}


def host_lost(host: Host) -> None:
    """The host's disk is gone: its cache and staging with it."""
    shutil.rmtree(host.config["local_root"])


FILES = {f"story_data/2026/{name}": bytes([i]) * (700 * i + 3) for i, name in enumerate(("a.csv", "b.csv", "c/d.json"))}


A, B, D = FILES


# -- 1. the database is lost; backups exist -----------------------------------------------------------------


@needs_fuse
def test_database_lost_restore_the_newest_backup_into_a_new_database(site):
    writer = site.host("writer")
    publish(writer, FILES)
    made = writer.run("backup").stdout.split()[1].rstrip(":")
    publish(writer, {"story_data/2026/late.csv": b"written after the backup"})
    with S3Repo(writer.config) as repo:
        late_key = repo.get_file("story_data/2026/late.csv").s3_key

    site.lose_database()
    lost = writer.run("status", status=5)  # how you notice: every command, and every mount's log, says so
    assert lost.stderr.startswith("s3repofs: ") and lost.stderr.count("\n") == 1

    listed = json.loads(writer.run("backup", "list", "--json").stdout)["backups"]
    assert [b["name"] for b in listed] == [made]  # listed from the backup bucket: no database needed
    target = site.new_database()
    assert f"restore backup {made}" in writer.run("restore", "--to", target, "--dry-run").stdout
    writer.run("restore", "--to", target)
    writer.point_at(database=target)
    assert "3 published" in writer.run("status").stdout

    reader = site.host("reader", database=target)
    read, failed = site.new_host_reads(reader, {**FILES, "story_data/2026/late.csv": b""})
    assert read == FILES  # every published file, byte for byte, from the bucket
    assert failed == {"story_data/2026/late.csv": errno.ENOENT}  # written after the backup: not in it

    # its object is still in the bucket, and describes itself: fsck names it (its kind: orphan, or once fsck
    # adopts such objects, unrecorded), with the path it describes
    after = writer.run("fsck", status=FINDINGS).stdout
    assert [line for line in after.splitlines() if late_key in line and "story_data/2026/late.csv" in line]
    assert writer.run("backup").returncode == 0  # a backup of the restored database, at once


# -- 2. objects missing or wrong in the bucket ------------------------------------------------------------


def test_a_deleted_and_an_overwritten_object_are_found_repaired_from_a_cache_or_marked_missing(site):
    writer, ops = site.host("writer"), site.host("ops")
    publish(writer, FILES)
    host_lost(writer)
    read_on(ops, A)  # this host's cache now holds a verified copy of A
    with S3Repo(ops.config) as repo:
        a, b = repo.get_file(A).s3_key, repo.get_file(B).s3_key
    s3, bucket = site.s3.client(), site.base["default_s3_bucket"]
    s3.put_object(Bucket=bucket, Key=a, Body=b"X" * len(FILES[A]))  # overwritten, the same size
    s3.delete_object(Bucket=bucket, Key=b)

    quick = json.loads(ops.run("fsck", "--json", status=FINDINGS).stdout)
    assert [(f["kind"], f["path"]) for f in quick["findings"]] == [("missing", B)]  # a HEAD sees sizes only
    deep = json.loads(ops.run("fsck", "--deep", "--json", status=FINDINGS).stdout)
    assert {(f["kind"], f["path"]) for f in deep["findings"]} == {("corrupt", A), ("missing", B)}

    report = json.loads(ops.run("fsck", "--deep", "--repair", "--json", status=FINDINGS).stdout)
    assert {r["path"]: r["outcome"] for r in report["repair"]["repairs"]} == {A: "re-uploaded", B: "marked missing"}

    again = json.loads(ops.run("fsck", "--deep", "--json", status=FINDINGS).stdout)
    assert [(f["kind"], f["path"]) for f in again["findings"]] == [("marked-missing", B)]
    listing = ops.run("ls", "--state", "all").stdout
    assert f"{B}  [missing]" in listing and f"{A}  [" not in listing
    fresh = site.host("fresh")  # an empty cache: A's bytes come from the bucket again
    assert fresh.run("cat", A).stdout.encode() == FILES[A]
    assert "object lost; see fsck" in fresh.run("cat", B, status=6).stderr


# -- 3. the bucket is lost; the database is intact -------------------------------------------------------


def test_bucket_lost_what_the_hosts_hold_is_uploaded_again_the_rest_is_marked_missing(site):
    writer, ops = site.host("writer"), site.host("ops")
    publish(writer, FILES)
    host_lost(writer)
    read_on(ops, A)
    back_up(ops)

    bucket = site.base["default_s3_bucket"]
    site.lose_bucket(bucket)
    site.s3.create_bucket(bucket)  # the same name again: no configuration changes
    assert json.loads(ops.run("fsck", "--json", status=FINDINGS).stdout)["counts"] == {"missing": 3}
    # every backup names the objects that are gone: no backup is intact, a restore cannot help
    no_backup = ops.run("restore", "--newest-intact", "--to", site.new_database(), "--dry-run", status=6)
    assert "is intact" in no_backup.stderr

    assert repaired(ops) == {A: "re-uploaded", B: "marked missing", D: "marked missing"}
    assert read_on(site.host("fresh"), A) == {A: FILES[A]}


# -- 4. the database and the bucket are both lost -----------------------------------------------------------


@needs_fuse
def test_both_lost_restore_into_a_new_database_and_refill_a_new_bucket_from_the_hosts(site):
    writer, ops = site.host("writer"), site.host("ops")
    publish(writer, FILES)
    host_lost(writer)
    read_on(ops, B)
    back_up(ops)  # into backup_s3_bucket, which survives

    site.lose_database()
    site.lose_bucket(site.base["default_s3_bucket"])
    target, bucket = site.new_database(), site.new_bucket()
    ops.run("restore", "--to", target)
    ops.point_at(database=target, default_s3_bucket=bucket)
    assert repaired(ops) == {A: "marked missing", B: "re-uploaded", D: "marked missing"}

    reader = site.host("reader", database=target, default_s3_bucket=bucket)
    read, failed = site.new_host_reads(reader, FILES)
    assert read == {B: FILES[B]}
    assert failed == {A: errno.EIO, D: errno.EIO}


def test_database_and_every_backup_lost_rebuild_from_the_bucket(site):
    writer = site.host("writer")
    publish(writer, {A: b"an older version"})
    publish(writer, FILES)  # A again: the older version is expired
    with S3Repo(writer.config) as repo:
        before = {str(f.path): (f.id, f.md5) for f in repo.list_files("", ("published",))}
    assert {path: md5 for path, (_, md5) in before.items()} == {p: hashlib.md5(d).hexdigest() for p, d in FILES.items()}

    site.lose_database()  # and there are no backups
    assert json.loads(writer.run("backup", "list", "--json").stdout)["backups"] == []
    target = site.new_database()
    assert json.loads(writer.run("rebuild", "--to", target, "--dry-run", "--json").stdout)["versions"] == 4
    done = writer.run("rebuild", "--to", target)
    assert "wrote 4 versions (3 published, 1 expired)" in done.stdout and "not recorded in any object" in done.stdout
    writer.point_at(database=target)
    assert {path: (f["version"], f["md5"]) for path, f in published(writer).items()} == before
    assert read_on(site.host("fresh", database=target), *FILES) == FILES
