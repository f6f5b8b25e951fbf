"""``s3repofs fsck``: find where the store and the database disagree, and repair what this host's copies can.

``check`` is the plan: it walks the versions under a prefix from the database a page at a time (by
id), asks the store about each object in parallel (HEAD: does it exist, with the recorded size;
``deep``: read it and check its digest), lists the store for objects that no version references, and
returns the findings (an ``FsckReport``); an unreferenced object whose self-description names a
version the database lacks is ``unrecorded`` (a row lost by a restore of an older backup:
ops/unrecorded.py), not an orphan. ``repair`` is the execute: it re-uploads a missing, wrong-size or
corrupt object from a verified copy on this host (its cache, or a staged file), with the description
of a normal upload, and marks what it cannot restore ``storage = missing``, so that reading it fails
with a clear error ("object lost; see fsck") instead of a download that cannot verify. Each
repairable finding, and each repair without a copy here, names the hosts that recorded a verified
copy (the ``holders`` table, meta/holders.py): ``fsck --repair`` on one of them puts the object back. A cache copy
that fails its re-hash is evicted, so no reader on this host is served it. It adopts each
unrecorded object: the row its description gives is written, as expired (the operator publishes it).

Memory stays flat in the size of the repository: a page of versions and a batch of listed keys at a
time; only the findings are kept. A finding is confirmed against the version's row as it is after
the check (gc may have purged it meanwhile), and ``repair`` reads each row again before acting.
"""

from __future__ import annotations

import datetime
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..domain.content import HASHES, Content, download_digest, file_content
from ..domain.lifecycle import VISIBLE_STATES, Storage, Tier
from ..domain.paths import DirPath, RepoPath
from ..errors import NotFoundError, ObjectMissingError
from ..meta.holders import Holder
from ..meta.metastore import Version
from ..objects.s3 import PATH_OBJECT_SUFFIX
from ..objects.store import ObjectInfo
from ..repo import S3Repo, object_description
from . import unrecorded as lost
from .holders import copies, copies_elsewhere
from .progress import progress

log = logging.getLogger(__name__)

# The exit status of an fsck that found something (errors.py's statuses are 1-7): see docs/commands.md.
FINDINGS_EXIT_STATUS = 8
PAGE = 1000  # versions read from the database at a time
KEY_BATCH = 1000  # listed keys looked up in the database at a time


class Kind(StrEnum):
    """What is wrong."""

    MISSING = "missing"  # the object is not in the store
    WRONG_SIZE = "wrong-size"  # the object's size is not the recorded one
    CORRUPT = "corrupt"  # (deep) the object's digest is not the recorded one
    MARKED_MISSING = "marked-missing"  # recorded lost by an earlier repair (storage missing)
    ORPHAN = "orphan"  # an object that no version references (gc deletes it after orphan_grace)
    UNRECORDED = "unrecorded"  # an object describing a version the database lacks (its row was lost)
    HOST_GONE = "host-gone"  # a staged version, never uploaded, whose origin host is gone


# What repair can mend from a local copy.
REPAIRABLE = (Kind.MISSING, Kind.WRONG_SIZE, Kind.CORRUPT, Kind.MARKED_MISSING)


@dataclass(frozen=True)
class Finding:
    kind: Kind
    key: str  # the object key
    detail: str
    path: str | None = None  # the version's path (an orphan's as it describes itself, if it does)
    version: int | None = None  # the version id (None for an orphan)
    holders: tuple[Holder, ...] = ()  # (a repairable kind) the hosts that recorded a verified copy

    def line(self) -> str:
        version = "-" if self.version is None else f"version {self.version}"
        return f"{self.kind:<14} {self.path or '-'}  {version}  {self.key}  {self.detail}"


@dataclass
class FsckReport:
    prefix: str
    deep: bool
    versions: int = 0  # versions checked
    objects: int = 0  # objects listed (looked at for orphans)
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings

    def counts(self) -> dict[str, int]:
        return {kind: n for kind in Kind if (n := sum(f.kind == kind for f in self.findings))}

    def summary(self) -> str:
        found = ", ".join(f"{n} {kind}" for kind, n in self.counts().items()) or "no findings"
        return (f"fsck{' --deep' if self.deep else ''} of {self.prefix or 'the whole repository'}: "
                f"{self.versions} versions, {self.objects} objects: {found}")

    def as_dict(self) -> dict:
        return {"prefix": self.prefix, "deep": self.deep, "versions": self.versions, "objects": self.objects,
                "clean": self.clean, "counts": self.counts(), "findings": [asdict(f) for f in self.findings]}


class Outcome(StrEnum):
    REUPLOADED = "re-uploaded"  # from a verified local copy
    MARKED_MISSING = "marked missing"  # no verified copy here: storage = missing
    STILL_MISSING = "still missing"  # recorded missing already, and no verified copy here either
    SKIPPED = "skipped"  # the version changed since the check (purged, say)
    ADOPTED = "adopted"  # an unrecorded object's version written from its description, as expired
    NOT_ADOPTED = "not adopted"  # an unrecorded object whose description cannot become a row (or its id is taken)


@dataclass(frozen=True)
class Repair:
    finding: Finding
    outcome: Outcome
    detail: str

    def line(self) -> str:
        return f"{self.outcome:<14} {self.finding.path}  version {self.finding.version}  {self.detail}"


@dataclass
class RepairResult:
    repairs: list[Repair] = field(default_factory=list)

    def of(self, outcome: Outcome) -> list[Repair]:
        return [r for r in self.repairs if r.outcome == outcome]

    def summary(self) -> str:
        return "repair: " + ", ".join(f"{len(self.of(o))} {o}" for o in Outcome)

    def as_dict(self) -> dict:
        return {"repairs": [{**asdict(r.finding), "outcome": r.outcome, "detail": r.detail} for r in self.repairs]}


# -- the check --------------------------------------------------------------------------------------


def check(repo: S3Repo, prefix: str = "", deep: bool = False, *, quiet: bool = False,
          page_size: int = PAGE) -> FsckReport:
    """Check every version under ``prefix`` (a type, a directory or a file path; "" for all) whose
    object should exist, and the store's objects under it for orphans. ``deep``: read every object
    and check its digest (xxh3, or md5 where none is recorded); archived objects only get a HEAD.
    Raises StoreUnavailableError or DatabaseUnavailableError if a server fails: no partial verdict."""
    repo.ensure_ready()
    scope = DirPath.parse(prefix.strip("/")) if prefix.strip("/") else None
    report = FsckReport(prefix.strip("/"), deep)
    gone = _gone_hosts(repo)
    workers = max(8, repo.config.transfer_concurrency)
    total = repo.meta.count_versions(scope)
    with ThreadPoolExecutor(workers, thread_name_prefix="fsck") as pool, \
            progress("fsck: versions", total, unit="versions", quiet=quiet) as bar:
        for page in _pages(repo, scope, page_size):
            found = pool.map(lambda version: _inspect(repo, version, deep, gone), page)
            report.findings += [f for f in found if f is not None and _still_wrong(repo, f)]
            report.versions += len(page)
            bar.advance(len(page))
    with progress("fsck: objects", None, unit="objects", quiet=quiet) as bar:
        for batch in _batches(repo.store.list(f"{scope.file_type}/" if scope else ""), KEY_BATCH):
            report.findings += _orphans(repo, batch, scope)
            report.objects += len(batch)
            bar.advance(len(batch))
    report.findings = _with_holders(repo, report.findings)
    return report


def _with_holders(repo: S3Repo, findings: list[Finding]) -> list[Finding]:
    """Each repairable finding with the hosts that recorded a verified copy of its version, said in its detail
    (where any did)."""
    repo.record_holders()  # this host's own copies, noted in this process and not yet recorded
    holders = repo.holders(f.version for f in findings if f.kind in REPAIRABLE)
    now = repo.meta.clock()

    def told(finding: Finding) -> Finding:
        if finding.kind not in REPAIRABLE:
            return finding
        held = holders.get(finding.version, [])
        if not held:
            return finding
        return replace(finding, holders=tuple(held), detail=f"{finding.detail}; {copies(held, now, repo.host)}")

    return [told(f) for f in findings]


def _pages(repo: S3Repo, scope: DirPath | None, page_size: int) -> Iterator[list[Version]]:
    after = 0
    while page := repo.meta.scan_versions(after, page_size, scope):
        yield page
        after = page[-1].id


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _gone_hosts(repo: S3Repo) -> Callable[[str], str | None]:
    """Why a version's origin host counts as gone (not seen for ``host_gone_after`` seconds, or never
    recorded), or None if it does not; this host never does."""
    cutoff = repo.meta.clock() - repo.config.host_gone_after
    last_seen = {h["name"]: h["last_seen"] for h in repo.meta.hosts()}

    def why_gone(host: str) -> str | None:
        if host == repo.host:
            return None
        if host not in last_seen:
            return "a host never recorded"
        return f"last seen {_when(last_seen[host])}" if last_seen[host] < cutoff else None

    return why_gone


def _inspect(repo: S3Repo, version: Version, deep: bool, gone: Callable[[str], str | None]) -> Finding | None:
    """What is wrong with one version's object, if anything."""
    def finding(kind: Kind, detail: str) -> Finding:
        return Finding(kind, version.s3_key, detail, str(version.path), version.id)

    if version.storage == Storage.LOCAL:
        why = gone(version.origin_host)
        if why is None:
            return None
        return finding(Kind.HOST_GONE, f"staged on {version.origin_host}, {why}; its bytes are on that host only")
    if version.storage == Storage.MISSING:
        return finding(Kind.MARKED_MISSING, "recorded lost by an earlier fsck --repair")
    info = repo.store.head(version.s3_key)
    if info is None:
        return finding(Kind.MISSING, f"not in {repo.store.describe_location()}")
    if version.size is not None and info.size != version.size:
        return finding(Kind.WRONG_SIZE, f"{info.size} bytes, recorded {version.size}")
    if deep and version.tier != Tier.ARCHIVED and version.md5 is not None:
        try:
            name, actual, expected = _digest_of_object(repo, version)
        except ObjectMissingError:  # deleted between the HEAD and the read
            return finding(Kind.MISSING, f"not in {repo.store.describe_location()}")
        if actual != expected:
            return finding(Kind.CORRUPT, f"{name} {actual}, recorded {expected}")
    return None


def _digest_of_object(repo: S3Repo, version: Version) -> tuple[str, str, str]:
    """(digest name, actual, recorded) of the object's bytes, read as one stream, a chunk at a time."""
    name, expected = download_digest(version.md5, version.xxh3)
    digest = HASHES[name]()
    for chunk in repo.store.stream(version.s3_key, 0, version.size, version.size):
        digest.update(chunk)
    return name, digest.hexdigest(), expected


def _still_wrong(repo: S3Repo, finding: Finding) -> bool:
    """Is a finding about an object still about a version that should have it? gc may have purged the
    version (and deleted its object) between the page's read and the HEAD."""
    if finding.kind not in (Kind.MISSING, Kind.WRONG_SIZE, Kind.CORRUPT):
        return True
    try:
        version = repo.meta.get(finding.version)
    except NotFoundError:
        return False
    return version.state in VISIBLE_STATES and version.storage == Storage.UPLOADED


def _orphans(repo: S3Repo, listed: list[ObjectInfo], scope: DirPath | None) -> list[Finding]:
    """The keys of one listed batch that no version references: not backups, not the ``.path``
    object beside a referenced object (see objects/s3.py), and, under a PREFIX deeper than a type,
    only those whose self-description names a path under it. Each is an orphan, or ``unrecorded`` if
    its description names a version the database lacks."""
    listed = [info for info in listed if not info.key.startswith(repo.config.backup_prefix)]
    owners = {info.key: info.key.removesuffix(PATH_OBJECT_SUFFIX) for info in listed}
    referenced = repo.meta.rows_of_keys(sorted(set(owners) | set(owners.values())))
    unreferenced = [info for info in listed if info.key not in referenced and owners[info.key] not in referenced]
    headed = lost.described(repo, unreferenced)  # they are few: their descriptions tell what they are
    lost_rows = lost.lost_rows(repo, headed)
    found = []
    for info in headed:
        path = info.description.get("path")
        if scope is not None and scope.dir and not (path and _under(path, scope)):
            continue
        if (unrecorded := lost_rows.get(info.key)) is not None:
            found.append(Finding(Kind.UNRECORDED, info.key, unrecorded.detail(), path, unrecorded.version_id))
            continue
        version = f", describes itself as version {info.description['version']}" if info.description.get(
            "version") else ""
        found.append(Finding(Kind.ORPHAN, info.key, f"{info.size} bytes, no version references it{version}", path))
    return found


def _under(path: str, scope: DirPath) -> bool:
    try:
        parsed = RepoPath.parse(path)
    except Exception:  # a description this project did not write
        return False
    full = f"{parsed.dir}/{parsed.name}" if parsed.dir else parsed.name
    return parsed.file_type == scope.file_type and (full == scope.dir or full.startswith(scope.dir + "/"))


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


# -- the repair -------------------------------------------------------------------------------------


def repair(repo: S3Repo, report: FsckReport, *, quiet: bool = False) -> RepairResult:
    """Re-upload every missing, wrong-size, corrupt or marked-missing object of ``report`` from a
    verified copy on this host; mark the uploaded ones without a copy ``storage = missing``. Each
    version's row is read again first: one that changed since the check (purged, say) is skipped.
    Adopt each unrecorded object: write its version's row as expired (ops/unrecorded.py)."""
    result = RepairResult()
    todo = [f for f in report.findings if f.kind in REPAIRABLE or f.kind == Kind.UNRECORDED]
    with progress("fsck: repair", len(todo), unit="versions", quiet=quiet) as bar:
        for finding in todo:
            done = _adopt_one(repo, finding) if finding.kind == Kind.UNRECORDED else _repair_one(repo, finding)
            log.info("fsck: %s", done.line())  # the CLI prints each one
            result.repairs.append(done)
            bar.advance()
    return result


def _repair_one(repo: S3Repo, finding: Finding) -> Repair:
    try:
        version = repo.meta.get(finding.version)
    except NotFoundError:
        return Repair(finding, Outcome.SKIPPED, "its row is gone")
    if version.state not in VISIBLE_STATES or version.storage == Storage.LOCAL:
        return Repair(finding, Outcome.SKIPPED, f"it is {version.state} and {version.storage} now")
    copy, evicted = _verified_copy(repo, version)
    if copy is None:
        elsewhere = copies_elsewhere(repo.holders([version.id]).get(version.id, []), repo.meta.clock(), repo.host)
        elsewhere = f"; {elsewhere}" if elsewhere else ""
        if version.storage == Storage.MISSING:
            return Repair(finding, Outcome.STILL_MISSING, "no verified copy on this host" + evicted + elsewhere)
        repo.meta.mark_missing(version.id)
        return Repair(finding, Outcome.MARKED_MISSING,
                      "no verified copy on this host; reads fail until one is found" + evicted + elsewhere)
    source, where, content = copy
    repo.store.put(version.s3_key, source, content.size, content.md5, object_description(version, content))
    if version.storage == Storage.MISSING:
        repo.meta.mark_restored(version.id)
    return Repair(finding, Outcome.REUPLOADED, f"from this host's {where} ({source})" + evicted)


def _adopt_one(repo: S3Repo, finding: Finding) -> Repair:
    version, detail = lost.adopt(repo, finding.key)
    return Repair(finding, Outcome.NOT_ADOPTED if version is None else Outcome.ADOPTED, detail)


def _verified_copy(repo: S3Repo, version: Version) -> tuple[tuple[Path, str, Content] | None, str]:
    """A local file holding exactly the version's recorded bytes (hashed now: a cache copy was
    verified when it was downloaded, but a disk can rot since), where it is, and its content; and a
    note for the report if this host's cache copy failed the re-hash: it is evicted, so that no reader
    here is served those bytes (a staged file that fails is left: staging is its writer's)."""
    evicted = ""
    for path, where in ((repo.cache.object_path(version.s3_key), "cache"),
                        (repo.cache.staging_path(version.s3_key), "staging area")):
        try:
            content = file_content(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("fsck: cannot read %s: %s", path, exc.strerror or exc)
            continue
        if (content.size, content.md5) == (version.size, version.md5) and version.xxh3 in (None, content.xxh3):
            return (path, where, content), evicted
        log.warning("fsck: %s (version %d): the copy in this host's %s, %s, does not match the recorded "
                    "size and digest; not used%s", version.path, version.id, where, path,
                    "; evicted from the cache" if where == "cache" else "")
        if where == "cache" and repo.cache.drop(version.s3_key):
            evicted = "; this host's cache copy failed its re-hash and was evicted"
    return None, evicted
