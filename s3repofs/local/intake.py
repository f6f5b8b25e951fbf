"""Bringing a local file's bytes into the staging area, by copy or by move (a rename when it can be one).

The order that loses nothing (``S3Repo.add_file`` drives it): the version's row and its empty staged
file exist first; then the bytes arrive in the staged file, by ``os.rename`` of the source over it (same
file system: atomic, no byte copied) or by a copy hashed as it is read (one read) and fsynced; the
staging directory is fsynced; only then is a copied source unlinked (``Intake.unlink_source``), by a
move, once the version is recorded (and uploaded, if the command uploads). At every instant the bytes
are at the source, or staged under a row that the retry and gc know.

A source with other hard links is copied, not renamed: its other names must not share the staged inode
(a write through one of them would change a version's bytes).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import xxhash

from ..domain.content import CHUNK, Content
from ..errors import AlreadyExistsError, CallerError, NotFoundError, UsageError
from .atomic import fsync_directory


class CannotMoveError(CallerError):
    """A move of a source this user cannot unlink: refused before anything is done."""

    errno = errno.EACCES


def check_source(source: Path, move: bool) -> os.stat_result:
    """The status of ``source`` if it can be added (a regular file; for a move, one this user may unlink);
    a one-line error otherwise, before anything is done."""
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise NotFoundError(f"{source}: no such local file") from None
    except OSError as exc:
        raise NotFoundError(f"{source}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{source}: is a directory; add its files one by one")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{source}: not a regular file")
    if move and os.path.islink(source):  # a rename would move the link, not the file
        raise UsageError(f"{source}: a symbolic link; move the file it points to")
    if move:
        _check_unlinkable(source, st)
    return st


def _check_unlinkable(source: Path, st: os.stat_result) -> None:
    parent = os.path.dirname(os.path.abspath(source))
    why = None
    if not os.access(parent, os.W_OK | os.X_OK):  # also false on a read-only file system, even for root
        why = f"no write access to {parent}"
    else:
        parent_st = os.stat(parent)
        euid = os.geteuid()
        if parent_st.st_mode & stat.S_ISVTX and euid not in (0, st.st_uid, parent_st.st_uid):
            why = f"{parent} is sticky and the file is another user's"
    if why:
        raise CannotMoveError(f"{source}: cannot move it ({why}); nothing was done")


@dataclass
class Intake:
    """How a source's bytes reached the staging area: ``renamed`` (the source is the staged file now), or
    copied (``content`` was hashed on the way; the source is still there until ``unlink_source``)."""

    source: Path
    staged: Path
    renamed: bool
    content: Content | None

    def unlink_source(self) -> None:
        """End a move by copy: remove the source (its bytes are staged, fsynced, and recorded)."""
        if not self.renamed:
            os.unlink(self.source)
            fsync_directory(self.source.parent)

    def put_back(self) -> None:
        """Undo a move by rename: the bytes go back to the source's name (a link, then the staged name
        goes: at every instant one of the names holds them). AlreadyExistsError if the name is taken."""
        if not self.renamed:
            return
        try:
            os.link(self.staged, self.source)
        except FileExistsError:
            raise AlreadyExistsError(f"{self.source} exists again; the bytes stay staged at {self.staged}") from None
        os.unlink(self.staged)
        fsync_directory(self.source.parent)
        self.renamed = False


def rename_in(source: Path, source_stat: os.stat_result, staged: Path) -> bool:
    """Move ``source`` over the (empty) staged file if both are on one file system and the source has
    no other name; False when the bytes must be copied instead."""
    if source_stat.st_nlink != 1 or source_stat.st_dev != os.stat(staged.parent).st_dev:
        return False
    try:
        os.rename(source, staged)
    except OSError as exc:
        if exc.errno == errno.EXDEV:  # one device number, two mounts (a bind mount): copy
            return False
        raise
    return True  # not yet durable: the caller fsyncs both directories


def copy_in(source: Path, fd: int, copied: Callable[[int], None] | None = None) -> Content:
    """Copy ``source`` into the open staged file ``fd``, hashing each chunk as it goes, then fsync it;
    what the bytes are. ``copied`` is told each count of bytes copied (a progress report's)."""
    md5, xxh3, size = hashlib.md5(), xxhash.xxh3_128(), 0
    with open(source, "rb", buffering=0) as src:
        while chunk := src.read(CHUNK):
            md5.update(chunk)
            xxh3.update(chunk)
            _write_all(fd, chunk)
            size += len(chunk)
            if copied is not None:
                copied(len(chunk))
    os.fsync(fd)
    return Content(size, md5.hexdigest(), xxh3.hexdigest())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
