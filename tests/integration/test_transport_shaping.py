"""Shaped delivery over real sockets: pool IPs and EHLO names, pushback, blocks, shared caps.

Receivers are the project's sandbox (it records each message's client IP and EHLO name) and,
where a test needs replies the sandbox does not give (Gmail's 421 4.7.28, block wording),
a small aiosmtpd receiver running on the test's own event loop. Time is a simulated clock
that moves only when a test moves it; no assertion depends on how long anything took.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import sys
import tomllib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from click.testing import CliRunner

from eobblast.config import TransportConfig, load_config
from eobblast.errors import ConfigError, DeliveryError
from eobblast.observe.metrics import REGISTRY
from eobblast.sandbox import Sandbox, SandboxDomain, TestPki, make_test_pki
from eobblast.shaping import (
    BudgetKey,
    BudgetLeaser,
    BudgetStore,
    LeaseRequest,
    PoolConfig,
    ReplySignal,
    Shaper,
    ShapingConfig,
    ShapingDeferred,
    ShapingSettings,
    hour_bucket,
    loads_pools,
    open_budgets,
)
from eobblast.shaping.cli import pools
from eobblast.shaping.settings import default_warmup_text, parse_shaping
from eobblast.transport import Transport
from tests.conftest import splice

HOUR = 3600.0
DAY = 86_400.0
# 10:00 UTC: a whole hour bucket ahead, and the warm-up day is today's.
T0 = dt.datetime(2026, 11, 26, 10, tzinfo=dt.UTC).timestamp()
TODAY = dt.date(2026, 11, 26)
SENDER = "eob-notices@payer.test"
MESSAGE = (
    b"From: eob-notices@payer.test\r\nTo: member\r\nSubject: Your Explanation of Benefits"
    b" is ready\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
)
# Limits that never bind in real time: these tests are about budgets, backoff and IPs.
FAST_LIMITS = """
[limits.default]
max_connections = 2
messages_per_connection = 100
messages_per_second = 1000.0
burst = 50
"""
PUSHBACK_421 = (
    "421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating "
    "from your IP address. To protect our users from spam, mail sent from your IP address "
    "has been temporarily rate limited."
)


class SimClock:
    """Simulated epoch time: moves only when the test advances it; sleepers wake then."""

    def __init__(self, now: float) -> None:
        self.now = now
        self._moved = asyncio.Event()
        self._asleep = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        target = self.now + seconds
        self._asleep.set()
        while self.now < target:
            await self._moved.wait()

    async def someone_asleep(self) -> None:
        """Return once some task sleeps on this clock."""
        await self._asleep.wait()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()


def shaping_text(limits: str = FAST_LIMITS) -> str:
    """The packaged shaping data (SendGrid schedule, providers, backoff) with other limits."""
    text = default_warmup_text()
    head, _, rest = text.partition("\n[limits.default]")
    _, _, backoff = rest.partition("\n[backoff]")
    return f"{head}\n{limits}\n[backoff]{backoff}"


def shaping_settings(limits: str = FAST_LIMITS) -> ShapingSettings:
    """Shaping settings from shaping_text."""
    return parse_shaping(tomllib.loads(shaping_text(limits)), "test")


def pools_toml(pool: str, ips: list[tuple[str, str, str]]) -> str:
    """One pool serving every traffic class: (address, ehlo, warmup_start) per IP."""
    members = "".join(
        f'[[pools.{pool}.ips]]\naddress = "{address}"\nehlo = "{ehlo}"\nwarmup_start = {start}\n'
        for address, ehlo, start in ips
    )
    return f'default_pool = "{pool}"\n[classes]\neob = "{pool}"\n{members}'


async def seed_warmup(store: BudgetStore, address: str, start: dt.date, now: float) -> None:
    """Record that `address` has been warming up since `start` and sent an hour ago.

    Without a send on record, an IP whose start date has passed begins at day 0 on its
    first send (a go-live delay must not hand a cold IP a later day's cap).
    """
    before = now - HOUR
    await store.lease(
        LeaseRequest(
            BudgetKey(address, "seed", hour_bucket(before)),
            cap=1,
            want=1,
            now=before,
            restart_on=start,
            idle_before=before - 30 * DAY,
        )
    )


def make_shaper(
    pools: PoolConfig,
    store: BudgetStore,
    clock: SimClock,
    *,
    overrides: dict[str, str] | None = None,
    max_wait: float = HOUR,
    settings: ShapingSettings | None = None,
) -> Shaper:
    """A shaper on the simulated clock."""
    settings = settings or shaping_settings()
    leaser = BudgetLeaser(store, settings.plan, chunk=10, clock=clock)
    return Shaper(
        pools,
        settings,
        leaser,
        store,
        provider_overrides=overrides,
        max_wait=max_wait,
        clock=clock,
        sleep=clock.sleep,
    )


def sample(name: str, **labels: str) -> float:
    """A metric's current value in this process (0 if never set)."""
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ---------------------------------------------------------------------------- receivers


def _peer_ip(session: Session) -> str:
    peer = session.peer
    assert peer is not None
    return str(peer[0])


@dataclass
class Scripted:
    """An aiosmtpd handler with PIPELINING that answers as a test tells it to."""

    # Refuse MAIL with this reply after this many messages on one connection.
    close_after: int | None = None
    close_reply: str = PUSHBACK_421
    # (client ip, recipient domain) -> reply to RCPT.
    refuse: dict[tuple[str, str], str] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (what, ip, rcpt)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        count = getattr(session, "mails", 0)
        if self.close_after is not None and count >= self.close_after:
            self.events.append(("421", _peer_ip(session), ""))
            return self.close_reply
        session.mails = count + 1  # type: ignore[attr-defined]
        envelope.mail_from = address
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        ip = _peer_ip(session)
        reply = self.refuse.get((ip, address.rpartition("@")[2]))
        if reply is not None:
            self.events.append(("refused", ip, address))
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.events.append(("ok", _peer_ip(session), envelope.rcpt_tos[0]))
        return "250 2.0.0 Ok: queued"

    def accepted(self) -> list[tuple[str, str]]:
        """(client ip, recipient) of every accepted message, in order."""
        return [(ip, rcpt) for what, ip, rcpt in self.events if what == "ok"]


@dataclass
class Receiver:
    handler: Scripted
    host: str
    port: int

    def route(self) -> str:
        return f"{self.host}:{self.port}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    names = [
        "gmail-like.test",
        "outlook-like.test",
        "plain.test",
        "ehlo.sandbox.test",
        "shared.sandbox.test",
    ]
    return make_test_pki(tmp_path_factory.mktemp("pki"), names)


@pytest.fixture
async def scripted(pki: TestPki) -> AsyncIterator[Receiver]:
    """A scripted STARTTLS receiver on 127.0.70.100, in this test's event loop."""
    handler = Scripted()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, tls_context=context, decode_data=False, hostname="mx.test"),
        host="127.0.70.100",
        port=0,
    )
    port = int(server.sockets[0].getsockname()[1])
    try:
        yield Receiver(handler, "127.0.70.100", port)
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[BudgetStore]:
    opened = await open_budgets(f"sqlite:///{tmp_path / 'budgets.db'}")
    yield opened
    await opened.close()


def transport_for(pki: TestPki, routes: dict[str, str], shaper: Shaper | None) -> Transport:
    return Transport.from_config(TransportConfig(ca_bundle=pki.ca, routes=routes), shaper=shaper)


async def drive(
    transport: Transport,
    clock: SimClock,
    recipients: list[str],
    *,
    concurrency: int,
    step: float,
) -> list[str]:
    """Deliver every recipient; whenever all senders wait on the shaper, move time by `step`.

    Returns the recipients that raised, with their reason; the tests expect none.
    """
    shaper = transport.shaper
    assert shaper is not None
    queue = iter(recipients)
    failures: list[str] = []
    alive = concurrency

    async def sender() -> None:
        nonlocal alive
        try:
            for rcpt in queue:
                try:
                    reply = await transport.deliver(SENDER, rcpt, MESSAGE)
                except DeliveryError as exc:
                    failures.append(f"{rcpt}: {exc}")
                else:
                    assert reply.code == 250
        finally:
            alive -= 1

    async def clockwork() -> None:
        # Every sender parked in the shaper and nothing on the wire: the simulated world
        # has nothing left to do before time moves.
        while alive:
            await asyncio.sleep(0.002)
            if alive and shaper.waiting == alive:
                clock.advance(step)

    async with asyncio.timeout(120), asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(sender())
        group.create_task(clockwork())
    return failures


# ---------------------------------------------------------------------------- tests


async def test_each_message_binds_its_pool_ip_and_greets_with_its_name(
    tmp_path: Path, pki: TestPki, store: BudgetStore
) -> None:
    domain = "ehlo.sandbox.test"
    ips = {f"127.0.71.{n}": f"mta{n}.payer.example" for n in (1, 2, 3)}
    pools = loads_pools(
        pools_toml("eob-transactional", [(a, e, '"mature"') for a, e in ips.items()])
    )
    clock = SimClock(T0)
    shaper = make_shaper(pools, store, clock)
    await shaper.start()
    async with Sandbox([SandboxDomain(domain, "127.0.71.100")], tmp_path / "mail", pki) as box:
        host, port = box.routes[domain]
        transport = transport_for(pki, {domain: f"{host}:{port}"}, shaper)
        peak = 0

        async def send(i: int) -> None:
            nonlocal peak
            await transport.deliver(SENDER, f"m{i}@{domain}", MESSAGE)
            peak = max(peak, transport.pool.open_connections)

        await asyncio.gather(*(send(i) for i in range(60)))
        await transport.aclose()
        records = box.received
    await shaper.aclose()
    assert len(records) == 60
    assert {r.client_ip for r in records} == set(ips)  # mature IPs share the load
    assert all(r.helo == ips[r.client_ip] for r in records)
    assert peak <= 2 * len(ips)  # max_connections = 2 per (provider, IP)
    for address in ips:
        assert sample("eobblast_shaping_warmup_day", pool="eob-transactional", ip=address) == -1


async def test_421_4728_slows_the_ip_down_and_stops_coming(
    pki: TestPki, scripted: Receiver, store: BudgetStore
) -> None:
    # The receiver refuses the sixth message of every connection with Gmail's 4.7.28.
    scripted.handler.close_after = 5
    domain = "gmail-like.test"
    ips = ["127.0.70.1", "127.0.70.2"]
    pools = loads_pools(
        pools_toml(
            "pushback", [(a, f"mta{i}.payer.example", '"mature"') for i, a in enumerate(ips)]
        )
    )
    clock = SimClock(T0)
    shaper = make_shaper(pools, store, clock, overrides={domain: "gmail"})
    await shaper.start()

    def pushed_back() -> float:
        return sum(
            sample(
                "eobblast_shaping_deferred_total",
                pool="pushback",
                ip=address,
                provider="gmail",
                reason="slow_down",
            )
            for address in ips
        )

    before = pushed_back()
    transport = transport_for(pki, {domain: scripted.route()}, shaper)
    recipients = [f"m{i}@{domain}" for i in range(200)]
    try:
        failures = await drive(transport, clock, recipients, concurrency=20, step=60.0)
    finally:
        await transport.aclose()
        await shaper.aclose()

    # Nothing lost: every message was accepted exactly once.
    assert failures == []
    accepted = scripted.handler.accepted()
    assert sorted(rcpt for _, rcpt in accepted) == sorted(recipients)
    # The sender backed off: both IPs were cut to half their rate toward gmail, paused,
    # and learnt to close connections before the receiver's limit.
    views = {v.ip: v for v in shaper.snapshot() if v.provider == "gmail"}
    for address in ips:
        view = views[address]
        assert view.slow_downs >= 1
        assert view.rate == pytest.approx(view.base_rate * 0.5)
        assert view.messages_per_connection == 5
        gauge = sample("eobblast_shaping_send_rate", pool="pushback", ip=address, provider="gmail")
        assert gauge == pytest.approx(view.base_rate * 0.5)
    refusals = [i for i, (what, _, _) in enumerate(scripted.handler.events) if what == "421"]
    assert pushed_back() - before == len(refusals)  # each refused message counted once
    # The 421 rate falls to zero: at most one per open connection (2 per IP) before each IP
    # learnt, all early; none in the 150 messages after.
    assert 1 <= len(refusals) <= 2 * len(ips)
    assert max(refusals) < 60


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        ("550 5.7.1 Service unavailable, client host [127.0.72.1] blocked using Spamhaus", "5.7.1"),
        (
            "550 5.7.515 Access denied, sending domain payer.test does not meet the required "
            "authentication level.",
            "5.7.515",
        ),
    ],
)
async def test_a_block_suspends_the_ip_for_that_provider_only(
    pki: TestPki, scripted: Receiver, store: BudgetStore, reply: str, code: str
) -> None:
    blocked, clean = "127.0.72.1", "127.0.72.2"
    pool = f"blocks-{code.replace('.', '')}"
    scripted.handler.refuse[(blocked, "outlook-like.test")] = reply
    pools = loads_pools(
        pools_toml(
            pool,
            [
                (blocked, "mta1.payer.example", '"mature"'),
                (clean, "mta2.payer.example", '"mature"'),
            ],
        )
    )
    clock = SimClock(T0)
    overrides = {"outlook-like.test": "microsoft"}
    shaper = make_shaper(pools, store, clock, overrides=overrides)
    await shaper.start()
    routes = {"outlook-like.test": scripted.route(), "plain.test": scripted.route()}
    transport = transport_for(pki, routes, shaper)
    outlook = [f"m{i}@outlook-like.test" for i in range(30)]
    plain = [f"p{i}@plain.test" for i in range(10)]
    try:
        assert await drive(transport, clock, outlook, concurrency=10, step=60.0) == []
        assert await drive(transport, clock, plain, concurrency=2, step=60.0) == []
    finally:
        await transport.aclose()
        await shaper.aclose()

    accepted = scripted.handler.accepted()
    # Every blocked message went again from the pool's other IP: nothing lost.
    assert sorted(r for ip, r in accepted if r.endswith("@outlook-like.test")) == sorted(outlook)
    assert {ip for ip, r in accepted if r.endswith("@outlook-like.test")} == {clean}
    # Suspended for microsoft in the shared store, with the code and never the text ...
    suspensions = await store.suspensions(clock())
    assert suspensions[(blocked, "microsoft")].code == code
    assert (blocked, "other") not in suspensions
    # ... but still sending to everyone else.
    assert blocked in {ip for ip, r in accepted if r.endswith("@plain.test")}
    labels = {"pool": pool, "ip": blocked, "provider": "microsoft"}
    assert sample("eobblast_shaping_suspended", **labels) == 1
    assert (
        sample("eobblast_shaping_block_alerts_total", **labels) == 1
    )  # one alert, not one per reply
    assert sample("eobblast_shaping_suspended", pool=pool, ip=clean, provider="microsoft") == 0
    # The IP never blocked is exported at 0 all the same: an alert on any increase sees
    # its first block (a labelled series otherwise appears only with its first count).
    clean_blocks = {"pool": pool, "ip": clean, "provider": "microsoft"}
    assert REGISTRY.get_sample_value("eobblast_shaping_block_alerts_total", clean_blocks) == 0

    # Another worker sharing the store skips the blocked IP from its first message.
    other = make_shaper(pools, store, clock, overrides=overrides)
    await other.start()
    ticket = await other.acquire("outlook-like.test", [scripted.host])
    assert ticket.address == clean
    await other.aclose()


async def test_a_block_in_the_greeting_suspends_the_ip(
    pki: TestPki, scripted: Receiver, store: BudgetStore
) -> None:
    # Some receivers refuse a blocked IP before EHLO, in their 554 greeting. That is a
    # block, like the same words after RCPT, not a refused connection to slow down for.
    blocked, clean = "127.0.73.1", "127.0.73.2"

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        if peer == blocked:
            writer.write(
                b"554 5.7.1 Service unavailable; client host [127.0.73.1] blocked using"
                b" Spamhaus\r\n"
            )
            await writer.drain()
            writer.close()
            return
        # Everyone else reaches the scripted receiver, from their own address.
        upstream = await asyncio.open_connection(scripted.host, scripted.port, local_addr=(peer, 0))
        await splice(reader, writer, *upstream)

    front = await asyncio.start_server(greet, "127.0.73.100", 0)
    port = int(front.sockets[0].getsockname()[1])
    pools = loads_pools(
        pools_toml(
            "greeting",
            [
                (blocked, "mta1.payer.example", '"mature"'),
                (clean, "mta2.payer.example", '"mature"'),
            ],
        )
    )
    clock = SimClock(T0)
    shaper = make_shaper(pools, store, clock, overrides={"outlook-like.test": "microsoft"})
    await shaper.start()
    transport = transport_for(pki, {"outlook-like.test": f"127.0.73.100:{port}"}, shaper)
    outlook = [f"g{i}@outlook-like.test" for i in range(10)]
    try:
        assert await drive(transport, clock, outlook, concurrency=4, step=60.0) == []
    finally:
        await transport.aclose()
        await shaper.aclose()
        front.close()
    accepted = scripted.handler.accepted()
    assert sorted(r for _, r in accepted) == sorted(outlook)
    assert {ip for ip, _ in accepted} == {clean}
    suspensions = await store.suspensions(clock())
    assert suspensions[(blocked, "microsoft")].code == "5.7.1"


class SuspendFailsOnce:
    """A budget store whose first suspension write fails (a connection just dropped)."""

    def __init__(self, inner: BudgetStore) -> None:
        self.inner = inner
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def suspend(self, *args: Any, **kwargs: Any) -> None:
        if not self.failed:
            self.failed = True
            raise OSError("connection lost")
        await self.inner.suspend(*args, **kwargs)


async def test_a_block_the_store_missed_is_kept_and_written_again(store: BudgetStore) -> None:
    # The block's write failed: housekeeping must not lift it from the store's (older)
    # view, and writes it again so the other workers learn it.
    blocked, clean = "127.0.74.1", "127.0.74.2"
    pools = loads_pools(
        pools_toml(
            "missed",
            [
                (blocked, "mta1.payer.example", '"mature"'),
                (clean, "mta2.payer.example", '"mature"'),
            ],
        )
    )
    clock = SimClock(T0)
    flaky = SuspendFailsOnce(store)
    overrides = {"outlook-like.test": "microsoft"}
    shaper = make_shaper(pools, cast(BudgetStore, flaky), clock, overrides=overrides)
    await shaper.start()
    try:
        picked = {}
        while blocked not in picked:  # the pool alternates; take a ticket from each IP
            ticket = await shaper.acquire("outlook-like.test", ["mx.outlook-like.test"])
            picked[ticket.address] = ticket
        signal = await shaper.observe(
            picked[blocked], 550, "5.7.1", "Service unavailable, client host blocked (Spamhaus)"
        )
        assert signal is ReplySignal.BLOCK and flaky.failed
        clock.advance(60.0)  # past a housekeeping round
        later = [
            await shaper.acquire("outlook-like.test", ["mx.outlook-like.test"]) for _ in range(6)
        ]
    finally:
        await shaper.aclose()
    assert {ticket.address for ticket in later} == {clean}
    assert (blocked, "microsoft") in await store.suspensions(clock())


async def test_workers_prune_budget_counters_older_than_two_days(store: BudgetStore) -> None:
    # One counter per (IP, provider, hour): without pruning the shared store only grows.
    pools = loads_pools(pools_toml("prune", [("127.0.75.1", "mta1.payer.example", '"mature"')]))
    source = pools.pools[0].ips[0]
    for hours_ago in (72, 1):
        old = SimClock(T0 - hours_ago * HOUR)
        leaser = BudgetLeaser(store, shaping_settings().plan, chunk=10, clock=old)
        assert await leaser.acquire(source, "other")
        await leaser.close()
    clock = SimClock(T0)
    shaper = make_shaper(pools, store, clock)
    await shaper.start()
    try:
        await shaper.acquire("plain.test", ["mx.plain.test"])  # a housekeeping round
    finally:
        await shaper.aclose()

    def counted(hours_ago: int) -> bool:
        return any(u.ip == source.address for u in usage[hours_ago])

    usage = {h: await store.usage(hour_bucket(T0 - h * HOUR)) for h in (72, 1)}
    assert not counted(72) and counted(1)


async def test_over_budget_messages_wait_for_the_next_hour_or_are_deferred(
    store: BudgetStore,
) -> None:
    # One IP on warm-up day 0: 20 an hour, 5 of them to the fallback provider.
    pools = loads_pools(pools_toml("cold", [("127.0.74.1", "mta1.payer.example", "2026-11-26")]))
    clock = SimClock(T0)
    patient = make_shaper(pools, store, clock, max_wait=HOUR)
    for _ in range(5):
        await patient.acquire("plain.test", ["mx.plain.test"])
    waiting = asyncio.create_task(patient.acquire("plain.test", ["mx.plain.test"]))
    await asyncio.wait_for(clock.someone_asleep(), 10)
    assert patient.waiting == 1 and not waiting.done()
    clock.advance(HOUR)
    ticket = await asyncio.wait_for(waiting, 10)
    assert ticket.hour == hour_bucket(T0) + 1
    await patient.aclose()

    clock.advance(HOUR)
    impatient = make_shaper(pools, store, clock, max_wait=60.0)
    for _ in range(5):
        await impatient.acquire("plain.test", ["mx.plain.test"])
    with pytest.raises(ShapingDeferred) as caught:
        await impatient.acquire("plain.test", ["mx.plain.test"])
    assert not caught.value.permanent
    assert caught.value.retry_at == (hour_bucket(clock()) + 1) * HOUR
    await impatient.aclose()


async def test_the_fallback_provider_backs_off_per_receiving_site(store: BudgetStore) -> None:
    # One small domain throttling an IP must not stop that IP for every other domain.
    pools = loads_pools(
        pools_toml(
            "sites",
            [
                ("127.0.76.1", "mta1.payer.example", '"mature"'),
                ("127.0.76.2", "mta2.payer.example", '"mature"'),
            ],
        )
    )
    clock = SimClock(T0)
    shaper = make_shaper(pools, store, clock)
    first = await shaper.acquire("small.test", ["mx.small.test"])
    assert first.scope == "other:mx.small.test"
    signal = await shaper.observe(first, 421, "4.7.0", "421 4.7.0 Too many connections")
    assert signal.value == "slow_down"
    for _ in range(4):  # the throttled site gets the other IP ...
        ticket = await shaper.acquire("small.test", ["mx.small.test"])
        assert ticket.address != first.address
    # ... and so does another domain on the same MX; elsewhere the throttled IP, now the
    # least used of the two, is the one chosen.
    assert (await shaper.acquire("sibling.test", ["mx.small.test"])).address != first.address
    assert (await shaper.acquire("elsewhere.test", ["mx.elsewhere.test"])).address == first.address
    assert shaper.rate(first.address, "other:mx.small.test") == 0  # paused
    assert shaper.rate(first.address, "other:mx.d0.test") > 0
    await shaper.aclose()


async def test_transport_open_builds_and_owns_the_shaper(tmp_path: Path) -> None:
    config = TransportConfig()
    assert (await Transport.open(config, ShapingConfig())).shaper is None  # shaping off
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(pools_toml("own", [("127.0.77.1", "mta1.payer.example", '"mature"')]))
    section = {
        "pools_file": str(pools_file),
        "budgets_url": f"sqlite:///{tmp_path / 'b.db'}",
        "provider_overrides": {"Example.ORG": "gmail"},
        "max_wait_seconds": 5,
    }

    def shaping_of(table: dict[str, Any]) -> ShapingConfig:
        return load_config(environ={}, overrides={"shaping": table}).shaping

    shaping = shaping_of(section)
    assert shaping.max_wait_seconds == 5.0 and shaping.pools_file == pools_file
    transport = await Transport.open(config, shaping)
    assert transport.shaper is not None
    assert transport.shaper.provider_for("example.org", ["mx.example.org"]) == "gmail"
    await transport.aclose()
    with pytest.raises(ConfigError, match="unknown setting"):
        shaping_of({"pool_file": "x"})
    with pytest.raises(ConfigError, match=r"shaping\.max_wait_seconds"):
        shaping_of({"max_wait_seconds": -1})
    with pytest.raises(ConfigError, match=r"shaping\.lease_chunk"):
        shaping_of({"lease_chunk": 0})
    with pytest.raises(ConfigError, match="no provider"):
        await Transport.open(
            config, shaping_of({**section, "provider_overrides": {"a.test": "aol"}})
        )


# ---------------------------------------------------------------------------- processes


@pytest.fixture
def budgets_url(store_url: str) -> str:
    return store_url


WORKER_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from eobblast.config import TransportConfig
from eobblast.shaping import Shaper, ShapingConfig, ShapingDeferred
from eobblast.transport import Transport

async def main():
    url, ca, domain, route, pools_file, warmup_file, now, count = sys.argv[1:9]
    now = float(now)
    config = ShapingConfig(
        pools_file=Path(pools_file), warmup_file=Path(warmup_file), budgets_url=url,
        max_wait_seconds=0.0, lease_chunk=5,
    )
    shaper = await Shaper.open(config, clock=lambda: now)
    transport = Transport.from_config(
        TransportConfig(ca_bundle=Path(ca), routes={domain: route}), shaper=shaper
    )
    print("ready", flush=True)
    sys.stdin.readline()  # start together, so the two really share the hour
    todo = iter(range(int(count)))
    sent = deferred = 0
    async def sender():
        nonlocal sent, deferred
        for i in todo:
            try:
                await transport.deliver(
                    "eob-notices@payer.test", f"w{i}@{domain}", b"Subject: x\\r\\n\\r\\nhi\\r\\n"
                )
                sent += 1
            except ShapingDeferred:
                deferred += 1
    await asyncio.gather(*(sender() for _ in range(8)))
    await transport.aclose()
    await shaper.aclose()
    print(json.dumps({"sent": sent, "deferred": deferred}), flush=True)

asyncio.run(main())
"""


async def test_two_worker_processes_never_exceed_the_shared_cap(
    tmp_path: Path, pki: TestPki, budgets_url: str
) -> None:
    domain = "shared.sandbox.test"
    address = "127.0.73.10"
    start = TODAY - dt.timedelta(days=14)  # day 14: 2222 an hour, 555 to the fallback provider
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(
        pools_toml("shared", [(address, "mta10.payer.example", start.isoformat())])
    )
    warmup_file = tmp_path / "warmup.toml"
    warmup_file.write_text(shaping_text())
    now = T0
    seeding = await open_budgets(budgets_url)
    await seed_warmup(seeding, address, start, now)
    async with Sandbox([SandboxDomain(domain, "127.0.73.1")], tmp_path / "mail", pki) as box:
        host, port = box.routes[domain]
        args = [
            budgets_url,
            str(pki.ca),
            domain,
            f"{host}:{port}",
            str(pools_file),
            str(warmup_file),
            str(now),
            "400",
        ]
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WORKER_SCRIPT,
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                assert line.strip() == b"ready"
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            outputs = [await asyncio.wait_for(p.communicate(), 120) for p in procs]
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        records = box.received
    results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    assert all(p.returncode == 0 for p in procs)
    sent = [r["sent"] for r in results]
    assert sum(sent) == 555  # the whole cap and not one more
    assert min(sent) > 0  # both really sent from the shared budget
    assert all(r["sent"] + r["deferred"] == 400 for r in results)  # every message accounted for
    by_ip = Counter(r.client_ip for r in records)
    assert by_ip == {address: 555}
    usage = {(u.ip, u.provider): u for u in await seeding.usage(hour_bucket(now))}
    assert (usage[(address, "other")].used, usage[(address, "other")].sent) == (555, 555)
    # Held back by shaping, not deferred by the receiver: no IP's deferral count.
    assert usage[(address, "other")].deferred == 0

    # `eobblast pools status` shows the same from the store.
    config = tmp_path / "eobblast.toml"
    config.write_text(
        f'[shaping]\npools_file = "{pools_file}"\nwarmup_file = "{warmup_file}"\n'
        f'budgets_url = "{budgets_url}"\n'
    )
    result = await asyncio.to_thread(
        CliRunner().invoke, pools, ["status", "--config", str(config), "--at", str(now)]
    )
    await seeding.close()
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if address in line and "other" in line)
    assert "555" in row and "14" in row


async def test_messages_per_connection_rise_again_after_quiet_hours(store: BudgetStore) -> None:
    # A hang-up after 5 messages lowers the figure at once; it used to stay at 5 for the
    # life of the process. Each quiet hour (rate recovered) doubles it back to 100.
    pools = loads_pools(pools_toml("learn", [("127.0.78.1", "mta1.payer.example", '"mature"')]))
    clock = SimClock(T0)
    shaper = make_shaper(pools, store, clock, overrides={"gmail-like.test": "gmail"})
    await shaper.start()

    async def figure() -> int:
        ticket = await shaper.acquire("gmail-like.test", ["mx.gmail-like.test"])
        shaper.sent(ticket)
        return shaper.messages_per_connection(ticket)

    try:
        ticket = await shaper.acquire("gmail-like.test", ["mx.gmail-like.test"])
        signal = await shaper.observe(ticket, 421, "4.7.0", PUSHBACK_421, messages_on_connection=5)
        assert signal.value == "slow_down"
        assert shaper.messages_per_connection(ticket) == 5
        seen = []
        for _ in range(6):
            clock.advance(HOUR)
            seen.append(await figure())
        assert seen == [10, 20, 40, 80, 100, 100]
        # A receiver whose limit is real says so again: down at once, up an hour later.
        ticket = await shaper.acquire("gmail-like.test", ["mx.gmail-like.test"])
        await shaper.observe(ticket, 421, "4.7.0", PUSHBACK_421, messages_on_connection=5)
        clock.advance(HOUR / 2)
        assert await figure() == 5
    finally:
        await shaper.aclose()
