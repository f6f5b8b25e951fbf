"""Progress reports: a bar on a terminal, a log line per tenth when stderr is not one, nothing when quiet;
and the bytes of the transfers of add, get and cache prefetch, reported as they go."""

import fcntl
import hashlib
import itertools
import json
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from s3repofs.ops.progress import Share, progress

MiB = 1024 * 1024


def test_a_log_line_per_tenth_and_one_at_the_end(caplog):
    caplog.set_level(logging.INFO, "s3repofs.progress")
    with progress("fsck", 200, unit="objects") as report:
        for _ in range(200):
            report.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:9] == [f"fsck: {p} % ({p * 2} of 200 objects)" for p in range(10, 100, 10)]
    assert len(lines) == 10 and lines[-1].startswith("fsck: done, 200 objects in ")


def test_an_unknown_total_reports_every_ten_thousand_steps(caplog):
    caplog.set_level(logging.INFO, "s3repofs.progress")
    with progress("listing", None, unit="keys") as report:
        report.advance(25_000)
        report.advance(1)
    assert [r.getMessage() for r in caplog.records][:1] == ["listing: 25000 keys so far"]


def test_quiet_reports_nothing(caplog):
    caplog.set_level(logging.INFO, "s3repofs.progress")
    with progress("gc", 10, quiet=True) as report:
        report.advance(10)
    assert caplog.records == []


# -- bytes: the transfers of add, get and cache prefetch ------------------------------------------------------

def test_a_share_tops_up_what_its_transfer_did_not_report(caplog):
    caplog.set_level(logging.INFO, "s3repofs.progress")
    with progress("get", 300, unit="B") as report:
        cached = Share(report, 100)  # found in the cache: no byte reported as it goes
        cached.done()
        retried = Share(report, 200)
        retried(150)
        retried(-50)  # a retried request rewinds
        retried(200)
        retried.done()  # reported 300 of 200 bytes: the report goes back to its total
    assert [r.getMessage() for r in caplog.records][-1].startswith("get: done, 300 B in ")


def counting():
    """A ``sent``/``received`` callback that records each count and the running totals."""
    calls: list[int] = []

    def count(n: int) -> None:
        calls.append(n)

    count.calls = calls
    count.total = lambda: sum(calls)
    count.peak = lambda: max(itertools.accumulate(calls), default=0)
    return count


@pytest.mark.parametrize("way", ["signed PUT", "botocore PUT", "multipart"])
def test_an_upload_to_s3_reports_each_byte_once(s3_server, s3_bucket, tmp_path, way):
    """Over plain HTTP botocore reads a body whole to sign it, then rewinds: those reads are not bytes sent
    (the bar would fill, empty and fill again), nor are the part digests of a multipart upload."""
    from s3repofs.objects.s3 import S3Store

    store = S3Store(s3_bucket, endpoint_url=s3_server.endpoint_url, region=s3_server.region,
                    access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                    multipart_threshold=5 * MiB if way == "multipart" else 64 * MiB, multipart_chunksize=5 * MiB)
    if way == "botocore PUT":
        store._direct = None
    data = os.urandom(11 * MiB)
    source = tmp_path / "source"
    source.write_bytes(data)
    sent = counting()
    store.put("t/key", source, len(data), hashlib.md5(data).hexdigest(), {}, sent)
    assert (sent.total(), sent.peak()) == (len(data), len(data))
    assert min(sent.calls) > 0  # no rewind: no request was retried, and no byte counted before it was sent
    assert len(sent.calls) > 3  # as the bytes go, not once at the end


def test_uploads_and_downloads_report_their_bytes(repo):
    data = os.urandom(3 * MiB + 5)
    rf = repo.add_file(path="t/big").touch(data)
    sent = counting()
    version = repo.upload(rf.version, sent=sent)
    assert (sent.total(), sent.peak()) == (len(data), len(data))
    repo.cache.clear()
    received = counting()
    assert repo.local_file(version, received).read_bytes() == data
    assert (received.total(), received.peak()) == (len(data), len(data))


def test_prefetch_reports_bytes_and_files(repo, caplog):
    from s3repofs.ops import cache as cache_ops

    for name in ("a", "b", "c"):
        repo.add_file(path=f"t/{name}").touch(os.urandom(100_000)).publish()
    repo.cache.clear()
    caplog.set_level(logging.INFO, "s3repofs.progress")
    cache_ops.prefetch(repo, cache_ops.plan_prefetch(repo, ["t"]), quiet=False)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("cache prefetch: done, 300000 B; 3 of 3 files in "), lines
    assert "cache prefetch: 60 % (" in " ".join(lines)


# -- the commands, on a terminal and off it -------------------------------------------------------------------

@pytest.fixture
def config_file(repo_config_pair, tmp_path):
    path = tmp_path / "s3repo.json"
    path.write_text(json.dumps(repo_config_pair))
    path.chmod(0o600)  # it holds the S3 secret: a warning otherwise
    assert run("init", config=path).returncode == 0
    return path


def run(*args, config, env=None):
    return subprocess.run([sys.executable, "-m", "s3repofs", *map(str, args), "--config", str(config)],
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=120)


def on_a_terminal(*args, config) -> tuple[int, str]:
    """Run s3repofs with stderr on a pseudo-terminal of 100 columns (stdout a pipe); its exit status and what
    the terminal showed. tqdm draws each update (TQDM_MININTERVAL=0, not every 0.1 s): a local copy of a few
    MiB ends before its second drawing, which is the first with a rate."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    command = [sys.executable, "-m", "s3repofs", *map(str, args), "--config", str(config)]
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                          env={**os.environ, "TQDM_MININTERVAL": "0"}) as child:
        os.close(slave)
        shown = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and select.select([master], [], [], deadline - time.monotonic())[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        os.close(master)
        status = child.wait(timeout=10)
    return status, shown.decode(errors="replace")


def bar_with_rate(what: str) -> re.Pattern:
    """tqdm's bar of ``what`` in bytes, part done (drawn as the bytes go, not only at the end), with a rate
    and the time left: ``get: copy:  52%|███  | 4.00M/7.63M [00:00<00:00, 1.21GB/s]``."""
    size = r"[\d.]+[kMG]?"
    return re.compile(rf"{what}: +[1-9]\d?%\|[^|]*\| *{size}/{size} \[\d\d:\d\d<\d\d:\d\d, +{size}B/s\]")


def test_add_and_get_draw_bars_on_a_terminal(config_file, tmp_path):
    data = os.urandom(6 * MiB)
    (tmp_path / "big").write_bytes(data)
    status, shown = on_a_terminal("add", tmp_path / "big", "t/big", "--publish", config=config_file)
    assert status == 0, shown
    for what in ("add: staging", "add: upload"):
        assert bar_with_rate(what).search(shown), shown[-2000:]

    assert run("cache", "clear", config=config_file).returncode == 0
    status, shown = on_a_terminal("get", "t/big", tmp_path / "copy", config=config_file)
    assert status == 0, shown
    for what in ("get: download", "get: copy"):
        assert bar_with_rate(what).search(shown), shown[-2000:]
    assert (tmp_path / "copy").read_bytes() == data

    assert run("cache", "clear", config=config_file).returncode == 0
    status, shown = on_a_terminal("cache", "prefetch", "t", config=config_file)
    assert status == 0, shown
    assert bar_with_rate("cache prefetch").search(shown) and "1 of 1 files" in shown, shown[-2000:]


def test_no_bar_with_quiet_nor_off_a_terminal(config_file, tmp_path):
    (tmp_path / "f").write_bytes(os.urandom(2 * MiB))
    status, shown = on_a_terminal("add", tmp_path / "f", "t/f", "--publish", "--quiet", config=config_file)
    assert (status, shown) == (0, "")
    assert run("cache", "clear", config=config_file).returncode == 0
    status, shown = on_a_terminal("get", "t/f", tmp_path / "copy", "-q", config=config_file)
    assert (status, shown) == (0, "")

    off = run("get", "t/f", tmp_path / "copy", config=config_file)
    assert (off.returncode, off.stderr) == (0, b"")  # progress lines are INFO: only with -v
    verbose = run("add", tmp_path / "f", "t/g", "-v", config=config_file).stderr.decode()
    assert "add: upload: done, 2097152 B in " in verbose and "%|" not in verbose and "\r" not in verbose
    verbose = run("add", tmp_path / "f", "t/h", "-v", "--quiet", config=config_file).stderr.decode()
    assert "add: " not in verbose and "uploaded t/h" in verbose
