"""Configuration: validation naming file and field, environment overrides, check-config."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxyd.cli import main
from proxyd.config import ConfigError, load_config, split_host_port

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example.toml"


def test_no_file_means_empty_defaults() -> None:
    """With no file, proxyd starts empty on the embedded defaults."""
    config = load_config(None, environ={})
    assert config.server.listen == "0.0.0.0:8080"
    assert config.server.control_listen == "127.0.0.1:9090"
    assert config.state.keys is None
    assert config.billing.database_url.startswith("sqlite:///")


def test_environment_overrides_the_file() -> None:
    """PROXYD_* variables win over the file, so a deployment needs no edits."""
    env = {
        "PROXYD_CONFIG": str(EXAMPLE),
        "PROXYD_LISTEN": "127.0.0.1:18080",
        "PROXYD_CONTROL_LISTEN": "127.0.0.1:19090",
        "PROXYD_ADMIN_TOKEN": "x" * 20,
        "PROXYD_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test",
        "PROXYD_REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    config = load_config(None, environ=env)
    assert config.server.listen == "127.0.0.1:18080"
    assert config.server.control_listen == "127.0.0.1:19090"
    assert config.server.admin_token == "x" * 20
    assert config.billing.database_url.startswith("postgresql://")
    assert config.redis.url == "redis://127.0.0.1:6379/0"
    assert config.state.keys is not None


def test_error_names_file_and_field(tmp_path: Path) -> None:
    """A bad field is reported with the file name and the field's path."""
    path = tmp_path / "bad.toml"
    path.write_text(
        '[state.keys]\nversion = 1\n[[state.keys.keys]]\nid = "a"\nhash = "XYZ"\n'
        'account_id = "acct"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(path) in str(err.value)
    assert "state.keys.keys[0].hash" in str(err.value)


def test_unknown_field_is_an_error(tmp_path: Path) -> None:
    """A misspelt setting is not silently ignored."""
    path = tmp_path / "typo.toml"
    path.write_text("[server]\nlisen = '0.0.0.0:1'\n")
    with pytest.raises(ConfigError, match=r"server\.lisen"):
        load_config(path, environ={})


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`proxyd check-config` exits 0 on the example and non-zero naming the problem."""
    assert main(["check-config", str(EXAMPLE)]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"server": {"max_body_bytes": 1}}')
    assert main(["check-config", str(bad)]) == 2
    assert "server.max_body_bytes" in capsys.readouterr().err


def test_missing_credential_variable_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A channel whose api_key_env is unset fails check-config naming that field."""
    path = tmp_path / "c.toml"
    path.write_text(
        "[state.channels]\nversion = 1\n[[state.channels.channels]]\nid = 'c'\ntype = 'openai'\n"
        "base_url = 'http://127.0.0.1:1/v1'\napi_key_env = 'PROXYD_TEST_UNSET_VAR'\n"
        "models = ['m']\n"
    )
    assert main(["check-config", str(path)]) == 2
    assert "channels[0].api_key_env" in capsys.readouterr().err


def test_split_host_port() -> None:
    """Listen addresses parse, IPv6 included."""
    assert split_host_port("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert split_host_port("[::1]:9090") == ("::1", 9090)
    with pytest.raises(ConfigError):
        split_host_port("nope")
