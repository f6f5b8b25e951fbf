"""Replacing a file's contents atomically: a reader, and a start-up after a crash, see the old file or the new one.

The new contents go to a temp file in the target's directory (a rename is atomic only within one file
system), which is renamed over the target. A durable write also fsyncs the temp file before the
rename (or a crash could leave the new name on an empty file) and the directory after it (or a crash
could forget the rename): once it returns, the new contents survive a crash.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_PREFIX = ".tmp-"  # a directory's readers skip names that start with it (see LocalStore.list)

# write(file) writes the new contents into the open temp file.
Writer = Callable[[BinaryIO], object]


def atomic_write(path: Path, contents: bytes | Writer, *, durable: bool = True, mode: int = 0o666) -> os.stat_result:
    """Replace ``path`` by ``contents`` (bytes, or a function that writes them into the file it is given).

    ``durable=False`` skips both fsyncs, for a caller that makes the file durable another way or does
    not need it to survive a crash. A new file gets ``mode`` (less the umask). Returns the status of
    the file as written. On error, the target is untouched and the temp file removed."""
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as file:
            if isinstance(contents, bytes):
                file.write(contents)
            else:
                contents(file)
            file.flush()
            if durable:
                os.fsync(file.fileno())
            written = os.fstat(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)
    return written


def fsync_directory(path: Path) -> None:
    """Make the names created, renamed or removed in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
