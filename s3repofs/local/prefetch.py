"""Downloading ahead of a reader that opens a directory's files one after another.

``cat dir/*``, ``tar``, ``rsync`` and most batch jobs open a directory's files in name order. Each
cold open would otherwise wait for one S3 GET; once two opens in one directory come in ascending
name order, the next ``window`` small files are downloaded in the background, and the window slides
as the reader moves on (one indexed query per half window). Random access never triggers it.
"""

from __future__ import annotations

import bisect
import logging
import threading
from typing import Callable

from cachetools import LRUCache

from ..domain.lifecycle import State
from ..domain.paths import DirPath
from ..errors import RepoError
from ..meta.metastore import Version

log = logging.getLogger(__name__)


class _Reader:
    """What we know of the sequential reader of one directory."""

    def __init__(self, last_name: str) -> None:
        self.last_name = last_name
        self.ahead: list[str] = []  # names already scheduled, in order


ListAhead = Callable[[DirPath, str, int], "list[Version]"]  # (directory, after name, limit) -> published versions


class Prefetcher:
    def __init__(self, repo, window: int, max_size: int, list_ahead: ListAhead) -> None:
        self.repo = repo
        self.list_ahead = list_ahead
        self.window = window
        self.max_size = max_size
        self._lock = threading.Lock()
        self._readers: LRUCache = LRUCache(maxsize=1024)  # DirPath -> _Reader

    def opened(self, version: Version) -> None:
        """A reader opened ``version`` (published): prefetch what it will probably open next."""
        if self.window <= 0 or version.state != State.PUBLISHED:
            return
        directory, name = version.path.parent, version.name
        with self._lock:
            reader = self._readers.get(directory)
            if reader is None or name <= reader.last_name:  # a first open, or not in name order
                self._readers[directory] = _Reader(name)
                return
            reader.last_name = name
            reader.ahead = reader.ahead[bisect.bisect_right(reader.ahead, name):]
            if len(reader.ahead) >= self.window // 2:
                return
            after = reader.ahead[-1] if reader.ahead else name
        try:
            self._schedule(directory, reader, after)
        except (RepoError, OSError) as exc:  # prefetching is an optimisation: never fail the open for it
            log.debug("prefetch in %s: %s", directory, exc)

    def _schedule(self, directory: DirPath, reader: _Reader, after: str) -> None:
        upcoming = self.list_ahead(directory, after, self.window)
        with self._lock:
            reader.ahead.extend(v.name for v in upcoming)
        for version in upcoming:
            if version.size is not None and version.size <= self.max_size:
                self.repo.prefetch(version)
