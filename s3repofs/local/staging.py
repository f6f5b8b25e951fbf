"""The staging area: the files of versions written on this host and not yet uploaded (never evicted),
and the flock protocol that keeps an upload from taking a version while it is being written.

A writer holds a shared flock on the staged file for as long as its descriptor is open, in whichever
process (``open_for_writing``); an upload holds an exclusive one (``claim``), so it waits for the
writers to close, and a writer that comes after it is refused (ReadOnlyError: add a new version).
Once uploaded, the staged file is moved into the cache or removed: a descriptor that is no longer
the file under the staged name is refused too.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from ..errors import BeingWrittenError, ReadOnlyError


class Staging:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def path(self, key: str) -> Path:
        return self.dir / key.replace("/", "%")

    def keys(self) -> Iterator[str]:
        """The key of every file in the staging area (``path``'s inverse: keys hold no '%')."""
        with suppress(FileNotFoundError), os.scandir(self.dir) as entries:
            for entry in entries:
                yield entry.name.replace("%", "/")

    def open_for_writing(self, key: str, truncate: bool = False) -> int:
        """A writer's descriptor of a staged file. It holds a shared lock on the file for as long as it
        is open, in whichever process: no upload takes a version while it is being written
        (``claim``). ReadOnlyError if an upload has taken it (it is being uploaded, or was)."""
        path = self.path(key)
        fd = os.open(path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ReadOnlyError(f"{key}: this staged version is being uploaded; add a new version") from None
            except OSError:  # a file system without flock: writers go unguarded, and uploads cannot tell
                pass
            with suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    if truncate:
                        os.ftruncate(fd, 0)
                    return fd
            raise ReadOnlyError(f"{key}: this staged version was uploaded meanwhile; add a new version")
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def release(fd: int) -> None:
        """Give up a writer's lock (``open_for_writing``) before its descriptor is closed."""
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def claim(self, key: str, wait: float = 0.0) -> Iterator[bool]:
        """Hold the staged file against writers and other uploads (an exclusive lock) until the block
        ends, for its upload. Yields False if there is no staged file (any more: uploaded meanwhile).
        Waits up to ``wait`` seconds for a writer to close or another upload to end, then raises
        BeingWrittenError."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDWR)  # NFS emulates flock with locks that need write access
        except FileNotFoundError:
            fd = -1
        if fd < 0:
            yield False
            return
        try:
            if not _lock_within(fd, wait):
                raise BeingWrittenError(f"{key}: a writer still has this staged version open, or it is being uploaded")
            try:
                still_staged = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                still_staged = False
            yield still_staged
        finally:
            os.close(fd)


def _lock_within(fd: int, wait: float) -> bool:
    """Take an exclusive flock on ``fd`` within ``wait`` seconds (True also where flock is not supported)."""
    deadline, delay = time.monotonic() + wait, 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(2 * delay, 0.1)
        except OSError:  # no flock here (see Staging.open_for_writing)
            return True
