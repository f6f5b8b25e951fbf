"""Repository paths: what is accepted, what is refused, and how a path splits for SQL."""

import pytest

from s3repofs.domain.paths import MAX_PATH_BYTES, DirPath, RepoPath
from s3repofs.errors import InvalidPathError, NameTooLongError


def test_path_splits_into_type_dir_and_name():
    assert RepoPath.parse("story_data/2026/11/a.json") == RepoPath("story_data", "2026/11", "a.json")
    assert RepoPath.parse("story_data/a.json") == RepoPath("story_data", "", "a.json")
    assert str(RepoPath("story_data", "2026/11", "a.json")) == "story_data/2026/11/a.json"


@pytest.mark.parametrize("bad", [
    "", "/story_data/a", "story_data/../etc/passwd", "../a", "story_data/./a", "story_data//a",
    "story_data/a\0b", "story_data", "..", "bad type/a", "-type/a",
])
def test_bad_paths_are_refused_with_a_reason(bad):
    with pytest.raises(InvalidPathError) as info:
        RepoPath.parse(bad)
    assert "invalid" in str(info.value)


def test_over_long_names_are_refused():
    with pytest.raises(NameTooLongError):
        RepoPath.parse("t/" + "x" * 256)
    with pytest.raises(NameTooLongError):
        RepoPath.parse("t/" + "/".join(["d" * 200] * 21))  # 4,222 bytes: past PATH_MAX
    assert RepoPath.parse("t/" + "x" * 255).name == "x" * 255
    assert len(str(RepoPath.parse("t/" + "/".join(["d" * 199] * 20) + "/" + "x" * 93))) == MAX_PATH_BYTES


def test_non_ascii_names_are_fine():
    assert RepoPath.parse("t/été/naïve.txt").name == "naïve.txt"


def test_directory_ancestors_top_first():
    assert DirPath.parse("t/a/b").ancestors() == [DirPath("t", ""), DirPath("t", "a"), DirPath("t", "a/b")]
    assert DirPath("t", "a/b").parent_dir == "a"
    assert DirPath("t", "a").parent_dir == ""
    assert DirPath("t", "").parent_dir is None
