"""SMTP pool and transport against the sandbox: real sockets, STARTTLS and certificates."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eobblast.config import TransportConfig
from eobblast.errors import DeliveryError, ReasonCode
from eobblast.observe import metrics
from eobblast.sandbox import Behaviour, Sandbox, SandboxDomain, TestPki, make_test_pki
from eobblast.transport import PoolKey, Router, SmtpPool, Transport, make_tls_context
from eobblast.transport.pool import ConnectionLimits
from eobblast.transport.routes import Route, parse_static_routes

OK = "ok.sandbox.test"
CLOSER = "closer.sandbox.test"
NOTLS = "notls.sandbox.test"
UNTRUSTED = "untrusted.sandbox.test"
NODSN = "nodsn.sandbox.test"
OLDTLS = "oldtls.sandbox.test"
DROPPER = "dropper.sandbox.test"
CLOSE_AFTER = 4
DOMAINS = [
    SandboxDomain(
        OK,
        "127.0.12.1",
        recipient_rules=(("unknown-", Behaviour.REJECT), ("busy-", Behaviour.DEFER)),
    ),
    # one-command-at-a-time (no PIPELINING): the aiosmtplib path
    SandboxDomain(CLOSER, "127.0.12.2", close_after=CLOSE_AFTER, pipelining=False),
    SandboxDomain(NOTLS, "127.0.12.3", behaviour=Behaviour.NO_STARTTLS),
    SandboxDomain(UNTRUSTED, "127.0.12.4", behaviour=Behaviour.UNTRUSTED_CERT),
    SandboxDomain(NODSN, "127.0.12.5", dsn=False),
    SandboxDomain(OLDTLS, "127.0.12.6", behaviour=Behaviour.OLD_TLS_ONLY),
    SandboxDomain(DROPPER, "127.0.12.7", behaviour=Behaviour.DROP_AFTER_STARTTLS),
]
MESSAGE = (
    b"From: eob-notices@payer.test\r\nTo: someone\r\nSubject: Your Explanation of Benefits"
    b" is ready\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"), [d.name for d in DOMAINS])


@pytest.fixture
async def sandbox(tmp_path: Path, pki: TestPki) -> AsyncIterator[Sandbox]:
    async with Sandbox(DOMAINS, tmp_path / "mail", pki) as running:
        yield running


def _transport(sandbox: Sandbox, pki: TestPki, **settings: object) -> Transport:
    routes = {name: f"{host}:{port}" for name, (host, port) in sandbox.routes.items()}
    config = TransportConfig(ca_bundle=pki.ca, routes=routes, **settings)  # type: ignore[arg-type]
    return Transport.from_config(config)


def _connects(result: str) -> float:
    return float(metrics.SMTP_CONNECTS.labels(result)._value.get())


async def test_many_messages_share_few_connections(sandbox: Sandbox, pki: TestPki) -> None:
    transport = _transport(sandbox, pki, max_connections_per_destination=3)
    before = _connects("ok")
    peak = 0

    async def send(i: int) -> None:
        nonlocal peak
        reply = await transport.deliver("eob-notices@payer.test", f"m{i}@{OK}", MESSAGE)
        assert reply.code == 250
        assert reply.tls_version in ("TLSv1.2", "TLSv1.3")
        peak = max(peak, transport.pool.open_connections)

    await asyncio.gather(*(send(i) for i in range(60)))
    await transport.aclose()
    assert sandbox.counts[OK] == 60
    assert _connects("ok") - before <= 3  # 60 messages over at most 3 connections
    assert peak <= 3
    records = sandbox.received
    assert all(r.tls_version is not None for r in records)
    assert len({r.path for r in records}) == 60


async def test_bounces_are_asked_to_return_headers_only(sandbox: Sandbox, pki: TestPki) -> None:
    # A bounce that returned the whole notice would carry its PHI to the bounce listener.
    transport = _transport(sandbox, pki)
    for domain in (OK, CLOSER, NODSN):  # pipelined, one command at a time, no DSN offered
        reply = await transport.deliver("eob-notices@payer.test", f"m@{domain}", MESSAGE)
        assert reply.code == 250
    await transport.aclose()
    asked = {r.domain: r.dsn_ret for r in sandbox.received}
    assert asked == {OK: "HDRS", CLOSER: "HDRS", NODSN: None}


async def test_421_mid_connection_moves_to_a_fresh_connection(
    sandbox: Sandbox, pki: TestPki
) -> None:
    transport = _transport(sandbox, pki, max_connections_per_destination=1)
    for i in range(CLOSE_AFTER * 3 + 1):
        reply = await transport.deliver("eob-notices@payer.test", f"m{i}@{CLOSER}", MESSAGE)
        assert reply.code == 250
    await transport.aclose()
    assert sandbox.counts[CLOSER] == CLOSE_AFTER * 3 + 1


async def test_no_starttls_means_nothing_is_sent(sandbox: Sandbox, pki: TestPki) -> None:
    transport = _transport(sandbox, pki)
    with pytest.raises(DeliveryError) as caught:
        await transport.deliver("eob-notices@payer.test", f"x@{NOTLS}", MESSAGE)
    await transport.aclose()
    assert caught.value.reason is ReasonCode.STARTTLS_NOT_OFFERED
    assert caught.value.permanent
    assert sandbox.counts.get(NOTLS, 0) == 0


async def test_untrusted_certificate_means_nothing_is_sent(sandbox: Sandbox, pki: TestPki) -> None:
    transport = _transport(sandbox, pki)
    with pytest.raises(DeliveryError) as caught:
        await transport.deliver("eob-notices@payer.test", f"x@{UNTRUSTED}", MESSAGE)
    await transport.aclose()
    assert caught.value.reason is ReasonCode.TLS_CERT_UNTRUSTED
    assert sandbox.counts.get(UNTRUSTED, 0) == 0


async def test_wrong_host_name_is_refused(sandbox: Sandbox, pki: TestPki) -> None:
    # The certificate is valid, but for other names: host name checking must refuse it.
    host, port = sandbox.routes[OK]
    transport = Transport.from_config(
        TransportConfig(ca_bundle=pki.ca, routes={"elsewhere.test": f"{host}:{port}"})
    )
    with pytest.raises(DeliveryError) as caught:
        await transport.deliver("eob-notices@payer.test", "x@elsewhere.test", MESSAGE)
    await transport.aclose()
    assert caught.value.reason is ReasonCode.TLS_CERT_UNTRUSTED
    assert sandbox.counts.get(OK, 0) == 0


async def test_rejected_recipient_keeps_the_connection_usable(
    sandbox: Sandbox, pki: TestPki
) -> None:
    transport = _transport(sandbox, pki, max_connections_per_destination=1)
    before = _connects("ok")
    with pytest.raises(DeliveryError) as rejected:
        await transport.deliver("eob-notices@payer.test", f"unknown-bob@{OK}", MESSAGE)
    assert rejected.value.reason is ReasonCode.RECIPIENT_REJECTED
    assert rejected.value.smtp_code == 550 and rejected.value.permanent
    assert rejected.value.detail == "550 5.1.1"  # codes only: the reply text quotes the address
    with pytest.raises(DeliveryError) as deferred:
        await transport.deliver("eob-notices@payer.test", f"busy-bob@{OK}", MESSAGE)
    assert deferred.value.reason is ReasonCode.TEMPORARY_FAILURE
    assert deferred.value.smtp_code == 451 and not deferred.value.permanent
    reply = await transport.deliver("eob-notices@payer.test", f"bob@{OK}", MESSAGE)
    await transport.aclose()
    assert reply.code == 250
    assert _connects("ok") - before == 1
    assert sandbox.counts[OK] == 1


async def test_refused_connection_is_a_connect_failure(pki: TestPki) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once closed
    transport = Transport.from_config(
        TransportConfig(ca_bundle=pki.ca, routes={OK: f"127.0.0.1:{port}"}, connect_timeout=2)
    )
    with pytest.raises(DeliveryError) as caught:
        await transport.deliver("eob-notices@payer.test", f"x@{OK}", MESSAGE)
    await transport.aclose()
    assert caught.value.reason is ReasonCode.CONNECT_FAILED
    assert not caught.value.permanent


async def test_source_address_is_bound(sandbox: Sandbox, pki: TestPki) -> None:
    transport = _transport(sandbox, pki, source_address="127.0.12.99")
    await transport.deliver("eob-notices@payer.test", f"x@{OK}", MESSAGE)
    await transport.aclose()
    assert [r.client_ip for r in sandbox.received] == ["127.0.12.99"]


async def test_idle_connections_expire_and_max_messages_rotates(
    sandbox: Sandbox, pki: TestPki
) -> None:
    now = [0.0]
    host, port = sandbox.routes[OK]
    pool = SmtpPool(
        make_tls_context(str(pki.ca)),
        ehlo_name="sender.test",
        max_messages_per_connection=2,
        idle_expiry=10.0,
        clock=lambda: now[0],
    )
    key = PoolKey(None, host, port, OK)
    before = _connects("ok")
    for i in range(4):  # two connections: each carries at most two messages
        async with pool.connection(key) as conn:
            await conn.send("eob-notices@payer.test", f"m{i}@{OK}", MESSAGE)
    assert _connects("ok") - before == 2
    async with pool.connection(key) as conn:
        first = conn
        await conn.send("eob-notices@payer.test", f"a@{OK}", MESSAGE)
    now[0] += 11.0  # past the idle expiry
    async with pool.connection(key) as conn:
        assert conn is not first
        await conn.send("eob-notices@payer.test", f"b@{OK}", MESSAGE)
    await pool.aclose()
    assert _connects("ok") - before == 4
    assert sandbox.counts[OK] == 6


async def test_destinations_nobody_uses_are_forgotten(sandbox: Sandbox, pki: TestPki) -> None:
    # A worker meets many MX hosts over a run: one whose connections expired and that
    # nobody is using leaves the pool's table.
    now = [0.0]
    pool = SmtpPool(
        make_tls_context(str(pki.ca)),
        ehlo_name="sender.test",
        idle_expiry=10.0,
        clock=lambda: now[0],
    )
    ok = PoolKey(None, *sandbox.routes[OK], OK)
    other = PoolKey(None, *sandbox.routes[NODSN], NODSN)
    try:
        async with pool.connection(ok) as conn:
            await conn.send("eob-notices@payer.test", f"a@{OK}", MESSAGE)
        assert pool.destinations == 1 and pool.open_connections == 1
        for _ in range(2):  # one sweep closes the expired connection, the next forgets OK
            now[0] += 11.0
            async with pool.connection(other) as conn:
                await conn.send("eob-notices@payer.test", f"b@{NODSN}", MESSAGE)
        assert pool.destinations == 1 and pool.open_connections == 1  # only NODSN's
        async with pool.connection(ok) as conn:  # and OK comes back when needed
            await conn.send("eob-notices@payer.test", f"c@{OK}", MESSAGE)
        assert pool.destinations == 2
    finally:
        await pool.aclose()
    assert sandbox.counts[OK] == 2 and sandbox.counts[NODSN] == 2


def _established_to(servers: set[tuple[str, int]]) -> int:
    """TCP connections established to these servers, as the kernel counts them."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        host, port = fields[2].split(":")
        remote = (socket.inet_ntoa(struct.pack("<I", int(host, 16))), int(port, 16))
        count += fields[3] == "01" and remote in servers
    return count


async def test_a_group_limit_counts_idle_connections_too(sandbox: Sandbox, pki: TestPki) -> None:
    # Shaping limits connections per (provider, IP) whatever MX host or TLS mode they go
    # to. Idle connections count: a receiver sees them open. One IP used to reach 8 open
    # connections to one provider under a limit of 2.
    pool = SmtpPool(make_tls_context(str(pki.ca)), ehlo_name="sender.test")
    limits = ConnectionLimits(("gmail", "127.0.0.1"), max_connections=2, max_messages=100)
    keys = [
        PoolKey(None, *sandbox.routes[OK], OK),
        PoolKey(None, *sandbox.routes[NODSN], NODSN),
        PoolKey(None, *sandbox.routes[OK], OK, verified_tls=False),
    ]
    servers = {sandbox.routes[OK], sandbox.routes[NODSN]}
    peak = 0

    async def send(i: int) -> None:
        nonlocal peak
        key = keys[i % len(keys)]
        async with pool.connection(key, limits) as conn:
            peak = max(peak, _established_to(servers), pool.open_connections)
            await conn.send("eob-notices@payer.test", f"m{i}@{key.tls_name}", MESSAGE)
            peak = max(peak, _established_to(servers), pool.open_connections)

    try:
        await asyncio.gather(send(0), send(3))  # two connections to OK, idle afterwards
        assert pool.open_connections == 2
        await send(1)  # NODSN: one of OK's idle connections makes room
        assert pool.open_connections == 2
        await asyncio.gather(*(send(i) for i in range(60)))
        assert pool.open_connections <= 2
    finally:
        await pool.aclose()
    assert peak <= 2
    assert sandbox.counts[OK] + sandbox.counts[NODSN] == 63


async def test_a_destination_waits_for_a_slot_held_by_another_in_use(
    sandbox: Sandbox, pki: TestPki
) -> None:
    pool = SmtpPool(make_tls_context(str(pki.ca)), ehlo_name="sender.test")
    limits = ConnectionLimits("one", max_connections=1, max_messages=100)
    ok, other = PoolKey(None, *sandbox.routes[OK], OK), PoolKey(None, *sandbox.routes[NODSN], NODSN)
    try:
        held = await pool.acquire(ok, limits)
        waiting = asyncio.create_task(pool.acquire(other, limits))
        await asyncio.sleep(0.2)
        assert not waiting.done() and pool.open_connections == 1
        await pool.release(held)  # idle now: the waiter closes it and opens its own
        conn = await asyncio.wait_for(waiting, 10)
        assert conn.key == other and pool.open_connections == 1
        await conn.send("eob-notices@payer.test", f"x@{NODSN}", MESSAGE)
        await pool.release(conn)
        # A caller cancelled while waiting leaves no trace.
        held = await pool.acquire(ok, limits)
        cancelled = asyncio.create_task(pool.acquire(other, limits))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await pool.release(held)
        async with pool.connection(other, limits) as conn:
            await conn.send("eob-notices@payer.test", f"y@{NODSN}", MESSAGE)
    finally:
        await pool.aclose()
    assert sandbox.counts[NODSN] == 2


class Stalling:
    """A plain SMTP server (no STARTTLS: notices only) that may never answer QUIT or EHLO."""

    def __init__(self) -> None:
        self.quiet_quit = False
        self.quiet_ehlo = False
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stalling.test\r\n")
        with contextlib.suppress(OSError):
            while line := await reader.readline():
                command = line[:4].upper()
                if command == b"QUIT" and self.quiet_quit:
                    await reader.read()  # until the client hangs up
                    break
                if command == b"EHLO" and self.quiet_ehlo:
                    await reader.read()
                    break
                replies = {
                    b"EHLO": b"250-stalling.test\r\n250 8BITMIME\r\n",
                    b"QUIT": b"221 bye\r\n",
                }
                writer.write(replies.get(command, b"250 ok\r\n"))
                await writer.drain()
        writer.close()

    async def __aenter__(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_cancelled_close_or_open_closes_the_socket_it_gives_the_slot_back_for() -> None:
    # A worker cancels a record (stuck, partition revoked) while its connection closes an
    # idle one for its slot, or while a new one is being opened: the slot must not come
    # back while the socket stays open, or the receiver sees more than the limit.
    stalling = Stalling()
    async with stalling as (host, port):
        servers = {(host, port)}
        pool = SmtpPool(make_tls_context(None), ehlo_name="sender.test")
        limits = ConnectionLimits("one", max_connections=1, max_messages=100)
        first, second = (PoolKey(None, host, port, n, verified_tls=False) for n in ("a", "b"))
        try:
            await pool.release(await pool.acquire(first, limits))  # idle at "a"
            stalling.quiet_quit = True
            evicting = asyncio.create_task(pool.acquire(second, limits))
            await asyncio.sleep(0.3)  # closing "a"'s idle connection: QUIT unanswered
            evicting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await evicting
            await asyncio.sleep(0.1)
            assert pool.open_connections == 0 and _established_to(servers) == 0
            stalling.quiet_ehlo = True
            opening = asyncio.create_task(pool.acquire(second, limits))
            await asyncio.sleep(0.3)  # EHLO unanswered
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            await asyncio.sleep(0.1)
            assert pool.open_connections == 0 and _established_to(servers) == 0
        finally:
            await pool.aclose()


async def test_closing_the_pool_fails_its_waiters_and_closes_every_idle_connection() -> None:
    stalling = Stalling()
    async with stalling as (host, port):
        pool = SmtpPool(make_tls_context(None), ehlo_name="sender.test")
        limits = ConnectionLimits("one", max_connections=1, max_messages=100)
        keys = [PoolKey(None, host, port, n, verified_tls=False) for n in ("a", "b", "c")]
        await pool.release(await pool.acquire(keys[2]))  # another group's idle connection
        held = await pool.acquire(keys[0], limits)
        waiting = asyncio.create_task(pool.acquire(keys[1], limits))
        await asyncio.sleep(0.1)
        closing = asyncio.create_task(pool.aclose())
        with pytest.raises(RuntimeError, match="closed"):
            await asyncio.wait_for(waiting, 5)
        await pool.release(held)
        await asyncio.wait_for(closing, 10)
        assert pool.open_connections == 0 and _established_to({(host, port)}) == 0


async def test_groups_follow_shapings_figure_and_are_forgotten_when_unused(
    sandbox: Sandbox, pki: TestPki
) -> None:
    now = [0.0]
    pool = SmtpPool(
        make_tls_context(str(pki.ca)), ehlo_name="sender.test", idle_expiry=10.0,
        clock=lambda: now[0],
    )  # fmt: skip
    ok = PoolKey(None, *sandbox.routes[OK], OK)
    other = PoolKey(None, *sandbox.routes[NODSN], NODSN)
    before = _connects("ok")

    async def send(key: PoolKey, max_messages: int, n: int) -> None:
        limits = ConnectionLimits(("other:site", "127.0.0.1"), 2, max_messages)
        async with pool.connection(key, limits) as conn:
            await conn.send("eob-notices@payer.test", f"m{n}@{key.tls_name}", MESSAGE)

    try:
        for n in range(2):  # lowered to one message a connection: two connections
            await send(ok, 1, n)
        assert _connects("ok") - before == 2
        for n in range(3):  # shaping raised it again: one connection carries all three
            await send(ok, 3, 2 + n)
        assert _connects("ok") - before == 3
        assert pool.groups == 1
        for _ in range(3):  # expired, then OK forgotten, then its group too
            now[0] += 11.0
            async with pool.connection(other) as conn:
                await conn.send("eob-notices@payer.test", f"x@{NODSN}", MESSAGE)
        assert pool.groups == 0 and pool.destinations == 1
    finally:
        await pool.aclose()


async def test_mx_routes_are_cached_and_ordered() -> None:
    calls: list[str] = []

    async def lookup(domain: str) -> list[tuple[int, str]]:
        calls.append(domain)
        return [(20, "mx2.payer.test"), (10, "mx1.payer.test")]

    now = [0.0]
    router = Router({}, mx_lookup=lookup, cache_ttl=60, clock=lambda: now[0])
    routes = await router.resolve("Payer.TEST")
    assert [r.host for r in routes] == ["mx1.payer.test", "mx2.payer.test"]
    assert routes[0].tls_name == "mx1.payer.test" and routes[0].port == 25
    await router.resolve("payer.test")
    assert calls == ["payer.test"]
    now[0] = 61
    await router.resolve("payer.test")
    assert calls == ["payer.test", "payer.test"]


async def test_the_mx_cache_keeps_a_bounded_number_of_domains() -> None:
    # Millions of members spread over many domains: the oldest lookups make room.
    calls: list[str] = []

    async def lookup(domain: str) -> list[tuple[int, str]]:
        calls.append(domain)
        return [(10, f"mx.{domain}")]

    router = Router({}, mx_lookup=lookup, cache_ttl=3600, max_cached=3)
    for n in range(10):
        await router.resolve(f"d{n}.test")
    assert router.cached == 3
    await router.resolve("d9.test")  # still cached
    await router.resolve("d0.test")  # looked up again
    assert calls[-1] == "d0.test" and calls.count("d9.test") == 1


def test_static_routes_verify_ip_hosts_against_the_domain() -> None:
    routes = parse_static_routes(
        {"a.test": "127.0.0.5:2525", "b.test": "relay.b.test:587", "c.test": "[::1]:25"}
    )
    assert routes["a.test"] == Route("127.0.0.5", 2525, "a.test")
    assert routes["b.test"] == Route("relay.b.test", 587, "relay.b.test")
    assert routes["c.test"] == Route("::1", 25, "c.test")


async def test_a_notice_to_a_receiver_without_shared_tls_goes_in_plaintext_an_eob_never(
    sandbox: Sandbox, pki: TestPki
) -> None:
    # STARTTLS is offered, but only TLS 1.0/1.1: the handshake fails. A notice (no PHI)
    # goes as to a receiver without STARTTLS; what requires verified TLS never does.
    sender = "eob-notices@payer.test"
    before = _connects("plaintext_after_tls_failure")
    transport = _transport(sandbox, pki)
    try:
        notice = await transport.deliver(sender, f"a@{OLDTLS}", MESSAGE, verified_tls=False)
        with pytest.raises(DeliveryError) as refused:
            await transport.deliver(sender, f"b@{OLDTLS}", MESSAGE)
    finally:
        await transport.aclose()
    assert not notice.tls_verified and notice.tls_version is None
    assert refused.value.reason is ReasonCode.TLS_HANDSHAKE_FAILED
    assert sandbox.counts[OLDTLS] == 1
    assert _connects("plaintext_after_tls_failure") == before + 1


async def test_a_message_the_first_mx_may_have_taken_is_not_sent_to_the_next(
    sandbox: Sandbox, pki: TestPki
) -> None:
    # The first MX drops the line after the content went out: it may have accepted the
    # message. The second MX must not get a copy too; the caller decides what comes next.
    first, second = sandbox.routes[DROPPER], sandbox.routes[OK]
    routes = [Route(first[0], first[1], DROPPER), Route(second[0], second[1], OK)]

    class TwoMx(Router):
        async def resolve(self, domain: str) -> list[Route]:
            return routes

    transport = Transport(TwoMx({}), SmtpPool(make_tls_context(str(pki.ca)), ehlo_name="x.test"))
    try:
        with pytest.raises(DeliveryError) as lost:
            await transport.deliver("eob-notices@payer.test", f"a@{DROPPER}", MESSAGE)
    finally:
        await transport.aclose()
    assert lost.value.reason is ReasonCode.CONNECTION_LOST and lost.value.sent
    assert sandbox.counts[OK] == 0


async def test_notices_without_phi_use_what_the_receiver_offers(
    sandbox: Sandbox, pki: TestPki
) -> None:
    # Opportunistic mode is for secure-portal notices only (they carry no PHI): verified
    # TLS when possible, else unverified TLS, else plaintext.
    transport = _transport(sandbox, pki)
    sender = "eob-notices@payer.test"
    verified = await transport.deliver(sender, f"a@{OK}", MESSAGE, verified_tls=False)
    unverified = await transport.deliver(sender, f"b@{UNTRUSTED}", MESSAGE, verified_tls=False)
    plaintext = await transport.deliver(sender, f"c@{NOTLS}", MESSAGE, verified_tls=False)
    await transport.aclose()
    assert verified.tls_verified and verified.tls_version is not None
    assert not unverified.tls_verified and unverified.tls_version is not None
    assert not plaintext.tls_verified and plaintext.tls_version is None
    assert sandbox.counts[OK] == sandbox.counts[UNTRUSTED] == sandbox.counts[NOTLS] == 1
    # and the same receivers still get nothing that requires verified TLS
    strict = _transport(sandbox, pki)
    for domain in (UNTRUSTED, NOTLS):
        with pytest.raises(DeliveryError):
            await strict.deliver(sender, f"d@{domain}", MESSAGE)
    await strict.aclose()
    assert sandbox.counts[UNTRUSTED] == sandbox.counts[NOTLS] == 1


def _pool_waits() -> float:
    return metrics.REGISTRY.get_sample_value("eobblast_smtp_pool_waits_total") or 0.0


async def test_a_returned_connection_wakes_one_waiter_not_all(
    sandbox: Sandbox, pki: TestPki
) -> None:
    # Eight messages for one connection: each waits once, in turn. Waking every waiter on
    # each return would have all of them look and queue again (28 waits, not 7).
    pool = SmtpPool(make_tls_context(str(pki.ca)), ehlo_name="sender.test")
    limits = ConnectionLimits("single", max_connections=1, max_messages=100)
    key = PoolKey(None, *sandbox.routes[OK], OK)
    order: list[int] = []

    async def send(n: int) -> None:
        async with pool.connection(key, limits) as conn:
            order.append(n)
            await conn.send("eob-notices@payer.test", f"w{n}@{OK}", MESSAGE)

    before, count = _pool_waits(), sandbox.counts[OK]
    try:
        await asyncio.wait_for(asyncio.gather(*(send(n) for n in range(8))), 30)
    finally:
        await pool.aclose()
    assert _pool_waits() - before == 7
    assert order == list(range(8))  # in the order they asked
    assert sandbox.counts[OK] - count == 8


async def test_a_waiter_cancelled_after_its_turn_came_passes_the_turn_on(
    sandbox: Sandbox, pki: TestPki
) -> None:
    pool = SmtpPool(make_tls_context(str(pki.ca)), ehlo_name="sender.test")
    limits = ConnectionLimits("single", max_connections=1, max_messages=100)
    key = PoolKey(None, *sandbox.routes[OK], OK)
    try:
        held = await pool.acquire(key, limits)
        first = asyncio.create_task(pool.acquire(key, limits))
        second = asyncio.create_task(pool.acquire(key, limits))
        await asyncio.sleep(0.1)
        await pool.release(held)  # the first waiter's turn...
        first.cancel()  # ...but it is cancelled before it could take the connection
        with pytest.raises(asyncio.CancelledError):
            await first
        conn = await asyncio.wait_for(second, 5)  # the turn was not lost with it
        await conn.send("eob-notices@payer.test", f"turn@{OK}", MESSAGE)
        await pool.release(conn)
    finally:
        await pool.aclose()
