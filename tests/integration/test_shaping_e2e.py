"""Issue 6's check: 20,000 messages through a pool of three IPs on warm-up days 0, 5 and 14.

A real sandbox (one MX per provider, each recording the client IP of every message) and a
simulated clock: each simulated hour the driver offers every message still pending; the
shaper sends what the hour's budgets allow and defers the rest (ShapingDeferred), which the
driver re-queues for the next hour, as a worker re-queues a deferred event. Per hour the
receivers' records must show, for every (IP, provider), no more than the cap and, while
demand lasts, exactly the cap: the pool's throughput is the sum of its caps. Every message
arrives exactly once.

The default SendGrid schedule gives 20, 108 and 2,222 an hour on days 0, 5 and 14, split
gmail 40% / yahoo 15% / microsoft 20% / other 25% (rounded down): 2,347 an hour for the
pool. The 20,000 messages are split between the providers in proportion to that, so eight
simulated hours run at the full caps and a ninth delivers the rest. The per-destination
rate limits are raised (shaping data, not code) so the run takes seconds, not hours.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import tomllib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eobblast.config import TransportConfig
from eobblast.errors import DeliveryError
from eobblast.sandbox import Sandbox, SandboxDomain, TestPki, make_test_pki
from eobblast.shaping import (
    BudgetKey,
    BudgetLeaser,
    BudgetStore,
    LeaseRequest,
    Shaper,
    ShapingDeferred,
    hour_bucket,
    loads_pools,
    open_budgets,
)
from eobblast.shaping.settings import default_warmup_text, parse_shaping
from eobblast.transport import Transport

HOUR = 3600.0
DAY = 86_400.0
# Midnight UTC: nine simulated hours stay within one warm-up day.
MIDNIGHT = dt.datetime(2026, 11, 26, tzinfo=dt.UTC).timestamp()
TODAY = dt.date(2026, 11, 26)
POOL = "eob-transactional"
SENDER = "eob-notices@payer.test"
MESSAGE = (
    b"From: eob-notices@payer.test\r\nTo: member\r\nSubject: Your Explanation of Benefits"
    b" is ready\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
)
TOTAL = 20_000

# (address, EHLO name, warm-up day)
IPS = [
    ("127.0.75.10", "mta10.payer.example", 0),
    ("127.0.75.11", "mta11.payer.example", 5),
    ("127.0.75.12", "mta12.payer.example", 14),
]
# Recipient domain -> the provider it stands for (by override: its MX is a 127.x address).
DOMAINS = {
    "gmail.sandbox.test": "gmail",
    "yahoo.sandbox.test": "yahoo",
    "outlook.sandbox.test": "microsoft",
    "other.sandbox.test": "other",
}
# Written out rather than computed by the code under test: floor(day cap x share).
CAPS = {
    0: {"gmail": 8, "yahoo": 3, "microsoft": 4, "other": 5},  # 20 an hour
    5: {"gmail": 43, "yahoo": 16, "microsoft": 21, "other": 27},  # 108 an hour
    14: {"gmail": 888, "yahoo": 333, "microsoft": 444, "other": 555},  # 2,222 an hour
}
FULL_HOURS = 8
# The ninth hour's share, each below the provider's hourly capacity.
REST = {"gmail": 500, "yahoo": 150, "microsoft": 250, "other": 324}
LIMITS = """
[limits.default]
max_connections = 4
messages_per_connection = 1000
messages_per_second = 100000.0
burst = 1000
"""


class SimClock:
    """Simulated epoch time that moves only when the test advances it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        # max_wait is below an hour and nothing pauses here: the shaper never waits.
        raise AssertionError("the shaper waited instead of deferring")

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _capacity(provider: str) -> int:
    return sum(CAPS[day][provider] for _, _, day in IPS)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"), list(DOMAINS))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[BudgetStore]:
    opened = await open_budgets(f"sqlite:///{tmp_path / 'budgets.db'}")
    yield opened
    await opened.close()


async def _seed(store: BudgetStore, address: str, day: int) -> None:
    # An IP past day 0 has sent before: record its warm-up start and a recent send, or its
    # first send here would (rightly) restart its warm-up at day 0.
    before = MIDNIGHT - HOUR
    await store.lease(
        LeaseRequest(
            BudgetKey(address, "seed", hour_bucket(before)),
            cap=1,
            want=1,
            now=before,
            restart_on=TODAY - dt.timedelta(days=day),
            idle_before=before - 30 * DAY,
        )
    )


def _recipients() -> list[str]:
    per_provider = {p: _capacity(p) * FULL_HOURS + REST[p] for p in REST}
    assert sum(per_provider.values()) == TOTAL
    by_provider = {provider: domain for domain, provider in DOMAINS.items()}
    recipients = [
        f"m{i}@{by_provider[provider]}"
        for provider, count in per_provider.items()
        for i in range(count)
    ]
    random.Random(6).shuffle(recipients)
    return recipients


async def _offer(transport: Transport, offered: list[str]) -> list[str]:
    """Offer every message once, 64 at a time; returns those deferred to a later hour."""
    todo = iter(offered)
    deferred: list[str] = []
    failures: list[str] = []

    async def sender() -> None:
        for rcpt in todo:
            try:
                await transport.deliver(SENDER, rcpt, MESSAGE)
            except ShapingDeferred:
                deferred.append(rcpt)  # re-queued for the next hour, never dropped
            except DeliveryError as exc:
                failures.append(str(exc))

    async with asyncio.timeout(120), asyncio.TaskGroup() as group:
        for _ in range(64):
            group.create_task(sender())
    assert failures == []
    return deferred


async def test_twenty_thousand_messages_never_exceed_and_always_use_the_caps(
    tmp_path: Path, pki: TestPki, store: BudgetStore
) -> None:
    members = "".join(
        f'[[pools.{POOL}.ips]]\naddress = "{address}"\nehlo = "{ehlo}"\n'
        f"warmup_start = {TODAY - dt.timedelta(days=day)}\n"
        for address, ehlo, day in IPS
    )
    pools = loads_pools(f'[classes]\neob = "{POOL}"\n{members}')
    head, _, rest = default_warmup_text().partition("\n[limits.default]")
    backoff = rest.partition("\n[backoff]")[2]
    settings = parse_shaping(tomllib.loads(f"{head}\n{LIMITS}\n[backoff]{backoff}"), "test")
    for address, _, day in IPS:
        if day:
            await _seed(store, address, day)
    clock = SimClock(MIDNIGHT)
    shaper = Shaper(
        pools,
        settings,
        BudgetLeaser(store, settings.plan, chunk=25, clock=clock),
        store,
        provider_overrides=DOMAINS,
        max_wait=60.0,
        clock=clock,
        sleep=clock.sleep,
    )
    await shaper.start()
    sandbox_domains = [
        SandboxDomain(name, f"127.0.75.{n}") for n, name in enumerate(DOMAINS, start=1)
    ]
    pending = _recipients()
    hours: list[Counter[tuple[str, str]]] = []
    demand: list[set[str]] = []  # providers with messages left over after each hour
    async with Sandbox(sandbox_domains, tmp_path / "mail", pki) as box:
        routes = {name: f"{host}:{port}" for name, (host, port) in box.routes.items()}
        transport = Transport.from_config(
            TransportConfig(ca_bundle=pki.ca, routes=routes), shaper=shaper
        )
        seen = 0
        try:
            while pending:
                pending = await _offer(transport, pending)
                records = box.received
                hours.append(Counter((r.client_ip, DOMAINS[r.domain]) for r in records[seen:]))
                seen = len(records)
                demand.append({DOMAINS[rcpt.rpartition("@")[2]] for rcpt in pending})
                assert len(hours) <= FULL_HOURS + 1, "ran out of simulated hours"
                clock.advance(HOUR)
        finally:
            await transport.aclose()
            await shaper.aclose()
        records = box.received

    # Nothing lost, nothing twice.
    assert len(records) == TOTAL
    assert sorted(rcpt for r in records for rcpt in r.rcpt_tos) == sorted(_recipients())
    assert len(hours) == FULL_HOURS + 1
    for hour, (counts, left) in enumerate(zip(hours, demand, strict=True)):
        for address, _, day in IPS:
            for provider, cap in CAPS[day].items():
                sent = counts[(address, provider)]
                assert sent <= cap, (hour, address, provider)
                if provider in left:
                    # Messages were waiting: the IP used its whole budget before the hour rolled.
                    assert sent == cap, (hour, address, provider)
    # Eight hours at the sum of the pool's caps, then the rest.
    assert [sum(h.values()) for h in hours] == [2347] * FULL_HOURS + [sum(REST.values())]
    last = hours[FULL_HOURS]
    assert {p: sum(n for (_, q), n in last.items() if q == p) for p in REST} == REST
