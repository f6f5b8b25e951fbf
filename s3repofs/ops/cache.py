"""``s3repofs cache``: this host's cache of published objects, filled ahead of use or emptied."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..domain.lifecycle import State
from ..errors import NotFoundError
from ..repo import RepoFile, S3Repo


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


def prefetch(repo: S3Repo, plan: PrefetchPlan) -> None:
    """Download every file of ``plan`` into the cache (verified), ``transfer_concurrency`` at a time;
    a file already cached costs nothing."""
    with ThreadPoolExecutor(repo.config.transfer_concurrency) as pool:
        list(pool.map(lambda f: repo.local_file(f.version), plan.files))


def clear(repo: S3Repo) -> int:
    """Delete this host's cached objects (staged versions are kept); how many were deleted."""
    return repo.cache.clear()
