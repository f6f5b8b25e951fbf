"""The S3 store against a real S3-protocol server (moto, over HTTP on loopback): object reads go
through s3http's signed GETs, and must behave exactly like botocore's get_object."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from s3repofs.domain.content import CHUNK, Content
from s3repofs.errors import ObjectMissingError, StoreUnavailableError, VerificationError
from s3repofs.objects.s3 import FIRST_CHUNK, S3Store, check_etag
from s3repofs.objects.s3http import SignedRequests
from s3repofs.objects.store import describe

DATA = os.urandom(3 * CHUNK + 12345)


@pytest.fixture
def store(s3_server, s3_bucket):
    store = S3Store(s3_bucket, endpoint_url=s3_server.endpoint_url, region=s3_server.region,
                    access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    store.client.put_object(Bucket=s3_bucket, Key="t/obj", Body=DATA)
    return store


def test_reads_use_the_signed_gets_on_a_direct_endpoint(store):
    assert isinstance(store._direct, SignedRequests)


@pytest.mark.parametrize("start, end", [(0, len(DATA)), (0, 1), (5, 6), (100, CHUNK + 7), (CHUNK, len(DATA))])
def test_a_range_streams_exactly_its_bytes(store, start, end):
    chunks = list(store.stream("t/obj", start, end, len(DATA)))
    assert b"".join(chunks) == DATA[start:end]
    assert len(chunks[0]) <= FIRST_CHUNK  # the first bytes come before a whole chunk has arrived


def test_the_signed_gets_read_what_botocore_reads(store):
    body = store.client.get_object(Bucket=store.bucket, Key="t/obj", Range="bytes=10-99")["Body"].read()
    assert b"".join(store.stream("t/obj", 10, 100, len(DATA))) == body


def test_a_stopped_reader_leaves_the_pool_usable(store):
    stream = store.stream("t/obj", 0, len(DATA), len(DATA))
    assert len(next(stream)) == FIRST_CHUNK
    stream.close()  # the rest of the body is never read: that connection is dropped, not reused
    assert b"".join(store.stream("t/obj", 0, len(DATA), len(DATA))) == DATA


def test_a_missing_object_is_object_missing(store):
    with pytest.raises(ObjectMissingError, match="t/none"):
        list(store.stream("t/none", 0, 10, 10))


def test_an_unreachable_server_is_store_unavailable(s3_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1",
                    access_key="AKIDEXAMPLE", secret_key="never-in-a-message")
    with pytest.raises(StoreUnavailableError, match="cannot reach") as raised:
        list(store.stream("t/obj", 0, 10, 10))
    assert "never-in-a-message" not in str(raised.value)


def test_a_proxy_for_the_endpoint_means_botocore_reads(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert not SignedRequests.usable("http://10.1.2.3:9000")
    monkeypatch.setenv("no_proxy", "10.1.2.3")
    assert SignedRequests.usable("http://10.1.2.3:9000")


def test_a_put_stores_the_bytes_and_their_description(store, tmp_path):
    source = tmp_path / "body"
    source.write_bytes(DATA[:70_000])
    md5 = hashlib.md5(DATA[:70_000]).hexdigest()
    description = {"path": "t/a%20b.txt", "md5": md5}
    store.put("t/put", source, 70_000, md5, description)
    info = store.head("t/put")
    assert info.size == 70_000 and info.description == {"path": "t/a b.txt", "md5": md5}
    assert store.client.get_object(Bucket=store.bucket, Key="t/put")["Body"].read() == DATA[:70_000]


def test_a_put_whose_body_does_not_match_its_md5_is_refused(store, tmp_path):
    source = tmp_path / "body"
    source.write_bytes(b"the bytes on disk")
    with pytest.raises(VerificationError):
        store.put("t/bad", source, 17, hashlib.md5(b"other bytes").hexdigest(), {})
    assert store.head("t/bad") is None


def test_an_etag_proves_the_stored_bytes_only_when_it_is_an_md5():
    md5 = hashlib.md5(b"x").hexdigest()
    assert check_etag("upload", {"ETag": f'"{md5}"'}, md5)
    with pytest.raises(VerificationError, match="stored bytes with md5"):
        check_etag("upload", {"ETag": '"' + "0" * 32 + '"'}, md5)
    for encrypted in ({"ServerSideEncryption": "aws:kms"}, {"SSECustomerAlgorithm": "AES256"}):
        assert not check_etag("upload", {"ETag": '"' + "0" * 32 + '"', **encrypted}, md5)
    assert not check_etag("upload", {"ETag": '"abc-3"'}, md5)  # another form: the size decides


def test_a_path_too_long_for_s3_metadata_is_kept_in_an_object_beside_it(store, tmp_path):
    """S3 takes 2 KB of user metadata: a path of 4,095 bytes, percent-encoded, takes up to 12 KB."""
    path = "t/" + "/".join(["é" * 100 + "d" * 54] * 16) + "/" + "中" * 80  # 4,001 bytes, 10,555 encoded
    source = tmp_path / "body"
    source.write_bytes(b"deep")
    md5 = hashlib.md5(b"deep").hexdigest()
    store.put("t/deep", source, 4, md5, describe(path=path, file_type="t", version_id=7,
                                                 content=Content(4, md5, "0" * 32), origin_host="h",
                                                 created_at=1.5, mode=0o644, uid=0, gid=0))
    metadata = store.client.head_object(Bucket=store.bucket, Key="t/deep")["Metadata"]
    assert sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items()) <= 2048
    assert store.head("t/deep").description["path"] == path  # the object still describes itself
    assert [info.key for info in store.list("t/")] == ["t/deep", "t/obj"]  # the path object is part of it
    store.delete("t/deep")
    assert store.client.list_objects_v2(Bucket=store.bucket, Prefix="t/d").get("KeyCount") == 0
