"""Configuration: the JSON file of the original S3Repo, validated once into a frozen dataclass.

Found through ``--config FILE`` (or ``--config NAME``: ``NAME.json`` in the user's configuration
directory, else in /etc/s3repofs, as systemd's ``s3repofs@NAME`` and fstab name a repository),
``$S3REPO_CONFIG`` or ``$S3CACHE_CONFIG``; with none of them, the embedded default repository
(SQLite metadata, local object directory) under the user's data directory. Every problem raises
ConfigError naming the key and the file; secrets never appear in messages or in ``repr``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote, unquote, urlsplit

from .domain.lifecycle import ARCHIVE_CLASSES
from .errors import ConfigError

log = logging.getLogger(__name__)

ENV_VARS = ("S3REPO_CONFIG", "S3CACHE_CONFIG")
EMBEDDED = "<embedded default>"
SYSTEM_CONFIG_DIR = Path("/etc/s3repofs")
# A config's name (``--config prod``, ``s3repofs@prod.service``): no path separator, no leading dot.
_CONFIG_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")

# key -> (accepted types, default). Anything else in the file is an error: a typo must not be ignored.
_OPTIONAL: dict[str, tuple[tuple[type, ...], Any]] = {
    "local_root": ((str,), None),
    "default_s3_bucket": ((str,), None),
    "backup_s3_bucket": ((str,), None),
    "s3_access_key": ((str,), None),
    "s3_secret_key": ((str,), None),
    "s3_endpoint_url": ((str,), None),
    "s3_region": ((str,), None),
    "object_dir": ((str,), None),
    "database": ((str, dict), None),
    "cache_max_bytes": ((int,), 10 * 1024**3),
    "unpublished_ttl": ((int, float), 7 * 86400),
    "expired_retention": ((int, float), 30 * 86400),
    "orphan_grace": ((int, float), 86400),
    "host_gone_after": ((int, float), 86400),
    "backup_prefix": ((str,), "_s3repofs/backups/"),
    "backup_keep": ((int,), 7),
    "metadata_ttl": ((int, float), 5.0),
    "multipart_threshold": ((int,), 128 * 1024**2),
    "multipart_chunksize": ((int,), 16 * 1024**2),
    "transfer_concurrency": ((int,), 8),
    "download_part_size": ((int,), 0),
    "prefetch_files": ((int,), 64),
    "prefetch_max_size": ((int,), 1024**2),
    "host_name": ((str,), None),
    "archive_storage_class": ((str,), "GLACIER"),
}
_DB_KEYS = {"host": (str,), "port": (int,), "user": (str,), "password": (str,), "database": (str,)}
_SECRET_KEYS = ("s3_secret_key", "s3_access_key", "database")


@dataclass(frozen=True)
class Config:
    """Everything the repository needs, resolved and validated. Build with ``load_config``."""

    source: str
    local_root: Path
    database_url: str = field(repr=False)
    default_s3_bucket: str | None = None
    backup_s3_bucket: str | None = None
    object_dir: Path | None = None
    s3_access_key: str | None = field(default=None, repr=False)
    s3_secret_key: str | None = field(default=None, repr=False)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    cache_max_bytes: int = 10 * 1024**3
    unpublished_ttl: float = 7 * 86400
    expired_retention: float = 30 * 86400
    # gc leaves an object no row references alone this long: its upload may still be arriving.
    orphan_grace: float = 86400
    # A host whose mounts and commands have not been heard of for this long is gone: gc may discard what
    # it staged, fsck reports it. Mounts record themselves every HEARTBEAT seconds, far shorter than this.
    host_gone_after: float = 86400
    # Database backups go to backup_s3_bucket (else the objects' store) under this prefix; the newest
    # backup_keep are kept. The prefix starts with '_', which no file type can, so gc never mistakes a
    # backup for an orphan object.
    backup_prefix: str = "_s3repofs/backups/"
    backup_keep: int = 7
    metadata_ttl: float = 5.0
    # Measured on moto and s3rver: completing a multipart upload of 64 MiB costs them ~250 ms (they
    # concatenate the parts), so one PUT is twice as fast below this size.
    multipart_threshold: int = 128 * 1024**2
    multipart_chunksize: int = 16 * 1024**2
    transfer_concurrency: int = 8
    download_part_size: int = 0  # 0: one stream per object; 8-16 MiB parts pay off on AWS S3
    prefetch_files: int = 64  # files a sequential reader of a directory gets downloaded ahead (0: none)
    prefetch_max_size: int = 1024**2  # only files up to this size are prefetched
    host_name: str | None = None
    archive_storage_class: str = "GLACIER"  # where `s3repofs archive` moves objects (lifecycle.ARCHIVE_CLASSES)

    @property
    def staging_dir(self) -> Path:
        return self.local_root / "staging"


def default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "s3repofs"


def load_config(source: str | os.PathLike | Mapping | None = None) -> Config:
    """Resolve the configuration: a dict, a file path, the environment, or the embedded default."""
    if isinstance(source, Mapping):
        return config_from_dict(dict(source), "<dict>")
    if source is None:
        source = next((os.environ[v] for v in ENV_VARS if os.environ.get(v)), None)
    if source is None:
        return embedded_config()
    return config_from_file(config_path(source))


def user_config_dir() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "s3repofs"


def config_path(source: str | os.PathLike) -> Path:
    """The file ``source`` names: a path as given, or for a bare NAME that is not a file here,
    ``NAME.json`` in the user's configuration directory, else in /etc/s3repofs."""
    path = Path(source)
    text = os.fspath(source)
    if path.exists() or not _CONFIG_NAME.fullmatch(text) or text.endswith(".json"):
        return path
    candidates = [user_config_dir() / f"{text}.json", SYSTEM_CONFIG_DIR / f"{text}.json"]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise ConfigError(f"no config file {text!r} here, and no config named {text!r}: "
                          f"looked for {' and '.join(map(str, candidates))}")
    return found


def embedded_config(root: Path | None = None) -> Config:
    root = (root or default_data_dir()).absolute()
    return Config(
        source=EMBEDDED,
        local_root=root,
        database_url=f"sqlite://{root / 'repo.db'}",
        object_dir=root / "objects",
    )


def config_from_file(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a JSON object")
    config = config_from_dict(data, str(path))
    _warn_if_secrets_readable(path, data)
    return config


def config_from_dict(data: dict, source: str) -> Config:
    unknown = sorted(set(data) - set(_OPTIONAL))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(_OPTIONAL))})")
    values: dict[str, Any] = {}
    for key, (types, default) in _OPTIONAL.items():
        value = data.get(key, default)
        if value is None:
            values[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join("object" if t is dict else "string" if t is str else "number" for t in types)
            raise ConfigError(f"{source}: key {key!r} must be a {wanted}")
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{source}: key {key!r} must not be negative")
        values[key] = value

    local_root = _absolute_dir(values.pop("local_root") or str(default_data_dir()), "local_root", source)
    object_dir = values.pop("object_dir")
    object_path = _absolute_dir(object_dir, "object_dir", source) if object_dir else None
    if object_path is None and not values["default_s3_bucket"]:
        raise ConfigError(
            f"{source}: missing key 'default_s3_bucket' (or 'object_dir' for a local object store)"
        )
    if values["default_s3_bucket"] is not None:
        _check_bucket(values["default_s3_bucket"], "default_s3_bucket", source)
    if values["backup_s3_bucket"] is not None:
        _check_bucket(values["backup_s3_bucket"], "backup_s3_bucket", source)
    if bool(values["s3_access_key"]) != bool(values["s3_secret_key"]):
        raise ConfigError(f"{source}: 's3_access_key' and 's3_secret_key' must be given together")
    if values["s3_endpoint_url"] is not None and not values["s3_endpoint_url"].startswith(("http://", "https://")):
        raise ConfigError(f"{source}: key 's3_endpoint_url' must start with http:// or https://")
    if values["metadata_ttl"] > 3600:
        raise ConfigError(f"{source}: key 'metadata_ttl' must be at most 3600 seconds")
    if values["multipart_chunksize"] < 5 * 1024**2:
        raise ConfigError(f"{source}: key 'multipart_chunksize' must be at least 5 MiB (an S3 rule)")
    if values["backup_keep"] < 1:
        raise ConfigError(f"{source}: key 'backup_keep' must be at least 1")
    if not values["backup_prefix"].startswith("_") or not values["backup_prefix"].endswith("/"):
        raise ConfigError(f"{source}: key 'backup_prefix' must start with '_' (no file type does) and end with '/'")
    if values["transfer_concurrency"] < 1:
        raise ConfigError(f"{source}: key 'transfer_concurrency' must be at least 1")
    if values["archive_storage_class"] not in ARCHIVE_CLASSES:
        raise ConfigError(f"{source}: key 'archive_storage_class' must be one of {', '.join(ARCHIVE_CLASSES)} (classes "
                          "read at once, such as GLACIER_IR, need no archive tier: use an S3 lifecycle rule)")
    for key in ("download_part_size", "prefetch_files", "prefetch_max_size", "cache_max_bytes"):
        if values[key] < 0:
            raise ConfigError(f"{source}: key {key!r} must not be negative")

    database_url = _database_url(values.pop("database"), local_root, source)
    return Config(source=source, local_root=local_root, object_dir=object_path, database_url=database_url, **values)


def _absolute_dir(value: str, key: str, source: str) -> Path:
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        raise ConfigError(f"{source}: key {key!r} must be an absolute path, not {value!r}")
    return path


def _check_bucket(name: str, key: str, source: str) -> None:
    if not (3 <= len(name) <= 63) or not all(c.islower() or c.isdigit() or c in ".-" for c in name):
        raise ConfigError(
            f"{source}: key {key!r}: {name!r} is not a valid bucket name "
            "(3-63 characters: lowercase letters, digits, '.', '-')"
        )


def _database_url(value: str | dict | None, local_root: Path, source: str) -> str:
    if value is None:
        return f"sqlite://{local_root / 'repo.db'}"
    if isinstance(value, str):
        if value.startswith("sqlite:///"):
            if not os.path.isabs(value[len("sqlite://"):]):
                raise ConfigError(f"{source}: key 'database': a sqlite URL needs an absolute path (sqlite:///abs/path.db)")
            return value
        if value.startswith(("postgresql://", "postgres://")):
            if not urlsplit(value).path.strip("/"):
                raise ConfigError(f"{source}: key 'database': the URL names no database")
            return value
        raise ConfigError(f"{source}: key 'database' must be a postgresql://... or sqlite:///... URL")
    unknown = sorted(set(value) - set(_DB_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key 'database.{unknown[0]}' (known: {', '.join(_DB_KEYS)})")
    for key, types in _DB_KEYS.items():
        if key in value and (isinstance(value[key], bool) or not isinstance(value[key], types)):
            raise ConfigError(f"{source}: key 'database.{key}' has the wrong type")
    if "database" not in value:
        raise ConfigError(f"{source}: missing key 'database.database'")
    user = quote(value.get("user", ""), safe="")
    password = value.get("password")
    auth = f"{user}:{quote(password, safe='')}@" if password is not None else (f"{user}@" if user else "")
    host = value.get("host", "localhost")
    port = value.get("port", 5432)
    return f"postgresql://{auth}{host}:{port}/{quote(value['database'], safe='')}"


def mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def url_password(url: str) -> str | None:
    password = urlsplit(url).password
    return unquote(password) if password is not None else None


def _warn_if_secrets_readable(path: Path, data: dict) -> None:
    holds_secret = data.get("s3_secret_key") or (
        isinstance(data.get("database"), dict) and data["database"].get("password")
    ) or (isinstance(data.get("database"), str) and urlsplit(data["database"]).password)
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if holds_secret and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("config file %s holds secrets but is readable by others (mode %o): chmod 600 it",
                    path, stat.S_IMODE(mode))
