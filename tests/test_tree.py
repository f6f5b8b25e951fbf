"""The mounted tree's semantics without a mount (tree.py), where a mount cannot show them reliably."""

from __future__ import annotations

import os
import time

from s3repofs.tree import Tree


def test_the_retry_thread_never_takes_a_version_a_writer_may_still_fill(repo):
    left_over = repo.add_file(path="t/old").touch("left by a crash").version
    time.sleep(0.01)
    tree = Tree(repo)
    staged_now = repo.add_file(path="t/new").version  # staged, its writer not registered yet
    fh = tree.create("/published/t/open", 0o644, 0, 0)
    writer_version = tree._handles[fh].version
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
