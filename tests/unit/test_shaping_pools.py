"""IP pools as data: the example file, clear errors, and the pool status snapshot."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from eobblast.errors import ConfigError
from eobblast.shaping import (
    BudgetUsage,
    IpActivity,
    Suspension,
    load_pools,
    load_shaping,
    loads_pools,
    pool_status,
)
from eobblast.shaping.warmup import hour_bucket

EXAMPLE = Path(__file__).parents[2] / "config" / "pools.example.toml"
PLAN = load_shaping().plan
T0 = dt.datetime(2026, 11, 26, 10, 30, tzinfo=dt.UTC).timestamp()

MINIMAL = """
[[pools.main.ips]]
address = "127.0.0.10"
ehlo = "mta10.payer.example"
warmup_start = "mature"
"""


def test_example_pools_load() -> None:
    pools = load_pools(EXAMPLE)
    assert [p.name for p in pools.pools] == ["eob-transactional", "general"]
    eob = pools.pool_for("eob")
    assert eob.name == "eob-transactional"
    assert [ip.address for ip in eob.ips] == ["127.0.0.10", "127.0.0.11", "127.0.0.12"]
    assert eob.ip("127.0.0.10").mature
    assert eob.ip("127.0.0.12").warmup_start == dt.date(2026, 11, 2)
    assert eob.ip("127.0.0.12").ehlo_name == "mta12.payer.example"
    assert pools.pool_for("portal_notice") is eob
    assert pools.pool_for("something-new").name == "general"
    assert len(pools.all_ips()) == 5
    with pytest.raises(KeyError):
        eob.ip("127.0.0.99")


def test_minimal_pools_and_value_forms() -> None:
    text = MINIMAL.replace('"mature"', '"2026-11-02"').replace("127.0.0.10", "::0001")
    pools = loads_pools(text + '\n[classes]\neob = "main"\n')
    source = pools.pool("main").ips[0]
    assert source.address == "::1"  # normalised
    assert source.warmup_start == dt.date(2026, 11, 2)
    assert pools.pool_for("eob").name == "main"
    assert loads_pools(MINIMAL.replace("mta10.payer.example", "MTA10.Payer.Example.")).pool(
        "main"
    ).ips[0].ehlo_name == ("mta10.payer.example")


def test_class_without_pool_and_no_default_is_an_error() -> None:
    pools = loads_pools(MINIMAL)
    with pytest.raises(ConfigError, match="traffic class 'eob' has no pool"):
        pools.pool_for("eob")
    with pytest.raises(ConfigError, match="no IP pool named 'other'"):
        pools.pool("other")


SECOND = """
[[pools.extra.ips]]
address = "127.0.0.10"
ehlo = "mta99.payer.example"
warmup_start = "mature"
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + SECOND, r"127\.0\.0\.10 is already in pool 'main'"),
        (MINIMAL.replace("127.0.0.10", "127.0.0.300"), "is not an IP address"),
        (MINIMAL.replace('"127.0.0.10"', "10"), "expected an IP address string"),
        (MINIMAL.replace("mta10.payer.example", "localhost"), "fully qualified host name"),
        (MINIMAL.replace("mta10.payer.example", "mta_10.payer.example"), "fully qualified"),
        (MINIMAL.replace("mta10.payer.example", "-mta.payer.example"), "fully qualified"),
        (MINIMAL.replace('"mature"', "2026-11-02T09:00:00Z"), "not a date-time"),
        (MINIMAL.replace('"mature"', '"soon"'), "expected a date"),
        (MINIMAL.replace('"mature"', "3"), "expected a date"),
        (MINIMAL.replace('warmup_start = "mature"', ""), "warmup_start: missing"),
        (MINIMAL + "weight = 3\n", "unknown setting.*weight"),
        (MINIMAL + '\n[classes]\neob = "elsewhere"\n', "no pool named 'elsewhere'"),
        ('default_pool = "elsewhere"\n' + MINIMAL, "default_pool: no pool named"),
        ('colour = "blue"\n' + MINIMAL, "unknown setting.*colour"),
        ("[pools.main]\nips = []\n", "non-empty list of IP tables"),
        ("[pools]\n", "no pools defined"),
        ("", "pools: missing"),
        ("pools = 3\n", "expected a table"),
        ("[pools.main", "not valid TOML"),
    ],
)
def test_bad_pools_are_clear_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        loads_pools(text, "pools.toml")


def test_missing_pools_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_pools(tmp_path / "pools.toml")


def test_pool_status_snapshot() -> None:
    pools = load_pools(EXAMPLE)
    hour = hour_bucket(T0)
    usage = [
        BudgetUsage("127.0.0.10", "gmail", hour, used=120, sent=100, deferred=3),
        BudgetUsage("127.0.0.12", "gmail", hour, used=4, sent=4, deferred=0),
        BudgetUsage("127.0.0.10", "gmail", hour - 1, used=999, sent=999, deferred=9),
    ]
    activity = {
        # .12 first sent three days ago, so it is on day 3 (its start date is long past).
        "127.0.0.12": IpActivity(T0 - 600, dt.date(2026, 11, 23)),
        "127.0.0.10": IpActivity(T0 - 60),
    }
    suspensions = {
        ("127.0.0.11", "microsoft"): Suspension(
            "127.0.0.11", "microsoft", T0 + 3600, "5.7.515", T0 - 10
        ),
        ("127.0.0.11", "yahoo"): Suspension("127.0.0.11", "yahoo", T0 - 1, "554", T0 - 99),
    }
    status = pool_status(
        pools, PLAN, now=T0, usage=usage, activity=activity, suspensions=suspensions
    )
    assert [p.name for p in status] == ["eob-transactional", "general"]
    eob = status[0]
    assert eob.hour == hour
    by_ip = {ip.address: ip for ip in eob.ips}
    mature, suspended, warming = by_ip["127.0.0.10"], by_ip["127.0.0.11"], by_ip["127.0.0.12"]
    assert mature.warmup_day is None and not mature.warming
    assert mature.hourly_cap == PLAN.schedule.mature_hourly
    gmail = mature.providers[0]
    assert (gmail.provider, gmail.used, gmail.sent, gmail.deferred) == ("gmail", 120, 100, 3)
    assert mature.last_used == T0 - 60 and not mature.suspended
    assert warming.warmup_day == 3 and warming.warming and warming.hourly_cap == 55
    assert [(p.provider, p.cap) for p in warming.providers] == [
        ("gmail", 22),
        ("yahoo", 8),
        ("microsoft", 11),
        ("other", 13),
    ]
    assert warming.providers[0].sent == 4
    assert suspended.suspended
    states = {p.provider: (p.suspended, p.suspension_code) for p in suspended.providers}
    assert states["microsoft"] == (True, "5.7.515")
    assert states["yahoo"] == (False, None)  # expired
    assert suspended.providers[0].used == 0
    # The general pool's .21 never sent and its start date has passed: day 0 on first send.
    general = {ip.address: ip for ip in status[1].ips}
    assert general["127.0.0.21"].warmup_day == 0
    assert general["127.0.0.21"].hourly_cap == 20
