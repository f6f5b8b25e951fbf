"""``s3repofs gc``: delete what the repository no longer needs, as a plan first, then its execution.

The plan has six categories, each a list of items (what the CLI prints and ``--json`` shows):

- ``unpublished``: versions unpublished for longer than ``unpublished_ttl`` (and at least
  IN_FLIGHT_AGE), staged on this host and held by no writer or upload, or staged on a host not heard
  of for ``host_gone_after`` (``hosts.last_seen``: mounts record it every pass of their background
  thread, commands when they open the repository). They are discarded: their staged file here goes
  too, and their object if one was uploaded.
- ``expired``: versions expired for longer than ``expired_retention``: purged, the row kept as history
  (state ``purged``, ``purged_at``), the object deleted.
- ``leftover``: objects whose version is discarded or purged (an upload that lost a race with a
  discard, a gc stopped between a purge and its delete).
- ``orphan``: objects no version references at all, stored longer ago than ``orphan_grace``, that
  describe no version the database lacks (see below).
- ``staging``: files in this host's staging area whose version is no longer unpublished and local,
  and empty ones with no row (a crash inside add_file). One with bytes and no row is kept: its row was
  lost (a restore of an older backup), and it may be the only copy of that version.
- ``holders``: hosts gone for longer than ``host_gone_after`` that still have ``holders`` rows (records
  of copies in their caches, meta/holders.py): the rows are dropped (one item per host). A host that
  comes back records its cache again when its mount starts.

Never deleted: an object that a version in state unpublished, published or expired references
(execute looks each key up again just before deleting it), anything under a key starting with '_'
(``backup_prefix`` is there: no file type can start with '_'), and an object whose self-description
names a version the database lacks (ops/unrecorded.py: each orphan candidate gets a HEAD). Rows are
written before objects and never deleted, so such an object is a row lost by a restore of an older
backup, maybe a published file's only copy: the plan lists it as ``unrecorded`` (kept, with a
WARNING), and ``s3repofs fsck --repair`` adopts it. The store is listed page by page
and its keys looked up in the database in batches, so memory stays flat however many objects there
are. ``plan`` refuses (GcRefusedError) when a retained database backup is older than
``expired_retention``: restored, it would name as published versions whose objects gc purged.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Iterable, Iterator

from ..config import Config
from ..domain.lifecycle import VISIBLE_STATES, State, Storage
from ..errors import BeingWrittenError, GcRefusedError, LifecycleError, NotFoundError
from ..meta.metastore import Version
from ..objects.store import ObjectInfo
from ..repo import S3Repo
from . import unrecorded as lost
from .progress import Progress, progress

log = logging.getLogger(__name__)

CATEGORIES = ("unpublished", "expired", "leftover", "orphan", "staging", "holders")
# The states whose objects must stay: every version a reader or a publish may still need.
LIVE_STATES = frozenset(VISIBLE_STATES)
# Keys starting with this are not versions' (file types start with a letter or digit): backups live there.
RESERVED_PREFIX = "_"
# A version is never "stale" younger than this, whatever unpublished_ttl says, and a staged file with no
# row yet is never removed younger than this: add_file writes the staged file, then the row (which the
# database's retries may hold up for minutes), and the writer locks the file only after that. Before
# the lock, nothing else tells gc that the version is being created.
IN_FLIGHT_AGE = 600.0
# What each category deletes, in a line (the CLI prints it beside the counts).
MEANING = {
    "unpublished": "unpublished versions past unpublished_ttl: discarded",
    "expired": "expired versions past expired_retention: purged (rows kept), objects deleted",
    "leftover": "objects of discarded or purged versions: deleted",
    "orphan": "objects no version references, older than orphan_grace, not describing a lost row: deleted",
    "staging": "staged files on this host no unpublished version holds: removed",
    "holders": "hosts gone past host_gone_after: their records of cached copies dropped",
}
# The plan's list of what it keeps: orphan candidates that describe a version the database lacks.
UNRECORDED_MEANING = "objects describing versions the database lacks: KEPT; `s3repofs fsck --repair` adopts them"
LOOKUP_BATCH = 500  # keys per database lookup (and per group of deletes)


@dataclass(frozen=True)
class GcItem:
    key: str  # the object's key; for a staging file, the key it is staged under
    size: int | None  # the bytes it frees, where known
    version_id: int | None = None
    path: str | None = None  # the version's repository path


@dataclass(frozen=True)
class GcPlan:
    now: float
    expired_before: float  # versions expired before this are purged
    unpublished: list[GcItem]
    expired: list[GcItem]
    leftover: list[GcItem]
    orphan: list[GcItem]
    staging: list[GcItem]
    holders: list[GcItem] = field(default_factory=list)  # one per host, its name as the key
    kept: dict[str, int] = field(default_factory=dict)  # what was left alone on purpose: count per reason
    unrecorded: list[GcItem] = field(default_factory=list)  # kept: they describe versions the database lacks

    def items(self, category: str) -> list[GcItem]:
        return getattr(self, category)

    def size(self, category: str) -> int:
        return sum(item.size or 0 for item in self.items(category))

    def as_dict(self) -> dict:
        return {"now": self.now, "expired_before": self.expired_before, "kept": self.kept,
                "categories": {c: {"count": len(self.items(c)), "bytes": self.size(c),
                                   "items": [asdict(item) for item in self.items(c)]} for c in CATEGORIES},
                "unrecorded": [asdict(item) for item in self.unrecorded]}


@dataclass
class GcResult:
    removed: Counter = field(default_factory=Counter)  # per category: versions discarded or purged, objects, files
    bytes_freed: int = 0
    skipped: Counter = field(default_factory=Counter)  # per reason: planned, then found changed and left alone

    def as_dict(self) -> dict:
        return {"removed": {c: self.removed[c] for c in CATEGORIES}, "bytes_freed": self.bytes_freed,
                "skipped": dict(self.skipped)}


# -- the plan --------------------------------------------------------------------------------------


def plan(repo: S3Repo, *, now: float | None = None, oldest_backup_at: float | None = None,
         quiet: bool = True) -> GcPlan:
    """What gc would do at time ``now`` (the repository's clock by default). ``oldest_backup_at``: the
    creation time of the oldest retained database backup, if any (GcRefusedError if it is older
    than ``expired_retention``). Changes nothing (a staged file's lock is taken and released at once
    to see whether a writer holds it)."""
    config = repo.config
    now = repo.meta.clock() if now is None else now
    check_backup_window(config, now, oldest_backup_at)
    kept: Counter = Counter()
    expired_before = now - config.expired_retention
    unpublished = _stale_unpublished(repo, now, kept)
    expired = [_version_item(v, v.size) for v in repo.meta.expired_before(expired_before)]
    leftover, orphan, unrecorded = _sweep_store(repo, now, kept, quiet)
    staging = _sweep_staging(repo, now, kept)
    holders = _gone_holders(repo, now)
    return GcPlan(now, expired_before, unpublished, expired, leftover, orphan, staging, holders, dict(kept),
                  unrecorded)


def check_backup_window(config: Config, now: float, oldest_backup_at: float | None) -> None:
    """GcRefusedError unless every retained backup is younger than ``expired_retention``: a restored
    backup must find the objects of the versions it names as published."""
    if oldest_backup_at is None:
        return
    window = now - oldest_backup_at
    if config.expired_retention <= window:
        raise GcRefusedError(
            f"gc refused: expired_retention ({config.expired_retention:g} s) must be longer than the age of the "
            f"oldest backup kept (backup_keep {config.backup_keep}: the oldest is {window:.0f} s old), or a "
            "restore of it could miss objects gc purged; raise expired_retention or lower backup_keep")


def _stale_unpublished(repo: S3Repo, now: float, kept: Counter) -> list[GcItem]:
    alive = _hosts_alive(repo, now)
    items = []
    for version in repo.meta.unpublished_before(now - max(repo.config.unpublished_ttl, IN_FLIGHT_AGE)):
        if version.origin_host == repo.host:
            if version.storage == Storage.LOCAL and _being_written(repo, version.s3_key):
                kept["unpublished: held by a writer or an upload"] += 1
                continue
        elif version.origin_host in alive:
            kept["unpublished: staged on a host still alive"] += 1
            continue
        items.append(_version_item(version, _unpublished_size(repo, version)))
    return items


def _hosts_alive(repo: S3Repo, now: float) -> set[str]:
    """The hosts heard of within ``host_gone_after`` of ``now`` (a host never heard of is gone)."""
    return {host["name"] for host in repo.meta.hosts() if host["last_seen"] >= now - repo.config.host_gone_after}


def _gone_holders(repo: S3Repo, now: float) -> list[GcItem]:
    """The hosts gone past ``host_gone_after`` (or never heard of) that have holder rows."""
    alive = _hosts_alive(repo, now)
    return [GcItem(host, None) for host in sorted(repo.holder_records.per_host()) if host not in alive]


def _being_written(repo: S3Repo, key: str) -> bool:
    """Does a writer or an upload hold the staged file of ``key``? (The lock, taken at once, is let go.)"""
    try:
        with repo.cache.claim_staged(key, 0):
            return False
    except BeingWrittenError:
        return True


def _unpublished_size(repo: S3Repo, version: Version) -> int | None:
    if version.storage != Storage.LOCAL:
        return version.size
    try:
        return repo.staged_path(version).stat().st_size  # here only if this host staged it
    except OSError:
        return None


def _version_item(version: Version, size: int | None) -> GcItem:
    return GcItem(version.s3_key, size, version.id, str(version.path))


def _sweep_store(repo: S3Repo, now: float, kept: Counter,
                 quiet: bool) -> tuple[list[GcItem], list[GcItem], list[GcItem]]:
    """The store's objects of discarded or purged versions, those no version references, and those no
    version references that describe a version the database lacks (to keep)."""
    grace_before = now - repo.config.orphan_grace
    leftover, orphan, unrecorded = [], [], []
    with progress("gc: listing objects", None, unit="objects", quiet=quiet) as shown:
        for batch in _batches(_version_objects(repo), LOOKUP_BATCH):
            rows = repo.meta.rows_of_keys([obj.key for obj in batch])
            candidates = []
            for obj in batch:
                row = rows.get(obj.key)
                if row is None:
                    if obj.modified is not None and obj.modified < grace_before:
                        candidates.append(obj)
                    else:  # the grace: its row may yet reach this database (restored, or failed over, a moment ago)
                        kept["orphan: younger than orphan_grace"] += 1
                elif row["state"] not in LIVE_STATES:
                    leftover.append(GcItem(obj.key, obj.size, row["id"]))
            _sort_orphans(repo, candidates, orphan, unrecorded, kept)
            shown.advance(len(batch))
    return leftover, orphan, unrecorded


def _sort_orphans(repo: S3Repo, candidates: list[ObjectInfo], orphan: list[GcItem], unrecorded: list[GcItem],
                  kept: Counter) -> None:
    """Add each orphan candidate to ``orphan`` (to delete), or to ``unrecorded`` (to keep) if its
    description names a version the database lacks: its row was lost, not its use."""
    headed = lost.described(repo, candidates)
    lost_rows = lost.lost_rows(repo, headed)
    for info in headed:
        found = lost_rows.get(info.key)
        if found is None:
            orphan.append(GcItem(info.key, info.size))
            continue
        log.warning("gc: keeping object %s: %s: %s", info.key, found.detail(), found.advice())
        kept["orphan: describes a version the database lacks (see fsck)"] += 1
        unrecorded.append(GcItem(info.key, info.size, found.version_id, found.path))


def _version_objects(repo: S3Repo) -> Iterator[ObjectInfo]:
    """Every object of the store that can be a version's, as the store lists them (page by page)."""
    return (obj for obj in repo.store.list() if not obj.key.startswith(RESERVED_PREFIX))


def _sweep_staging(repo: S3Repo, now: float, kept: Counter) -> list[GcItem]:
    """This host's staged files that no unpublished, local version holds."""
    rowless_before = now - max(repo.config.orphan_grace, IN_FLIGHT_AGE)
    items = []
    for batch in _batches(repo.cache.staged_keys(), LOOKUP_BATCH):
        rows = repo.meta.rows_of_keys(batch)
        for key in batch:
            row = rows.get(key)
            if row is not None and (row["state"], row["storage"]) == (State.UNPUBLISHED, Storage.LOCAL):
                continue
            try:
                stat = repo.cache.staging_path(key).stat()
            except FileNotFoundError:  # uploaded or discarded meanwhile
                continue
            if row is None and stat.st_mtime >= rowless_before:
                kept["staging: no row yet, may be being created"] += 1
                continue
            if row is None and stat.st_size > 0:
                # add_file creates the file empty, before its row: bytes without a row are a version whose
                # row was lost (a restore of an older backup), whose only copy this may be.
                kept["staging: bytes with no row (a lost version?): copy it out and add it again"] += 1
                log.warning("gc: keeping %s: %d staged bytes with no version row (lost by a restore of an older "
                            "backup?): this may be their only copy", repo.cache.staging_path(key), stat.st_size)
                continue
            items.append(GcItem(key, stat.st_size, row["id"] if row else None))
    return items


def _batches(values: Iterable, size: int) -> Iterator[list]:
    iterator = iter(values)
    while batch := list(islice(iterator, size)):
        yield batch


# -- the execution ---------------------------------------------------------------------------------


def execute(repo: S3Repo, plan: GcPlan, *, quiet: bool = True) -> GcResult:
    """Do what ``plan`` says, re-checking each item against the database as it goes: an item found
    changed (published again, held by a writer, referenced by a live version) is left alone and
    counted in ``skipped``. Every step is safe to interrupt; the next gc finishes what one left."""
    result = GcResult()
    total = sum(len(plan.items(c)) for c in CATEGORIES)
    with progress("gc", total, unit="items", quiet=quiet) as shown:
        _delete_objects(repo, _discard(repo, plan, result, shown), "unpublished", result, shown)
        _delete_objects(repo, _purge(repo, plan, result, shown), "expired", result, shown)
        _delete_objects(repo, plan.leftover, "leftover", result, shown)
        _delete_objects(repo, plan.orphan, "orphan", result, shown)
        _remove_staged(repo, plan.staging, result, shown)
        _drop_holders(repo, plan.holders, result, shown)
    return result


def _discard(repo: S3Repo, plan: GcPlan, result: GcResult, shown: Progress) -> list[GcItem]:
    """Discard the stale unpublished versions; those whose objects were uploaded (to delete next)."""
    uploaded = []
    alive = _hosts_alive(repo, plan.now)
    for item in plan.unpublished:
        shown.advance()
        try:
            version = repo.recorded_version(item.version_id)
            if version.origin_host != repo.host and version.origin_host in alive:
                result.skipped["unpublished: its host is back"] += 1
                continue
            # Held against writers and uploads (on this host) while it is discarded: one that comes
            # after is refused, one that is at it keeps its version.
            with repo.cache.claim_staged(version.s3_key, 0):
                discarded = repo.discard(version)
        except BeingWrittenError:
            result.skipped["unpublished: held by a writer or an upload"] += 1
            continue
        except (LifecycleError, NotFoundError):  # published meanwhile
            result.skipped["unpublished: no longer unpublished"] += 1
            continue
        result.removed["unpublished"] += 1
        if discarded.storage == Storage.UPLOADED:
            uploaded.append(item)
        else:
            result.bytes_freed += item.size or 0
    return uploaded


def _purge(repo: S3Repo, plan: GcPlan, result: GcResult, shown: Progress) -> list[GcItem]:
    """Mark the expired versions purged; those it purged (their objects to delete next).

    The row first, then the object: once purged, no publish can take the version back (purged ->
    published is not a transition), so its object is needed by nobody when it is deleted. The other
    order would let a re-publish between the delete and the row's update publish a version whose
    object is gone. A crash between the two leaves a purged row whose object is still there: the next
    gc lists it as a leftover and deletes it."""
    purged = []
    for item in plan.expired:
        shown.advance()
        if repo.meta.purge(item.version_id, plan.expired_before):
            result.removed["expired"] += 1
            purged.append(item)
        else:
            result.skipped["expired: no longer expired since before the cutoff"] += 1
    return purged


def _delete_objects(repo: S3Repo, items: list[GcItem], category: str, result: GcResult, shown: Progress) -> None:
    """Delete the objects of ``items``, each unless a version in a live state references its key
    (looked up just before, a batch at a time)."""
    counted = category in ("leftover", "orphan")  # the others were counted (and shown) by their discard or purge
    with ThreadPoolExecutor(repo.config.transfer_concurrency, thread_name_prefix="gc-delete") as pool:
        for batch in _batches(items, LOOKUP_BATCH):
            rows = repo.meta.rows_of_keys([item.key for item in batch])
            doomed = []
            for item in batch:
                row = rows.get(item.key)
                if row is not None and row["state"] in LIVE_STATES:
                    log.warning("gc: not deleting object %s: version %d references it, %s", item.key, row["id"],
                                row["state"])
                    result.skipped[f"{category}: object referenced by a live version"] += 1
                elif category == "orphan" and row is not None:
                    result.skipped["orphan: has a row now"] += 1
                else:
                    doomed.append(item)
            for item in pool.map(_deleter(repo), doomed):
                log.info("gc: deleted object %s (%s)", item.key, category)
                result.bytes_freed += item.size or 0
                result.removed[category] += counted
            if counted:
                shown.advance(len(batch))


def _deleter(repo: S3Repo):
    def delete(item: GcItem) -> GcItem:
        repo.store.delete(item.key)  # with its `<key>.path` object, if it has one (S3Store.delete)
        return item

    return delete


def _remove_staged(repo: S3Repo, items: list[GcItem], result: GcResult, shown: Progress) -> None:
    """Remove this host's staged files that no unpublished, local version holds (looked up again),
    each under the staged file's lock: a writer or an upload at it keeps it."""
    for batch in _batches(items, LOOKUP_BATCH):
        rows = repo.meta.rows_of_keys([item.key for item in batch])
        for item in batch:
            shown.advance()
            row = rows.get(item.key)
            if (row is None) != (item.version_id is None) or (
                    row is not None and (row["state"], row["storage"]) == (State.UNPUBLISHED, Storage.LOCAL)):
                result.skipped["staging: its version changed"] += 1
                continue
            try:
                with repo.cache.claim_staged(item.key, 0) as present:
                    if present:
                        os.unlink(repo.cache.staging_path(item.key))
            except BeingWrittenError:
                result.skipped["staging: held by a writer or an upload"] += 1
                continue
            except FileNotFoundError:
                present = False
            if present:
                log.info("gc: removed staged file of %s", item.key)
                result.removed["staging"] += 1
                result.bytes_freed += item.size or 0


def _drop_holders(repo: S3Repo, items: list[GcItem], result: GcResult, shown: Progress) -> None:
    """Drop the holder rows of each host, unless it was heard of again meanwhile."""
    for item in items:
        shown.advance()
        if repo.holder_records.drop_host(item.key, repo.meta.clock() - repo.config.host_gone_after):
            log.info("gc: dropped the holder records of %s, gone", item.key)
            result.removed["holders"] += 1
        else:
            result.skipped["holders: the host is back (or has no rows left)"] += 1
