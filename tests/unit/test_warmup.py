"""Warm-up schedule, provider split, idle reset, IP choice, and the shaping data file."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eobblast.errors import ConfigError
from eobblast.shaping import (
    IpActivity,
    IpBudget,
    IpPool,
    SourceIp,
    WaitReason,
    WaitUntil,
    choose_ip,
    load_shaping,
    loads_shaping,
)
from eobblast.shaping.settings import default_warmup_text
from eobblast.shaping.warmup import NEVER_USED, hour_bucket, hour_start

REPO = Path(__file__).parents[2]
PLAN = load_shaping().plan
DAY = 86_400.0
HOUR = 3_600.0
# Midnight UTC on 2026-11-26: warm-up days and hour buckets both start here.
T0 = dt.datetime(2026, 11, 26, tzinfo=dt.UTC).timestamp()
TODAY = dt.date(2026, 11, 26)


def _ip(start: dt.date | None, address: str = "127.0.0.10") -> SourceIp:
    return SourceIp(address, "mta10.payer.example", start)


def _used(at: float) -> IpActivity:
    return IpActivity(last_used=at)


# --- the schedule data -------------------------------------------------------------------


def test_default_schedule_is_sendgrids_published_table() -> None:
    hourly = PLAN.schedule.hourly
    assert hourly[:13] == (20, 28, 39, 55, 77, 108, 151, 211, 295, 413, 579, 810, 1000)
    assert hourly[20] == 16_734
    assert len(hourly) == 42  # days 0-41
    assert hourly[-1] == 19_601_056
    assert PLAN.schedule.mature_hourly == 19_601_056
    assert PLAN.schedule.idle_reset_days == 30
    # About 1.4x a day after the day-12 rounding to 1,000.
    for before, after in itertools.pairwise(hourly[13:]):
        assert 1.39 < after / before < 1.41


def test_config_copy_matches_the_packaged_default() -> None:
    assert (REPO / "config" / "warmup.toml").read_text(encoding="utf-8") == default_warmup_text()
    assert load_shaping(REPO / "config" / "warmup.toml") == load_shaping()


def test_provider_shares_never_add_up_to_more_than_the_ip_cap() -> None:
    assert sum(rule.share for rule in PLAN.providers.rules) <= 1.0


@given(day=st.integers(min_value=-3, max_value=60))
def test_provider_caps_sum_within_ip_cap(day: int) -> None:
    ip = _ip(TODAY - dt.timedelta(days=day))
    now = T0 + 10 * HOUR
    activity = _used(now - HOUR)
    total = sum(PLAN.hourly_cap(ip, p, now, activity) for p in PLAN.providers.names)
    assert total <= PLAN.ip_hourly_cap(ip, now, activity)


# --- warm-up day and caps ----------------------------------------------------------------


def test_day_zero_caps_split_per_provider() -> None:
    ip = _ip(TODAY)
    assert PLAN.warmup_day(ip, T0, NEVER_USED) == 0
    assert PLAN.ip_hourly_cap(ip, T0, NEVER_USED) == 20
    caps = {p: PLAN.hourly_cap(ip, p, T0, NEVER_USED) for p in PLAN.providers.names}
    assert caps == {"gmail": 8, "yahoo": 3, "microsoft": 4, "other": 5}


def test_days_count_in_utc_calendar_days() -> None:
    ip = _ip(TODAY)
    now = T0 + 5 * DAY + 23 * HOUR
    assert PLAN.warmup_day(ip, now, _used(now - 60)) == 5
    assert PLAN.ip_hourly_cap(ip, now, _used(now - 60)) == 108
    assert PLAN.warmup_day(ip, now + HOUR, _used(now)) == 6


def test_before_the_start_date_the_ip_sends_nothing() -> None:
    ip = _ip(TODAY + dt.timedelta(days=2))
    assert PLAN.warmup_day(ip, T0, NEVER_USED) == -2
    assert PLAN.hourly_cap(ip, "gmail", T0, NEVER_USED) == 0
    assert not PLAN.is_warming(ip, T0, NEVER_USED)


def test_mature_ip_gets_the_mature_cap() -> None:
    ip = _ip(None)
    assert ip.mature
    assert PLAN.warmup_day(ip, T0, NEVER_USED) is None
    assert PLAN.ip_hourly_cap(ip, T0, NEVER_USED) == 19_601_056
    assert not PLAN.is_warming(ip, T0, NEVER_USED)


def test_past_the_table_the_ip_is_mature() -> None:
    ip = _ip(TODAY - dt.timedelta(days=42))
    activity = _used(T0 - HOUR)
    assert PLAN.warmup_day(ip, T0, activity) == 42
    assert not PLAN.is_warming(ip, T0, activity)
    assert PLAN.ip_hourly_cap(ip, T0, activity) == PLAN.schedule.mature_hourly
    assert PLAN.is_warming(ip, T0 - DAY, activity)  # day 41


def test_idle_for_30_days_warms_up_again() -> None:
    ip = _ip(None)
    idle = _used(T0 - 30 * DAY)
    assert PLAN.restart_on(ip, T0, idle) == TODAY
    assert PLAN.warmup_day(ip, T0, idle) == 0
    assert PLAN.hourly_cap(ip, "gmail", T0, idle) == 8
    # Once the store records the restart, the count goes on from it.
    restarted = IpActivity(last_used=T0 + 1, warmup_restart=TODAY)
    assert PLAN.restart_on(ip, T0 + 3 * DAY, restarted) is None
    assert PLAN.warmup_day(ip, T0 + 3 * DAY, restarted) == 3
    assert PLAN.ip_hourly_cap(ip, T0 + 3 * DAY, restarted) == 55


def test_idle_just_under_30_days_keeps_counting() -> None:
    ip = _ip(TODAY - dt.timedelta(days=35))
    activity = _used(T0 - 30 * DAY + 1)
    assert PLAN.restart_on(ip, T0, activity) is None
    assert PLAN.warmup_day(ip, T0, activity) == 35


def test_day_zero_is_the_first_send_when_the_start_date_slipped() -> None:
    # Configured to start 20 days ago, but it never sent: a cold IP must not get day 20.
    ip = _ip(TODAY - dt.timedelta(days=20))
    assert PLAN.restart_on(ip, T0, NEVER_USED) == TODAY
    assert PLAN.warmup_day(ip, T0, NEVER_USED) == 0
    # Starting today and never used: no restart to record, day 0 either way.
    assert PLAN.restart_on(_ip(TODAY), T0, NEVER_USED) is None


def test_a_later_start_date_from_the_operator_restarts_the_warmup() -> None:
    ip = _ip(TODAY - dt.timedelta(days=1))
    activity = IpActivity(last_used=T0 - HOUR, warmup_restart=TODAY - dt.timedelta(days=10))
    assert PLAN.warmup_day(ip, T0, activity) == 1


def test_unknown_provider_gets_the_fallback_share() -> None:
    ip = _ip(TODAY)
    assert PLAN.hourly_cap(ip, "nonesuch", T0, NEVER_USED) == PLAN.hourly_cap(
        ip, "other", T0, NEVER_USED
    )


def test_hour_buckets() -> None:
    assert hour_start(hour_bucket(T0 + 59 * 60)) == T0
    assert hour_bucket(T0 + HOUR) == hour_bucket(T0) + 1


# --- providers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mx", "provider"),
    [
        ("aspmx.l.google.com", "gmail"),
        ("gmail-smtp-in.l.google.com.", "gmail"),
        ("ALT1.ASPMX.L.GOOGLE.COM", "gmail"),
        ("alt2.aspmx.l.googlemail.com", "gmail"),
        ("mta5.am0.yahoodns.net", "yahoo"),
        ("mx-aol.mail.gm0.yahoodns.net", "yahoo"),
        ("payer-example.mail.protection.outlook.com", "microsoft"),
        ("hotmail-com.olc.protection.outlook.com", "microsoft"),
        ("mx1.example.org", "other"),
        ("google.com.evil.example", "other"),
    ],
)
def test_provider_from_mx_host(mx: str, provider: str) -> None:
    assert PLAN.providers.for_mx([mx]) == provider


def test_provider_from_the_most_preferred_matching_mx() -> None:
    assert PLAN.providers.for_mx(["mx.backup.example", "aspmx.l.google.com"]) == "gmail"
    assert PLAN.providers.for_mx([]) == "other"


# --- choose_ip ---------------------------------------------------------------------------

POOL = IpPool(
    "eob-transactional",
    (_ip(None, "127.0.0.10"), _ip(None, "127.0.0.11"), _ip(TODAY, "127.0.0.12")),
)


def _budgets(**by_last_octet: IpBudget) -> dict[tuple[str, str], IpBudget]:
    return {(f"127.0.0.{k.removeprefix('ip')}", "gmail"): v for k, v in by_last_octet.items()}


def test_overflow_goes_to_ips_with_budget_left() -> None:
    budgets = _budgets(
        ip10=IpBudget(cap=1000, remaining=0),
        ip11=IpBudget(cap=1000, remaining=5),
        ip12=IpBudget(cap=8, remaining=0, warming=True),
    )
    assert choose_ip(POOL, "gmail", budgets, T0 + 600) == POOL.ips[1]


def test_warming_ip_behind_pace_goes_first() -> None:
    # 30 minutes into the hour a warming IP that has used 2 of 8 is behind an even pace.
    budgets = _budgets(
        ip10=IpBudget(cap=1000, remaining=1000),
        ip11=IpBudget(cap=1000, remaining=1000),
        ip12=IpBudget(cap=8, remaining=6, warming=True),
    )
    assert choose_ip(POOL, "gmail", budgets, T0 + 1800) == POOL.ips[2]


def test_warming_ip_ahead_of_pace_leaves_the_load_to_mature_ips() -> None:
    budgets = _budgets(
        ip10=IpBudget(cap=1000, remaining=400),
        ip11=IpBudget(cap=1000, remaining=900),
        ip12=IpBudget(cap=8, remaining=2, warming=True),
    )
    # The mature IP with the smaller used fraction takes it.
    assert choose_ip(POOL, "gmail", budgets, T0 + 1800) == POOL.ips[1]


def test_pool_of_only_warming_ips_still_sends_ahead_of_pace() -> None:
    pool = IpPool("new", (_ip(TODAY, "127.0.0.12"),))
    budgets = _budgets(ip12=IpBudget(cap=8, remaining=1, warming=True))
    assert choose_ip(pool, "gmail", budgets, T0 + 10) == pool.ips[0]


def test_spreads_over_equal_ips_by_used_fraction() -> None:
    budgets = _budgets(
        ip10=IpBudget(cap=100, remaining=50),
        ip11=IpBudget(cap=100, remaining=60),
        ip12=IpBudget(cap=8, remaining=0, warming=True),
    )
    assert choose_ip(POOL, "gmail", budgets, T0) == POOL.ips[1]


def test_everything_spent_waits_for_the_next_hour() -> None:
    budgets = _budgets(
        ip10=IpBudget(cap=100, remaining=0),
        ip11=IpBudget(cap=0, remaining=0),
        ip12=IpBudget(cap=8, remaining=0, warming=True),
    )
    assert choose_ip(POOL, "gmail", budgets, T0 + 125) == WaitUntil(T0 + HOUR, WaitReason.BUDGET)


def test_paused_ips_wait_for_the_earliest_pause_end() -> None:
    budgets = _budgets(
        ip10=IpBudget(cap=100, remaining=10, not_before=T0 + 300),
        ip11=IpBudget(cap=100, remaining=10, not_before=T0 + 200),
        ip12=IpBudget(cap=8, remaining=0, warming=True),
    )
    assert choose_ip(POOL, "gmail", budgets, T0 + 100) == WaitUntil(T0 + 200, WaitReason.PAUSED)


def test_a_pause_ending_this_hour_does_not_help_an_ip_without_budget() -> None:
    budgets = _budgets(
        ip10=IpBudget(cap=100, remaining=0, not_before=T0 + 200),
        ip11=IpBudget(cap=100, remaining=0),
        ip12=IpBudget(cap=8, remaining=0, warming=True),
    )
    assert choose_ip(POOL, "gmail", budgets, T0 + 100) == WaitUntil(T0 + HOUR, WaitReason.PAUSED)


def test_suspended_ips_are_skipped_and_named_in_the_wait() -> None:
    budgets = _budgets(
        ip10=IpBudget(cap=100, remaining=10, not_before=T0 + DAY, suspended=True),
        ip11=IpBudget(cap=100, remaining=10, not_before=T0 + DAY, suspended=True),
        ip12=IpBudget(cap=8, remaining=0, warming=True),
    )
    assert choose_ip(POOL, "gmail", budgets, T0) == WaitUntil(T0 + HOUR, WaitReason.BUDGET)
    budgets[("127.0.0.12", "gmail")] = IpBudget(cap=8, remaining=8, warming=True)
    assert choose_ip(POOL, "gmail", budgets, T0) == POOL.ips[2]
    budgets[("127.0.0.12", "gmail")] = IpBudget(cap=8, remaining=8, not_before=T0 + DAY)
    assert choose_ip(POOL, "gmail", budgets, T0) == WaitUntil(T0 + DAY, WaitReason.SUSPENDED)


def test_a_pause_that_has_ended_is_ignored() -> None:
    budgets = _budgets(
        ip10=IpBudget(cap=100, remaining=10, not_before=T0 - 1),
        ip11=IpBudget(cap=100, remaining=0),
        ip12=IpBudget(cap=8, remaining=0, warming=True),
    )
    assert choose_ip(POOL, "gmail", budgets, T0) == POOL.ips[0]


@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 50), st.booleans(), st.integers(-100, 4000)),
        min_size=3,
        max_size=3,
    ),
    st.integers(0, 3599),
)
def test_choice_is_never_an_ip_without_budget_or_before_its_time(
    rows: list[tuple[int, int, bool, int]], offset: int
) -> None:
    now = T0 + offset
    budgets = {
        (ip.address, "gmail"): IpBudget(cap, min(left, cap), warming, T0 + not_before)
        for ip, (cap, left, warming, not_before) in zip(POOL.ips, rows, strict=True)
    }
    choice = choose_ip(POOL, "gmail", budgets, now)
    if isinstance(choice, WaitUntil):
        assert choice.at > now
        assert all(b.remaining <= 0 or b.cap <= 0 or b.not_before > now for b in budgets.values())
    else:
        chosen = budgets[(choice.address, "gmail")]
        assert chosen.remaining > 0 and chosen.not_before <= now


# --- the data file: clear errors ---------------------------------------------------------


def _shaping(edit: str, replacement: str) -> str:
    text = default_warmup_text()
    assert edit in text
    return text.replace(edit, replacement, 1)


@pytest.mark.parametrize(
    ("edit", "replacement", "message"),
    [
        ("share = 0.25", "share = 0.75", "shares add up to"),
        ("share = 0.40", "share = 0", "must be greater than 0"),
        ("20, 28, 39,", "20, 28, 9,", "day 2 .9. is below day 1"),
        ("20, 28, 39,", "0, 28, 39,", "at least 1"),
        ("idle_reset_days = 30", "idle_reset_days = 0", "idle_reset_days: must be at least 1"),
        ("idle_reset_days = 30", "idle_reset_days = 30\nidle_reset_dayz = 3", "idle_reset_dayz"),
        ('fallback = "other"', 'fallback = "rest"', "no provider table named 'rest'"),
        ("[providers.other]\n", '[providers.other]\nmx = ["*.example"]\n', "takes no mx"),
        ('mx = ["*.yahoodns.net"]', 'mx = ["*.YahooDNS.net"]', "lower-case host pattern"),
        ("[limits.yahoo]", "[limits.aol]", "no provider named 'aol'"),
        ("messages_per_second = 5.0", "messages_per_second = 0", "greater than 0"),
        ("max_connections = 4\nmessages", "max_connections = 'four'\nmessages", "an integer"),
        ("[backoff]", "[speed]\n[backoff]", "unknown section"),
        ("decrease_factor = 0.5", "decrease_factor = 1.0", "at most 0.99"),
        ("max_pause_seconds = 900", "max_pause_seconds = 30", "at least pause_seconds"),
        ("slow_down_codes = [421]", "slow_down_codes = [250]", "400-599"),
        ('"5.7.515",', '"5.7",', "not an enhanced status code"),
        ("mature_hourly = 19_601_056", "", "mature_hourly: missing"),
        ("hourly = [", "hourly = 3\nold = [", "a list of integers"),
    ],
)
def test_bad_shaping_data_is_a_clear_config_error(
    edit: str, replacement: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        loads_shaping(_shaping(edit, replacement), "warmup.toml")


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        loads_shaping("[warmup", "warmup.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_shaping(tmp_path / "absent.toml")


def test_limits_fill_missing_keys_from_default() -> None:
    limits = load_shaping().limits
    assert limits.for_provider("gmail").max_connections == 8
    assert limits.for_provider("gmail").messages_per_connection == 100  # from default
    assert limits.for_provider("other") == limits.default
    assert limits.for_provider("yahoo").messages_per_connection == 20
