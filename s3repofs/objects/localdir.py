"""The object store in a local directory: objects as files, written atomically.

The embedded default, and a fast stand-in for S3 in tests.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from ..domain.content import CHUNK
from ..errors import (
    DISK_FULL_ERRNOS,
    NoSpaceError,
    ObjectMissingError,
    RepoError,
    StoreUnavailableError,
    VerificationError,
)
from ..local.atomic import atomic_write
from .store import ObjectInfo, ObjectStore, read_description


def copy_verified(source: BinaryIO, dest: BinaryIO, what: str, size: int, md5: str,
                  sent: Callable[[int], None] | None = None) -> None:
    """Copy a stream, then check that exactly ``size`` bytes with ``md5`` went through."""
    digest = hashlib.md5()
    copied = 0
    while chunk := source.read(CHUNK):
        digest.update(chunk)
        dest.write(chunk)
        copied += len(chunk)
        if sent is not None:
            sent(len(chunk))
    check_content(what, copied, digest.hexdigest(), size, md5)


def check_content(what: str, size: int, md5: str, expected_size: int, expected_md5: str) -> None:
    if size != expected_size:
        raise VerificationError(f"{what}: size {size} does not match the recorded {expected_size}")
    if md5 != expected_md5:
        raise VerificationError(f"{what}: md5 {md5} does not match the recorded {expected_md5}")



class LocalStore(ObjectStore):
    """Objects as files under a directory: ``data/<key>`` and ``meta/<key>.json``.

    The embedded default, and a fast stand-in for S3 in tests. Writes are atomic (temp + fsync + rename).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bucket = "local"

    def describe_location(self) -> str:
        return f"local object directory {self.root}"

    def _data(self, key: str) -> Path:
        return self.root / "data" / key

    def _meta(self, key: str) -> Path:
        return self.root / "meta" / (key + ".json")

    def put(self, key: str, source: Path, size: int, md5: str, description: dict[str, str],
            sent: Callable[[int], None] | None = None) -> bool:
        with self._errors(key):
            with open(source, "rb") as src:
                _atomic_write(self._data(key), lambda f: copy_verified(src, f, f"upload of {key}", size, md5, sent))
            _atomic_write(self._meta(key), lambda f: f.write(json.dumps(description).encode()))
            stored = self._data(key).stat().st_size
        if stored != size:
            raise VerificationError(f"upload of {key}: stored {stored} bytes, expected {size}")
        return True

    def stream(self, key: str, start: int, end: int, size: int) -> Iterator[bytes]:
        with self._errors(key), open(self._data(key), "rb") as src:
            src.seek(start)
            while start < end and (chunk := src.read(min(CHUNK, end - start))):
                start += len(chunk)
                yield chunk

    def head(self, key: str) -> ObjectInfo | None:
        try:
            stat = self._data(key).stat()
        except FileNotFoundError:
            return None
        with self._errors(key):
            try:
                description = json.loads(self._meta(key).read_text())
            except FileNotFoundError:
                description = {}
        return ObjectInfo(key, stat.st_size, read_description(description), modified=stat.st_mtime)

    def delete(self, key: str) -> None:
        with self._errors(key):
            for path in (self._data(key), self._meta(key)):
                path.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        data = str(self.root / "data")
        for dirpath, _dirs, files in os.walk(data):
            # Plain strings, not Path objects: a gc listing a million objects spends its time here.
            relative = dirpath[len(data) + 1:] + "/" if dirpath != data else ""
            for name in files:
                key = relative + name
                if name.startswith(".tmp-") or not key.startswith(prefix):
                    continue
                stat = os.stat(os.path.join(dirpath, name))
                yield ObjectInfo(key, stat.st_size, {}, modified=stat.st_mtime)

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except RepoError:
            raise
        except FileNotFoundError:
            raise ObjectMissingError(f"object {key} is missing from {self.describe_location()}") from None
        except OSError as exc:
            message = f"{self.describe_location()}: {key}: {exc.strerror or exc}"
            if exc.errno in DISK_FULL_ERRNOS:  # the caller can free space: it sees ENOSPC, not EIO
                raise NoSpaceError(message, exc.errno) from None
            raise StoreUnavailableError(message) from None


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
