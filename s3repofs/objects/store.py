"""The object store interface: where version bytes live, what each object says about itself, and
``open_store``, which picks the implementation a configuration names.

Two implementations: ``localdir.LocalStore`` (a directory) and ``s3.S3Store`` (an S3 bucket).
``put`` verifies what the store holds afterwards (size; S3 checks each body's Content-MD5 itself);
``download`` verifies size and md5 of what it wrote before returning. Every object carries its own
description (path, type, version id, md5, size, origin host) so the metadata could be rebuilt from
the store alone. Errors are RepoErrors: ObjectMissingError, VerificationError,
StoreUnavailableError (with the cause, never a secret; TransientStoreError for what a later attempt
may mend: see ``retry``), ArchivedError (an object in an archive storage class that is not restored).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote, unquote

from ..domain.content import Content
from ..errors import RepoError


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    description: dict[str, str]  # the object's self-description (empty if it has none)
    storage_class: str = "STANDARD"
    modified: float | None = None  # when it was stored (Last-Modified), seconds since the epoch
    # An object in an archive class (a HEAD's; a listing does not say): None if no restore was asked for
    # (or its restored copy expired), True while the restore runs, False once a restored copy is readable.
    restore_ongoing: bool | None = None


def describe(*, path: str, file_type: str, version_id: int, content: Content, origin_host: str,
             created_at: float, mode: int, uid: int, gid: int) -> dict[str, str]:
    """An object's self-description: enough for ``s3repofs rebuild`` to write its version's row again.
    Values are percent-encoded: S3 user metadata must be ASCII."""
    values = {"path": path, "type": file_type, "version": str(version_id), "md5": content.md5,
              "xxh3": content.xxh3, "size": str(content.size), "origin-host": origin_host,
              "created": repr(created_at), "mode": str(mode), "uid": str(uid), "gid": str(gid)}
    return {k: quote(v, safe="/") for k, v in values.items()}


def read_description(metadata: dict[str, str]) -> dict[str, str]:
    return {k: unquote(v) for k, v in metadata.items()}



class ObjectStore(ABC):
    """Where objects live. Keys are unique per version and never reused."""

    bucket: str

    @abstractmethod
    def put(self, key: str, source: Path, size: int, md5: str, description: dict[str, str],
            sent: Callable[[int], None] | None = None) -> bool:
        """Store ``source`` under ``key``; raises VerificationError if the stored object is not ``size``
        bytes, or if it is proven not to have ``md5``. True if the store proved the md5, False if it
        could check only the size (a multipart upload, an ETag that is not an md5). ``sent`` (a progress
        report's) is called with each count of bytes read to be sent, negative when a retry rewinds."""

    @abstractmethod
    def stream(self, key: str, start: int, end: int, size: int) -> Iterator[bytes]:
        """The bytes in [start, end) of the object of ``size`` bytes, in chunks (``transfer.Download``
        verifies them)."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and description, or None if it does not exist."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (descriptions may be empty: listing does not fetch them)."""

    def describe_location(self) -> str:
        return self.bucket

    # -- archive storage classes (ops/archive.py): a store without them refuses ---------------------

    def set_storage_class(self, key: str, storage_class: str, size: int) -> None:
        """Move the object (of ``size`` bytes) into ``storage_class`` in place, its bytes and description kept:
        to an archive class, or back to STANDARD once restored (ArchivedError if it is not restored)."""
        raise RepoError(f"{self.describe_location()} has no archive storage classes")

    def request_restore(self, key: str, days: int) -> None:
        """Ask for a readable copy of an archived object, kept ``days`` days once made (``head``'s
        ``restore_ongoing`` says how it goes). Asking again while a restore runs is not an error."""
        raise RepoError(f"{self.describe_location()} has no archive storage classes")



def open_store(config) -> ObjectStore:
    # Imported here, not at the top: each implementation imports this interface.
    from .localdir import LocalStore
    from .s3 import S3Store

    if config.object_dir is not None:
        return LocalStore(config.object_dir)
    return S3Store(config.default_s3_bucket, endpoint_url=config.s3_endpoint_url, region=config.s3_region,
                   access_key=config.s3_access_key, secret_key=config.s3_secret_key,
                   multipart_threshold=config.multipart_threshold,
                   multipart_chunksize=config.multipart_chunksize, concurrency=config.transfer_concurrency)


def open_backup_store(config) -> ObjectStore:
    """Where database backups go: the bucket ``backup_s3_bucket`` names (on the same endpoint, with the same
    credentials), else the objects' own store; the caller keeps them under ``backup_prefix``."""
    from .s3 import S3Store

    if config.backup_s3_bucket is None:
        return open_store(config)
    return S3Store(config.backup_s3_bucket, endpoint_url=config.s3_endpoint_url, region=config.s3_region,
                   access_key=config.s3_access_key, secret_key=config.s3_secret_key,
                   multipart_threshold=config.multipart_threshold,
                   multipart_chunksize=config.multipart_chunksize, concurrency=config.transfer_concurrency)
