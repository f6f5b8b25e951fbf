"""Downloads in parts and reads of what has arrived (pure logic: a local file, no servers)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import xxhash

from s3repofs.errors import ObjectMissingError, StoreUnavailableError, TransientStoreError, VerificationError
from s3repofs.local import transfer
from s3repofs.local.transfer import Download
from s3repofs.objects import retry

DATA = os.urandom(1000)
MD5 = ("md5", hashlib.md5(DATA).hexdigest())
XXH3 = ("xxh3", xxhash.xxh3_128(DATA).hexdigest())


def chunks(data: bytes, start: int, end: int, size: int = 64):
    for offset in range(start, end, size):
        yield data[offset:min(offset + size, end)]


@pytest.fixture(autouse=True, params=["inline", "pooled"])
def strategy(request, monkeypatch):
    """Small objects are fetched by the running thread, larger ones by the pool: test both ways."""
    if request.param == "pooled":
        monkeypatch.setattr(transfer, "SMALL", 0)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(retry, "BACKOFF_BASE", 0.001)


@pytest.fixture
def dest(tmp_path):
    fd = os.open(tmp_path / "dest", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, len(DATA))
    yield fd
    os.close(fd)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as executor:
        yield executor


@pytest.mark.parametrize("part_size", [0, 1, 100, 333, 999, 1000, 5000])
def test_every_part_lands_and_is_verified(dest, pool, part_size):
    ranges = []

    def fetch(start, end):
        ranges.append((start, end))
        return chunks(DATA, start, end)

    Download(dest, len(DATA), MD5, "test", fetch, part_size, pool).run()
    assert os.pread(dest, 2000, 0) == DATA
    expected_parts = 1 if part_size in (0, 1000, 5000) else -(-1000 // part_size)
    assert len(ranges) == expected_parts and sorted(ranges)[0][0] == 0 and max(e for _, e in ranges) == 1000


def test_a_reader_is_served_before_the_rest_arrives(dest, pool):
    release_rest = threading.Event()

    def fetch(start, end):
        if start > 0:  # every part after the first waits until the reader has been served
            assert release_rest.wait(10)
        return chunks(DATA, start, end)

    download = Download(dest, len(DATA), MD5, "test", fetch, 250, pool)
    runner = threading.Thread(target=download.run)
    runner.start()
    download.wait(0, 200)  # returns although parts 2-4 have not been fetched
    assert os.pread(dest, 200, 0) == DATA[:200] and not download.done
    release_rest.set()
    download.wait(900, 1000)
    assert download.done and os.pread(dest, 100, 900) == DATA[900:]
    runner.join()


@pytest.mark.parametrize("digest", [MD5, XXH3], ids=["md5", "xxh3"])
def test_a_read_of_the_end_waits_for_the_digest_check(dest, pool, digest):
    corrupt = bytearray(DATA)
    corrupt[10] ^= 1
    download = Download(dest, len(DATA), digest, "test", lambda s, e: chunks(bytes(corrupt), s, e), 300, pool)
    with pytest.raises(VerificationError, match=digest[0]):
        download.run()
    with pytest.raises(VerificationError):
        download.wait(900, 1000)  # the reader never sees EOF on unverified bytes
    with pytest.raises(VerificationError):
        download.wait(0, 10)


@pytest.mark.parametrize("sent", [DATA[:999], DATA + b"x"], ids=["short", "long"])
def test_a_short_or_long_object_is_refused(dest, pool, sent):
    download = Download(dest, len(DATA), MD5, "test", lambda s, e: chunks(sent, s, e + 1), 0, pool)
    with pytest.raises(VerificationError, match="got 999 of 1000 bytes in 4 attempts|more than the recorded"):
        download.run()


def test_a_failed_part_fails_every_waiting_reader(dest, pool):
    def fetch(start, end):
        if start >= 500:
            raise StoreUnavailableError("cannot reach the store")
        return chunks(DATA, start, end)

    download = Download(dest, len(DATA), MD5, "test", fetch, 250, pool)
    errors = []

    def reader():
        try:
            download.wait(600, 700)
        except StoreUnavailableError as exc:
            errors.append(exc)

    waiting = threading.Thread(target=reader)
    waiting.start()
    with pytest.raises(StoreUnavailableError):
        download.run()
    waiting.join(10)
    assert len(errors) == 1 and download.done


@pytest.mark.parametrize("digest", [("md5", hashlib.md5(b"").hexdigest()), ("xxh3", xxhash.xxh3_128(b"").hexdigest())],
                         ids=["md5", "xxh3"])
def test_an_empty_object_is_verified_and_read_to_its_end(tmp_path, pool, digest):
    fd = os.open(tmp_path / "empty", os.O_RDWR | os.O_CREAT)
    try:
        download = Download(fd, 0, digest, "test", lambda s, e: iter(()), 8, pool)
        download.run()
        assert download.done
        download.wait(0, 4096)  # a read past the end returns at once: EOF on verified (no) bytes
        assert os.fstat(fd).st_size == 0
        wrong = Download(fd, 0, (digest[0], "0" * 32), "test", lambda s, e: iter(()), 8, pool)
        with pytest.raises(VerificationError):
            wrong.run()
        with pytest.raises(VerificationError):
            wrong.wait(0, 4096)
    finally:
        os.close(fd)


def test_no_part_writes_after_a_failed_download_returns(dest, pool):
    import time

    writes_after: list = []
    returned = threading.Event()

    def fetch(start, end):
        if start == 250:
            raise StoreUnavailableError("connection reset")
        for chunk in chunks(DATA, start, end, 10):
            time.sleep(0.002)
            if returned.is_set():
                writes_after.append(start)
            yield chunk

    download = Download(dest, len(DATA), MD5, "test", fetch, 250, pool)
    with pytest.raises(StoreUnavailableError):
        download.run()
    returned.set()  # the caller now closes the fd; its number may be reused at once
    time.sleep(0.1)
    assert writes_after == []


def breaking_off_once(data: bytes, after: int):
    """A fetch whose first body breaks off after ``after`` bytes; the ranges asked for are recorded."""
    asked: list = []

    def fetch(start, end):
        asked.append((start, end))
        if len(asked) == 1:
            yield data[start:start + after]
            raise TransientStoreError("the connection broke off: IncompleteRead")
        yield from chunks(data, start, end)

    return fetch, asked


@pytest.mark.parametrize("part_size", [0, 400])
def test_a_body_that_breaks_off_is_asked_for_again_from_where_it_stopped(dest, pool, part_size):
    fetch, asked = breaking_off_once(DATA, 64 + 7)
    Download(dest, len(DATA), MD5, "test", fetch, part_size, pool).run()
    assert os.pread(dest, 2000, 0) == DATA
    assert (71, 400 if part_size else 1000) in asked  # the rest of the part, not all of it again


def test_a_body_that_keeps_breaking_off_fails_with_what_arrived(dest, pool):
    asked = []

    def fetch(start, end):
        asked.append(start)
        yield DATA[start:start + 10]
        raise TransientStoreError("the connection broke off: IncompleteRead")

    with pytest.raises(TransientStoreError, match="got 40 of 1000 bytes in 4 attempts; the connection broke off"):
        Download(dest, len(DATA), MD5, "test", fetch, 0, pool).run()
    assert asked == [0, 10, 20, 30]


def test_a_part_stopped_by_another_parts_failure_is_not_asked_for_again(dest, pool, caplog):
    """Part 1 meets part 0's failure at its next chunk: it stops with that error, and logs no retry of its own."""
    download = None

    def fetch(start, end):
        if start == 0:  # every body of part 0 ends early
            return
        for _ in range(1000):  # part 1's next chunk arrives once part 0 has failed the download
            if download._error is not None:
                break
            time.sleep(0.01)
        yield DATA[start:start + 10]

    download = Download(dest, len(DATA), MD5, "test", fetch, 500, pool)
    with caplog.at_level(logging.WARNING, logger=transfer.__name__):
        with pytest.raises(VerificationError, match="got 0 of 500 bytes .* in 4 attempts: the store ended the body"):
            download.run()
    again = [r.getMessage() for r in caplog.records if "asking again for the rest" in r.getMessage()]
    assert len(again) == retry.ATTEMPTS - 1 and not any("in 4 attempts" in message for message in again)


def test_a_missing_object_is_not_asked_for_again(dest, pool):
    asked = []

    def fetch(start, end):
        asked.append(start)
        raise ObjectMissingError("object t/k is missing")

    with pytest.raises(ObjectMissingError):
        Download(dest, len(DATA), MD5, "test", fetch, 0, pool).run()
    assert asked == [0]


def corrupt_first(data: bytes, parts: int):
    """A fetch whose first ``parts`` bodies have a flipped byte."""
    sent = []

    def fetch(start, end):
        sent.append(start)
        body = bytearray(data[start:end])
        if len(sent) <= parts:
            body[0] ^= 1
        return chunks(bytes(body), 0, len(body))

    return fetch, sent


@pytest.mark.parametrize("digest", [MD5, XXH3], ids=["md5", "xxh3"])
def test_an_object_that_fails_its_digest_check_is_downloaded_again(dest, pool, digest):
    fetch, sent = corrupt_first(DATA, 1)
    download = Download(dest, len(DATA), digest, "test", fetch, 300, pool)
    download.run()
    download.wait(0, len(DATA))
    assert os.pread(dest, 2000, 0) == DATA and len(sent) == 8


def test_an_object_that_keeps_failing_its_digest_check_fails_after_the_last_attempt(dest, pool):
    fetch, sent = corrupt_first(DATA, 100)
    with pytest.raises(VerificationError, match="md5 .* does not match the recorded .* \\(3 attempts\\)"):
        Download(dest, len(DATA), MD5, "test", fetch, 0, pool).run()
    assert len(sent) == 3


def test_no_second_download_once_a_reader_was_served_unverified_bytes(dest, pool):
    """The reader read bad bytes: a good end after a second download would hide them from it."""
    release_rest = threading.Event()
    fetch, sent = corrupt_first(DATA, 1)

    def gated(start, end):
        if start > 0:
            assert release_rest.wait(10)
        return fetch(start, end)

    download = Download(dest, len(DATA), MD5, "test", gated, 250, pool)
    runner = threading.Thread(target=lambda: pytest.raises(VerificationError, download.run))
    runner.start()
    download.wait(0, 200)  # served before the digest is known
    release_rest.set()
    runner.join(10)
    with pytest.raises(VerificationError, match="does not match .*not downloaded again: a reader has read"):
        download.wait(900, 1000)
    assert len(sent) == 4
