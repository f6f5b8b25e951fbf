"""The S3 store against a real S3-protocol server (moto, over HTTP on loopback): object reads go
through s3http's signed GETs, and must behave exactly like botocore's get_object."""

from __future__ import annotations

import os
import socket

import pytest

from s3repofs.errors import ObjectMissingError, StoreUnavailableError
from s3repofs.s3http import SignedGets
from s3repofs.store import CHUNK, FIRST_CHUNK, S3Store

DATA = os.urandom(3 * CHUNK + 12345)


@pytest.fixture
def store(s3_server, s3_bucket):
    store = S3Store(s3_bucket, endpoint_url=s3_server.endpoint_url, region=s3_server.region,
                    access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    store.client.put_object(Bucket=s3_bucket, Key="t/obj", Body=DATA)
    return store


def test_reads_use_the_signed_gets_on_a_direct_endpoint(store):
    assert isinstance(store._gets, SignedGets)


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
    assert not SignedGets.usable("http://10.1.2.3:9000")
    monkeypatch.setenv("no_proxy", "10.1.2.3")
    assert SignedGets.usable("http://10.1.2.3:9000")
