"""The preflight's pure decisions: which names are placeholders."""

from __future__ import annotations

import pytest

from eobblast.config import load_config
from eobblast.preflight import Verdict, placeholder_settings, reserved_name


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


def test_a_base_url_without_a_host_fails_and_bounces_off_have_no_domain() -> None:
    config = load_config(
        environ={},
        overrides={"portal": {"base_url": "/p/"}, "bounces": {"enabled": False}},
    )
    [portal, _] = placeholder_settings(config)
    assert (portal.check, portal.verdict) == ("portal base_url", Verdict.FAIL)
    assert portal.detail.startswith("/p/ has no host name")
