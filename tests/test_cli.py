"""The s3repofs command, run as a user runs it: a subprocess, exit statuses, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest


def run(*args: str, config: str | None = None, env: dict | None = None, input: bytes | None = None):
    environment = {**os.environ, **(env or {})}
    command = [sys.executable, "-m", "s3repofs", *args] + (["--config", config] if config else [])
    return subprocess.run(command, capture_output=True, env=environment, input=input, timeout=120)


@pytest.fixture
def config_file(repo_config_pair, tmp_path):
    path = tmp_path / "s3repo.json"
    path.write_text(json.dumps(repo_config_pair))
    path.chmod(0o600)
    assert run("init", config=str(path)).returncode == 0
    return str(path)


def assert_clean_failure(result, status: int, *words: str):
    err = result.stderr.decode()
    assert result.returncode == status, err
    assert err.startswith("s3repofs: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_add_publish_ls_cat_get_info_expire(config_file, tmp_path):
    source = tmp_path / "data.csv"
    source.write_bytes(b"a,b\n1,2\n")
    added = run("add", str(source), "story_data/2026/", config=config_file)
    assert added.returncode == 0, added.stderr
    assert b"unpublished story_data/2026/data.csv" in added.stdout

    assert run("publish", "story_data/2026/data.csv", config=config_file).returncode == 0
    listing = json.loads(run("ls", "story_data", "--json", config=config_file).stdout)
    assert [(f["path"], f["state"], f["size"]) for f in listing] == [("story_data/2026/data.csv", "published", 8)]
    assert listing[0]["md5"] == hashlib.md5(b"a,b\n1,2\n").hexdigest()
    assert listing[0]["s3_key"] and listing[0]["published_at"]

    assert run("cat", "story_data/2026/data.csv", config=config_file).stdout == b"a,b\n1,2\n"
    dest = tmp_path / "copy.csv"
    assert run("get", "story_data/2026/data.csv", str(dest), config=config_file).returncode == 0
    assert dest.read_bytes() == b"a,b\n1,2\n"

    info = json.loads(run("info", "story_data/2026/data.csv", "--json", config=config_file).stdout)
    assert info[0]["state"] == "published" and info[0]["origin_host"] == "test-host"

    assert run("expire", "story_data/2026/data.csv", config=config_file).returncode == 0
    assert json.loads(run("ls", "--state", "expired", "--json", config=config_file).stdout)[0]["state"] == "expired"
    assert_clean_failure(run("cat", "story_data/2026/data.csv", config=config_file), 3, "no published version")


def test_add_with_publish_and_status(config_file, tmp_path):
    source = tmp_path / "x.bin"
    source.write_bytes(os.urandom(1000))
    assert run("add", str(source), "raw/x.bin", "--publish", config=config_file).returncode == 0
    status = run("status", config=config_file)
    assert status.returncode == 0 and b"1 published" in status.stdout


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs/path", "t//x", "t/" + "n" * 300])
def test_bad_paths_fail_cleanly_and_write_nothing(config_file, tmp_path, bad):
    source = tmp_path / "f"
    source.write_bytes(b"x")
    result = run("add", str(source), bad, config=config_file)
    assert result.returncode != 0
    assert b"Traceback" not in result.stderr and result.stderr.startswith(b"s3repofs: ")
    assert json.loads(run("ls", "--state", "all", "--json", config=config_file).stdout) == []


def test_broken_config_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"default_s3_bucket": "ok-bucket", "databse": "x"}')
    assert_clean_failure(run("status", config=str(path)), 2, "unknown key 'databse'", str(path))


def test_unreachable_database_is_a_clear_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"local_root": str(tmp_path), "object_dir": str(tmp_path / "o"),
                                "database": "postgresql://u:topsecret@127.0.0.1:1/db"}))
    path.chmod(0o600)
    result = run("status", config=str(path))
    assert_clean_failure(result, 5, "cannot connect to PostgreSQL database", "127.0.0.1:1")
    assert b"topsecret" not in result.stderr


def test_unreachable_s3_is_a_clear_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"local_root": str(tmp_path), "default_s3_bucket": "some-bucket",
                                "s3_endpoint_url": "http://127.0.0.1:1", "s3_access_key": "AKIDEXAMPLE",
                                "s3_secret_key": "topsecret", "database": f"sqlite:///{tmp_path}/r.db"}))
    path.chmod(0o600)
    result = run("init", config=str(path))
    assert_clean_failure(result, 5, "cannot reach S3 bucket some-bucket at http://127.0.0.1:1")
    assert b"topsecret" not in result.stderr


def test_missing_s3_credentials_are_a_clear_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"local_root": str(tmp_path), "default_s3_bucket": "some-bucket",
                                "database": f"sqlite:///{tmp_path}/r.db"}))
    path.chmod(0o600)
    nowhere = str(tmp_path / "none")
    no_credentials = {name: "" for name in os.environ if name.startswith("AWS_") and "CA_BUNDLE" not in name}
    no_credentials.update(AWS_SHARED_CREDENTIALS_FILE=nowhere, AWS_CONFIG_FILE=nowhere,
                          AWS_EC2_METADATA_DISABLED="true")
    result = run("init", config=str(path), env=no_credentials)
    assert_clean_failure(result, 5, "no S3 credentials for S3 bucket some-bucket")
    assert_clean_failure(run("status", config=str(path), env=no_credentials), 3, "s3repofs init")
    half = {**no_credentials, "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE"}  # without its secret
    assert_clean_failure(run("init", config=str(path), env=half), 5, "some-bucket", "AWS_SECRET_ACCESS_KEY")


def test_missing_bucket_is_a_clear_error(tmp_path, s3_server):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"local_root": str(tmp_path), "default_s3_bucket": "no-such-bucket",
                                "s3_endpoint_url": s3_server.endpoint_url, "s3_access_key": "testing",
                                "s3_secret_key": "testing", "database": f"sqlite:///{tmp_path}/r.db"}))
    path.chmod(0o600)
    assert_clean_failure(run("init", config=str(path)), 5, "no-such-bucket", "does not exist")


def test_embedded_default_works_with_no_config(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path), "S3REPO_CONFIG": "", "S3CACHE_CONFIG": ""}
    source = tmp_path / "hello.txt"
    source.write_text("hello")
    assert run("add", str(source), "notes/hello.txt", "--publish", env=env).returncode == 0
    assert run("cat", "notes/hello.txt", env=env).stdout == b"hello"
    assert (tmp_path / "s3repofs" / "repo.db").exists()


def test_every_command_has_help():
    for command in ("init", "status", "add", "publish", "expire", "ls", "cat", "get", "info"):
        result = run(command, "--help")
        assert result.returncode == 0 and b"usage: s3repofs " + command.encode() in result.stdout


def test_cache_status_clear_and_prefetch(config_file, tmp_path, repo_config_pair):
    from pathlib import Path

    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(5000))
    for name in ("a", "b"):
        assert run("add", "--publish", str(source), f"raw/d/{name}", config=config_file).returncode == 0
    objects = Path(repo_config_pair["local_root"]) / "cache" / "objects"

    cleared = run("cache", "clear", config=config_file)
    assert cleared.returncode == 0 and b"removed 2 cached objects" in cleared.stdout, cleared.stderr
    assert not [p for p in objects.rglob("*") if p.is_file()]

    fetched = run("cache", "prefetch", "raw/d", config=config_file)
    assert fetched.returncode == 0 and b"2 published files" in fetched.stdout, fetched.stderr
    assert sorted(p.read_bytes() == source.read_bytes() for p in objects.rglob("*") if p.is_file()) == [True, True]
    status = run("cache", "status", config=config_file)
    assert status.returncode == 0 and b"cache: 2 objects, 9.8 KiB" in status.stdout, status.stdout

    assert_clean_failure(run("cache", "prefetch", "raw/nothing", config=config_file), 3, "nothing published")
    assert_clean_failure(run("cache", "prefetch", config=config_file), 2, "takes one or more PATHs")
