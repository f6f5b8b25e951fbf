"""Repository paths: ``<type>/<dirs...>/<name>``, validated before they reach SQL or S3.

A path is split into ``file_type`` (the first component), ``dir`` (the middle components joined by
``/``, ``""`` for a file directly under its type) and ``name``: listing a directory is then an
equality query on ``(file_type, dir)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidPathError, NameTooLongError, NotUtf8Error

MAX_NAME_BYTES = 255  # what every common Linux filesystem accepts for one component
PATH_MAX = 4096  # Linux's limit of a path given to a system call, its NUL included
MAX_PATH_BYTES = PATH_MAX - 1  # a repository path can be given to a system call as it is
_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, order=True)
class RepoPath:
    file_type: str
    dir: str
    name: str

    @classmethod
    def parse(cls, path: str) -> "RepoPath":
        """Parse and validate ``type/dirs.../name``; raises InvalidPathError saying why."""
        parts = split_components(path)
        if len(parts) < 2:
            raise InvalidPathError(f"invalid path {path!r}: expected <type>/<name>")
        validate_type(parts[0])
        return cls(parts[0], "/".join(parts[1:-1]), parts[-1])

    def __str__(self) -> str:
        return "/".join(p for p in (self.file_type, self.dir, self.name) if p)

    @property
    def parent(self) -> "DirPath":
        return DirPath(self.file_type, self.dir)


@dataclass(frozen=True, order=True)
class DirPath:
    """A directory inside a type; ``dir == ""`` is the type's own top directory."""

    file_type: str
    dir: str

    @classmethod
    def parse(cls, path: str) -> "DirPath":
        parts = split_components(path)
        if not parts:
            raise InvalidPathError(f"invalid directory {path!r}: expected <type>[/<dirs>]")
        validate_type(parts[0])
        return cls(parts[0], "/".join(parts[1:]))

    def __str__(self) -> str:
        return f"{self.file_type}/{self.dir}" if self.dir else self.file_type

    @property
    def parent_dir(self) -> str | None:
        """The parent's ``dir`` within the same type, or None for a type's top directory."""
        if not self.dir:
            return None
        return self.dir.rpartition("/")[0]

    def ancestors(self) -> list["DirPath"]:
        """This directory and every directory above it within its type, top first."""
        parts = self.dir.split("/") if self.dir else []
        return [DirPath(self.file_type, "/".join(parts[:i])) for i in range(len(parts) + 1)]

    def child(self, name: str) -> "RepoPath":
        validate_component(name)
        return RepoPath(self.file_type, self.dir, name)


def split_components(path: str) -> list[str]:
    """Split a relative repository path into validated components.

    Refuses absolute paths, ``.``/``..``, empty components (``a//b``), NUL and over-long names, so
    nothing built from a user's path can escape the repository's directories or S3 prefix.
    """
    if not isinstance(path, str):
        raise InvalidPathError(f"invalid path {path!r}: not a string")
    if path == "":
        raise InvalidPathError("invalid path '': empty")
    if path.startswith("/"):
        raise InvalidPathError(f"invalid path {path!r}: must be relative to the repository")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise NameTooLongError(f"invalid path {path[:60]!r}...: longer than {MAX_PATH_BYTES} bytes")
    parts = path.rstrip("/").split("/")
    for part in parts:
        validate_component(part, path)
    return parts


def validate_component(name: str, path: str | None = None) -> None:
    where = f"invalid path {path!r}" if path is not None else f"invalid name {name!r}"
    if name in ("", ".", ".."):
        raise InvalidPathError(f"{where}: empty, '.' or '..' component")
    if "\0" in name:
        raise InvalidPathError(f"{where}: contains a NUL character")
    if "/" in name:
        raise InvalidPathError(f"{where}: a name cannot contain '/'")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # bytes the FUSE layer decoded with surrogateescape
        raw = name.encode("utf-8", "surrogateescape")
        raise NotUtf8Error(f"invalid name {raw!r}: not valid UTF-8 (names are stored as UTF-8 text)") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise NameTooLongError(f"{where}: a component is longer than {MAX_NAME_BYTES} bytes")


def validate_type(file_type: str) -> None:
    """Types name S3 prefixes and top-level directories: keep them to a portable alphabet."""
    validate_component(file_type)
    if not _TYPE_RE.match(file_type):
        raise InvalidPathError(
            f"invalid file type {file_type!r}: use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
