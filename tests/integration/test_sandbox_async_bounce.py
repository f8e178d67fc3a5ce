"""Sandbox receivers that accept, then bounce a moment later with a real DSN, end to end:
sandbox -> DSN over SMTP -> bounce listener -> BounceService.on_dsn -> held / retry."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiosmtplib
import orjson
import pytest

from eobblast.bounces.category import BounceCategory
from eobblast.bounces.listener import BounceListener, serve_bounces
from eobblast.bounces.service import BounceReason, BounceService, DsnReport, SendPermitted
from eobblast.bounces.state import EobStatus
from eobblast.bounces.store import BounceStore, open_bounce_store
from eobblast.bounces.verp import VerpKey, make_return_path
from eobblast.errors import Outcome
from eobblast.sandbox import Behaviour, Sandbox, SandboxDomain, TestPki, make_test_pki

LATER = "later.sandbox.test"
KEY = VerpKey(2, b"sandbox-bounce-secret-012345678")
BOUNCE_DOMAIN = "bounce.test"
HOST = "127.0.0.1"


class Publisher:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        self.records.append((topic, key, value))


class Stack:
    """A store, the service, its listener and a sandbox whose DSNs go to the listener."""

    def __init__(
        self,
        store: BounceStore,
        service: BounceService,
        listener: BounceListener,
        sandbox: Sandbox,
        publisher: Publisher,
        reports: list[DsnReport],
    ) -> None:
        self.store = store
        self.service = service
        self.listener = listener
        self.sandbox = sandbox
        self.publisher = publisher
        self.reports = reports


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"), [LATER])


@pytest.fixture
async def stack(tmp_path: Path, pki: TestPki) -> AsyncIterator[Stack]:
    store = await open_bounce_store(f"sqlite:///{tmp_path / 'bounces.db'}")
    publisher = Publisher()
    service = BounceService(store, publisher, verp_keys=[KEY], bounce_domain=BOUNCE_DOMAIN)
    reports: list[DsnReport] = []

    async def handle(raw: bytes, envelope_to: str) -> DsnReport:
        report = await service.on_dsn(raw, envelope_to)
        reports.append(report)
        return report

    listener = await serve_bounces(
        handle, HOST, 0, bounce_domain=BOUNCE_DOMAIN, review_dir=tmp_path / "review"
    )
    domains = [
        SandboxDomain(
            LATER,
            "127.0.16.1",
            recipient_rules=(("gone-", Behaviour.BOUNCE_LATER), ("full-", Behaviour.DEFER_LATER)),
        )
    ]
    sandbox = Sandbox(
        domains, tmp_path / "mail", pki, bounce_route=(HOST, listener.port), bounce_delay=0.05
    )
    await sandbox.start()
    try:
        yield Stack(store, service, listener, sandbox, publisher, reports)
    finally:
        await sandbox.stop()
        await listener.stop()
        await store.close()


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - waiting for the sandbox's thread
            await asyncio.sleep(0.01)


def notice(event_id: str, to: str) -> bytes:
    return (
        f"From: eob-notices@payer.test\r\nTo: {to}\r\nSubject: Your EOB\r\n"
        f"X-EOB-Event-ID: {event_id}\r\nMessage-ID: <{event_id}@payer.test>\r\n\r\n"
        "A notice.\r\n"
    ).encode()


async def send_via_sandbox(stack: Stack, event_id: str, member_id: str, to: str) -> None:
    raw_event = orjson.dumps({"event_id": event_id})
    gate = await stack.service.gate(event_id, member_id, to, raw_event)
    assert isinstance(gate, SendPermitted)
    host, port = stack.sandbox.routes[LATER]
    return_path = make_return_path(event_id, KEY, BOUNCE_DOMAIN)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=5) as smtp:
        _, reply = await smtp.sendmail(return_path, [gate.to], notice(event_id, gate.to))
    assert reply.startswith("2.0.0 Ok: queued")  # accepted first: the bounce comes later
    await stack.service.on_delivered(event_id, gate.to)


async def test_accept_then_hard_bounce_holds_the_notice(stack: Stack) -> None:
    await send_via_sandbox(stack, "ev-gone-1", "M-gone-1", f"gone-1@{LATER}")
    await eventually(lambda: len(stack.reports) == 1)
    [report] = stack.reports
    assert report.inbound.event_id == "ev-gone-1" and not report.needs_review
    [result] = report.results
    assert result.category is BounceCategory.HARD_ADDRESS
    assert result.outcome.outcome is Outcome.HELD
    row = await stack.store.eob("ev-gone-1")
    assert row is not None and row[0].status is EobStatus.HELD_FOR_VERIFICATION
    assert [t for t, _, _ in stack.publisher.records] == ["eob.address-verification"]
    # The sandbox counts its DSN once the listener has replied, after the report exists.
    await eventually(lambda: stack.sandbox.dsns_sent != {})
    assert stack.sandbox.dsns_sent == {LATER: 1}
    # The DSN is RFC 3464: multipart/report with a message/delivery-status part.
    accepted = stack.sandbox.received[0]
    assert accepted.rcpt_tos == (f"gone-1@{LATER}",)


async def test_accept_then_mailbox_full_schedules_a_retry(stack: Stack) -> None:
    await send_via_sandbox(stack, "ev-full-1", "M-full-1", f"full-1@{LATER}")
    await eventually(lambda: len(stack.reports) == 1)
    [result] = stack.reports[0].results
    assert result.category is BounceCategory.MAILBOX_FULL
    assert result.outcome.outcome is Outcome.DEFERRED
    assert result.outcome.reason is BounceReason.RETRY_SCHEDULED
    assert stack.publisher.records == []


async def test_accepted_recipients_do_not_bounce(stack: Stack) -> None:
    await send_via_sandbox(stack, "ev-ok-1", "M-ok-1", f"member@{LATER}")
    await asyncio.sleep(0.2)
    assert stack.reports == [] and stack.sandbox.dsns_sent == {}


async def test_a_dsn_is_never_sent_for_a_bounce(stack: Stack) -> None:
    host, port = stack.sandbox.routes[LATER]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=5) as smtp:
        await smtp.sendmail("", [f"gone-2@{LATER}"], notice("ev-null", f"gone-2@{LATER}"))
    await asyncio.sleep(0.2)
    assert stack.reports == [] and stack.sandbox.dsns_sent == {}


async def test_the_dsn_is_rfc_3464(tmp_path: Path, pki: TestPki) -> None:
    # A plain SMTP receiver as the bounce route, to look at the DSN itself.
    got: list[bytes] = []
    listener = await serve_bounces(
        lambda raw, rcpt: _keep(got, raw),
        HOST,
        0,
        bounce_domain=BOUNCE_DOMAIN,
        review_dir=tmp_path / "review",
    )
    domain = SandboxDomain(LATER, "127.0.16.2", behaviour=Behaviour.BOUNCE_LATER)
    try:
        async with Sandbox(
            [domain], tmp_path / "mail", pki, bounce_route=(HOST, listener.port), bounce_delay=0
        ) as sandbox:
            host, port = sandbox.routes[LATER]
            return_path = make_return_path("ev-rfc", KEY, BOUNCE_DOMAIN)
            async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
                await smtp.sendmail(return_path, [f"anyone@{LATER}"], notice("ev-rfc", "x"))
            await eventually(lambda: len(got) == 1)
    finally:
        await listener.stop()
    dsn = email.message_from_bytes(got[0], policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert str(dsn["To"]) == return_path
    parts = [part.get_content_type() for part in dsn.iter_parts()]
    assert parts == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = got[0].decode()
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert f"Final-Recipient: rfc822; anyone@{LATER}" in status
    assert "X-EOB-Event-ID: ev-rfc" in status
    assert "A notice." not in status  # headers only: never the notice's content
    assert "Arrival-Date: " in status and "Reporting-MTA: dns; later.sandbox.test" in status


class _Seen:
    review_reason = None


async def _keep(got: list[bytes], raw: bytes) -> _Seen:
    got.append(raw)
    return _Seen()
