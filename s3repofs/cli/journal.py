"""Logging for systemd's journal: one line per record on stderr, prefixed by its syslog priority, no timestamp.

journald reads a leading ``<N>`` as the line's priority (sd-daemon(3)) and stamps each line itself, so
``journalctl -p warning`` filters and no time is printed twice. journald makes each line of the stream an
entry of its own: every line of a record (a traceback's too) carries the record's priority.
"""

from __future__ import annotations

import logging
import os
import sys

# sd-daemon(3)'s SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG (syslog's priorities).
_PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in sorted(_PRIORITIES.items(), reverse=True) if record.levelno >= level), 7)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """True when stderr is systemd's journal stream: $JOURNAL_STREAM names its device and inode (a child that
    inherited the variable but not the stream, e.g. with stderr redirected, gets False)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def log_to_journal(level: int = logging.INFO) -> None:
    """Make every log record go to stderr in the journal's form (replacing the root logger's handlers)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter())
    root.addHandler(handler)
    root.setLevel(min(level, root.level or level))  # -v/--debug may have asked for more
