"""libfuse through ctypes: the structures and calls mfusepy lacks (replies that name a file descriptor,
READDIRPLUS with attributes, entry invalidation), and a kept Python thread state per worker."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import threading
import time

# libfuse3: 1 MiB reads once read_ahead_kb is raised, atomic O_TRUNC, and the maintained library.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy  # noqa: E402  (must be imported after choosing the library)

from .entries import BLOCK_SIZE, Entry, blocks  # noqa: E402

log = logging.getLogger("s3repofs.mount")


class FdBufvec(ctypes.Structure):
    """libfuse's ``struct fuse_bufvec`` with its one inline buffer (mfusepy declares ``buf`` as a pointer)."""

    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", mfusepy.fuse_buf * 1)]


FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2
_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]


def fd_bufvec(fd: int, size: int, offset: int) -> int:
    """A malloc'ed bufvec that reads ``size`` bytes of ``fd`` at ``offset``; libfuse frees it."""
    address = _libc.malloc(ctypes.sizeof(FdBufvec))
    if not address:
        raise mfusepy.FuseOSError(errno.ENOMEM)
    _point_at_fd(FdBufvec.from_address(address), fd, size, offset)
    return address


def _point_at_fd(vec: FdBufvec, fd: int, size: int, offset: int) -> None:
    """Make ``vec`` one buffer: ``size`` bytes of ``fd`` at ``offset``."""
    vec.count, vec.idx, vec.off = 1, 0, 0
    buf = vec.buf[0]
    buf.size, buf.flags, buf.mem, buf.fd, buf.pos = size, FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK, None, fd, offset


_libfuse = mfusepy._libfuse
_libfuse.fuse_buf_size.argtypes = [ctypes.c_void_p]
_libfuse.fuse_buf_size.restype = ctypes.c_size_t
_libfuse.fuse_buf_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_libfuse.fuse_buf_copy.restype = ctypes.c_ssize_t


def copy_to_fd(bufv, fd: int, offset: int) -> int:
    """Copy the bytes of libfuse's bufvec ``bufv`` into ``fd`` at ``offset``; how many were copied."""
    source = ctypes.cast(bufv, ctypes.c_void_p)
    target = FdBufvec()
    _point_at_fd(target, fd, _libfuse.fuse_buf_size(source), offset)
    copied = _libfuse.fuse_buf_copy(ctypes.byref(target), source, 0)
    if copied < 0:
        raise OSError(-copied, os.strerror(-copied))
    return copied


FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
FUSE_READDIR_PLUS = 1 << 0  # the kernel asks for attributes with the names
FUSE_FILL_DIR_PLUS = 1 << 1  # the attributes we pass are complete: no lookup needed


_thread_state = threading.local()
_kept_lock = threading.Lock()
_kept_states = 0
KEPT_STATES_MAX = 64  # libfuse 3.12+ keeps its workers (10 by default) until unmount; a bound if they come and go


def _keep_thread_state() -> None:
    """Give the calling libfuse worker thread a Python thread state for its whole life.

    ctypes runs each callback from a thread Python did not start in a thread state created for
    that call and destroyed after it, its frame stack mapped and unmapped: four system calls per
    FUSE request, and warm reads of small files ran 18 % slower for them. One extra PyGILState_Ensure,
    never released, keeps the thread's state alive (threading.local lives in it, so the mark lasts
    as long as the state). Workers that exit (with ``-o max_idle_threads=N``, or a libfuse before
    3.12) leave their states behind: at most KEPT_STATES_MAX are kept, and callbacks on threads
    beyond those get one per call again."""
    global _kept_states
    if getattr(_thread_state, "kept", False):
        return
    with _kept_lock:
        if _kept_states >= KEPT_STATES_MAX:
            return
        _kept_states += 1
    ctypes.pythonapi.PyGILState_Ensure()
    _thread_state.kept = True


class FUSE(mfusepy.FUSE):
    """mfusepy, plus READDIRPLUS answered with each entry's attributes, and reads closed without a FLUSH.

    mfusepy passes names only, so the kernel follows a listing with one LOOKUP per name: 10,000
    round trips for ``ls -l`` of 10,000 files. With the attributes in the listing (one query),
    the kernel caches entries and attributes at once.
    """

    def _wrapper(self, func, *args, **kwargs):
        _keep_thread_state()
        return super()._wrapper(func, *args, **kwargs)

    def open(self, path, fip):
        result = super().open(path, fip)
        info = fip.contents
        info.keep_cache = self.operations.keeps_pages(info.fh)  # else the kernel drops the file's pages
        if not info.keep_cache:  # (a reader of pages kept is never a control file: a warm open skips the call)
            info.direct_io = self.operations.bypasses_pages(info.fh)  # a control file: every read reaches us
        if info.flags & os.O_ACCMODE == os.O_RDONLY and hasattr(info, "noflush"):  # libfuse 3.11+
            info.noflush = 1  # a reader's close() has nothing to flush: the kernel skips that round trip
        return result

    # mfusepy decodes these paths unconditionally; libfuse passes none for a file unlinked while open.
    def read_buf(self, path, bufpp, size, offset, fip):
        return self.operations.read_buf(self._path(path), bufpp, size, offset, fip.contents.fh)

    def write_buf(self, path, buf, offset, fip):
        return self.operations.write_buf(self._path(path), buf, offset, fip.contents.fh)

    def flock(self, path, fip, op):
        return self.operations.flock(self._path(path), fip.contents.fh, op)

    def utimens_fuse_3(self, path, times, fip):
        # The modification time in nanoseconds, None for UTIME_OMIT (mfusepy would read UTIME_NOW and
        # UTIME_OMIT as times in 1970, and drops the handle of futimens).
        modified = times.contents.modtime if times else None
        if modified is None or modified.tv_nsec == UTIME_NOW:
            mtime_ns = time.time_ns()
        elif modified.tv_nsec == UTIME_OMIT:
            mtime_ns = None
        else:
            mtime_ns = modified.tv_sec * 1_000_000_000 + modified.tv_nsec
        return self.operations.utimens(self._path(path), mtime_ns, fip.contents.fh if fip else None)

    def truncate_fuse_3(self, path, length, fip):
        # ftruncate(fd): mfusepy drops the handle, and a path alone cannot say which writer's bytes to cut.
        fh = fip.contents.fh if fip else None
        return self.operations.truncate(self._path(path), length, fh)

    def getattr_fuse_3(self, path, buf, fip):
        # The entry's fields straight into libfuse's struct (fill_stat), as a listing's are: mfusepy would
        # have them as a dict, and walk it in set_st_attrs (a tenth of a cold stat's time in the daemon).
        entry = self.operations.getattr(self._path(path), fip.contents.fh if fip else None)
        ctypes.memset(buf, 0, ctypes.sizeof(mfusepy.c_stat))
        fill_stat(buf.contents, entry)
        return 0

    def _path(self, path: bytes | None) -> str | None:
        """A path libfuse passed, decoded; None for a file that was unlinked while open."""
        return None if path is None else path.decode(self.encoding, self.errors)

    def readdir_fuse_3(self, path, buf, filler, offset, fip, flags):
        if not flags & FUSE_READDIR_PLUS:
            return super().readdir_fuse_3(path, buf, filler, offset, fip, flags)
        # With offsets (each entry's position + 1; "." and ".." are positions 0 and 1): libfuse passes the
        # attributes on to the kernel only in this mode (without offsets it sends them with inode 0, which
        # the kernel ignores, and then looks every name up). The kernel asks batch after batch (about 25
        # entries in each); the tree caches the listing, and only the batch's entries are converted.
        listed = self.operations.readdir_plus(path.decode(self.encoding, self.errors))
        for position, dots in enumerate((b".", b"..")):
            if position >= offset and filler(buf, dots, None, position + 1, 0):
                return 0
        st = mfusepy.c_stat()
        st_pointer = ctypes.pointer(st)
        encoding, errors = self.encoding, self.errors
        for position in range(max(offset, 2), len(listed) + 2):
            name, entry = listed[position - 2]
            fill_stat(st, entry)
            if filler(buf, name.encode(encoding, errors), st_pointer, position + 1, FUSE_FILL_DIR_PLUS):
                break
        return 0


def fill_stat(st: mfusepy.c_stat, entry: Entry) -> None:
    """Set the attributes of ``st`` from ``entry``'s fields (for GETATTR, LOOKUP and READDIRPLUS): no dict for
    mfusepy.set_st_attrs to walk (for a listing's 10,000 entries, a third of a cold ``ls -l``'s time in the
    daemon). The fields set are the same for every entry, so a reused ``st`` needs no clearing."""
    size = entry.size
    st.st_mode, st.st_nlink, st.st_uid, st.st_gid = entry.st_mode, entry.nlink, entry.uid, entry.gid
    st.st_size, st.st_blocks, st.st_blksize = size, blocks(size), BLOCK_SIZE
    st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec = st.st_atimespec.tv_sec, st.st_atimespec.tv_nsec = \
        divmod(entry.mtime_ns, 1_000_000_000)
    st.st_ctimespec.tv_sec, st.st_ctimespec.tv_nsec = divmod(entry.ctime_ns, 1_000_000_000)


_libfuse.fuse_interrupted.argtypes = []
_libfuse.fuse_interrupted.restype = ctypes.c_int  # in a request's thread: did the kernel interrupt it?
_libfuse.fuse_get_session.argtypes = [ctypes.c_void_p]
_libfuse.fuse_get_session.restype = ctypes.c_void_p
_libfuse.fuse_lowlevel_notify_inval_entry.argtypes = [
    ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t]
_libfuse.fuse_lowlevel_notify_inval_entry.restype = ctypes.c_int
FUSE_ROOT_ID = 1


class EntryInvalidator:
    """Tells the kernel to forget directory entries the daemon changed behind its back.

    The kernel caches a path's entry for the entry timeout. When the daemon itself changes what a path
    shows, other than by the kernel's own namespace call (a setxattr that publishes or expires, a publish
    that moves the old version into expired/, the retry's late publish), the kernel's entry is stale: an
    ``open(O_CREAT)`` of it arrives as OPEN, without O_CREAT, and would fail. The high-level libfuse API
    keeps its node ids to itself, but shows each as ``st_ino``, so the parent's id is one ``stat`` of
    the parent through the mount away. Invalidation runs on its own thread: libfuse forbids it inside a
    request on the same entry (the kernel would wait for the request, which waits for the kernel).
    """

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._session = None
        self._thread: threading.Thread | None = None

    def start(self, fuse_pointer) -> None:
        if not self.mountpoint or not fuse_pointer:
            return
        self._session = _libfuse.fuse_get_session(fuse_pointer)
        self._thread = threading.Thread(target=self._run, name="invalidate-entries", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None

    def submit(self, mount_path: str) -> None:
        """Forget ``mount_path``'s entry in the kernel, soon (asynchronously)."""
        if self._thread is not None:
            self._queue.put(mount_path)

    def _run(self) -> None:
        while (path := self._queue.get()) is not None:
            try:
                self._invalidate(path)
            except Exception:  # never let one path stop the thread
                log.exception("cannot invalidate the kernel's entry of %s", path)

    def _invalidate(self, mount_path: str) -> None:
        parent, _, name = mount_path.rstrip("/").rpartition("/")
        if not name:
            return
        try:
            parent_id = os.stat(self.mountpoint + parent).st_ino if parent else FUSE_ROOT_ID
        except OSError:  # the parent is gone too, or was never looked up: no entry to forget below it
            return
        encoded = name.encode()
        result = _libfuse.fuse_lowlevel_notify_inval_entry(self._session, parent_id, encoded, len(encoded))
        if result < 0 and result != -errno.ENOENT:  # ENOENT: the kernel had no such entry
            log.debug("invalidating %s: %s", mount_path, os.strerror(-result))


