"""``s3repofs status``: what a repository is made of, read-only, gathered into one record."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..domain.lifecycle import State
from ..local.cache import CacheUsage
from ..repo import S3Repo

# The current versions first, then the staged ones, then history.
SHOWN_ORDER = (State.PUBLISHED, State.UNPUBLISHED, State.EXPIRED, State.DISCARDED, State.PURGED)


@dataclass(frozen=True)
class HostStatus:
    """A host as its heartbeat and its holder rows tell: the cache figures are those of its last heartbeat
    (a mount's, every 30 s; a command's, when it opened the repository), None if it never sent them."""

    name: str
    last_seen: float
    live: bool  # heard of within host_gone_after
    cache_bytes: int | None
    cache_objects: int | None
    cache_bound: int | None
    versions_held: int  # versions it holds a verified copy of (holders rows)


@dataclass(frozen=True)
class RepositoryStatus:
    config_source: str
    database: str
    schema_version: int
    objects: str
    local_root: str
    cache: CacheUsage
    versions: dict[State, int]  # every state, with 0 for a state no version is in
    hosts: list[HostStatus]

    def as_dict(self) -> dict:
        return {**asdict(self), "versions": {str(state): n for state, n in self.versions.items()}}


def gather(repo: S3Repo) -> RepositoryStatus:
    counts = repo.meta.counts()
    return RepositoryStatus(
        config_source=str(repo.config.source), database=repo.db.describe(),
        schema_version=repo.meta.schema_version(), objects=repo.store.describe_location(),
        local_root=str(repo.config.local_root), cache=repo.cache.usage(),
        versions={state: counts.get(state, 0) for state in SHOWN_ORDER},
        hosts=hosts(repo))


def hosts(repo: S3Repo) -> list[HostStatus]:
    held = repo.holder_records.per_host()
    gone_before = repo.meta.clock() - repo.config.host_gone_after
    return [HostStatus(h["name"], h["last_seen"], h["last_seen"] >= gone_before, h["cache_bytes"],
                       h["cache_objects"], h["cache_bound"], held.get(h["name"], 0)) for h in repo.meta.hosts()]
