"""MTA-STS end to end: a real DNS server and a real HTTPS policy host on loopback.

The TXT and A answers come from a small UDP DNS server (dnspython's message API), the
policies from an HTTPS server whose certificates the sandbox's test CA issued, and the
mail goes to sandbox MX servers: an enforce policy must make a domain TLS-required and
keep its PHI off an MX the policy does not list; everything that goes wrong must leave
the domain with no policy, be counted, and still let the notice be handled.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import orjson
import pytest

from eobblast.config import Config, load_config
from eobblast.demo import prepare_keys
from eobblast.errors import DeliveryError, Outcome, ReasonCode
from eobblast.events.synthetic import Mix, generate_events
from eobblast.observe import metrics
from eobblast.pipeline import EventOutcome, Pipeline
from eobblast.protect import mta_sts_store
from eobblast.protect.mta_sts import StsMode, StsProblem, StsRecord
from eobblast.protect.mta_sts_store import StsStore, open_sts_store
from eobblast.protect.services import ProtectionServices
from eobblast.sandbox import Sandbox, SandboxDomain, TestPki, make_test_pki
from eobblast.transport import Router, SmtpPool, Transport, make_tls_context
from eobblast.transport.mta_sts import MAX_POLICY_BYTES, MtaStsFetcher, MtaStsPolicies
from eobblast.transport.routes import parse_static_routes
from tests.conftest import PgRelay

# Two sandbox MX servers on one port: the domains' MX records name the unlisted one first.
UNLISTED, LISTED = "127.0.43.1", "127.0.43.2"
UNLISTED_MX, LISTED_MX = "unlisted.mx.sandbox.test", "listed.mx.sandbox.test"
WRONG_CERT = "wrongcert.test"
CLEAN = Mix(no_consent=0, invalid_address=0, malformed=0, unknown_user=0, busy_mailbox=0, gone=0)
PATH = "/.well-known/mta-sts.txt"


def policy(mode: str = "enforce", mx: str = LISTED, max_age: int = 86400) -> bytes:
    return f"version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: {max_age}\r\n".encode()


@dataclass
class Page:
    """What the policy host answers for one domain."""

    body: bytes = b""
    status: int = 200
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    declare_length: bool = True
    delay: float = 0.0  # seconds before the answer


# Each domain's _mta-sts TXT record (None: no record) and its policy host's answer.
DOMAINS: dict[str, tuple[str | None, Page]] = {
    "enforce.test": ("v=STSv1; id=1", Page(policy())),
    "testing.test": ("v=STSv1; id=1", Page(policy("testing"))),
    "none.test": ("v=STSv1; id=1", Page(b"version: STSv1\nmode: none\nmax_age: 86400\n")),
    "nomatch.test": ("v=STSv1; id=1", Page(policy(mx="mx.elsewhere.test"))),
    "notxt.test": (None, Page(policy())),
    "badtxt.test": ("v=STSv1; id=", Page(policy())),
    "badpolicy.test": ("v=STSv1; id=1", Page(policy(mode="reject"))),
    "httperror.test": ("v=STSv1; id=1", Page(policy(), status=404)),
    "redirect.test": (
        "v=STSv1; id=1",
        Page(status=301, headers={"Location": f"https://mta-sts.enforce.test{PATH}"}),
    ),
    "html.test": ("v=STSv1; id=1", Page(policy(), content_type="text/html")),
    "oversize.test": ("v=STSv1; id=1", Page(policy() + b"#" * MAX_POLICY_BYTES)),
    "oversize-undeclared.test": (
        "v=STSv1; id=1",
        Page(policy() + b"x" * MAX_POLICY_BYTES, declare_length=False),
    ),
    WRONG_CERT: ("v=STSv1; id=1", Page(policy())),
    # A compressed body is taken as it came, never inflated (nor its size cap with it).
    "gzip.test": (
        "v=STSv1; id=1",
        Page(gzip.compress(policy()), headers={"Content-Encoding": "gzip"}),
    ),
    "nohost.test": ("v=STSv1; id=1", Page(policy())),  # mta-sts.nohost.test has no address
    "slow.test": ("v=STSv1; id=1", Page(policy())),  # its TXT query is never answered
    "cached.test": ("v=STSv1; id=1", Page(policy(max_age=100))),
    "busy.test": ("v=STSv1; id=1", Page(policy())),
    "v6fail.test": ("v=STSv1; id=1", Page(policy())),  # its policy host's AAAA query fails
    "lagging.test": ("v=STSv1; id=1", Page(policy(), delay=0.3)),
    "xn--bcher-kva.test": ("v=STSv1; id=1", Page(policy())),  # bücher.test
    "static.test": ("v=STSv1; id=1", Page(policy(mx="mx.elsewhere.test"))),
    # Kept beside the ledger (a PostgreSQL schema is shared by the module: a domain per test)
    "kept-dns.test": ("v=STSv1; id=1", Page(policy())),
    "kept-https.test": ("v=STSv1; id=1", Page(policy())),
    "unchanged-id.test": ("v=STSv1; id=1", Page(policy())),
    "expiring.test": ("v=STSv1; id=1", Page(policy(max_age=100))),
    "purged.test": ("v=STSv1; id=1", Page(policy(max_age=100))),
    "purger.test": ("v=STSv1; id=1", Page(policy())),
    "storeless.test": ("v=STSv1; id=1", Page(policy())),
    "renewed.test": ("v=STSv1; id=1", Page(policy())),
}
FAILURES = {
    "notxt.test": StsProblem.NO_RECORD,
    "badtxt.test": StsProblem.TXT_SYNTAX,
    "badpolicy.test": StsProblem.POLICY_MODE,
    "httperror.test": StsProblem.HTTP_STATUS,
    "redirect.test": StsProblem.HTTP_REDIRECT,
    "html.test": StsProblem.CONTENT_TYPE,
    "oversize.test": StsProblem.TOO_LARGE,
    "oversize-undeclared.test": StsProblem.TOO_LARGE,
    WRONG_CERT: StsProblem.TLS_ERROR,
    "gzip.test": StsProblem.POLICY_ENCODING,
    "nohost.test": StsProblem.NO_ADDRESS,
}


# ----------------------------------------------------------------------------- DNS server


class Zone(asyncio.DatagramProtocol):
    """A tiny authoritative DNS server over UDP: answers from `records`, counts queries."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int], list[str]] = {}
        self.silent: set[str] = set()
        self.servfail: set[tuple[str, int]] = set()
        self.queries: Counter[tuple[str, int]] = Counter()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().lower()
        self.queries[(name, question.rdtype)] += 1
        if name in self.silent:
            return
        response = dns.message.make_response(query)
        answers = self.records.get((name, question.rdtype))
        if (name, question.rdtype) in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif answers:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 60, "IN", question.rdtype, answers)
            )
        elif not any(known == name for known, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)

    def txt(self, domain: str, text: str | None) -> None:
        """Set (or, with None, remove) the domain's _mta-sts TXT record."""
        key = (f"_mta-sts.{domain}.", dns.rdatatype.TXT)
        if text is None:
            self.records.pop(key, None)
        else:
            self.records[key] = [f'"{text}"']


@pytest.fixture
async def zone() -> AsyncIterator[tuple[Zone, int]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Zone, local_addr=("127.0.0.1", 0))
    for domain, (txt, _) in DOMAINS.items():
        protocol.txt(domain, txt)
        if domain != "nohost.test":
            protocol.records[(f"mta-sts.{domain}.", dns.rdatatype.A)] = ["127.0.0.1"]
    protocol.silent.add("_mta-sts.slow.test.")
    protocol.servfail.add(("mta-sts.v6fail.test.", dns.rdatatype.AAAA))
    try:
        yield protocol, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


# --------------------------------------------------------------------------- HTTPS server


class PolicyHost(ThreadingHTTPServer):
    """Serves each domain's policy page at mta-sts.<domain>, by the Host header."""

    daemon_threads = True

    def __init__(self, pki: TestPki) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.pages = {f"mta-sts.{domain}": page for domain, (_, page) in DOMAINS.items()}
        self.hits: Counter[str] = Counter()
        self.cookies: list[str | None] = []  # the Cookie header of each request
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        wrong = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        wrong.load_cert_chain(pki.wrong_host_cert, pki.wrong_host_key)

        def pick(connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            # One host presents a CA-signed certificate for another name.
            if name == f"mta-sts.{WRONG_CERT}":
                connection.context = wrong

        context.sni_callback = pick
        self.socket = context.wrap_socket(self.socket, server_side=True)


class _Handler(BaseHTTPRequestHandler):
    server: PolicyHost

    def do_GET(self) -> None:
        host = self.headers.get("Host", "").partition(":")[0]
        self.server.hits[host] += 1
        self.server.cookies.append(self.headers.get("Cookie"))
        page = self.server.pages.get(host) if self.path == PATH else None
        if page is None:
            self.send_error(404)
            return
        time.sleep(page.delay)
        self.send_response(page.status)
        self.send_header("Content-Type", page.content_type)
        # Shared hosting's cookies: never to be sent on, to this domain or another.
        self.send_header("Set-Cookie", f"host={host}; Path=/")
        for name, value in page.headers.items():
            self.send_header(name, value)
        if page.declare_length:
            self.send_header("Content-Length", str(len(page.body)))
        self.end_headers()
        self.wfile.write(page.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    # static.test: a static route to an IP address is verified against the domain's name.
    names = [UNLISTED_MX, LISTED_MX, UNLISTED, LISTED, "static.test"]
    names += [f"mta-sts.{domain}" for domain in DOMAINS]
    return make_test_pki(tmp_path_factory.mktemp("pki"), names)


@pytest.fixture
def policy_host(pki: TestPki) -> Iterator[PolicyHost]:
    server = PolicyHost(pki)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _policies(
    zone: tuple[Zone, int],
    policy_host: PolicyHost,
    pki: TestPki,
    *,
    clock: Callable[[], float] = time.monotonic,
    store: StsStore | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> MtaStsPolicies:
    """A worker's policies, its DNS and HTTPS on loopback."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = zone[1]
    fetcher = MtaStsFetcher(
        make_tls_context(str(pki.ca)),
        resolver=resolver,
        https_port=policy_host.server_address[1],
        timeout=2.0,
    )
    return MtaStsPolicies(
        fetcher, wait=0.5, recheck=10.0, clock=clock, store=store, wall_clock=wall_clock
    )


@pytest.fixture
async def policies(
    zone: tuple[Zone, int], policy_host: PolicyHost, pki: TestPki, clock: Clock
) -> AsyncIterator[MtaStsPolicies]:
    found = _policies(zone, policy_host, pki, clock=clock)
    try:
        yield found
    finally:
        await found.aclose()


def _lookups(result: str) -> float:
    return float(metrics.MTA_STS_LOOKUPS.labels(result)._value.get())


def _mismatches(mode: str) -> float:
    return float(metrics.MTA_STS_MX_MISMATCHES.labels(mode)._value.get())


# ------------------------------------------------------------------ fetching and caching


async def test_an_enforce_policy_is_fetched(
    policies: MtaStsPolicies, policy_host: PolicyHost
) -> None:
    before = _lookups("fetched")
    found = await policies.policy("Enforce.TEST.")
    assert found is not None and found.mode is StsMode.ENFORCE and found.mx == (LISTED,)
    assert _lookups("fetched") - before == 1
    assert policy_host.hits == {"mta-sts.enforce.test": 1}


async def test_no_cookie_goes_from_one_policy_host_to_another(
    policies: MtaStsPolicies, policy_host: PolicyHost
) -> None:
    # Both hosts are at one address, as on shared hosting, and each sets a cookie.
    for domain in ("enforce.test", "testing.test", "cached.test"):
        assert await policies.policy(domain) is not None
    assert policy_host.cookies == [None, None, None]


async def test_a_failing_aaaa_query_leaves_the_a_addresses(policies: MtaStsPolicies) -> None:
    found = await policies.policy("v6fail.test")
    assert found is not None and found.mode is StsMode.ENFORCE


@pytest.mark.parametrize(("domain", "problem"), FAILURES.items())
async def test_every_failure_means_no_policy_and_is_counted(
    policies: MtaStsPolicies, domain: str, problem: StsProblem
) -> None:
    before = _lookups(problem)
    assert await policies.policy(domain) is None
    assert _lookups(problem) - before == 1


async def test_an_unanswered_lookup_gives_up_within_the_wait(
    policies: MtaStsPolicies, zone: tuple[Zone, int]
) -> None:
    before = _lookups(StsProblem.TIMEOUT)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await policies.policy("slow.test") is None
    assert loop.time() - start < 1.5  # wait is 0.5 s
    assert _lookups(StsProblem.TIMEOUT) - before == 1
    # Not asked again at once: the next message to the domain does not wait again.
    asked = zone[0].queries[("_mta-sts.slow.test.", dns.rdatatype.TXT)]
    assert await policies.policy("slow.test") is None
    assert zone[0].queries[("_mta-sts.slow.test.", dns.rdatatype.TXT)] == asked


async def test_the_policy_is_fetched_again_only_for_a_new_id_or_after_max_age(
    policies: MtaStsPolicies, zone: tuple[Zone, int], policy_host: PolicyHost, clock: Clock
) -> None:
    dns_server, _ = zone
    txt = ("_mta-sts.cached.test.", dns.rdatatype.TXT)
    found = await policies.policy("cached.test")
    assert found is not None and found.mode is StsMode.ENFORCE and found.max_age == 100
    assert policy_host.hits["mta-sts.cached.test"] == 1 and dns_server.queries[txt] == 1

    clock.now += 5  # within recheck (10 s): neither DNS nor HTTPS
    assert await policies.policy("cached.test") == found
    assert dns_server.queries[txt] == 1 and policy_host.hits["mta-sts.cached.test"] == 1

    clock.now += 10  # the TXT record is looked at again: same id, no fetch
    before = _lookups("unchanged")
    assert await policies.policy("cached.test") == found
    assert dns_server.queries[txt] == 2 and policy_host.hits["mta-sts.cached.test"] == 1
    assert _lookups("unchanged") - before == 1

    # A new id: the new policy is fetched at once (the next recheck).
    dns_server.txt("cached.test", "v=STSv1; id=2")
    policy_host.pages["mta-sts.cached.test"] = Page(policy("testing", max_age=100))
    clock.now += 10
    changed = await policies.policy("cached.test")
    assert changed is not None and changed.mode is StsMode.TESTING
    assert policy_host.hits["mta-sts.cached.test"] == 2

    # Same id, but max_age has passed since that fetch: fetched again.
    policy_host.pages["mta-sts.cached.test"] = Page(policy(max_age=100))
    clock.now += 100
    again = await policies.policy("cached.test")
    assert again is not None and again.mode is StsMode.ENFORCE
    assert policy_host.hits["mta-sts.cached.test"] == 3


async def test_a_failed_refresh_keeps_a_valid_policy_until_max_age(
    policies: MtaStsPolicies, zone: tuple[Zone, int], policy_host: PolicyHost, clock: Clock
) -> None:
    found = await policies.policy("cached.test")
    assert found is not None and found.mode is StsMode.ENFORCE
    zone[0].txt("cached.test", "v=STSv1; id=2")
    policy_host.pages["mta-sts.cached.test"] = Page(status=500)
    clock.now += 50
    assert await policies.policy("cached.test") == found  # kept: RFC 8461 section 5.1
    assert policy_host.hits["mta-sts.cached.test"] == 2
    zone[0].txt("cached.test", None)  # the record is gone: the cached policy still holds
    clock.now += 40
    assert await policies.policy("cached.test") == found
    clock.now += 20  # 110 s after the fetch: expired
    assert await policies.policy("cached.test") is None


async def test_an_internationalised_domain_is_fetched_by_its_a_label(
    policies: MtaStsPolicies, policy_host: PolicyHost
) -> None:
    found = await policies.policy("bücher.test")
    assert found is not None and found.mode is StsMode.ENFORCE
    assert policy_host.hits == {"mta-sts.xn--bcher-kva.test": 1}


class _Broken(MtaStsFetcher):
    async def record(self, domain: str) -> StsRecord | StsProblem:
        raise RuntimeError(domain)


async def test_a_bug_in_a_lookup_means_no_policy_not_a_failed_notice(pki: TestPki) -> None:
    broken = MtaStsPolicies(_Broken(make_tls_context(str(pki.ca))))
    before = _lookups(StsProblem.INTERNAL_ERROR)
    try:
        assert await broken.policy("enforce.test") is None
    finally:
        await broken.aclose()
    assert _lookups(StsProblem.INTERNAL_ERROR) - before == 1


async def test_concurrent_messages_share_one_fetch(
    policies: MtaStsPolicies, policy_host: PolicyHost
) -> None:
    found = await asyncio.gather(*(policies.policy("busy.test") for _ in range(20)))
    assert all(f is not None and f.mode is StsMode.ENFORCE for f in found)
    assert policy_host.hits["mta-sts.busy.test"] == 1


async def test_a_message_cancelled_while_waiting_does_not_cancel_the_fetch_for_others(
    policies: MtaStsPolicies, policy_host: PolicyHost
) -> None:
    # The first message's record is revoked mid-lookup: the second still gets the policy
    # from that one fetch, within the wait, not from a second one started afresh.
    first = asyncio.create_task(policies.policy("lagging.test"))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(policies.policy("lagging.test"))
    await asyncio.sleep(0)
    first.cancel()
    found = await second
    assert found is not None and found.mode is StsMode.ENFORCE
    assert policy_host.hits["mta-sts.lagging.test"] == 1
    assert first.cancelled()


# ------------------------------------------- policies kept beside the ledger (restarts)


def _store_errors(operation: str) -> float:
    return float(metrics.MTA_STS_STORE_ERRORS.labels(operation)._value.get())


@pytest.fixture
async def workers(
    zone: tuple[Zone, int], policy_host: PolicyHost, pki: TestPki, store_url: str
) -> AsyncIterator[Callable[..., Awaitable[MtaStsPolicies]]]:
    """Starts a worker's policies (a new process: nothing in memory), with or without the
    policy table beside the ledger at `store_url`; all closed after the test."""
    started: list[MtaStsPolicies] = []

    async def start(
        *,
        shared: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> MtaStsPolicies:
        store = await open_sts_store(store_url) if shared else None
        found = _policies(zone, policy_host, pki, clock=clock, store=store, wall_clock=wall_clock)
        started.append(found)
        return found

    try:
        yield start
    finally:
        for found in started:
            await found.aclose()


@pytest.mark.parametrize("shared", [True, False], ids=["kept", "memory_only"])
@pytest.mark.parametrize("failure", ["dns_silent", "https_failing"])
async def test_a_policy_fetched_before_a_restart_holds_when_the_next_fetch_fails(
    workers: Callable[..., Awaitable[MtaStsPolicies]],
    zone: tuple[Zone, int],
    policy_host: PolicyHost,
    shared: bool,
    failure: str,
) -> None:
    domain = "kept-dns.test" if failure == "dns_silent" else "kept-https.test"
    first = await workers(shared=shared)
    found = await first.policy(domain)
    assert found is not None and found.mode is StsMode.ENFORCE
    # A restart (or another worker), while whoever sits on the path blocks the lookup: its
    # TXT query unanswered, or a new id whose policy cannot be fetched.
    if failure == "dns_silent":
        zone[0].silent.add(f"_mta-sts.{domain}.")
    else:
        zone[0].txt(domain, "v=STSv1; id=2")
        policy_host.pages[f"mta-sts.{domain}"] = Page(status=503)
    second = await workers(shared=shared)
    kept = await second.policy(domain)
    if shared:
        assert kept == found  # RFC 8461 section 5.1: the cached policy holds
    else:
        assert kept is None  # memory only: the enforce protection was stripped
    assert policy_host.hits[f"mta-sts.{domain}"] == (1 if failure == "dns_silent" else 2)


async def test_an_unchanged_id_needs_no_second_fetch_in_another_worker(
    workers: Callable[..., Awaitable[MtaStsPolicies]],
    zone: tuple[Zone, int],
    policy_host: PolicyHost,
) -> None:
    domain = "unchanged-id.test"
    first, second = await workers(), await workers()
    found = await first.policy(domain)
    before = _lookups("unchanged")
    assert await second.policy(domain) == found
    assert policy_host.hits[f"mta-sts.{domain}"] == 1  # one fetch for both workers
    assert zone[0].queries[(f"_mta-sts.{domain}.", dns.rdatatype.TXT)] == 2  # each looked
    assert _lookups("unchanged") - before == 1


async def test_a_new_id_one_worker_fetched_needs_no_fetch_in_another(
    workers: Callable[..., Awaitable[MtaStsPolicies]],
    zone: tuple[Zone, int],
    policy_host: PolicyHost,
    clock: Clock,
) -> None:
    domain = "renewed.test"
    first, second = await workers(clock=clock), await workers(clock=clock)
    assert await first.policy(domain) == await second.policy(domain)
    assert policy_host.hits[f"mta-sts.{domain}"] == 1
    # The domain publishes a new policy: the first worker to look fetches it, the other
    # finds it in the table under the id its TXT lookup saw.
    zone[0].txt(domain, "v=STSv1; id=2")
    policy_host.pages[f"mta-sts.{domain}"] = Page(policy("testing"))
    clock.now += 11  # past recheck
    renewed = await first.policy(domain)
    assert renewed is not None and renewed.mode is StsMode.TESTING
    assert await second.policy(domain) == renewed
    assert policy_host.hits[f"mta-sts.{domain}"] == 2


async def test_a_stored_policy_holds_until_max_age_from_its_fetch_never_after(
    workers: Callable[..., Awaitable[MtaStsPolicies]], zone: tuple[Zone, int]
) -> None:
    domain = "expiring.test"  # max_age 100
    fetched_at = time.time()
    found = await (await workers(wall_clock=lambda: fetched_at)).policy(domain)
    assert found is not None and found.max_age == 100
    zone[0].silent.add(f"_mta-sts.{domain}.")  # every later refresh fails
    almost = await workers(wall_clock=lambda: fetched_at + 95)
    assert await almost.policy(domain) == found
    late = await workers(wall_clock=lambda: fetched_at + 101)
    assert await late.policy(domain) is None  # expired: never used


async def test_expired_policies_are_purged_from_the_table(
    workers: Callable[..., Awaitable[MtaStsPolicies]], store_url: str
) -> None:
    fetched_at = time.time()
    assert await (await workers(wall_clock=lambda: fetched_at)).policy("purged.test")
    store = await open_sts_store(store_url)
    try:
        assert await store.load("purged.test") is not None
        # A worker whose clock is past that policy's max_age writes a policy of its own.
        later = await workers(wall_clock=lambda: fetched_at + 200)
        assert await later.policy("purger.test") is not None
        assert await store.load("purged.test") is None
        assert await store.load("purger.test") is not None
    finally:
        await store.close()


async def test_a_failing_store_does_not_fail_the_lookup(
    zone: tuple[Zone, int], policy_host: PolicyHost, pki: TestPki, store_url: str
) -> None:
    store = await open_sts_store(store_url)
    await store.close()  # every call fails from now on
    found = _policies(zone, policy_host, pki, store=store)
    before = _store_errors("load")
    try:
        fetched = await found.policy("storeless.test")
        assert fetched is not None and fetched.mode is StsMode.ENFORCE
        assert _store_errors("load") - before == 1
        # Left alone a while: one outage does not cost every domain a wait for it.
        assert await found.policy("enforce.test") is not None
        assert _store_errors("load") - before == 1
    finally:
        await found.aclose()


# -------------------------------------------------------------------- delivery and policy


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def sandbox(tmp_path: Path, pki: TestPki) -> AsyncIterator[Sandbox]:
    port = _free_port(UNLISTED)
    domains = [SandboxDomain(UNLISTED_MX, UNLISTED, port), SandboxDomain(LISTED_MX, LISTED, port)]
    async with Sandbox(domains, tmp_path / "mail", pki) as running:
        yield running


@pytest.fixture
async def transport(
    sandbox: Sandbox, pki: TestPki, policies: MtaStsPolicies
) -> AsyncIterator[Transport]:
    async def mx(domain: str) -> list[tuple[int, str]]:
        return [(20, LISTED), (10, UNLISTED)]

    port = sandbox.routes[UNLISTED_MX][1]
    static = parse_static_routes({"static.test": f"{UNLISTED}:{port}"})
    router = Router(static, mx_lookup=mx, port=port)
    pool = SmtpPool(make_tls_context(str(pki.ca)), ehlo_name="eobblast.test")
    sending = Transport(router, pool, mta_sts=policies)
    try:
        yield sending
    finally:
        await sending.aclose()


def _config(tmp_path: Path, **protection: Any) -> Config:
    prepare_keys(tmp_path / "keys", tmp_path / "dns", "eob1", ed25519=False)
    return load_config(
        environ={},
        overrides={
            "dkim": {"key_dir": str(tmp_path / "keys"), "ed25519": False},
            "pipeline": {"allow_test_domains": True},
            "protection": protection,
        },
    )


def _event(domain: str) -> bytes:
    raw = next(iter(generate_events(1, seed=7, domains=[domain], weights=None, mix=CLEAN)))
    doc = orjson.loads(raw)
    member = doc["member"]
    member["email"] = f"member@{domain}"
    member["consent"]["electronic_delivery"] = True
    member.pop("smime_certificate", None)
    member.pop("preference", None)
    return orjson.dumps(doc)


async def _process(
    tmp_path: Path, transport: Transport, domain: str, **protection: Any
) -> tuple[EventOutcome, ProtectionServices]:
    config = _config(tmp_path, **protection)
    services = ProtectionServices.policy_only(config)  # no portal: a portal EOB fails
    pipeline = Pipeline(config, transport, protection=services)
    return await pipeline.process(_event(domain)), services


async def test_enforce_makes_the_domain_tls_required_and_skips_an_unlisted_mx(
    tmp_path: Path, transport: Transport, sandbox: Sandbox
) -> None:
    before = _mismatches("enforce")
    outcome, _ = await _process(tmp_path, transport, "enforce.test")
    # Nothing else is known of the domain: without the policy this EOB would go to the
    # portal (tls_unknown), and to the preferred, unlisted MX if it went by TLS.
    assert (outcome.protection, outcome.protection_reason) == ("tls_required", "mta_sts_enforce")
    assert outcome.outcome is Outcome.DELIVERED and outcome.tls_version is not None
    assert sandbox.counts.get(UNLISTED_MX, 0) == 0 and sandbox.counts[LISTED_MX] == 1
    assert _mismatches("enforce") - before == 1


async def test_no_listed_mx_sends_the_eob_to_the_portal_not_elsewhere(
    tmp_path: Path, transport: Transport, sandbox: Sandbox
) -> None:
    outcome, services = await _process(tmp_path, transport, "nomatch.test")
    # Protected again as a portal notice (which this pipeline, without a portal, cannot
    # send): the EOB reached no MX at all, and the domain is portal-only for a while.
    assert outcome.protection == "portal"
    assert outcome.protection_reason == "tls_failed_at_delivery"
    assert outcome.reason is ReasonCode.PORTAL_UNAVAILABLE
    assert sum(sandbox.counts.values()) == 0
    assert services.tls.facts("nomatch.test", dt.datetime.now(dt.UTC)).last_failed_at is not None


async def test_no_listed_mx_gets_no_portal_notice_either(
    transport: Transport, sandbox: Sandbox
) -> None:
    # A notice carries no PHI but its pickup link: at an MX the policy does not list (an
    # attacker's, named by a forged DNS answer) it would be tried against the member's
    # date of birth. It fails as a deferral, the receiver not at fault.
    await _notice_deferred(transport, "nomatch.test", ReasonCode.MTA_STS_NO_MATCHING_MX)
    assert sum(sandbox.counts.values()) == 0


async def _notice_deferred(transport: Transport, domain: str, reason: ReasonCode) -> None:
    """A portal notice (no PHI, unverified TLS allowed) to `domain` fails with `reason`,
    temporarily."""
    with pytest.raises(DeliveryError) as failed:
        await transport.deliver(
            "bounces@eob.test", f"member@{domain}", b"Subject: x\r\n\r\nx\r\n", verified_tls=False
        )
    assert failed.value.reason is reason
    assert not failed.value.permanent


async def test_enforce_asks_verified_tls_of_a_portal_notice_too(
    sandbox: Sandbox, policies: MtaStsPolicies, transport: Transport
) -> None:
    # The listed MX's certificate does not verify here (this pool trusts only the system's
    # CAs): a notice must not go past it, and it is deferred, not a bounce of the member.
    async def mx(domain: str) -> list[tuple[int, str]]:
        return [(20, LISTED)]

    port = sandbox.routes[LISTED_MX][1]
    untrusting = Transport(
        Router({}, mx_lookup=mx, port=port),
        SmtpPool(make_tls_context(None), ehlo_name="eobblast.test"),
        mta_sts=policies,
    )
    try:
        await _notice_deferred(untrusting, "enforce.test", ReasonCode.TLS_CERT_UNTRUSTED)
    finally:
        await untrusting.aclose()
    assert sum(sandbox.counts.values()) == 0


@pytest.mark.parametrize("domain", ["testing.test", "none.test"])
async def test_testing_and_none_change_nothing(
    tmp_path: Path, transport: Transport, sandbox: Sandbox, domain: str
) -> None:
    outcome, _ = await _process(tmp_path, transport, domain)
    assert (outcome.protection, outcome.protection_reason) == ("portal", "tls_unknown")
    # On the TLS list, the EOB goes to the preferred MX, listed by the policy or not.
    before = _mismatches("testing")
    outcome, _ = await _process(tmp_path, transport, domain, tls_policy_domains=[domain])
    assert outcome.outcome is Outcome.DELIVERED
    assert sandbox.counts[UNLISTED_MX] == 1 and sandbox.counts.get(LISTED_MX, 0) == 0
    assert _mismatches("testing") - before == (1 if domain == "testing.test" else 0)


@pytest.mark.parametrize("domain", sorted(FAILURES))
async def test_a_domain_whose_policy_fails_is_still_delivered(
    tmp_path: Path, transport: Transport, sandbox: Sandbox, domain: str
) -> None:
    outcome, _ = await _process(tmp_path, transport, domain, tls_policy_domains=[domain])
    assert outcome.outcome is Outcome.DELIVERED
    assert (outcome.protection, outcome.protection_reason) == ("tls_required", "tls_policy_list")
    assert sandbox.counts[UNLISTED_MX] == 1  # no policy: the MX records alone, as before


async def test_a_static_route_is_never_fetched(
    tmp_path: Path, transport: Transport, sandbox: Sandbox, zone: tuple[Zone, int]
) -> None:
    # static.test publishes an enforce policy listing another host: it must not apply.
    outcome, _ = await _process(
        tmp_path, transport, "static.test", tls_policy_domains=["static.test"]
    )
    assert outcome.outcome is Outcome.DELIVERED and sandbox.counts[UNLISTED_MX] == 1
    assert not any(name.endswith("static.test.") for name, _ in zone[0].queries)


async def test_a_frozen_policy_table_costs_lookups_one_wait_not_one_each(
    zone: tuple[Zone, int],
    policy_host: PolicyHost,
    pki: TestPki,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker starts (every domain due) while the PostgreSQL server behind the table
    # stops answering: the first store call waits its bound; those queued behind it give
    # up then, rather than each wait as long (a restart with many domains would stall for
    # minutes). The store's calls stay outside the lookup's own wait, so none is cut off
    # midway and each failure is counted.
    monkeypatch.setattr(mta_sts_store, "ANSWER_WAIT", 1.0)
    async with PgRelay() as path:
        store = await open_sts_store(path.url(pg_schema))
        found = _policies(zone, policy_host, pki, store=store)
        try:
            before = _store_errors("load")
            path.freeze()
            async with asyncio.timeout(10):  # each waiting its bound: 4 s and more
                results = await asyncio.gather(
                    *(found.policy(d) for d in ("enforce.test", "testing.test", "busy.test"))
                )
            # The lookups themselves went on without the table.
            assert [r is not None for r in results] == [True, True, True]
            assert _store_errors("load") - before == 1
        finally:
            await found.aclose()
