"""Mounting in tests: a real `s3repofs mount` daemon, always unmounted afterwards, log checked.

Like s3ql's mount helper and fsspec's mount test: the daemon runs as users run it, and a test fails
if a traceback reached the daemon's log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


def write_config(config: dict, path: Path) -> Path:
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def s3repofs(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "s3repofs", *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"s3repofs {' '.join(args)} failed: {result.stderr}")
    return result


@contextmanager
def mounted(config: dict, workdir: Path, name: str = "mnt", options: str = "") -> Iterator[Path]:
    """Mount a repository (created if needed) at workdir/name (with ``-o options``, if given); unmount and check
    the log afterwards."""
    config_path = write_config(config, workdir / f"{name}.json")
    mountpoint = workdir / name
    mountpoint.mkdir(exist_ok=True)
    log = workdir / f"{name}.log"
    s3repofs("init", "--config", str(config_path))
    s3repofs("mount", str(mountpoint), "--config", str(config_path), "--log", str(log),
             *(("-o", options) if options else ()))
    try:
        yield mountpoint
    finally:
        result = s3repofs("umount", str(mountpoint), "--config", str(config_path), check=False)
        if result.returncode != 0:  # never leave a mount behind, even when a test failed
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
            time.sleep(0.5)
        text = log.read_text() if log.exists() else ""
        assert "Traceback" not in text, f"the daemon logged a traceback:\n{text}"


def daemon_log(workdir: Path, name: str = "mnt") -> str:
    return (workdir / f"{name}.log").read_text()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
