"""Real servers on loopback for the tests: a private PostgreSQL cluster and moto's S3 server.

Nothing here is mocked: the tests talk to these servers over TCP exactly as production code
talks to a real PostgreSQL and a real S3 endpoint.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import boto3
import psycopg2
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from psycopg2 import sql

SETUP_HINT = "run ./scripts/setup (it apt-get installs postgresql and pip installs the test extras)"
START_TIMEOUT = 30.0  # seconds to wait for a server to answer
STOP_TIMEOUT = 10.0  # seconds to wait for a polite stop before killing
PORT_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it

_DB_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _stop_at_exit(stop: Callable[[], None]) -> None:
    """Make sure `stop` runs even if the session ends without fixture teardown.

    Covers a normal interpreter exit (atexit) and SIGTERM (CI cancellation, `timeout`), which
    otherwise kills pytest outright and leaves the daemonized postmaster running. Forked
    children (multiprocessing in tests) inherit both, so both only act in this very process.
    """
    owner = os.getpid()
    atexit.register(lambda: stop() if os.getpid() == owner else None)
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def on_sigterm(signum: int, frame: object) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills outright
            if os.getpid() != owner:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            raise KeyboardInterrupt("SIGTERM")  # pytest stops and runs fixture teardowns

        signal.signal(signal.SIGTERM, on_sigterm)


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------

def _postgres_bindir() -> Path:
    """The bin directory of the newest installed PostgreSQL (the one holding initdb)."""
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", Path(path).parent.name))

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(out.stdout.strip())
    for candidate in candidates:
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    raise RuntimeError(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {SETUP_HINT}")


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class PostgresServer:
    """A private PostgreSQL cluster listening on 127.0.0.1:port, trust authentication."""

    host = "127.0.0.1"
    user = "postgres"

    def __init__(self, bindir: Path, cluster_dir: Path, port: int, as_postgres: bool,
                 owns_cluster_dir: bool) -> None:
        self.bindir = bindir
        self.cluster_dir = cluster_dir
        self.data_dir = cluster_dir / "data"
        self.log_path = cluster_dir / "postgres.log"
        self.port = port
        self._as_postgres = as_postgres
        self._owns_cluster_dir = owns_cluster_dir
        self._postmaster_pid: int | None = None
        self._stopped = False

    def _run(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL tool, as user postgres when we are root (the server refuses root)."""
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        # cwd="/": user postgres may not be allowed into our working directory.
        result = subprocess.run([*prefix, str(self.bindir / args[0]), *args[1:]], cwd="/",
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}\n"
                               f"server log:\n{_tail(self.log_path)}")
        return result

    def _connect(self, dbname: str = "postgres", timeout: int = 5) -> Any:
        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname=dbname,
                                connect_timeout=timeout)
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
        return conn

    def _start(self) -> None:
        self._run("pg_ctl", "start", "-w", "-t", str(int(START_TIMEOUT)), "-D", str(self.data_dir),
                  "-l", str(self.log_path), "-o", f"-p {self.port}", timeout=START_TIMEOUT + 10)
        pid_file = self.data_dir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            self._postmaster_pid = int(pid_file.read_text().splitlines()[0])
        # pg_ctl -w watched the pid file; also prove that TCP on loopback answers.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self._connect().close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def url(self, name: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{name}"

    def create_database(self, name: str) -> str:
        """Create database `name` and return its URL."""
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"not a plain database name: {name!r}")
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name`, disconnecting whoever still uses it."""
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        finally:
            conn.close()

    def _halt(self) -> None:
        """Stop the postmaster at once (immediate: no checkpoint), killing it if it lingers."""
        stopped = False
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            stopped = self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-t", str(int(STOP_TIMEOUT)),
                                "-D", str(self.data_dir), timeout=STOP_TIMEOUT + 5, check=False).returncode == 0
        pid = self._postmaster_pid
        # Kill only if pg_ctl failed: once the postmaster is gone its pid may be reused.
        if not stopped and pid is not None and _pid_alive(pid):
            # Its children notice the postmaster's death and exit on their own.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self._postmaster_pid = None

    def pause(self, crash: bool = False) -> None:
        """Stop the server, keeping its data (a database outage); ``resume()`` ends it. A fast stop, as
        ``systemctl stop`` does: an immediate one would lose what the test cluster committed without
        syncing (synchronous_commit is off). ``crash=True`` stops it at once, as a crash would (start
        the server with synchronous_commit=on to keep what it acknowledged)."""
        if crash:
            self._halt()
            return
        self._run("pg_ctl", "stop", "-m", "fast", "-w", "-t", str(int(STOP_TIMEOUT)), "-D", str(self.data_dir),
                  timeout=STOP_TIMEOUT + 5)
        self._postmaster_pid = None

    def resume(self) -> None:
        """Start a paused server again, on the same port (a running one is left as it is)."""
        if self._postmaster_pid is None:
            self._start()

    def stop(self) -> None:
        """Stop the server and throw its data away. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._halt()
        if self._owns_cluster_dir:
            shutil.rmtree(self.cluster_dir, ignore_errors=True)


def _postgres_can_enter(path: Path) -> bool:
    """Whether user postgres can reach and write `path` (pytest's tmp dirs are mode 0700)."""
    return subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(path), "-a", "-x", str(path)],
                          cwd="/", capture_output=True).returncode == 0


def start_postgres(base_dir: Path, **overrides: str) -> PostgresServer:
    """initdb and start a private PostgreSQL cluster on a free loopback port; ``overrides``: settings
    of postgresql.conf (synchronous_commit="on" for a server that is to be stopped as by a crash)."""
    bindir = _postgres_bindir()
    base_dir.mkdir(parents=True, exist_ok=True)
    as_postgres = os.geteuid() == 0
    cluster_dir = base_dir / "cluster"
    cluster_dir.mkdir()
    owns_cluster_dir = False
    if as_postgres:
        uid, gid = pwd.getpwnam("postgres")[2:4]
        os.chown(cluster_dir, uid, gid)
        if not _postgres_can_enter(cluster_dir):
            # An ancestor (pytest's tmp root is 0700 root) locks user postgres out: put the
            # cluster in the world-traversable temp dir, and a symlink to it in base_dir.
            cluster_dir.rmdir()
            cluster_dir = Path(tempfile.mkdtemp(prefix="s3repofs-pg-"))
            os.chown(cluster_dir, uid, gid)
            (base_dir / "cluster").symlink_to(cluster_dir)
            owns_cluster_dir = True

    server = PostgresServer(bindir, cluster_dir, 0, as_postgres, owns_cluster_dir)
    try:
        # --no-sync: the cluster is thrown away, so durability only costs time.
        server._run("initdb", "--no-sync", "--auth=trust", f"--username={server.user}", "--encoding=UTF8",
                    "--no-locale", "-D", str(server.data_dir), timeout=120)
        socket_dir = cluster_dir / "sock"
        socket_dir.mkdir()
        if as_postgres:
            os.chown(socket_dir, uid, gid)
        settings = {
            "listen_addresses": _conf_quote(server.host),
            "unix_socket_directories": _conf_quote(str(socket_dir)),
            "max_connections": "200",
            # Speed over durability: nothing in a test cluster outlives the test session.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **overrides,
        }
        with open(server.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# s3repofs test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        for attempt in range(PORT_ATTEMPTS):
            server.port = _free_port()
            try:
                server._start()
                break
            except Exception:
                server._halt()  # in case it half started
                if attempt == PORT_ATTEMPTS - 1:
                    raise
    except BaseException:
        server.stop()
        raise
    _stop_at_exit(server.stop)
    return server


# --------------------------------------------------------------------------------------------
# S3 (moto's standalone server)
# --------------------------------------------------------------------------------------------

class S3Server:
    """moto's S3-protocol server on http://127.0.0.1:port, accepting any credentials."""

    access_key = "testing"
    secret_key = "testing"
    region = "us-east-1"

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: IO[bytes], log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log
        self._client: Any = None

    def client(self) -> Any:
        """A new boto3 S3 client for this server."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}))

    def _shared_client(self) -> Any:
        if self._client is None:
            self._client = self.client()
        return self._client

    def repo_keys(self, bucket: str, endpoint_url: str | None = None) -> dict:
        """A repository configuration's S3 keys for ``bucket`` here (or through ``endpoint_url``, a proxy)."""
        return {"default_s3_bucket": bucket, "s3_endpoint_url": endpoint_url or self.endpoint_url,
                "s3_region": self.region, "s3_access_key": self.access_key, "s3_secret_key": self.secret_key}

    def create_bucket(self, name: str) -> None:
        self._shared_client().create_bucket(Bucket=name)

    def delete_bucket(self, name: str) -> None:
        """Best effort: empty the bucket (all versions) and delete it; errors are ignored."""
        client = self._shared_client()
        with contextlib.suppress(BotoCoreError, ClientError):
            for page in client.get_paginator("list_object_versions").paginate(Bucket=name):
                keys = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                        for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            client.delete_bucket(Bucket=name)

    def _answers(self) -> bool:
        # No proxies: a proxy from the environment must not sit between us and loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            opener.open(self.endpoint_url + "/", timeout=2).close()
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except (urllib.error.URLError, OSError):
            return False
        return True

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers). Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def await_answer(server: "S3Server", proc: subprocess.Popen[bytes], name: str, log_path: Path) -> bool:
    """Wait until a just-started S3 server answers HTTP: True once it does (it is then stopped at
    exit); False, stopped, if it exited first (most likely someone else took the port)."""
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and not server._answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer on {server.endpoint_url} within "
                                   f"{START_TIMEOUT:.0f} s; log:\n{_tail(log_path)}")
            time.sleep(0.1)
    except BaseException:
        server.stop()
        raise
    if proc.poll() is None:
        _stop_at_exit(server.stop)
        return True
    server.stop()
    return False


def start_s3_server(log_dir: Path) -> S3Server:
    """Start moto's standalone server on a free loopback port and wait until it answers HTTP."""
    # moto.server needs moto's "server" extra (flask and friends), not just moto.
    if any(importlib.util.find_spec(mod) is None for mod in ("moto", "flask", "flask_cors")):
        raise RuntimeError(f"moto's server (pip package moto[server]) is not installed: {SETUP_HINT}")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "moto_server.log"
    for _ in range(PORT_ATTEMPTS):
        port = _free_port()
        log = open(log_path, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        server = S3Server(proc, port, log, log_path)
        if await_answer(server, proc, "moto server", log_path):
            return server
    raise RuntimeError(f"moto server failed to start (tried {PORT_ATTEMPTS} ports); log:\n{_tail(log_path)}")
