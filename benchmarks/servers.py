"""The servers a benchmark run needs, all on 127.0.0.1: PostgreSQL and moto come from the test suite's
``tests/servers.py`` (imported, not copied); s3rver (a Node.js S3 server) is started here.

Every server object offers what the benchmarks use: ``endpoint_url``, ``access_key``, ``secret_key``,
``region``, ``client()``, ``create_bucket(name)`` and an idempotent ``stop()``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
S3RVER_PREFIX = Path(__file__).resolve().parent / ".s3rver"
S3RVER_BIN = S3RVER_PREFIX / "node_modules" / ".bin" / "s3rver"
S3RVER_PACKAGE = "s3rver@3"


def _load_test_servers() -> Any:
    """tests/servers.py under its own module name: benchmarks/servers.py (this file) is `servers` here."""
    spec = importlib.util.spec_from_file_location("s3repofs_test_servers", REPO_ROOT / "tests" / "servers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


test_servers = _load_test_servers()
start_postgres = test_servers.start_postgres
start_moto = test_servers.start_s3_server


class S3rverServer(test_servers.S3Server):
    """s3rver on http://127.0.0.1:port; it checks signatures made with S3RVER / S3RVER."""

    access_key = "S3RVER"
    secret_key = "S3RVER"

    def __init__(self, proc: subprocess.Popen, port: int, log: IO[bytes], log_path: Path, data_dir: Path) -> None:
        super().__init__(proc, port, log, log_path)
        self.data_dir = data_dir

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def ensure_s3rver() -> Path:
    """Install s3rver into benchmarks/.s3rver once (npm), and return its executable."""
    if not S3RVER_BIN.exists():
        if shutil.which("npm") is None:
            raise RuntimeError("s3rver needs Node.js and npm: apt-get install nodejs npm")
        print(f"installing {S3RVER_PACKAGE} into {S3RVER_PREFIX} ...", file=sys.stderr)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(S3RVER_PREFIX),
                        S3RVER_PACKAGE], check=True, stdout=subprocess.DEVNULL)
    return S3RVER_BIN


def start_s3rver(work_dir: Path) -> S3rverServer:
    """Start s3rver on a free loopback port with a fresh data directory; wait until it answers HTTP."""
    binary = ensure_s3rver()
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "s3rver.log"
    # --openssl-legacy-provider: s3rver hashes listing continuation tokens with an algorithm that
    # Node 17+ only offers through the legacy provider; without it, listings over 1,000 keys fail.
    env = {**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"}
    last_error = "not started"
    for _ in range(test_servers.PORT_ATTEMPTS):
        port = test_servers._free_port()
        data_dir = Path(tempfile.mkdtemp(prefix="s3rver-", dir=work_dir))
        log = open(log_path, "ab")
        proc = subprocess.Popen([str(binary), "--directory", str(data_dir), "--address", "127.0.0.1",
                                 "--port", str(port), "--silent", "--no-vhost-buckets"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        server = S3rverServer(proc, port, log, log_path, data_dir)
        if test_servers.await_answer(server, proc, "s3rver", log_path):
            return server
        last_error = test_servers._tail(log_path)
    raise RuntimeError(f"s3rver failed to start; log:\n{last_error}")


def start_s3(kind: str, work_dir: Path) -> Any:
    """Start the S3 server named ``kind`` (moto or s3rver)."""
    if kind == "moto":
        return start_moto(work_dir)
    if kind == "s3rver":
        return start_s3rver(work_dir)
    raise ValueError(f"unknown S3 server {kind!r}")


@contextlib.contextmanager
def running(server: Any):
    """Stop ``server`` when the block ends, however it ends."""
    try:
        yield server
    finally:
        server.stop()
