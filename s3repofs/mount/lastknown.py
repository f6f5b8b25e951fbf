"""What a mount last learnt of the metadata, to keep serving reads while the database is unreachable.

The tree caches metadata for a few seconds (its TTL caches). Beside them, ``LastKnown`` keeps the
last answer this mount had for each path and each directory listing, however old, bounded (the least
recently used go first). The tree answers from it only when a query fails with
DatabaseUnavailableError, and only lookups, listings and opens for reading: what this host knew,
stale and read-only. Writes still need the database and fail.

``Outage`` tracks whether the database is reachable, as the tree's queries find it: one WARNING when
it goes, one when it is back, not a line per call. While it is down, one query at a time, at most one
per PROBE_INTERVAL, goes to the database as a probe, and the others fail at once: behind a dropped
route, each query would wait for the connect timeout (10 s), and ``ls -l`` that long for every name.

Lock order: ``LastKnown`` is learnt under ``MetadataView._lock`` (so a ``forget`` cannot slip between a
query's generation check and its learning); its own lock is taken inside, never around, that one.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Callable, TypeVar

from cachetools import LRUCache

from ..errors import DatabaseUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")

PROBE_INTERVAL = 1.0  # seconds between queries let through while the database is down
# An entry with its version row takes about 1 KB (measured with tracemalloc): at most ~50 MB each.
KNOWN_PATHS = 50_000
KNOWN_LISTED = 50_000  # names in all known listings together; a larger directory (and its names) is not kept


class LastKnown:
    """The last answer for each mount path (an entry, or the tree's "missing" mark) and listing."""

    def __init__(self, max_paths: int = KNOWN_PATHS, max_listed: int = KNOWN_LISTED) -> None:
        self._lock = threading.Lock()
        # Each answer with when it was learnt (a counter): a path's own answer and its directory's listing
        # each answer for it, the newer of the two winning. A listing's entries are not stored again one
        # by one (10,000 stores in the LRU cost a cold ``ls -l`` of 10,000 files 25-40 ms).
        self._learnt = itertools.count()
        self._paths: LRUCache = LRUCache(maxsize=max_paths)  # path -> (learnt, answer)
        # directory -> (learnt, sorted (name, entry) pairs, {name: entry})
        self._listings: LRUCache = LRUCache(maxsize=max_listed, getsizeof=lambda known: len(known[1]) + 1)

    def learn(self, path: str, answer: Any) -> None:
        with self._lock:
            self._paths[path] = (next(self._learnt), answer)

    def learn_listing(self, path: str, listing: list[tuple[str, Any]], by_name: dict[str, Any]) -> None:
        """A directory's sorted (name, entry) pairs, and the same by name; each entry answers its own path too."""
        with self._lock:
            if len(listing) < self._listings.maxsize:
                self._listings[path.rstrip("/")] = (next(self._learnt), listing, by_name)

    def path(self, path: str) -> Any:
        """The last answer for ``path``, or None if this mount never had one (or dropped it)."""
        parent, _, name = path.rpartition("/")
        with self._lock:
            own, listed = self._paths.get(path), self._listings.get(parent)
        if listed is not None and name in listed[2] and (own is None or listed[0] > own[0]):
            return listed[2][name]
        return own[1] if own is not None else None

    def listing(self, path: str) -> list[tuple[str, Any]] | None:
        with self._lock:
            known = self._listings.get(path.rstrip("/"))
        return known[1] if known is not None else None

    def forget(self, path: str, parent: str) -> None:
        """This mount changed ``path``: its answer and the listings showing it are wrong now."""
        with self._lock:
            self._paths.pop(path, None)
            self._listings.pop(path, None)
            self._listings.pop(parent, None)

    def describe(self) -> str:
        with self._lock:
            paths, listings = len(self._paths), len(self._listings)
        return f"{paths} known path{'s' * (paths != 1)} and {listings} director{'ies' if listings != 1 else 'y'} listed"


class Outage:
    """Whether the database answers the tree's queries; logs when that changes."""

    def __init__(self, describe_known: Callable[[], str], probe_interval: float = PROBE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._describe_known = describe_known
        self._probe_interval = probe_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._failure: str | None = None  # why the last query failed, while the database is down
        self._since = 0.0
        self._next_probe = 0.0
        self._probing = False  # a probe is waiting for the database
        self._served = 0  # answers from the last-known metadata during this outage

    @property
    def down(self) -> bool:
        return self._failure is not None

    def ask(self, query: Callable[..., T], *args: Any) -> T:
        """``query(*args)``; while the database is down, DatabaseUnavailableError at once unless this
        call may probe it."""
        probe = self._may_ask()
        try:
            result = query(*args)
        except DatabaseUnavailableError as exc:
            self._went_down(str(exc))
            raise
        finally:
            if probe:
                with self._lock:
                    self._probing = False
        if self._failure is not None:
            self._came_back()
        return result

    def _may_ask(self) -> bool:
        """Whether this query probes a database known to be down (DatabaseUnavailableError if it may
        not ask: another probe is waiting, or the last failed less than a probe interval ago)."""
        with self._lock:
            if self._failure is None:
                return False
            if self._probing or self._clock() < self._next_probe:
                raise DatabaseUnavailableError(self._failure)
            self._probing = True
            return True

    def served(self) -> None:
        """An answer was given from the last-known metadata."""
        with self._lock:
            self._served += 1

    def _went_down(self, failure: str) -> None:
        with self._lock:
            first = self._failure is None
            self._failure = failure
            self._next_probe = self._clock() + self._probe_interval
            if first:
                self._since, self._served = self._clock(), 0
        if first:
            log.warning("database unreachable: serving %s read-only from the last metadata this mount saw "
                        "(writes fail with EIO until it is back): %s", self._describe_known(), failure)

    def _came_back(self) -> None:
        with self._lock:
            if self._failure is None:  # another thread saw it first
                return
            self._failure = None
            lasted, served = self._clock() - self._since, self._served
        log.warning("database reachable again after %.0f s: serving current metadata (%d answers came from the "
                    "last metadata meanwhile)", lasted, served)
