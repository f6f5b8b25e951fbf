"""``s3repofs cache``: this host's cache of published objects, filled ahead of use or emptied."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from ..domain.lifecycle import State
from ..errors import NotFoundError
from ..repo import RepoFile, S3Repo
from .progress import Progress, Share, progress


@dataclass(frozen=True)
class PrefetchPlan:
    files: list[RepoFile]  # every published version under the paths asked for

    @property
    def size(self) -> int:
        return sum(f.file_size or 0 for f in self.files)


def plan_prefetch(repo: S3Repo, paths: list[str]) -> PrefetchPlan:
    """The published versions under ``paths`` (files, directories or types); NotFoundError if none."""
    files = [f for path in paths for f in repo.list_files(path, (State.PUBLISHED,))]
    if not files:
        raise NotFoundError(f"nothing published under {', '.join(paths)}")
    return PrefetchPlan(files)


def prefetch(repo: S3Repo, plan: PrefetchPlan, *, quiet: bool = True) -> None:
    """Download every file of ``plan`` into the cache (verified), ``transfer_concurrency`` at a time;
    a file already cached costs nothing. Reports the bytes, and the files done beside them."""
    with (progress("cache prefetch", plan.size, unit="B", quiet=quiet) as report,
          ThreadPoolExecutor(repo.config.transfer_concurrency) as pool):
        fetching = [pool.submit(_fetch, repo, f, report) for f in plan.files]
        for done, fetched in enumerate(as_completed(fetching), start=1):
            fetched.result()
            report.note(f"{done} of {len(fetching)} files")


def _fetch(repo: S3Repo, rf: RepoFile, report: Progress) -> None:
    received = Share(report, rf.file_size or 0)
    repo.local_file(rf.version, received)
    received.done()


def clear(repo: S3Repo) -> int:
    """Delete this host's cached objects (staged versions are kept); how many were deleted. This host's holder
    rows are then made what its cache holds (a failure to record that is logged, and a mount's start mends it)."""
    removed = repo.cache.clear()
    repo.record_holders(reconcile=True)
    return removed
