"""Processing leases: repo.claim, repo.lock and ``s3repofs claim/release`` on SQLite and a real PostgreSQL, with
processes that claim at once, die holding leases, or lose them."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

import pytest
from mount_helper import fuse_available, mounted, wait_for
from repo_fixtures import make_config
from test_cli import assert_clean_failure, run

from s3repofs import S3Repo
from s3repofs.errors import ClaimLostError, LockedError, NotFoundError, NotSupportedError
from s3repofs.mount.flocks import FlockInterruptedError, TooManyWaitersError
from s3repofs.mount.tree import Tree

ENGINES = ["sqlite-local", "postgres-local"]


@pytest.fixture(params=ENGINES)
def config(request, tmp_path) -> dict:
    config = make_config(request, tmp_path, request.param)
    with S3Repo(config) as repo:
        repo.create_repository()
    return config


@pytest.fixture
def repo(config):
    with S3Repo(config) as repo:
        yield repo


def publish(repo, *paths: str, tags: dict | None = None) -> list:
    files = []
    for path in paths:
        rf = repo.add_file(path=path).touch(path.encode()).publish()
        for key, value in (tags or {}).items():
            rf.tag(key, value)
        files.append(rf)
    return files


def insert_published(repo, count: int, file_type: str = "jobs") -> list[int]:
    """``count`` published version rows, inserted at once (claims look at rows only, not at objects)."""
    now = time.time()
    rows = [(file_type, "", f"f{n:05d}", "published", "uploaded", "fresh", "b", f"k-{file_type}-{n}", 0,
             "d41d8cd98f00b204e9800998ecf8427e", "test-host", 0o644, 0, 0, now, now, now) for n in range(count)]
    columns = ["file_type", "dir", "name", "state", "storage", "tier", "bucket", "s3_key", "size", "md5",
               "origin_host", "mode", "uid", "gid", "created_at", "uploaded_at", "published_at"]
    repo.db.run(lambda tx: tx.insert_many("versions", columns, rows))
    return [rf.id for rf in repo.find(file_type)]


def _claim_until_empty(config: dict, host: str, out_path: str, limit: int) -> None:
    """A worker of the 4-process test: claim ``limit`` files at a time until none is left, writing each id."""
    with S3Repo({**config, "host_name": host}) as repo, open(out_path, "w") as out:
        while True:
            with repo.claim(file_type="jobs", limit=limit, lease=60) as files:
                if not files:
                    return
                out.write("".join(f"{rf.id}\n" for rf in files))
                out.flush()


def _claim_and_hang(config: dict, ready_path: str, lease: float) -> None:
    with S3Repo({**config, "host_name": "doomed"}) as repo:
        claim = repo.claim(file_type="jobs", limit=10, lease=lease)
        with claim as files:
            with open(ready_path, "w") as ready:
                ready.write(" ".join(str(rf.id) for rf in files))
            time.sleep(600)  # killed here, holding the leases


def test_four_processes_process_each_of_1000_files_exactly_once(config, repo, tmp_path):
    ids = insert_published(repo, 1000)
    spawn = multiprocessing.get_context("spawn")
    outputs = [tmp_path / f"worker-{n}.txt" for n in range(4)]
    started = time.monotonic()
    workers = [spawn.Process(target=_claim_until_empty, args=(config, f"host-{n}", str(out), 7))
               for n, out in enumerate(outputs)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
            assert worker.exitcode == 0
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
    processed = [int(line) for out in outputs for line in out.read_text().split()]
    print(f"4 workers processed 1000 files in {time.monotonic() - started:.1f} s "
          f"({', '.join(str(len(out.read_text().split())) for out in outputs)} each)")
    assert len(processed) == len(set(processed)) == 1000
    assert sorted(processed) == sorted(ids)
    assert sum(1 for out in outputs if out.read_text()) >= 2  # they did work side by side
    done = repo.db.run(lambda tx: tx.scalar("SELECT COUNT(*) FROM claims_done WHERE task = 'default'"))
    assert done == 1000 and repo.db.run(lambda tx: tx.scalar("SELECT COUNT(*) FROM claims")) == 0


def test_a_killed_holders_leases_run_out_then_another_claimer_gets_the_files(config, repo, tmp_path):
    ids = insert_published(repo, 3)
    ready = tmp_path / "ready"
    holder = multiprocessing.get_context("spawn").Process(target=_claim_and_hang, args=(config, str(ready), 2.0))
    holder.start()
    try:
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text()):
            assert time.monotonic() < deadline and holder.is_alive()
            time.sleep(0.05)
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
    finally:
        holder.join(timeout=10)
    assert sorted(map(int, ready.read_text().split())) == ids
    with repo.claim(file_type="jobs", limit=10) as files:
        assert files == [] or time.monotonic() - killed >= 2.0  # before the lease ran out: nothing
    time.sleep(max(0.0, killed + 2.5 - time.monotonic()))
    with repo.claim(file_type="jobs", limit=10) as files:
        assert [rf.id for rf in files] == ids


def test_a_normal_exit_records_done_for_the_task_only(repo):
    a, b = publish(repo, "jobs/a", "jobs/b")
    with repo.claim(file_type="jobs", limit=1) as files:
        assert [rf.id for rf in files] == [a.id]
        with repo.claim(file_type="jobs", limit=5) as others:  # a is leased: the next claimer gets b
            assert [rf.id for rf in others] == [b.id]
    with repo.claim(file_type="jobs", limit=5) as files:
        assert files == []
    with repo.claim(file_type="jobs", limit=5, task="thumbnails") as files:  # another task: its own leases
        assert [rf.id for rf in files] == [a.id, b.id]


def test_claim_takes_the_filter_of_find(repo):
    en, fr, _other = publish(repo, "jobs/en", "jobs/fr", "other/en")
    en.tag("lang", "en")
    fr.tag("lang", "fr")
    fr.tag("skip")
    with repo.claim(file_type="jobs", tags_all={"lang": None}, tags_none={"skip": None}, limit=5) as files:
        assert [rf.id for rf in files] == [en.id]
    with repo.claim(prefix="jobs", limit=5) as files:
        assert [rf.id for rf in files] == [fr.id]


def test_an_exception_in_the_block_frees_the_files_at_once(repo):
    a, b = publish(repo, "jobs/a", "jobs/b")
    with pytest.raises(RuntimeError):
        with repo.claim(file_type="jobs", limit=5) as files:
            assert len(files) == 2
            raise RuntimeError("the work failed")
    with repo.claim(file_type="jobs", limit=5) as files:
        assert [rf.id for rf in files] == [a.id, b.id]


def test_release_and_complete_one_file_early(repo):
    a, b, c = publish(repo, "jobs/a", "jobs/b", "jobs/c")
    claim = repo.claim(file_type="jobs", limit=3)
    with claim as files:
        claim.release(files[0])
        claim.complete(files[1])
        other = repo.claim(file_type="jobs", limit=3)  # a is free again, b done, c still held
        assert [rf.id for rf in other.acquire()] == [a.id]
        other.release()
    with repo.claim(file_type="jobs", limit=3) as files:
        assert [rf.id for rf in files] == [a.id]


def test_the_renewal_keeps_a_lease_longer_than_its_length(repo):
    publish(repo, "jobs/a")
    with repo.claim(file_type="jobs", lease=0.6) as files:
        time.sleep(1.5)
        with repo.claim(file_type="jobs") as others:
            assert files and others == []


def test_a_lost_lease_raises_and_is_not_recorded_done(repo):
    a, b = publish(repo, "jobs/a", "jobs/b")
    claim = repo.claim(file_type="jobs", limit=2, lease=0.5)
    assert len(claim.acquire()) == 2  # not renewed (no with block): a stalled holder
    time.sleep(0.7)
    with repo.claim(file_type="jobs", limit=1) as taken:  # its lease ran out: another holder takes a
        assert [rf.id for rf in taken] == [a.id]
        claim.renew()
    with pytest.raises(ClaimLostError, match="jobs/a") as raised:
        claim.complete()
    assert "jobs/b" not in str(raised.value)
    done = repo.db.run(lambda tx: tx.all("SELECT version_id, host FROM claims_done ORDER BY version_id"))
    assert [row["version_id"] for row in done] == [a.id, b.id]  # a by the other holder, b by this one


def test_lock_excludes_another_lock_and_a_claim_of_the_same_task(repo):
    (a,) = publish(repo, "jobs/a")
    with repo.lock(a):
        with pytest.raises(LockedError, match=r"jobs/a: version \d+ is locked for task 'default' by test-host:"):
            with repo.lock(a):
                pass
        with repo.claim(file_type="jobs") as files:
            assert files == []
        with repo.lock(a, task="other"):  # another task's lease
            pass
        started = time.monotonic()
        with pytest.raises(LockedError):
            repo.lock(a, nowait=False, timeout=0.4).acquire()
        assert time.monotonic() - started >= 0.4
    with repo.claim(file_type="jobs") as files:
        assert [rf.id for rf in files] == [a.id]
        with pytest.raises(LockedError):
            repo.lock(a).acquire()
    with repo.lock(a):  # a lock ignores what is done
        pass


def test_a_waiting_lock_gets_the_lease_once_it_is_released(repo):
    (a,) = publish(repo, "jobs/a")
    first = repo.lock(a).acquire()
    threading.Timer(0.3, first.release).start()
    started = time.monotonic()
    with repo.lock(a, nowait=False, timeout=10):
        assert 0.25 <= time.monotonic() - started < 5


def test_a_lock_whose_lease_was_taken_raises_at_exit(repo):
    (a,) = publish(repo, "jobs/a")
    with pytest.raises(ClaimLostError, match="jobs/a"):
        with repo.lock(a):
            repo.db.run(lambda tx: tx.execute("UPDATE claims SET holder = 'thief'"))


@pytest.fixture
def config_path(config, tmp_path):
    path = tmp_path / "s3repo.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_cli_claim_and_release(repo, config_path):
    a, b, c = publish(repo, "jobs/a", "jobs/b", "jobs/c", tags={"batch": "1"})
    claimed = run("claim", "jobs", "--tag", "batch=1", "--limit", "2", "--lease", "60", "--json",
                  config=config_path)
    assert claimed.returncode == 0, claimed.stderr
    answer = json.loads(claimed.stdout)
    assert [f["path"] for f in answer["files"]] == ["jobs/a", "jobs/b"] and answer["task"] == "default"
    assert answer["expires_at"] > time.time() + 50 and answer["holder"]
    holder = answer["holder"]

    plain = run("claim", "jobs", "--limit", "5", "--holder", "script-1", config=config_path)
    assert plain.returncode == 0 and plain.stdout.decode().split() == ["jobs/c"]

    dry = json.loads(run("release", "--holder", holder, "--dry-run", "--json", config=config_path).stdout)
    assert [f["path"] for f in dry["files"]] == ["jobs/a", "jobs/b"]
    done = run("release", "--holder", holder, "--done", "jobs/a", "--json", config=config_path)
    assert done.returncode == 0 and [f["path"] for f in json.loads(done.stdout)["files"]] == ["jobs/a"]
    assert run("release", "--holder", holder, config=config_path).stdout.decode().strip() == \
        f"released: jobs/b (version {b.id}, task default)"
    assert_clean_failure(run("release", "--holder", holder, "jobs/b", config=config_path), 3, "holds no lease")

    with repo.claim(file_type="jobs", limit=5) as files:  # a done, b free again, c held by script-1
        assert [rf.id for rf in files] == [b.id]
    assert run("release", "--holder", "script-1", "--done", config=config_path).returncode == 0
    with repo.claim(file_type="jobs", limit=5) as files:
        assert files == []


def test_release_names_what_the_holder_does_not_hold(repo):
    publish(repo, "jobs/a")
    claim = repo.claim(file_type="jobs", holder="me")
    claim.acquire()
    with pytest.raises(NotFoundError, match="holder me holds no lease on jobs/nope"):
        repo.release_claims("me", ["jobs/a", "jobs/nope"])
    assert [lease.path for lease in repo.release_claims("me", ["jobs/a"], done=True)] == ["jobs/a"]


# -- flock on the mount: the tree without a mount, then flock(1) on two real mounts ---------------------------


def test_flock_on_the_tree_takes_the_lease_of_the_version_per_open_file(repo):
    (a,) = publish(repo, "jobs/a")
    tree = Tree(repo)
    one, two = tree.open("/published/jobs/a", os.O_RDONLY), tree.open("/published/jobs/a", os.O_RDONLY)
    tree.flock(one, fcntl.LOCK_EX | fcntl.LOCK_NB)
    tree.flock(one, fcntl.LOCK_EX | fcntl.LOCK_NB)  # again by the holder: at once
    with pytest.raises(LockedError) as refused:  # another open file, even of this process
        tree.flock(two, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (shared is taken as exclusive)
    assert refused.value.errno == errno.EWOULDBLOCK
    deadline = time.monotonic() + 0.5
    with pytest.raises(FlockInterruptedError):  # a blocking flock waits until its caller is interrupted
        tree.flock(two, fcntl.LOCK_EX, interrupted=lambda: time.monotonic() > deadline)
    assert time.monotonic() >= deadline
    with pytest.raises(LockedError):  # repo.lock, and so any program on any host, sees the mount's lock
        repo.lock(a).acquire()
    tree.flock(one, fcntl.LOCK_UN)
    tree.flock(two, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert tree.flocks.held() == {two: a.id}
    tree.release(two)  # the last close of the open file ends its lease
    assert tree.flocks.held() == {}
    with repo.lock(a):
        pass
    tree.release(one)


def test_a_blocking_flock_stops_waiting_when_its_handle_is_released(repo):
    (a,) = publish(repo, "jobs/a")
    tree = Tree(repo)
    fh = tree.open("/published/jobs/a", os.O_RDONLY)
    held = repo.lock(a).acquire()
    waiter = threading.Thread(target=lambda: pytest.raises(FlockInterruptedError, tree.flock, fh, fcntl.LOCK_EX))
    started = time.monotonic()
    waiter.start()
    time.sleep(0.3)
    tree.release(fh)  # the caller died while waiting: its flock must not take the lease afterwards
    waiter.join(timeout=5)
    assert not waiter.is_alive() and time.monotonic() - started < 3
    held.release()
    time.sleep(1.2)  # (the waiter's last poll)
    assert tree.flocks.held() == {}
    with repo.lock(a):
        pass


def test_blocking_flocks_beyond_the_bound_are_refused_with_enolck(repo):
    (a,) = publish(repo, "jobs/a")
    tree = Tree(repo)
    tree.flocks.max_waiters = 1
    one, two = tree.open("/published/jobs/a", os.O_RDONLY), tree.open("/published/jobs/a", os.O_RDONLY)
    held = repo.lock(a).acquire()
    waiter = threading.Thread(target=tree.flock, args=(one, fcntl.LOCK_EX))
    waiter.start()
    assert wait_for(lambda: tree.flocks._waiting, timeout=5)
    with pytest.raises(TooManyWaitersError) as refused:
        tree.flock(two, fcntl.LOCK_EX)
    assert refused.value.errno == errno.ENOLCK
    held.release()
    waiter.join(timeout=5)
    assert tree.flocks.held() == {one: a.id}
    tree.release(one)
    tree.release(two)


def test_flock_on_a_directory_is_refused_as_not_supported(repo):
    tree = Tree(repo)
    with pytest.raises(NotSupportedError):
        tree.flock(123456789, fcntl.LOCK_EX)


@contextmanager
def one_file_open(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3 (./scripts/setup)")
def test_flock_1_excludes_across_two_mounts_of_one_postgresql_repository(request, tmp_path):
    first = make_config(request, tmp_path / "a", "postgres-local")
    second = {**first, "local_root": str(tmp_path / "b" / "root"), "host_name": "second-host"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with mounted(first, tmp_path / "a") as one, mounted(second, tmp_path / "b") as two:
        os.mkdir(one / "published/locks")
        (one / "published/locks/job").write_bytes(b"the file scripts lock")
        assert wait_for(lambda: (two / "published/locks/job").exists(), timeout=5)
        a_file, b_file = str(one / "published/locks/job"), str(two / "published/locks/job")

        holder = subprocess.Popen(["flock", a_file, "sleep", "3"])
        try:
            assert wait_for(lambda: subprocess.run(["flock", "-n", b_file, "true"]).returncode == 1, timeout=5)
            started = time.monotonic()
            waited = subprocess.run(["flock", b_file, "true"], timeout=30)  # blocks until the holder ends
            assert waited.returncode == 0 and holder.poll() == 0 and time.monotonic() - started > 0.5
        finally:
            holder.kill()
            holder.wait()
        # The kernel releases a closed file a moment after close() returns: the lease ends then.
        assert wait_for(lambda: subprocess.run(["flock", "-n", b_file, "true"]).returncode == 0, timeout=2)
        with one_file_open(a_file):  # held again on A: flock -w's timer interrupts the wait on B
            started = time.monotonic()
            assert subprocess.run(["flock", "-w", "1", b_file, "true"], timeout=30).returncode == 1
            assert 0.9 < time.monotonic() - started < 5
        assert wait_for(lambda: subprocess.run(["flock", "-n", a_file, "true"]).returncode == 0, timeout=2)
        with S3Repo(first) as repo:
            assert wait_for(lambda: repo.db.run(lambda tx: tx.scalar("SELECT COUNT(*) FROM claims")) == 0, timeout=2)
