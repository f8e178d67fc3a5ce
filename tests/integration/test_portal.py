"""The secure portal over real HTTP, on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email
import logging
import re
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import psycopg
import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from eobblast.config import load_config
from eobblast.errors import StoreNotAnswering
from eobblast.events import EobIssued, validate_event
from eobblast.observe.audit import (
    AuditAction,
    AuditError,
    AuditOutcomeUnknown,
    AuditRecord,
    AuditTrail,
    member_ref,
    open_audit,
)
from eobblast.observe.metrics import REGISTRY
from eobblast.portal import (
    PortalServer,
    Rate,
    create_app,
    csrf_secret_from,
    purge_and_record,
    serve_portal,
)
from eobblast.protect import escrow as escrow_module
from eobblast.protect.escrow import (
    AccessRecord,
    EscrowItem,
    EscrowStore,
    KeyRing,
    PickupClient,
    PickupFailure,
    escrow_eob,
    open_escrow,
)
from eobblast.protect.services import ProtectionServices
from eobblast.render.mime import Renderer
from eobblast.state import postgres
from tests.conftest import (
    PG_COMMIT,
    PgRelay,
    drop_store_connection,
    service_logging,
    throwaway_pg_schema,
)
from tests.kafka_fixtures import free_port

REF_KEY = b"member-ref-key-for-tests-only-32"
NOW = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)
LOCKOUT = 3
GENEROUS = Rate(burst=1000, per_minute=1000)


class Clock:
    """A settable clock for the app and the store."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class Stores:
    url: str
    escrow: EscrowStore
    audit: AuditTrail


@dataclass
class Eob:
    """An escrowed EOB and what a member would type (and what must never leak)."""

    token: str
    event: EobIssued
    html: str

    @property
    def dob(self) -> dt.date:
        assert self.event.member.date_of_birth is not None
        return self.event.member.date_of_birth

    @property
    def last4(self) -> str:
        """What the notice asks for: the last 4 digits of the member id."""
        return "".join(ch for ch in self.event.member.id if ch.isdigit())[-4:]

    def secrets(self) -> list[str]:
        """Strings that are PHI, or the token: none may be stored or logged."""
        member = self.event.member
        return [
            self.token,
            member.name,
            member.id,
            member.email,
            self.dob.isoformat(),
            self.dob.strftime("%m/%d/%Y"),
            self.event.claim.id,
            self.event.claim.patient_name,
        ]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway schema on the machine's PostgreSQL, dropped afterwards."""
    with throwaway_pg_schema("portal") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'portal.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def keys(tmp_path: Path) -> KeyRing:
    return KeyRing.generate(tmp_path / "escrow-keys")


@pytest.fixture
async def stores(store_url: str, keys: KeyRing) -> AsyncIterator[Stores]:
    escrow = await open_escrow(store_url, keys)
    audit = await open_audit(store_url)
    yield Stores(store_url, escrow, audit)
    await escrow.close()
    await audit.close()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


async def start(
    stores: Stores, clock: Clock, *, forwarded_allow_ips: str | None = None, **options: Any
) -> PortalServer:
    settings: dict[str, Any] = {
        "lockout_after": LOCKOUT,
        "per_ip": GENEROUS,
        "per_link": GENEROUS,
        "purge_interval": None,
        "clock": clock,
    }
    settings.update(options)
    app = create_app(stores.escrow, stores.audit, **settings)
    return await serve_portal(app, forwarded_allow_ips=forwarded_allow_ips)


@pytest.fixture
async def portal(stores: Stores, clock: Clock) -> AsyncIterator[PortalServer]:
    server = await start(stores, clock)
    yield server
    await server.stop()


@pytest.fixture
async def client(portal: PortalServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=portal.url, timeout=10) as http:
        yield http


def eob_html(event: EobIssued) -> str:
    """The HTML part the renderer puts in the email: what the portal escrows."""
    message = email.message_from_bytes(Renderer().render(event, now=NOW).to_bytes())
    for part in message.walk():
        if part.get_content_type() == "text/html":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode("utf-8")
    raise AssertionError("no HTML part")


async def escrow(
    stores: Stores,
    event_doc: dict[str, Any],
    *,
    expires_in: dt.timedelta = dt.timedelta(days=30),
    language: str = "en",
    event_id: str | None = None,
) -> Eob:
    doc = {**event_doc, "event_id": event_id or f"evt-{uuid.uuid4().hex[:12]}"}
    doc["member"] = {**doc["member"], "preferred_language": language}
    event = validate_event(orjson.dumps(doc), allow_test_domains=True)
    assert isinstance(event, EobIssued) and event.member.date_of_birth is not None
    html = eob_html(event)
    item = EscrowItem(
        event_id=event.event_id,
        member_ref=member_ref(REF_KEY, event.member.id),
        member_id=event.member.id,
        date_of_birth=event.member.date_of_birth,
        html=html,
        expires_at=NOW + expires_in,
        language=event.member.preferred_language,
    )
    token = await escrow_eob(stores.escrow, stores.audit, item, actor="worker-1", now=NOW)
    return Eob(token, event, html)


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no csrf field in the form"
    return found.group(1)


async def submit(
    client: httpx.AsyncClient,
    token: str,
    dob: dt.date,
    last4: str,
    *,
    csrf: str | None = None,
) -> httpx.Response:
    if csrf is None:
        form = await client.get(f"/p/{token}")
        assert form.status_code == 200, form.text
        csrf = csrf_of(form.text)
    return await client.post(f"/p/{token}", data={"csrf": csrf, **fields(dob, last4)})


def fields(dob: dt.date, last4: str) -> dict[str, str]:
    """The identity form's answers as a browser posts them (without its csrf field)."""
    return {
        "dob_month": str(dob.month),
        "dob_day": str(dob.day),
        "dob_year": str(dob.year),
        "last4": last4,
    }


def wrong_dob(eob: Eob) -> dt.date:
    return eob.dob + dt.timedelta(days=1)


async def actions(stores: Stores, event_id: str) -> list[tuple[str, str | None]]:
    return [(str(r.action), r.reason) for r in await stores.audit.records(event_id=event_id)]


# ---------------------------------------------------------------- pickup


async def test_pickup_shows_the_eob_once_with_strict_headers(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    eob = await escrow(stores, event_doc)
    form = await client.get(f"/p/{eob.token}")
    assert form.status_code == 200
    assert '<label for="last4">' in form.text and '<label for="dob-year">' in form.text
    assert eob.event.member.name not in form.text  # nothing about the member before the check
    assert form.headers["cache-control"] == "no-store"
    assert form.headers["referrer-policy"] == "no-referrer"
    assert "form-action 'self'" in form.headers["content-security-policy"]
    assert "script-src" not in form.headers["content-security-policy"]  # default-src 'none'

    shown = await submit(client, eob.token, eob.dob, eob.last4.lower(), csrf=csrf_of(form.text))
    assert shown.status_code == 200
    assert shown.text == eob.html
    assert eob.event.member.name in shown.text and "NOT A BILL" in shown.text.upper()
    assert shown.headers["cache-control"] == "no-store"
    assert shown.headers["x-frame-options"] == "DENY"
    assert shown.headers["referrer-policy"] == "no-referrer"
    csp = shown.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp and "frame-ancestors 'none'" in csp

    again = await client.get(f"/p/{eob.token}")
    assert again.status_code == 410 and "already been used" in again.text
    assert eob.event.member.name not in again.text
    replay = await client.post(f"/p/{eob.token}", data={"csrf": csrf_of(form.text)})
    assert replay.status_code == 410

    assert await actions(stores, eob.event.event_id) == [
        ("portal_escrowed", None),
        ("portal_pickup", "identity_verified"),
        ("portal_pickup_failed", "already_used"),
    ]
    records = await stores.audit.records(event_id=eob.event.event_id)
    assert {r.member_ref for r in records} == {member_ref(REF_KEY, eob.event.member.id)}
    assert {r.protection for r in records} == {"portal"}
    assert [r.actor for r in records] == ["worker-1", "portal", "portal"]


@pytest.mark.parametrize(
    ("member_id", "digits"), [("XYZ123456789-01", "8901"), ("ABC-12", "12"), ("M.7:X_9", "79")]
)
async def test_members_answer_with_the_last_4_digits_of_their_id(
    stores: Stores,
    client: httpx.AsyncClient,
    event_doc: dict[str, Any],
    member_id: str,
    digits: str,
) -> None:
    # The notice and the form ask for the last 4 *digits*: a dependant's "XYZ123456789-01"
    # is 8901, not "9-01" (which locked members out). An id with fewer digits: all of them.
    doc = {**event_doc, "member": {**event_doc["member"], "id": member_id}}
    eob = await escrow(stores, doc)
    form = await client.get(f"/p/{eob.token}")
    assert "Last 4 digits of your member ID" in form.text and "fewer than 4 digits" in form.text
    assert re.search(r'<input id="last4"[^>]* inputmode="numeric" pattern="\[0-9\]\*"', form.text)
    # Its last four characters: a typo, not a guess (not counted), answered with the rule.
    typed = await submit(client, eob.token, eob.dob, member_id[-4:], csrf=csrf_of(form.text))
    assert typed.status_code == 422 and "last 4 digits of your member ID" in typed.text
    response = await submit(client, eob.token, eob.dob, digits)
    assert response.status_code == 200 and eob.html in response.text
    assert await actions(stores, eob.event.event_id) == [
        ("portal_escrowed", None),
        ("portal_pickup", "identity_verified"),
    ]


async def test_the_spanish_form_asks_for_digits_too(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    eob = await escrow(stores, event_doc, language="es")
    form = await client.get(f"/p/{eob.token}")
    assert "Últimos 4 dígitos de su número de miembro" in form.text
    assert "menos de 4 dígitos" in form.text and "caracteres" not in form.text


async def test_two_simultaneous_right_answers_open_once(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    eob = await escrow(stores, event_doc)
    csrf = csrf_of((await client.get(f"/p/{eob.token}")).text)
    answers = await asyncio.gather(
        *(submit(client, eob.token, eob.dob, eob.last4, csrf=csrf) for _ in range(4))
    )
    assert sorted(a.status_code for a in answers) == [200, 410, 410, 410]


async def test_the_portal_speaks_the_members_language(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    eob = await escrow(stores, event_doc, language="es-MX")
    form = await client.get(f"/p/{eob.token}")
    assert '<html lang="es">' in form.text and "Fecha de nacimiento" in form.text
    wrong = await submit(client, eob.token, wrong_dob(eob), eob.last4)
    assert "Intentos restantes: 2" in wrong.text
    assert (await submit(client, eob.token, eob.dob, eob.last4)).status_code == 200
    assert "ya se usó" in (await client.get(f"/p/{eob.token}")).text


async def test_unknown_and_malformed_links_reveal_nothing(client: httpx.AsyncClient) -> None:
    for path in ("/p/" + "A" * 43, "/p/short", "/p/" + "%00" * 10, "/p/%ff%fe" + "A" * 41):
        page = await client.get(path)
        assert page.status_code == 404
        assert "not valid" in page.text
        posted = await client.post(path, data={"last4": "1234"})
        assert posted.status_code == 404


async def test_an_event_escrowed_again_keeps_only_its_latest_link(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    # A portal notice retried after a timeout past DATA, or released to a verified address,
    # is escrowed again: the earlier link (its notice may have been accepted, even at an
    # address that later bounced) must not open as well.
    event_id = f"evt-{uuid.uuid4().hex[:12]}"
    first = await escrow(stores, event_doc, event_id=event_id)
    bystander = await escrow(stores, event_doc)
    second = await escrow(stores, event_doc, event_id=event_id)

    for page in (await client.get(f"/p/{first.token}"), await client.post(f"/p/{first.token}")):
        assert page.status_code == 404 and "not valid" in page.text  # as for an unknown link
        assert [value for value in first.secrets() if value in page.text] == []
    assert (await stores.escrow.status(first.token, NOW)).failure is PickupFailure.UNKNOWN
    assert (await submit(client, second.token, second.dob, second.last4)).text == second.html
    assert (
        await submit(client, bystander.token, bystander.dob, bystander.last4)
    ).status_code == 200

    records = await stores.audit.records(event_id=event_id)
    assert [(str(r.action), r.reason, r.actor) for r in records] == [
        ("portal_escrowed", None, "worker-1"),
        ("portal_escrowed", None, "worker-1"),
        ("portal_expired_purged", "superseded", "worker-1"),
        ("portal_pickup", "identity_verified", "portal"),
    ]
    # The record names the revoked item, the first one escrowed.
    assert records[2].item_id == records[0].item_id != records[1].item_id
    assert records[2].member_ref == member_ref(REF_KEY, first.event.member.id)
    # Gone from the store, not waiting for the purge: nothing is left to expire but these.
    purged = await stores.escrow.purge_expired_items(NOW + dt.timedelta(days=365))
    assert sorted(item.final_state for item in purged if item.event_id == event_id) == ["picked_up"]


async def test_an_item_picked_up_is_not_revoked_by_a_later_one(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    event_id = f"evt-{uuid.uuid4().hex[:12]}"
    first = await escrow(stores, event_doc, event_id=event_id)
    assert (await submit(client, first.token, first.dob, first.last4)).status_code == 200
    second = await escrow(stores, event_doc, event_id=event_id)
    again = await client.get(f"/p/{first.token}")
    assert again.status_code == 410 and "already been used" in again.text
    assert (await submit(client, second.token, second.dob, second.last4)).status_code == 200
    assert [action for action, _ in await actions(stores, event_id)] == [
        "portal_escrowed",
        "portal_pickup",
        "portal_escrowed",
        "portal_pickup",
    ]


# ---------------------------------------------------------------- wrong answers


async def test_wrong_answers_are_counted_and_lock_the_link(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    eob = await escrow(stores, event_doc)
    first = await submit(client, eob.token, wrong_dob(eob), eob.last4)
    assert first.status_code == 403 and "Attempts left: 2" in first.text
    assert 'role="alert"' in first.text
    second = await submit(client, eob.token, eob.dob, "0000" if eob.last4 != "0000" else "1111")
    assert second.status_code == 403 and "Attempts left: 1" in second.text
    # The messages are the same whichever answer was wrong.
    assert first.text.split("Attempts left")[0] == second.text.split("Attempts left")[0]
    third = await submit(client, eob.token, wrong_dob(eob), eob.last4)
    assert third.status_code == 423 and "locked" in third.text

    # Locked for good: even the right answers are refused, and so is the form.
    assert (await client.get(f"/p/{eob.token}")).status_code == 423
    status = await stores.escrow.status(eob.token, NOW)
    assert status.failure is PickupFailure.LOCKED
    late = await client.post(f"/p/{eob.token}", data={"last4": eob.last4})
    assert late.status_code == 423

    assert await actions(stores, eob.event.event_id) == [
        ("portal_escrowed", None),
        ("portal_pickup_failed", "wrong_answer"),
        ("portal_pickup_failed", "wrong_answer"),
        ("portal_pickup_failed", "wrong_answer"),
        ("portal_locked", "too_many_failures"),
        ("portal_pickup_failed", "locked"),
    ]


async def test_typos_and_forged_forms_are_not_counted(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    eob = await escrow(stores, event_doc)
    other = await escrow(stores, event_doc)
    csrf = csrf_of((await client.get(f"/p/{eob.token}")).text)
    typo = await client.post(
        f"/p/{eob.token}",
        data={"csrf": csrf, "dob_month": "13", "dob_day": "1", "dob_year": "1980", "last4": "1"},
    )
    assert typo.status_code == 422 and "month, day and year" in typo.text
    # No CSRF token, a forged one, another link's: refused with a fresh form, not counted.
    other_csrf = csrf_of((await client.get(f"/p/{other.token}")).text)
    # Percent-escapes decode to non-ASCII text: "²" passes isdigit() but not int(), and
    # compare_digest refuses non-ASCII; either must be a refusal, not a server error.
    now = int(NOW.timestamp())
    for bad in ("", "1.forged", other_csrf, "\u00b2.x", f"{now}.\u00e9"):
        forged = await submit(client, eob.token, eob.dob, eob.last4, csrf=bad)
        assert forged.status_code == 403 and "expired" in forged.text
    # The right token from another browser (it lacks the SameSite cookie): refused too.
    async with httpx.AsyncClient(base_url=str(client.base_url)) as other_browser:
        cross = await submit(other_browser, eob.token, eob.dob, eob.last4, csrf=csrf)
        assert cross.status_code == 403
    oversized = await client.post(
        f"/p/{eob.token}",
        content=b"x" * 10_000,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert oversized.status_code == 400
    # None of that counted: the first real wrong answer leaves LOCKOUT - 1 attempts.
    wrong = await submit(client, eob.token, wrong_dob(eob), eob.last4)
    assert f"Attempts left: {LOCKOUT - 1}" in wrong.text
    assert (await submit(client, eob.token, eob.dob, eob.last4)).status_code == 200
    assert await actions(stores, eob.event.event_id) == [
        ("portal_escrowed", None),
        ("portal_pickup_failed", "wrong_answer"),
        ("portal_pickup", "identity_verified"),
    ]


# ---------------------------------------------------------------- expiry and purge


async def test_expired_links_are_refused_then_purged(
    stores: Stores, client: httpx.AsyncClient, clock: Clock, event_doc: dict[str, Any]
) -> None:
    short = await escrow(stores, event_doc, expires_in=dt.timedelta(hours=1))
    used = await escrow(stores, event_doc, expires_in=dt.timedelta(hours=1))
    assert (await submit(client, used.token, used.dob, used.last4)).status_code == 200
    later = await escrow(stores, event_doc, expires_in=dt.timedelta(days=30))

    clock.now = NOW + dt.timedelta(hours=2)
    page = await client.get(f"/p/{short.token}")
    assert page.status_code == 410 and "expired" in page.text
    assert short.event.member.name not in page.text
    assert (await client.get(f"/p/{later.token}")).status_code == 200

    assert await purge_and_record(stores.escrow, stores.audit, clock.now) == 2
    assert await stores.escrow.purge_expired(clock.now) == 0
    gone = await client.get(f"/p/{short.token}")
    assert gone.status_code == 404
    assert (await stores.escrow.status(later.token, clock.now)).failure is None
    assert (await actions(stores, short.event.event_id))[-1] == (
        "portal_expired_purged",
        "unopened",
    )
    assert (await actions(stores, used.event.event_id))[-1] == (
        "portal_expired_purged",
        "picked_up",
    )


async def test_the_app_purges_on_a_schedule_and_stops_cleanly(
    stores: Stores, clock: Clock, event_doc: dict[str, Any]
) -> None:
    eob = await escrow(stores, event_doc, expires_in=dt.timedelta(minutes=5))
    clock.now = NOW + dt.timedelta(minutes=10)
    server = await start(stores, clock, purge_interval=0.05)
    try:
        async with asyncio.timeout(5):
            while True:
                if (await actions(stores, eob.event.event_id))[-1][0] == "portal_expired_purged":
                    break
                await asyncio.sleep(0.02)
    finally:
        await server.stop()
    assert not [t for t in asyncio.all_tasks() if t.get_name() in ("portal-purge", "portal-server")]


# ---------------------------------------------------------------- rate limits


async def test_guesses_are_rate_limited_per_link(
    stores: Stores, clock: Clock, event_doc: dict[str, Any]
) -> None:
    eob = await escrow(stores, event_doc)
    server = await start(stores, clock, per_link=Rate(burst=2, per_minute=1))
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            csrf = csrf_of((await http.get(f"/p/{eob.token}")).text)
            codes = [
                (await submit(http, eob.token, wrong_dob(eob), eob.last4, csrf=csrf)).status_code
                for _ in range(3)
            ]
            assert codes == [403, 403, 429]
            limited = await submit(http, eob.token, eob.dob, eob.last4, csrf=csrf)
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
            # Another link from the same client is not held back by this one.
            other = await escrow(stores, event_doc)
            assert (await submit(http, other.token, other.dob, other.last4)).status_code == 200
    finally:
        await server.stop()
    status = await stores.escrow.status(eob.token, NOW)
    assert status.failure is None  # the limited guesses were never counted


async def test_requests_are_rate_limited_per_client(
    stores: Stores, clock: Clock, event_doc: dict[str, Any]
) -> None:
    eob = await escrow(stores, event_doc)
    server = await start(stores, clock, per_ip=Rate(burst=3, per_minute=1))
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            codes = [(await http.get(f"/p/{eob.token}")).status_code for _ in range(4)]
            assert codes == [200, 200, 200, 429]
            assert (await http.get("/healthz")).status_code == 200
    finally:
        await server.stop()


async def test_behind_a_trusted_proxy_each_client_has_its_own_limit(
    stores: Stores, clock: Clock, event_doc: dict[str, Any]
) -> None:
    # [portal] trusted_proxies: the proxy's X-Forwarded-For names the client. Without it
    # every member behind the proxy would share one limit (and lock each other out).
    eob = await escrow(stores, event_doc)
    app = create_app(
        stores.escrow,
        stores.audit,
        lockout_after=LOCKOUT,
        per_ip=Rate(burst=2, per_minute=1),
        per_link=GENEROUS,
        purge_interval=None,
        clock=clock,
    )
    settings = load_config(environ={}, overrides={"portal": {"trusted_proxies": ["127.0.0.1"]}})
    server = await serve_portal(app, forwarded_allow_ips=settings.portal.forwarded_allow_ips)
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:

            async def codes(client_ip: str) -> list[int]:
                headers = {"X-Forwarded-For": client_ip}
                return [
                    (await http.get(f"/p/{eob.token}", headers=headers)).status_code
                    for _ in range(3)
                ]

            assert await codes("198.51.100.7") == [200, 200, 429]
            assert await codes("203.0.113.9") == [200, 200, 429]  # not the first one's limit
    finally:
        await server.stop()


async def test_behind_a_tls_proxy_pages_still_insist_on_https(
    stores: Stores, clock: Clock, event_doc: dict[str, Any]
) -> None:
    # `eobblast portal` serves plain HTTP to the TLS proxy in front. With https links the
    # browser must still get HSTS and a Secure cookie, whatever scheme this hop has.
    eob = await escrow(stores, event_doc)
    plain = await start(stores, clock)
    behind_proxy = await start(stores, clock, https=True)
    try:
        async with httpx.AsyncClient() as one, httpx.AsyncClient() as other:  # two browsers
            direct = await one.get(f"{plain.url}/p/{eob.token}")
            proxied = await other.get(f"{behind_proxy.url}/p/{eob.token}")
    finally:
        await plain.stop()
        await behind_proxy.stop()
    assert direct.status_code == proxied.status_code == 200
    assert "strict-transport-security" not in direct.headers
    assert "secure" not in direct.headers["set-cookie"].lower()
    assert proxied.headers["strict-transport-security"].startswith("max-age=")
    assert "; secure" in proxied.headers["set-cookie"].lower()


async def test_portal_processes_sharing_the_reference_key_accept_each_others_forms(
    stores: Stores, clock: Clock, event_doc: dict[str, Any]
) -> None:
    # Behind a load balancer (or across a restart) the form comes from one process and
    # the answers go to another: the CSRF secret is derived from the shared key.
    eob = await escrow(stores, event_doc)
    first = await start(stores, clock, csrf_secret=csrf_secret_from(REF_KEY))
    second = await start(stores, clock, csrf_secret=csrf_secret_from(REF_KEY))
    stranger = await start(stores, clock, csrf_secret=csrf_secret_from(b"another-key" * 3))
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            # Cookies are not per port: the browser sends its nonce to every process.
            form = await http.get(f"{first.url}/p/{eob.token}")
            csrf = csrf_of(form.text)
            answers = {
                "csrf": csrf,
                "dob_month": str(eob.dob.month),
                "dob_day": str(eob.dob.day),
                "dob_year": str(eob.dob.year),
                "last4": eob.last4,
            }
            refused = await http.post(f"{stranger.url}/p/{eob.token}", data=answers)
            accepted = await http.post(f"{second.url}/p/{eob.token}", data=answers)
    finally:
        for server in (first, second, stranger):
            await server.stop()
    assert refused.status_code == 403
    assert accepted.status_code == 200 and eob.html in accepted.text


# ---------------------------------------------------------------- who tried, and what ops see


async def test_each_attempt_is_kept_with_the_members_address_and_user_agent(
    stores: Stores, clock: Clock, event_doc: dict[str, Any]
) -> None:
    # Behind the TLS proxy (trusted), the address is the one its X-Forwarded-For names.
    eob = await escrow(stores, event_doc)
    agent = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) " + " ".join(["Gecko/20100101"] * 12)
    server = await start(stores, clock, forwarded_allow_ips="127.0.0.1")
    try:
        headers = {"user-agent": agent, "x-forwarded-for": "198.51.100.7"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
            assert (await submit(http, eob.token, wrong_dob(eob), eob.last4)).status_code == 403
            assert (await submit(http, eob.token, eob.dob, eob.last4)).status_code == 200
            http.headers["x-forwarded-for"] = "2001:db8::7"
            used = await http.post(f"/p/{eob.token}", data=fields(eob.dob, eob.last4))
            assert used.status_code == 410
            assert (
                await http.post("/p/" + "A" * 43, data=fields(eob.dob, eob.last4))
            ).status_code == 404
    finally:
        await server.stop()
    records = await stores.escrow.access_records(event_id=eob.event.event_id)
    assert [(r.outcome, r.client.address) for r in records] == [
        ("wrong_answer", "198.51.100.7"),
        ("picked_up", "198.51.100.7"),
        ("already_used", "2001:db8::7"),
    ]
    assert {r.client.user_agent for r in records} == {agent[:128]}
    assert {r.at for r in records} == {NOW} and len({r.item_id for r in records}) == 1
    everything = await stores.escrow.access_records()
    assert [(r.outcome, r.item_id, r.event_id, r.client.address) for r in everything[3:]] == [
        ("unknown", None, None, "2001:db8::7")
    ]
    # Kept [portal] access_days, apart from the items (which go at expiry).
    assert await stores.escrow.purge_access(NOW) == 0
    assert await stores.escrow.purge_access(NOW + dt.timedelta(seconds=1)) == 4
    assert await stores.escrow.access_records() == []


async def test_the_app_forgets_access_records_after_access_days(
    stores: Stores, clock: Clock, event_doc: dict[str, Any]
) -> None:
    eob = await escrow(stores, event_doc)
    someone = PickupClient("192.0.2.1", "curl/8.5.0")
    for days_ago in (3, 1):
        at = NOW - dt.timedelta(days=days_ago)
        await stores.escrow.record_access(
            AccessRecord(at, "expired", None, eob.event.event_id, someone)
        )
    server = await start(stores, clock, purge_interval=0.05, access_days=2)
    try:
        async with asyncio.timeout(5):
            while True:
                if len(await stores.escrow.access_records()) == 1:
                    break
                await asyncio.sleep(0.02)
    finally:
        await server.stop()
    [kept] = await stores.escrow.access_records()
    assert kept.at == NOW - dt.timedelta(days=1)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def portal_counts() -> dict[str, float]:
    counts = {
        outcome: metric("eobblast_portal_pickups_total", outcome=outcome)
        for outcome in ("picked_up", "wrong_answer", "locked", "already_used", "unknown")
    }
    counts["lockouts"] = metric("eobblast_portal_lockouts_total")
    counts["limited_client"] = metric("eobblast_portal_rate_limited_total", limit="client")
    counts["limited_link"] = metric("eobblast_portal_rate_limited_total", limit="link")
    counts["audit_gaps"] = metric("eobblast_audit_write_failures_total")
    return counts


async def test_ops_see_pickups_lockouts_and_refusals_in_the_metrics(
    stores: Stores, clock: Clock, event_doc: dict[str, Any]
) -> None:
    before = portal_counts()
    eob = await escrow(stores, event_doc)
    other = await escrow(stores, event_doc)
    server = await start(stores, clock, per_link=Rate(burst=LOCKOUT + 1, per_minute=0.01))
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            csrf = csrf_of((await http.get(f"/p/{eob.token}")).text)
            codes = [
                (await submit(http, eob.token, wrong_dob(eob), eob.last4, csrf=csrf)).status_code
                for _ in range(LOCKOUT + 2)
            ]
            assert codes == [403] * (LOCKOUT - 1) + [423, 423, 429]
            assert (await submit(http, other.token, other.dob, other.last4)).status_code == 200
            assert (await http.post(f"/p/{'B' * 43}", data={"last4": "1"})).status_code == 404
    finally:
        await server.stop()
    after = portal_counts()
    assert {name: after[name] - before[name] for name in after} == {
        "picked_up": 1,
        "wrong_answer": LOCKOUT,
        "locked": 1,
        "already_used": 0,
        "unknown": 1,
        "lockouts": 1,
        "limited_client": 0,
        "limited_link": 1,
        "audit_gaps": 0,
    }
    # Outcomes not met yet are exported at 0: an alert on the first one needs a sample.
    assert (
        REGISTRY.get_sample_value("eobblast_portal_pickups_total", {"outcome": "expired"})
        is not None
    )


class TrailFailingOn:
    """The audit trail, except that appends of one action (of one event, if given) fail
    (the disk, say)."""

    def __init__(self, inner: AuditTrail, action: AuditAction, event_id: str | None = None) -> None:
        self._inner = inner
        self._action = action
        self._event_id = event_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def append(self, record: AuditRecord) -> None:
        if record.action is self._action and self._event_id in (None, record.event_id):
            raise sqlite3.OperationalError("disk I/O error")
        await self._inner.append(record)


async def test_a_purge_whose_audit_record_fails_counts_the_gap_and_records_the_rest(
    stores: Stores, clock: Clock, event_doc: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # The items are deleted in one statement before their records are written: one record
    # refused must not leave the others unrecorded and uncounted, or fail the purge run.
    eobs = [await escrow(stores, event_doc, expires_in=dt.timedelta(hours=1)) for _ in range(3)]
    refused = eobs[1].event.event_id
    trail = cast(
        AuditTrail, TrailFailingOn(stores.audit, AuditAction.PORTAL_EXPIRED_PURGED, refused)
    )
    before = portal_counts()["audit_gaps"]
    clock.now = NOW + dt.timedelta(hours=2)
    assert await purge_and_record(stores.escrow, trail, clock.now) == 3
    assert portal_counts()["audit_gaps"] == before + 1
    for eob in eobs:
        purged = ("portal_expired_purged", "unopened") in await actions(stores, eob.event.event_id)
        assert purged is (eob.event.event_id != refused)
    [line] = [r for r in caplog.records if r.getMessage().startswith("portal purge not recorded")]
    assert getattr(line, "event_id", None) == refused
    for eob in eobs:
        assert not any(secret in caplog.text for secret in eob.secrets())


async def test_a_pickup_whose_audit_record_fails_is_counted_and_kept_in_the_access_records(
    stores: Stores, clock: Clock, event_doc: dict[str, Any]
) -> None:
    # The EOB is already spent: the member still gets it, and ops are told (the counter
    # EobblastAuditGap watches) with what to reconcile the audit trail from.
    eob = await escrow(stores, event_doc)
    trail = cast(AuditTrail, TrailFailingOn(stores.audit, AuditAction.PORTAL_PICKUP))
    before = portal_counts()["audit_gaps"]
    server = await serve_portal(create_app(stores.escrow, trail, purge_interval=None, clock=clock))
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            shown = await submit(http, eob.token, eob.dob, eob.last4)
    finally:
        await server.stop()
    assert shown.status_code == 200 and shown.text == eob.html
    assert portal_counts()["audit_gaps"] == before + 1
    assert await actions(stores, eob.event.event_id) == [("portal_escrowed", None)]
    [record] = await stores.escrow.access_records(event_id=eob.event.event_id)
    assert (record.outcome, record.client.address) == ("picked_up", "127.0.0.1")


async def test_eobblast_portal_serves_its_metrics_and_sees_members_through_the_proxy(
    tmp_path: Path, event_doc: dict[str, Any]
) -> None:
    # The command ops run: its own metrics port (never the members'), [portal]
    # trusted_proxies naming the TLS proxy (here, this machine), http links on loopback.
    listen, metrics_port = free_port(), free_port()
    settings = {
        "portal": {
            "base_url": f"http://127.0.0.1:{listen}/p/",
            "escrow_url": f"sqlite:///{tmp_path / 'escrow.db'}",
            "audit_url": f"sqlite:///{tmp_path / 'audit.db'}",
            "key_dir": str(tmp_path / "portal-keys"),
            "audit_key_file": str(tmp_path / "portal-keys" / "audit.key"),
            "listen_port": listen,
            "metrics_port": metrics_port,
            "trusted_proxies": ["127.0.0.1"],
        },
        "bounces": {"enabled": False},
    }
    config_file = tmp_path / "eobblast.toml"
    config_file.write_text(tomli_w.dumps(settings))
    config = load_config(config_file, environ={})
    services = await ProtectionServices.open(config)  # as a worker: makes the keys
    try:
        assert services.escrow is not None and services.audit is not None
        eob = await escrow(Stores("", services.escrow, services.audit), event_doc)
    finally:
        await services.close()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eobblast", "portal", "--config", str(config_file),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{listen}", timeout=5) as http:
            async with asyncio.timeout(30):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get("/healthz")).status_code == 200:
                            break
                    assert process.returncode is None, "eobblast portal exited"
                    await asyncio.sleep(0.1)
            headers = {"x-forwarded-for": "203.0.113.5", "user-agent": "Member-Browser/1.0"}
            form = await http.get(f"/p/{eob.token}", headers=headers)
            wrong = await http.post(
                f"/p/{eob.token}",
                data={**fields(wrong_dob(eob), eob.last4), "csrf": csrf_of(form.text)},
                headers=headers,
            )
            assert wrong.status_code == 403
            assert (await http.get("/metrics")).status_code == 404  # not on the members' port
            scraped = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 128 + signal.SIGTERM
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
    }
    assert samples[("eobblast_portal_pickups_total", (("outcome", "wrong_answer"),))] == 1
    assert samples[("eobblast_portal_pickups_total", (("outcome", "picked_up"),))] == 0
    assert samples[("eobblast_portal_lockouts_total", ())] == 0
    assert samples[("eobblast_portal_rate_limited_total", (("limit", "client"),))] == 0
    assert samples[("eobblast_audit_write_failures_total", ())] == 0
    services = await ProtectionServices.open(config, create_keys=False)
    try:
        assert services.escrow is not None
        [record] = await services.escrow.access_records(event_id=eob.event.event_id)
    finally:
        await services.close()
    assert record.outcome == "wrong_answer"
    assert record.client == PickupClient("203.0.113.5", "Member-Browser/1.0")


async def test_healthz(client: httpx.AsyncClient) -> None:
    health = await client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


# ---------------------------------------------------------------- no PHI at rest or in logs


def raw_bytes(url: str) -> bytes:
    """Every byte the database holds for the portal (items, access records) and audit tables."""
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        on_disk = [db, db.with_name(db.name + "-wal")]
        return b"".join(f.read_bytes() for f in on_disk if f.exists())
    chunks: list[bytes] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")  # flush shared buffers, so the files hold every row
        for table in ("portal_items", "portal_access", "audit_trail"):
            chunks += [text.encode() for (text,) in conn.execute(f"SELECT t::text FROM {table} t")]
            # The table's own file and its TOAST table's (where a large envelope lives).
            relations = conn.execute(
                "SELECT pg_relation_filepath(oid) FROM pg_class WHERE oid = %s::regclass"
                " OR oid = (SELECT reltoastrelid FROM pg_class WHERE oid = %s::regclass)",
                (table, table),
            ).fetchall()
            assert len(relations) == 2
            for (relpath,) in relations:
                row = conn.execute("SELECT pg_read_binary_file(%s)", (relpath,)).fetchone()
                assert row is not None
                chunks.append(bytes(row[0]))
    return b"".join(chunks)


async def test_no_plaintext_phi_or_tokens_at_rest(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    eobs = [await escrow(stores, event_doc) for _ in range(3)]
    assert (await submit(client, eobs[0].token, eobs[0].dob, eobs[0].last4)).status_code == 200
    assert (await submit(client, eobs[1].token, wrong_dob(eobs[1]), "0000")).status_code == 403
    blob = raw_bytes(stores.url)
    assert eobs[2].event.event_id.encode() in blob  # the scan does see the rows
    for eob in eobs:
        for secret in eob.secrets():
            for encoded in {secret.encode(), secret.encode("utf-16-le")}:
                assert encoded not in blob, "plaintext PHI or a token found in the database"
        assert b"Explanation of Benefits" not in blob


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_no_phi_or_tokens_in_logs(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    # Every server-side logger gets a handler, as a log config might give it: uvicorn's
    # access log then prints request lines even though the portal turns it off.
    names = ("eobblast", "uvicorn.access", "uvicorn.error")
    collect = Collect()
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).addHandler(collect)
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        eob = await escrow(stores, event_doc)
        await submit(client, eob.token, wrong_dob(eob), eob.last4)
        await submit(client, eob.token, eob.dob, eob.last4)
        await client.get(f"/p/{eob.token}")
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(collect)
            logging.getLogger(name).setLevel(saved[name])
    assert any(r.name == "eobblast.portal" for r in collect.records)
    assert any(r.name == "uvicorn.access" for r in collect.records)
    logged = "\n".join(
        f"{r.getMessage()} {sorted(map(str, r.__dict__.values()))}" for r in collect.records
    )
    assert "/p/[redacted]" in logged
    for secret in eob.secrets():
        assert secret not in logged


# ---------------------------------------------------------------- the audit trail itself


async def test_audit_trail_is_append_only_and_refuses_free_text(stores: Stores) -> None:
    record = AuditRecord("evt-1", AuditAction.SENT, "worker-1", NOW, protection="tls_required")
    await stores.audit.append(record)
    with pytest.raises(AuditError):
        await stores.audit.append(AuditRecord("evt-1", AuditAction.SENT, "worker-1", NOW, "M123"))
    with pytest.raises(AuditError):
        await stores.audit.append(
            AuditRecord("evt-1", AuditAction.INCIDENT, "worker-1", NOW, reason="Jane Roe, 1961")
        )
    since = await stores.audit.records(since=NOW + dt.timedelta(seconds=1))
    assert since == []
    (stored,) = await stores.audit.records(event_id="evt-1", since=NOW)
    assert stored.at == NOW and stored.seq is not None and stored.protection == "tls_required"
    if stores.url.startswith("sqlite:///"):
        db = sqlite3.connect(stores.url.removeprefix("sqlite:///"))
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit_trail SET reason = 'x'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit_trail")
        db.close()
    else:
        with psycopg.connect(stores.url, autocommit=True) as conn:
            for statement in (
                "UPDATE audit_trail SET reason = 'x'",
                "DELETE FROM audit_trail",
                "TRUNCATE audit_trail",
            ):
                with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                    conn.execute(statement)
    assert len(await stores.audit.records()) == 1


async def test_concurrent_appends_are_all_kept_in_order_and_a_bad_one_fails_alone(
    stores: Stores,
) -> None:
    # A worker appends one record per event sent, dozens at once.
    good = [
        AuditRecord(f"evt-c{n}", AuditAction.SENT, "worker-1", NOW, protection="tls_required")
        for n in range(40)
    ]
    bad = AuditRecord("evt-bad", AuditAction.SENT, "worker-1", NOW, "M123")
    results = await asyncio.gather(
        *(stores.audit.append(r) for r in good[:20]),
        stores.audit.append(bad),
        *(stores.audit.append(r) for r in good[20:]),
        return_exceptions=True,
    )
    assert isinstance(results.pop(20), AuditError)
    assert results == [None] * 40
    stored = await stores.audit.records()
    assert [r.event_id for r in stored] == [r.event_id for r in good]


async def test_concurrent_appends_share_a_commit_on_postgresql(pg_url: str) -> None:
    # One record per event sent, from workers on several machines: a commit (a WAL flush)
    # each would be the server's busiest work.
    audit = await open_audit(pg_url)
    try:
        await asyncio.gather(
            *(
                audit.append(AuditRecord(f"evt-t{n}", AuditAction.SENT, "worker-1", NOW))
                for n in range(40)
            )
        )
    finally:
        await audit.close()
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT xmin::text) FROM audit_trail"
        ).fetchone()
    assert row is not None
    records, transactions = row
    assert records == 40 and transactions <= 2, transactions


async def test_a_batch_of_appends_outlives_a_dropped_connection_on_postgresql(
    pg_url: str,
) -> None:
    # A shared commit's records were lost together (up to 64) when the connection dropped:
    # their callers only count a gap. Dropped before COMMIT, nothing was written: the batch
    # runs once more, on a new connection, and each record is written once.
    audit = await open_audit(pg_url)

    def batch(name: str) -> list[AuditRecord]:
        return [AuditRecord(f"evt-{name}{n}", AuditAction.SENT, "worker-1", NOW) for n in range(10)]

    try:
        drop_store_connection(audit)  # while idle: the batch's BEGIN finds it
        await asyncio.gather(*(audit.append(r) for r in batch("idle")))
        async with await psycopg.AsyncConnection.connect(pg_url) as blocker:
            # Dropped while its INSERTs wait (for a long read, say).
            await blocker.execute("LOCK TABLE audit_trail IN SHARE MODE")
            appends = asyncio.gather(*(audit.append(r) for r in batch("busy")))
            await asyncio.sleep(0.5)
            drop_store_connection(audit)
            await asyncio.sleep(0.2)
            await blocker.rollback()
        async with asyncio.timeout(10):
            await appends
        stored = [r.event_id for r in await audit.records()]
    finally:
        await audit.close()
    assert stored == [r.event_id for r in batch("idle") + batch("busy")]


@pytest.mark.parametrize("failure", ["cut", "frozen"])
async def test_a_batch_of_appends_whose_commit_answer_is_lost_is_written_once_and_said_unknown(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    # The connection breaks just as the server commits a batch (cut: the records are in the
    # trail), or the path freezes with COMMIT on its way (the server never gets it). The
    # batch must not be written again (a retry, or its records one by one, would make false
    # second records). Its callers learn that the outcome is unknown, by an error of its own
    # that names no record, and count a gap; the trail goes on, on a new connection.
    monkeypatch.setattr(postgres, "ANSWER_WAIT", 2.0)

    def batch(name: str) -> list[AuditRecord]:
        return [AuditRecord(f"evt-{name}{n}", AuditAction.SENT, "worker-1", NOW) for n in range(10)]

    async with PgRelay() as path:
        audit = await open_audit(path.url(pg_url))
        try:
            # Armed now: opening the trail committed its schema through the relay.
            if failure == "cut":
                path.cut_at = PG_COMMIT
            else:
                path.freeze_at = PG_COMMIT
            async with asyncio.timeout(10):
                results = await asyncio.gather(
                    *(audit.append(r) for r in batch("lost")), return_exceptions=True
                )
            assert all(isinstance(r, AuditOutcomeUnknown) for r in results), results
            assert str(results[0]) == "internal_error: audit trail commit of 10 records unconfirmed"
            path.cut_at = path.freeze_at = None
            path.thaw()
            await asyncio.gather(*(audit.append(r) for r in batch("after")))
            stored = [r.event_id for r in await audit.records()]
        finally:
            await audit.close()
    written = batch("lost") if failure == "cut" else []
    assert stored == [r.event_id for r in written + batch("after")]


async def test_a_swapped_ciphertext_is_an_incident_not_a_pickup(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    first = await escrow(stores, event_doc)
    second = await escrow(stores, event_doc)
    # Someone with database access moves one sealed EOB into the other's row.
    swap = (
        "UPDATE portal_items SET envelope = (SELECT envelope FROM portal_items"
        " WHERE event_id = {0}) WHERE event_id = {0}"
    )
    args = (second.event.event_id, first.event.event_id)
    if stores.url.startswith("sqlite:///"):
        db = sqlite3.connect(stores.url.removeprefix("sqlite:///"))
        db.execute(swap.format("?"), args)
        db.commit()
        db.close()
    else:
        with psycopg.connect(stores.url, autocommit=True) as conn:
            conn.execute(swap.format("%s"), args)
    refused = await submit(client, first.token, first.dob, first.last4)
    assert refused.status_code == 503
    assert second.event.member.name not in refused.text
    assert (await actions(stores, first.event.event_id))[-1] == ("incident", "escrow_integrity")
    status = await stores.escrow.status(first.token, NOW)
    assert status.failure is None  # not counted as a wrong answer, not spent


class LeakyEscrow:
    """An escrow store whose driver puts a value of the failed statement in its error."""

    def __init__(self, inner: EscrowStore, secret: str) -> None:
        self._inner = inner
        self._secret = secret

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def status(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"connection lost while reading row for {self._secret}")


async def test_a_server_error_is_logged_as_json_without_the_exceptions_text(
    stores: Stores, clock: Clock, event_doc: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    eob = await escrow(stores, event_doc)
    leaky = cast(EscrowStore, LeakyEscrow(stores.escrow, eob.event.member.name))
    with service_logging():
        server = await serve_portal(
            create_app(leaky, stores.audit, purge_interval=None, clock=clock)
        )
        try:
            async with httpx.AsyncClient(base_url=server.url) as http:
                page = await http.get(f"/p/{eob.token}")
        finally:
            await server.stop()
    assert page.status_code == 503
    err = capsys.readouterr().err
    lines = [orjson.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(line.get("exc_type") == "RuntimeError" for line in lines), err
    assert eob.event.member.name not in err and "Traceback" not in err


class UnwritableTrail:
    """An audit trail whose database refuses writes."""

    async def append(self, record: AuditRecord) -> None:
        raise sqlite3.OperationalError("disk I/O error")


async def test_an_item_whose_audit_record_fails_is_not_left_behind(
    stores: Stores, event_doc: dict[str, Any]
) -> None:
    # The pipeline tries the notice again after such a failure: each try would otherwise
    # leave a sealed EOB behind that no link reaches.
    event = validate_event(orjson.dumps(event_doc), allow_test_domains=True)
    assert isinstance(event, EobIssued) and event.member.date_of_birth is not None
    item = EscrowItem(
        event_id=event.event_id,
        member_ref=member_ref(REF_KEY, event.member.id),
        member_id=event.member.id,
        date_of_birth=event.member.date_of_birth,
        html=eob_html(event),
        expires_at=NOW + dt.timedelta(days=30),
        language="en",
    )
    trail = cast(AuditTrail, UnwritableTrail())
    with pytest.raises(sqlite3.OperationalError):
        await escrow_eob(stores.escrow, trail, item, actor="worker-1", now=NOW)
    left = await stores.escrow.purge_expired_items(NOW + dt.timedelta(days=365))
    assert event.event_id not in [purged.event_id for purged in left]


class TrailRefusingPurges:
    """An audit trail that writes everything but purge records."""

    def __init__(self, inner: AuditTrail) -> None:
        self.inner = inner

    async def append(self, record: AuditRecord) -> None:
        if record.action is AuditAction.PORTAL_EXPIRED_PURGED:
            raise sqlite3.OperationalError("disk I/O error")
        await self.inner.append(record)


async def test_a_revocation_the_trail_misses_still_revokes_and_is_counted(
    stores: Stores,
    client: httpx.AsyncClient,
    event_doc: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    event_id = f"evt-{uuid.uuid4().hex[:12]}"
    first = await escrow(stores, event_doc, event_id=event_id)
    before = metric("eobblast_audit_write_failures_total")
    trail = cast(AuditTrail, TrailRefusingPurges(stores.audit))
    item = EscrowItem(
        event_id=event_id,
        member_ref=member_ref(REF_KEY, first.event.member.id),
        member_id=first.event.member.id,
        date_of_birth=first.dob,
        html=first.html,
        expires_at=NOW + dt.timedelta(days=30),
    )
    with caplog.at_level(logging.ERROR, logger="eobblast.escrow"):
        second = await escrow_eob(stores.escrow, trail, item, actor="worker-1", now=NOW)
    # The new link goes out; the old one is revoked all the same; the gap is counted and
    # logged by ids, for ops to add the record.
    assert (await client.get(f"/p/{first.token}")).status_code == 404
    assert (await client.get(f"/p/{second}")).status_code == 200
    assert metric("eobblast_audit_write_failures_total") == before + 1
    [logged] = [r for r in caplog.records if r.name == "eobblast.escrow"]
    assert logged.__dict__["event_id"] == event_id and logged.__dict__["item_id"]
    assert [action for action, _ in await actions(stores, event_id)] == [
        "portal_escrowed",
        "portal_escrowed",
    ]


async def test_a_lost_database_gives_the_generic_page_and_an_unhealthy_check(
    stores: Stores, client: httpx.AsyncClient, event_doc: dict[str, Any]
) -> None:
    eob = await escrow(stores, event_doc)
    await stores.escrow.close()  # the fixture's second close is harmless
    page = await client.get(f"/p/{eob.token}")
    assert page.status_code == 503 and "cannot show your notice" in page.text
    assert "Traceback" not in page.text and page.headers["cache-control"] == "no-store"
    assert (await client.get("/healthz")).status_code == 503


async def test_escrow_and_purge_whose_answer_is_lost_count_a_gap_on_postgresql(
    pg_url: str,
    keys: KeyRing,
    event_doc: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A revocation or a purge is one statement deleting items whose records come after it:
    # when the server stops answering, it may have been kept, the items gone with no record.
    # Nothing can be named, but ops are told (the counter EobblastAuditGap watches).
    monkeypatch.setattr(postgres, "ANSWER_WAIT", 1.0)
    monkeypatch.setattr(escrow_module, "PURGE_ANSWER_WAIT", 1.0)
    async with PgRelay() as path:
        stores = Stores(pg_url, await open_escrow(path.url(pg_url), keys), await open_audit(pg_url))
        try:
            first = await escrow(stores, event_doc, expires_in=dt.timedelta(hours=1))
            for marker, step in (
                (b"DELETE FROM portal_items WHERE event_id", "escrow"),
                (b"DELETE FROM portal_items WHERE expires_at", "purge"),
            ):
                path.freeze_at = marker
                before = portal_counts()["audit_gaps"]
                with pytest.raises(StoreNotAnswering):
                    async with asyncio.timeout(10):
                        if step == "escrow":
                            await escrow(stores, event_doc, event_id=first.event.event_id)
                        else:
                            await purge_and_record(
                                stores.escrow, stores.audit, NOW + dt.timedelta(hours=2)
                            )
                assert portal_counts()["audit_gaps"] == before + 1, step
                path.freeze_at = None
                path.thaw()
        finally:
            await stores.escrow.close()
            await stores.audit.close()
    assert "outcome unknown" in caplog.text
    assert not any(secret in caplog.text for secret in first.secrets())


async def test_a_batch_whose_commit_the_server_refuses_is_not_said_unknown(pg_url: str) -> None:
    # An error the server answers COMMIT with (here a deferred check's) rolled the batch
    # back for certain: not an unknown outcome (a gap for ops to chase), and the records
    # that were not at fault are written on their own.
    audit = await open_audit(pg_url)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        await admin.execute(
            "CREATE OR REPLACE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN IF NEW.event_id = 'evt-poison' THEN RAISE EXCEPTION 'refused';"
            " END IF; RETURN NULL; END $$"
        )
        await admin.execute(
            "CREATE CONSTRAINT TRIGGER refuse_poison AFTER INSERT ON audit_trail"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
        )
    try:
        names = ["evt-a", "evt-b", "evt-poison", "evt-c"]
        records = [AuditRecord(n, AuditAction.SENT, "worker-1", NOW) for n in names]
        results = await asyncio.gather(*(audit.append(r) for r in records), return_exceptions=True)
        stored = {r.event_id for r in await audit.records()}
    finally:
        await audit.close()
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
            await admin.execute("DROP TRIGGER refuse_poison ON audit_trail")
    assert not any(isinstance(r, AuditOutcomeUnknown) for r in results), results
    assert isinstance(results[2], psycopg.errors.RaiseException)
    assert {"evt-a", "evt-b", "evt-c"} <= stored and "evt-poison" not in stored
