"""Reference-model test of the mounted tree: hypothesis drives random sequences of file operations
(writes, appends, ftruncates, closes, renames into and out of published/, setxattr publish and expire,
unlinks of open files, utimens, reads and listings) through the mount's FUSE bindings into a real tree
over a real repository, and against a small in-memory model of docs/commands.md's table ("The mounted
tree"). After every step, what the mount shows must equal what the model says; at the end every
published version's object must hold its recorded bytes (an fsck).

The model (``Model``) is the semantics, written once: a version per open-for-writing, a writer's bytes
stored at its flush (published atomically in published/, the old version expired), a reader keeping the
version it opened, an unlinked file's open descriptors working on while its name is gone for good.
Where the documented semantics are silent (which version another tree shows while a file is being
written, a rename over an open file), the model does not guess: those names are left unchecked
(``Model.unsettled``) or those operations are not generated.

``S3REPOFS_MODEL_EXAMPLES=N`` runs N examples per backend (random, not the fixed ones CI runs), and
``S3REPOFS_MODEL_STEPS`` the steps in each: the longer run described in README's Tests section.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import os
from dataclasses import dataclass, field
from unittest import mock

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from model_glue import Glue
from repo_fixtures import make_config

from s3repofs.mount import metadata
from s3repofs.mount.lastknown import Outage
from s3repofs.mount.tree import Tree

NAMES = ("a", "b", "c")
TREES = ("published", "unpublished", "expired")
WRITABLE = ("published", "unpublished")
MAX_HANDLES = 4
LONG_RUN = int(os.environ.get("S3REPOFS_MODEL_EXAMPLES", "0"))
STEPS = int(os.environ.get("S3REPOFS_MODEL_STEPS", "30"))
# Checks left out, by name (dir_mtime, draft_read, new_read, utime, unlink_open), to look past a known failure.
SKIP = set(filter(None, os.environ.get("S3REPOFS_MODEL_SKIP", "").split(",")))

# -- the model --------------------------------------------------------------------------------------


@dataclass(eq=False)
class MVersion:
    id: int  # in creation order, as the repository numbers versions
    name: str
    state: str  # staged (being written), unpublished, published, expired, gone
    data: bytes = b""
    mtime_ns: int | None = None  # set by utimens; None: the model does not know it


@dataclass(eq=False)
class MHandle:
    fd: int
    tree: str
    name: str
    writer: bool
    data: bytes  # a reader's version, or a writer's bytes so far
    version: MVersion | None = None  # a writer's version
    dirty: bool = False  # something to store at release (created, truncated or written)
    written: bool = False  # written since the version started: stored at the next flush
    sealed: bool = False  # flushed: the next write starts a new version
    unlinked: bool = False  # its name was removed: it works on, and is never shown again


@dataclass
class Model:
    versions: list[MVersion] = field(default_factory=list)
    handles: dict[int, MHandle] = field(default_factory=dict)
    shown_writer: dict[tuple[str, str], int] = field(default_factory=dict)  # (tree, name) -> newest writer's fd
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def stored(self, tree: str, name: str) -> MVersion | None:
        """What a reader opening tree/name gets: the published version, or the newest unpublished or expired."""
        found = [v for v in self.versions if v.name == name and v.state == tree]
        return max(found, key=lambda v: v.id, default=None)

    def shown_handle(self, tree: str, name: str) -> MHandle | None:
        fd = self.shown_writer.get((tree, name))
        return self.handles[fd] if fd is not None else None

    def size_and_mtime(self, tree: str, name: str) -> tuple[int, int | None] | None:
        """What stat shows on this host: an open writer's bytes so far, else the stored version; None: ENOENT."""
        writer = self.shown_handle(tree, name)
        if writer is not None:
            return len(writer.data), writer.version.mtime_ns
        version = self.stored(tree, name)
        return (len(version.data), version.mtime_ns) if version else None

    def unsettled_read(self, tree: str, name: str) -> bool:
        """With "draft_read" skipped: unpublished/NAME is not read while any version of NAME is staged.
        With "new_read" skipped: a name shown only by its writer is not read."""
        return self.unsettled(tree, name) or ("draft_read" in SKIP and tree == "unpublished" and any(
            h.version.state == "staged" for h in self.writers_at(name))) or (
            "new_read" in SKIP and self.shown_handle(tree, name) is not None and self.stored(tree, name) is None)

    def unsettled(self, tree: str, name: str) -> bool:
        """unpublished/NAME while a version of NAME is staged by a writer other than the one shown there
        (a writer in published/, or an older one): the table does not say whether it shows there."""
        if tree != "unpublished":
            return False
        shown = self.shown_writer.get((tree, name))
        return any(h.writer and h.name == name and h.version.state == "staged"
                   and (h.tree == "published" or (not h.unlinked and h.fd != shown))
                   for h in self.handles.values())

    def writers_at(self, name: str) -> list[MHandle]:
        return [h for h in self.handles.values() if h.writer and h.name == name]

    def new_version(self, name: str, data: bytes) -> MVersion:
        version = MVersion(next(self.ids), name, "staged", data)
        self.versions.append(version)
        return version

    def being_written(self) -> set[int]:
        return {h.version.id for h in self.handles.values() if h.writer}

    # -- transitions -------------------------------------------------------------------------------

    def publish(self, version: MVersion, name: str) -> None:
        current = self.stored("published", name)
        if current is not None and current is not version:
            current.state = "expired"
        version.name, version.state = name, "published"

    def store(self, handle: MHandle) -> None:
        """A writer's flush: its bytes become its version's, published or stored unpublished."""
        version = handle.version
        version.data = handle.data
        if handle.unlinked:
            version.state = "gone"
        elif handle.tree == "published":
            self.publish(version, handle.name)
        else:
            version.state = "unpublished"
            busy = self.being_written()
            for older in self.versions:  # older drafts go, except those open for writing here
                if (older.name == handle.name and older.state == "unpublished" and older.id < version.id
                        and older.id not in busy):
                    older.state = "gone"
        handle.dirty, handle.sealed = False, True

    def change(self, handle: MHandle, data: bytes) -> None:
        """A write or ftruncate: after a flush, the writer goes on in a new version (a copy)."""
        if handle.sealed:
            handle.version = self.new_version(handle.name, handle.data)
            handle.sealed = False
        handle.data = data
        handle.dirty = handle.written = True
        handle.version.mtime_ns = None  # a write sets it to now

    def close(self, handle: MHandle) -> None:
        if handle.writer:
            if handle.dirty and handle.written:  # flush
                self.store(handle)
            if not handle.sealed:  # release
                if handle.dirty:  # created or truncated, never written: stored here
                    self.store(handle)
                else:  # opened for writing, never changed: the copy goes
                    handle.version.state = "gone"
        del self.handles[handle.fd]
        for key, fd in list(self.shown_writer.items()):
            if fd == handle.fd:  # the newest other writer of the name still open is shown again
                others = [h for h in self.handles.values() if h.writer and not h.unlinked and (h.tree, h.name) == key]
                if others:
                    self.shown_writer[key] = others[-1].fd
                else:
                    del self.shown_writer[key]


def _written(data: bytes, offset: int, piece: bytes) -> bytes:
    return data[:offset].ljust(offset, b"\0") + piece + data[offset + len(piece):]


# -- the machine ------------------------------------------------------------------------------------

handle_choice = st.integers(0, MAX_HANDLES - 1)
names = st.sampled_from(NAMES)


class TreeModel(RuleBasedStateMachine):
    """One example: a fresh type directory in a shared repository, a fresh Tree over it, and the model."""

    repo = None  # set by the test
    types = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.tree = Tree(self.repo, metadata_ttl=3600)  # nothing ages out: a missed forget() shows as stale
        self.fs = Glue(self.tree)
        self.type = f"t{next(self.types)}"
        self.model = Model()
        self.fds: dict[int, int] = {}  # the model's fd -> the driver's
        self.dir_seen: dict[str, tuple[frozenset, int]] = {}  # tree -> (stored names, directory mtime)

    def path(self, tree: str, name: str | None = None) -> str:
        return f"/{tree}/{self.type}" + (f"/{name}" if name else "")

    def node(self, handle: MHandle) -> str | None:
        """The path libfuse passes with a handle's requests: None once the name was unlinked."""
        return None if handle.unlinked else self.path(handle.tree, handle.name)

    def expect(self, expected_errno: int | None, call, *args):
        try:
            result = call(*args)
        except OSError as exc:
            assert exc.errno == expected_errno, f"{call.__name__}{args}: {exc}, expected " + (
                errno.errorcode[expected_errno] if expected_errno else "success")
            return None
        assert expected_errno is None, f"{call.__name__}{args} succeeded, expected {errno.errorcode[expected_errno]}"
        return result

    def pick(self, choice: int, writer: bool | None = None) -> MHandle | None:
        handles = [h for h in self.model.handles.values() if writer is None or h.writer == writer]
        return handles[choice % len(handles)] if handles else None

    @initialize()
    def make_type(self) -> None:
        self.fs.mkdir(self.path("published"))

    # -- opening ------------------------------------------------------------------------------------

    @precondition(lambda self: len(self.model.handles) < MAX_HANDLES)
    @rule(tree=st.sampled_from(WRITABLE), name=names, truncate=st.booleans(), create=st.booleans())
    def open_for_writing(self, tree: str, name: str, truncate: bool, create: bool) -> None:
        m = self.model
        if m.unsettled(tree, name):
            return
        exists = m.size_and_mtime(tree, name) is not None
        if exists and not truncate and m.shown_handle(tree, name) is not None:
            return  # a copy of a file being written: the table says "of the published version"; left out
        flags = os.O_RDWR | (os.O_TRUNC if truncate else 0) | (os.O_CREAT if create else 0)
        fd = self.expect(None if exists or create else errno.ENOENT, self.fs.open, self.path(tree, name), flags)
        if fd is None:
            return
        stored = m.stored(tree, name)
        copy = b"" if truncate or stored is None else stored.data
        handle = MHandle(fd, tree, name, True, copy, m.new_version(name, copy), dirty=truncate or not exists)
        m.handles[fd] = handle
        m.shown_writer[(tree, name)] = fd

    @precondition(lambda self: len(self.model.handles) < MAX_HANDLES)
    @rule(tree=st.sampled_from(TREES), name=names)
    def open_for_reading(self, tree: str, name: str) -> None:
        m = self.model
        if m.unsettled_read(tree, name):
            return
        version = m.stored(tree, name)
        fd = self.expect(None if version else errno.ENOENT, self.fs.open, self.path(tree, name), os.O_RDONLY)
        if fd is not None:
            m.handles[fd] = MHandle(fd, tree, name, False, version.data)

    # -- open files ---------------------------------------------------------------------------------

    @precondition(lambda self: any(h.writer for h in self.model.handles.values()))
    @rule(choice=handle_choice, offset=st.integers(0, 12), piece=st.binary(min_size=1, max_size=6),
          append=st.booleans())
    def write(self, choice: int, offset: int, piece: bytes, append: bool) -> None:
        handle = self.pick(choice, writer=True)
        offset = len(handle.data) if append else min(offset, len(handle.data) + 2)
        assert self.fs.pwrite(handle.fd, self.node(handle), piece, offset) == len(piece)
        self.model.change(handle, _written(handle.data, offset, piece))

    @precondition(lambda self: any(h.writer for h in self.model.handles.values()))
    @rule(choice=handle_choice, length=st.integers(0, 12))
    def ftruncate(self, choice: int, length: int) -> None:
        handle = self.pick(choice, writer=True)
        length = min(length, len(handle.data) + 3)
        self.fs.ftruncate(handle.fd, self.node(handle), length)
        self.model.change(handle, handle.data[:length].ljust(length, b"\0"))

    @precondition(lambda self: self.model.handles)
    @rule(choice=handle_choice)
    def close(self, choice: int) -> None:
        handle = self.pick(choice)
        self.fs.close(handle.fd, self.node(handle))
        self.model.close(handle)

    # -- names --------------------------------------------------------------------------------------

    @rule(tree=st.sampled_from(TREES), name=names)
    def unlink(self, tree: str, name: str) -> None:
        m = self.model
        if m.unsettled(tree, name) or ("unlink_open" in SKIP and m.writers_at(name)):
            return
        if m.size_and_mtime(tree, name) is None:
            self.expect(errno.ENOENT, self.fs.unlink, self.path(tree, name))
            return
        if tree == "expired":
            self.expect(errno.EROFS, self.fs.unlink, self.path(tree, name))
            return
        self.fs.unlink(self.path(tree, name))
        version = m.stored(tree, name)
        for handle in m.writers_at(name):  # the descriptors work on; the name is gone, and stays gone at close
            if handle.tree == tree:
                handle.unlinked = True
        m.shown_writer.pop((tree, name), None)
        if version is not None:
            version.state = "expired" if tree == "published" else "gone"

    @rule(source=st.sampled_from(TREES), a=names, into=st.sampled_from(TREES), b=names)
    def rename(self, source: str, a: str, into: str, b: str) -> None:
        m = self.model
        if (source, a) == (into, b) or m.writers_at(a) or m.writers_at(b):
            return  # a rename over, or of, a file open for writing: the table is silent
        version = m.stored(source, a)
        moves = {("unpublished", "published"), ("expired", "published"), ("published", "published"),
                 ("unpublished", "unpublished")}
        refused = errno.ENOENT if version is None else None if (source, into) in moves else errno.EPERM
        if refused:
            self.expect(refused, self.fs.rename, self.path(source, a), self.path(into, b))
            return
        self.fs.rename(self.path(source, a), self.path(into, b))
        if into == "published":
            m.publish(version, b)
        else:
            replaced = m.stored("unpublished", b)
            if replaced is not None and replaced is not version:
                replaced.state = "gone"
            version.name = b

    @rule(tree=st.sampled_from(TREES), name=names, state=st.sampled_from(["published", "expired"]))
    def set_state(self, tree: str, name: str, state: str) -> None:
        m = self.model
        if m.writers_at(name):
            return  # publishing a file open for writing waits 5 s for EBUSY; expiring it is not in the table
        version = m.stored(tree, name)
        allowed = {("published", "published"), ("published", "expired"), ("unpublished", "published"),
                   ("expired", "published")}
        refused = errno.ENOENT if version is None else None if (tree, state) in allowed else errno.EPERM
        if refused:
            self.expect(refused, self.fs.setxattr, self.path(tree, name), "user.s3repo.state", state.encode())
            return
        self.fs.setxattr(self.path(tree, name), "user.s3repo.state", state.encode())
        if state == "expired":
            version.state = "expired"
        elif tree != "published":
            m.publish(version, name)

    @rule(tree=st.sampled_from(WRITABLE), name=names, mtime=st.integers(10**18, 2 * 10**18))
    def utime(self, tree: str, name: str, mtime: int) -> None:
        m = self.model
        if m.unsettled(tree, name) or "utime" in SKIP:
            return
        writer = m.shown_handle(tree, name)
        version = writer.version if writer else m.stored(tree, name)
        if version is None:
            self.expect(errno.ENOENT, self.fs.utime, self.path(tree, name), mtime)
            return
        self.fs.utime(self.path(tree, name), mtime)
        version.mtime_ns = mtime

    # -- what the mount shows -----------------------------------------------------------------------

    @invariant()
    def names_show_the_model(self) -> None:
        m = self.model
        for tree in TREES:
            listed = self.fs.listdir(self.path(tree))
            for name in NAMES:
                if m.unsettled(tree, name):
                    continue
                path = self.path(tree, name)
                expected = m.size_and_mtime(tree, name)
                shown = listed.get(name)
                assert (shown and (shown.size, shown.mtime_ns)) == _compared(expected, shown), f"ls {path}"
                try:
                    attrs = self.fs.stat(path)
                except FileNotFoundError:
                    attrs = None
                assert (attrs and (attrs.size, attrs.mtime_ns)) == _compared(expected, attrs), f"stat {path}"
                if not m.unsettled_read(tree, name):
                    self.check_read(tree, name)
            self.check_directory_time(tree)

    def check_read(self, tree: str, name: str) -> None:
        version = self.model.stored(tree, name)
        path = self.path(tree, name)
        fd = self.expect(None if version else errno.ENOENT, self.fs.open, path, os.O_RDONLY)
        if fd is not None:
            try:
                assert self.fs.pread(fd, path, len(version.data) + 10, 0) == version.data, f"cat {path}"
            finally:
                self.fs.close(fd, path)

    def check_directory_time(self, tree: str) -> None:
        """Adding or removing an entry changes the directory's mtime (the other way round is not checked)."""
        if "dir_mtime" in SKIP:
            return
        names_now = frozenset(name for name in NAMES if self.model.size_and_mtime(tree, name))  # as ls shows
        mtime = self.fs.stat(self.path(tree)).mtime_ns
        before = self.dir_seen.get(tree)
        if before is not None and before[0] != names_now:
            assert mtime != before[1], f"{self.path(tree)}: entries {sorted(before[0])} -> {sorted(names_now)}, " \
                                       "mtime unchanged"
        self.dir_seen[tree] = (names_now, mtime)

    @invariant()
    def open_files_keep_their_bytes(self) -> None:
        for handle in self.model.handles.values():
            node = self.node(handle)
            got = self.fs.pread(handle.fd, node, len(handle.data) + 10, 0)
            assert got == handle.data, f"read of fd {handle.fd} ({handle.tree}/{handle.name})"
            if handle.writer:
                assert self.fs.stat(node, handle.fd).size == len(handle.data), f"fstat of fd {handle.fd}"

    def teardown(self) -> None:
        try:
            for handle in list(self.model.handles.values()):
                self.fs.close(handle.fd, self.node(handle))
                self.model.close(handle)
            self.names_show_the_model()
            fsck(self.repo, self.type, self.model)
        finally:
            for handle in list(self.model.handles.values()):  # after a failure: leave no descriptor open
                try:
                    self.fs.close(handle.fd, self.node(handle))
                except OSError:
                    pass


def _compared(expected: tuple[int, int | None] | None, shown) -> tuple[int, int] | None:
    """The expected (size, mtime), taking the mtime shown where the model does not know it."""
    if expected is None:
        return None
    size, mtime = expected
    return size, mtime if mtime is not None else (shown.mtime_ns if shown else None)


def fsck(repo, file_type: str, model: Model | None = None) -> None:
    """Every stored version of the type has its object, with the recorded size and md5; the published
    ones are the model's."""
    published = {}
    for version in repo.meta.search(file_type=file_type, states=("published", "unpublished", "expired")):
        if version.storage != "uploaded":
            continue
        info = repo.store.head(version.s3_key)
        assert info is not None and info.size == version.size, f"version {version.id}: object {info}"
        body = b"".join(repo.store.stream(version.s3_key, 0, version.size, version.size)) if version.size else b""
        assert hashlib.md5(body).hexdigest() == version.md5, f"version {version.id}: object's md5"
        if version.state == "published":
            published[version.name] = body
    if model is not None:
        assert published == {name: v.data for name in NAMES if (v := model.stored("published", name))}


UNKNOWN = object()  # what published/NAME holds after an operation on it failed: it may or may not have happened
ALLOWED = {errno.EIO, errno.ENOENT, errno.EPERM, errno.EROFS}  # what a failure may say under faults


@dataclass(eq=False)
class FHandle:
    fd: int
    tree: str
    name: str
    writer: bool
    data: bytes | None  # a writer's bytes; a reader's version once read (None before)
    written: bool = False  # a write reached it: its close() is its flush's answer, not the release's


class FaultyTreeModel(RuleBasedStateMachine):
    """The same operations with the store and the database failing now and then (``model_faults``). The
    model is weaker: no bytes ever read that no writer wrote, a reader's bytes never change, a writer
    reads back what it wrote, and what an operation that returned success did to published/NAME is
    what published/NAME shows, then and after the retry of the failed uploads at the end."""

    repo = faults = None  # set by the test
    types = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        # Once a fault made the database look down, the tree fails queries at once until a probe
        # interval has passed: on the wall clock, how many did would depend on how fast the machine
        # runs the steps (under load, more probes), and hypothesis, which replays an example, needs the
        # same operations to succeed each time. So the tree's outage runs on the model's own clock,
        # which each attempted operation moves on by a quarter second.
        self.now = 0.0
        with mock.patch.object(metadata, "Outage", functools.partial(Outage, clock=lambda: self.now)):
            self.tree = Tree(self.repo, metadata_ttl=3600)
        self.fs = Glue(self.tree)
        self.type = f"f{next(self.types)}"
        self.handles: dict[int, FHandle] = {}
        self.contents = {b""}  # every byte string a writer closed (or tried to)
        self.acked: dict[str, object] = dict.fromkeys(NAMES)  # published/NAME: bytes, None (absent) or UNKNOWN
        self.finished = False

    path = TreeModel.path

    def attempt(self, call, *args):
        """(True, result), or (False, errno) for a failure a program may see under faults (once the
        example's steps are done, there are none)."""
        self.faults.on = not self.finished
        self.now += 0.25
        try:
            return True, call(*args)
        except OSError as exc:
            assert exc.errno in ALLOWED, f"{call.__name__}{args}: {exc}"
            return False, exc.errno
        finally:
            self.faults.on = False

    def pick(self, choice: int, writer: bool | None = None) -> FHandle | None:
        handles = [h for h in self.handles.values() if writer is None or h.writer == writer]
        return handles[choice % len(handles)] if handles else None

    def busy(self, *names: str) -> bool:
        return any(h.writer and h.name in names for h in self.handles.values())

    def outcome(self, name: str, ok: bool, code, value) -> None:
        """Record what an operation on published/NAME did: ``value`` if it succeeded, unknown if it failed
        with EIO (a refusal, ENOENT or EPERM, changed nothing)."""
        if ok:
            self.acked[name] = value
        elif code == errno.EIO:
            self.acked[name] = UNKNOWN

    @initialize(seed=st.integers(0, 2**32 - 1))
    def make_type(self, seed: int) -> None:
        self.faults.random.seed(seed)
        self.fs.mkdir(self.path("published"))

    @precondition(lambda self: len(self.handles) < MAX_HANDLES)
    @rule(tree=st.sampled_from(WRITABLE), name=names, truncate=st.booleans())
    def open_for_writing(self, tree: str, name: str, truncate: bool) -> None:
        if not truncate and self.busy(name):
            return  # a copy while NAME is being written (in either tree): left out, as in the exact model
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        ok, fd = self.attempt(self.fs.open, self.path(tree, name), flags)
        if ok:
            copy = self.fs.pread(fd, self.path(tree, name), 1 << 16, 0)  # without faults: the local copy
            assert copy in self.contents, f"open {self.path(tree, name)} copied bytes no writer wrote: {copy!r}"
            self.handles[fd] = FHandle(fd, tree, name, True, copy)

    @precondition(lambda self: len(self.handles) < MAX_HANDLES)
    @rule(tree=st.sampled_from(TREES), name=names)
    def open_for_reading(self, tree: str, name: str) -> None:
        if tree == "unpublished" and self.busy(name):
            return  # a version staged there is in unpublished/ too (the exact model's unsettled names)
        ok, fd = self.attempt(self.fs.open, self.path(tree, name), os.O_RDONLY)
        if ok:
            self.handles[fd] = FHandle(fd, tree, name, False, None)
            self.read(fd)

    @precondition(lambda self: any(h.writer for h in self.handles.values()))
    @rule(choice=handle_choice, offset=st.integers(0, 12), piece=st.binary(min_size=1, max_size=6))
    def write(self, choice: int, offset: int, piece: bytes) -> None:
        handle = self.pick(choice, writer=True)
        offset = min(offset, len(handle.data) + 2)
        ok, written = self.attempt(self.fs.pwrite, handle.fd, self.path(handle.tree, handle.name), piece, offset)
        if ok:  # a failed write changed nothing (it failed starting a new version, before writing)
            assert written == len(piece)
            handle.data, handle.written = _written(handle.data, offset, piece), True

    @precondition(lambda self: any(h.writer for h in self.handles.values()))
    @rule(choice=handle_choice, length=st.integers(0, 12))
    def ftruncate(self, choice: int, length: int) -> None:
        handle = self.pick(choice, writer=True)
        length = min(length, len(handle.data) + 3)
        if self.attempt(self.fs.ftruncate, handle.fd, self.path(handle.tree, handle.name), length)[0]:
            handle.data, handle.written = handle.data[:length].ljust(length, b"\0"), True

    @precondition(lambda self: self.handles)
    @rule(choice=handle_choice)
    def read_handle(self, choice: int) -> None:
        self.read(self.pick(choice).fd)

    def read(self, fd: int) -> None:
        handle = self.handles[fd]
        ok, got = self.attempt(self.fs.pread, fd, self.path(handle.tree, handle.name), 1 << 16, 0)
        if not ok:
            return
        if handle.writer or handle.data is not None:
            assert got == handle.data, f"fd {fd} ({handle.tree}/{handle.name}) read {got!r}, not {handle.data!r}"
        else:
            assert got in self.contents, f"{handle.tree}/{handle.name}: read bytes no writer wrote: {got!r}"
            handle.data = got

    @precondition(lambda self: self.handles)
    @rule(choice=handle_choice)
    def close(self, choice: int) -> None:
        self.close_handle(self.pick(choice))

    def close_handle(self, handle: FHandle) -> None:
        del self.handles[handle.fd]
        if handle.writer:
            self.contents.add(handle.data)
        ok, code = self.attempt(self.fs.close, handle.fd, self.path(handle.tree, handle.name))
        if handle.writer and handle.tree == "published":
            # A file never written is stored at the release, whose errors no program sees.
            self.outcome(handle.name, ok and handle.written, code if ok is False else errno.EIO, handle.data)

    @rule(tree=st.sampled_from(WRITABLE), name=names)
    def unlink(self, tree: str, name: str) -> None:
        if self.busy(name):
            return  # unlinks of open files are the exact model's
        ok, code = self.attempt(self.fs.unlink, self.path(tree, name))
        if tree == "published":
            self.outcome(name, ok, code, None)

    @rule(source=st.sampled_from(TREES), a=names, into=st.sampled_from(["published", "unpublished"]), b=names)
    def rename(self, source: str, a: str, into: str, b: str) -> None:
        if a == b or self.busy(a, b):
            return
        before = self.acked[a] if source == "published" else UNKNOWN
        ok, code = self.attempt(self.fs.rename, self.path(source, a), self.path(into, b))
        if into == "published":
            self.outcome(b, ok, code, before)
            if source == "published":
                self.outcome(a, ok, code, None)

    @rule(tree=st.sampled_from(TREES), name=names, state=st.sampled_from(["published", "expired"]))
    def set_state(self, tree: str, name: str, state: str) -> None:
        if self.busy(name):
            return
        before = self.acked[name]
        ok, code = self.attempt(self.fs.setxattr, self.path(tree, name), "user.s3repo.state", state.encode())
        if state == "expired":
            self.outcome(name, ok, code, None if tree == "published" else before)
        elif tree != "published":
            self.outcome(name, ok, code, UNKNOWN)

    @invariant()
    def published_shows_what_was_acknowledged(self) -> None:
        for tree in TREES:
            self.attempt(self.fs.listdir, self.path(tree))
        for name in NAMES:
            self.check_published(name, self.fs)

    def check_published(self, name: str, fs) -> None:
        path = self.path("published", name)
        ok, fd = self.attempt(fs.open, path, os.O_RDONLY)
        expected = self.acked[name]
        if not ok:
            assert fd != errno.ENOENT or expected in (None, UNKNOWN), f"{path}: ENOENT, expected {expected!r}"
            return
        try:
            ok, got = self.attempt(fs.pread, fd, path, 1 << 16, 0)
            if ok:
                assert got in self.contents, f"{path}: read bytes no writer wrote: {got!r}"
                assert expected is UNKNOWN or got == expected, f"{path}: {got!r}, expected {expected!r}"
        finally:
            fs.close(fd, path)

    def teardown(self) -> None:
        """Without faults: close what is open, let the retry upload and publish what failed, then check."""
        self.finished = True
        for handle in list(self.handles.values()):
            self.close_handle(handle)
        self.tree.mark_unmarked_publishes()
        self.repo.retry_staged_uploads(self.tree.retryable)
        fresh = Glue(Tree(self.repo, metadata_ttl=3600))  # what a mount started now would show
        for name in NAMES:
            self.check_published(name, fresh)
        fsck(self.repo, self.type)


def run_model(repo, examples: int, machine_class=None, **attributes) -> None:
    machine = type("Machine", (machine_class or TreeModel,), {"repo": repo, **attributes})
    options = settings(max_examples=LONG_RUN or examples, stateful_step_count=STEPS, deadline=None,
                       derandomize=not LONG_RUN, database=None, report_multiple_bugs=False,
                       suppress_health_check=list(HealthCheck))
    run_state_machine_as_test(machine, settings=options)


@pytest.mark.parametrize("examples", [150])
def test_the_tree_through_the_fuse_bindings_behaves_as_the_model(repo_config_pair, examples):
    from s3repofs import S3Repo

    repo = S3Repo(repo_config_pair)
    repo.create_repository()
    try:
        run_model(repo, examples if "sqlite" in repo_config_pair["database"] else examples // 4)
    finally:
        repo.close()


def test_under_faults_no_acknowledged_write_is_lost_and_no_wrong_byte_is_read(tmp_path, request):
    from model_faults import Faults, FaultyStore, faulty_run

    from s3repofs import S3Repo

    repo = S3Repo(make_config(request, tmp_path, "sqlite-local"))
    repo.create_repository()
    faults = Faults(rate=float(os.environ.get("S3REPOFS_MODEL_FAULT_RATE", "0.05")))
    repo.store = FaultyStore(repo.store, faults)
    repo.db.run = faulty_run(repo.db.run, faults)
    try:
        run_model(repo, 150, FaultyTreeModel, faults=faults)
    finally:
        repo.close()
    assert faults.injected > 0
