"""Drivers for the reference-model test (test_model.py): one file-system API, two ways to reach the mount.

``Glue`` calls the mount's FUSE bindings (``fs.FUSE`` over ``fs.Operations`` over a ``Tree``) the way
libfuse 3's high-level library calls them, without a kernel: byte paths, ``fuse_file_info`` structures,
bufvecs, the errno answer of mfusepy's wrapper. It plays the kernel's part where the mount relies on it:
an ``open(O_CREAT)`` of a name that exists arrives as OPEN without O_CREAT, and a handle whose name was
unlinked gets a NULL path (libfuse's ``hard_remove``). ``Mount`` makes the same calls with ``os`` on a
real mount. Both raise OSError with the errno a program would see.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass

from s3repofs.mount import fuse as fs
from s3repofs.mount import libfuse

mfusepy = fs.mfusepy


def _failed(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Glue:
    def __init__(self, tree, uid: int = 0, gid: int = 0) -> None:
        bindings = fs.FUSE.__new__(fs.FUSE)  # the bindings alone: no mount, no libfuse loop
        bindings.operations = fs.Operations(tree)
        bindings.raw_fi, bindings.encoding, bindings.errors, bindings.use_ns = False, "utf-8", "surrogateescape", True
        self.bindings = bindings
        self.context = (uid, gid, os.getpid())
        self._files: dict[int, mfusepy.fuse_file_info] = {}
        self._next = 1

    def _call(self, method, *args) -> int:
        # mfusepy asks libfuse for the caller's uid and gid, which only a request being served has.
        saved = mfusepy.fuse_get_context
        mfusepy.fuse_get_context = lambda: self.context
        try:
            result = self.bindings._wrapper(method, *args)
        finally:
            mfusepy.fuse_get_context = saved
        if result < 0:
            raise _failed(-result)
        return result

    @staticmethod
    def _path(path: str | None) -> bytes | None:
        return None if path is None else path.encode()

    # -- names ------------------------------------------------------------------------------------

    def stat(self, path: str, fd: int | None = None) -> Attrs:
        st = mfusepy.c_stat()
        fip = ctypes.pointer(self._files[fd]) if fd is not None else None
        self._call(self.bindings.getattr_fuse_3, self._path(path), ctypes.pointer(st), fip)
        return _stat_result(st)

    def listdir(self, path: str) -> dict[str, Attrs]:
        """Names and attributes, as READDIRPLUS brings them to the kernel."""
        found: dict[str, Attrs] = {}

        def filler(buf, name, st, offset, flags):
            if name not in (b".", b".."):  # the bindings pass a struct or a pointer to one, as ctypes allows
                found[name.decode()] = _stat_result(st.contents if isinstance(st, ctypes._Pointer) else st)
            return 0

        info = mfusepy.fuse_file_info()
        self._call(self.bindings.readdir_fuse_3, path.encode(), None, filler, 0, ctypes.pointer(info),
                   libfuse.FUSE_READDIR_PLUS)
        return found

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self._call(self.bindings.mkdir, path.encode(), mode)

    def _on_name(self, path: str, method, *args) -> int:
        """A call on a name: the kernel looks it up first (ENOENT without asking the file system), and
        after an ESTALE answer looks it up again and tries once more."""
        for attempt in (1, 2):
            self.stat(path)
            try:
                return self._call(method, path.encode(), *args)
            except OSError as exc:
                if exc.errno != errno.ESTALE or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def unlink(self, path: str) -> None:
        self._on_name(path, self.bindings.unlink)

    def rename(self, old: str, new: str) -> None:
        self._on_name(old, self.bindings.rename_fuse_3, new.encode(), 0)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        buffer = ctypes.create_string_buffer(value, len(value))
        self._on_name(path, self.bindings.setxattr, name.encode(), buffer, len(value), 0)

    def utime(self, path: str, mtime_ns: int) -> None:
        times = mfusepy.c_utimbuf()
        times.actime.tv_sec, times.actime.tv_nsec = divmod(mtime_ns, 10**9)
        times.modtime.tv_sec, times.modtime.tv_nsec = divmod(mtime_ns, 10**9)
        self._on_name(path, self.bindings.utimens_fuse_3, ctypes.pointer(times), None)

    # -- open files -------------------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """open(2): the kernel looks the name up first and sends CREATE only for a name it did not find
        (OPEN, without O_CREAT, for one it found); an OPEN answered ESTALE is tried once more after a
        fresh lookup, as the kernel does."""
        try:
            return self._open(path, flags, mode)
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
        return self._open(path, flags, mode)

    def _open(self, path: str, flags: int, mode: int) -> int:
        info = mfusepy.fuse_file_info(flags=flags & ~(os.O_CREAT | os.O_EXCL))
        try:
            self.stat(path)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise
            info.flags = flags
            self._call(self.bindings.create, path.encode(), 0o100000 | mode, ctypes.pointer(info))
        else:
            self._call(self.bindings.open, path.encode(), ctypes.pointer(info))
        fd, self._next = self._next, self._next + 1
        self._files[fd] = info
        return fd

    def pread(self, fd: int, path: str | None, size: int, offset: int) -> bytes:
        bufpp = (ctypes.POINTER(mfusepy.fuse_bufvec) * 1)()
        self._call(self.bindings.read_buf, self._path(path), bufpp, size, offset, ctypes.pointer(self._files[fd]))
        address = ctypes.cast(bufpp[0], ctypes.c_void_p).value
        vec = libfuse.FdBufvec.from_address(address)
        buf = vec.buf[0]
        try:
            if buf.flags & libfuse.FUSE_BUF_IS_FD:
                return os.pread(buf.fd, buf.size, buf.pos)
            return ctypes.string_at(buf.mem, buf.size)
        finally:
            libfuse._libc.free(ctypes.c_void_p(address))

    def pwrite(self, fd: int, path: str | None, data: bytes, offset: int) -> int:
        memory = ctypes.create_string_buffer(data, len(data))
        vec = libfuse.FdBufvec()
        vec.count, vec.idx, vec.off = 1, 0, 0
        buf = vec.buf[0]
        buf.size, buf.flags, buf.mem, buf.fd, buf.pos = len(data), 0, ctypes.addressof(memory), -1, 0
        bufv = ctypes.cast(ctypes.pointer(vec), ctypes.POINTER(mfusepy.fuse_bufvec))
        return self._call(self.bindings.write_buf, self._path(path), bufv, offset, ctypes.pointer(self._files[fd]))

    def ftruncate(self, fd: int, path: str | None, length: int) -> None:
        # libfuse 3 has no ftruncate: it calls truncate with the handle's fuse_file_info.
        self._call(self.bindings.truncate_fuse_3, self._path(path), length, ctypes.pointer(self._files[fd]))

    def close(self, fd: int, path: str | None) -> None:
        """close(2) of the last descriptor: FLUSH (its error is close's), then RELEASE (its error is lost)."""
        fip = ctypes.pointer(self._files.pop(fd))
        try:
            self._call(self.bindings.flush, self._path(path), fip)
        finally:
            try:
                self._call(self.bindings.release, self._path(path), fip)
            except OSError:
                pass


class Mount:
    """The same calls on a real mount; the kernel keeps track of names, so paths of open files are ignored."""

    def __init__(self, root) -> None:
        self.root = str(root)

    def _at(self, path: str) -> str:
        return self.root + path

    def stat(self, path: str, fd: int | None = None) -> Attrs:
        return _attrs(os.fstat(fd) if fd is not None else os.stat(self._at(path)))

    def listdir(self, path: str) -> dict[str, Attrs]:
        with os.scandir(self._at(path)) as entries:
            return {entry.name: _attrs(entry.stat()) for entry in entries}

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        os.mkdir(self._at(path), mode)

    def unlink(self, path: str) -> None:
        os.unlink(self._at(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._at(old), self._at(new))

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        os.setxattr(self._at(path), name, value)

    def utime(self, path: str, mtime_ns: int) -> None:
        os.utime(self._at(path), ns=(mtime_ns, mtime_ns))

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(self._at(path), flags, mode)

    def pread(self, fd: int, path: str | None, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, path: str | None, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def ftruncate(self, fd: int, path: str | None, length: int) -> None:
        os.ftruncate(fd, length)

    def close(self, fd: int, path: str | None) -> None:
        os.close(fd)


@dataclass(frozen=True)
class Attrs:
    """What the model compares of a stat answer."""

    is_dir: bool
    size: int
    mtime_ns: int


def _stat_result(st) -> Attrs:
    return Attrs(stat.S_ISDIR(st.st_mode), st.st_size, st.st_mtimespec.tv_sec * 10**9 + st.st_mtimespec.tv_nsec)


def _attrs(st: os.stat_result) -> Attrs:
    return Attrs(stat.S_ISDIR(st.st_mode), st.st_size, st.st_mtime_ns)
