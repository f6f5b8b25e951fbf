"""What the mount shows at a path: mount paths parsed, and the attributes of its files and directories.

A mount path is ``/<state>/<type>/<dirs>/<name>``: the state's tree comes first (``STATES``), then the
repository path. An ``Entry`` is what ``stat`` answers for a file or a directory; a file's entry also
carries its version, whose row gives the ``user.s3repo.*`` extended attributes.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from ..domain.lifecycle import State
from ..domain.paths import DirPath, RepoPath, split_components
from ..errors import NameTooLongError, NotFoundError
from ..meta.metastore import Directory, Version

# The mount's top-level directories, one per visible state, in the order the root lists them.
STATES = (State.PUBLISHED, State.UNPUBLISHED, State.EXPIRED)
XATTR_PREFIX = "user.s3repo."
TAG_PREFIX = "tag."  # user.s3repo.tag.KEY: a tag of the version, settable and removable
READ_ONLY = 0o7555  # the permission bits expired/ keeps: its versions can be read, never changed
ALL_BITS = 0o7777


def tag_key(name: str) -> str | None:
    """The KEY of an attribute ``user.s3repo.tag.KEY``; None for any other name (or an empty KEY)."""
    prefix = XATTR_PREFIX + TAG_PREFIX
    return name[len(prefix):] or None if name.startswith(prefix) else None


@dataclass(frozen=True)
class Location:
    """A mount path, parsed: the state tree it is in and its components below the state."""

    state: State | None  # None for the mount's root
    parts: tuple[str, ...]

    @property
    def file(self) -> RepoPath | None:
        return RepoPath(self.parts[0], "/".join(self.parts[1:-1]), self.parts[-1]) if len(self.parts) >= 2 else None

    @property
    def directory(self) -> DirPath | None:
        return DirPath(self.parts[0], "/".join(self.parts[1:])) if self.parts else None


def parse_path(path: str | None, max_path_bytes: int) -> Location:
    """The location of a mount path. NotFoundError outside the state trees (and for no path: libfuse
    names none for a file unlinked while open); NameTooLongError past ``max_path_bytes``."""
    if path is None:
        raise NotFoundError("the file was removed while open")
    if len(path.encode("utf-8", "surrogateescape")) > max_path_bytes:
        raise NameTooLongError(f"{path[:60]}...: longer than the {max_path_bytes} bytes the mount point "
                               "leaves of PATH_MAX")
    parts = split_components(path.strip("/")) if path.strip("/") else []
    if not parts:
        return Location(None, ())
    if parts[0] not in STATES:
        raise NotFoundError(f"{path}: not in published/, unpublished/ or expired/")
    return Location(State(parts[0]), tuple(parts[1:]))


@dataclass(frozen=True)
class Entry:
    """The attributes of a file or a directory, as ``stat`` answers them."""

    is_dir: bool
    mode: int  # permission bits
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    version: Version | None = None
    nlink: int = 1  # a file's: 0 once unlinked while open; a directory's: 2 + its subdirectories

    @property
    def st_mode(self) -> int:
        return (stat.S_IFDIR if self.is_dir else stat.S_IFREG) | self.mode


BLOCK_SIZE = 1024 * 1024  # st_blksize: the I/O size the kernel is told to prefer


def blocks(size: int) -> int:
    """st_blocks: 512-byte blocks, as if the file's bytes were all on disk."""
    return (size + 511) // 512


def ns(seconds: float | None) -> int:
    return int((seconds or 0) * 1e9)


def file_entry(version: Version, state: State) -> Entry:
    mode = version.mode & (READ_ONLY if state == State.EXPIRED else ALL_BITS)
    changed = version.expired_at if state == State.EXPIRED else version.published_at or version.created_at
    modified = version.modified_ns
    return Entry(False, mode, version.uid, version.gid, version.size or 0, modified,
                 max(ns(changed), modified), version)


def dir_entry(directory: Directory, state: State) -> Entry:
    mode = directory.mode & (READ_ONLY if state == State.EXPIRED else ALL_BITS)
    modified = directory.modified_ns
    return Entry(True, mode, directory.uid, directory.gid, 0, modified, modified, nlink=2 + directory.subdirs)


def xattr_values(v: Version) -> dict:
    """The ``user.s3repo.*`` attributes held in the version's row (``tags`` is read separately)."""
    return {"state": v.state, "md5": v.md5, "size": v.size, "s3_key": v.s3_key, "origin_host": v.origin_host,
            "version": v.id, "published_at": v.published_at, "tier": v.shown_tier}
