"""``s3repofs archive`` and ``thaw``: move versions' objects into an archive storage class and back, each as a
plan first, then its execution.

Archive plans the fresh, uploaded, published or expired versions under the PATHs named (types, directories or
files), or in the whole repository, created more than ``older_than_days`` ago if given; its execution copies
each object in place into ``archive_storage_class`` and records it archived (``S3Repo.archive``). Thaw plans the
archived and thawing versions under the PATHs; its execution looks at each thawing one first (finished if its
restore is done, see ``S3Repo.check_thaw``) and asks for the restore of the others (``S3Repo.thaw``). Thaw
without PATHs plans every thawing version, and only finishes those whose restore is done.

A version that changed between the plan and its execution (archived by another host, purged by gc) is left
alone and counted; a version whose request failed is reported, and the others go on.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from ..domain.lifecycle import State, Storage, Tier
from ..errors import LifecycleError, NotFoundError, RepoError, UsageError
from ..meta.metastore import Version
from ..repo import S3Repo
from .progress import progress

ARCHIVABLE_STATES = (State.PUBLISHED, State.EXPIRED)
THAW_DAYS = 7  # days a restored copy is kept: the thaw is finished (copied back) long before, if anyone looks
OUTCOMES = ("archived", "thaw requested", "thawed", "still thawing", "lapsed", "left alone")


@dataclass(frozen=True)
class TierItem:
    version_id: int
    path: str
    state: str
    tier: str  # as shown: fresh, archived or thawing
    size: int | None


@dataclass(frozen=True)
class TierPlan:
    """What an archive or a thaw would do: ``items``, and the versions named but left out (count per reason)."""

    action: str  # "archive" or "thaw"
    items: list[TierItem]
    left_out: dict[str, int] = field(default_factory=dict)
    storage_class: str | None = None  # archive's target
    days: int | None = None  # thaw's: how long a restored copy is kept
    request: bool = True  # thaw's: ask for restores; False: only finish the thaws whose restore is done

    @property
    def size(self) -> int:
        return sum(item.size or 0 for item in self.items)

    def as_dict(self) -> dict:
        return {"action": self.action, "storage_class": self.storage_class, "days": self.days,
                "request": self.request, "count": len(self.items), "bytes": self.size, "left_out": self.left_out,
                "items": [asdict(item) for item in self.items]}


@dataclass
class TierResult:
    outcomes: Counter = field(default_factory=Counter)  # per OUTCOMES entry
    failed: list[dict] = field(default_factory=list)  # {"path", "version", "why"}

    def as_dict(self) -> dict:
        return {"outcomes": {o: self.outcomes[o] for o in OUTCOMES if self.outcomes[o]}, "failed": self.failed}


# -- archive ----------------------------------------------------------------------------------------


def plan_archive(repo: S3Repo, paths: Iterable[str] = (), *, older_than_days: float | None = None,
                 file_type: str | None = None, states: Iterable[str] = ARCHIVABLE_STATES,
                 now: float | None = None) -> TierPlan:
    """The versions ``execute_archive`` would archive. UsageError without ``paths`` and ``older_than_days`` (the
    whole repository is never a default); NotFoundError for a path under which no version is in ``states``."""
    paths, states = list(paths), tuple(states)
    if not paths and older_than_days is None:
        raise UsageError("archive what? name PATHs, or --older-than DAYS for every version that old")
    if older_than_days is not None and older_than_days < 0:
        raise UsageError(f"--older-than {older_than_days:g}: a number of days, at least 0")
    cutoff = None if older_than_days is None else (repo.meta.clock() if now is None else now) - older_than_days * 86400
    left_out: Counter = Counter()
    if paths:
        versions = _named(repo, paths, states)
    else:
        versions = [v for v in repo.meta.archivable(cutoff, file_type) if v.state in states]
    items = []
    for version in versions:
        why = _not_archivable(version, cutoff, file_type)
        if why:
            left_out[why] += 1
        else:
            items.append(_item(version))
    return TierPlan("archive", items, dict(left_out), storage_class=repo.config.archive_storage_class)


def _not_archivable(version: Version, cutoff: float | None, file_type: str | None) -> str | None:
    if version.shown_tier != Tier.FRESH:
        return f"{version.shown_tier} already"
    if version.storage != Storage.UPLOADED:
        return f"storage {version.storage}"
    if file_type and version.file_type != file_type:
        return "another type"
    if cutoff is not None and version.created_at >= cutoff:
        return "not old enough"
    return None


def execute_archive(repo: S3Repo, plan: TierPlan, *, quiet: bool = True) -> TierResult:
    """Archive each version of ``plan`` (``transfer_concurrency`` copies at a time: each is a copy inside the
    store)."""
    return _execute(repo, plan, lambda version: _archived(repo, version), quiet)


def _archived(repo: S3Repo, version: Version) -> str:
    if version.shown_tier != Tier.FRESH:
        return "left alone"
    repo.archive(version)
    return "archived"


# -- thaw -------------------------------------------------------------------------------------------


def plan_thaw(repo: S3Repo, paths: Iterable[str] = (), *, days: int = THAW_DAYS,
              states: Iterable[str] = (State.PUBLISHED,)) -> TierPlan:
    """The versions ``execute_thaw`` would thaw: the archived and thawing ones under ``paths``; without paths,
    every thawing version (to finish those whose restore is done). UsageError for ``days`` under 1."""
    if days < 1:
        raise UsageError(f"--days {days}: a restored copy is kept at least 1 day")
    paths = list(paths)
    if not paths:
        return TierPlan("thaw", [_item(v) for v in _every_thawing(repo)], days=days, request=False)
    left_out: Counter = Counter()
    items = []
    for version in _named(repo, paths, tuple(states)):
        if version.shown_tier == Tier.FRESH:
            left_out["fresh"] += 1
        else:
            items.append(_item(version))
    return TierPlan("thaw", items, dict(left_out), days=days)


def _every_thawing(repo: S3Repo, page: int = 1000) -> list[Version]:
    versions: list[Version] = []
    while batch := repo.meta.thawing(page, after_id=versions[-1].id if versions else 0):
        versions += batch
    return versions


def execute_thaw(repo: S3Repo, plan: TierPlan, *, quiet: bool = True) -> TierResult:
    """Look at each thawing version of ``plan`` (finished if its restore is done) and, if the plan requests,
    ask for the restore of each archived one (a lapsed thaw is asked for again)."""
    return _execute(repo, plan, lambda version: _thawed(repo, version, plan), quiet)


def _thawed(repo: S3Repo, version: Version, plan: TierPlan) -> str:
    before = version.shown_tier
    after = (repo.thaw(version, plan.days or THAW_DAYS) if plan.request else repo.check_thaw(version)).shown_tier
    if after == Tier.FRESH:
        return "thawed" if before != Tier.FRESH else "left alone"
    if after == Tier.THAWING:
        return "thaw requested" if before == Tier.ARCHIVED else "still thawing"
    return "lapsed"


# -- both -------------------------------------------------------------------------------------------


def _named(repo: S3Repo, paths: list[str], states: tuple[str, ...]) -> list[Version]:
    """The versions in ``states`` under each path (a type, a directory or a file), each once."""
    found: dict[int, Version] = {}
    for path in paths:
        versions = [f.version for f in repo.list_files(path, states)]
        if not versions:
            raise NotFoundError(f"{path}: no {' or '.join(states)} version under it")
        found.update((v.id, v) for v in versions)
    return list(found.values())


def _item(version: Version) -> TierItem:
    return TierItem(version.id, str(version.path), version.state, version.shown_tier, version.size)


def _execute(repo: S3Repo, plan: TierPlan, change: Callable[[Version], str], quiet: bool) -> TierResult:
    """Apply ``change`` to each item's version as recorded now, a few at a time; its outcome counted."""
    result = TierResult()

    def one(item: TierItem) -> str | dict:
        try:
            return change(repo.meta.get(item.version_id))
        except (NotFoundError, LifecycleError):  # changed since the plan: purged, moved on by another host
            return "left alone"
        except RepoError as exc:
            return {"path": item.path, "version": item.version_id, "why": str(exc)}

    with (progress(plan.action, len(plan.items), unit="files", quiet=quiet) as report,
          ThreadPoolExecutor(repo.config.transfer_concurrency) as pool):
        for outcome in pool.map(one, plan.items):  # counted here, in one thread
            if isinstance(outcome, dict):
                result.failed.append(outcome)
            else:
                result.outcomes[outcome] += 1
            report.advance()
    return result
