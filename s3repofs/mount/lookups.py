"""What each mount path shows now: the stored entry, or the bytes of the open writer filling it.

A name being written shows its writer's bytes (stat, listings) from the open on; readers open the
stored version until the writer's flush stores the new one. A file unlinked while open answers under
libfuse's hidden name with the attributes of its own bytes, and no link.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..domain.lifecycle import State
from ..errors import BadHandleError, NotDirectoryError
from ..meta.metastore import Version
from ..repo import S3Repo
from .entries import STATES, Entry, file_entry
from .handles import Handles, ReadHandle
from .metadata import MetadataView
from .writes import Stage, WriteSession


class Lookups:
    """Entries, attributes and listings as a path shows them, open writers included."""

    def __init__(self, repo: S3Repo, metadata: MetadataView, handles: Handles) -> None:
        self.repo = repo
        self.metadata = metadata
        self.handles = handles

    def lookup(self, path: str) -> Entry:
        """The entry at ``path``; NotFoundError if there is none."""
        hidden = self.handles.hidden(path)
        if hidden is not None:
            return self._unlinked_entry(*hidden)
        writer = self.handles.writer(path)
        if writer is not None and (entry := self.writer_entry(writer)) is not None:
            return entry
        return self.metadata.lookup(path)

    def writer_entry(self, writer: WriteSession) -> Entry | None:
        """The attributes of a file being written (None once its writer has closed)."""
        # No lock: a flush holds the writer's lock for a whole upload, and stat must not wait for it.
        v = writer.version
        # Once stored, the stored version: its file is a cache object now, whose mtime the cache sets.
        if writer.stage is Stage.STORED:
            return file_entry(v, writer.state)
        try:
            st = os.fstat(writer.fd)
        except OSError:  # closed meanwhile (fd -1)
            return None
        return Entry(False, v.mode, v.uid, v.gid, st.st_size, st.st_mtime_ns, st.st_mtime_ns, v)

    def _unlinked_entry(self, writer: WriteSession | None, entry: Entry) -> Entry:
        # Once its writer is released, readers may still be open: the entry as it was unlinked.
        current = self.writer_entry(writer) if writer is not None else None
        return replace(current or entry, nlink=0)

    def getattr(self, path: str | None, fh: int | None = None) -> Entry:
        """The attributes of ``path``, or of an open handle's file (fstat): its own bytes, even once its
        name is gone (``path`` is None then)."""
        handle = self.handles.get(fh)
        entry = None
        if isinstance(handle, WriteSession):
            entry = self.writer_entry(handle)
        elif isinstance(handle, ReadHandle) and path is None:
            # Only once unlinked: while the name lives, its attributes are the path's (one kernel inode
            # serves every reader of the path; the older version's size would cut the newer's reads short).
            entry = handle.entry
        if entry is not None:
            return replace(entry, nlink=0) if handle.unlinked else entry
        if path is None:
            raise BadHandleError(f"file handle {fh} is closed")
        return self.lookup(path)

    def readdir(self, path: str) -> list[tuple[str, Entry]]:
        """The directory's entries by name, with their attributes (one query, whatever their number)."""
        loc = self.metadata.parse(path)
        entry = self.lookup(path)
        if not entry.is_dir:
            raise NotDirectoryError(f"{path}: not a directory")
        if loc.state is None:  # by lookup: cached, and from the last-known entries while the database is down
            return [(state.value, self.lookup(f"/{state}")) for state in STATES]
        base = path.rstrip("/")
        listed = self.metadata.listing(loc, base)
        writers = self.handles.writers_in(base)
        if not writers:
            return listed
        found, prefix = dict(listed), base + "/"
        for writer in writers:
            if (entry := self.writer_entry(writer)) is not None:
                found[writer.mount_path[len(prefix):]] = entry
        return sorted(found.items())

    def in_progress(self, version: Version | None) -> bool:
        """Is an open writer still filling ``version``? Only an unpublished one can be: reads of published
        and expired files (the hot path) never walk the handles."""
        return (version is not None and version.state == State.UNPUBLISHED
                and version.id in self.handles.versions_in_progress())

    def stored_entry(self, path: str) -> Entry | None:
        """What ``path`` shows once its writers' unfinished bytes are set aside: the published version
        in published/, the newest staged version a writer has finished with in unpublished/."""
        loc = self.metadata.parse(path)
        if loc.file is None or loc.state == State.EXPIRED:
            return None
        if loc.state == State.PUBLISHED:
            version = self.repo.find_version(loc.file, State.PUBLISHED)
            return self.metadata.file_entry(version, State.PUBLISHED) if version else None
        in_progress = self.handles.versions_in_progress()
        for version in reversed(self.repo.versions_at(loc.file)):
            if version.state == State.UNPUBLISHED and version.id not in in_progress:
                return self.metadata.file_entry(version, State.UNPUBLISHED)
        return None
