"""Downloading one object into a local file, in parallel ranged parts, while readers use what has arrived.

A ``Download`` fetches the object as one stream (``part_size`` 0, the default), hashing each chunk
as it arrives, or in parts of ``part_size`` bytes fetched by a shared pool while the thread that runs
it hashes the file in order behind them (receiving and hashing then run side by side: both release
the GIL). Readers wait only
for the range they asked for, so the first bytes of a large cold file are served while the rest is
still arriving; a read that reaches the end of the object also waits for the digest check (xxh3, or
md5 for versions recorded without one), so a reader that sees EOF has seen verified bytes.

Which strategy is faster depends on the server: real S3 serves parts in parallel, while moto copies
the whole object for every ranged GET. ``download_part_size`` in the config chooses.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Executor, Future, wait
from typing import Callable, Iterator

from .content import HASHES, feed
from .errors import VerificationError

SMALL = 1024 * 1024  # objects up to this size are fetched and hashed by the one thread that runs them

# fetch(start, end) yields the object's bytes in [start, end), in order.
Fetch = Callable[[int, int], Iterator[bytes]]


class Download:
    def __init__(self, fd: int, size: int, digest: tuple[str, str], what: str, fetch: Fetch, part_size: int,
                 parts: Executor) -> None:
        self.fd = fd  # the destination, already ``size`` bytes long (sparse)
        self.size = size
        self.digest_name, self.expected = digest  # e.g. ("xxh3", hex): see content.download_digest
        self.what = what
        self._fetch = fetch
        self._parts = parts
        self.part_size = part_size if 0 < part_size < size else max(size, 1)
        self._starts = list(range(0, size, self.part_size)) or [0]
        self._filled = [0] * len(self._starts)  # bytes present from each part's start
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._verified = False

    # -- the downloading side -------------------------------------------------------------------

    def run(self) -> None:
        """Fetch and verify the whole object (blocks); raises, and fails every waiting reader, on error."""
        futures: list[Future] = []
        digest = HASHES[self.digest_name]()
        try:
            if len(self._starts) == 1 or self.size <= SMALL:
                # In order, on this thread: each chunk is hashed as it arrives (no re-read, no handoff).
                for index in range(len(self._starts)):
                    self._fetch_part(index, digest)
            else:
                # Parts arrive out of order from the pool; this thread hashes behind them, in order.
                futures = [self._parts.submit(self._fetch_part, i) for i in range(len(self._starts))]
                self._hash_behind(digest)
                for future in futures:
                    future.result()
            if digest.hexdigest() != self.expected:
                raise VerificationError(f"{self.what}: {self.digest_name} {digest.hexdigest()} does not match "
                                        f"the recorded {self.expected}")
        except BaseException as exc:
            self._fail(exc)  # parts still running stop at their next chunk
            for future in futures:
                future.cancel()
            wait(futures)  # none may write into the fd once the caller closes it (its number is reused)
            raise
        with self._cond:
            self._verified = True
            self._cond.notify_all()

    def _hash_behind(self, digest) -> None:
        hashed = 0
        while hashed < self.size:
            present = self._wait_prefix(hashed)
            hashed = feed(self.fd, hashed, present, (digest,))
            if hashed < present:
                raise VerificationError(f"{self.what}: the cache file is shorter than the bytes written to it")

    def _fetch_part(self, index: int, digest=None) -> None:
        """Write part ``index`` into the file as it arrives (and hash it, if given ``digest``)."""
        start, end = self._starts[index], self._part_end(index)
        offset = start
        try:
            for chunk in self._fetch(start, end):
                with self._cond:
                    self._raise_failure()  # another part failed: the download is over
                if offset + len(chunk) > end:
                    raise VerificationError(f"{self.what}: the store sent more than the recorded {self.size} bytes")
                pwrite_all(self.fd, chunk, offset)
                if digest is not None:
                    digest.update(chunk)
                offset += len(chunk)
                with self._cond:
                    self._filled[index] = offset - start
                    self._cond.notify_all()
            if offset != end:
                raise VerificationError(f"{self.what}: the store sent {offset - start} bytes of part "
                                        f"{start}-{end}, expected {end - start} (size {self.size})")
        except BaseException as exc:
            self._fail(exc)
            raise

    def _part_end(self, index: int) -> int:
        return min(self._starts[index] + self.part_size, self.size)

    def _wait_prefix(self, offset: int) -> int:
        """Wait until bytes from ``offset`` on are present; the end of what is present contiguously."""
        index = offset // self.part_size
        with self._cond:
            while True:
                self._raise_failure()
                present = self._starts[index] + self._filled[index]
                if present > offset:
                    return present
                self._cond.wait()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    # -- the reading side -----------------------------------------------------------------------

    def wait(self, start: int, end: int) -> None:
        """Block until bytes [start, end) are present (and verified, if the range reaches the end)."""
        end = min(end, self.size)
        with self._cond:
            while True:
                self._raise_failure()
                if self._verified or (end < self.size and self._present(start, end)):
                    return
                self._cond.wait()

    def wait_verified(self) -> None:
        self.wait(0, self.size)

    @property
    def done(self) -> bool:
        with self._cond:
            return self._verified or self._error is not None

    def _present(self, start: int, end: int) -> bool:
        if start >= end:
            return True
        for index in range(start // self.part_size, (end - 1) // self.part_size + 1):
            if self._starts[index] + self._filled[index] < min(end, self._part_end(index)):
                return False
        return True

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` (a full disk may take part of it: the rest raises ENOSPC)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
