"""``s3repofs rebuild``: the metadata written again from the bucket alone reproduces every published
path, version id and md5, and says what it could not know."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
from test_cli import assert_clean_failure, run

from s3repofs import S3Repo
from s3repofs.config import load_config
from s3repofs.domain.paths import DirPath
from s3repofs.ops.rebuild import rebuild


@pytest.fixture
def empty_url(repo_config_pair, tmp_path, request):
    """The URL of an empty database of the same engine as the repository's (the one a disaster left)."""
    if repo_config_pair["database"].startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'rebuilt.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    name = f"rebuilt_{uuid.uuid4().hex}"
    yield server.create_database(name)
    server.drop_database(name)


def _fill(repo: S3Repo) -> dict[str, bytes]:
    """A repository with history; what each path's published version holds."""
    repo.add_file(path="t/a.txt").touch("first").publish()
    repo.add_file(path="t/a.txt").touch("second").publish()  # expires the first
    repo.add_file(path="t/deep/er/b.bin", mode=0o600).touch("b" * 1000).publish()
    repo.add_file(path="u/c").touch("c").upload()  # uploaded, never published
    repo.add_file(path="u/staged").touch("only on this host")  # no object: cannot come back
    repo.add_file(path="u/gone").touch("x").publish().expire()
    return {"t/a.txt": b"second", "t/deep/er/b.bin": b"b" * 1000}


def _published(repo: S3Repo) -> dict[str, tuple[int, str]]:
    return {str(f.path): (f.id, f.md5) for f in repo.list_files("", ("published",))}


def test_rebuild_reproduces_every_published_path_version_and_md5(repo_config_pair, empty_url):
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        contents = _fill(repo)
        before = _published(repo)
        history = {f.id: (str(f.path), f.md5, f.version.mode) for f in repo.list_files("", ("published", "expired"))}

    report = rebuild(load_config(repo_config_pair), empty_url, quiet=True)
    assert (report.objects, report.versions, report.skipped, dict(report.defaulted)) == (5, 5, [], {})

    with S3Repo({**repo_config_pair, "database": empty_url}) as rebuilt:
        after = _published(rebuilt)
        # the newest of each path is published: the two that were, and two whose newest was not
        assert {path: after[path] for path in before} == before
        assert set(after) == {*before, "u/c", "u/gone"}
        for path, data in contents.items():
            assert rebuilt.require_file(path).read_bytes() == data
        again = {f.id: (str(f.path), f.md5, f.version.mode) for f in rebuilt.list_files("", ("published", "expired"))}
        assert {i: again[i] for i in history} == history  # ids, paths, md5s and modes as they were
        assert len(again) == len(history) + 1  # and the uploaded, never published u/c
        assert rebuilt.get_file("t/a.txt", "expired").read_bytes() == b"first"
        assert [d.dir for d in rebuilt.list_subdirs(DirPath.parse("t/deep"))] == ["deep/er"]
        newer = rebuilt.add_file(path="t/new").touch("n").publish()  # ids continue past the rebuilt ones
        assert newer.id > max(history)


def test_objects_from_before_the_full_description_get_defaults_and_foreign_ones_are_skipped(
        repo_config_pair, empty_url):
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        rf = repo.add_file(path="t/old", mode=0o640).touch("old").publish()
        _strip_description(repo, rf.version.s3_key, ("created", "mode"))
        _copy(repo, rf.version.s3_key, "t/copy")  # the one listed first keeps the id (S3 lists by key; a directory not)
        _put_foreign(repo, "t/not-ours")
        cut = repo.add_file(path="t/cut").touch("whole").publish()
        _truncate(repo, cut.version.s3_key)
    report = rebuild(load_config(repo_config_pair), empty_url, quiet=True)
    assert dict(report.defaulted) == {"created": 2, "mode": 2}  # the object and its copy
    skipped = {s["key"]: s["why"] for s in report.skipped}
    claimed = {key for key in (rf.version.s3_key, "t/copy") if key in skipped}
    assert len(claimed) == 1 and skipped.pop(claimed.pop()) == f"version id {rf.id} is claimed by another object"
    assert skipped == {"t/not-ours": "no self-description",
                       cut.version.s3_key: "holds 2 bytes, its description says 5: incomplete or overwritten"}
    with S3Repo({**repo_config_pair, "database": empty_url}) as rebuilt:
        old = rebuilt.require_file("t/old")
        assert (old.version.mode, old.read_bytes()) == (0o644, b"old")


def _strip_description(repo: S3Repo, key: str, names: tuple[str, ...]) -> None:
    """Make an object look as one stored before these description fields existed."""
    if repo.config.object_dir is not None:
        meta = repo.config.object_dir / "meta" / (key + ".json")
        description = json.loads(meta.read_text())
        meta.write_text(json.dumps({k: v for k, v in description.items() if k not in names}))
        return
    client = repo.store.client
    metadata = client.head_object(Bucket=repo.store.bucket, Key=key)["Metadata"]
    client.copy_object(Bucket=repo.store.bucket, Key=key, CopySource={"Bucket": repo.store.bucket, "Key": key},
                       MetadataDirective="REPLACE",
                       Metadata={k: v for k, v in metadata.items() if k.removeprefix("s3repo-") not in names})


def _copy(repo: S3Repo, key: str, to: str) -> None:
    """Copy an object, description and all, to another key."""
    if repo.config.object_dir is not None:
        for kind, suffix in (("data", ""), ("meta", ".json")):
            source = repo.config.object_dir / kind / (key + suffix)
            (repo.config.object_dir / kind / (to + suffix)).write_bytes(source.read_bytes())
        return
    bucket = repo.store.bucket
    repo.store.client.copy_object(Bucket=bucket, Key=to, CopySource={"Bucket": bucket, "Key": key})


def _truncate(repo: S3Repo, key: str) -> None:
    """Cut an object to its first two bytes, keeping its description."""
    if repo.config.object_dir is not None:
        (repo.config.object_dir / "data" / key).write_bytes(b"wh")
        return
    metadata = repo.store.client.head_object(Bucket=repo.store.bucket, Key=key)["Metadata"]
    repo.store.client.put_object(Bucket=repo.store.bucket, Key=key, Body=b"wh", Metadata=metadata)


def _put_foreign(repo: S3Repo, key: str) -> None:
    if repo.config.object_dir is not None:
        data = repo.config.object_dir / "data" / key
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_bytes(b"someone else's")
        return
    repo.store.client.put_object(Bucket=repo.store.bucket, Key=key, Body=b"someone else's")


def test_rebuild_refuses_a_database_that_holds_a_repository(repo_config_pair):
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        repo.add_file(path="t/a").touch("a").publish()
        with pytest.raises(Exception, match="already holds a repository"):
            rebuild(repo, repo.config.database_url, quiet=True)
        assert len(repo.list_files("t")) == 1  # untouched


def test_the_command_dry_run_writes_nothing_and_json_reports(repo_config_pair, empty_url, tmp_path):
    config = tmp_path / "s3repo.json"
    config.write_text(json.dumps(repo_config_pair))
    config.chmod(0o600)
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
        repo.add_file(path="t/a").touch("a").publish()
    dry = run("rebuild", "--to", empty_url, "--dry-run", "--json", config=str(config))
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["versions"] == 1
    with S3Repo({**repo_config_pair, "database": empty_url}) as target:
        assert target.meta.schema_version() == 0  # nothing written
        target.db.close()
    done = run("rebuild", "--to", empty_url, config=str(config))
    assert done.returncode == 0, done.stderr
    assert b"wrote 1 versions (1 published, 0 expired)" in done.stdout
    assert b"not recorded in any object" in done.stdout
    assert_clean_failure(run("rebuild", "--to", empty_url, config=str(config)), 1, "already holds a repository")
    with S3Repo({**repo_config_pair, "database": empty_url}) as rebuilt:
        assert rebuilt.require_file("t/a").md5 == hashlib.md5(b"a").hexdigest()
