"""``s3repofs add`` and ``get``: copy a local file into the repository, or a version out of it, with its
bytes reported as they go (ops/progress.py: a bar on a terminal).

Each command is two transfers, each its own report: ``add`` stages the file (a local copy) and
uploads it; ``get`` downloads the version into this host's cache (nothing to do if it is there) and
copies it to its destination.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from ..errors import RepoError
from ..local.atomic import atomic_write
from ..repo import RepoFile, S3Repo
from .progress import Progress, Share, progress

CHUNK = 1024 * 1024


def add(repo: S3Repo, source: Path, repo_path: str, *, publish: bool = False, quiet: bool = True) -> RepoFile:
    """Add ``source`` as a new version of ``repo_path``, uploaded (and published, if asked)."""
    rf = repo.add_file(path=repo_path, mode=source.stat().st_mode & 0o777)
    try:
        with (open(source, "rb") as src, rf.open("wb") as dst,
              progress("add: staging", source.stat().st_size, unit="B", quiet=quiet) as report):
            size = copy(src, dst, report)
    except OSError as exc:
        raise RepoError(f"cannot read {source}: {exc.strerror or exc}") from None
    with progress("add: upload", size, unit="B", quiet=quiet) as report:
        sent = Share(report, size)
        rf.version = repo.upload(rf.refresh().version, sent=sent)
        sent.done()
    if publish:
        rf.publish()
    return rf


def get(repo: S3Repo, path: str, dest: Path, *, quiet: bool = True) -> RepoFile:
    """Copy the published version of ``path`` to the local file ``dest`` (replaced atomically)."""
    rf = repo.require_file(path)
    size = rf.file_size or 0
    with progress("get: download", size, unit="B", quiet=quiet) as report:
        received = Share(report, size)
        local = repo.local_file(rf.version, received)
        received.done()
    try:
        with open(local, "rb") as src, progress("get: copy", size, unit="B", quiet=quiet) as report:
            # Not fsynced, as cp does not: the repository keeps the version, and syncing is the user's call.
            atomic_write(dest, lambda dst: copy(src, dst, report), durable=False)
    except OSError as exc:
        raise RepoError(f"cannot write {dest}: {exc.strerror or exc}") from None
    return rf


def copy(source: BinaryIO, dest: BinaryIO, report: Progress) -> int:
    """shutil.copyfileobj, each chunk reported; the bytes copied."""
    copied = 0
    while chunk := source.read(CHUNK):
        dest.write(chunk)
        copied += len(chunk)
        report.advance(len(chunk))
    return copied
