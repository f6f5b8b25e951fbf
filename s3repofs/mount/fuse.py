"""Links FUSE calls (mfusepy's high-level API) to the mounted tree in ``tree.py``.

This layer decides nothing: it converts arguments, reports errors as errno, and logs each refused
operation once, with its reason. Any unexpected exception is logged with its traceback and becomes
EIO (fusepy would otherwise answer EINVAL, "Invalid argument", which misleads users).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import uuid
from time import perf_counter

from .. import metrics
from ..errors import NotFoundError, NotYetWrittenError, RepoError, StaleEntryError
from .libfuse import (  # mfusepy through libfuse.py, which chooses libfuse3 before loading it
    FUSE,
    FUSE_CAP_READDIRPLUS_AUTO,
    EntryInvalidator,
    _libfuse,
    copy_to_fd,
    fd_bufvec,
    mfusepy,
)
from .tree import Tree

log = logging.getLogger("s3repofs.mount")

# Expected misses: logged at DEBUG only (the kernel probes for these all the time).
_QUIET = (errno.ENOENT, errno.ENODATA)
# Local disk errors of the caller's making (a file past the disk's size limit, a bad length) and of a full
# disk: the errno says it all, no ERROR; any other one (EIO from a failing disk) is an ERROR.
_OS_ERROR_LEVELS = {errno.EFBIG: logging.INFO, errno.EINVAL: logging.INFO,
                    errno.ENOSPC: logging.WARNING, errno.EDQUOT: logging.WARNING}
# The ``op`` label of the callbacks whose names say how mfusepy reaches them rather than what they do.
_OP_NAMES = {"read_buf": "read", "write_buf": "write", "readdir_plus": "readdirplus"}


def translated(method):
    """Run a FUSE operation, turning repository errors into FuseOSError(errno) with one log line, as loud
    as the error deserves: DEBUG for expected misses, INFO for a caller's error or a lifecycle refusal,
    WARNING for a server or a full disk, ERROR for a failing disk; a traceback only for the unexpected.
    Each call is counted and timed (``s3repofs_fuse_operation_seconds``), each error by its errno."""
    op = _OP_NAMES.get(method.__name__, method.__name__)
    observe = metrics.FUSE_SECONDS.labels(op).observe  # bound once here: a request pays one observation

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        started = perf_counter()
        try:
            return method(self, *args, **kwargs)
        except RepoError as exc:
            _count_error(op, exc.errno)
            level = logging.DEBUG if exc.errno in _QUIET or exc.expected else exc.log_level
            log.log(level, "%s: %s (%s)", method.__name__, exc, metrics.errno_name(exc.errno))
            raise mfusepy.FuseOSError(exc.errno) from None
        except mfusepy.FuseOSError as exc:
            _count_error(op, exc.errno)
            raise
        except OSError as exc:  # local disk trouble (a full staging disk, say): the caller sees the real errno
            _count_error(op, exc.errno or errno.EIO)
            log.log(_OS_ERROR_LEVELS.get(exc.errno, logging.ERROR), "%s %s: %s (%s)", method.__name__,
                    args[0] if args else "", exc.strerror or exc, metrics.errno_name(exc.errno))
            raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None
        except Exception:
            _count_error(op, errno.EIO)
            log.exception("%s%r failed unexpectedly", method.__name__, args[:2])
            raise mfusepy.FuseOSError(errno.EIO) from None
        finally:
            observe(perf_counter() - started)

    return wrapper


def _count_error(op: str, number: int) -> None:
    metrics.FUSE_ERRORS.labels(op=op, errno=metrics.errno_name(number)).inc()


def stale_if_missing(method):
    """For a call on a node the kernel believes exists (OPEN, SETATTR, SETXATTR): a path that has gone
    (changed on another host, or a moment ago here) answers ESTALE, not ENOENT. The kernel then looks the
    path up again and retries once; an ``open(O_CREAT)``, whose O_CREAT the kernel strips from an OPEN,
    then becomes the CREATE it was meant to be instead of failing with ENOENT."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (StaleEntryError, NotYetWrittenError):  # the name exists: looking it up again would not help
            raise
        except NotFoundError as exc:
            raise StaleEntryError(str(exc)) from None

    return wrapper


class Operations(mfusepy.Operations):
    use_ns = True  # integer nanosecond timestamps

    def __init__(self, tree: Tree, mountpoint: str = "", on_ready=None, on_exit=None) -> None:
        self.tree = tree
        self.invalidator = EntryInvalidator(mountpoint)
        self.mountpoint = mountpoint
        self._fuse = None
        self._on_ready = on_ready
        self._on_exit = on_exit

    def init_with_config(self, conn, config) -> None:
        if conn is not None:
            # READDIRPLUS for every batch of a listing, not only the first (the kernel's "auto" mode
            # would follow the first batch with plain READDIRs and then a LOOKUP per name).
            conn.want &= ~FUSE_CAP_READDIRPLUS_AUTO
        self._fuse = _libfuse.fuse_get_context().contents.fuse
        self.invalidator.start(self._fuse)
        self.tree.invalidate_entry = self.invalidator.submit
        if self._on_ready:
            self._on_ready(self.end_session)

    def end_session(self) -> None:
        """Make serve() return (after destroy), as libfuse's SIGTERM handler would, from any thread.

        fuse_exit() only marks the session: an idle loop notices at its next request. A lookup of a name no
        one else asks for (so no cache can answer it) is that request."""
        _libfuse.fuse_exit(ctypes.c_void_p(self._fuse))
        try:
            os.stat(os.path.join(self.mountpoint, f".s3repofs-stop-{uuid.uuid4().hex}"))
        except OSError:
            pass

    def destroy(self, path: str) -> None:
        self.tree.flocks.release_all()
        self.tree.invalidate_entry = None
        self.invalidator.stop()
        if self._on_exit:
            self._on_exit()

    @translated
    def getattr(self, path, fh=None):
        return self.tree.getattr(path, fh)

    @translated
    def readdir(self, path, fh):
        return [".", "..", *(name for name, _entry in self.tree.readdir(path))]

    @translated
    def readdir_plus(self, path):
        return self.tree.readdir(path)

    @translated
    @stale_if_missing
    def open(self, path, flags):
        uid, gid, _pid = mfusepy.fuse_get_context()
        return self.tree.open(path, flags, uid, gid)

    @translated
    def create(self, path, mode, fi=None):
        uid, gid, _pid = mfusepy.fuse_get_context()
        return self.tree.create(path, mode, uid, gid)

    @translated
    def read_buf(self, path, bufpp, size, offset, fh):
        # The reply names the file descriptor: libfuse reads it in C, without the GIL or a Python
        # copy of the bytes (read + memmove cost the daemon 2 copies of every byte it served).
        fd = self.tree.readable_fd(fh, size, offset)
        bufpp[0] = ctypes.cast(fd_bufvec(fd, size, offset), ctypes.POINTER(mfusepy.fuse_bufvec))
        return 0

    @translated
    def write_buf(self, path, bufv, offset, fh):
        # libfuse copies the request's bytes into the staged file in C, without the GIL: mfusepy's
        # write() would first copy each one into a Python bytes object.
        return self.tree.write_with(fh, offset, lambda fd: copy_to_fd(bufv, fd, offset))

    @translated
    @stale_if_missing
    def truncate(self, path, length, fh=None):
        self.tree.truncate(path, length, fh)
        return 0

    @translated
    def flush(self, path, fh):
        self.tree.flush(fh)
        return 0

    @translated
    def fsync(self, path, datasync, fh):
        self.tree.fsync(fh)
        return 0

    @translated
    def release(self, path, fh):
        self.tree.release(fh)
        return 0

    @translated
    def flock(self, path, fh, op):
        # Defining it is what sends flock(2) here: libfuse 3's low level wants FUSE_CAP_FLOCK_LOCKS by default,
        # and its high level drops it only for a file system without flock (fuse_fs_init; mfusepy leaves the
        # operation NULL unless overridden). The kernel then keeps no flock of its own on the mount.
        self.tree.flock(fh, op, interrupted=lambda: bool(_libfuse.fuse_interrupted()))
        return 0

    @translated
    def unlink(self, path):
        self.tree.unlink(path)
        return 0

    @translated
    def rename(self, old, new):
        self.tree.rename(old, new)
        return 0

    @translated
    def mkdir(self, path, mode):
        uid, gid, _pid = mfusepy.fuse_get_context()
        self.tree.mkdir(path, mode, uid, gid)
        return 0

    @translated
    def rmdir(self, path):
        self.tree.rmdir(path)
        return 0

    @translated
    @stale_if_missing
    def chmod(self, path, mode):
        self.tree.chmod(path, mode)
        return 0

    @translated
    @stale_if_missing
    def chown(self, path, uid, gid):
        self.tree.chown(path, uid, gid)
        return 0

    @translated
    @stale_if_missing
    def utimens(self, path, mtime_ns, fh=None):
        self.tree.utimens(path, mtime_ns, fh)
        return 0

    def keeps_pages(self, fh: int) -> bool:
        return self.tree.keeps_pages(fh)

    def bypasses_pages(self, fh: int) -> bool:
        return self.tree.bypasses_pages(fh)

    @translated
    def getxattr(self, path, name, position=0):
        return self.tree.getxattr(path, name)

    @translated
    def listxattr(self, path):
        return self.tree.listxattr(path)

    @translated
    @stale_if_missing
    def setxattr(self, path, name, value, options, position=0):
        self.tree.setxattr(path, name, value)
        return 0

    @translated
    def removexattr(self, path, name):
        self.tree.removexattr(path, name)
        return 0

    @translated
    def statfs(self, path):
        return self.tree.statfs()

    @translated
    def link(self, target, source):
        self.tree.link(target, source)
        return 0

    @translated
    def symlink(self, target, source):
        self.tree.symlink(target, source)
        return 0

    @translated
    def readlink(self, path):
        return self.tree.readlink(path)

    @translated
    def mknod(self, path, mode, dev):
        self.tree.mknod(path, mode)
        return 0


# fuse_main()'s return codes (libfuse 3, helper.c), which mfusepy raises as RuntimeError(code); libfuse has
# written the cause (e.g. "fuse: mount failed: Operation not permitted") to stderr, the daemon's log, first.
_FUSE_MAIN_FAILURES = {
    1: "libfuse refused the mount options",
    2: "libfuse was given no mount point",
    3: "libfuse could not set up the file system",
    4: "the kernel refused the mount: it needs root with CAP_SYS_ADMIN, or a setuid fusermount3 "
       "without NoNewPrivileges",
    5: "libfuse could not detach from the terminal",
    6: "libfuse could not set up its signal handlers",
    7: "the FUSE session ended with an error",
}


class FuseSessionError(RepoError):
    """libfuse could not mount, or its session failed: one line, the cause beside it in the log."""

    errno = errno.EIO
    exit_status = 1


def serve(tree: Tree, mountpoint: str, *, foreground_options: dict, on_ready=None, on_exit=None) -> None:
    """Run the FUSE loop until unmounted or ended (blocks). ``on_ready(end_session)`` runs at the session's
    start (before the kernel's INIT is answered) with the function that ends it."""
    try:
        FUSE(Operations(tree, mountpoint, on_ready, on_exit), mountpoint, foreground=True, **foreground_options)
    except RuntimeError as exc:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if code is None:
            raise
        raise FuseSessionError(f"{_FUSE_MAIN_FAILURES.get(code, 'libfuse failed')} (libfuse's reason is in "
                               f"the log; fuse_main returned {code})") from None
