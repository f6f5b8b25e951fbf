"""Tags, date tags and find: on SQLite and PostgreSQL, with the local store and the S3 server; the query
plans of find on both engines at a size where a scan would show."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time

import pytest
from repo_fixtures import undo_migration_6

from s3repofs import S3Repo
from s3repofs.domain.tags import date_tags, period_range
from s3repofs.errors import InvalidTagError, RepoError
from s3repofs.meta.find import FindQuery
from s3repofs.meta.schema import SCHEMA_VERSION


def paths(found) -> list[str]:
    return [rf.path for rf in found]


def test_a_tag_is_set_replaced_and_removed(repo):
    rf = repo.add_file(path="t/a").touch("a")
    rf.tag("source", "crawler").tag("reviewed").tag("source", "feed")
    assert rf.tags == {"source": "feed", "reviewed": ""}
    rf.untag("source").untag("absent")
    assert rf.tags == {"reviewed": ""}


@pytest.mark.parametrize("key, value, message", [
    ("", "v", "tag key ''"), ("has space", "v", "tag key 'has space'"), ("a=b", None, "tag key 'a=b'"),
    ("-x", None, "tag key '-x'"), ("k" * 129, None, "longer than 128"), ("k", "nul\0", "without NUL"),
    ("k", "v" * 513, "longer than 512"),
])
def test_a_bad_tag_is_refused_with_one_line(repo, key, value, message):
    rf = repo.add_file(path="t/a")
    with pytest.raises(InvalidTagError, match=message) as info:
        rf.tag(key, value)
    assert "\n" not in str(info.value) and info.value.exit_status == 2
    assert rf.tags == {}


def test_tags_are_copied_to_a_new_version_when_asked(repo):
    repo.add_file(path="t/a").touch("1").tag("lang", "en").tag("hot").publish()
    assert repo.add_file(path="t/a").tags == {}
    second = repo.add_file(path="t/a", copy_tags=True).tag("lang", "fr")
    assert second.tags == {"lang": "fr", "hot": ""}
    assert repo.add_file(path="t/new", copy_tags=True).tags == {}  # nothing published there


def test_tags_are_copied_to_a_version_added_from_a_local_file(repo, tmp_path):
    repo.add_file(path="t/a").touch("1").tag("lang", "en").publish()
    (tmp_path / "local").write_bytes(b"2")
    assert repo.add_file(path="t/a", source=tmp_path / "local", copy_tags=True).tags == {"lang": "en"}


@pytest.fixture
def tagged(repo):
    """t/a (en, hot), t/b (fr), t/sub/c (en, cold), u/d (no tag), all published; t/e staged (en)."""
    repo.add_file(path="t/a").touch("a").tag("lang", "en").tag("hot").publish()
    repo.add_file(path="t/b").touch("b").tag("lang", "fr").publish()
    repo.add_file(path="t/sub/c").touch("c").tag("lang", "en").tag("cold").publish()
    repo.add_file(path="u/d").touch("d").publish()
    repo.add_file(path="t/e").touch("e").tag("lang", "en")
    return repo


def test_find_by_tags_all_any_and_none(tagged):
    assert paths(tagged.find(tags_all={"lang": "en"})) == ["t/a", "t/sub/c"]
    assert paths(tagged.find(tags_all={"lang": None})) == ["t/a", "t/b", "t/sub/c"]  # any value
    assert paths(tagged.find(tags_all={"lang": "en", "hot": None})) == ["t/a"]
    assert paths(tagged.find(tags_any={"hot": None, "lang": "fr"})) == ["t/a", "t/b"]
    assert paths(tagged.find(tags_none={"lang": None})) == ["u/d"]
    assert paths(tagged.find(tags_none={"lang": "en"}, file_type="t")) == ["t/b"]
    assert paths(tagged.find(tags_all={"lang": "en"}, state="unpublished")) == ["t/e"]
    assert paths(tagged.find(tags_all={"lang": "en"}, state=None)) == ["t/a", "t/sub/c", "t/e"]


def test_find_by_prefix_host_and_times(tagged):
    assert paths(tagged.find(prefix="t/sub")) == ["t/sub/c"]
    assert paths(tagged.find(prefix="t/sub/c")) == ["t/sub/c"]  # a file's own path
    assert paths(tagged.find(file_type="u")) == ["u/d"]
    assert paths(tagged.find(origin_host="elsewhere")) == []
    assert len(list(tagged.find(origin_host="test-host"))) == 4
    b = tagged.get_file("t/b")
    assert paths(tagged.find(published_after=b.published_at)) == ["t/b", "t/sub/c", "u/d"]
    assert paths(tagged.find(published_before=b.published_at)) == ["t/a"]


def test_find_reads_page_after_page_in_id_order(tagged):
    found = list(tagged.find(state=None, page_size=2))
    assert [rf.id for rf in found] == sorted(rf.id for rf in found) and len(found) == 5


def test_find_refuses_bad_arguments_on_the_call(tagged):
    with pytest.raises(InvalidTagError, match="tag key 'a b'"):
        tagged.find(tags_all={"a b": None})
    with pytest.raises(RepoError, match="unknown state"):
        tagged.find(state="gone")
    with pytest.raises(InvalidTagError, match="not a month like 1970-01"):
        tagged.find(date=("month", "2026-13"))


def test_date_tags_and_their_ranges():
    t = dt.datetime(2026, 11, 3, 14, 5, tzinfo=dt.timezone.utc).timestamp()
    assert date_tags(t) == {"hour": "2026-11-03T14", "day": "2026-11-03", "week": "2026-W45",
                            "month": "2026-11", "year": "2026"}
    for period, value in date_tags(t).items():
        start, end = period_range(period, value)
        assert start <= t < end and date_tags(start)[period] == value == date_tags(end - 1)[period]
        assert date_tags(end)[period] != value
    assert period_range("month", "2026-12")[1] == dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc).timestamp()


def test_find_by_date_tag_of_creation(repo_config):
    times = iter([dt.datetime(2026, 10, 31, 23, tzinfo=dt.timezone.utc).timestamp(),
                  dt.datetime(2026, 11, 1, 0, tzinfo=dt.timezone.utc).timestamp(),
                  dt.datetime(2026, 11, 30, 23, 59, tzinfo=dt.timezone.utc).timestamp()])
    with S3Repo(repo_config) as repo:
        repo.create_repository()
        for name in ("oct", "nov1", "nov30"):
            clock, repo.meta.clock = repo.meta.clock, lambda: next(times)
            rf = repo.add_file(path=f"t/{name}").touch(name)
            repo.meta.clock = clock
            rf.publish()
        assert paths(repo.find(date=("month", "2026-11"))) == ["t/nov1", "t/nov30"]
        assert paths(repo.find(date=("day", "2026-10-31"))) == ["t/oct"]
        assert paths(repo.find(date=("week", "2026-W44"))) == ["t/oct", "t/nov1"]
        assert repo.get_file("t/nov1").date_tags["month"] == "2026-11"


def test_a_schema_4_database_gets_the_tag_index(repo):
    drop = "DROP INDEX IF EXISTS tags_by_key"
    back_to_4 = "UPDATE schema_version SET version = 4"
    repo.db.run(lambda tx: (tx.execute(drop), undo_migration_6(tx), tx.execute(back_to_4)))
    assert repo.meta.schema_version() == 4 and not repo.db.run(index_exists)
    repo.create_repository()
    assert repo.meta.schema_version() == SCHEMA_VERSION
    assert repo.db.run(index_exists) and repo.get_file("t/a") is None


def index_exists(tx) -> bool:
    if tx.kind == "postgresql":
        return tx.scalar("SELECT to_regclass('tags_by_key') IS NOT NULL")
    return tx.scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'tags_by_key'") == 1


# -- plans: at 20,000 versions, ANALYZEd, the planners scan where no index serves (checked: without tags_by_key
# each tag query fails here)

VERSIONS = 20_000
SEED = {
    "sqlite": f"""INSERT INTO versions (file_type, dir, name, state, storage, bucket, s3_key, origin_host, mode, uid,
                      gid, created_at, published_at)
                  WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {VERSIONS})
                  SELECT 'p', 'd' || (i % 50), 'f' || i, 'published', 'uploaded', 'b', 'k' || i, 'h', 420, 0, 0,
                      1.7e9 + i * 60, 1.7e9 + i * 60 FROM n""",
    "postgresql": f"""INSERT INTO versions (file_type, dir, name, state, storage, bucket, s3_key, origin_host, mode,
                          uid, gid, created_at, published_at)
                      SELECT 'p', 'd' || (i % 50), 'f' || i, 'published', 'uploaded', 'b', 'k' || i, 'h', 420, 0, 0,
                          1.7e9 + i * 60, 1.7e9 + i * 60 FROM generate_series(1, {VERSIONS}) AS i""",
}
TAGS = [  # every version has a "batch", one in 1,000 is "rare"
    "INSERT INTO tags (version_id, key, value) SELECT id, 'batch', CAST(id % 1000 AS TEXT) FROM versions",
    "INSERT INTO tags (version_id, key, value) SELECT id, 'rare', '' FROM versions WHERE id % 1000 = 0",
]


def plan(tx, sql: str, params: list) -> str:
    if tx.kind == "postgresql":
        return "\n".join(row["QUERY PLAN"] for row in tx.all("EXPLAIN " + sql, tuple(params)))
    return "\n".join(row["detail"] for row in tx.all("EXPLAIN QUERY PLAN " + sql, tuple(params)))


def scans(text: str) -> list[str]:
    """The lines of a plan that read all of versions or of tags: SQLite's SCAN (SEARCH is an index lookup) and
    a walk of versions by id from the page's start (rowid>?); PostgreSQL's sequential scans, and an index
    scan of versions' primary key whose only condition is the page's start (id > ...)."""
    lines = text.splitlines()
    found = [line for line in lines if line.startswith(("SCAN versions", "SCAN tags"))
             or "USING INTEGER PRIMARY KEY (rowid>?)" in line
             or "Seq Scan on versions" in line or "Seq Scan on tags" in line]
    return found + [line for line, cond in zip(lines, lines[1:] + [""])
                    if "Index Scan using versions_pkey" in line and "Index Cond: (id > " in cond]


@pytest.fixture(params=["sqlite-local", "postgres-local"])
def big_repo(request, tmp_path):
    from repo_fixtures import make_config

    with S3Repo(make_config(request, tmp_path, request.param)) as repo:
        repo.create_repository()
        repo.db.run(lambda tx: [tx.execute(sql) for sql in (SEED[tx.kind], *TAGS, "ANALYZE")])
        yield repo


@pytest.mark.parametrize("query, expected", [
    (FindQuery(tags_all={"rare": None}), 20),
    (FindQuery(tags_all={"batch": "0", "rare": None}), 20),
    (FindQuery(tags_any={"rare": None, "batch": "7"}), 40),
    (FindQuery(tags_all={"rare": None}, tags_none={"batch": "7"}, states=("published",)), 20),
    (FindQuery(tags_all={"rare": None}, file_type="p", published_after=1.7e9 + 60 * 10_000), 11),
    (FindQuery(created_after=1.7e9 + 60 * 100, created_before=1.7e9 + 60 * 200, states=("published",)), 100),
], ids=["one-tag", "two-tags", "any-tag", "tag-and-none", "tag-and-columns", "date"])
def test_find_scans_neither_versions_nor_tags(big_repo, query, expected):
    text = big_repo.db.run(lambda tx: plan(tx, *big_repo.meta.find_sql(query, 0, 1000)), write=False)
    assert not scans(text), text
    assert len(big_repo.meta.find_page(query, 0, VERSIONS)) == expected


# -- the commands ----------------------------------------------------------------------------------

import test_cli  # noqa: E402
from test_cli import assert_clean_failure, run  # noqa: E402

config_file = test_cli.config_file  # the fixture: a created repository's configuration file


def test_tag_untag_and_find_commands(config_file, tmp_path):
    source = tmp_path / "x"
    source.write_bytes(b"x")
    for path in ("t/a", "t/b", "t/sub/c"):
        assert run("add", str(source), path, "--publish", config=config_file).returncode == 0
    assert run("tag", "t/a", "lang=en", "hot", config=config_file).stdout == b"t/a (version 1): hot lang=en\n"
    tagged = json.loads(run("tag", "t/b", "lang=fr", "--json", config=config_file).stdout)
    assert tagged == {"path": "t/b", "version": 2, "tags": {"lang": "fr"}}
    assert run("tag", "t/sub/c", "lang=en=gb", config=config_file).returncode == 0  # a value may hold =

    def found(*args: str) -> list[str]:
        result = run("find", *args, "--json", config=config_file)
        assert result.returncode == 0, result.stderr
        return [record["path"] for record in json.loads(result.stdout)]

    assert found("--tag", "lang") == ["t/a", "t/b", "t/sub/c"]
    assert found("--tag", "lang=en") == ["t/a"]
    assert found("t/sub", "--tag", "lang") == ["t/sub/c"]
    assert found("--any-tag", "hot", "--any-tag", "lang=fr") == ["t/a", "t/b"]
    assert found("--no-tag", "hot", "--state", "all") == ["t/b", "t/sub/c"]
    this_month = date_tags(time.time())["month"]
    assert found("--month", this_month) == ["t/a", "t/b", "t/sub/c"] and found("--month", "2001-01") == []
    assert found("--published-after", "2001-01-01", "--tag", "hot") == ["t/a"]
    assert b"t/a" in run("find", "--tag", "hot", config=config_file).stdout
    assert run("untag", "t/a", "hot", config=config_file).stdout == b"t/a (version 1): lang=en\n"
    assert found("--tag", "hot") == []


@pytest.mark.parametrize("args, words", [
    (("tag", "t/a", "bad key=v"), ["tag key 'bad key'"]),
    (("tag", "t/a", "k=v"), ["t/a: no published version"]),
    (("find", "--tag", "=v"), ["tag key ''"]),
    (("find", "--day", "2026-02-30"), ["not a day like 1970-01-01"]),
    (("find", "--published-after", "yesterday"), ["not an ISO 8601 time"]),
])
def test_bad_tag_arguments_fail_with_one_line(config_file, args, words):
    assert_clean_failure(run(*args, config=config_file), 2 if "no published" not in words[0] else 3, *words)


def test_the_tag_commands_have_help():
    for command in ("find", "tag", "untag"):
        result = run(command, "--help")
        assert result.returncode == 0 and b"usage: s3repofs " + command.encode() in result.stdout


# -- the mount: user.s3repo.tag.KEY, with setfattr and getfattr ---------------------------------------

from mount_helper import fuse_available, mounted  # noqa: E402


def fattr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)


@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3 (./scripts/setup)")
def test_tags_are_xattrs_on_the_mount(repo_config_pair, tmp_path):
    with mounted(repo_config_pair, tmp_path) as mnt:
        (mnt / "published" / "t").mkdir()
        target = mnt / "published" / "t" / "f"
        target.write_bytes(b"f")
        assert fattr("setfattr", "-n", "user.s3repo.tag.lang", "-v", "en", str(target)).returncode == 0
        assert fattr("setfattr", "-n", "user.s3repo.tag.hot", str(target)).returncode == 0  # no value
        dump = fattr("getfattr", "-d", "-m", "user.s3repo.tag.", str(target)).stdout
        assert 'user.s3repo.tag.lang="en"' in dump and "user.s3repo.tag.hot" in dump
        assert fattr("getfattr", "--only-values", "-n", "user.s3repo.tag.lang", str(target)).stdout == "en"
        assert os.getxattr(target, "user.s3repo.state") == b"published"  # setting a tag publishes nothing else
        bad = fattr("setfattr", "-n", "user.s3repo.tag.bad key", "-v", "x", str(target))
        assert bad.returncode != 0 and "Invalid argument" in bad.stderr
        assert fattr("setfattr", "-x", "user.s3repo.tag.lang", str(target)).returncode == 0
        gone = fattr("setfattr", "-x", "user.s3repo.tag.lang", str(target))
        assert gone.returncode != 0 and "No such attribute" in gone.stderr
        assert fattr("setfattr", "-x", "user.s3repo.state", str(target)).returncode != 0  # only tags are removable
        names = os.listxattr(target)
        assert "user.s3repo.tag.hot" in names and "user.s3repo.tag.lang" not in names
    with S3Repo(repo_config_pair) as repo:
        assert repo.get_file("t/f").tags == {"hot": ""}
        assert paths(repo.find(tags_all={"hot": None})) == ["t/f"]
