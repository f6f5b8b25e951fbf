"""``s3repofs backup``: a consistent, compressed snapshot of the metadata in the backup store, with its manifest.

Where: the bucket ``backup_s3_bucket`` names, else the objects' own store, under ``backup_prefix``
(``objects.store.open_backup_store``). A backup is two objects whose names sort by time::

    <prefix><UTC YYYYmmddTHHMMSS.ffffffZ>-<host>.jsonl.gz       the snapshot (meta/snapshot.py), gzipped
    <prefix><UTC YYYYmmddTHHMMSS.ffffffZ>-<host>.manifest.json  format, schema version, rows per table,
                                                                sha256 and size of the snapshot, created_at, host

The snapshot is written to a temporary file under ``local_root`` (disk, not memory: constant memory at any
number of versions), its sha256 computed on the way; it is uploaded and verified (the store's put, then
its size again), and only then is the manifest written. A snapshot without a manifest is incomplete: a
backup in progress, or one that failed; it is never restored, and retention deletes it once it is older
than ``orphan_grace``. Retention runs after a new backup is verified: all but the newest ``backup_keep``
complete backups are deleted, each manifest before its snapshot (so that a crash between the two leaves
an incomplete backup, never a manifest without its snapshot).
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .. import __version__
from ..config import Config
from ..errors import NotFoundError, StoreUnavailableError, VerificationError
from ..meta import snapshot
from ..objects.s3 import S3Store
from ..objects.store import ObjectStore, open_backup_store
from ..repo import S3Repo
from .progress import progress

MANIFEST_FORMAT = 1
SNAPSHOT_SUFFIX = ".jsonl.gz"
MANIFEST_SUFFIX = ".manifest.json"
STAMP = "%Y%m%dT%H%M%S.%fZ"  # UTC: names sort by time
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Backup:
    """One complete backup, as its manifest describes it."""

    name: str  # <UTC time>-<host>
    created_at: float
    host: str
    database: str  # the engine it was taken from: sqlite or postgresql
    schema_version: int
    rows: dict[str, int]  # per table
    size: int  # of the compressed snapshot
    sha256: str

    @property
    def versions(self) -> int:
        return self.rows.get("versions", 0)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BackupListing:
    location: str  # the store and prefix, for messages
    backups: list[Backup]  # complete backups, oldest first
    corrupt: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be restored
    incomplete: list[str] = field(default_factory=list)  # snapshots without a manifest (in progress or failed)

    def find(self, name: str) -> Backup:
        """The backup called ``name`` (its snapshot's or manifest's file name or key are accepted too)."""
        name = _name_of(name.rpartition("/")[2]) or name
        for backup in self.backups:
            if backup.name == name:
                return backup
        if name in self.corrupt:
            raise VerificationError(f"backup {name} cannot be restored: {self.corrupt[name]}")
        raise NotFoundError(f"no backup named {name} in {self.location} (`s3repofs backup list` shows them)")

    def newest(self) -> Backup:
        """The newest backup; VerificationError if the newest is corrupt (an older one is not taken silently)."""
        if not self.backups and not self.corrupt:
            raise NotFoundError(f"no backups in {self.location}")
        newest_corrupt = max(self.corrupt, default="")
        if not self.backups or newest_corrupt > self.backups[-1].name:
            raise VerificationError(f"the newest backup {newest_corrupt} cannot be restored: "
                                    f"{self.corrupt[newest_corrupt]} (name an older one, or use --newest-intact)")
        return self.backups[-1]

    def as_dict(self) -> dict:
        return {"location": self.location, "backups": [b.as_dict() for b in self.backups],
                "corrupt": self.corrupt, "incomplete": self.incomplete}


@dataclass(frozen=True)
class BackupResult:
    backup: Backup
    location: str
    deleted: list[str]  # older backups (and stale incomplete ones) that retention deleted
    seconds: float

    def as_dict(self) -> dict:
        return {**self.backup.as_dict(), "location": self.location, "deleted": self.deleted,
                "seconds": round(self.seconds, 3)}


class BackupStore:
    """The backups of one repository: a store and a prefix."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.prefix = config.backup_prefix
        self.store: ObjectStore = open_backup_store(config)
        self.location = f"{self.store.describe_location()} under {self.prefix}"

    def check_access(self) -> None:
        """StoreUnavailableError naming ``backup_s3_bucket`` if that bucket is missing or refuses us."""
        if self.config.backup_s3_bucket and isinstance(self.store, S3Store):
            try:
                self.store.check_access()
            except StoreUnavailableError as exc:
                raise StoreUnavailableError(f"backup_s3_bucket {self.config.backup_s3_bucket!r}: {exc}") from None

    def snapshot_key(self, name: str) -> str:
        return f"{self.prefix}{name}{SNAPSHOT_SUFFIX}"

    def manifest_key(self, name: str) -> str:
        return f"{self.prefix}{name}{MANIFEST_SUFFIX}"

    def list(self) -> BackupListing:
        """Every backup under the prefix: complete ones (oldest first), corrupt ones and incomplete ones."""
        self.check_access()
        snapshots: dict[str, int] = {}
        manifests: list[str] = []
        for info in self.store.list(self.prefix):
            file_name = info.key[len(self.prefix):]
            if file_name.endswith(SNAPSHOT_SUFFIX):
                snapshots[file_name[:-len(SNAPSHOT_SUFFIX)]] = info.size
            elif file_name.endswith(MANIFEST_SUFFIX):
                manifests.append(file_name[:-len(MANIFEST_SUFFIX)])
        backups, corrupt = [], {}
        for name in sorted(manifests):
            try:
                backup = self.read_manifest(name)
            except VerificationError as exc:
                corrupt[name] = str(exc)
                continue
            if name not in snapshots:
                corrupt[name] = "its snapshot object is missing"
            else:
                backups.append(backup)
        incomplete = sorted(set(snapshots) - set(manifests))
        return BackupListing(self.location, backups, corrupt, incomplete)

    def read_manifest(self, name: str) -> Backup:
        """The backup ``name`` as its manifest describes it; VerificationError if the manifest is corrupt."""
        key = self.manifest_key(name)
        info = self.store.head(key)
        if info is None:
            raise NotFoundError(f"no backup named {name} in {self.location}")
        text = b"".join(self.store.stream(key, 0, info.size, info.size))
        try:
            return _parse_manifest(name, json.loads(text))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise VerificationError(f"the manifest of backup {name} is corrupt: {exc}") from None

    def upload(self, backup: Backup, source: Path, md5: str) -> None:
        """Store the snapshot, verify it, then write its manifest (last: it makes the backup complete)."""
        key = self.snapshot_key(backup.name)
        self.store.put(key, source, backup.size, md5, {})
        self._check_size(key, backup.size)
        manifest = json.dumps({"format": MANIFEST_FORMAT, "s3repofs": __version__, **backup.as_dict()},
                              indent=2).encode()
        with tempfile.NamedTemporaryFile(dir=self.config.local_root, prefix=".manifest-") as tmp:
            tmp.write(manifest)
            tmp.flush()
            self.store.put(self.manifest_key(backup.name), Path(tmp.name), len(manifest),
                           hashlib.md5(manifest).hexdigest(), {})
        self._check_size(self.manifest_key(backup.name), len(manifest))

    def _check_size(self, key: str, size: int) -> None:
        info = self.store.head(key)
        if info is None or info.size != size:
            raise VerificationError(f"{key} in {self.location}: stored {info.size if info else 'nothing'}, "
                                    f"expected {size} bytes")

    @contextmanager
    def fetch(self, backup: Backup) -> Iterator[Path]:
        """The backup's snapshot, downloaded to a temporary file (removed afterwards) and verified against its
        manifest: VerificationError if its size or sha256 differ."""
        key = self.snapshot_key(backup.name)
        info = self.store.head(key)
        if info is None:
            raise VerificationError(f"backup {backup.name} cannot be restored: its snapshot {key} is missing")
        digest = hashlib.sha256()
        self.config.local_root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.config.local_root, prefix=".restore-") as tmp:
            for chunk in self.store.stream(key, 0, info.size, info.size):
                digest.update(chunk)
                tmp.write(chunk)
            tmp.flush()
            size = tmp.tell()
            if size != backup.size or digest.hexdigest() != backup.sha256:
                raise VerificationError(
                    f"backup {backup.name} is corrupt: its snapshot has {size} bytes with sha256 "
                    f"{digest.hexdigest()}, its manifest says {backup.size} bytes with sha256 {backup.sha256}")
            yield Path(tmp.name)

    def delete(self, name: str) -> None:
        self.store.delete(self.manifest_key(name))  # first: the backup is incomplete from here on
        self.store.delete(self.snapshot_key(name))


def backup(repo: S3Repo, *, quiet: bool = True, clock=time.time) -> BackupResult:
    """Take a backup of ``repo``'s database into its backup store, verify it, then apply retention."""
    started = time.monotonic()
    store = BackupStore(repo.config)
    store.check_access()
    created_at = clock()
    name = f"{datetime.datetime.fromtimestamp(created_at, datetime.timezone.utc).strftime(STAMP)}-{repo.host}"
    repo.config.local_root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=repo.config.local_root, prefix=".backup-") as tmp:
        sums = _Digests(tmp)
        header, rows = _write_snapshot(repo, sums, created_at, quiet)
        tmp.flush()
        made = Backup(name=name, created_at=created_at, host=repo.host, database=header.database,
                      schema_version=header.schema_version, rows=rows, size=sums.size, sha256=sums.sha256.hexdigest())
        store.upload(made, Path(tmp.name), sums.md5.hexdigest())
    deleted = apply_retention(store, made, clock())
    return BackupResult(made, store.location, deleted, time.monotonic() - started)


def _write_snapshot(repo: S3Repo, out: "_Digests", created_at: float,
                    quiet: bool) -> tuple[snapshot.Header, dict[str, int]]:
    """Write the gzipped snapshot of ``repo``'s database to ``out``; its header and rows per table."""
    with snapshot.reading(repo.db) as reader:
        with progress("backup", sum(reader.counts().values()), unit="rows", quiet=quiet) as bar:
            # Level 6, zlib's default: gzip's 9 took eight times the CPU here for 1.5 % less size.
            with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=int(created_at)) as compressed:
                text = io.TextIOWrapper(compressed, encoding="utf-8", newline="\n")
                rows = reader.dump(lambda line: text.write(line + "\n"), bar.advance)
                text.detach()  # flushes into the gzip stream, which its block then closes
    assert reader.header is not None
    return reader.header, rows


def apply_retention(store: BackupStore, newest: Backup, now: float) -> list[str]:
    """Delete all but the newest ``backup_keep`` complete backups (``newest`` always kept), corrupt ones older
    than those kept, and incomplete ones older than ``orphan_grace``; the names deleted."""
    listing = store.list()
    others = [b.name for b in listing.backups if b.name != newest.name]  # oldest first
    kept = {newest.name, *others[max(0, len(others) - store.config.backup_keep + 1):]}
    oldest_kept = min(kept)
    doomed = [name for name in others if name not in kept]
    doomed += [name for name in listing.corrupt if name < oldest_kept]
    for name in doomed:
        store.delete(name)
    stale = [name for name in listing.incomplete if _time_of(name) < now - store.config.orphan_grace]
    for name in stale:
        store.store.delete(store.snapshot_key(name))
    return sorted(doomed + stale)


def list_backups(config_or_repo: Config | S3Repo) -> BackupListing:
    return BackupStore(config_of(config_or_repo)).list()


def oldest_backup_time(repo: Config | S3Repo) -> float | None:
    """When the oldest complete backup in the backup store was taken (None: there is none). What it references
    as published may be restored, so gc must keep those objects at least this long."""
    backups = list_backups(repo).backups
    return backups[0].created_at if backups else None


class _Digests(io.RawIOBase):
    """A file being written, with its size, sha256 (the manifest's) and md5 (the store's put) kept on the way."""

    def __init__(self, file) -> None:
        self._file = file
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._file.write(data)
        self.sha256.update(data)
        self.md5.update(data)
        self.size += len(data)
        return len(data)


def config_of(config_or_repo: Config | S3Repo) -> Config:
    return config_or_repo.config if isinstance(config_or_repo, S3Repo) else config_or_repo


def _name_of(file_name: str) -> str | None:
    for suffix in (SNAPSHOT_SUFFIX, MANIFEST_SUFFIX):
        if file_name.endswith(suffix):
            return file_name[:-len(suffix)]
    return None


def _time_of(name: str) -> float:
    """When the backup called ``name`` was started, from its name (0 for a name not of ours: old enough)."""
    try:
        stamp = datetime.datetime.strptime(name.partition("-")[0], STAMP)
    except ValueError:
        return 0.0
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()


def _parse_manifest(name: str, data: dict) -> Backup:
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"unknown format {data.get('format')!r}")
    rows = {str(table): int(count) for table, count in data["rows"].items()}
    sha256 = str(data["sha256"])
    if len(sha256) != 64:
        raise ValueError("its sha256 is not one")
    return Backup(name=name, created_at=float(data["created_at"]), host=str(data["host"]),
                  database=str(data["database"]), schema_version=int(data["schema_version"]), rows=rows,
                  size=int(data["size"]), sha256=sha256)
