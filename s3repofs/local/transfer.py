"""Downloading one object into a local file, in parallel ranged parts, while readers use what has arrived.

A ``Download`` fetches the object as one stream (``part_size`` 0, the default), hashing each chunk
as it arrives, or in parts of ``part_size`` bytes fetched by a shared pool while the thread that runs
it hashes the file in order behind them (receiving and hashing then run side by side: both release
the GIL). Readers wait only for the range they asked for, so the first bytes of a large cold file
are served while the rest is still arriving; a read that reaches the end of the object also waits
for the digest check (xxh3, or md5 for versions recorded without one), so a reader that sees EOF
has seen verified bytes.

Which strategy is faster depends on the server: real S3 serves parts in parallel, while moto copies
the whole object for every ranged GET. ``download_part_size`` in the config chooses.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Executor, Future, wait
from typing import Callable, Iterator

from .. import metrics
from ..domain.content import HASHES, feed
from ..errors import RepoError, TransientStoreError, VerificationError
from ..objects import retry
from ..objects.retry import ATTEMPTS, DIGEST_ATTEMPTS

log = logging.getLogger(__name__)

SMALL = 1024 * 1024  # objects up to this size are fetched and hashed by the one thread that runs them

# fetch(start, end) yields the object's bytes in [start, end), in order.
Fetch = Callable[[int, int], Iterator[bytes]]


class _EndedEarly(VerificationError):
    """The store ended a part's body before its end, without an error: the rest is asked for again."""


class _DownloadAgain(VerificationError):
    """The object's digest did not match, and it is downloaded again."""


class Download:
    def __init__(self, fd: int, size: int, digest: tuple[str, str], what: str, fetch: Fetch, part_size: int,
                 parts: Executor, received: Callable[[int], None] | None = None) -> None:
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
        self._served = False  # a reader was told unverified bytes were present
        self._received = received  # a progress report's (the CLI's); None on the mount's reads

    # -- the downloading side -------------------------------------------------------------------

    def run(self) -> None:
        """Fetch and verify the whole object (blocks); raises, and fails every waiting reader, on error.

        A part whose body breaks off (or that fails otherwise transiently: TransientStoreError) is
        fetched again from where it stopped, up to ATTEMPTS times in all; an object whose digest does
        not match is downloaded again, up to DIGEST_ATTEMPTS times, unless a reader was already
        served some of its unverified bytes (that reader must see EIO, not a good end after bad
        bytes). The error after the last attempt says what happened. (The policy: ``objects.retry``.)"""
        try:
            for attempt in retry.attempts(DIGEST_ATTEMPTS, _DownloadAgain, sleep=self._pause,
                                          before_retry=self._log_download_again):
                with attempt:
                    self._fetch_verified(attempt.retry_state.attempt_number)
        except VerificationError as exc:
            self._fail(exc)
            raise
        with self._cond:
            self._verified = True
            self._cond.notify_all()

    def _fetch_verified(self, attempt: int) -> None:
        """Fetch every part and check the digest; _DownloadAgain if it does not match and the parts
        start over (decided under the lock: no reader is served bytes of the failed download since)."""
        actual = self._fetch_all()
        if actual == self.expected:
            return
        error = f"{self.what}: {self.digest_name} {actual} does not match the recorded {self.expected}"
        if attempt > 1:
            error += f" ({attempt} attempts)"
        with self._cond:
            if attempt < DIGEST_ATTEMPTS and not self._served:
                if self._received is not None:  # the bytes arrive again
                    self._received(-sum(self._filled))
                self._filled = [0] * len(self._starts)
                raise _DownloadAgain(error)
        if attempt < DIGEST_ATTEMPTS:
            error += "; not downloaded again: a reader has read some of it"
        raise VerificationError(error)

    @staticmethod
    def _log_download_again(state) -> None:
        metrics.DIGEST_RETRIES.inc()
        log.warning("%s; downloading it again (attempt %d of %d)", state.outcome.exception(),
                    state.attempt_number + 1, DIGEST_ATTEMPTS)

    def _fetch_all(self) -> str:
        """Fetch every part; the hex digest of what arrived. Raises, and fails the readers, on error."""
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
            return digest.hexdigest()
        except BaseException as exc:
            self._fail(exc)  # parts still running stop at their next chunk
            for future in futures:
                future.cancel()
            wait(futures)  # none may write into the fd once the caller closes it (its number is reused)
            raise

    def _hash_behind(self, digest) -> None:
        hashed = 0
        while hashed < self.size:
            present = self._wait_prefix(hashed)
            hashed = feed(self.fd, hashed, present, (digest,))
            if hashed < present:
                raise VerificationError(f"{self.what}: the cache file is shorter than the bytes written to it")

    def _fetch_part(self, index: int, digest=None) -> None:
        """Write part ``index`` into the file as it arrives (and hash it, if given ``digest``); after a
        body that breaks off or ends short, or another transient failure, the rest is asked for again."""
        try:
            for attempt in retry.attempts(ATTEMPTS, (TransientStoreError, _EndedEarly), sleep=self._pause,
                                          before_retry=self._log_ask_again):
                with attempt:
                    self._receive_rest(index, digest, attempt.retry_state.attempt_number)
        except BaseException as exc:
            self._fail(exc)
            raise

    def _receive_rest(self, index: int, digest, attempt: int) -> None:
        """Receive what is missing of part ``index``; raises what ``_cut_short`` says if it did not all arrive."""
        try:
            self._receive(index, digest)
        except TransientStoreError as exc:
            raise self._cut_short(index, attempt, exc) from None
        if self._filled[index] < self._part_end(index) - self._starts[index]:
            raise self._cut_short(index, attempt, None)

    def _log_ask_again(self, state) -> None:
        failure = state.outcome.exception()
        with self._cond:
            if failure is self._error:  # another part's, met at this part's next chunk: the pause raises it at once
                return
        metrics.PART_RETRIES.inc()
        log.warning("%s; asking again for the rest (attempt %d of %d)", failure, state.attempt_number + 1, ATTEMPTS)

    def _receive(self, index: int, digest) -> None:
        """Fetch what is missing of part ``index`` (all of it, the first time) and write it into place."""
        start, end = self._starts[index], self._part_end(index)
        offset = start + self._filled[index]
        for chunk in self._fetch(offset, end):
            with self._cond:
                self._raise_failure()  # another part failed: the download is over
            if offset + len(chunk) > end:
                raise VerificationError(f"{self.what}: the store sent more than the recorded {self.size} bytes")
            pwrite_all(self.fd, chunk, offset)
            metrics.DOWNLOADED_BYTES.inc(len(chunk))
            if digest is not None:
                digest.update(chunk)
            offset += len(chunk)
            with self._cond:
                self._filled[index] = offset - start
                self._cond.notify_all()
            if self._received is not None:
                self._received(len(chunk))

    def _cut_short(self, index: int, attempts: int, failed: TransientStoreError | None) -> RepoError:
        """What a part that did not arrive whole got: TransientStoreError if its request failed (the
        cause said: the body broke off, a 5xx answer...), _EndedEarly if the store ended it early."""
        start, end = self._starts[index], self._part_end(index)
        which = "" if (start, end) == (0, self.size) else f" (bytes {start}-{end} of {self.size})"
        what = f"{self.what}: got {self._filled[index]} of {end - start} bytes{which}"
        if attempts > 1:
            what += f" in {attempts} attempts"
        if failed is not None:
            return TransientStoreError(f"{what}; {failed}")
        return _EndedEarly(f"{what}: the store ended the body early")

    def _pause(self, seconds: float) -> None:
        """Back off before the next attempt; raises at once if the download failed meanwhile."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while (left := deadline - time.monotonic()) > 0:
                self._raise_failure()
                self._cond.wait(left)
            self._raise_failure()

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
                if self._verified:
                    return
                if end < self.size and self._present(start, end):
                    self._served = self._served or start < end  # unverified bytes: no second download
                    return
                self._cond.wait()

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
