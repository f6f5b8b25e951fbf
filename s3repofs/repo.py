"""The repository: lifecycle of file versions over metadata (meta), objects (store) and the local cache.

This is the domain API, with the names of the original S3Repo::

    repo = S3Repo()                                # config from $S3REPO_CONFIG, or the embedded default
    rf = repo.add_file(path="story_data/2026/11/a.json")
    rf.touch("contents")
    rf.publish()                                   # upload + verify, then publish atomically
    cur = repo.get_file("story_data/2026/11/a.json")

Every operation commits as it completes: a version whose ``publish()`` returned is durable and
visible to every host. Order of a publish: the intent row exists (``add_file``), the bytes are
staged locally, their size and md5 are recorded, the object is uploaded and verified, the row is
marked uploaded, and only then is the version published in one transaction.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping

from . import metrics
from .config import EMBEDDED, Config, load_config
from .domain.content import Content, download_digest, file_content
from .domain.lifecycle import ARCHIVE_CLASSES, VISIBLE_STATES, State, Storage, Tier
from .domain.paths import DirPath, RepoPath, validate_type
from .domain.tags import period_range, validate_key, validate_value
from .errors import (
    ArchivedError,
    BeingWrittenError,
    LifecycleError,
    NotFoundError,
    ObjectMissingError,
    OutcomeUnknownError,
    RepoError,
    UnavailableError,
    VerificationError,
)
from .leases import DEFAULT_LEASE, DEFAULT_TASK, Claim, Lock, release_holder
from .local.atomic import fsync_directory
from .local.cache import LocalCache, StartDownload
from .local.holdings import Batch
from .local.intake import Intake, check_source, copy_in, rename_in
from .local.transfer import Download
from .meta.claims import Lease, LeaseStore
from .meta.db import Database
from .meta.find import FindQuery
from .meta.holders import Holder, HolderRecords
from .meta.metastore import MetaStore, Version
from .meta.schema import SCHEMA_VERSION
from .objects.s3 import S3Store
from .objects.store import ObjectStore, describe, open_store
from .repofile import RepoFile

if TYPE_CHECKING:  # the mount's directory records (see "for a mounted tree")
    from .meta.metastore import Directory

log = logging.getLogger(__name__)

# Seconds an upload or publish waits for a writer of the staged version to close (the kernel releases
# a closed file a moment after close() returns: `touch f && mv f ...`) or for another upload of it.
CLAIM_WAIT = 5.0
THAW_CHECKS = 20  # thawing versions a mount's background pass looks at (a HEAD each), every RETRY_INTERVAL
STANDARD_CLASS = "STANDARD"  # where a thawed version's object goes back to: fresh for good


class RepoNotInitializedError(RepoError):
    exit_status = 3


class S3Repo:
    """A repository: one database, one object store, this host's cache.

    ``config`` is a path to the JSON file, a dict of its keys, a Config, or None (environment,
    then the embedded default). Thread-safe: one S3Repo may serve many threads.
    """

    def __init__(self, config: str | os.PathLike | Mapping | Config | None = None, *,
                 host_name: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config if isinstance(config, Config) else load_config(config)
        self.host = host_name or self.config.host_name or socket.gethostname()
        self.db = Database(self.config.database_url)
        self.meta = MetaStore(self.db, clock)
        self.leases = LeaseStore(self.db, self.meta)
        self.store: ObjectStore = open_store(self.config)
        self.cache = LocalCache(self.config.local_root, self.config.cache_max_bytes, clock=clock)
        self.holder_records = HolderRecords(self.db)
        self.cache.holdings.writer = self._write_holdings
        # Parts of large downloads, shared by every download of this process.
        self._parts = ThreadPoolExecutor(self.config.transfer_concurrency, thread_name_prefix="part")
        self._checked = False
        self._checking = threading.Lock()
        self._thaw_cursor = 0  # the last thawing version finish_thaws looked at

    # -- repository -----------------------------------------------------------------------------

    def create_repository(self) -> None:
        """Create (or migrate) the schema and the local directories; idempotent."""
        self.config.local_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if isinstance(self.store, S3Store):
            self.store.check_access()
        self.meta.create_schema()
        self.cache.prepare()
        self.heartbeat()  # after prepare: with the cache's figures
        self._checked = True
        log.info("repository ready: %s, %s", self.db.describe(), self.store.describe_location())

    def ensure_ready(self) -> None:
        """Fail with a clear message unless the repository exists (the embedded default creates itself)."""
        if self._checked:
            return
        with self._checking:  # threads starting at once check (and perhaps migrate) once
            if not self._checked:
                self._check_ready()

    def _check_ready(self) -> None:
        if self.config.source == EMBEDDED:
            self.create_repository()
            return
        version = self.meta.schema_version()
        if version == 0:
            raise RepoNotInitializedError(f"no repository in {self.db.describe()}: run `s3repofs init` first")
        if version < SCHEMA_VERSION:  # migrations only add: hosts still on the older schema keep working
            self.meta.create_schema()
            log.info("migrated the schema of %s from version %d to %d", self.db.describe(), version, SCHEMA_VERSION)
        self.cache.prepare()
        self.heartbeat()  # after prepare: with the cache's figures
        self._checked = True

    def heartbeat(self) -> None:
        """Record that this host is alive (``hosts.last_seen``, one upsert), with its cache's figures
        (``hosts.cache_*``, for ``s3repofs status``): gc leaves the versions a host staged alone until it has
        not been heard of for ``host_gone_after``."""
        self.meta.register_host(self.host, self._cache_figures())

    def _cache_figures(self) -> tuple[int, int, int] | None:
        """The cache's (bytes used, objects, bound) from its own counters, once it has read the disk."""
        usage = self.cache.usage() if self.cache.ready else None
        return usage and (usage.used_bytes, usage.objects, usage.max_bytes)

    def commit(self) -> None:
        """Kept for the original S3Repo's callers: every operation already commits when it returns."""

    def close(self) -> None:
        self.record_holders()
        self.cache.close()
        self.db.close()

    def __enter__(self) -> "S3Repo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files ----------------------------------------------------------------------------------

    def add_file(self, path: str | None = None, file_type: str | None = None, *, mode: int | None = None,
                 uid: int | None = None, gid: int | None = None, source: str | os.PathLike | None = None,
                 move: bool = False, copy_tags: bool = False) -> "RepoFile":
        """A new unpublished version at ``path`` (or a generated name under ``file_type``): empty, for the
        caller to write into, or holding the bytes of the local regular file ``source`` (its mode, unless
        ``mode`` is given, and its mtime kept). ``move``: the source goes: renamed into the staging area on
        the same file system (no byte copied), else copied, fsynced, and unlinked once the version is
        recorded (see local/intake.py). The source is refused, before anything is done, if it is not a
        regular file, or, for a move, if this user cannot unlink it. ``copy_tags``: with the tags of the
        path's published version, if it has one."""
        if source is None:
            rf = self._new_version(path, file_type, 0o644 if mode is None else mode, uid, gid)
        else:
            rf, intake = self.stage_local_file(source, path, file_type, move=move, mode=mode, uid=uid, gid=gid)
            if move:
                intake.unlink_source()
        if copy_tags and (published := self.meta.find(rf.version.path)) is not None:
            self.meta.copy_tags(published.id, rf.id)
        return rf

    def stage_local_file(self, source: str | os.PathLike, path: str | None = None, file_type: str | None = None, *,
                         move: bool = False, mode: int | None = None, uid: int | None = None,
                         gid: int | None = None, copied: Callable[[int], None] | None = None
                         ) -> tuple["RepoFile", Intake]:
        """``add_file`` of a local file, but a move that has to copy leaves the source in place: its caller
        ends it with ``intake.unlink_source()`` once the version is where it wants it (uploaded, say), or
        undoes a rename with ``intake.put_back()``. ``copied``: told each count of bytes copied."""
        source = Path(source)
        st = check_source(source, move)
        rf = self._new_version(path, file_type, st.st_mode & 0o777 if mode is None else mode, uid, gid,
                               mtime_ns=st.st_mtime_ns)
        staged = self.cache.staging_path(rf.s3_key)
        renamed, content = False, None
        try:
            renamed = move and rename_in(source, st, staged)
            if not renamed:
                content = self._copy_into_staging(rf.version, source, copied)
        except BaseException as exc:  # the source is untouched: the version goes
            with suppress(RepoError, OSError):
                self.discard(rf.version)
            if isinstance(exc, OSError):
                raise RepoError(f"cannot add {source}: {exc.strerror or exc}") from None
            raise
        fsync_directory(staged.parent)
        if renamed:
            fsync_directory(source.parent)
        log.info("%s %s into %s (version %d)", "moved" if renamed else "copied", source, rf.path, rf.id)
        return rf, Intake(source, staged, renamed, content)

    def _copy_into_staging(self, version: Version, source: Path, copied: Callable[[int], None] | None) -> Content:
        fd = self.cache.open_staged_for_writing(version.s3_key, truncate=True)
        try:
            return copy_in(source, fd, copied)
        finally:
            self.cache.release_staged(fd)
            os.close(fd)

    def _new_version(self, path: str | None, file_type: str | None, mode: int, uid: int | None, gid: int | None,
                     mtime_ns: int | None = None) -> "RepoFile":
        """A new, empty, unpublished version at ``path`` (or a generated name under ``file_type``)."""
        self.ensure_ready()
        if path is None:
            if file_type is None:
                raise RepoError("add_file needs a path or a file_type")
            validate_type(file_type)
            path = f"{file_type}/{uuid.uuid4().hex}"
        repo_path = RepoPath.parse(path)
        if file_type is not None and file_type != repo_path.file_type:
            raise RepoError(f"path {path!r} is not under file type {file_type!r}")
        key = f"{repo_path.file_type}/{uuid.uuid4().hex}"
        staged = self.cache.staging_path(key)
        staged.parent.mkdir(parents=True, exist_ok=True)
        _create_empty(staged)  # before its row: a version staged here always has its file
        try:
            version = self.meta.insert_version(
                repo_path, bucket=self.store.bucket, s3_key=key, origin_host=self.host, mode=mode & 0o7777,
                uid=os.getuid() if uid is None else uid, gid=os.getgid() if gid is None else gid,
                mtime_ns=mtime_ns)
        except OutcomeUnknownError:  # the row may have been written: the file stays with it
            raise
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        log.info("added %s (version %d, key %s)", repo_path, version.id, key)
        return RepoFile(self, version)

    def get_file(self, path: str, state: str = State.PUBLISHED) -> "RepoFile | None":
        """The published version of ``path`` (or the newest in ``state``), or None."""
        self.ensure_ready()
        if state not in VISIBLE_STATES:
            raise RepoError(f"unknown state {state!r} (one of {', '.join(VISIBLE_STATES)})")
        version = self.meta.find(RepoPath.parse(path), state)
        return RepoFile(self, version) if version else None

    def get_version(self, version_id: int) -> "RepoFile":
        self.ensure_ready()
        return RepoFile(self, self.meta.get(version_id))

    def require_file(self, path: str, state: str = State.PUBLISHED) -> "RepoFile":
        found = self.get_file(path, state)
        if found is None:
            raise NotFoundError(f"{path}: no {state} version")
        return found

    def list_files(self, prefix: str = "", states=VISIBLE_STATES) -> list["RepoFile"]:
        """Versions under ``prefix`` (``type`` or ``type/dirs``, or a whole file path), by path."""
        self.ensure_ready()
        prefix = prefix.strip("/")
        if not prefix:
            return [RepoFile(self, v) for v in self.meta.search(states=states)]
        parts = DirPath.parse(prefix)
        versions = self.meta.search(parts.file_type, parts.dir or None, states)
        if parts.dir:  # the prefix may also name a file exactly
            exact = RepoPath.parse(prefix)
            versions += [v for v in self.meta.history(exact) if v.state in states]
            versions.sort(key=lambda v: (v.file_type, v.dir, v.name, v.id))
        return [RepoFile(self, v) for v in versions]

    def find(self, file_type: str | None = None, prefix: str = "", *,
             tags_all: Mapping[str, str | None] | None = None, tags_any: Mapping[str, str | None] | None = None,
             tags_none: Mapping[str, str | None] | None = None, state: str | None = State.PUBLISHED,
             published_after: float | None = None, published_before: float | None = None,
             origin_host: str | None = None, date: tuple[str, str] | None = None,
             page_size: int = 1000) -> Iterator["RepoFile"]:
        """The versions that match every condition, oldest (lowest id) first, read a page at a time.

        Tags are ``{key: value}``, a value of None matching any value: ``tags_all`` each, ``tags_any``
        at least one, ``tags_none`` none of them. ``state``: one state, or None for any visible state.
        ``date``: a date tag of ``created_at``, e.g. ``("month", "2026-11")`` (see domain/tags.py).
        Times are ``[after, before)``."""
        query = self._find_query(file_type, prefix, tags_all=tags_all, tags_any=tags_any, tags_none=tags_none,
                                 state=state, published_after=published_after, published_before=published_before,
                                 origin_host=origin_host, date=date)
        return self._pages(query, page_size)

    def _find_query(self, file_type: str | None, prefix: str | None, *, tags_all, tags_any, tags_none,
                    state: str | None, published_after: float | None = None, published_before: float | None = None,
                    origin_host: str | None = None, date: tuple[str, str] | None = None) -> FindQuery:
        """``find``'s arguments, checked (here, on the call: not at the first next()), as a FindQuery."""
        self.ensure_ready()
        if state is not None and state not in VISIBLE_STATES:
            raise RepoError(f"unknown state {state!r} (one of {', '.join(VISIBLE_STATES)})")
        if file_type:
            validate_type(file_type)
        created_after, created_before = period_range(*date) if date else (None, None)
        prefix = (prefix or "").strip("/")
        return FindQuery(
            file_type=file_type or None, prefix=DirPath.parse(prefix) if prefix else None,
            states=(state,) if state else (), tags_all=_checked(tags_all), tags_any=_checked(tags_any),
            tags_none=_checked(tags_none), origin_host=origin_host, published_after=published_after,
            published_before=published_before, created_after=created_after, created_before=created_before)

    def _pages(self, query: FindQuery, page_size: int) -> Iterator["RepoFile"]:
        after = 0
        while page := self.meta.find_page(query, after, page_size):
            yield from (RepoFile(self, v) for v in page)
            after = page[-1].id

    # -- who holds what: the verified copies in each host's cache ----------------------------------

    def record_holders(self, reconcile: bool = False) -> bool:
        """Record in the ``holders`` table the copies that arrived in and left this host's cache since the
        last call, in one transaction; ``reconcile``: then make this host's rows exactly what its cache holds
        now (a mount's start). Never raises: False (logged) if the database refused, and the changes wait for
        the next call. Called by a mount every pass of its background thread and by ``close``; the cache also
        records on its own once many changes wait (local/holdings.py)."""
        if reconcile:
            self.cache.holdings.mark_stale()
        return self.cache.holdings.flush()

    def _write_holdings(self, batch: Batch) -> None:
        """The cache's writer (``Holdings.writer``): one batch, one transaction."""
        if batch.reconcile:
            self.cache.prepare()  # the index must be read from disk before it is the truth
        cached = self.cache.cached_keys() if batch.reconcile else None  # taken after the batch: it is newer
        self.holder_records.record(self.host, batch.changes, cached, now=self.meta.clock(),
                                   figures=self._cache_figures())

    def holders(self, version_ids: Iterable[int]) -> dict[int, list[Holder]]:
        """The hosts whose cache holds a verified copy of each version (most recently verified first), each
        with its last heartbeat and whether that is within ``host_gone_after``."""
        return self.holder_records.of_versions(version_ids, self.meta.clock() - self.config.host_gone_after)

    # -- processing leases (leases.py) ------------------------------------------------------------

    def claim(self, file_type: str | None = None, prefix: str | None = None, *,
              tags_all: Mapping[str, str | None] | None = None, tags_any: Mapping[str, str | None] | None = None,
              tags_none: Mapping[str, str | None] | None = None, state: str | None = State.PUBLISHED,
              limit: int = 1, lease: float = DEFAULT_LEASE, task: str = DEFAULT_TASK,
              holder: str | None = None) -> Claim:
        """Leases on up to ``limit`` versions that ``find`` would list with these arguments, not done for
        ``task`` and not leased for it by anyone else: ``with repo.claim(...) as files:`` (see leases.py).
        ``holder``: a token to name the leases by (default: a new one), as ``release_claims`` takes it."""
        query = self._find_query(file_type, prefix, tags_all=tags_all, tags_any=tags_any, tags_none=tags_none,
                                 state=state)
        return Claim(self, query, task=task, limit=limit, lease=lease, holder=holder)

    def lock(self, rf: "RepoFile", *, task: str = DEFAULT_TASK, nowait: bool = True, lease: float = DEFAULT_LEASE,
             timeout: float | None = None) -> Lock:
        """The lease of one version for ``task``: ``with repo.lock(rf):``. Held elsewhere: LockedError at once
        (``nowait``), else once ``timeout`` seconds (None: no limit) passed without it coming free."""
        self.ensure_ready()
        return Lock(self, rf, task=task, lease=lease, nowait=nowait, timeout=timeout)

    def release_claims(self, holder: str, paths: list[str] | None = None, *, done: bool = False,
                       dry_run: bool = False) -> list[Lease]:
        """End the leases of ``holder`` (all, or those on ``paths``), recording them done with ``done``; the
        leases ended (``dry_run``: that would end). See leases.release_holder for the errors."""
        self.ensure_ready()
        return release_holder(self, holder, paths, done, dry_run)

    # -- for a mounted tree: records and staged files, one call each ------------------------------
    # The mount caches what these answer; it reaches the metadata and the cache only through them.

    def describe(self) -> str:
        """The database and the object store, for a log line."""
        return f"{self.db.describe()}, {self.store.describe_location()}"

    def find_version(self, path: RepoPath, state: str) -> Version | None:
        """The newest version of ``path`` in ``state`` (the only one, for published), or None."""
        return self.meta.find(path, state)

    def recorded_version(self, version_id: int) -> Version:
        """A version's row as recorded now (NotFoundError if there is none)."""
        return self.meta.get(version_id)

    def versions_at(self, path: RepoPath) -> list[Version]:
        """Every version of ``path``, in any state, oldest first."""
        return self.meta.history(path)

    def list_types(self) -> list[Directory]:
        return self.meta.list_types()

    def list_subdirs(self, directory: DirPath) -> list[Directory]:
        return self.meta.list_subdirs(directory)

    def list_directory(self, directory: DirPath, state: str, after: str = "",
                       limit: int | None = None) -> list[Version]:
        """The versions in one directory of one state's tree (newest per name), by name, after ``after``."""
        return self.meta.list_dir(directory, state, after=after, limit=limit)

    def get_dir(self, directory: DirPath) -> Directory | None:
        return self.meta.get_dir(directory)

    def make_dir(self, directory: DirPath, mode: int, uid: int, gid: int) -> Directory:
        return self.meta.make_dir(directory, mode, uid, gid)

    def remove_dir(self, directory: DirPath) -> None:
        """Remove an empty directory (NotEmptyError otherwise)."""
        self.meta.remove_dir(directory)

    def set_attrs(self, version_id: int, **attrs: int | None) -> Version:
        """chmod, chown, utimens of a version (``mode``, ``uid``, ``gid``, ``mtime_ns``; None leaves one)."""
        return self.meta.set_attrs(version_id, **attrs)

    def set_dir_attrs(self, directory: DirPath, **attrs: int | None) -> Directory:
        return self.meta.set_dir_attrs(directory, **attrs)

    def set_publish_pending(self, version_id: int, pending: bool) -> None:
        """Mark (or unmark) an unpublished version for the retry to publish once it is uploaded."""
        self.meta.set_publish_pending(version_id, pending)

    def move_staged(self, version_id: int, path: RepoPath) -> Version:
        """Give an unpublished version another path (a rename inside ``unpublished/``)."""
        return self.meta.move_unpublished(version_id, path)

    def tags(self, version_id: int) -> dict[str, str]:
        return self.meta.tags(version_id)

    def set_tag(self, version_id: int, key: str, value: str | None = None) -> None:
        """Tag a version (``value`` None: a tag with no value, stored as ""); InvalidTagError for a bad key or value."""
        self.meta.set_tag(version_id, validate_key(key), validate_value(key, value))

    def remove_tag(self, version_id: int, key: str) -> bool:
        """Remove a version's tag; True if it had it."""
        return self.meta.remove_tag(version_id, validate_key(key))

    def staged_path(self, version: Version) -> Path:
        """Where this host stages the version's bytes (the file exists only while they are staged here)."""
        return self.cache.staging_path(version.s3_key)

    def open_staged(self, version: Version) -> int:
        """A writer's descriptor of the version's staged file, holding it against the retry until
        ``release_staged`` (ReadOnlyError if a retry has taken it)."""
        return self.cache.open_staged_for_writing(version.s3_key)

    def release_staged(self, fd: int) -> None:
        """Give up a writer's hold (``open_staged``) on a staged file, before its descriptor is closed."""
        self.cache.release_staged(fd)

    # -- archive tiers (ops/archive.py; the mount's background pass finishes thaws) ---------------------

    def archive(self, version: Version) -> Version:
        """Move an uploaded, published or expired version's object into ``archive_storage_class`` (a copy in
        place), then record it archived. The cache is not asked: copies cached on hosts stay readable there.
        A version archived or thawing already is returned as it is."""
        if version.shown_tier != Tier.FRESH:
            return version
        if version.storage != Storage.UPLOADED or version.state not in (State.PUBLISHED, State.EXPIRED):
            raise LifecycleError(f"{version.path}: version {version.id} is {version.state} and {version.storage}; "
                                 "only an uploaded published or expired version can be archived")
        self._move_object(version, self.config.archive_storage_class)
        archived = self.meta.archive(version.id)
        log.info("archived %s (version %d) into %s", version.path, version.id, self.config.archive_storage_class)
        return archived

    def thaw(self, version: Version, days: int) -> Version:
        """Ask for the restore of an archived version's object, its copy kept ``days`` days: it is thawing
        until a look at it (``check_thaw``) finds the restore done and finishes it. A thawing version is
        looked at first: finished if it can be, asked for again if its restored copy lapsed."""
        version = self.check_thaw(version)
        if version.shown_tier != Tier.ARCHIVED:
            return version
        self.store.request_restore(version.s3_key, days)
        thawing = self.meta.request_thaw(version.id)
        log.info("thaw of %s (version %d) requested: restored for %d days", version.path, version.id, days)
        return thawing

    def check_thaw(self, version: Version) -> Version:
        """One look at a thawing version's restore (a HEAD): done, the object is copied back into the
        standard class and the version is fresh for good; lapsed (no restored copy any more), archived
        again; still running, as it is. Any other version is returned as it is."""
        if version.shown_tier != Tier.THAWING:
            return version
        info = self.store.head(version.s3_key)
        if info is None:
            raise ObjectMissingError(f"{version.path}: version {version.id}: object lost; see fsck "
                                     f"(key {version.s3_key})")
        if info.storage_class in ARCHIVE_CLASSES and info.restore_ongoing is None:
            log.warning("thaw of %s (version %d) lapsed: its restored copy expired before it was finished",
                        version.path, version.id)
            return self.meta.lapse_thaw(version.id)
        if info.restore_ongoing:
            return version
        if info.storage_class in ARCHIVE_CLASSES:  # else copied back already, by a look whose record failed
            self._move_object(version, STANDARD_CLASS)
        fresh = self.meta.finish_thaw(version.id)
        log.info("thawed %s (version %d): fresh again", version.path, version.id)
        return fresh

    def finish_thaws(self, limit: int = THAW_CHECKS) -> int:
        """Look at up to ``limit`` thawing versions (``check_thaw``), after those the last call looked at
        (so a long restore never hides the others); how many were finished."""
        versions = self.meta.thawing(limit, after_id=self._thaw_cursor) or self.meta.thawing(limit)
        finished = 0
        for version in versions:
            try:
                finished += self.check_thaw(version).shown_tier == Tier.FRESH
            except RepoError as exc:  # the next one may still succeed
                log.warning("checking the thaw of %s (version %d): %s", version.path, version.id, exc)
        self._thaw_cursor = versions[-1].id if versions else 0
        return finished

    def _move_object(self, version: Version, storage_class: str) -> None:
        """Put the version's object in ``storage_class``. If the copy fails, the object may be there already
        (a copy whose record failed, a look at the same thaw from another host): then that is done."""
        try:
            self.store.set_storage_class(version.s3_key, storage_class, version.size or 0)
        except RepoError:
            info = self.store.head(version.s3_key)
            if info is None or info.storage_class != storage_class:
                raise

    # -- version operations (RepoFile delegates here) ---------------------------------------------

    def upload(self, version: Version, *, content: Content | None = None, wait: float | None = None,
               sent: Callable[[int], None] | None = None) -> Version:
        """Upload and verify a staged version, then record its size and md5 and mark it uploaded.
        ``content``: what the staged bytes are, if the caller hashed them as it wrote them. Waits up
        to ``wait`` s (CLAIM_WAIT) for a writer still at the version (BeingWrittenError after that).
        ``sent``: told each count of bytes sent (a progress report's; see ObjectStore.put)."""
        if version.storage == Storage.UPLOADED:
            return version
        with self.cache.claim_staged(version.s3_key, CLAIM_WAIT if wait is None else wait) as held:
            if held:
                version = self.meta.mark_uploaded(version.id, self._store_staged(version, content, sent))
                self.cache_uploaded(version)
                return version
        return self._uploaded_elsewhere(version)

    def publish(self, version: Version, path: RepoPath | None = None, *, content: Content | None = None) -> Version:
        """Upload if needed, then publish atomically (at ``path`` if given); expires the previous one.
        ``content``: as for ``upload``, which waits for a writer likewise."""
        if version.storage == Storage.LOCAL:  # the upload is recorded in the publishing transaction
            with self.cache.claim_staged(version.s3_key, CLAIM_WAIT) as held:
                if held:
                    content = self._store_staged(version, content)
                    if path is None or path == version.path:
                        published, expired = self.meta.publish_staged(version, content)
                    else:
                        published, expired = self.meta.publish(version.id, path, uploaded=content)
                    self.cache_uploaded(published)
                    _log_published(published, expired)
                    return published
            version = self._uploaded_elsewhere(version)
        published, expired = self.meta.publish(version.id, path)
        _log_published(published, expired)
        return published

    def _uploaded_elsewhere(self, version: Version) -> Version:
        """A version whose staged file is not here (any more), as recorded: uploaded meanwhile (by the
        retry, a writer's close or another publish), or staged on another host."""
        recorded = self.meta.get(version.id)
        if recorded.storage == Storage.LOCAL:
            raise LifecycleError(f"{version.path}: the staged bytes of version {version.id} are not on this host "
                                 f"({version.origin_host} staged them)")
        return recorded

    def _store_staged(self, version: Version, content: Content | None = None,
                      sent: Callable[[int], None] | None = None) -> Content:
        """Put a staged version's bytes in the store, verified; what they are (size and digests).
        A ``content`` given (hashed while the bytes were written) spares hashing the file when its
        size matches the staged file's and the store proves the md5 of what it stored; where the
        store can check only the size, the file is hashed after all and must agree."""
        if version.state != State.UNPUBLISHED or version.storage != Storage.LOCAL:
            raise LifecycleError(f"{version.path}: version {version.id} is {version.state}/{version.storage}; "
                                 "nothing to upload")
        staged = self.cache.staging_path(version.s3_key)  # held by the caller (claim_staged)
        try:
            given = content is not None and content.size == staged.stat().st_size
            if not given:
                content = file_content(staged)
            proven = self.store.put(version.s3_key, staged, content.size, content.md5,
                                    object_description(version, content), sent)
            if given and not proven and file_content(staged) != content:  # its description is wrong: upload again
                raise VerificationError(f"{version.path}: the digests of version {version.id} computed while it "
                                        "was written do not match its bytes; it stays staged")
        except BaseException:
            metrics.UPLOAD_FAILURES.inc()
            raise
        metrics.UPLOADS.inc()
        metrics.UPLOADED_BYTES.inc(content.size)
        return content

    def cache_uploaded(self, version: Version) -> None:
        """The staged file of a version just recorded as stored is a verified copy of its object: keep
        it as cached (made durable by the cache's next checkpoint, like a download). The version is
        stored and recorded whatever the local disk does now: if the file cannot become cached, it
        goes, and a read downloads it."""
        staged = self.cache.staging_path(version.s3_key)
        try:
            if not staged.exists():  # cached already
                return
            log.info("uploaded %s (version %d, %d bytes, md5 %s)", version.path, version.id, version.size,
                     version.md5)
            self.cache.adopt(version.s3_key, staged, version.size)
        except OSError as exc:
            log.warning("%s (version %d) is stored, but not kept in the cache: %s", version.path, version.id, exc)
            with suppress(OSError):
                staged.unlink(missing_ok=True)

    def expire(self, version: Version) -> Version:
        expired = self.meta.expire(version.id)
        log.info("expired %s (version %d)", expired.path, expired.id)
        return expired

    def discard(self, version: Version) -> Version:
        discarded = self.meta.discard(version.id)
        self.cache.staging_path(version.s3_key).unlink(missing_ok=True)
        log.info("discarded %s (version %d)", discarded.path, discarded.id)
        return discarded

    def retry_staged_uploads(self, retryable: Callable[[Version], bool] = lambda version: True,
                             done_with: Callable[[Version], None] | None = None) -> int:
        """Upload what this host staged but could not upload (S3 was down, say); publish what was meant
        to be published unless a newer version was published meanwhile. Only versions for which
        ``retryable(version)`` is true are touched: a mount passes the ones whose upload failed and
        those left from before it started, never one a writer may still be filling. ``done_with`` is
        called with each version uploaded or published. Returns how many there were."""
        done = 0
        for version in self.meta.staged_on(self.host):
            if not retryable(version):
                continue
            try:
                if version.storage == Storage.LOCAL and not self.cache.staging_path(version.s3_key).exists():
                    continue
                metrics.STAGED_UPLOAD_RETRIES.inc()
                version = self.upload(version, wait=0)
                if version.publish_pending:
                    self._publish_unless_superseded(version)
            except BeingWrittenError:  # a writer is at it, in another mount say: not a leftover
                continue
            except (RepoError, OSError) as exc:  # the next version may still succeed
                log.warning("retry of %s (version %d) failed again: %s", version.path, version.id, exc)
                continue
            done += 1
            if done_with is not None:
                done_with(version)
        return done

    def _publish_unless_superseded(self, version: Version) -> None:
        """Publish an uploaded version (a retry's), unless a version of its path created later is
        published: decided in the publishing transaction, since another host may publish meanwhile."""
        published, expired = self.meta.publish(version.id, unless_superseded=True)
        if published.state != State.PUBLISHED:
            why = "a newer version is published" if published.state == State.UNPUBLISHED else f"it is {published.state}"
            log.warning("not publishing %s (version %d): %s", version.path, version.id, why)
            return
        _log_published(published, expired)

    def local_file(self, version: Version, received: Callable[[int], None] | None = None) -> Path:
        """A local file holding the version's verified bytes: staged, or fetched into the cache.
        ``received``: told each count of bytes that arrives, if this call starts the download (a
        progress report's)."""
        if version.storage == Storage.LOCAL:
            return self._staged_file(version)
        self._check_downloadable(version)
        return self.cache.fetch(version.s3_key, version.size, self._download_or_thaw(version, received))

    def open_version(self, version: Version, *, cached_only: bool = False) -> "VersionReader":
        """A reader of the version's bytes that does not wait for the whole download: each read waits
        only for its own range (so the first bytes of a large cold file come at once). ``cached_only``:
        no new download (a mount reading from stale metadata): UnavailableError unless the object is in
        this host's cache, or already on its way there."""
        if version.storage == Storage.LOCAL:
            return VersionReader(os.open(self._staged_file(version), os.O_RDONLY), None, None)
        self._check_downloadable(version)
        key = version.s3_key
        start = _no_download(version) if cached_only else self._download_or_thaw(version)
        fd, download = self.cache.open_object(key, version.size, start)
        return VersionReader(fd, download, lambda: self.cache.unpin(key))

    def prefetch(self, version: Version) -> bool:
        """Start downloading an uploaded version into the cache in the background; False if it need not."""
        if version.storage != Storage.UPLOADED or version.tier == Tier.ARCHIVED or version.size is None:
            return False
        return self.cache.prefetch(version.s3_key, version.size, self._downloader(version)) is not None

    def _staged_file(self, version: Version) -> Path:
        staged = self.cache.staging_path(version.s3_key)
        if staged.exists():
            return staged
        raise NotFoundError(f"{version.path}: version {version.id} is staged on {version.origin_host}, "
                            "not uploaded yet")

    def _check_downloadable(self, version: Version) -> None:
        if version.state in (State.DISCARDED, State.PURGED):
            raise NotFoundError(f"{version.path}: version {version.id} is {version.state}")
        if version.storage == Storage.MISSING:
            raise ObjectMissingError(f"{version.path}: version {version.id}: object lost; see fsck "
                                     f"(key {version.s3_key})")
        if version.size is None or version.md5 is None:
            raise LifecycleError(f"{version.path}: version {version.id} has no recorded size and md5")

    def _download_or_thaw(self, version: Version, received: Callable[[int], None] | None = None) -> StartDownload:
        """How to download the version's object into the cache (called only if the cache lacks it: a verified
        copy cached here is served whatever the tier). Archived: ArchivedError, saying how to thaw it;
        thawing: its restore is looked at once, and the thaw finished if it is done. The row is read again
        first: a mount's copy of it may be older than a thaw."""
        if version.tier == Tier.FRESH:
            return self._downloader(version, received)

        def thawed_first(fd: int) -> Download:
            thawed = self.check_thaw(self.meta.get(version.id))
            if thawed.shown_tier != Tier.FRESH:
                raise ArchivedError(not_thawed(thawed))
            return self._downloader(thawed, received)(fd)

        return thawed_first

    def _downloader(self, version: Version, received: Callable[[int], None] | None = None) -> StartDownload:
        key, size, digest = version.s3_key, version.size, download_digest(version.md5, version.xxh3)
        part_size = self.config.download_part_size

        def start(fd: int) -> Download:
            return Download(fd, size, digest, f"download of {key}", lambda s, e: self.store.stream(key, s, e, size),
                            part_size, self._parts, received)

        return start


def not_thawed(version: Version) -> str:
    """Why an archived or thawing version cannot be read, and the command that thaws it."""
    command = f"s3repofs thaw{'' if version.state == State.PUBLISHED else f' --state {version.state}'} {version.path}"
    if version.shown_tier == Tier.THAWING:
        return (f"{version.path}: version {version.id} is thawing: readable once its restore is done (hours); "
                f"`{command}` or the mount then finishes the thaw")
    return f"{version.path}: version {version.id} is archived; thaw it with `{command}`, then read it (hours later)"


def _no_download(version: Version) -> StartDownload:
    def refuse(fd: int) -> Download:
        raise UnavailableError(f"{version.path}: version {version.id} is not in this host's cache, and only "
                               "cached versions are read now")

    return refuse


class VersionReader:
    """An open version: reads wait for the bytes they need if a download is still writing them."""

    def __init__(self, fd: int, download: Download | None, on_close: Callable[[], None] | None) -> None:
        self.fd = fd
        self.download = download
        self._on_close = on_close

    def read(self, size: int, offset: int) -> bytes:
        return os.pread(self.ready(size, offset), size, offset)

    def ready(self, size: int, offset: int) -> int:
        """The fd to read [offset, offset + size) from, once those bytes are present and, if the range
        reaches the end, verified."""
        if self.download is not None:
            self.download.wait(offset, offset + size)
        return self.fd

    def close(self) -> None:
        os.close(self.fd)
        if self._on_close is not None:
            self._on_close()


def object_description(version: Version, content: Content) -> dict[str, str]:
    """What the object of ``version`` (holding ``content``) says about itself: every upload's, and fsck's
    re-upload's (see objects/store.py describe)."""
    return describe(path=str(version.path), file_type=version.file_type, version_id=version.id, content=content,
                    origin_host=version.origin_host, created_at=version.created_at, mode=version.mode,
                    uid=version.uid, gid=version.gid)


def _log_published(published: Version, expired: Version | None) -> None:
    if expired is not None:
        log.info("expired %s (version %d, superseded by %d)", expired.path, expired.id, published.id)
    log.info("published %s (version %d)", published.path, published.id)


def _checked(tags: Mapping[str, str | None] | None) -> dict[str, str | None]:
    return {validate_key(k): (None if v is None else validate_value(k, v)) for k, v in (tags or {}).items()}


def _create_empty(path: Path) -> None:
    # No fsync: an empty staged file holds nothing to lose; bytes written later are made durable
    # by their upload, or by an fsync when the upload fails.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
