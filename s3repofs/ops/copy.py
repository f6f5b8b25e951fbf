"""``s3repofs add`` and ``get``: copy a local file into the repository, or a version out of it, with its
bytes reported as they go (ops/progress.py: a bar on a terminal).

Each command is two transfers, each its own report: ``add`` stages the file (a local copy) and
uploads it; ``get`` downloads the version into this host's cache (nothing to do if it is there) and
copies it to its destination.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from ..errors import RepoError
from ..local.atomic import atomic_write
from ..local.intake import Intake, check_source
from ..repo import RepoFile, S3Repo
from .progress import Progress, Share, progress

CHUNK = 1024 * 1024


def add(repo: S3Repo, source: Path, repo_path: str, *, publish: bool = False, move: bool = False,
        quiet: bool = True) -> RepoFile:
    """Add ``source`` as a new version of ``repo_path``, uploaded (and published, if asked). ``move``: the
    source goes (see S3Repo.add_file), a copied one only once the version is uploaded. A move whose
    upload fails is undone: the source is where it was (renamed back), the version discarded, and the
    error says so; if the source's name was taken meanwhile, the bytes stay staged and the error says where."""
    size = check_source(source, move).st_size
    with progress("add: staging", size, unit="B", quiet=quiet) as report:
        rf, intake = repo.stage_local_file(source, repo_path, move=move, copied=report.advance)
    try:
        with progress("add: upload", size, unit="B", quiet=quiet) as report:
            sent = Share(report, size)
            rf.version = repo.upload(rf.refresh().version, content=intake.content, sent=sent)
            sent.done()
    except BaseException as exc:
        if not move:
            raise
        undone = _undo_move(repo, rf, intake)
        if isinstance(exc, RepoError):  # the same error (its exit status), saying what became of the file
            exc.args = (f"{exc}; {undone}",)
        raise
    if move:
        intake.unlink_source()
    if publish:
        rf.publish()
    return rf


def _undo_move(repo: S3Repo, rf: RepoFile, intake: Intake) -> str:
    """After a move's failed upload: the source back where it was, the version discarded; what was done."""
    try:
        intake.put_back()
    except (RepoError, OSError) as exc:
        return (f"the move is not undone ({exc}): version {rf.id} keeps the bytes staged at {intake.staged}, "
                "for a mount's retry to upload")
    with suppress(RepoError, OSError):
        repo.discard(rf.version)
    return f"nothing was moved: {intake.source} is where it was"


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
