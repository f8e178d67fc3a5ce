"""Shared budgets: the same behaviour from SQLite and from PostgreSQL (the machine's server)."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from eobblast.errors import ConfigError
from eobblast.shaping import (
    BudgetKey,
    BudgetLeaser,
    BudgetStore,
    IpActivity,
    LeaseRequest,
    ProviderRule,
    Providers,
    SourceIp,
    WarmupPlan,
    WarmupSchedule,
    hour_bucket,
    load_pools,
    open_budgets,
    read_pool_status,
)
from eobblast.shaping.cli import pools

HOUR = 3600.0
DAY = 86_400.0
# 10:00 UTC on 2026-11-26; the clock is injected everywhere, no assertion depends on timing.
T0 = dt.datetime(2026, 11, 26, 10, tzinfo=dt.UTC).timestamp()
TODAY = dt.date(2026, 11, 26)

# Day 0: 100 an hour, day 1: 200, then mature at 1000; two providers with half each.
PLAN = WarmupPlan(
    WarmupSchedule(hourly=(100, 200), mature_hourly=1000, idle_reset_days=30),
    Providers(
        (ProviderRule("gmail", ("*.google.com",), 0.5), ProviderRule("other", (), 0.5)), "other"
    ),
)


class Clock:
    """A settable clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def budgets_url(store_url: str) -> str:
    return store_url


@pytest.fixture
async def store(budgets_url: str) -> AsyncIterator[BudgetStore]:
    opened = await open_budgets(budgets_url)
    yield opened
    await opened.close()


_ADDRESSES = itertools.count(1)


def _ip() -> SourceIp:
    """A warming IP that no other test uses (the PostgreSQL schema is shared by the module)."""
    return SourceIp(f"2001:db8::{next(_ADDRESSES):x}", "mta.payer.example", TODAY)


async def _drain(leaser: BudgetLeaser, ip: SourceIp, provider: str = "other") -> int:
    taken = 0
    while await leaser.acquire(ip, provider):
        taken += 1
    return taken


async def test_a_leaser_takes_exactly_the_cap_in_chunks(store: BudgetStore) -> None:
    ip = _ip()
    leaser = BudgetLeaser(store, PLAN, chunk=7, clock=Clock(T0))
    assert await _drain(leaser, ip) == 50  # day 0: 100 an hour, half to "other"
    [row] = [u for u in await store.usage(hour_bucket(T0)) if u.ip == ip.address]
    assert row.used == 50
    await leaser.close()
    [row] = [u for u in await store.usage(hour_bucket(T0)) if u.ip == ip.address]
    assert (row.used, row.sent) == (50, 50)


async def test_chunks_are_small_next_to_the_cap(store: BudgetStore) -> None:
    ip = _ip()
    leaser = BudgetLeaser(store, PLAN, chunk=50, spread=10, clock=Clock(T0))
    assert await leaser.acquire(ip, "other")
    [row] = [u for u in await store.usage(hour_bucket(T0)) if u.ip == ip.address]
    assert row.used == 5  # cap 50 / spread 10, not the chunk of 50
    budget = leaser.ip_budget(ip, "other")
    assert (budget.cap, budget.remaining, budget.warming) == (50, 49, True)
    await leaser.close()
    [row] = [u for u in await store.usage(hour_bucket(T0)) if u.ip == ip.address]
    assert (row.used, row.sent) == (1, 1)  # unspent units went back


async def test_a_restart_mid_hour_continues_the_count(store: BudgetStore) -> None:
    ip = _ip()
    clock = Clock(T0)
    first = BudgetLeaser(store, PLAN, chunk=4, clock=clock)
    for _ in range(30):
        assert await first.acquire(ip, "other")
    await first.close()
    clock.now += 1200
    second = BudgetLeaser(store, PLAN, chunk=4, clock=clock)
    assert await _drain(second, ip) == 20
    await second.close()


async def test_a_crashed_worker_can_only_make_the_cap_stricter(store: BudgetStore) -> None:
    ip = _ip()
    clock = Clock(T0)
    crashed = BudgetLeaser(store, PLAN, chunk=5, clock=clock)
    for _ in range(11):  # leases 15, spends 11, never closes
        assert await crashed.acquire(ip, "other")
    survivor = BudgetLeaser(store, PLAN, chunk=5, clock=clock)
    assert await _drain(survivor, ip) == 35  # the 4 parked units are lost for this hour only
    clock.now += HOUR
    assert await _drain(survivor, ip) == 50
    await survivor.close()


async def test_a_new_hour_starts_fresh_and_old_units_are_not_carried(store: BudgetStore) -> None:
    ip = _ip()
    clock = Clock(T0 + HOUR - 1)
    leaser = BudgetLeaser(store, PLAN, chunk=7, clock=clock)
    assert await leaser.acquire(ip, "other")  # leases 5 in the 10:00 hour
    clock.now = T0 + HOUR
    assert await _drain(leaser, ip) == 50  # 11:00 has its own full cap
    await leaser.close()
    rows = {u.hour: u for u in await store.usage(hour_bucket(T0)) if u.ip == ip.address}
    assert (rows[hour_bucket(T0)].used, rows[hour_bucket(T0)].sent) == (1, 1)
    rows = {u.hour: u for u in await store.usage(hour_bucket(T0 + HOUR)) if u.ip == ip.address}
    assert rows[hour_bucket(T0 + HOUR)].used == 50


async def test_the_next_day_raises_the_cap(store: BudgetStore) -> None:
    ip = _ip()
    clock = Clock(T0)
    leaser = BudgetLeaser(store, PLAN, chunk=20, clock=clock)
    assert await _drain(leaser, ip) == 50
    clock.now += DAY
    assert await _drain(leaser, ip) == 100  # day 1: 200 an hour, half to "other"
    clock.now += DAY
    assert await _drain(leaser, ip, "gmail") == 500  # past the table: mature
    await leaser.close()


async def test_providers_have_separate_counters(store: BudgetStore) -> None:
    ip = _ip()
    leaser = BudgetLeaser(store, PLAN, chunk=20, clock=Clock(T0))
    assert await _drain(leaser, ip, "gmail") == 50
    assert await _drain(leaser, ip, "other") == 50
    await leaser.close()


async def test_an_ip_idle_for_30_days_warms_up_again(store: BudgetStore) -> None:
    ip = SourceIp(_ip().address, "mta.payer.example", None)  # configured mature
    clock = Clock(T0 - 40 * DAY)
    leaser = BudgetLeaser(store, PLAN, chunk=100, clock=clock)
    assert await leaser.acquire(ip, "other")
    await leaser.close()
    clock.now = T0
    later = BudgetLeaser(store, PLAN, chunk=100, clock=clock)
    assert await _drain(later, ip) == 50  # day 0 again, not the mature 500
    activity = await store.activity(ip.address)
    assert activity == IpActivity(T0, TODAY)
    clock.now = T0 + DAY
    assert await _drain(later, ip) == 100  # day 1, counted from the recorded restart
    await later.close()


async def test_refreshed_activity_informs_the_budget_hint(store: BudgetStore) -> None:
    ip = SourceIp(_ip().address, "mta.payer.example", None)
    clock = Clock(T0 - 40 * DAY)
    old = BudgetLeaser(store, PLAN, clock=clock)
    assert await old.acquire(ip, "other")
    await old.close()
    clock.now = T0
    fresh = BudgetLeaser(store, PLAN, clock=clock)
    assert fresh.ip_budget(ip, "other").cap == 500  # knows nothing yet: the configured maturity
    await fresh.refresh_activity()
    assert fresh.ip_budget(ip, "other").cap == 50  # idle 40 days: day 0 again


async def test_a_stale_view_cannot_reset_a_busy_ip(store: BudgetStore) -> None:
    ip = _ip()
    key = BudgetKey(ip.address, "other", hour_bucket(T0))
    await store.lease(LeaseRequest(key, cap=50, want=1, now=T0 - 60))
    lease = await store.lease(
        LeaseRequest(key, cap=50, want=1, now=T0, restart_on=TODAY, idle_before=T0 - 30 * DAY)
    )
    assert lease.activity == IpActivity(T0, None)


async def test_suspension_is_shared_and_operator_resume_lifts_it(store: BudgetStore) -> None:
    ip = _ip()
    clock = Clock(T0)
    worker_a = BudgetLeaser(store, PLAN, chunk=1, clock=clock)
    worker_b = BudgetLeaser(store, PLAN, chunk=1, clock=clock)
    assert await worker_b.acquire(ip, "gmail")
    await store.suspend(ip.address, "gmail", until=T0 + DAY, code="5.7.515", now=T0)
    assert not await worker_b.acquire(ip, "gmail")
    assert await worker_b.acquire(ip, "other")  # only that provider
    budget = worker_b.ip_budget(ip, "gmail")
    assert budget.suspended and budget.not_before == T0 + DAY
    assert not await worker_a.acquire(ip, "gmail")
    suspensions = await store.suspensions(T0)
    assert suspensions[(ip.address, "gmail")].code == "5.7.515"
    await store.resume(ip.address, "gmail")
    assert await worker_a.sync_suspensions() == {
        k: s.until for k, s in (await store.suspensions(T0)).items()
    }
    assert not worker_a.ip_budget(ip, "gmail").suspended
    assert await worker_a.acquire(ip, "gmail")
    await worker_a.close()
    await worker_b.close()


async def test_deferrals_and_sends_reach_the_status(store: BudgetStore) -> None:
    pools = load_pools(Path(__file__).parents[2] / "config" / "pools.example.toml")
    ip = pools.pool("eob-transactional").ip("127.0.0.12")
    clock = Clock(T0)
    leaser = BudgetLeaser(store, PLAN, chunk=10, clock=clock)
    for _ in range(3):
        assert await leaser.acquire(ip, "gmail")
    leaser.note_deferred(ip.address, "gmail")
    await leaser.flush()
    status = await read_pool_status(store, pools, PLAN, T0)
    warming = {i.address: i for i in status[0].ips}["127.0.0.12"]
    gmail = {p.provider: p for p in warming.providers}["gmail"]
    assert (gmail.sent, gmail.deferred, gmail.used) == (3, 1, 5)
    assert warming.warmup_day == 0 and warming.last_used == T0
    await leaser.close()


async def test_prune_drops_old_hours(store: BudgetStore) -> None:
    ip = _ip()
    clock = Clock(T0 - 5 * HOUR)
    leaser = BudgetLeaser(store, PLAN, clock=clock)
    assert await leaser.acquire(ip, "other")
    await leaser.close()
    await store.suspend(ip.address, "other", until=T0 - 1, code="554", now=T0 - 10)
    await store.prune(hour_bucket(T0), T0)
    assert not [u for u in await store.usage(hour_bucket(T0 - 5 * HOUR)) if u.ip == ip.address]
    assert (ip.address, "other") not in await store.suspensions(T0 - 5)


LEASE_SCRIPT = """
import asyncio, datetime as dt, sys, time
from eobblast.shaping import (BudgetLeaser, ProviderRule, Providers, SourceIp, WarmupPlan,
                              WarmupSchedule, open_budgets)
async def main():
    url, address, now = sys.argv[1], sys.argv[2], float(sys.argv[3])
    only = Providers((ProviderRule("other", (), 1.0),), "other")
    plan = WarmupPlan(WarmupSchedule((2000,), 2000, 30), only)
    ip = SourceIp(address, "mta.payer.example", dt.date(2026, 11, 26))
    store = await open_budgets(url)
    leaser = BudgetLeaser(store, plan, chunk=3, spread=1, clock=lambda: now)
    print("ready", flush=True)
    sys.stdin.readline()  # start together, so the leases really interleave
    taken = 0
    while await leaser.acquire(ip, "other"):
        taken += 1
        time.sleep(0.0001)  # the send: without it one process can finish before the other wakes
    await leaser.close()
    await store.close()
    print(taken)
asyncio.run(main())
"""


def test_processes_never_exceed_the_cap_together(budgets_url: str) -> None:
    # Two worker processes drain one (ip, provider, hour) at once, three units per lease.
    address = f"shared-{uuid.uuid4().hex[:8]}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LEASE_SCRIPT, budgets_url, address, str(T0)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    taken = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(taken) == 2000  # the whole cap and not one more
    assert min(taken) > 0  # both really leased from the same counter


async def test_bad_url_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="sqlite:///"):
        await open_budgets("mysql://x")


def _shaping_config(tmp_path: Path, budgets_url: str, *addresses: str) -> Path:
    """An eobblast configuration whose pools file holds `addresses`, and its budget store."""
    pools = tmp_path / "pools.toml"
    pools.write_text(
        'default_pool = "p"\n'
        + "".join(
            f'[[pools.p.ips]]\naddress = "{address}"\nehlo = "mta{n}.acme-health.com"\n'
            'warmup_start = "mature"\n'
            for n, address in enumerate(addresses)
        )
    )
    config = tmp_path / "eobblast.toml"
    config.write_text(f'[shaping]\npools_file = "{pools}"\nbudgets_url = "{budgets_url}"\n')
    return config


async def test_pools_resume_lifts_a_suspension_from_the_command_line(
    store: BudgetStore, budgets_url: str, tmp_path: Path
) -> None:
    # The operator's way out of a block (config/warmup.toml: "until an operator resumes it").
    ip = _ip()
    now = dt.datetime.now(dt.UTC).timestamp()
    await store.suspend(ip.address, "gmail", until=now + DAY, code="5.7.515", now=now)
    await store.suspend(ip.address, "yahoo", until=now + DAY, code="5.7.1", now=now)
    config = _shaping_config(tmp_path, budgets_url, ip.address)
    runner = CliRunner()

    def resume(*extra: str) -> Result:
        args = ["resume", "--config", str(config), "--ip", ip.address, *extra]
        return runner.invoke(pools, args)

    lifted = await asyncio.to_thread(resume, "--provider", "gmail")
    assert lifted.exit_code == 0, lifted.output
    assert "suspension for gmail lifted" in lifted.output and "5.7.515" in lifted.output
    assert set(await store.suspensions(now)) == {(ip.address, "yahoo")}
    again = await asyncio.to_thread(resume, "--provider", "gmail")
    assert again.exit_code != 0 and "is not suspended for gmail" in again.output
    every = await asyncio.to_thread(resume)
    assert every.exit_code == 0 and "yahoo" in every.output
    assert (ip.address, "yahoo") not in await store.suspensions(now)


def test_pools_commands_never_create_a_budget_store(tmp_path: Path) -> None:
    # A mistyped budgets_url must not read as a healthy, empty store.
    missing = tmp_path / "nowhere" / "budgets.db"
    config = _shaping_config(tmp_path, f"sqlite:///{missing}", "192.0.2.1")
    result = CliRunner().invoke(pools, ["resume", "--config", str(config), "--ip", "192.0.2.1"])
    assert result.exit_code != 0
    assert "no budget store at" in result.output
    assert not missing.parent.exists()


async def test_pools_resume_of_an_ip_in_no_pool_says_so(
    store: BudgetStore, budgets_url: str, tmp_path: Path
) -> None:
    # "not suspended" would read as an IP that is sending: a typo is said as one, before
    # the store is asked.
    ip = _ip()
    config = _shaping_config(tmp_path, budgets_url, ip.address)
    runner = CliRunner()
    args = ["resume", "--config", str(config), "--ip"]
    other = await asyncio.to_thread(runner.invoke, pools, [*args, "10.9.9.9"])
    assert other.exit_code == 1
    assert other.output == (
        f"Error: invalid_value: 10.9.9.9 is not a configured IP: it is in no pool of"
        f" {tmp_path / 'pools.toml'}\n"
    )
    # Written otherwise, the same address is the configured IP.
    written = await asyncio.to_thread(runner.invoke, pools, [*args, ip.address.upper()])
    assert written.exit_code == 1 and written.output == f"Error: {ip.address} is not suspended\n"
    wrong = await asyncio.to_thread(runner.invoke, pools, [*args, "mta1.acme-health.com"])
    assert wrong.exit_code == 2 and "'mta1.acme-health.com' is not an IP address" in wrong.output


def test_pools_resume_without_shaping_says_shaping_is_off(tmp_path: Path) -> None:
    config = tmp_path / "eobblast.toml"
    config.write_text(f'[shaping]\nbudgets_url = "sqlite:///{tmp_path / "b.db"}"\n')
    result = CliRunner().invoke(pools, ["resume", "--config", str(config), "--ip", "192.0.2.1"])
    assert result.exit_code == 1
    assert "shaping is off: the configuration names no [shaping] pools_file" in result.output
