"""Configuration: TOML, environment overrides and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from eobblast.config import load_config
from eobblast.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "eobblast.example.toml"


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.dkim.selector == "eob1"
    assert config.transport.max_connections_per_destination == 8
    assert config.metrics.port == 9464


def test_environment_overrides_file() -> None:
    config = load_config(
        EXAMPLE,
        environ={"EOBBLAST_TRANSPORT__CONNECT_TIMEOUT": "2.5", "EOBBLAST_DKIM__ED25519": "false"},
    )
    assert config.transport.connect_timeout == 2.5
    assert config.dkim.ed25519 is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[transport]\nconnect_timout = 3\n", "unknown setting"),
        ("[transport]\nconnect_timeout = 'soon'\n", "expected a number"),
        ("[dkim]\ned25519 = 'maybe'\n", "expected true or false"),
        ("[transport\n", "not valid TOML"),
        ("[shaping]\nlease_chunk = 2.5\n", r"shaping\.lease_chunk: expected an integer"),
        ("[shaping]\npools_file = ''\n", r"shaping\.pools_file: expected a path string"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml", environ={})
