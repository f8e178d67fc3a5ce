"""The preflight's pure decisions: which names are placeholders, which store failures
waiting cannot heal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from eobblast.cli import main
from eobblast.config import load_config
from eobblast.errors import ConfigError
from eobblast.preflight import Verdict, placeholder_settings, reserved_name, stores


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "eob.example.com",
        "EOB.Example.NET.",
        "a.b.example.org",
        "payer.example",
        "bounces.eobblast.test",
        "test",
        "wrong-host.sandbox.invalid",
        "localhost",
        "portal.localhost",
        # Special-use names no member or receiver reaches either (RFC 6761, ICANN).
        "eob.payer.local",
        "local",
        "bounces.payerxyz.onion",
        "portal.internal",
        "eob.home.arpa",
        "1.0.0.127.in-addr.arpa",
    ],
)
def test_reserved_names_and_the_names_below_them_are_reserved(host: str) -> None:
    assert reserved_name(host)


@pytest.mark.parametrize(
    "host",
    [
        "eob.acme-health.com",
        "example.co",
        "myexample.com",
        "example.com.au",
        "contest",
        "latest.io",
        "testing.test-payer.com",
        "localhost.acme-health.com",
        "127.0.0.1",
        # .net and .org are not reserved (example.net and example.org are), nor a
        # special-use label anywhere but at the end.
        "eob.acme-health.net",
        "bounces.acme-health.org",
        "local.acme-health.com",
        "internal-payer.com",
        "onion.net",
        "arpa.org",
    ],
)
def test_names_that_only_look_alike_are_not_reserved(host: str) -> None:
    assert not reserved_name(host)


def test_the_defaults_are_placeholders() -> None:
    found = {f.check: f.verdict for f in placeholder_settings(load_config(environ={}))}
    assert found == {
        "portal base_url": Verdict.FAIL,
        "bounces bounce_domain": Verdict.FAIL,
        "shaping pools_file": Verdict.WARN,
    }


def test_a_base_url_without_a_host_is_refused_and_bounces_off_have_no_domain() -> None:
    # The configuration itself refuses it now (PortalConfig), before any check runs.
    with pytest.raises(ConfigError, match=r"portal\.base_url: expected https://HOST"):
        load_config(environ={}, overrides={"portal": {"base_url": "/p/"}})
    config = load_config(
        environ={},
        overrides={
            "portal": {"base_url": "https://eob.acme-health.com/p/"},
            "bounces": {"enabled": False},
        },
    )
    [portal, shaping] = placeholder_settings(config)
    assert (portal.check, portal.verdict) == ("portal base_url", Verdict.OK)
    assert shaping.check == "shaping pools_file"


@pytest.mark.parametrize(
    ("setting", "url"),
    [
        ("ledger", {"url": "postgresql://eob:s3cret%zz@127.0.0.1:1/eob"}),
        ("portal", {"escrow_url": "sqlite:///{tmp}/a-file/escrow.db"}),
    ],
)
def test_store_failures_that_waiting_cannot_heal_are_marked_so(
    setting: str, url: dict[str, str], tmp_path: Path
) -> None:
    # `eobblast run` waits for a PostgreSQL server that does not answer yet; a URL that
    # cannot be parsed or a directory that cannot be written will not get better.
    stores_in = {
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "portal": {
            "escrow_url": f"sqlite:///{tmp_path / 'escrow.db'}",
            "audit_url": f"sqlite:///{tmp_path / 'audit.db'}",
        },
        "bounces": {"store_url": f"sqlite:///{tmp_path / 'bounces.db'}"},
        "shaping": {"budgets_url": f"sqlite:///{tmp_path / 'budgets.db'}"},
    }
    (tmp_path / "a-file").touch()
    stores_in[setting] |= {name: value.format(tmp=tmp_path) for name, value in url.items()}
    found = asyncio.run(stores(load_config(environ={}, overrides=stores_in)))
    [failed] = [f for f in found if f.verdict is Verdict.FAIL]
    assert not failed.may_heal, failed


def test_check_says_it_fails_on_reserved_names_and_warns_of_shaping_off() -> None:
    said = " ".join(CliRunner().invoke(main, ["check", "--help"]).output.split())
    assert "a reserved name" in said and "[portal] base_url" in said
    assert "[bounces] bounce_domain fails" in said
    assert "no [shaping] pools_file (shaping off) is a warning" in said
