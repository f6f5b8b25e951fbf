"""The mount's control file, ``/.stats``: the process's metrics as a read-only file at the root that no listing shows.

``cat MOUNTPOINT/.stats`` reads the same Prometheus text as the metrics endpoint (``metrics.exposition``);
``s3repofs stats`` and ``s3repofs umount`` read it through ``metrics.read_mount_stats``. It answers lookup,
getattr, open and read, and is left out of the root's listing, so ``find``, ``rsync`` and ``ls -a`` never
meet it. Its content is generated once per open, into an anonymous file the handle reads: every read of
one open sees the same text, and the kernel is told not to cache it (direct I/O), since the size a
``stat`` showed a moment earlier may already be another.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from .. import metrics
from ..errors import ReadOnlyError
from ..local.transfer import pwrite_all
from .entries import Entry

STATS_PATH = "/" + metrics.STATS_NAME
MODE = 0o444


class StatsFile:
    def __init__(self, render: Callable[[], bytes] = metrics.exposition) -> None:
        self._render = render

    def entry(self) -> Entry:
        """What ``stat`` shows: the size of the text as it would be generated now."""
        return self._entry(len(self._render()))

    def open(self, flags: int) -> int:
        """A descriptor of an anonymous file holding the text as generated now (the caller closes it)."""
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise ReadOnlyError(f"{STATS_PATH}: read-only (the mount's metrics)")
        fd = os.memfd_create("s3repofs-stats", os.MFD_CLOEXEC)
        try:
            pwrite_all(fd, self._render(), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _entry(size: int) -> Entry:
        now = time.time_ns()
        return Entry(False, MODE, os.getuid(), os.getgid(), size, now, now)
