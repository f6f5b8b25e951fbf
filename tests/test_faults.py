"""The repository behind a fault-injecting proxy (tests/faultproxy.py) in front of moto's server:
reads return the right bytes or EIO, never wrong bytes, and retries make them succeed; no write
that was acknowledged is lost."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import uuid

import pytest
from faultproxy import KINDS, FaultProxy
from mount_helper import fuse_available, mounted

from s3repofs import S3Repo
from s3repofs.errors import RepoError, TransientStoreError, VerificationError
from s3repofs.local import transfer
from s3repofs.objects import retry

FILES = 40
PART = 256 * 1024


@pytest.fixture(scope="module")
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url, max_latency=0.05) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch, proxy):
    """Retries as in production, with shorter pauses (the tests stay fast); no faults until a test
    asks for them."""
    monkeypatch.setattr(retry, "BACKOFF_BASE", 0.005)
    proxy.reset(seed=11)


@pytest.fixture(scope="module")
def written(s3_server, proxy, tmp_path_factory):
    """The configuration of a repository behind the proxy, and the 40 files published in it."""
    base = tmp_path_factory.mktemp("faults")
    bucket = f"test-{uuid.uuid4().hex}"
    s3_server.create_bucket(bucket)
    config = {"local_root": str(base / "writer"), "host_name": "writer", "database": f"sqlite:///{base / 'repo.db'}",
              **s3_server.repo_keys(bucket, proxy.endpoint_url), "download_part_size": PART}
    proxy.reset()
    with S3Repo(config) as writer:
        writer.create_repository()
        files = write_files(writer, "data")
    yield config, files
    s3_server.delete_bucket(bucket)


def cold_repo(config, tmp_path, name="reader"):
    """Another host's view of the repository: its cache starts empty."""
    return S3Repo({**config, "local_root": str(tmp_path / name), "host_name": name})


def sizes(count, seed=3):
    """Small files (one GET each) and files in 2-4 ranged parts. All are up to transfer.SMALL, so
    their parts are fetched one after the other: the requests, and so the faults the seeded proxy
    draws for them, come in the same order at every run."""
    rng = random.Random(seed)
    return [rng.choice([rng.randrange(1, 64 * 1024), rng.randrange(PART + 1, 400 * 1024),
                        rng.randrange(3 * PART, transfer.SMALL)]) for _ in range(count)]


def write_files(repo, file_type, count=FILES) -> dict[str, bytes]:
    files = {}
    for i, size in enumerate(sizes(count)):
        data = os.urandom(size)
        rf = repo.add_file(f"{file_type}/f{i:02}.bin")
        rf.touch(data)
        rf.publish()
        files[rf.path] = data
    return files


def read_all(repo, files) -> tuple[int, list[str]]:
    """How many files read back right, and the errors of the others; wrong bytes fail the test."""
    right, failures = 0, []
    for path, data in files.items():
        try:
            got = repo.require_file(path).read_bytes()
        except RepoError as exc:
            assert exc.errno == errno.EIO, exc
            failures.append(f"{path}: {exc}")
            continue
        assert hashlib.md5(got).digest() == hashlib.md5(data).digest(), f"{path}: wrong bytes"
        right += 1
    return right, failures


def test_cold_reads_at_20_percent_faults_return_the_right_bytes(written, tmp_path, proxy):
    config, files = written
    proxy.configure(rate=0.2)
    with cold_repo(config, tmp_path) as reader:
        right, failures = read_all(reader, files)
    assert sum(proxy.injected.values()) >= 20, proxy.injected
    print(f"{right} of {len(files)} read right; faults injected: {dict(proxy.injected)}")
    assert failures == []


@pytest.mark.parametrize("kind", KINDS)
def test_cold_reads_survive_each_kind_of_fault_alone(written, tmp_path, proxy, kind):
    """truncate and corrupt need the download's own retries; the HTTP client retries the others
    (each request is spoiled at most once: the test does not depend on the luck of the draw)."""
    config, files = written
    proxy.configure(rate=0.3, kinds=[kind], at_most_once=True)
    some = dict(list(files.items())[:16])
    with cold_repo(config, tmp_path) as reader:
        right, failures = read_all(reader, some)
    assert proxy.injected[kind] >= 3
    assert failures == []


def test_a_body_always_cut_short_fails_with_eio_saying_so(written, tmp_path, proxy):
    config, files = written
    path = next(p for p, data in files.items() if len(data) > PART)
    proxy.configure(rate=1.0, kinds=["truncate"], methods=["GET"])
    with cold_repo(config, tmp_path) as reader, pytest.raises(TransientStoreError) as info:
        reader.require_file(path).read_bytes()
    message = str(info.value)
    assert info.value.errno == errno.EIO
    assert f"of {PART} bytes (bytes 0-{PART} of {len(files[path])}) in 4 attempts; " in message
    assert "broke off" in message and "IncompleteRead" in message and "cannot reach" not in message


def test_a_body_always_corrupted_fails_with_eio_saying_so(written, tmp_path, proxy):
    config, files = written
    proxy.configure(rate=1.0, kinds=["corrupt"], methods=["GET"])
    mismatch = r"xxh3 \w+ does not match the recorded \w+ \(3 attempts\)"
    with cold_repo(config, tmp_path) as reader, pytest.raises(VerificationError, match=mismatch):
        reader.require_file(next(iter(files))).read_bytes()


def test_no_acknowledged_write_is_lost_at_20_percent_faults(written, tmp_path, proxy):
    config = {**written[0], "database": f"sqlite:///{tmp_path / 'writes.db'}"}
    with S3Repo({**config, "local_root": str(tmp_path / "writer")}) as writer:
        writer.create_repository()
        proxy.configure(rate=0.2)
        acknowledged, refused = {}, []
        for i, size in enumerate(sizes(24, seed=5)):
            data = os.urandom(size)
            rf = writer.add_file(f"writes/f{i:02}.bin")
            try:
                rf.touch(data)
                rf.publish()
            except RepoError as exc:
                assert exc.errno == errno.EIO, exc
                refused.append(rf.path)
                continue
            acknowledged[rf.path] = data
    assert proxy.injected["503"] + proxy.injected["500"] + proxy.injected["drop"] >= 2, proxy.injected
    proxy.reset()
    with cold_repo(config, tmp_path) as reader:
        assert read_all(reader, acknowledged) == (len(acknowledged), [])
        assert [path for path in refused if reader.get_file(path) is not None] == []
    assert len(acknowledged) >= 22


@pytest.mark.parametrize("kind", ["503", "500", "drop"])
def test_an_upload_answered_with_an_error_is_not_acknowledged(written, tmp_path, proxy, kind):
    config = {**written[0], "database": f"sqlite:///{tmp_path / 'writes.db'}"}
    with S3Repo({**config, "local_root": str(tmp_path / "writer")}) as writer:
        writer.create_repository()
        rf = writer.add_file("writes/failing.bin")
        rf.touch(b"precious bytes")
        proxy.configure(rate=1.0, kinds=[kind], methods=["PUT"])
        with pytest.raises(RepoError) as info:
            rf.publish()
        assert info.value.errno == errno.EIO
        assert writer.get_file(rf.path) is None and rf.refresh().storage == "local"
        proxy.reset()
        rf.publish()  # the bytes stayed staged: publishing again uploads them
    with cold_repo(config, tmp_path) as reader:
        assert reader.require_file(rf.path).read_bytes() == b"precious bytes"


@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3")
def test_a_mount_reads_right_bytes_or_eio_at_20_percent_faults(written, tmp_path, proxy):
    config, files = written
    right, eio = 0, []
    with mounted({**config, "local_root": str(tmp_path / "mounted"), "host_name": "mounted"}, tmp_path) as mnt:
        proxy.configure(rate=0.2)
        for path, data in files.items():
            try:
                got = (mnt / "published" / path).read_bytes()
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                eio.append(path)
                continue
            assert hashlib.md5(got).digest() == hashlib.md5(data).digest(), f"{path}: wrong bytes"
            right += 1
    print(f"through the mount: {right} of {len(files)} read right, EIO for {eio}")
    assert right >= len(files) - 4


@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3 (./scripts/setup)")
def test_a_mount_never_serves_the_pages_of_a_failed_download_again(written, tmp_path, proxy):
    # A reader of a large cold file gets its bytes before the whole object is verified; the kernel caches
    # those pages. If the digest then fails, the next open must not keep them.
    config = {**written[0], "download_part_size": 1024 * 1024}
    files = {}
    with S3Repo(config) as writer:
        for i in range(3):
            files[f"pages/f{i}.bin"] = data = os.urandom(8 * 1024 * 1024)
            writer.add_file(f"pages/f{i}.bin").touch(data).publish()
    with mounted({**config, "local_root": str(tmp_path / "mounted"), "host_name": "mounted"}, tmp_path) as mnt:
        proxy.configure(rate=1.0, kinds=["corrupt"], methods=["GET"], at_most_once=True)
        for path, data in files.items():
            right = False
            for _attempt in range(3):  # EIO may come again while the failed download winds up; wrong bytes never
                try:
                    got = (mnt / "published" / path).read_bytes()
                except OSError as exc:
                    assert exc.errno == errno.EIO, exc
                    continue
                assert hashlib.md5(got).digest() == hashlib.md5(data).digest(), f"{path}: wrong bytes"
                right = True
            assert right, f"{path}: never read right"
