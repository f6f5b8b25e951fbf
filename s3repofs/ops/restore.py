"""``s3repofs restore``: load a backup of the metadata into an empty database, checked against its manifest.

The plan says which backup (the one named, the newest, or with ``newest_intact`` the newest in which
every published version's object exists with its recorded size: the original S3Repo's "roll the
repository back to a backup from before the key went missing"), what the target database holds now
(it must hold no repository unless ``force``), and which newer backups were passed over and why.
Executing it downloads the snapshot, checks its size and sha256 against the manifest, and loads it in
one transaction that also checks the rows per table against the manifest before it commits: a
failure leaves the target as it was. An older schema is migrated on the way (meta/snapshot.py).
"""

from __future__ import annotations

import gzip
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..config import Config, mask_url
from ..domain.lifecycle import State
from ..errors import NotFoundError, UsageError, VerificationError
from ..meta import snapshot
from ..meta.db import Database
from ..meta.schema import SCHEMA_VERSION
from ..objects.store import open_store
from ..repo import S3Repo
from .backup import Backup, BackupListing, BackupStore, config_of
from .progress import progress

HEAD_BATCH = 1000  # published versions checked at a time by newest_intact (memory stays at a batch)


@dataclass(frozen=True)
class Skipped:
    """A newer backup that ``newest_intact`` passed over."""

    backup: str
    reason: str  # e.g. the key of a published version whose object is missing


@dataclass(frozen=True)
class RestorePlan:
    backup: Backup
    target: str  # the target database, described (no password)
    target_rows: dict[str, int]  # what the target holds now: replaced (force), or none
    skipped: list[Skipped] = field(default_factory=list)
    to_url: str = field(default="", repr=False)

    @property
    def replaces(self) -> bool:
        return any(self.target_rows.values())

    def as_dict(self) -> dict:
        return {"backup": self.backup.as_dict(), "target": self.target, "target_rows": self.target_rows,
                "replaces": self.replaces, "skipped": [vars(s) for s in self.skipped]}


@dataclass(frozen=True)
class RestoreResult:
    plan: RestorePlan
    rows: dict[str, int]  # as the restored database counts them
    migrated_from: int | None  # the backup's schema version, if older than this code's
    seconds: float

    def as_dict(self) -> dict:
        return {**self.plan.as_dict(), "rows": self.rows, "migrated_from": self.migrated_from,
                "seconds": round(self.seconds, 3)}


def plan_restore(config_or_repo: Config | S3Repo, backup_name: str | None, to_url: str, *, force: bool = False,
                 newest_intact: bool = False, quiet: bool = True) -> RestorePlan:
    """Which backup goes into which database. NotFoundError for no backups or an unknown name;
    VerificationError for a corrupt manifest; NotEmptyError for a target that holds a repository, unless
    ``force``; DatabaseUnavailableError for a target that cannot be reached."""
    config = config_of(config_or_repo)
    if backup_name is not None and newest_intact:
        raise UsageError("name a backup or ask for the newest intact one, not both")
    _check_url(to_url)
    target = Database(to_url, max_connections=1)
    try:
        with target.transaction(write=False) as tx:
            held = snapshot.content_rows(tx)
    finally:
        target.close()
    if not force:
        snapshot.refuse_content(target, held)
    store = BackupStore(config)
    listing = store.list()
    skipped: list[Skipped] = []
    if backup_name is not None:
        chosen = listing.find(backup_name)
    elif newest_intact:
        chosen, skipped = _newest_intact(config, store, listing, quiet)
    else:
        chosen = listing.newest()
    return RestorePlan(chosen, target.describe(), held, skipped, to_url)


def execute(config_or_repo: Config | S3Repo, plan: RestorePlan, *, quiet: bool = True) -> RestoreResult:
    """Load the plan's backup into its target, replacing what the target holds if the plan says so."""
    started = time.monotonic()
    store = BackupStore(config_of(config_or_repo))
    target = Database(plan.to_url, max_connections=1)
    try:
        with store.fetch(plan.backup) as path:
            with progress(f"restore {plan.backup.name}", sum(plan.backup.rows.values()), unit="rows",
                          quiet=quiet) as bar:
                header, rows = snapshot.load(target, _lines(path), replace=plan.replaces, expected=plan.backup.rows,
                                             advance=bar.advance)
    finally:
        target.close()
    migrated = header.schema_version if header.schema_version < SCHEMA_VERSION else None
    return RestoreResult(plan, rows, migrated, time.monotonic() - started)


def restore(config_or_repo: Config | S3Repo, backup_name: str | None, to_url: str, force: bool = False,
            newest_intact: bool = False, *, quiet: bool = True) -> RestoreResult:
    """Plan, then execute: see ``plan_restore`` for the errors."""
    plan = plan_restore(config_or_repo, backup_name, to_url, force=force, newest_intact=newest_intact, quiet=quiet)
    return execute(config_or_repo, plan, quiet=quiet)


def _newest_intact(config: Config, store: BackupStore, listing: BackupListing,
                   quiet: bool) -> tuple[Backup, list[Skipped]]:
    """The newest backup whose published versions' objects all exist with their recorded sizes."""
    if not listing.backups and not listing.corrupt:
        raise NotFoundError(f"no backups in {store.location}")
    objects = open_store(config)
    problems = dict(listing.corrupt)  # backup -> why it is not intact
    with ThreadPoolExecutor(max(8, 2 * config.transfer_concurrency), thread_name_prefix="head") as pool:
        for backup in reversed(listing.backups):
            try:
                problem = _first_missing(store, objects, backup, pool, quiet)
            except VerificationError as exc:
                problem = str(exc)
            if problem is None:
                return backup, _skipped(problems, newer_than=backup.name)
            problems[backup.name] = problem
    reasons = "; ".join(f"{s.backup}: {s.reason}" for s in _skipped(problems, newer_than=""))
    raise snapshot.SnapshotError(f"no backup in {store.location} is intact ({reasons})")


def _skipped(problems: dict[str, str], newer_than: str) -> list[Skipped]:
    return [Skipped(name, why) for name, why in sorted(problems.items(), reverse=True) if name > newer_than]


def _first_missing(store: BackupStore, objects, backup: Backup, pool: ThreadPoolExecutor,
                   quiet: bool) -> str | None:
    """Why ``backup`` is not intact (the first published version whose object is missing or of another size),
    or None if it is."""

    def check(row: dict) -> str | None:
        info = objects.head(row["s3_key"])
        if info is None:
            return f"the object {row['s3_key']} of published version {row['id']} is missing"
        if info.size != row["size"]:
            return (f"the object {row['s3_key']} of published version {row['id']} has {info.size} bytes, "
                    f"not the recorded {row['size']}")
        return None

    with store.fetch(backup) as path:
        published = (row for row in snapshot.read_rows(_lines(path), "versions") if row["state"] == State.PUBLISHED)
        with progress(f"checking objects of backup {backup.name}", None, unit="HEADs", quiet=quiet) as bar:
            while batch := list(itertools.islice(published, HEAD_BATCH)):
                problems = [p for p in pool.map(check, batch) if p]
                bar.advance(len(batch))
                if problems:
                    return problems[0]
    return None


def _lines(path: Path) -> Iterator[str]:
    """The lines of a gzipped snapshot file, as text, without their newlines."""
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="\n") as text:
            for line in text:
                yield line.rstrip("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise snapshot.SnapshotError(f"the snapshot cannot be read: {exc}") from None


def _check_url(url: str) -> None:
    if not (url.startswith("sqlite:///") or url.startswith(("postgresql://", "postgres://"))):
        raise UsageError(f"--to {mask_url(url)}: not a database URL (postgresql://... or sqlite:////abs/path.db)")
