"""The mount's view of the repository's metadata: entries and listings, cached, and their invalidation.

Lookups and listings are answered from TTL caches, else by one query each through the repository;
while the database is unreachable, from the last answers this mount had (``LastKnown``, ``Outage``).
A change made here is forgotten at once (``forget``) in every state's tree, and the kernel is told to
drop its entry of a path that changed by anything but its own call on that name
(``changed_behind_kernel``). Other hosts' changes age out with the TTL.

Concurrency: ``_lock`` guards the caches and the generation; it is never held across a query. Each
change made here bumps the generation, so a query begun before the change never stores its answer.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from typing import Callable

from cachetools import TTLCache

from ..domain.lifecycle import State, Storage
from ..domain.paths import DirPath
from ..errors import DatabaseUnavailableError, InvalidPathError, NameTooLongError, NotFoundError
from ..meta.metastore import Version
from ..repo import S3Repo
from .entries import STATES, Entry, Location, dir_entry, file_entry, parse_path
from .lastknown import LastKnown, Outage

MISSING = object()  # the cached answer for a path with nothing at it


@dataclass(frozen=True)
class Touched:
    """The cached entry of a directory a file in which changed here since: its mtime moved (the database's
    triggers move it), its link count did not (no subdirectory came or went). A look at it asks for the
    directory alone (one query, not a file's and a directory's), and the link count says whether a name
    in it can be a directory (``_holds_no_directories``)."""

    entry: Entry


class MetadataView:
    """Entries and listings by mount path, cached, queried through the repository, or last known."""

    def __init__(self, repo: S3Repo, ttl: float, root_time_ns: int, max_path_bytes: int) -> None:
        self.repo = repo
        self.max_path_bytes = max_path_bytes
        self._root_time = root_time_ns
        self._lock = threading.Lock()
        self._entries: TTLCache = TTLCache(maxsize=200_000, ttl=ttl)
        # Directory listings (mount path -> (sorted (name, Entry), {name: Entry})): a repeated `ls -l` is no
        # query, and the lookups that follow a listing are answered from it (see _listed).
        self._listings: TTLCache = TTLCache(maxsize=64, ttl=ttl)
        # The last answers, however old: what reads are served from while the database is unreachable.
        self._known = LastKnown()
        self._outage = Outage(self._known.describe)
        self._generation = 0  # bumped by every local change (forget)
        # Set by the FUSE layer: makes the kernel forget a mount path's entry (see changed_behind_kernel).
        self.invalidate_entry: Callable[[str], None] | None = None

    def parse(self, path: str | None) -> Location:
        return parse_path(path, self.max_path_bytes)

    # -- lookups ---------------------------------------------------------------------------------

    def lookup(self, path: str) -> Entry:
        """The stored entry at ``path`` (cached, queried, or last known while the database is down);
        NotFoundError if there is none."""
        with self._lock:
            cached = self._listed(path) or self._entries.get(path)
            generation = self._generation
        if cached is MISSING:
            raise NotFoundError(f"{path}: no such file or directory")
        if isinstance(cached, Entry):
            return cached
        try:
            loc = self.parse(path)
            entry = (isinstance(cached, Touched) and self._directory(loc)) or self.query(loc)
        except InvalidPathError as exc:
            if isinstance(exc, NameTooLongError):
                raise
            entry = None  # a name the repository could never hold simply does not exist
        except DatabaseUnavailableError:
            return self.last_known(path)
        with self._lock:
            if generation == self._generation:  # nothing changed here while we queried
                self._entries[path] = MISSING if entry is None else entry
                self._known.learn(path, MISSING if entry is None else entry)
        if entry is None:
            raise NotFoundError(f"{path}: no such file or directory")
        return entry

    def lookup_dir(self, path: str) -> Entry | None:
        """The directory at ``path``, None if there is none (a file, or nothing): for a create's parent,
        asked while the kernel holds the parent locked against every other create in it, so one query
        (the directory's) rather than ``lookup``'s two (the file's first, which a parent never is)."""
        with self._lock:
            cached = self._entries.get(path)
            generation = self._generation
        if cached is MISSING or isinstance(cached, Entry):
            return cached if cached is not MISSING and cached.is_dir else None
        loc = self.parse(path)
        if loc.file is None:  # the root, a state's tree or a type: no file query anyway
            try:
                entry = self.lookup(path)
            except NotFoundError:
                return None
            return entry if entry.is_dir else None
        try:
            entry = self._directory(loc)
        except DatabaseUnavailableError:
            known = self._known.path(path)
            if known is None:
                raise
            return known if known is not MISSING and known.is_dir else None
        if entry is None:
            return None  # (not cached: a file may be there, which a lookup must find)
        with self._lock:
            if generation == self._generation:  # nothing changed here while we queried
                self._entries[path] = entry
                self._known.learn(path, entry)
        return entry

    def cached_file(self, path: str) -> Entry | None:
        """The cached entry of a file at ``path``, if any (None for a directory, a miss or nothing cached)."""
        with self._lock:
            entry = self._listed(path) or self._entries.get(path)
        return entry if isinstance(entry, Entry) and not entry.is_dir else None

    def _listed(self, path: str) -> Entry | None:
        """The entry of ``path`` in its directory's cached listing, if any (``_lock`` held). A listing
        answers before the entries cache: it is the newer answer (a name missing before may be listed
        now), and its 10,000 entries are not stored again one by one (3.4 us each in a TTLCache, a tenth
        of a cold ``ls -l``'s time in the daemon)."""
        parent, _, name = path.rpartition("/")
        listed = self._listings.get(parent)
        return listed[1].get(name) if listed is not None else None

    def query(self, loc: Location) -> Entry | None:
        """The entry at ``loc`` as the database has it now (None if there is none)."""
        if loc.state is None:
            return Entry(True, 0o755, 0, 0, 0, self._root_time, self._root_time, nlink=2 + len(STATES))
        if not loc.parts:  # a state's tree: one directory per type
            types = len(self._outage.ask(self.repo.list_types))
            mode = 0o555 if loc.state == State.EXPIRED else 0o755
            return Entry(True, mode, 0, 0, 0, self._root_time, self._root_time, nlink=2 + types)
        # Files first, in their own query: most lookups find one. One query for both would cost every
        # hit more (90 us on PostgreSQL here) than it saves a miss (120 us).
        if loc.file is not None:
            version = self._outage.ask(self.repo.find_version, loc.file, loc.state)
            if version is not None:
                return self.file_entry(version, loc.state)
            if self._holds_no_directories(loc):
                return None
        directory = self._outage.ask(self.repo.get_dir, loc.directory)
        return dir_entry(directory, loc.state) if directory else None

    def _directory(self, loc: Location) -> Entry | None:
        """The directory at ``loc`` (below a type), None if there is none (a file may be there)."""
        if not loc.parts:
            return None
        directory = self._outage.ask(self.repo.get_dir, loc.directory)
        return dir_entry(directory, loc.state) if directory else None

    def _holds_no_directories(self, loc: Location) -> bool:
        """Is the directory of ``loc`` known here (cached) to hold no directory (a link count of 2)? Then
        a name in it that is no file is nothing, and a create's look for its new name costs one query,
        not two. As fresh as the cached entry (the TTL): a directory made by this mount forgets it."""
        parent = f"/{loc.state}/" + "/".join(loc.parts[:-1])
        with self._lock:
            entry = self._listed(parent) or self._entries.get(parent)
        if isinstance(entry, Touched):
            entry = entry.entry
        return isinstance(entry, Entry) and entry.is_dir and entry.nlink == 2

    def last_known(self, path: str) -> Entry:
        """The entry this mount last knew at ``path``, stale, while the database cannot say:
        DatabaseUnavailableError if it knew none, NotFoundError if it knew there was none. (The outage's
        cause was logged once, when it began.)"""
        known = self._known.path(path)
        if known is None:
            raise DatabaseUnavailableError(f"{path}: not known to this mount while the database is unreachable")
        self._outage.served()
        if known is MISSING:
            raise NotFoundError(f"{path}: no such file or directory (as last known)")
        return known

    def file_entry(self, version: Version, state: State) -> Entry:
        entry = file_entry(version, state)
        if version.size is None and version.storage == Storage.LOCAL:  # staged here: its size is on disk
            try:
                return replace(entry, size=os.stat(self.repo.staged_path(version)).st_size)
            except FileNotFoundError:
                pass  # staged on another host
        return entry

    # -- listings --------------------------------------------------------------------------------

    def listing(self, loc: Location, base: str) -> list[tuple[str, Entry]]:
        """The stored entries of the directory ``base`` (at ``loc``, below a state) by name: cached, or one
        query whose entries also answer the lookups that follow (``ls -l``), or the last listing seen."""
        with self._lock:
            cached = self._listings.get(base)
            generation = self._generation
        if cached is not None:
            return cached[0]
        try:
            listed = self._list(loc)
        except DatabaseUnavailableError:
            return self._last_listing(base)
        with self._lock:
            if generation == self._generation:  # nothing changed here while we queried
                by_name = dict(listed)
                self._listings[base] = (listed, by_name)
                self._known.learn_listing(base, listed, by_name)
        return listed

    def _last_listing(self, base: str) -> list[tuple[str, Entry]]:
        """The listing this mount last saw of ``base``, stale, while the database cannot say."""
        listed = self._known.listing(base)
        if listed is None:
            raise DatabaseUnavailableError(f"{base}: never listed by this mount while the database is unreachable")
        self._outage.served()
        return listed

    def _list(self, loc: Location) -> list[tuple[str, Entry]]:
        found: dict[str, Entry] = {}
        ask, repo = self._outage.ask, self.repo
        if not loc.parts:
            for directory in ask(repo.list_types):
                found[directory.file_type] = dir_entry(directory, loc.state)
        else:
            for directory in ask(repo.list_subdirs, loc.directory):
                found[directory.name] = dir_entry(directory, loc.state)
            for version in ask(repo.list_directory, loc.directory, loc.state):
                found[version.name] = self.file_entry(version, loc.state)
        return sorted(found.items())

    def list_ahead(self, directory: DirPath, after: str, limit: int) -> list[Version]:
        """The published files after ``after`` in ``directory``, for the prefetcher. Like a listing, they
        answer the lookups that follow: the reader opens them next, perhaps after the listing's entries expired."""
        with self._lock:
            generation = self._generation
        versions = self._outage.ask(
            lambda: self.repo.list_directory(directory, State.PUBLISHED, after=after, limit=limit))
        entries = [(f"/{State.PUBLISHED}/{version.path}", self.file_entry(version, State.PUBLISHED))
                   for version in versions]
        with self._lock:
            if generation == self._generation:  # nothing changed here while we queried
                self._entries.update(entries)
        return versions

    # -- invalidation ----------------------------------------------------------------------------

    def forget(self, *paths: str, parent_changed: bool = True) -> None:
        """Forget cached entries of these mount paths in every state's tree, after a change made here
        (a publish changes published/ and expired/ at once). Other hosts' changes age out by TTL.

        ``parent_changed=False``: only a file's versions changed (a writer's open, flush or release): its
        directory's mtime moved, its link count did not; its entry becomes ``Touched``, so the kernel's look
        at the directory after each create in it costs one query, and the lookup of the next new name one."""
        with self._lock:
            self._generation += 1  # a query begun before this change must not store its answer
            for path in paths:
                below_state = path.strip("/").partition("/")[2]
                parent = below_state.rpartition("/")[0]
                for state in STATES:
                    same, above = f"/{state}/{below_state}".rstrip("/"), f"/{state}/{parent}".rstrip("/")
                    self._entries.pop(same, None)
                    self._touch_or_forget(above, parent_changed)
                    self._listings.pop(same, None)
                    self._listings.pop(above, None)
                    self._known.forget(same, above)

    def _touch_or_forget(self, directory: str, its_links_changed: bool) -> None:
        """Its mtime (and perhaps link count) moved with its entries (``_lock`` held). A Touched entry
        stays as it is: it keeps the time to live of the answer it holds."""
        entry = self._entries.get(directory)
        if not its_links_changed and isinstance(entry, Touched):
            return
        if not its_links_changed and isinstance(entry, Entry) and entry.is_dir:
            self._entries[directory] = Touched(entry)
        else:
            self._entries.pop(directory, None)

    def changed_behind_kernel(self, path: str, *states: State) -> None:
        """``path`` (a mount path) changed in these state trees (all three if none are named) by something
        other than the kernel's own call on that name: the kernel must not keep its entry (DESIGN.md's
        FUSE facts: it would send OPEN without O_CREAT for a path that has gone, say)."""
        invalidate = self.invalidate_entry
        if invalidate is None:
            return
        below_state = path.strip("/").partition("/")[2]
        for state in states or STATES:
            invalidate(f"/{state}/{below_state}")
