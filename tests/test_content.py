"""AppendDigest (content.py): the digests of a file hashed while it is written."""

from __future__ import annotations

import os

from s3repofs.domain.content import CHUNK, AppendDigest, file_content


def _write(path, digest, fd, data: bytes, offset: int, piece: int) -> None:
    for start in range(0, len(data), piece):
        written = os.pwrite(fd, data[start:start + piece], offset + start)
        digest.appended(offset + start, written)


def test_sequential_writes_give_the_files_digests_whether_hashed_in_background_or_at_the_end(tmp_path):
    data = os.urandom(3 * CHUNK + 12345)
    for background_from, piece in ((0, 4096), (CHUNK, 100_000), (10 * CHUNK, CHUNK)):  # thread / no thread
        path = tmp_path / f"f{background_from}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        digest = AppendDigest(fd, background_from=background_from)
        _write(path, digest, fd, data, 0, piece)
        assert digest.content() == file_content(path)
        assert digest.content() == file_content(path)  # asking again changes nothing
        os.close(fd)


def test_the_bytes_already_in_the_file_count(tmp_path):
    path = tmp_path / "copy"
    path.write_bytes(b"kept from the version before ")
    fd = os.open(path, os.O_RDWR)
    digest = AppendDigest(fd, os.fstat(fd).st_size, background_from=0)
    _write(path, digest, fd, b"and appended", os.fstat(fd).st_size, 5)
    assert digest.content() == file_content(path)
    assert path.read_bytes() == b"kept from the version before and appended"
    os.close(fd)


def test_a_write_anywhere_but_the_end_or_a_truncate_leaves_it_unknown(tmp_path):
    def spoiled_by(change) -> None:
        path = tmp_path / "f"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        digest = AppendDigest(fd, background_from=0)
        _write(path, digest, fd, os.urandom(2 * CHUNK), 0, CHUNK // 2)
        change(fd, digest)
        assert digest.content() is None
        os.close(fd)

    spoiled_by(lambda fd, d: d.appended(0, os.pwrite(fd, b"rewritten", 0)))  # over hashed bytes
    spoiled_by(lambda fd, d: d.appended(3 * CHUNK, os.pwrite(fd, b"past the end", 3 * CHUNK)))  # a hole
    spoiled_by(lambda fd, d: (os.ftruncate(fd, 10), d.spoil()))
