"""The lifecycle's transition table (domain/lifecycle.py): what it allows, and that the code keeps to it.

Three checks: the table itself (allowed pairs pass, every other pair is refused); real operations
(the repository's and the mounted tree's, on SQLite and an S3 server) change versions only as the
table allows, each change checked against it, and between them make every change the table holds;
and no UPDATE in the package sets a state, storage or tier outside a function that checks the table.
"""

from __future__ import annotations

import ast
import itertools
import re
import sys
import time
from pathlib import Path

import pytest
from repo_fixtures import make_config

import s3repofs
from s3repofs import S3Repo
from s3repofs.domain import lifecycle
from s3repofs.domain.lifecycle import TRANSITIONS, State, Storage, Tier, check_transition
from s3repofs.domain.paths import RepoPath
from s3repofs.errors import LifecycleError
from s3repofs.mount.tree import Tree
from s3repofs.ops import fsck, gc

FACETS = (State, Storage, Tier)
BORN = {"state": State.UNPUBLISHED, "storage": Storage.LOCAL, "tier": Tier.FRESH}  # a new version's facets


# -- the table ------------------------------------------------------------------------------------


def test_each_transition_changes_one_facet():
    assert all(type(old) is type(new) and type(old) in FACETS for old, new in TRANSITIONS)


@pytest.mark.parametrize(("old", "new"), list(TRANSITIONS))
def test_the_table_allows_its_transitions(old, new):
    check_transition("t/a: version 1", old, new)


@pytest.mark.parametrize(("old", "new"), [pair for facet in FACETS for pair in itertools.product(facet, repeat=2)
                                          if pair not in TRANSITIONS])
def test_every_other_change_is_refused(old, new):
    with pytest.raises(LifecycleError, match=f"^t/a: version 1 is {old}; .* be {new}$"):
        check_transition("t/a: version 1", old, new)


def test_a_refusal_says_which_states_may_make_the_change():
    with pytest.raises(LifecycleError, match="is published; only an unpublished version can be discarded"):
        check_transition("t/a: version 1", State.PUBLISHED, State.DISCARDED)
    with pytest.raises(LifecycleError, match="is discarded; only an unpublished, published or expired version can be"
                                             " published"):
        check_transition("t/a: version 1", State.DISCARDED, State.PUBLISHED)
    with pytest.raises(LifecycleError, match="is fresh; only an archived version can be thawing"):
        check_transition("t/a: version 1", Tier.FRESH, Tier.THAWING)


def test_the_rows_of_the_database_compare_equal_to_the_members():
    assert State.PUBLISHED == "published" and f"{Storage.LOCAL}" == "local"
    assert ("expired", "published") in TRANSITIONS


# -- the transitions real operations make -----------------------------------------------------------


@pytest.fixture
def s3_repo(request, tmp_path):
    repo = S3Repo(make_config(request, tmp_path, "sqlite-s3"))
    repo.create_repository()
    yield repo
    repo.close()


def test_a_new_version_is_unpublished_local_and_fresh(s3_repo):
    version = s3_repo.add_file(path="t/a").version
    assert {facet: getattr(version, facet) for facet in BORN} == BORN


def _rows(repo: S3Repo) -> dict[int, dict]:
    """Each version's facets, its tier as shown (archived with a thaw requested is thawing)."""
    rows = repo.db.run(lambda tx: tx.all(
        "SELECT id, state, storage, tier, thaw_requested_at, file_type, dir, name FROM versions"), write=False)
    return {row["id"]: {**row, "tier": Tier.THAWING if row.pop("thaw_requested_at") else row["tier"]} for row in rows}


def _changes(before: dict[int, dict], after: dict[int, dict]) -> set[tuple[str, str]]:
    """The (old, new) of each facet a version changed; (published, published) for a published version moved."""
    changes = set()
    for version_id, new in after.items():
        old = before.get(version_id, {**new, **BORN})  # a version added by the step: as add_file makes it
        changes |= {(old[facet], new[facet]) for facet in ("state", "storage", "tier") if old[facet] != new[facet]}
        moved = any(old[column] != new[column] for column in ("file_type", "dir", "name"))
        if moved and old["state"] == new["state"] == State.PUBLISHED:
            changes.add((State.PUBLISHED, State.PUBLISHED))
    assert set(before) <= set(after), "a version's row went away"
    return changes


def _operations(repo: S3Repo) -> list:
    """Each lifecycle operation of the repository and of the mounted tree, one step each."""
    tree = Tree(repo, metadata_ttl=3600)

    def write(path: str, data: bytes) -> None:
        fh = tree.create(path, 0o644, 0, 0)
        tree.write(fh, data, 0)
        tree.flush(fh)
        tree.release(fh)

    def file(path: str):
        return repo.get_file(path, "published") or repo.get_file(path, "unpublished") or repo.get_file(path, "expired")

    def retry_a_pending_publish() -> None:
        staged = repo.add_file(path="t/retried").touch("5")
        repo.meta.set_publish_pending(staged.id, True)
        assert repo.retry_staged_uploads() == 1

    def fsck_repair() -> None:
        fsck.repair(repo, fsck.check(repo, quiet=True), quiet=True)

    def lose_every_copy(path: str) -> None:
        key = file(path).s3_key
        repo.store.delete(key)
        repo.cache.object_path(key).unlink()

    def find_a_copy(path: str, data: bytes) -> None:  # as another host's cache would have it
        repo.cache.object_path(file(path).s3_key).write_bytes(data)

    def read_uncached(path: str) -> bytes:
        repo.cache.clear()
        return file(path).read_bytes()

    def restored_copy_expires(path: str) -> None:  # a copy in place has no restore: as if it had expired
        version = file(path).version
        repo.store.set_storage_class(version.s3_key, "GLACIER", version.size)

    return [
        lambda: repo.add_file(path="t/a").touch("1").publish(),  # staged, uploaded and published at once
        lambda: repo.add_file(path="t/a").touch("2").publish(),  # expires the first
        lambda: file("t/a").expire(),
        lambda: repo.publish(repo.get_file("t/a", "expired").version),  # re-publish
        lambda: repo.publish(file("t/a").version, RepoPath.parse("t/moved")),  # a published version moved
        lambda: repo.discard(repo.add_file(path="t/c").touch("3").version),
        lambda: repo.add_file(path="t/d").touch("4").upload(),  # uploaded, stays unpublished
        lambda: file("t/d").publish("t/e"),  # published at another path
        retry_a_pending_publish,
        lambda: tree.mkdir("/published/m", 0o755, 0, 0),
        lambda: write("/published/m/g", b"g"),  # a close in published/ publishes
        lambda: write("/unpublished/m/h", b"h"),  # a close in unpublished/ uploads
        lambda: write("/unpublished/m/h", b"h2"),  # a newer staged version discards the older one
        lambda: tree.rename("/unpublished/m/h", "/published/m/h"),
        lambda: tree.unlink("/published/m/h"),  # expire
        lambda: tree.rename("/expired/m/h", "/published/m/h"),  # re-publish
        lambda: tree.setxattr("/published/m/g", "user.s3repo.state", b"expired"),
        lambda: tree.setxattr("/expired/m/g", "user.s3repo.state", b"published"),
        lambda: tree.rename("/published/m/g", "/published/m/g2"),
        lambda: write("/unpublished/m/i", b"i"),
        lambda: tree.unlink("/unpublished/m/i"),  # discard
        lambda: lose_every_copy("t/e"),
        fsck_repair,  # no copy: marked missing
        lambda: find_a_copy("t/e", b"4"),
        fsck_repair,  # re-uploaded from the copy
        lambda: repo.archive(file("t/e").version),
        lambda: repo.thaw(file("t/e").version, 1),
        lambda: read_uncached("t/e"),  # the open finds the restore done: the thaw finished
        lambda: repo.archive(file("t/e").version),
        lambda: repo.thaw(file("t/e").version, 1),
        lambda: restored_copy_expires("t/e"),
        repo.finish_thaws,  # the mount's pass: the thaw lapsed
        lambda: gc.execute(repo, gc.plan(repo, now=time.time() + 40 * 86400)),  # purges what expired
    ]


def test_the_operations_change_versions_only_as_the_table_allows(s3_repo, monkeypatch):
    checked: set[tuple[str, str]] = set()
    original = lifecycle.check_transition

    def recording(version: str, old, new) -> None:
        original(version, old, new)
        checked.add((old, new))

    for module in [m for name, m in sys.modules.items() if name.startswith("s3repofs")]:
        if getattr(module, "check_transition", None) is original:
            monkeypatch.setattr(module, "check_transition", recording)
    made: set[tuple[str, str]] = set()
    for step in _operations(s3_repo):
        before = _rows(s3_repo)
        step()
        made |= _changes(before, _rows(s3_repo))
    assert made <= set(TRANSITIONS), "a change the table does not hold"
    assert made <= checked, "a change made without check_transition"
    assert set(TRANSITIONS) <= made, "a row of the table no operation makes (add the operation here, or drop the row)"


# -- no unchecked UPDATE ------------------------------------------------------------------------------

_UPDATE = re.compile(r"UPDATE\s+versions\s+SET\s+(.*?)\bWHERE\b", re.DOTALL)
_LIFECYCLE_COLUMN = re.compile(r"\b(state|storage|tier)\s*=")


def _outermost_functions(tree: ast.Module) -> list[ast.FunctionDef]:
    found = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            found += [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(node)
    return found


def _calls_check(function: ast.AST) -> bool:
    return any(isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
               == "check_transition" for node in ast.walk(function))


def _lifecycle_updates(source: str) -> list[int]:
    """The line of each UPDATE of versions that sets a state, storage or tier."""
    return [source.count("\n", 0, match.start()) + 1 for match in _UPDATE.finditer(source)
            if _LIFECYCLE_COLUMN.search(match.group(1))]


def test_every_update_of_a_state_storage_or_tier_checks_the_table():
    package = Path(s3repofs.__file__).parent
    unchecked, updates = [], 0
    for module in sorted(package.rglob("*.py")):
        source = module.read_text()
        functions = _outermost_functions(ast.parse(source))
        for line in _lifecycle_updates(source):
            updates += 1
            within = [f for f in functions if f.lineno <= line <= f.end_lineno]
            if not within or not _calls_check(within[0]):
                unchecked.append(f"{module.relative_to(package)}:{line}")
    assert updates >= 7  # the pattern still finds them: mark_uploaded, publish (2), publish_staged (2), _change_state,
    # purge
    assert unchecked == [], "UPDATEs of a version's lifecycle outside a function that calls check_transition"
