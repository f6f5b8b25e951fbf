"""A handle on one version of a repository file, with the names of the original S3Repo's RepoFile."""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from .domain.lifecycle import State, Storage
from .domain.paths import RepoPath
from .domain.tags import date_tags
from .errors import NotFoundError, ReadOnlyError
from .meta.metastore import Version

if TYPE_CHECKING:
    from .repo import S3Repo


class RepoFile:
    """One version of a repository file. Properties reflect the last read of its row (``refresh()``)."""

    def __init__(self, repo: S3Repo, version: Version) -> None:
        self.repo = repo
        self.version = version

    def __repr__(self) -> str:
        return f"<RepoFile {self.path} version={self.id} state={self.state}>"

    # properties of the original API
    id = property(lambda self: self.version.id)
    path = property(lambda self: str(self.version.path))
    file_type = property(lambda self: self.version.file_type)
    state = property(lambda self: self.version.state)
    storage = property(lambda self: self.version.storage)
    tier = property(lambda self: self.version.shown_tier)  # fresh, archived or thawing
    md5 = property(lambda self: self.version.md5)
    file_size = property(lambda self: self.version.size)
    s3_key = property(lambda self: self.version.s3_key)
    bucket = property(lambda self: self.version.bucket)
    origin_host = property(lambda self: self.version.origin_host)
    created_at = property(lambda self: self.version.created_at)
    uploaded_at = property(lambda self: self.version.uploaded_at)
    published_at = property(lambda self: self.version.published_at)
    expired_at = property(lambda self: self.version.expired_at)

    def refresh(self) -> "RepoFile":
        self.version = self.repo.meta.get(self.id)
        return self

    def touch(self, content: str | bytes = b"") -> "RepoFile":
        """Replace the staged content of this unpublished version."""
        with self.open("wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
        return self

    def open(self, mode: str = "r") -> IO:
        """Open for reading (any version with bytes) or writing ("w"/"wb": unpublished, not yet uploaded)."""
        if mode not in ("r", "rb", "w", "wb"):
            raise ValueError(f"unsupported mode {mode!r}: use r, rb, w or wb")
        if mode.startswith("w"):
            self.refresh()
            if self.state != State.UNPUBLISHED or self.storage != Storage.LOCAL:
                raise ReadOnlyError(f"{self.path}: version {self.id} is {self.state}/{self.storage}; "
                                    "its content is immutable (add a new version)")
            try:
                fd = self.repo.cache.open_staged_for_writing(self.s3_key, truncate=True)
            except FileNotFoundError:
                raise NotFoundError(f"{self.path}: version {self.id} was staged on {self.origin_host}") from None
            raw: BinaryIO = open(fd, "wb")
            return raw if mode == "wb" else io.TextIOWrapper(raw, encoding="utf-8")
        local = self.repo.local_file(self.version)
        return open(local, "rb") if mode == "rb" else open(local, "r", encoding="utf-8")

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def local_path(self) -> Path:
        return self.repo.local_file(self.version)

    def upload(self) -> "RepoFile":
        self.version = self.repo.upload(self.refresh().version)
        return self

    def publish(self, path: str | None = None) -> "RepoFile":
        target = RepoPath.parse(path) if path is not None else None
        self.version = self.repo.publish(self.refresh().version, target)
        return self

    def expire(self) -> "RepoFile":
        self.version = self.repo.expire(self.version)
        return self

    @property
    def tags(self) -> dict[str, str]:
        return self.repo.meta.tags(self.id)

    def tag(self, key: str, value: str | None = None) -> "RepoFile":
        """Tag this version (``value`` None: a tag with no value, read back as ""); replaces the key's value."""
        self.repo.set_tag(self.id, key, value)
        return self

    def untag(self, key: str) -> "RepoFile":
        self.repo.remove_tag(self.id, key)
        return self

    @property
    def date_tags(self) -> dict[str, str]:
        """The hour, day, week, month and year of ``created_at`` (UTC), as ``repo.find(date=...)`` takes them."""
        return date_tags(self.created_at)

    def as_dict(self) -> dict:
        v = self.version
        return {"path": self.path, "version": v.id, "state": v.state, "storage": v.storage, "tier": v.shown_tier,
                "size": v.size, "md5": v.md5, "bucket": v.bucket, "s3_key": v.s3_key,
                "origin_host": v.origin_host, "mode": v.mode, "uid": v.uid, "gid": v.gid,
                "created_at": v.created_at, "uploaded_at": v.uploaded_at, "published_at": v.published_at,
                "expired_at": v.expired_at, "archived_at": v.archived_at, "thaw_requested_at": v.thaw_requested_at}
