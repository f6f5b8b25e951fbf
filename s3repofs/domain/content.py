"""What a version's bytes are: their size and digests, and which digest verifies a download."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import xxhash

# The buffer size for moving bytes through Python (downloads, hashing read-backs, copies): under the
# daemon's mmap threshold (fs.tune_malloc), so these buffers are reused from the heap; mapping each
# one afresh cost a cold read on moto 18 %.
CHUNK = 512 * 1024
# Digests a download can be verified with, by the name recorded beside the expected value.
HASHES = {"xxh3": xxhash.xxh3_128, "md5": hashlib.md5}


@dataclass(frozen=True)
class Content:
    """What a version's bytes are: their size, md5 (sent as Content-MD5, and the original S3Repo's
    identity of content) and xxh3 (128-bit XXH3, what downloads are verified with: 11 GB/s here
    against md5's 0.8 GB/s, which would bound every cold read)."""

    size: int
    md5: str
    xxh3: str


def read_back(fd: int, start: int, end: int) -> Iterator[bytes]:
    """The bytes of ``fd`` in [start, end), a chunk at a time (fewer if the file is shorter)."""
    while start < end:
        chunk = os.pread(fd, min(CHUNK, end - start), start)
        if not chunk:
            return
        yield chunk
        start += len(chunk)


def feed(fd: int, start: int, end: int, digests: tuple) -> int:
    """Hash the bytes of ``fd`` in [start, end) into each of ``digests``; the offset reached (short of
    ``end`` only if the file is shorter)."""
    for chunk in read_back(fd, start, end):
        for digest in digests:
            digest.update(chunk)
        start += len(chunk)
    return start


def file_content(path: Path) -> Content:
    """Size, md5 and xxh3 of a local file, in one pass."""
    md5, xxh3 = hashlib.md5(), xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = feed(fd, 0, os.fstat(fd).st_size, (md5, xxh3))
    finally:
        os.close(fd)
    return Content(size, md5.hexdigest(), xxh3.hexdigest())


def download_digest(md5: str, xxh3: str | None) -> tuple[str, str]:
    """(name, expected hex value) of the digest to verify a download with: xxh3 where the version
    has one (recorded since schema 2), else md5."""
    return ("xxh3", xxh3) if xxh3 else ("md5", md5)


class AppendDigest:
    """The content of a file that is being written from start to end, hashed while it is written.

    A writer reports each write with ``appended``; once the file passes ``background_from`` bytes a
    thread hashes what has been written so far, reading it back from the page cache, so the digests
    are ready almost as soon as the last write is (a 64 MiB file's md5 costs ~90 ms here, which
    close() would otherwise pay after the writes). A write anywhere but at the end, or a truncate,
    spoils it: ``content()`` is then None and the caller hashes the file as usual. The reader holds
    no copy of the bytes, so memory stays at one chunk however far it lags.
    """

    def __init__(self, fd: int, length: int = 0, background_from: int = 4 * 1024 * 1024) -> None:
        self._fd = fd
        self._end = length  # bytes written from the start without a gap
        self._hashed = 0
        self._md5, self._xxh3 = hashlib.md5(), xxhash.xxh3_128()
        self._background_from = background_from
        self._spoiled = self._stopping = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def appended(self, offset: int, length: int) -> None:
        """``length`` bytes were written at ``offset``."""
        with self._changed:
            if offset != self._end:
                self._spoiled = True
            self._end += length
            if self._thread is None and self._end >= self._background_from and not self._spoiled:
                self._thread = threading.Thread(target=self._hash_in_background, name="append-digest", daemon=True)
                self._thread.start()
            self._changed.notify()

    def spoil(self) -> None:
        with self._changed:
            self._spoiled = True
            self._changed.notify()

    def content(self) -> Content | None:
        """The size and digests of everything written, or None if they are unknown (spoiled)."""
        self.stop()
        if self._spoiled:
            return None
        self._hash_until(self._end)  # the rest, or all of a small file
        if self._spoiled:
            return None
        return Content(self._end, self._md5.hexdigest(), self._xxh3.hexdigest())

    def stop(self) -> None:
        """End the background hashing (before the descriptor is closed)."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _hash_in_background(self) -> None:
        while True:
            with self._changed:
                while self._hashed >= self._end and not (self._stopping or self._spoiled):
                    self._changed.wait()
                if self._stopping or self._spoiled:
                    return
                end = self._end
            self._hash_until(end)

    def _hash_until(self, end: int) -> None:
        if self._hashed < end and not self._spoiled:
            self._hashed = feed(self._fd, self._hashed, end, (self._md5, self._xxh3))
            if self._hashed < end:  # shorter than written: truncated by something we did not see
                self._spoiled = True
