"""The mounted tree's semantics without a mount (tree.py), where a mount cannot show them reliably."""

from __future__ import annotations

import os
import threading
import time

import pytest

from s3repofs.domain.paths import RepoPath
from s3repofs.mount.tree import Tree


def _failing(error: Exception):
    def fail(*args, **kwargs):
        raise error
    return fail


def _writing(repo, data: bytes = b"bytes") -> tuple[Tree, int]:
    """A tree, and a handle that has written ``data`` into /published/t/f (not flushed yet)."""
    tree = Tree(repo, metadata_ttl=3600)
    tree.mkdir("/published/t", 0o755, 0, 0)
    fh = tree.create("/published/t/f", 0o644, 0, 0)
    tree.write(fh, data, 0)
    return tree, fh


def test_the_retry_thread_never_takes_a_version_a_writer_may_still_fill(repo):
    left_over = repo.add_file(path="t/old").touch("left by a crash").version
    time.sleep(0.01)
    tree = Tree(repo)
    staged_now = repo.add_file(path="t/new").version  # staged, its writer not registered yet
    fh = tree.create("/published/t/open", 0o644, 0, 0)
    writer_version = tree.handles.get(fh).version
    assert tree.retryable(left_over)
    assert not tree.retryable(staged_now)
    assert not tree.retryable(writer_version)
    assert repo.retry_staged_uploads(tree.retryable) == 1  # only the crash's leftover
    assert repo.get_version(staged_now.id).storage == "local"
    tree.write(fh, b"bytes", 0)
    tree.flush(fh)
    tree.release(fh)
    assert repo.get_file("t/open").read_bytes() == b"bytes"
    assert os.path.exists(repo.cache.staging_path(staged_now.s3_key))


def test_a_cached_listing_shows_changes_made_here_at_once(repo):
    tree = Tree(repo, metadata_ttl=3600)  # nothing may age out during the test: only forget() helps
    tree.mkdir("/published/t", 0o755, 0, 0)
    assert tree.readdir("/published/t") == [] and tree.readdir("/expired/t") == []
    fh = tree.create("/published/t/a", 0o644, 0, 0)
    tree.write(fh, b"abc", 0)
    assert [(n, e.size) for n, e in tree.readdir("/published/t")] == [("a", 3)]  # the open writer
    tree.flush(fh)
    tree.release(fh)
    assert [(n, e.size) for n, e in tree.readdir("/published/t")] == [("a", 3)]
    tree.unlink("/published/t/a")
    assert tree.readdir("/published/t") == []
    assert [n for n, _ in tree.readdir("/expired/t")] == ["a"]
    tree.mkdir("/published/t/sub", 0o755, 0, 0)
    assert [n for n, _ in tree.readdir("/published/t")] == ["sub"]


def test_a_late_release_does_not_bring_back_a_removed_file(repo):
    import pytest

    from s3repofs.errors import NotFoundError

    tree = Tree(repo, metadata_ttl=3600)
    tree.mkdir("/published/t", 0o755, 0, 0)
    fh = tree.create("/published/t/f", 0o644, 0, 0)
    tree.write(fh, b"one", 0)
    tree.flush(fh)  # close() returned
    tree.unlink("/published/t/f")  # rm, before the kernel's asynchronous RELEASE
    tree.release(fh)
    with pytest.raises(NotFoundError):
        tree.open("/published/t/f", os.O_RDONLY)


def test_the_published_digests_are_the_written_bytes_whatever_the_order_of_writes(repo):
    import hashlib

    tree = Tree(repo, metadata_ttl=3600)
    tree.mkdir("/published/t", 0o755, 0, 0)
    data = os.urandom(5 * 1024 * 1024)  # past the size where a thread hashes while the writes arrive

    def publish(name: str, writes: list[tuple[int, bytes]]) -> None:
        fh = tree.create(f"/published/t/{name}", 0o644, 0, 0)
        for offset, piece in writes:
            tree.write(fh, piece, offset)
        tree.flush(fh)
        tree.release(fh)

    in_order = [(offset, data[offset:offset + 131072]) for offset in range(0, len(data), 131072)]
    publish("in-order", in_order)
    publish("backwards", in_order[::-1])
    publish("rewritten", [*in_order, (0, b"X" * 100)])
    final = {"in-order": data, "backwards": data, "rewritten": b"X" * 100 + data[100:]}
    repo.cache.clear()  # each read is a download, verified against the recorded xxh3
    for name, expected in final.items():
        published = repo.get_file(f"t/{name}")
        assert published.version.md5 == hashlib.md5(expected).hexdigest(), name
        assert published.read_bytes() == expected, name


def test_a_flushed_writer_shows_its_stored_version_not_the_cache_files_times(repo):
    tree, fh = _writing(repo)
    tree.flush(fh)  # close() returned; the kernel's release comes later
    published = repo.get_file("t/f")
    os.utime(repo.cache.object_path(published.s3_key), ns=(0, 0))  # what a cache checkpoint may do to it
    attrs = tree.getattr("/published/t/f", fh)
    assert attrs.mtime_ns == tree.getattr("/published/t/f").mtime_ns > 0
    assert attrs.size == 5
    tree.release(fh)


def test_the_prefetchers_listing_answers_a_sequential_readers_next_lookups(repo, monkeypatch):
    for i in range(10):
        repo.add_file(path=f"t/d/f{i:02}").touch(f"{i}").publish()
    tree = Tree(repo, metadata_ttl=3600)
    for name in ("f00", "f01"):  # two opens in name order: the prefetcher lists what comes next
        tree.release(tree.open(f"/published/t/d/{name}", os.O_RDONLY))
    queried = []
    monkeypatch.setattr(repo.meta, "find", lambda *args, **kwargs: queried.append(args))
    assert [tree.lookup(f"/published/t/d/f{i:02}").size for i in range(2, 10)] == [1] * 8
    fh = tree.open("/published/t/d/f05", os.O_RDONLY)
    tree.release(fh)
    assert queried == []


def test_another_mounts_retry_never_takes_a_version_still_being_written(repo):
    tree, fh = _writing(repo)
    version = tree.handles.get(fh).version
    other = Tree(repo, started=time.time() + 60)  # a mount on this host that started after the version was made
    assert other.retryable(repo.get_version(version.id).version)  # its own rules would let it
    assert repo.retry_staged_uploads(other.retryable) == 0  # but the writer holds the staged file
    assert repo.get_version(version.id).version.storage == "local"
    tree.write(fh, b" and more", 5)
    tree.flush(fh)
    tree.release(fh)
    assert repo.get_file("t/f").read_bytes() == b"bytes and more"


def test_a_version_left_to_the_retry_is_retried_while_its_writer_goes_on_in_a_new_one(repo, monkeypatch):
    from s3repofs.errors import StoreUnavailableError

    tree, fh = _writing(repo)
    old = tree.handles.get(fh).version
    with monkeypatch.context() as patched:
        patched.setattr(repo.store, "put", _failing(StoreUnavailableError("unreachable (injected)")))
        with pytest.raises(StoreUnavailableError):
            tree.flush(fh)
    tree.write(fh, b"!", 5)  # goes to a new version; the old descriptor stays open, retired
    assert repo.retry_staged_uploads(tree.retryable) == 1  # the old version, though its writer is open
    assert repo.get_version(old.id).version.storage == "uploaded"
    tree.flush(fh)
    tree.release(fh)
    assert repo.get_file("t/f").read_bytes() == b"bytes!"


def test_a_publish_failing_while_the_database_is_down_is_published_by_a_later_retry(repo, monkeypatch):
    from s3repofs.errors import DatabaseUnavailableError

    tree, fh = _writing(repo)
    down = _failing(DatabaseUnavailableError("database down (injected)"))
    with monkeypatch.context() as patched:
        for name in ("publish_staged", "get", "set_publish_pending"):
            patched.setattr(repo.meta, name, down)
        with pytest.raises(DatabaseUnavailableError):
            tree.flush(fh)
    tree.release(fh)
    tree.mark_unmarked_publishes()  # the database is back: the retry thread's next pass
    assert repo.retry_staged_uploads(tree.retryable) == 1
    assert repo.get_file("t/f").read_bytes() == b"bytes"


def test_publishing_a_file_still_being_written_is_refused_until_it_is_closed(repo, monkeypatch):
    monkeypatch.setattr("s3repofs.repo.CLAIM_WAIT", 0.2)  # how long it waits for the writer to close
    from s3repofs.errors import BeingWrittenError

    tree = Tree(repo, metadata_ttl=3600)
    tree.mkdir("/unpublished/t", 0o755, 0, 0)
    fh = tree.create("/unpublished/t/f", 0o644, 0, 0)
    tree.write(fh, b"half", 0)
    with pytest.raises(BeingWrittenError):  # mv unpublished/t/f published/t/f while a program writes it
        tree.rename("/unpublished/t/f", "/published/t/f")
    assert repo.get_file("t/f") is None
    tree.write(fh, b" and the rest", 4)
    tree.flush(fh)
    tree.release(fh)
    tree.rename("/unpublished/t/f", "/published/t/f")
    assert repo.get_file("t/f").read_bytes() == b"half and the rest"


def test_a_file_closed_but_not_yet_released_can_be_published_at_once(repo):
    import threading

    tree = Tree(repo, metadata_ttl=3600)
    tree.mkdir("/unpublished/t", 0o755, 0, 0)
    fh = tree.create("/unpublished/t/f", 0o644, 0, 0)  # touch unpublished/t/f
    tree.flush(fh)  # its close(); the kernel's RELEASE, which uploads it, comes a moment later
    releasing = threading.Timer(0.3, tree.release, (fh,))
    releasing.start()
    try:
        tree.rename("/unpublished/t/f", "/published/t/f")  # && mv unpublished/t/f published/t/f
    finally:
        releasing.join()
    assert repo.get_file("t/f").read_bytes() == b""


def test_another_close_of_a_file_whose_upload_failed_leaves_it_to_the_retry(repo, monkeypatch):
    from s3repofs.errors import StoreUnavailableError, UnavailableError

    tree, fh = _writing(repo)
    with monkeypatch.context() as patched:
        patched.setattr(repo.store, "put", _failing(StoreUnavailableError("unreachable (injected)")))
        with pytest.raises(StoreUnavailableError):
            tree.flush(fh)
    put = repo.store.put
    puts = []
    monkeypatch.setattr(repo.store, "put", lambda *args, **kwargs: puts.append(args) or put(*args, **kwargs))
    with pytest.raises(UnavailableError):
        tree.flush(fh)  # a duplicate's close, or an fsync: still not published
    assert puts == []  # no second upload beside the retry's
    tree.release(fh)
    assert repo.retry_staged_uploads(tree.retryable) == 1
    assert len(puts) == 1
    assert repo.get_file("t/f").read_bytes() == b"bytes"


def test_a_flush_that_finds_other_bytes_stored_fails_and_keeps_its_own(repo):
    from s3repofs.domain.content import Content
    from s3repofs.errors import LifecycleError

    tree = Tree(repo, metadata_ttl=3600)
    tree.mkdir("/unpublished/t", 0o755, 0, 0)
    fh = tree.create("/unpublished/t/f", 0o644, 0, 0)
    tree.write(fh, b"bytes", 0)
    version = tree.handles.get(fh).version
    repo.meta.mark_uploaded(version.id, Content(4, "0" * 32, "0" * 32))  # what a rogue uploader recorded
    with pytest.raises(LifecycleError):
        tree.flush(fh)
    tree.release(fh)
    staged = repo.cache.staging_path(version.s3_key)
    assert staged.read_bytes() == b"bytes"  # not taken for the stored object: kept where it was
    assert not repo.cache.has(version.s3_key)
    assert not repo.get_version(version.id).version.publish_pending


def test_a_flush_failing_on_the_local_disk_leaves_the_version_to_the_retry(repo, monkeypatch):
    import errno

    tree, fh = _writing(repo)
    version = tree.handles.get(fh).version
    publish = repo.publish
    monkeypatch.setattr(repo, "publish", _failing(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError):
        tree.flush(fh)  # close() reports EIO
    tree.release(fh)
    monkeypatch.setattr(repo, "publish", publish)  # the disk is back
    assert tree.retryable(repo.get_version(version.id))
    assert repo.retry_staged_uploads(tree.retryable) == 1
    assert repo.get_file("t/f").read_bytes() == b"bytes"


@pytest.mark.parametrize("database_back", [True, False], ids=["row-reread", "database-still-down"])
def test_a_publish_whose_answer_was_lost_leaves_later_writes_to_a_new_version(repo, monkeypatch, database_back):
    from s3repofs.errors import DatabaseUnavailableError

    tree, fh = _writing(repo)
    first = tree.handles.get(fh).version
    publish = repo.publish

    def committed_then_lost(*args, **kwargs):
        publish(*args, **kwargs)
        if not database_back:  # the flush cannot even learn what became of the version
            monkeypatch.setattr(repo.meta, "get", _failing(DatabaseUnavailableError("still down")))
        raise DatabaseUnavailableError("connection lost after the commit")

    monkeypatch.setattr(repo, "publish", committed_then_lost)
    if database_back:
        tree.flush(fh)  # the flush learns that its commit went through: close() succeeds
    else:
        with pytest.raises(DatabaseUnavailableError):
            tree.flush(fh)
    monkeypatch.undo()
    tree.write(fh, b"more!", 5)  # the writer goes on, and closes again
    tree.flush(fh)
    tree.release(fh)
    assert repo.get_file("t/f").read_bytes() == b"bytesmore!"
    assert repo.get_version(first.id).read_bytes() == b"bytes"  # its stored object was not overwritten


@pytest.mark.parametrize("directory", ["published", "unpublished"])
def test_a_close_whose_commit_answer_was_lost_succeeds_and_leaves_no_staged_file_behind(repo, monkeypatch, directory):
    from s3repofs.errors import DatabaseUnavailableError

    tree = Tree(repo, metadata_ttl=3600)
    tree.mkdir(f"/{directory}/t", 0o755, 0, 0)
    fh = tree.create(f"/{directory}/t/f", 0o644, 0, 0)
    tree.write(fh, b"bytes", 0)
    version = tree.handles.get(fh).version
    commit = "publish_staged" if directory == "published" else "mark_uploaded"
    committed = getattr(repo.meta, commit)

    def committed_then_lost(*args, **kwargs):
        committed(*args, **kwargs)
        raise DatabaseUnavailableError("connection lost after the commit")

    monkeypatch.setattr(repo.meta, commit, committed_then_lost)
    tree.flush(fh)  # the version is what this close asked for: no error, nothing for the retry
    tree.release(fh)
    monkeypatch.undo()
    assert not tree.retryable(repo.get_version(version.id))
    assert not repo.cache.staging_path(version.s3_key).exists()  # staging is never evicted: nothing may linger
    assert repo.cache.has(version.s3_key)
    recorded = repo.get_version(version.id)
    assert (recorded.state, recorded.storage) == ("published" if directory == "published" else "unpublished",
                                                  "uploaded")
    assert recorded.read_bytes() == b"bytes"


def test_a_failing_fsync_after_a_failed_flush_still_leaves_the_file_to_be_published(repo, monkeypatch):
    import errno

    import pytest

    tree, fh = _writing(repo)
    monkeypatch.setattr(repo, "publish", _failing(OSError(errno.EIO, "Input/output error")))
    monkeypatch.setattr(os, "fsync", _failing(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError):
        tree.flush(fh)
    monkeypatch.undo()
    tree.release(fh)
    assert repo.retry_staged_uploads(tree.retryable) == 1
    assert repo.get_file("t/f").read_bytes() == b"bytes"


def test_the_flush_at_unmount_goes_on_past_a_file_the_disk_fails(repo, monkeypatch):
    import errno

    tree = Tree(repo, metadata_ttl=3600)
    tree.mkdir("/published/t", 0o755, 0, 0)
    handles = [tree.create(f"/published/t/{name}", 0o644, 0, 0) for name in ("a", "b")]
    for fh in handles:
        tree.write(fh, b"bytes", 0)
    publish = repo.publish
    calls = []

    def first_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return publish(*args, **kwargs)

    monkeypatch.setattr(repo, "publish", first_fails)
    errors = []
    tree.flush_all(on_error=lambda fh, exc: errors.append(exc))
    assert len(errors) == 1 and len(calls) == 2
    assert sum(repo.get_file(f"t/{name}") is not None for name in ("a", "b")) == 1


def test_a_write_after_close_that_cannot_copy_the_file_leaves_no_version_behind(repo, monkeypatch):
    import errno

    from s3repofs.domain.paths import RepoPath
    from s3repofs.mount import writes

    tree, fh = _writing(repo)
    tree.flush(fh)  # close() of one descriptor; another (a dup) writes on
    monkeypatch.setattr(writes, "_copy_whole", _failing(OSError(errno.ENOSPC, "No space left on device")))
    for _ in range(3):
        with pytest.raises(OSError):
            tree.write(fh, b"more!", 5)
    monkeypatch.undo()
    assert [v.state for v in repo.meta.history(RepoPath("t", "", "f"))] == ["published"] + ["discarded"] * 3
    tree.write(fh, b"more!", 5)  # the disk is back
    tree.flush(fh)
    tree.release(fh)
    assert repo.get_file("t/f").read_bytes() == b"bytesmore!"


def test_a_file_longer_than_an_object_can_be_is_refused_with_efbig(repo):
    from s3repofs.errors import FileTooLargeError
    from s3repofs.mount.tree import MAX_FILE_SIZE

    tree, fh = _writing(repo)
    with pytest.raises(FileTooLargeError):  # truncate -s 1E: the flush would hash an exabyte of holes
        tree.truncate("/published/t/f", 2**60, fh)
    with pytest.raises(FileTooLargeError):
        tree.write(fh, b"x", MAX_FILE_SIZE)
    tree.truncate("/published/t/f", 2, fh)
    tree.flush(fh)
    tree.release(fh)
    assert repo.get_file("t/f").read_bytes() == b"by"


def test_a_second_writer_starts_from_the_stored_bytes_not_another_writers_unfinished_ones(repo):
    tree, first = _writing(repo)  # b"bytes", not flushed: there is nothing stored at the path yet
    second = tree.open("/published/t/f", os.O_RDWR)
    assert os.pread(tree.readable_fd(second, 100, 0), 100, 0) == b""
    tree.flush(first)
    tree.release(first)
    third = tree.open("/published/t/f", os.O_RDWR)  # the published b"bytes"
    tree.write(second, b"second", 0)
    assert os.pread(tree.readable_fd(third, 100, 0), 100, 0) == b"bytes"
    for fh in (second, third):
        tree.release(fh)


def test_a_write_that_failed_keeps_the_file_from_being_stored_at_close(repo):
    import errno

    tree, fh = _writing(repo)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        tree.write_with(fh, 5, disk_full)
    with pytest.raises(OSError) as raised:  # close() reports it: the file is not what was meant
        tree.flush(fh)
    assert raised.value.errno == errno.ENOSPC
    tree.release(fh)
    assert repo.get_file("t/f") is None
    assert [v.state for v in repo.meta.history(RepoPath("t", "", "f"))] == ["discarded"]


def test_truncate_of_a_path_being_written_cuts_the_published_version_not_the_writers_bytes(repo):
    tree = Tree(repo, metadata_ttl=3600)
    tree.mkdir("/published/t", 0o755, 0, 0)
    fh = tree.create("/published/t/f", 0o644, 0, 0)
    tree.write(fh, b"stored", 0)
    tree.flush(fh)
    tree.release(fh)
    writer = tree.open("/published/t/f", os.O_WRONLY | os.O_TRUNC)
    tree.write(writer, b"half-written", 0)
    tree.truncate("/published/t/f", 3)  # truncate -s 3 by another program
    assert repo.get_file("t/f").read_bytes() == b"sto"  # never bytes a writer has not closed
    assert tree.lookup("/published/t/f").size == 12  # the open writer is not affected, and still shown
    tree.write(writer, b"!", 12)
    tree.flush(writer)
    tree.release(writer)
    assert repo.get_file("t/f").read_bytes() == b"half-written!"


def test_fstat_of_a_reader_of_an_unlinked_file_outlives_its_writer(repo):
    tree, fh = _writing(repo, b"stored")
    tree.flush(fh)
    tree.release(fh)
    reader = tree.open("/published/t/f", os.O_RDONLY)
    writer = tree.open("/published/t/f", os.O_WRONLY)
    tree.write(writer, b"more", 6)
    hidden = "/published/t/.fuse_hidden0000000100000001"
    tree.rename("/published/t/f", hidden)  # libfuse's unlink of an open file
    tree.release(writer)
    assert tree.getattr(hidden, reader).nlink == 0  # the reader is still open: fstat works
    tree.release(reader)
    tree.unlink(hidden)  # libfuse, at the last release


def test_rm_in_unpublished_of_a_file_stored_but_still_open_removes_it(repo):
    tree = Tree(repo, metadata_ttl=3600)
    tree.mkdir("/unpublished/t", 0o755, 0, 0)
    fh = tree.create("/unpublished/t/f", 0o644, 0, 0)
    tree.write(fh, b"stored", 0)
    tree.fsync(fh)  # uploaded: the handle's version is stored, the file still open
    tree.unlink("/unpublished/t/f")
    tree.release(fh)
    assert tree.readdir("/unpublished/t") == []


def test_rm_after_a_failed_close_calls_off_the_retrys_publish(repo, monkeypatch):
    from s3repofs.errors import StoreUnavailableError

    tree, fh = _writing(repo)
    tree.flush(fh)
    tree.release(fh)  # published/t/f: b"bytes"
    fh = tree.open("/published/t/f", os.O_WRONLY | os.O_TRUNC)
    tree.write(fh, b"newer", 0)
    with monkeypatch.context() as patched:
        patched.setattr(repo.store, "put", _failing(StoreUnavailableError("unreachable (injected)")))
        with pytest.raises(StoreUnavailableError):
            tree.flush(fh)  # close() failed: the newer bytes are the retry's, to publish
    tree.release(fh)
    tree.unlink("/published/t/f")  # the user takes the file back
    assert repo.retry_staged_uploads(tree.retryable) == 1  # uploaded, not published
    assert repo.get_file("t/f") is None
    assert repo.get_file("t/f", state="unpublished").read_bytes() == b"newer"  # nothing lost


def test_links_and_special_files_are_refused_with_eperm_and_nothing_is_made(repo):
    import errno
    import logging
    import stat

    from s3repofs.errors import LifecycleError

    tree, fh = _writing(repo)
    tree.flush(fh)
    tree.release(fh)
    refusals = [
        lambda: tree.link("/published/t/g", "/published/t/f"),
        lambda: tree.symlink("/published/t/g", "/published/t/f"),
        lambda: tree.mknod("/published/t/g", stat.S_IFIFO | 0o644),
    ]
    for refuse in refusals:
        with pytest.raises(LifecycleError) as info:
            refuse()
        assert info.value.errno == errno.EPERM
        assert info.value.log_level == logging.WARNING  # a tool that counted on a link failed: say why
    assert [name for name, _ in tree.readdir("/published/t")] == ["f"]


def test_readlink_and_removexattr_answer_as_a_tree_without_links_or_removable_attributes(repo):
    import errno

    from s3repofs.errors import NamespaceNotSupportedError, NotFoundError, NotSupportedError

    tree, fh = _writing(repo)
    tree.flush(fh)
    tree.release(fh)
    with pytest.raises(NotFoundError) as info:
        tree.readlink("/published/t/f")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(NotSupportedError) as info:
        tree.removexattr("/published/t/f", "user.s3repo.state")
    assert info.value.errno == errno.ENOTSUP
    with pytest.raises(NamespaceNotSupportedError) as info:  # ENOTSUP too, and quiet: tools probe for these
        tree.removexattr("/published/t/f", "security.selinux")
    assert info.value.errno == errno.ENOTSUP and info.value.expected
    assert tree.getxattr("/published/t/f", "user.s3repo.state") == b"published"


def test_chmod_racing_the_first_write_after_a_flush_leaves_the_new_bytes_to_be_stored(repo, monkeypatch):
    tree, fh = _writing(repo, b"first")
    tree.flush(fh)  # stored and published: the next write continues in a new version
    set_attrs = repo.set_attrs
    writes = []

    def write_during_the_round_trip(version_id, **attrs):
        # The first write after the flush arrives while chmod waits for the database.
        writer = threading.Thread(target=lambda: writes.append(tree.write(fh, b"second", 0)))
        writer.start()
        writer.join(0.5)  # with chmod holding the session, the write waits for it to finish
        return set_attrs(version_id, **attrs)

    monkeypatch.setattr(repo, "set_attrs", write_during_the_round_trip)
    tree.chmod("/published/t/f", 0o600)
    monkeypatch.setattr(repo, "set_attrs", set_attrs)
    deadline = time.monotonic() + 5
    while not writes and time.monotonic() < deadline:
        time.sleep(0.01)
    tree.flush(fh)
    tree.release(fh)
    assert repo.get_file("t/f").read_bytes() == b"second"
    assert [v.state for v in repo.versions_at(RepoPath.parse("t/f"))][-1] == "published"


def test_create_checks_its_parent_with_the_directory_query_alone(repo, monkeypatch):
    """A create's parent is a directory or nothing: a file at its path, or none, refuses the create (ENOENT),
    and a parent not cached costs one query (the directory's), asked while the kernel holds it locked."""
    import errno

    from s3repofs.errors import NotFoundError

    tree, fh = _writing(repo)
    tree.flush(fh)
    tree.release(fh)
    for parent in ("/published/t/f", "/published/t/none"):  # a file; nothing
        with pytest.raises(NotFoundError) as info:
            tree.create(f"{parent}/g", 0o644, 0, 0)
        assert info.value.errno == errno.ENOENT
    assert tree.lookup("/published/t/f").size == len(b"bytes")  # the file is still found as a file
    tree.mkdir("/published/t/d", 0o755, 0, 0)
    tree.metadata.forget("/published/t/d/x")  # drops the cached entry of /published/t/d
    asked = []
    monkeypatch.setattr(repo, "find_version", lambda *a: asked.append("file"))
    real_get_dir = repo.get_dir
    monkeypatch.setattr(repo, "get_dir", lambda d: asked.append("dir") or real_get_dir(d))
    tree.release(tree.create("/published/t/d/g", 0o644, 0, 0))
    assert asked == ["dir"]
