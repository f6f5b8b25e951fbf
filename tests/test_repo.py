"""The domain API, against SQLite and PostgreSQL, a local object directory and an S3 server."""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import threading

import pytest
import xxhash
from mount_helper import wait_for
from repo_fixtures import back_to_schema_1

import s3repofs
from s3repofs import S3Repo
from s3repofs.domain.content import Content
from s3repofs.domain.paths import MAX_PATH_BYTES, DirPath, RepoPath
from s3repofs.errors import LifecycleError, NameTooLongError, ReadOnlyError, RepoError, VerificationError
from s3repofs.meta import schema
from s3repofs.meta.schema import SCHEMA_VERSION
from s3repofs.objects.s3 import S3Store


def test_the_readme_example_round_trips(repo_config):
    repo = s3repofs.S3Repo(config=repo_config)
    repo.create_repository()
    rf = repo.add_file(file_type="story_data")
    assert rf.state == "unpublished" and rf.path.startswith("story_data/")
    rf = repo.add_file(path="story_data/2026/11/a.json")
    rf.touch("contents")
    rf.publish()
    repo.commit()
    cur = repo.get_file("story_data/2026/11/a.json")
    with cur.open() as f:
        assert f.read() == "contents"
    assert cur.md5 == hashlib.md5(b"contents").hexdigest() and cur.file_size == 8
    assert cur.origin_host == "test-host" and cur.published_at is not None
    stored = repo.store.head(cur.s3_key)
    assert stored.size == 8
    assert stored.description["md5"] == cur.md5 and stored.description["path"] == "story_data/2026/11/a.json"
    cur.expire()
    assert repo.get_file("story_data/2026/11/a.json") is None
    repo.close()


def test_s3_object_holds_exactly_the_bytes_written(repo_config):
    if "default_s3_bucket" not in repo_config:
        pytest.skip("S3 only")
    with S3Repo(repo_config) as repo:
        repo.create_repository()
        data = bytes(range(256)) * 1000
        rf = repo.add_file(path="raw/blob.bin")
        rf.touch(data)
        rf.publish()
        assert isinstance(repo.store, S3Store)
        body = repo.store.client.get_object(Bucket=rf.bucket, Key=rf.s3_key)["Body"].read()
        assert body == data and hashlib.md5(body).hexdigest() == rf.md5


def test_publish_expires_the_previous_version(repo):
    first = repo.add_file(path="t/a.txt").touch("one").publish()
    second = repo.add_file(path="t/a.txt").touch("two").publish()
    assert first.refresh().state == "expired" and first.expired_at is not None
    assert second.state == "published"
    assert repo.get_file("t/a.txt").id == second.id
    assert repo.get_file("t/a.txt").read_bytes() == b"two"
    assert first.read_bytes() == b"one"  # an expired version is still readable


def test_expired_version_can_be_republished(repo):
    first = repo.add_file(path="t/a.txt").touch("one").publish()
    second = repo.add_file(path="t/a.txt").touch("two").publish()
    first.publish()
    assert first.state == "published" and second.refresh().state == "expired"


def content_of(data: bytes) -> Content:
    return Content(len(data), hashlib.md5(data).hexdigest(), xxhash.xxh3_128(data).hexdigest())


def test_publishing_a_stale_copy_of_a_staged_version_follows_its_row(repo):
    """publish_staged trusts the caller's copy only as far as the row still matches it."""
    old = repo.add_file(path="t/old.txt").touch("old").publish()
    rf = repo.add_file(path="t/a.txt").touch("moved")
    stale = rf.version
    repo.meta.move_unpublished(rf.id, RepoPath.parse("t/b.txt"))
    published, expired = repo.meta.publish_staged(stale, content_of(b"moved"))
    assert str(published.path) == "t/b.txt" and published.state == "published" and expired is None
    assert repo.get_file("t/a.txt") is None and old.refresh().state == "published"
    gone = repo.add_file(path="t/old.txt").touch("new")
    repo.discard(gone.version)
    with pytest.raises(LifecycleError):
        repo.meta.publish_staged(gone.version, content_of(b"new"))
    assert old.refresh().state == "published"  # the expiry of the current version was rolled back


def test_publishing_a_staged_version_expires_the_current_one_in_the_same_transaction(repo):
    first = repo.add_file(path="t/a.txt").touch("one").publish()
    rf = repo.add_file(path="t/a.txt").touch("two")
    published, expired = repo.meta.publish_staged(rf.version, content_of(b"two"))
    assert expired.id == first.id and expired.state == "expired" and first.refresh().state == "expired"
    assert published.state == "published" and repo.get_file("t/a.txt").id == rf.id
    assert published.storage == "uploaded" and published.size == 3 and published.uploaded_at is not None


def test_a_version_not_uploaded_cannot_be_published_by_the_metadata_layer(repo):
    rf = repo.add_file(path="t/a.txt").touch("x")
    with pytest.raises(LifecycleError, match="not uploaded"):
        repo.meta.publish(rf.id)
    assert rf.refresh().state == "unpublished"


def test_published_content_is_immutable(repo):
    rf = repo.add_file(path="t/a.txt").touch("x").publish()
    with pytest.raises(ReadOnlyError):
        rf.touch("y")
    assert rf.read_bytes() == b"x"


def test_publish_under_a_new_path_moves_the_version(repo):
    rf = repo.add_file(path="t/draft.txt").touch("x")
    rf.publish("t/final/report.txt")
    assert repo.get_file("t/final/report.txt").id == rf.id
    assert repo.get_file("t/draft.txt", "unpublished") is None


def test_listing_shows_published_versions_by_directory(repo):
    for name in ("b", "a", "c"):
        repo.add_file(path=f"t/d/{name}").touch(name).publish()
    repo.add_file(path="t/d/unpub").touch("u")
    repo.add_file(path="t/other/x").touch("x").publish()
    from s3repofs.domain.paths import DirPath

    listed = repo.meta.list_dir(DirPath("t", "d"), "published")
    assert [v.name for v in listed] == ["a", "b", "c"]
    assert [v.name for v in repo.meta.list_subdirs(DirPath("t", ""))] == ["d", "other"]
    assert [f.path for f in repo.list_files("t/d", ("unpublished",))] == ["t/d/unpub"]


def random_path(size: int, seed: int = 8) -> str:
    """A path of exactly ``size`` bytes: type ``t``, then names of 200 random characters, some of them not
    ASCII, that nothing compresses (PostgreSQL compresses long index entries before it refuses them)."""
    chance = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-é中"
    parts = ["t"]
    while (left := size - len("/".join(parts).encode()) - 1) > 0:
        name = ""
        while len(name.encode()) < min(200, left) - 2:
            name += chance.choice(alphabet)
        parts.append(name + "x" * (min(200, left) - len(name.encode())))
    path = "/".join(parts)
    assert len(path.encode()) == size
    return path


def test_a_path_of_path_max_bytes_of_random_names_works_everywhere(repo):
    path = random_path(MAX_PATH_BYTES)
    at = RepoPath.parse(path)
    first = repo.add_file(path=path).touch("deep").publish()
    second = repo.add_file(path=path).touch("deeper").publish()  # the path's lock, the unique index
    assert repo.get_file(path).read_bytes() == b"deeper"
    assert [(v.id, v.state) for v in repo.meta.history(at)] == [(first.id, "expired"), (second.id, "published")]
    assert [v.name for v in repo.meta.list_dir(at.parent, "published")] == [at.name]
    parent = DirPath(at.file_type, at.parent.parent_dir)
    assert [d.dir for d in repo.meta.list_subdirs(parent)] == [at.dir]
    assert repo.meta.make_dir(at.parent).explicit
    assert [f.path for f in repo.list_files(str(at.parent))] == [path, path]
    assert repo.store.head(second.s3_key).description["path"] == path  # the object still describes itself
    second.expire()
    assert repo.get_version(first.id).publish().state == "published"
    with pytest.raises(NameTooLongError):
        repo.add_file(path=random_path(MAX_PATH_BYTES + 1))


def test_a_repository_of_schema_2_takes_paths_of_path_max_bytes_once_migrated(repo_config_pair, monkeypatch):
    """Migration 4 re-indexes PostgreSQL's path columns; rows and their uniqueness survive it."""
    with S3Repo(repo_config_pair) as repo:
        monkeypatch.setattr(schema, "SCHEMA_VERSION", 2)
        repo.meta.create_schema()
        monkeypatch.undo()
        old = repo.add_file(path="t/d/old.txt").touch("old").publish()
        repo.meta.make_dir(DirPath("t", "empty"))
        assert repo.meta.create_schema() == SCHEMA_VERSION
        newer = repo.add_file(path="t/d/old.txt").touch("newer").publish()
        assert repo.get_version(old.id).state == "expired" and repo.get_file("t/d/old.txt").id == newer.id
        assert [d.dir for d in repo.meta.list_subdirs(DirPath("t", ""))] == ["d", "empty"]
        path = random_path(MAX_PATH_BYTES)
        repo.add_file(path=path).touch("deep").publish()
        assert repo.get_file(path).read_bytes() == b"deep"


def test_a_corrupt_object_is_refused_and_never_cached(repo):
    rf = repo.add_file(path="t/a.txt").touch("good bytes").publish()
    repo.cache.clear()
    tampered = repo.store.head(rf.s3_key)
    staged = repo.config.local_root / "evil"
    staged.write_bytes(b"evil bytes")
    import hashlib as h

    repo.store.put(rf.s3_key, staged, 10, h.md5(b"evil bytes").hexdigest(), tampered.description)
    with pytest.raises(VerificationError, match="xxh3"):
        repo.get_file("t/a.txt").read_bytes()
    assert not repo.cache.has(rf.s3_key)
    repo.db.run(lambda tx: tx.execute("UPDATE versions SET xxh3 = NULL WHERE id = ?", (rf.id,)))
    with pytest.raises(VerificationError, match="md5"):  # rows from before schema 2 have no xxh3
        repo.get_file("t/a.txt").read_bytes()
    assert not repo.cache.has(rf.s3_key)


def test_a_repository_of_schema_1_is_migrated_on_first_use(repo_config):
    with S3Repo(repo_config) as repo:
        repo.create_repository()
        old = repo.add_file(path="t/old.txt").touch("old").publish()

        repo.db.run(back_to_schema_1)
    with S3Repo(repo_config) as repo:
        assert repo.get_file("t/old.txt").read_bytes() == b"old"
        assert repo.meta.schema_version() == SCHEMA_VERSION and repo.get_file("t/old.txt").version.xxh3 is None
        new = repo.add_file(path="t/new.txt").touch("new").publish()
        assert new.version.xxh3 == xxhash.xxh3_128(b"new").hexdigest() and old.id != new.id


def test_reading_fetches_into_the_cache_once(repo):
    rf = repo.add_file(path="t/a.txt").touch("abc").publish()
    repo.cache.clear()
    assert not repo.cache.has(rf.s3_key)
    assert repo.get_file("t/a.txt").read_bytes() == b"abc"
    assert repo.cache.has(rf.s3_key)


def test_tags_are_stored_per_version(repo):
    rf = repo.add_file(path="t/a.txt").touch("abc")
    rf.tag("source", "crawler")
    assert rf.tags == {"source": "crawler"}


def test_schema_creation_is_idempotent(repo):
    repo.create_repository()
    assert repo.meta.schema_version() == SCHEMA_VERSION


def test_an_uninitialized_repository_says_so(repo_config):
    with S3Repo(repo_config) as repo:
        with pytest.raises(RepoError, match="s3repofs init"):
            repo.get_file("t/a.txt")


def _publish_many(config: dict, worker: int, count: int, barrier) -> None:
    repo = S3Repo(config, host_name=f"worker-{worker}")
    files = [repo.add_file(path="race/same.txt").touch(f"{worker}-{i}") for i in range(count)]
    for rf in files:
        rf.upload()
    barrier.wait()
    errors = []

    def publish(rf):
        try:
            rf.publish()
        except Exception as exc:  # collected: the test asserts there are none
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(rf,)) for rf in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    repo.close()
    if errors:
        raise errors[0]


def test_concurrent_publishes_of_one_path_leave_exactly_one_published(repo_config_pair):
    """2 processes x 50 threads publish versions of one path: 1 published, 99 expired, no errors."""
    with S3Repo(repo_config_pair) as repo:
        repo.create_repository()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_publish_many, args=(repo_config_pair, w, 50, barrier)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=300)
    assert [p.exitcode for p in workers] == [0, 0]
    with S3Repo(repo_config_pair) as repo:
        from s3repofs.domain.paths import RepoPath

        states = [v.state for v in repo.meta.history(RepoPath.parse("race/same.txt"))]
        assert len(states) == 100
        assert states.count("published") == 1 and states.count("expired") == 99


def test_a_failed_upload_keeps_the_staged_bytes_and_is_retried(repo, monkeypatch):
    from s3repofs.errors import StoreUnavailableError

    rf = repo.add_file(path="t/a.txt").touch("precious")
    real_put = repo.store.put

    def unreachable(*args, **kwargs):
        raise StoreUnavailableError("cannot reach the store (injected)")

    monkeypatch.setattr(repo.store, "put", unreachable)
    with pytest.raises(StoreUnavailableError):
        rf.publish()
    assert rf.refresh().state == "unpublished" and rf.storage == "local"
    repo.meta.set_publish_pending(rf.id, True)
    assert repo.retry_staged_uploads() == 0  # still unreachable: nothing lost, nothing published
    monkeypatch.setattr(repo.store, "put", real_put)
    assert repo.retry_staged_uploads() == 1
    assert repo.get_file("t/a.txt").read_bytes() == b"precious"


def test_a_retry_never_takes_a_version_whose_writer_has_it_open(repo):
    rf = repo.add_file(path="t/a.txt")
    repo.meta.set_publish_pending(rf.id, True)
    with rf.open("wb") as f:
        f.write(b"half")
        assert repo.retry_staged_uploads() == 0  # a retry in another process would see it just so
    assert repo.retry_staged_uploads() == 1
    assert repo.get_file("t/a.txt").read_bytes() == b"half"


def test_a_version_still_open_for_writing_is_not_published(repo, monkeypatch):
    monkeypatch.setattr("s3repofs.repo.CLAIM_WAIT", 0.2)  # how long it waits for the writer to close
    from s3repofs.errors import BeingWrittenError

    rf = repo.add_file(path="t/a.txt")
    with rf.open("wb") as f:
        f.write(b"half")
        with pytest.raises(BeingWrittenError):  # as `s3repofs publish` from another shell would be
            rf.publish()
        f.write(b" and the rest")
    rf.publish()
    assert repo.get_file("t/a.txt").read_bytes() == b"half and the rest"


def test_a_writer_opening_a_version_the_retry_is_uploading_is_refused(repo, monkeypatch):
    from s3repofs.errors import ReadOnlyError

    rf = repo.add_file(path="t/a.txt").touch("original")
    put = repo.store.put
    refused = []

    def put_while_someone_opens_it(*args, **kwargs):
        with pytest.raises(ReadOnlyError):
            rf.open("wb")  # would write into what becomes the cached object
        refused.append(True)
        return put(*args, **kwargs)

    monkeypatch.setattr(repo.store, "put", put_while_someone_opens_it)
    assert repo.retry_staged_uploads() == 1
    assert refused
    assert repo.get_version(rf.id).read_bytes() == b"original"
    with pytest.raises(ReadOnlyError):  # and once it is uploaded, as before
        rf.open("wb")


def test_large_objects_download_in_parallel_parts_byte_exact(repo_config):
    import os

    with S3Repo({**repo_config, "download_part_size": 64 * 1024}) as repo:
        repo.create_repository()
        data = os.urandom(1024 * 1024 + 123)
        rf = repo.add_file(path="t/big.bin").touch(data).publish()
        repo.cache.clear()
        reader = repo.open_version(rf.version)
        try:
            assert reader.read(4096, 0) == data[:4096]
            assert reader.read(10_000, len(data) - 5000) == data[-5000:]
        finally:
            reader.close()
        assert repo.get_file("t/big.bin").read_bytes() == data
        assert repo.cache.has(rf.s3_key)


def test_a_sequential_reader_of_a_directory_gets_the_next_files_prefetched(repo_config):
    from s3repofs.local.prefetch import Prefetcher

    with S3Repo({**repo_config, "prefetch_files": 4}) as repo:
        repo.create_repository()
        files = [repo.add_file(path=f"t/d/f{i:02}").touch(f"{i}").publish() for i in range(10)]
        repo.add_file(path="t/d/huge").touch(b"x" * 2000).publish()
        repo.cache.clear()
        prefetcher = Prefetcher(repo, window=4, max_size=1000, list_ahead=lambda directory, after, limit:
                                repo.meta.list_dir(directory, "published", after=after, limit=limit))
        prefetcher.opened(files[5].version)  # one open is not a sequence: nothing fetched
        assert not any(repo.cache.has(f.s3_key) for f in files)
        prefetcher.opened(files[6].version)
        ahead = [f.s3_key for f in files[7:10]]
        assert wait_for(lambda: all(repo.cache.has(k) for k in ahead), timeout=10.0)
        assert not any(repo.cache.has(f.s3_key) for f in files[:7])
        assert not repo.cache.has(repo.get_file("t/d/huge").s3_key)  # above max_size



def test_a_retry_goes_on_past_a_version_it_cannot_read(repo, monkeypatch):
    import errno

    unreadable = repo.add_file(path="t/a").touch("a").version  # staged, never uploaded (a crash, say)
    readable = repo.add_file(path="t/b").touch("b").version
    upload = repo.upload

    def upload_unless_unreadable(version, *args, **kwargs):
        if version.id == unreadable.id:
            raise OSError(errno.EIO, "Input/output error")
        return upload(version, *args, **kwargs)

    monkeypatch.setattr(repo, "upload", upload_unless_unreadable)
    assert repo.retry_staged_uploads() == 1
    assert repo.get_version(readable.id).storage == "uploaded"
    assert repo.get_version(unreadable.id).storage == "local"


def test_threads_starting_on_a_fresh_host_at_once_all_succeed(repo_config, tmp_path):
    with S3Repo(repo_config) as first:
        first.create_repository()
    fresh_host = {**repo_config, "local_root": str(tmp_path / "fresh-host")}
    barrier = threading.Barrier(8)
    errors = []

    def publish(i: int) -> None:
        try:
            barrier.wait()
            repo.add_file(path=f"t/f{i}").touch(f"{i}").publish()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    with S3Repo(fresh_host) as repo:
        threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(f.path for f in repo.list_files("t")) == [f"t/f{i}" for i in range(8)]
        assert (tmp_path / "fresh-host" / "cache" / "LAYOUT").read_text() == "2\n"



@pytest.mark.parametrize("store_checks", ["md5", "size only"])
def test_digests_given_for_an_upload_that_do_not_match_its_bytes_are_refused(repo, store_checks):
    data = b"the bytes on disk"
    staged = repo.add_file(path="t/given").touch(data).version
    if store_checks == "size only":
        if not isinstance(repo.store, S3Store):
            pytest.skip("a local object directory always checks the md5")
        repo.store.multipart_threshold = 1  # a multipart upload: the server checks parts, not the whole md5
    wrong = Content(len(data), hashlib.md5(b"other bytes here!").hexdigest(), "0" * 32)
    with pytest.raises(VerificationError):
        repo.publish(staged, content=wrong)
    assert repo.get_version(staged.id).state == "unpublished"
    published = repo.publish(repo.meta.get(staged.id))
    assert published.md5 == hashlib.md5(data).hexdigest()
    assert published.xxh3 == xxhash.xxh3_128(data).hexdigest()


def test_a_stored_version_is_published_even_if_the_cache_cannot_keep_its_file(repo, monkeypatch):
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    staged = repo.add_file(path="t/f").touch("bytes")
    monkeypatch.setattr(repo.cache, "adopt", full_disk)
    published = staged.publish()  # stored and recorded before the cache's turn: no error for it
    monkeypatch.undo()
    assert published.version.state == "published"
    assert not repo.cache.staging_path(published.s3_key).exists()  # not left behind in staging
    assert repo.get_file("t/f").read_bytes() == b"bytes"  # downloaded


def test_a_retry_never_publishes_over_a_newer_version_published_meanwhile(repo, monkeypatch):
    import time

    old = repo.add_file(path="t/f").touch("old").version  # staged, its upload failed (S3 was down, say)
    repo.meta.set_publish_pending(old.id, True)
    time.sleep(0.01)
    repo.add_file(path="t/f").touch("new").publish()  # a newer version, published by another writer
    monkeypatch.setattr(repo.meta, "find", lambda *args, **kwargs: None)  # what a look just before it saw
    repo.retry_staged_uploads()
    monkeypatch.undo()
    assert repo.get_file("t/f").read_bytes() == b"new"
    assert repo.get_version(old.id).version.state == "unpublished"
    assert repo.meta.staged_on(repo.host) == []  # nothing left to retry


def test_a_retry_from_a_stale_row_never_republishes_a_version_expired_since(repo):
    version = repo.add_file(path="t/f").touch("bytes").version
    repo.meta.set_publish_pending(version.id, True)
    assert repo.retry_staged_uploads() == 1  # one mount's retry publishes it
    repo.get_file("t/f").expire()  # and someone removes it from published/
    # Another mount under the same host name read the row before all that, and retries now.
    published, expired = repo.meta.publish(version.id, unless_superseded=True)
    assert (published.state, expired) == ("expired", None)
    assert repo.get_version(version.id).version.state == "expired"
    assert repo.get_file("t/f") is None


def test_a_retry_never_publishes_over_a_newer_version_created_in_the_same_tick(repo, monkeypatch):
    monkeypatch.setattr(repo.meta, "clock", lambda: 1_000_000.0)  # one clock tick, or hosts' clocks apart
    old = repo.add_file(path="t/f").touch("old").version
    repo.meta.set_publish_pending(old.id, True)
    repo.add_file(path="t/f").touch("new").publish()
    repo.retry_staged_uploads()
    assert repo.get_file("t/f").read_bytes() == b"new"
