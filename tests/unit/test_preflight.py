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
        "transport ehlo_name": Verdict.FAIL,  # eobblast.localhost
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
    [portal, ehlo, shaping] = placeholder_settings(config)
    assert (portal.check, portal.verdict) == ("portal base_url", Verdict.OK)
    assert ehlo.check == "transport ehlo_name"
    assert shaping.check == "shaping pools_file"


# Names of a real deployment everywhere but where a test puts a placeholder.
REAL_NAMES = {
    "portal": {"base_url": "https://eob.acme-health.com/p/"},
    "bounces": {"bounce_domain": "bounces.acme-health.com"},
}


def _ehlo_findings(ehlo_name: str, **shaping: str) -> dict[str, tuple[Verdict, str]]:
    overrides = REAL_NAMES | {"transport": {"ehlo_name": ehlo_name}, "shaping": shaping}
    config = load_config(environ={}, overrides=overrides)
    return {f.check: (f.verdict, f.detail) for f in placeholder_settings(config)}


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("eobblast.localhost", "eobblast.localhost is a reserved name"),  # the default
        ("mta1.payer.example", "mta1.payer.example is a reserved name"),  # the example's
        ("mta.demo-payer.test", "mta.demo-payer.test is a reserved name"),
        ("mta1.payer.local", "mta1.payer.local is a reserved name"),
        ("mta1", "'mta1' is not a fully qualified host name"),
        ("localhost", "'localhost' is not a fully qualified host name"),
        ("mta_1.acme-health.com", "'mta_1.acme-health.com' is not a fully qualified host name"),
        ("192.0.2.10", "'192.0.2.10' is not a fully qualified host name"),
        ("", "'' is not a fully qualified host name"),
    ],
)
def test_an_ehlo_name_receivers_cannot_match_fails(name: str, said: str) -> None:
    # Receivers compare the EHLO name with the sending IP's PTR record: a placeholder or a
    # bare host name gets the mail scored as spam or refused.
    verdict, detail = _ehlo_findings(name)["transport ehlo_name"]
    assert verdict is Verdict.FAIL
    assert detail.startswith(f"{said}: receivers compare the EHLO name")
    assert detail.endswith(
        "Set [transport] ehlo_name to this host's name (the PTR record of its sending IP)"
    )


@pytest.mark.parametrize("name", ["mta1.acme-health.com", "MTA1.Acme-Health.com.", "a.b.c.io"])
def test_a_real_ehlo_name_passes(name: str) -> None:
    assert _ehlo_findings(name)["transport ehlo_name"] == (Verdict.OK, name)


def _pools(path: Path, *ehlo: str) -> Path:
    entries = "".join(
        f'[[pools.p.ips]]\naddress = "192.0.2.{n}"\nehlo = "{name}"\nwarmup_start = "mature"\n'
        for n, name in enumerate(ehlo, start=10)
    )
    path.write_text(f'default_pool = "p"\n{entries}')
    return path


def test_with_shaping_on_each_ips_ehlo_name_is_checked(tmp_path: Path) -> None:
    # Shaped connections greet with their IP's name from the pools file, never with
    # [transport] ehlo_name: a placeholder there is only a warning.
    pools = _pools(tmp_path / "pools.toml", "mta10.acme-health.com", "mta11.payer.example")
    found = _ehlo_findings("eobblast.localhost", pools_file=str(pools))
    verdict, detail = found["transport ehlo_name"]
    assert verdict is Verdict.WARN
    assert detail == (
        "eobblast.localhost is a reserved name: unused while shaping is on (each IP greets"
        " with its pools_file ehlo)"
    )
    verdict, detail = found["shaping pools_file ehlo"]
    assert verdict is Verdict.FAIL
    assert detail.startswith("reserved names: 192.0.2.11 mta11.payer.example: receivers")
    assert "mta10" not in detail

    pools = _pools(tmp_path / "pools.toml", "mta10.acme-health.com", "mta11.acme-health.com")
    found = _ehlo_findings("mta1.acme-health.com", pools_file=str(pools))
    assert found["transport ehlo_name"] == (Verdict.OK, "mta1.acme-health.com")
    assert found["shaping pools_file ehlo"] == (Verdict.OK, "2 IP(s), each with its own name")


def test_a_pools_file_that_does_not_load_skips_its_ehlo_names(tmp_path: Path) -> None:
    # The "shaping pools_file" check says why; its names cannot be read.
    pools = _pools(tmp_path / "pools.toml", "mta10")
    found = _ehlo_findings("mta1.acme-health.com", pools_file=str(pools))
    assert found["shaping pools_file ehlo"] == (Verdict.SKIPPED, f"{pools} does not load")


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
    assert "an EHLO name ([transport] ehlo_name, or with shaping on the pools file's)" in said
    assert "no [shaping] pools_file (shaping off) is a warning" in said
