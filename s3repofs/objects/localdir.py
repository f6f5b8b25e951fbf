"""The object store in a local directory: objects as files, written atomically.

The embedded default, and a fast stand-in for S3 in tests. It emulates S3's archive storage classes, so
every path of archive and thaw runs without S3: ``tiers/<key>.json`` beside an object records its class
and its restore (none: STANDARD). A restore is ready ``restore_seconds`` after it is asked for (0: at
once) and its copy lasts the days asked for, both by ``clock``, which tests may set.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from ..domain.content import CHUNK
from ..domain.lifecycle import ARCHIVE_CLASSES
from ..errors import (
    DISK_FULL_ERRNOS,
    ArchivedError,
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
        self.restore_seconds = 0.0  # how long an emulated restore runs
        self.clock = time.time  # the emulated restores' time

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
        if self._archived(self._tier(key)):  # as S3 answers InvalidObjectState
            raise ArchivedError(f"object {key} is archived in {self.describe_location()}; restore (thaw) it first")
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
        tier = self._tier(key)
        return ObjectInfo(key, stat.st_size, read_description(description), tier.get("class", "STANDARD"),
                          stat.st_mtime, self._restore_ongoing(tier))

    def delete(self, key: str) -> None:
        with self._errors(key):
            for path in (self._data(key), self._meta(key), self._tier_path(key)):
                path.unlink(missing_ok=True)

    # -- archive storage classes, emulated --------------------------------------------------------

    def set_storage_class(self, key: str, storage_class: str, size: int) -> None:
        tier = self._tier(key)
        with self._errors(key):
            if self._archived(tier):  # S3 copies only a restored archived object
                raise ArchivedError(f"object {key} is archived in {self.describe_location()}; restore it first")
            os.utime(self._data(key))  # a copy in place: a new Last-Modified, as S3's
            if storage_class == "STANDARD":
                self._tier_path(key).unlink(missing_ok=True)
            else:  # the copy has no restore, as on S3
                self._write_tier(key, {"class": storage_class})

    def request_restore(self, key: str, days: int) -> None:
        tier = self._tier(key)
        if not self._data(key).exists():
            raise ObjectMissingError(f"object {key} is missing from {self.describe_location()}")
        if tier.get("class") not in ARCHIVE_CLASSES:
            raise RepoError(f"object {key} in {self.describe_location()} is not in an archive storage class")
        now, ongoing = self.clock(), self._restore_ongoing(tier)
        if ongoing:
            return
        ready = now if ongoing is False else now + self.restore_seconds  # restored already: a longer stay
        self._write_tier(key, {**tier, "ready_at": ready, "until": ready + days * 86400})

    def _tier_path(self, key: str) -> Path:
        return self.root / "tiers" / (key + ".json")

    def _tier(self, key: str) -> dict:
        """The object's class and restore: {} for STANDARD."""
        try:
            return json.loads(self._tier_path(key).read_text())
        except FileNotFoundError:
            return {}

    def _write_tier(self, key: str, tier: dict) -> None:
        with self._errors(key):
            _atomic_write(self._tier_path(key), lambda f: f.write(json.dumps(tier).encode()))

    def _restore_ongoing(self, tier: dict) -> bool | None:
        if tier.get("class") not in ARCHIVE_CLASSES or "ready_at" not in tier or self.clock() >= tier["until"]:
            return None
        return self.clock() < tier["ready_at"]

    def _archived(self, tier: dict) -> bool:
        """In an archive class, and not readable: no restored copy."""
        return tier.get("class") in ARCHIVE_CLASSES and self._restore_ongoing(tier) is not False

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
