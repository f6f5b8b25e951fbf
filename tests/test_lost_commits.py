"""Transactions whose COMMIT went through but whose answer was lost on the way back.

``Database.run`` reconnects and runs such a transaction again. The answers are lost for real: a
proxy between the repository and PostgreSQL lets the server run the query to the end, then breaks
the connection before its answer arrives (``pg_proxy``). SQLite runs in-process and loses no answers.
"""

from __future__ import annotations

import os

import pytest
from mount_helper import fuse_available, mounted
from pg_proxy import AnswerLosingProxy

from s3repofs import S3Repo
from s3repofs.domain.content import file_content
from s3repofs.domain.paths import DirPath, RepoPath
from s3repofs.errors import DatabaseUnavailableError, OutcomeUnknownError


@pytest.fixture
def proxy(postgres_server):
    proxy = AnswerLosingProxy(postgres_server.host, postgres_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def repo(proxy, pg_url, tmp_path):
    config = {"local_root": str(tmp_path / "root"), "host_name": "test-host", "object_dir": str(tmp_path / "objects"),
              "database": proxy.url(pg_url)}
    repo = S3Repo(config)
    repo.create_repository()
    yield repo
    repo.close()


def lost(proxy: AnswerLosingProxy, text: str = "COMMIT"):
    """Arm the proxy: the next query containing ``text`` runs, and its answer is lost."""
    proxy.lose_answer_to(text)
    return proxy


def test_rm_whose_commit_answer_was_lost_succeeds(repo, proxy):
    rf = repo.add_file(path="t/f").touch("bytes").publish()
    lost(proxy)
    expired = repo.expire(rf.version)  # was LifecycleError (EPERM): the re-run found it expired
    assert proxy.lost == 1
    assert expired.state == "expired" and repo.get_file("t/f") is None


def test_a_new_version_whose_insert_answer_was_lost_is_that_row_with_its_staged_file(repo, proxy):
    lost(proxy, "INSERT INTO versions")
    rf = repo.add_file(path="t/f")  # was a raw IntegrityError on s3_key, and no staged file
    assert proxy.lost == 1
    assert [v.id for v in repo.meta.history(RepoPath.parse("t/f"))] == [rf.id]
    rf.touch("bytes").publish()
    assert repo.get_file("t/f").read_bytes() == b"bytes"


def staged(repo, path: str = "t/f", data: bytes = b"bytes"):
    return repo.add_file(path=path).touch(data)


# Every other write transaction, each losing the answer to the statement that commits it (the
# marker given to ``lose``): it succeeds, and leaves what running it once leaves.

def discard(repo, lose):
    rf = staged(repo)
    lose("COMMIT")
    assert repo.discard(rf.version).state == "discarded"


def upload(repo, lose):
    rf = staged(repo)
    lose("COMMIT")
    version = repo.upload(rf.version)
    assert (version.storage, version.size) == ("uploaded", 5)


def publish_staged(repo, lose):
    old = staged(repo).publish()
    rf = staged(repo, data=b"newer")
    content = file_content(repo.cache.staging_path(rf.s3_key))
    repo.store.put(rf.s3_key, repo.cache.staging_path(rf.s3_key), content.size, content.md5, {})
    lose("AND EXISTS")  # its one round trip
    published, expired = repo.meta.publish_staged(rf.version, content)
    assert published.state == "published" and expired.id == old.id and old.refresh().state == "expired"


def publish_at_another_path(repo, lose):
    old = staged(repo, "t/g").publish()
    rf = staged(repo).upload()
    lose("COMMIT")
    published, expired = repo.meta.publish(rf.id, RepoPath.parse("t/g"))
    assert str(published.path) == "t/g" and published.state == "published" and expired.id == old.id


def republish(repo, lose):
    old = staged(repo).publish()
    current = staged(repo, data=b"newer").publish()
    lose("COMMIT")
    published, expired = repo.meta.publish(old.id)
    assert published.state == "published" and expired.id == current.id


def move_unpublished(repo, lose):
    rf = staged(repo)
    lose("COMMIT")
    assert str(repo.meta.move_unpublished(rf.id, RepoPath.parse("t/g")).path) == "t/g"


def set_publish_pending(repo, lose):
    rf = staged(repo)
    lose("COMMIT")
    repo.meta.set_publish_pending(rf.id, True)
    assert rf.refresh().version.publish_pending == 1


def set_attrs(repo, lose):
    rf = staged(repo)
    lose("COMMIT")
    assert repo.meta.set_attrs(rf.id, mode=0o600).mode == 0o600


def set_tag(repo, lose):
    rf = staged(repo)
    lose("COMMIT")
    rf.tag("k", "v")
    assert rf.tags == {"k": "v"}


def make_dir(repo, lose):
    lose("COMMIT")
    assert repo.meta.make_dir(DirPath.parse("t/d"), 0o700).explicit


def set_dir_attrs(repo, lose):
    repo.meta.make_dir(DirPath.parse("t/d"))
    lose("COMMIT")
    assert repo.meta.set_dir_attrs(DirPath.parse("t/d"), mode=0o700).mode == 0o700


def remove_dir(repo, lose):
    repo.meta.make_dir(DirPath.parse("t/d"))
    lose("COMMIT")
    repo.meta.remove_dir(DirPath.parse("t/d"))  # was NotFoundError (ENOENT): the re-run found it gone
    assert repo.meta.get_dir(DirPath.parse("t/d")) is None


def register_host(repo, lose):
    lose("COMMIT")
    repo.meta.register_host("other-host")
    assert [h["name"] for h in repo.meta.hosts()] == ["other-host", "test-host"]


def create_schema(repo, lose):
    lose("COMMIT")
    repo.meta.create_schema()
    assert repo.meta.schema_version() > 0


@pytest.mark.parametrize("operation", [discard, upload, publish_staged, publish_at_another_path, republish,
                                       move_unpublished, set_publish_pending, set_attrs, set_tag, make_dir,
                                       set_dir_attrs, remove_dir, register_host, create_schema],
                         ids=lambda f: f.__name__)
def test_every_write_transaction_whose_commit_answer_was_lost_succeeds_once(repo, proxy, operation):
    operation(repo, proxy.lose_answer_to)
    assert proxy.lost == 1


def test_a_new_version_whose_insert_outcome_is_unknown_keeps_its_staged_file(repo, proxy):
    proxy.lose_answer_to("INSERT INTO versions")
    proxy.refusing = True  # and the database is gone before the re-run can ask
    with pytest.raises(OutcomeUnknownError):
        repo.add_file(path="t/f")
    proxy.refusing = False
    (version,) = repo.meta.history(RepoPath.parse("t/f"))  # it had committed
    assert repo.cache.staging_path(version.s3_key).exists()  # was missing: a row with no staged file


def test_a_new_version_whose_insert_failed_leaves_no_staged_file(repo, proxy):
    proxy.refusing = True
    repo.db.close()  # no pooled connection: the insert cannot even start
    with pytest.raises(DatabaseUnavailableError):
        repo.add_file(path="t/f")
    assert not any((repo.config.local_root / "staging").iterdir())


@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3 (./scripts/setup)")
def test_through_a_mount_creates_and_rm_whose_commit_answers_were_lost_succeed(proxy, pg_url, tmp_path):
    config = {"local_root": str(tmp_path / "root"), "host_name": "test-host", "object_dir": str(tmp_path / "objects"),
              "database": proxy.url(pg_url)}
    with mounted(config, tmp_path) as mnt:  # and no traceback in its log (was a raw IntegrityError)
        os.mkdir(mnt / "published/docs")
        proxy.lose_answer_to("INSERT INTO versions")
        (mnt / "published/docs/f").write_bytes(b"bytes")  # was EIO
        proxy.lose_answer_to("COMMIT")
        os.unlink(mnt / "published/docs/f")  # was EPERM
        assert proxy.lost == 2
        assert (mnt / "expired/docs/f").read_bytes() == b"bytes"
