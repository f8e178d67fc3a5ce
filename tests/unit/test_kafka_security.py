"""`[kafka]` security settings: what is refused at load, and the clients' TLS and SASL options."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import pytest

from eobblast.config import load_config
from eobblast.errors import ConfigError
from eobblast.sandbox import make_test_pki
from eobblast.streams.kafka import (
    PLAINTEXT,
    KafkaSecurity,
    connect_error_text,
    kafka_security,
    unprotected_brokers,
)


def _kafka(environ: dict[str, str] | None = None, **kafka: Any) -> Any:
    return load_config(environ=environ or {}, overrides={"kafka": kafka}).kafka


def test_plaintext_is_the_default_and_asks_for_nothing() -> None:
    settings = _kafka()
    assert settings.security_protocol == "PLAINTEXT"
    assert kafka_security(settings) == PLAINTEXT
    assert PLAINTEXT.options() == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize(
    ("kafka", "message"),
    [
        ({"security_protocol": "TLS"}, r"kafka\.security_protocol: expected one of PLAINTEXT"),
        # A CA set but TLS not asked for: the operator meant TLS; never send in the clear.
        ({"ssl_ca_file": "/ca.pem"}, r"kafka\.ssl_\*: set, but kafka\.security_protocol is"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "ssl_ca_file": "/ca.pem"},
            r"kafka\.ssl_\*: set",
        ),
        (
            {"security_protocol": "SSL", "ssl_key_file": "/k.pem"},
            r"kafka\.ssl_key_file: needs kafka\.ssl_cert_file",
        ),
        ({"sasl_username": "eob"}, r"kafka\.sasl_\*: set, but kafka\.security_protocol"),
        (
            {"security_protocol": "SSL", "sasl_mechanism": "PLAIN"},
            r"kafka\.sasl_\*: set, but kafka\.security_protocol is SSL",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"},
            r"kafka\.sasl_mechanism: expected one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"},
            r"needs kafka\.sasl_username and kafka\.sasl_password_file",
        ),
        (
            {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_password_file": "/p",
            },
            r"needs kafka\.sasl_username",
        ),
    ],
)
def test_settings_that_do_not_fit_together_are_refused(kafka: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _kafka(**kafka)


def test_tls_context_verifies_the_brokers(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", ["127.0.0.1"])
    security = kafka_security(_kafka(security_protocol="SSL", ssl_ca_file=str(pki.ca)))
    context = security.ssl_context
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [ca["subject"] for ca in context.get_ca_certs()] == [
        ca["subject"] for ca in ssl.create_default_context(cafile=pki.ca).get_ca_certs()
    ]
    assert security.options() == {"security_protocol": "SSL", "ssl_context": context}
    assert not unprotected_brokers("kafka-1.example.org:9093", security)


def test_settings_come_from_the_environment_too(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", ["127.0.0.1"])
    settings = _kafka(
        {
            "EOBBLAST_KAFKA__SECURITY_PROTOCOL": "SSL",
            "EOBBLAST_KAFKA__SSL_CA_FILE": str(pki.ca),
        }
    )
    assert settings.security_protocol == "SSL" and settings.ssl_ca_file == pki.ca


def test_files_that_cannot_be_loaded_name_their_setting(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", ["127.0.0.1"])
    with pytest.raises(ConfigError, match=r"kafka\.ssl_ca_file: cannot be loaded"):
        kafka_security(_kafka(security_protocol="SSL", ssl_ca_file=str(tmp_path / "none.pem")))
    # A key that is not the certificate's.
    with pytest.raises(ConfigError, match=r"kafka\.ssl_cert_file/ssl_key_file: cannot be loaded"):
        kafka_security(
            _kafka(
                security_protocol="SSL",
                ssl_cert_file=str(pki.server_cert),
                ssl_key_file=str(pki.untrusted_key),
            )
        )


def _sasl(tmp_path: Path, password_text: str | None) -> Any:
    secret = tmp_path / "kafka-password"
    if password_text is not None:
        secret.write_text(password_text)
    return _kafka(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="eobblast",
        sasl_password_file=str(secret),
    )


def test_sasl_login_reads_the_first_line_of_its_password_file(tmp_path: Path) -> None:
    security = kafka_security(_sasl(tmp_path, "s3cret pass\nignored\n"))
    assert security.options() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "eobblast",
        "sasl_plain_password": "s3cret pass",
    }
    assert security.ssl_context is None
    assert "s3cret" not in repr(security)
    # A login without TLS sends the events in the clear all the same.
    assert unprotected_brokers("kafka-1.example.org:9092", security)


@pytest.mark.parametrize(
    ("text", "message"), [(None, "cannot be read"), ("", "is empty"), ("\nx\n", "is empty")]
)
def test_a_missing_or_empty_password_file_is_refused(
    tmp_path: Path, text: str | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=rf"kafka\.sasl_password_file: {message}"):
        kafka_security(_sasl(tmp_path, text))


@pytest.mark.parametrize(
    ("bootstrap", "exposed"),
    [
        ("127.0.0.1:9092", False),
        ("localhost:9092,127.0.0.2:9093", False),
        ("[::1]:9092", False),
        ("kafka:9092", True),
        ("127.0.0.1:9092,10.0.0.5:9092", True),
        ("192.168.1.10:9092", True),
    ],
)
def test_unprotected_brokers_are_those_past_loopback_without_tls(
    bootstrap: str, exposed: bool
) -> None:
    assert unprotected_brokers(bootstrap, PLAINTEXT) is exposed
    tls = KafkaSecurity("SSL", ssl.create_default_context())
    assert not unprotected_brokers(bootstrap, tls)


def test_protocol_and_mechanism_are_read_in_either_case(tmp_path: Path) -> None:
    settings = _kafka(
        security_protocol="sasl_ssl",
        sasl_mechanism="scram-sha-256",
        sasl_username="eob",
        sasl_password_file=str(tmp_path / "p"),
    )
    assert (settings.security_protocol, settings.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-256")


def test_commands_warn_when_events_would_cross_a_network_unencrypted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from eobblast.cli import _kafka_security

    with caplog.at_level(logging.WARNING, logger="eobblast.cli"):
        _kafka_security(load_config(environ={}, overrides={"kafka": {"bootstrap": "kafka:9092"}}))
    assert [r.getMessage() for r in caplog.records] == [
        "Kafka traffic is not encrypted: events carry PHI (and a SASL PLAIN login its password);"
        " set kafka.security_protocol to SSL or SASL_SSL for brokers on another machine"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eobblast.cli"):
        _kafka_security(load_config(environ={}))  # 127.0.0.1:9092
    assert not caplog.records


def test_run_stops_at_start_naming_a_file_it_cannot_load(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from eobblast.cli import main

    config = tmp_path / "eobblast.toml"
    missing = tmp_path / "kafka-ca.pem"
    config.write_text(f'[kafka]\nsecurity_protocol = "SSL"\nssl_ca_file = "{missing}"\n')
    result = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 1
    assert "kafka.ssl_ca_file: cannot be loaded (FileNotFoundError" in result.output
    assert "Traceback" not in result.output


def test_a_bootstrap_that_is_not_host_port_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap: bootstrap entry 'kafka' is not"):
        _kafka(bootstrap="kafka")
    assert _kafka(bootstrap="k1:9093, [::1]:9093").bootstrap == "k1:9093, [::1]:9093"


def test_a_password_file_others_may_read_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _sasl(tmp_path, "secret\n")
    assert settings.sasl_password_file is not None
    settings.sasl_password_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="eobblast.streams"):
        kafka_security(settings)
    assert [r.getMessage() for r in caplog.records] == [
        "kafka.sasl_password_file may be read by others than its owner: chmod 600"
    ]
    caplog.clear()
    settings.sasl_password_file.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="eobblast.streams"):
        kafka_security(settings)
    assert not caplog.records


def test_a_refused_scram_login_is_named_as_such(tmp_path: Path) -> None:
    # aiokafka's SCRAM client fails on the server's refusal with KeyError('v').
    sasl = kafka_security(_sasl(tmp_path, "secret"))
    assert connect_error_text(KeyError("v"), sasl) == "KeyError: SASL login refused"
    assert connect_error_text(KeyError("v"), PLAINTEXT) == "KeyError: 'v'"
    assert connect_error_text(OSError("refused"), sasl) == "OSError: refused"
