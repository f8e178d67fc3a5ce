"""Configuration: TOML, environment overrides and clear errors."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from eobblast.cli import main
from eobblast.config import load_config, store_files, warn_relative_stores, with_settings
from eobblast.demo import demo_worker_config
from eobblast.errors import ConfigError
from eobblast.state.sqlite import sqlite_path

EXAMPLE = Path(__file__).parents[2] / "config" / "eobblast.example.toml"


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.dkim.selector == "eob1"
    assert config.transport.max_connections_per_destination == 8
    assert config.metrics.port == 9464
    # Every store of the example lives in the state directory whatever the working one:
    # `sqlite:///var/...` (three slashes) would have been var/... under the working directory.
    files = store_files(config)
    assert set(files) == {
        "ledger.url",
        "bounces.store_url",
        "portal.escrow_url",
        "portal.audit_url",
    }
    assert str(config.shaping.budgets_url).startswith("sqlite:////var/lib/eobblast/")
    assert all(str(path).startswith("/var/lib/eobblast/") for path in files.values())


def test_environment_overrides_file() -> None:
    config = load_config(
        EXAMPLE,
        environ={"EOBBLAST_TRANSPORT__CONNECT_TIMEOUT": "2.5", "EOBBLAST_DKIM__ED25519": "false"},
    )
    assert config.transport.connect_timeout == 2.5
    assert config.dkim.ed25519 is False


def test_a_mistyped_environment_override_is_said_and_service_links_are_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One underscore where two belong left the default broker in force, without a word.
    # Kubernetes service links (a Service named eobblast, eobblast-portal) look alike and
    # must not stop a start, nor be taken as settings.
    environ = {
        "EOBBLAST_KAFKA_BOOTSTRAP": "kafka-secret-host:9093",
        "EOBBLAST_SERVICE_HOST": "10.0.0.7",
        "EOBBLAST_PORT_9464_TCP": "tcp://10.0.0.7:9464",
        "EOBBLAST_PORTAL_SERVICE_PORT": "8443",
        "EOBBLAST_METRICS_PORT": "tcp://10.0.0.8:9464",  # a Service named eobblast-metrics
        "EOBBLAST_": "x",
    }
    with caplog.at_level(logging.WARNING, logger="eobblast.config"):
        config = load_config(EXAMPLE, environ=environ)
    assert config.kafka.bootstrap == load_config(EXAMPLE, environ={}).kafka.bootstrap
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "environment variable EOBBLAST_KAFKA_BOOTSTRAP is not read: an override is"
        " EOBBLAST_KAFKA__BOOTSTRAP, with two underscores"
    ]
    # a name with the two underscores is read, and an unknown setting there refused
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(EXAMPLE, environ={"EOBBLAST_KAFKA__BOOTSTRP": "x:1"})
    with pytest.raises(ConfigError, match="EOBBLAST_<SECTION>__<SETTING>") as caught:
        load_config(EXAMPLE, environ={"EOBBLAST_KAFKA__": "kafka-secret-host:9093"})
    assert "kafka-secret-host" not in str(caught.value)


def test_hole_settle_defaults_to_reading_holes_again_and_zero_turns_it_off() -> None:
    # Tansu (the default, embedded broker) needs its holes read again; Apache Kafka's are
    # all real, and an operator there turns the re-reads off.
    assert load_config(None, environ={}).kafka.hole_settle == 0.02
    config = load_config(EXAMPLE, environ={"EOBBLAST_KAFKA__HOLE_SETTLE": "0"})
    assert config.kafka.hole_settle == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[transport]\nconnect_timout = 3\n", "unknown setting"),
        ("[transport]\nconnect_timeout = 'soon'\n", "expected a number"),
        ("[dkim]\ned25519 = 'maybe'\n", "expected true or false"),
        ("[transport\n", "not valid TOML"),
        ("[shaping]\nlease_chunk = 2.5\n", r"shaping\.lease_chunk: expected an integer"),
        ("[shaping]\npools_file = ''\n", r"shaping\.pools_file: expected a path string"),
        ("[protection]\ntls_sync_seconds = 0\n", r"protection\.tls_sync_seconds"),
        ("[bounces]\nreview_days = 0\n", r"bounces\.review_days"),
        ("[bounces]\nreview_max_messages = 0\n", r"bounces\.review_max_messages: expected"),
        ("[bounces]\nmax_message_bytes = 0\n", r"bounces\.max_message_bytes: expected"),
        ("[bounces]\ntls_cert = '/etc/b.pem'\n", r"bounces\.tls_cert and bounces\.tls_key"),
        ("[bounces]\ntls_key = '/etc/b.key'\n", r"bounces\.tls_cert and bounces\.tls_key"),
        ("[kafka]\nmax_poll_interval_ms = 500\n", r"kafka\.max_poll_interval_ms"),
        ("[kafka]\nhole_settle = -0.01\n", r"kafka\.hole_settle: expected seconds from 0"),
        ("[kafka]\nhole_settle = 2\n", r"kafka\.hole_settle: expected seconds from 0 to 1"),
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


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:////var/lib/eobblast/ledger.db", Path("/var/lib/eobblast/ledger.db")),
        ("sqlite:///state/ledger.db", Path("state/ledger.db")),
        ("postgresql://eob@db/eob", None),
    ],
)
def test_sqlite_urls_follow_sqlalchemy(url: str, expected: Path | None) -> None:
    assert sqlite_path(url, "ledger") == expected


def test_a_sqlite_url_without_a_file_is_refused() -> None:
    with pytest.raises(ConfigError, match="ledger url names no file"):
        sqlite_path("sqlite:///", "ledger")


def test_commands_warn_about_store_files_relative_to_the_working_directory(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    config = load_config(
        environ={},
        overrides={
            "ledger": {"url": "sqlite:///relative-ledger.db"},
            "bounces": {"store_url": f"sqlite:///{tmp_path / 'bounces.db'}"},
        },
    )
    with caplog.at_level(logging.WARNING, logger="eobblast.config"):
        warn_relative_stores(config, {"ledger.url", "bounces.store_url"})
    warned = {
        getattr(r, "setting", None): getattr(r, "path", None)
        for r in caplog.records
        if r.getMessage() == "store file is relative to the working directory"
    }
    assert "ledger.url" in warned and "bounces.store_url" not in warned
    assert warned["ledger.url"] == str(Path.cwd() / "relative-ledger.db")


@pytest.mark.parametrize(
    "value",
    ["gmail.com, yahoo.com", '["gmail.com", "yahoo.com"]', "  [ 'gmail.com','yahoo.com' ] "],
)
def test_a_list_variable_is_comma_separated_or_a_toml_array(value: str) -> None:
    config = load_config(environ={"EOBBLAST_PROTECTION__PORTAL_DOMAINS": value})
    assert config.protection.portal_domains == ("gmail.com", "yahoo.com")


@pytest.mark.parametrize("value", ['"gmail.com"', "gmail.com]", "'a', 'b'", '["gmail.com"'])
def test_quotes_or_brackets_never_become_part_of_a_list_item(value: str) -> None:
    # '"gmail.com"' used to be taken as a domain with quotes in it, matching no address.
    with pytest.raises(ConfigError, match=r"protection\.portal_domains"):
        load_config(environ={"EOBBLAST_PROTECTION__PORTAL_DOMAINS": value})


def test_a_configuration_with_some_settings_replaced_keeps_the_rest() -> None:
    # How the demo gives its workers the user's configuration with its own stores.
    example = load_config(EXAMPLE, environ={})
    assert with_settings(example, {}) == example
    changed = with_settings(example, {"ledger": {"url": "sqlite:////tmp/x.db"}})
    assert changed.ledger.url == "sqlite:////tmp/x.db"
    assert changed.transport == example.transport and changed.dkim == example.dkim
    with pytest.raises(ConfigError, match="unknown setting"):
        with_settings(example, {"ledger": {"path": "x"}})


def test_the_demo_keeps_the_users_settings_but_not_their_sending_setup(tmp_path: Path) -> None:
    # A production file given to `eobblast demo --config`: its pipeline and transport
    # settings reach the workers, its IP pools, source address, stores and old keys do not.
    production = with_settings(
        load_config(EXAMPLE, environ={}),
        {
            "pipeline": {"max_in_flight": 77},
            "transport": {"ehlo_name": "mta.payer.example", "source_address": "192.0.2.10"},
            "shaping": {"pools_file": "/etc/eobblast/pools.toml"},
            "ledger": {"url": "postgresql://eob@db/eob"},
            "bounces": {"verp_previous_keys": ["2:/var/lib/eobblast/keys/verp-2026.key"]},
            "kafka": {"hole_settle": 0},  # right for Apache Kafka, not for the demo's Tansu
        },
    )
    shared = {
        "bounces": {"verp_previous_keys": []},
        "pipeline": {"allow_test_domains": True},
        "kafka": {"bootstrap": "127.0.0.1:19092"},
    }
    routes = {"ok.sandbox.test": "127.0.0.1:2525"}
    config = demo_worker_config(production, shared, tmp_path, tmp_path / "ca.pem", routes, 2)
    assert config.pipeline.max_in_flight == 77 and config.pipeline.allow_test_domains
    assert config.transport.ehlo_name == "mta.payer.example"
    assert config.transport.source_address is None and not config.shaping.enabled
    assert config.ledger.url == f"sqlite:///{tmp_path / 'ledger.db'}"
    assert config.bounces.previous_verp_keys() == []
    assert config.transport.routes == routes and config.workers.count == 2
    assert config.kafka.bootstrap == "127.0.0.1:19092" and config.kafka.hole_settle == 0.02


def test_the_ledger_retention_is_days_from_the_environment_and_never_negative() -> None:
    assert load_config(environ={}).ledger.retention_days == 90.0
    config = load_config(environ={"EOBBLAST_LEDGER__RETENTION_DAYS": "35"})
    assert config.ledger.retention_days == 35.0
    with pytest.raises(ConfigError, match=r"ledger\.retention_days"):
        load_config(environ={"EOBBLAST_LEDGER__RETENTION_DAYS": "-1"})


@pytest.mark.parametrize(
    ("portal", "message"),
    [
        # Over plain HTTP the EOB would be served without HSTS, its cookie not Secure.
        ({"base_url": "http://eob.acme-health.com/p/"}, r"portal\.base_url: expected https://"),
        ({"base_url": "http://10.1.2.3:8443/p/"}, r"portal\.base_url: expected https://"),
        ({"base_url": "ftp://eob.acme-health.com/p/"}, r"portal\.base_url: expected https://HOST"),
        ({"base_url": "/p/"}, r"portal\.base_url: expected https://HOST"),
        ({"base_url": "https://[eob/p/"}, r"portal\.base_url: .* is not a URL"),
        ({"base_url": "https://eob.acme-health.com/p"}, r"portal\.base_url: expected a path"),
        ({"base_url": "https://eob.acme-health.com/?t="}, r"portal\.base_url: expected a path"),
        ({"lockout_after": 0}, r"portal\.lockout_after: expected a whole number from 1 to 10"),
        ({"lockout_after": 1000}, r"portal\.lockout_after: expected a whole number from 1"),
        ({"item_days": 0}, r"portal\.item_days: expected a whole number from 1 to 90"),
        ({"item_days": -3}, r"portal\.item_days"),
        ({"item_days": 3650}, r"portal\.item_days"),
        ({"access_days": 0}, r"portal\.access_days: expected a whole number from 1 to 2192"),
        ({"metrics_port": 70000}, r"portal\.metrics_port: expected a port"),
        ({"metrics_port": 8443}, r"portal\.metrics_port: expected another port than listen"),
        # uvicorn believes "*" from anyone, and takes a typo as a name no client has.
        ({"trusted_proxies": ["*"]}, r"portal\.trusted_proxies: expected IP addresses"),
        ({"trusted_proxies": ["proxy.internal"]}, r"portal\.trusted_proxies: expected IP"),
    ],
)
def test_portal_settings_are_checked(portal: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ={}, overrides={"portal": portal})


def test_portal_links_over_plain_http_only_on_this_machine() -> None:
    # The demo and the tests serve the portal on loopback without TLS.
    for base_url in ("http://127.0.0.1:8443/p/", "http://localhost/p/", "http://[::1]:80/p/"):
        assert load_config(environ={}, overrides={"portal": {"base_url": base_url}})
    environ = {
        "EOBBLAST_PORTAL__BASE_URL": "http://eob.acme-health.com/p/",
        "EOBBLAST_PORTAL__LOCKOUT_AFTER": "3",
    }
    with pytest.raises(ConfigError, match=r"portal\.base_url"):
        load_config(EXAMPLE, environ=environ)
    config = load_config(
        EXAMPLE,
        environ={
            "EOBBLAST_PORTAL__TRUSTED_PROXIES": "172.31.254.1, 10.0.0.0/8, ::1",
            "EOBBLAST_PORTAL__LOCKOUT_AFTER": "10",
            "EOBBLAST_PORTAL__ITEM_DAYS": "90",
        },
    )
    assert config.portal.forwarded_allow_ips == "172.31.254.1,10.0.0.0/8,::1"
    assert (config.portal.lockout_after, config.portal.item_days) == (10, 90)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # aiokafka refuses these in every worker, which dies and is restarted, forever.
        (
            {"kafka": {"max_poll_records": 0}},
            "kafka.max_poll_records: expected a whole number >= 1",
        ),
        ({"kafka": {"session_timeout_ms": 0}}, "kafka.session_timeout_ms: expected a whole"),
        ({"kafka": {"heartbeat_interval_ms": -1}}, "kafka.heartbeat_interval_ms: expected a whole"),
        (
            {"kafka": {"session_timeout_ms": 10_000, "heartbeat_interval_ms": 3_334}},
            "kafka.heartbeat_interval_ms: expected at most a third of kafka.session_timeout_ms"
            " (10000)",
        ),
        ({"kafka": {"commit_interval": 0}}, "kafka.commit_interval: expected a number > 0"),
        ({"kafka": {"commit_interval": float("nan")}}, "kafka.commit_interval: expected a number"),
        ({"transport": {"connect_timeout": 0}}, "transport.connect_timeout: expected a number > 0"),
        (
            {"transport": {"command_timeout": -5}},
            "transport.command_timeout: expected a number > 0",
        ),
        (
            {"transport": {"max_connections_per_destination": 0}},
            "transport.max_connections_per_destination: expected a whole number >= 1",
        ),
        (
            {"transport": {"max_messages_per_connection": 0}},
            "transport.max_messages_per_connection: expected a whole number >= 1",
        ),
        ({"transport": {"idle_expiry": -1}}, "transport.idle_expiry: expected a number >= 0"),
        ({"transport": {"mx_cache_ttl": -1}}, "transport.mx_cache_ttl: expected a number >= 0"),
        ({"workers": {"count": -2}}, "workers.count: expected a number >= 0"),
        ({"metrics": {"port": 70000}}, "metrics.port: expected a port from 0 to 65535"),
        ({"bounces": {"listen_port": -1}}, "bounces.listen_port: expected a port from 0 to 65535"),
        ({"bounces": {"metrics_port": 65536}}, "bounces.metrics_port: expected a port"),
        ({"bounces": {"tick_interval": 0}}, "bounces.tick_interval: expected a number > 0"),
        ({"bounces": {"send_lease_seconds": 0}}, "bounces.send_lease_seconds: expected a number"),
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_setting(
    overrides: dict[str, dict[str, object]], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(environ={}, overrides=overrides)


def test_the_numbers_at_the_edges_of_their_ranges_load() -> None:
    config = load_config(
        environ={},
        overrides={
            "kafka": {
                "max_poll_records": 1,
                "session_timeout_ms": 3000,
                "heartbeat_interval_ms": 1000,  # a third: the demo's
                "commit_interval": 0.001,
            },
            "transport": {
                "max_connections_per_destination": 1,
                "max_messages_per_connection": 1,
                "idle_expiry": 0,
                "mx_cache_ttl": 0,
            },
            "workers": {"count": 0},
            "metrics": {"port": 65535},
        },
    )
    assert config.kafka.max_poll_records == 1 and config.transport.idle_expiry == 0


def test_a_number_out_of_range_fails_eobblast_check_before_anything_is_reached(
    tmp_path: Path,
) -> None:
    # It used to pass `eobblast check`; then every worker of `eobblast run` died in its
    # Kafka client, with a traceback, and was restarted, forever.
    path = tmp_path / "c.toml"
    path.write_text("[kafka]\nmax_poll_records = 0\n")
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: invalid_value: kafka.max_poll_records: expected a whole number >= 1"
    )


def test_mta_sts_fetching_is_on_unless_turned_off() -> None:
    assert load_config(environ={}).protection.mta_sts_fetch is True
    assert load_config(EXAMPLE, environ={}).protection.mta_sts_fetch is True
    off = load_config(environ={"EOBBLAST_PROTECTION__MTA_STS_FETCH": "false"})
    assert off.protection.mta_sts_fetch is False
