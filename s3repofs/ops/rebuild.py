"""``s3repofs rebuild``: a repository's metadata written again from its bucket alone, for when every backup is lost.

Each object this project stores describes its version (objects/store.py ``describe``): path, version
id, size, md5, xxh3, origin host, and since schema 4's objects also created time, mode and owner.
Rebuild lists the store, reads each description (HEAD, in parallel), and writes one row per version
into an EMPTY database (meta/rebuild.py): the newest version of each path published, the others
expired. What no object records is reported, not invented: tags, explicit directories and their
modes, publish and expiry times (a published version's is taken as its upload time), mtimes set by
utimens, and which versions were unpublished. A dry run reads everything and writes nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from ..config import Config
from ..domain.lifecycle import Tier
from ..domain.paths import RepoPath
from ..errors import InvalidPathError, NotEmptyError
from ..meta import rebuild as rows
from ..meta import snapshot
from ..meta.db import Database
from ..meta.metastore import MetaStore
from ..objects.store import ObjectInfo, ObjectStore, open_store
from ..repo import S3Repo
from .backup import config_of
from .progress import progress

log = logging.getLogger(__name__)

# What rebuild cannot know, for the report: no object carries it.
NEVER_RECORDED = ("tags", "explicit directories (their mode and owner)", "publish and expiry times",
                  "mtimes set by utimens", "which versions were unpublished, discarded or purged")
# Description fields objects written before they were added lack, and what the rebuilt row takes instead.
DEFAULTED = {"created": "the object's upload time", "mode": "0644", "uid": "0", "gid": "0"}
IN_FLIGHT = 64  # HEADs in flight: enough to hide a round trip, few enough to keep memory flat


@dataclass
class RebuildReport:
    target: str
    dry_run: bool
    objects: int = 0  # listed (backups excluded)
    versions: int = 0  # described well enough to become a row
    published: int = 0
    directories: int = 0
    defaulted: Counter = field(default_factory=Counter)  # description field -> objects that lacked it
    skipped: list[dict] = field(default_factory=list)  # {"key", "why"}: objects that became no row
    seconds: float = 0.0

    @property
    def expired(self) -> int:
        return self.versions - self.published

    def as_dict(self) -> dict:
        return {"target": self.target, "dry_run": self.dry_run, "objects": self.objects, "versions": self.versions,
                "published": self.published, "expired": self.expired, "directories": self.directories,
                "defaulted": dict(self.defaulted), "skipped": self.skipped, "never_recorded": list(NEVER_RECORDED),
                "seconds": round(self.seconds, 3)}


def rebuild(config_or_repo: Config | S3Repo, target_url: str, *, dry_run: bool = False,
            quiet: bool = False, clock=time.time) -> RebuildReport:
    """Write the rows of every version the objects of the configuration's store describe into the empty
    database at ``target_url`` (nothing, with ``dry_run``); NotEmptyError if that database holds a
    repository. The configuration's own database is never opened: it is what was lost."""
    config = config_of(config_or_repo)
    store, backup_prefix = open_store(config), config.backup_prefix
    started = time.monotonic()
    report = RebuildReport(target="", dry_run=dry_run)
    target = Database(target_url)
    try:
        report.target = target.describe()
        meta = MetaStore(target, clock)
        if not dry_run:
            _check_empty(target)
            meta.create_schema()
        recovered = _recovered_versions(store, backup_prefix, report, quiet)
        if dry_run:
            report.versions = sum(1 for _ in recovered)
        else:
            now = clock()
            report.versions = rows.insert_versions(target, recovered, now, duplicate=lambda version: _skip(
                report, version.s3_key, f"version id {version.id} is claimed by another object"))
            report.published = rows.publish_newest(target)
            report.directories = rows.derive_tables(target, now)
            rows.advance_ids(target)
    finally:
        target.close()
    report.seconds = time.monotonic() - started
    log.info("rebuilt %d versions (%d published) from %d objects into %s in %.1f s", report.versions,
             report.published, report.objects, report.target, report.seconds)
    return report


def _check_empty(target: Database) -> None:
    """NotEmptyError if ``target`` holds repository content (an initialised, empty one will do)."""
    held = target.run(snapshot.content_rows, write=False)
    if any(held.values()):
        rows = ", ".join(f"{n} {table}" for table, n in held.items() if n)
        raise NotEmptyError(f"{target.describe()} already holds a repository ({rows}): rebuild writes only into "
                            "an empty database")


def _recovered_versions(store: ObjectStore, backup_prefix: str, report: RebuildReport,
                        quiet: bool) -> Iterator[rows.RecoveredVersion]:
    """The version each object describes, in listing order; objects that describe none go to the report."""
    listed = (info for info in store.list() if not info.key.startswith(backup_prefix))
    with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="rebuild-head") as pool, \
            progress("rebuild: reading object descriptions", None, unit="objects", quiet=quiet) as shown:
        for info in _bounded_map(pool, lambda listed_info: store.head(listed_info.key) or listed_info, listed):
            report.objects += 1
            shown.advance()
            version = _version_of(info, store.bucket, report)
            if version is not None:
                yield version


def _bounded_map(pool: ThreadPoolExecutor, fn, items) -> Iterator:
    """``pool.map`` with at most IN_FLIGHT results pending, so a million items never queue at once."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= IN_FLIGHT:
            yield pending.popleft().result()
    for future in pending:
        yield future.result()


def _skip(report: RebuildReport, key: str, why: str) -> None:
    report.skipped.append({"key": key, "why": why})


def recovered_version(info: ObjectInfo, bucket: str) -> rows.RecoveredVersion | str:
    """The version the object ``info`` (with its description: a HEAD's) describes, as its row would be
    written, or why it describes none. Rebuild's, and fsck --repair's when it adopts an object whose
    row a restore lost: the one way a description becomes a row."""
    described = info.description
    missing = [name for name in ("path", "version", "md5", "size", "origin-host") if not described.get(name)]
    if missing:
        return "no self-description" if len(missing) == 5 else f"its description lacks {', '.join(missing)}"
    try:
        path = RepoPath.parse(described["path"])
        version_id, size = int(described["version"]), int(described["size"])
    except (InvalidPathError, ValueError) as exc:
        return f"its description is invalid: {exc}"
    if size != info.size:
        return f"holds {info.size} bytes, its description says {size}: incomplete or overwritten"
    uploaded_at = info.modified if info.modified is not None else time.time()
    tier = rows.tier_of(info.storage_class)
    archived_at = uploaded_at if tier == Tier.ARCHIVED else None
    # A restore asked for (or done, not yet copied back): thawing, which the next thaw pass finishes or lapses.
    thawing = archived_at if archived_at is not None and info.restore_ongoing is not None else None
    return rows.RecoveredVersion(
        id=version_id, file_type=path.file_type, dir=path.dir, name=path.name, tier=tier,
        archived_at=archived_at, thaw_requested_at=thawing,
        bucket=bucket, s3_key=info.key, size=size, md5=described["md5"], xxh3=described.get("xxh3") or None,
        origin_host=described["origin-host"], mode=int(described.get("mode", 0o644)),
        uid=int(described.get("uid", 0)), gid=int(described.get("gid", 0)),
        created_at=float(described.get("created", uploaded_at)), uploaded_at=uploaded_at)


def _version_of(info: ObjectInfo, bucket: str, report: RebuildReport) -> rows.RecoveredVersion | None:
    """``recovered_version``, with what it defaulted or why it skipped the object counted in ``report``."""
    version = recovered_version(info, bucket)
    if isinstance(version, str):
        _skip(report, info.key, version)
        return None
    for name in DEFAULTED:
        if name not in info.description:
            report.defaulted[name] += 1
    return version
