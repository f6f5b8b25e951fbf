"""One hierarchy of errors, each knowing its errno (for the mount) and exit status (for the CLI).

Callers catch ``RepoError``; the CLI prints ``s3repofs: <message>`` and exits with
``exit_status``; the FUSE layer logs the message and returns ``errno``. Messages never contain
secrets (keys, passwords): build them from names and paths only.
"""

from __future__ import annotations

import errno as _errno
import logging


class RepoError(Exception):
    """Base of every error the repository reports on purpose."""

    errno: int = _errno.EIO
    exit_status: int = 1
    expected = False  # a routine answer the mount does not log (a probe for something absent)
    # How loudly the mount logs it: a server or disk failure is the operator's business (WARNING); a
    # caller's mistake or a refusal by the lifecycle is routine, its errno says all (CallerError: INFO).
    log_level = logging.WARNING


class CallerError(RepoError):
    """Refused because of what the caller asked, not because something failed: logged at INFO."""

    log_level = logging.INFO


class ConfigError(RepoError):
    """The configuration is missing, unreadable or invalid (names the key and the file)."""

    errno = _errno.EINVAL
    exit_status = 2


class UsageError(CallerError):
    """The command line asks for something that does not make sense."""

    errno = _errno.EINVAL
    exit_status = 2


class GcRefusedError(UsageError):
    """gc will not run with these settings: it could delete what a retained database backup still
    references (the message names the settings and their values)."""


class InvalidPathError(CallerError):
    """A repository path or name is not acceptable (escape attempt, empty, NUL, too long...)."""

    errno = _errno.EINVAL
    exit_status = 2


class InvalidTagError(CallerError):
    """A tag key or value, or a date period, is not acceptable (the message says what is)."""

    errno = _errno.EINVAL
    exit_status = 2


class NameTooLongError(InvalidPathError):
    errno = _errno.ENAMETOOLONG


class NotUtf8Error(InvalidPathError):
    """A name that is not valid UTF-8: names are stored as text (PostgreSQL TEXT cannot hold arbitrary bytes)."""

    errno = _errno.EILSEQ


class NotFoundError(CallerError):
    """No such file, version or directory."""

    errno = _errno.ENOENT
    exit_status = 3


class StaleEntryError(NotFoundError):
    """The mount's kernel believed a path existed that has gone: it looks it up again and retries."""

    errno = _errno.ESTALE
    expected = True


class NotYetWrittenError(NotFoundError):
    """A file being created whose writer has not closed it yet: readers see it once it is stored."""

    expected = True


class FileTooLargeError(CallerError):
    """A file longer than an object can be (S3's 5 TiB)."""

    errno = _errno.EFBIG


class AlreadyExistsError(CallerError):
    errno = _errno.EEXIST
    exit_status = 1


class LifecycleError(CallerError):
    """The operation is not allowed in the version's current state (e.g. publishing a discarded one)."""

    errno = _errno.EPERM
    exit_status = 4


class ReadOnlyError(LifecycleError):
    """Writes to something immutable (an expired version, a published version's bytes)."""

    errno = _errno.EROFS


class BeingWrittenError(LifecycleError):
    """A writer (in any process on this host) still has the staged version open: close it first."""

    errno = _errno.EBUSY


class NotEmptyError(CallerError):
    errno = _errno.ENOTEMPTY


class IsDirectoryError(CallerError):
    errno = _errno.EISDIR


class NotDirectoryError(CallerError):
    errno = _errno.ENOTDIR


class CrossDeviceError(CallerError):
    """A rename that cannot be done in place (a directory); ``mv`` then copies and deletes instead."""

    errno = _errno.EXDEV


class NoAttributeError(CallerError):
    errno = _errno.ENODATA


class NotSupportedError(CallerError):
    errno = _errno.ENOTSUP


class NamespaceNotSupportedError(NotSupportedError):
    """An extended attribute outside ``user.`` (security labels, POSIX ACLs): the filesystem has none.

    ENOTSUP, not ENODATA, tells tools such as ``ls -l`` to stop asking for every file of the mount.
    """

    expected = True


class BadHandleError(CallerError):
    errno = _errno.EBADF


class UnavailableError(RepoError):
    """A server (S3 or database) could not be reached or refused us; the cause is in the message."""

    errno = _errno.EIO
    exit_status = 5


class StoreUnavailableError(UnavailableError):
    pass


class TransientStoreError(StoreUnavailableError):
    """S3 failed in a way a later attempt may mend, after the HTTP client's own quick retries: an
    answer's body broke off (cut short, connection dropped, stalled), a 500/502/503/504 answer or a
    RequestTimeout, or connections closed without an answer. A download retries these itself; the
    policy is objects/retry.py's."""


class DatabaseUnavailableError(UnavailableError):
    pass


class OutcomeUnknownError(DatabaseUnavailableError):
    """The database went away after a transaction's commit was sent: it may or may not have committed."""


class NoSpaceError(UnavailableError):
    """A disk is full: this host's (staging, cache, a local object directory, SQLite's) or the database
    server's. The caller sees the cause's errno, ENOSPC (EDQUOT for a quota), not EIO: freeing space helps."""

    errno = _errno.ENOSPC

    def __init__(self, message: str, errno: int = _errno.ENOSPC) -> None:
        super().__init__(message)
        self.errno = errno


DISK_FULL_ERRNOS = (_errno.ENOSPC, _errno.EDQUOT)


class VerificationError(RepoError):
    """Bytes did not match the recorded size or md5: nothing was published or cached."""

    errno = _errno.EIO
    exit_status = 6


class ObjectMissingError(VerificationError):
    """The version's object is not in the store (fsck would report it missing)."""


class ArchivedError(CallerError):
    """The version is in Glacier-class storage; it must be restored (thawed) before reading."""

    # ENOMEDIUM, "No medium found": the bytes are on a medium that is not loaded, as a tape in an archive is.
    # Distinct: no other failure of the mount (nor of a local file system, for a regular file) gives it. Not
    # EAGAIN: a reader takes that for a non-blocking descriptor's "try again" and may spin on it for hours.
    errno = _errno.ENOMEDIUM
    exit_status = 7


class LockedError(CallerError):
    """A lease (repo.lock, flock on the mount) is held by another holder: try again later, or wait for it."""

    errno = _errno.EWOULDBLOCK  # what flock(LOCK_NB) answers when the lock is held
    exit_status = 9  # 8 is fsck's "found something"


class ClaimLostError(RepoError):
    """A lease ran out and another holder took the file (or released it) while this one still worked on it: its
    work was not exclusive and is not recorded as done (the message names the files)."""

    errno = _errno.EIO
    exit_status = 10
