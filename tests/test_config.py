"""Configuration: the original S3Repo's JSON, validated once, with clear errors and no secrets shown."""

import json
import os
import stat

import pytest

from s3repofs.config import EMBEDDED, load_config, mask_url
from s3repofs.errors import ConfigError

GOOD = {
    "local_root": "/var/lib/s3repofs",
    "default_s3_bucket": "my-bucket",
    "backup_s3_bucket": "my-backup-bucket",
    "s3_access_key": "AKIAEXAMPLE",
    "s3_secret_key": "very-secret-key",
    "database": {"host": "localhost", "port": 5432, "user": "u", "password": "p@ss/word", "database": "db"},
}


def write(tmp_path, data, mode=0o600):
    path = tmp_path / "s3repo.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    path.chmod(mode)
    return path


def test_original_config_file_is_understood(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.default_s3_bucket == "my-bucket"
    assert config.object_dir is None
    assert config.database_url == "postgresql://u:p%40ss%2Fword@localhost:5432/db"
    assert mask_url(config.database_url) == "postgresql://u:***@localhost:5432/db"


def test_secrets_never_appear_in_repr(tmp_path):
    text = repr(load_config(write(tmp_path, GOOD)))
    assert "very-secret-key" not in text and "AKIAEXAMPLE" not in text and "p@ss" not in text


def test_environment_variables_find_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)
    monkeypatch.delenv("S3REPO_CONFIG", raising=False)
    monkeypatch.setenv("S3CACHE_CONFIG", str(path))
    assert load_config().source == str(path)
    monkeypatch.setenv("S3REPO_CONFIG", str(path))
    assert load_config().source == str(path)


def test_no_config_means_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.delenv("S3REPO_CONFIG", raising=False)
    monkeypatch.delenv("S3CACHE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    config = load_config()
    assert config.source == EMBEDDED
    assert config.local_root == tmp_path / "s3repofs"
    assert config.database_url == f"sqlite://{tmp_path}/s3repofs/repo.db"
    assert config.object_dir == tmp_path / "s3repofs" / "objects"


@pytest.mark.parametrize("data, words", [
    ("{not json", ["invalid JSON", "line 1"]),
    ("[1, 2]", ["must be a JSON object"]),
    ({**GOOD, "defualt_s3_bucket": "x"}, ["unknown key 'defualt_s3_bucket'"]),
    ({k: v for k, v in GOOD.items() if k != "default_s3_bucket"}, ["missing key 'default_s3_bucket'"]),
    ({**GOOD, "cache_max_bytes": "lots"}, ["'cache_max_bytes' must be a number"]),
    ({**GOOD, "cache_max_bytes": True}, ["'cache_max_bytes' must be a number"]),
    ({**GOOD, "local_root": "relative/dir"}, ["'local_root' must be an absolute path"]),
    ({**GOOD, "default_s3_bucket": "No_Such"}, ["'default_s3_bucket'", "not a valid bucket name"]),
    ({**GOOD, "database": {"host": "h"}}, ["missing key 'database.database'"]),
    ({**GOOD, "database": {"database": "d", "port": "5432"}}, ["'database.port' has the wrong type"]),
    ({**GOOD, "database": "mysql://x/y"}, ["'database' must be a postgresql://"]),
    ({**GOOD, "s3_secret_key": None}, ["must be given together"]),
])
def test_broken_configs_name_the_key_and_file(tmp_path, data, words):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message
    assert "very-secret-key" not in message and "p@ss" not in message


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")


def test_world_readable_secrets_get_a_warning(tmp_path, caplog):
    path = write(tmp_path, GOOD, mode=0o644)
    load_config(path)
    assert any("readable by others" in r.message and "chmod 600" in r.message for r in caplog.records)
    assert all("very-secret-key" not in r.getMessage() for r in caplog.records)


def test_private_config_gets_no_warning(tmp_path, caplog):
    path = write(tmp_path, GOOD, mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    load_config(path)
    assert not caplog.records


def test_local_object_dir_replaces_the_bucket(tmp_path):
    config = load_config({"local_root": str(tmp_path), "object_dir": str(tmp_path / "objects")})
    assert config.object_dir == tmp_path / "objects"
    assert config.database_url == f"sqlite://{tmp_path}/repo.db"


def test_a_bare_name_finds_the_named_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    named = tmp_path / "xdg" / "s3repofs" / "prod.json"
    named.parent.mkdir(parents=True)
    named.write_text(json.dumps({"local_root": str(tmp_path / "root"), "object_dir": str(tmp_path / "objects")}))
    named.chmod(0o600)
    assert load_config("prod").source == str(named)
    local = tmp_path / "prod"  # a file of that name where the command runs wins: it is what was given
    local.write_text(json.dumps({"local_root": str(tmp_path / "other"), "object_dir": str(tmp_path / "o2")}))
    assert load_config("prod").source == "prod"


def test_an_unknown_name_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    with pytest.raises(ConfigError, match=r"no config named 'nosuch'.*xdg/s3repofs/nosuch.json.*/etc/s3repofs"):
        load_config("nosuch")
