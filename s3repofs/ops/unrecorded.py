"""Tells which unreferenced objects describe a version the database lacks (a lost row), and adopts them.

Rows are written before their objects are uploaded and never deleted (discarded and purged rows
stay), so an object whose self-description (objects/store.py ``describe``) names a version id the
database does not hold is not garbage: its row was lost, by a restore of a backup older than the
newest writes (or a fail-over to a stale replica). gc keeps such objects instead of deleting them as
orphans (ops/gc.py), fsck reports them as ``unrecorded`` (ops/fsck.py), and ``fsck --repair`` adopts
them here: it writes the row the description gives (ops/rebuild.py ``recovered_version``, the one way
a description becomes a row) as expired, so nothing is published again behind the operator's back.

An object whose description names no path and version id (not ours, or a partial upload) is an
orphan; so is a copy of a recorded version (the row of its id holds the same size and md5 under
another key). A version id the database has handed out again since the restore, to other bytes,
is reported and never adopted: the id is the other version's now.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..domain.lifecycle import State
from ..domain.paths import DirPath, RepoPath
from ..meta import rebuild as rows
from ..objects.store import ObjectInfo
from ..repo import S3Repo
from .rebuild import recovered_version

HEADS_IN_FLIGHT = 16  # HEADs of unreferenced objects at a time (they are few: this hides the round trips)


@dataclass(frozen=True)
class Unrecorded:
    """An object that describes a version the database lacks."""

    key: str
    size: int
    version_id: int
    path: str
    problem: str | None = None  # why it cannot be adopted; None if fsck --repair can

    def detail(self) -> str:
        lacks = f"object describes version {self.version_id} of {self.path}; the database has no such version"
        return lacks if self.problem is None else f"{lacks}; it cannot be adopted: {self.problem}"

    def advice(self) -> str:
        return "run `s3repofs fsck --repair` to adopt it" if self.problem is None else "see `s3repofs fsck`"


def described(repo: S3Repo, listed: list[ObjectInfo]) -> list[ObjectInfo]:
    """``listed`` with each object's self-description (a HEAD each, in parallel); one deleted meanwhile
    stays as listed, without one."""
    if not listed:
        return []
    with ThreadPoolExecutor(min(HEADS_IN_FLIGHT, len(listed)), thread_name_prefix="head") as pool:
        return [head or info for info, head in zip(listed, pool.map(lambda info: repo.store.head(info.key), listed))]


def lost_rows(repo: S3Repo, objects: list[ObjectInfo]) -> dict[str, Unrecorded]:
    """Of ``objects`` (whose keys no row references, with their descriptions: see ``described``), those
    that describe a version the database lacks, by key."""
    claims = {info.key: (info, claim) for info in objects if (claim := _claim(info)) is not None}
    recorded = rows.rows_of_ids(repo.db, [version_id for _info, (version_id, _path) in claims.values()])
    found = {}
    for key, (info, (version_id, path)) in claims.items():
        row = recorded.get(version_id)
        if row is None:
            version = recovered_version(info, repo.store.bucket)
            found[key] = Unrecorded(key, info.size, version_id, path, version if isinstance(version, str) else None)
        elif row["s3_key"] != key and (row["size"], row["md5"]) != (info.size, info.description.get("md5")):
            found[key] = Unrecorded(key, info.size, version_id, path, _taken(version_id, row["s3_key"]))
    return found


def _claim(info: ObjectInfo) -> tuple[int, str] | None:
    """The version id and path the object's description names, if it names both."""
    path, version = info.description.get("path"), info.description.get("version")
    if not path or not version:
        return None
    try:
        return int(version), path
    except ValueError:
        return None


def _taken(version_id: int, key: str) -> str:
    return f"version {version_id} is another object's ({key}): the id was handed out again since the row was lost"


def adopt(repo: S3Repo, key: str) -> tuple[rows.RecoveredVersion | None, str]:
    """Write the row of the version the object at ``key`` describes (HEADed again), as expired now, with
    its directories; the version (None if not adopted) and what happened, for the report."""
    info = repo.store.head(key)
    if info is None:
        return None, "the object is gone"
    version = recovered_version(info, repo.store.bucket)
    if isinstance(version, str):
        return None, f"not adopted: {version}"
    if repo.meta.rows_of_keys([key]):
        return None, "a row references it now"
    now = repo.meta.clock()
    # The directories first: a stop between leaves an empty directory, not a version no listing shows.
    rows.ensure_directories(repo.db, [DirPath(version.file_type, version.dir)], now)
    if not rows.insert_versions(repo.db, [version], now, duplicate=lambda _version: None):
        row = rows.rows_of_ids(repo.db, [version.id]).get(version.id)
        return None, f"not adopted: {_taken(version.id, row['s3_key'] if row else '?')}"
    rows.advance_ids(repo.db)  # PostgreSQL's sequence past the adopted id (a restore set it back)
    return version, f"adopted as expired: {_how_to_publish(repo, version)}"


def _how_to_publish(repo: S3Repo, version: rows.RecoveredVersion) -> str:
    path = RepoPath(version.file_type, version.dir, version.name)
    current = repo.meta.find(path, State.PUBLISHED)
    if current is None:
        return f"`s3repofs publish {path}` publishes it again"
    return (f"{path} has published version {current.id}: `s3repofs publish --version {version.id} {path}` "
            "publishes this one instead")
