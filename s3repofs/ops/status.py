"""``s3repofs status``: what a repository is made of, read-only, gathered into one record."""

from __future__ import annotations

from dataclasses import dataclass

from ..domain.lifecycle import State
from ..local.cache import CacheUsage
from ..repo import S3Repo

# The current versions first, then the staged ones, then history.
SHOWN_ORDER = (State.PUBLISHED, State.UNPUBLISHED, State.EXPIRED, State.DISCARDED, State.PURGED)


@dataclass(frozen=True)
class RepositoryStatus:
    config_source: str
    database: str
    schema_version: int
    objects: str
    local_root: str
    cache: CacheUsage
    versions: dict[State, int]  # every state, with 0 for a state no version is in
    hosts: list[str]


def gather(repo: S3Repo) -> RepositoryStatus:
    counts = repo.meta.counts()
    return RepositoryStatus(
        config_source=str(repo.config.source), database=repo.db.describe(),
        schema_version=repo.meta.schema_version(), objects=repo.store.describe_location(),
        local_root=str(repo.config.local_root), cache=repo.cache.usage(),
        versions={state: counts.get(state, 0) for state in SHOWN_ORDER},
        hosts=[host["name"] for host in repo.meta.hosts()])
