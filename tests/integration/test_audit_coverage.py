"""The audit trail accounts for what became of every notice, on SQLite and PostgreSQL:
holds, releases to a verified address, paper fallbacks, and where each notice went, as
opaque references only; verification requests' ids are keyed, so the trail gives no
member id away; and a trail an earlier release made keeps its rows and takes the new
records."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import psycopg
import pytest

from eobblast.bounces.service import BounceService, Held
from eobblast.bounces.store import BounceStore, open_bounce_store
from eobblast.config import load_config
from eobblast.errors import ConfigError
from eobblast.events.verification import (
    AddressVerificationFailed,
    AddressVerificationRequested,
    AddressVerified,
    FailureReason,
)
from eobblast.observe.audit import (
    AuditAction,
    AuditRecord,
    AuditTrail,
    member_ref,
    open_audit,
    recipient_ref,
)
from eobblast.protect.services import ProtectionServices
from eobblast.state.sqlite import sqlite_path
from eobblast.streams import EmbeddedBroker
from tests.conftest import throwaway_pg_schema
from tests.integration.test_bounce_e2e import files_text
from tests.integration.test_bounce_service import (
    AUDIT_KEY,
    BOUNCE_DOMAIN,
    REQUESTS,
    T0,
    VERP,
    RecordingPublisher,
    at,
    hard_bounce,
    ids,
    make_service,
    verified,
)
from tests.integration.worker_stack import (
    Stack,
    accept_domains,
    read_topic,
    sandbox_stack,
    start_worker,
    statuses,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The bounce store's and the audit trail's URLs: SQLite files, or one PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bounces.db'}", f"sqlite:///{tmp_path / 'audit.db'}"
        return
    with throwaway_pg_schema("audit") as dsn:
        yield dsn, dsn


def _sqlite_everything(path: Path) -> str:
    raw = files_text(path.parent, path.name + "*")
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT * FROM audit_trail").fetchall()
    return raw + repr(rows)


async def everything_in(url: str) -> str:
    """All a reader of the trail could see: its rows and, for SQLite, the bytes of its files."""
    path = sqlite_path(url, "audit trail")
    if path is not None:
        return await asyncio.to_thread(_sqlite_everything, path)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT * FROM audit_trail")
        return repr(await cur.fetchall())


def assert_names_nobody(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text and secret.lower() not in text.lower(), secret


def event(member_id: str, n: int) -> tuple[str, bytes]:
    """A notice of the member whose event id does not contain the member id (the trail
    holds event ids)."""
    event_id = f"eob-{uuid.uuid4().hex[:12]}-{n}"
    return event_id, orjson.dumps({"event_id": event_id, "member": {"id": member_id}})


def unkeyed_request_id(member_id: str, requested_at: dt.datetime) -> str:
    """The id earlier releases gave a verification request: anyone can compute it."""
    parts = ("verification", member_id, requested_at.isoformat())
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


# ------------------------------------------------------------------ the trail's schema

OLD_SQLITE = (
    "CREATE TABLE audit_trail (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " at TEXT NOT NULL, event_id TEXT NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,"
    " member_ref TEXT, protection TEXT, reason TEXT, item_id TEXT)",
    "CREATE TRIGGER audit_trail_no_update BEFORE UPDATE ON audit_trail"
    " BEGIN SELECT RAISE(ABORT, 'audit_trail is append-only'); END",
    "CREATE TRIGGER audit_trail_no_delete BEFORE DELETE ON audit_trail"
    " BEGIN SELECT RAISE(ABORT, 'audit_trail is append-only'); END",
)
OLD_PG = (
    "CREATE TABLE audit_trail (seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " at TIMESTAMPTZ NOT NULL, event_id TEXT NOT NULL, action TEXT NOT NULL,"
    " actor TEXT NOT NULL, member_ref TEXT, protection TEXT, reason TEXT, item_id TEXT)",
    "CREATE OR REPLACE FUNCTION audit_trail_append_only() RETURNS trigger LANGUAGE plpgsql"
    " AS $$ BEGIN RAISE EXCEPTION 'audit_trail is append-only'; END $$",
    "CREATE TRIGGER audit_trail_no_change BEFORE UPDATE OR DELETE ON audit_trail"
    " FOR EACH ROW EXECUTE FUNCTION audit_trail_append_only()",
    "CREATE TRIGGER audit_trail_no_truncate BEFORE TRUNCATE ON audit_trail"
    " FOR EACH STATEMENT EXECUTE FUNCTION audit_trail_append_only()",
)
# What an earlier release's worker writes (its INSERT names its columns).
OLD_INSERT = (
    "INSERT INTO audit_trail (at, event_id, action, actor, member_ref, protection, reason,"
    " item_id) VALUES ({0}, {0}, {0}, {0}, {0}, {0}, {0}, NULL)"
)
REF = "0123456789abcdef0123456789abcdef"
STAMP = "2026-11-26T09:00:00.000000Z"


async def old_rows(url: str, rows: list[tuple[str, ...]]) -> None:
    path = sqlite_path(url, "audit trail")
    if path is not None:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            for statement in () if _has_table(db) else OLD_SQLITE:
                db.execute(statement)
            db.executemany(OLD_INSERT.format("?"), rows)
        return
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT to_regclass('audit_trail') IS NOT NULL")
        if not (await cur.fetchone() or (False,))[0]:
            for statement in OLD_PG:
                await conn.execute(statement)
        async with conn.cursor() as cursor:
            await cursor.executemany(OLD_INSERT.format("%s"), rows)


def _has_table(db: sqlite3.Connection) -> bool:
    return bool(db.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit_trail'").fetchone())


async def change_refused(url: str) -> None:
    path = sqlite_path(url, "audit trail")
    if path is not None:
        with contextlib.closing(sqlite3.connect(path)) as db:
            for statement in (
                "UPDATE audit_trail SET recipient_ref = NULL",
                "DELETE FROM audit_trail",
            ):
                with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                    db.execute(statement)
        return
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for statement in ("UPDATE audit_trail SET recipient_ref = NULL", "DELETE FROM audit_trail"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                await conn.execute(statement)


async def test_a_trail_an_earlier_release_made_keeps_its_rows_and_takes_recipient_refs(
    urls: tuple[str, str],
) -> None:
    _, url = urls
    # Rows an earlier release wrote, a protection_chosen record among them.
    await old_rows(
        url,
        [
            (STAMP, "ev-old-1", "protection_chosen", "w0", REF, "tls_required", "tls_policy_list"),
            (STAMP, "ev-old-1", "sent", "w0", REF, "tls_required", "tls_policy_list"),
        ],
    )
    trail = await open_audit(url)
    try:
        old = await trail.records()
        assert [(r.event_id, r.action, r.recipient_ref) for r in old] == [
            ("ev-old-1", AuditAction.PROTECTION_CHOSEN, None),
            ("ev-old-1", AuditAction.SENT, None),
        ]
        sent = AuditRecord(
            "ev-new-1",
            AuditAction.SENT,
            "w1",
            T0,
            member_ref=REF,
            protection="smime",
            reason="recipient_certificate",
            recipient_ref=recipient_ref(AUDIT_KEY, "Ann.Lee@Example.ORG"),
        )
        await trail.append(sent)
        # A worker of the earlier release, still running during a rolling upgrade.
        await old_rows(url, [(STAMP, "ev-old-2", "sent", "w0", REF, "tls_required", "x")])
        (stored,) = await trail.records("ev-new-1")
        # The same mailbox whatever the case it was written in.
        assert stored.recipient_ref == recipient_ref(AUDIT_KEY, "ann.lee@example.org")
        assert stored.recipient_ref != recipient_ref(b"another key....." * 2, "ann.lee@example.org")
        (late,) = await trail.records("ev-old-2")
        assert late.recipient_ref is None
        await change_refused(url)
    finally:
        await trail.close()
    # Opened again (as every worker start does), the column is there: nothing changes.
    trail = await open_audit(url)
    try:
        assert len(await trail.records()) == 4
    finally:
        await trail.close()


async def test_the_new_column_waits_a_moment_for_a_busy_table_not_for_ever() -> None:
    # Adding the column waited for the table's lock behind any long read (an export), and
    # every worker's audit append queued behind it: sends stopped across the fleet.
    with throwaway_pg_schema("audit") as url:
        await old_rows(url, [(STAMP, "ev-old-1", "sent", "w0", REF, "tls_required", "x")])
        async with await psycopg.AsyncConnection.connect(url) as export:
            await export.execute("SELECT count(*) FROM audit_trail")  # its lock held, open
            started = time.monotonic()
            with pytest.raises(ConfigError, match=r"is in use .* added at the next start"):
                await open_audit(url)
            assert time.monotonic() - started < 30  # (the lock wait is 5 s)
        trail = await open_audit(url)  # the export done, the next start adds it
        await trail.close()


# ------------------------------------------------------------------ verify-before-resend


def keyed(
    store: BounceStore, publisher: RecordingPublisher, key: bytes = AUDIT_KEY
) -> BounceService:
    """A bounce service as this release's workers build it (with the member-reference key)."""
    return make_service(store, publisher, key=key)


def requests_of(publisher: RecordingPublisher, member_id: str) -> list[str]:
    found = [AddressVerificationRequested.model_validate(r) for r in publisher.on(REQUESTS)]
    return [r.request_id for r in found if r.member_id == member_id]


def answer(member_id: str, address: str, request_id: str) -> AddressVerified:
    return verified(member_id, address).model_copy(update={"request_id": request_id})


async def test_holds_releases_and_paper_are_recorded_naming_nobody(
    urls: tuple[str, str],
) -> None:
    store_url, audit_url = urls
    store = await open_bounce_store(store_url)
    trail = await open_audit(audit_url)
    publisher = RecordingPublisher()
    service = make_service(store, publisher, trail)
    try:
        member, address = ids()
        ev1, raw1 = event(member, 1)
        ev2, raw2 = event(member, 2)
        await hard_bounce(service, ev1, member, address, raw1)
        assert isinstance(await service.gate(ev2, member, address, raw2, at=at(10)), Held)
        # An answer through a channel the policy does not trust: an incident of no notice.
        await service.on_verification_result(verified(member, address, "mail"), at=at(20))
        new_address = f"New.{address}"
        released = await service.on_verification_result(verified(member, new_address), at=at(3600))
        assert sorted(r.event_id for r in released.resends) == sorted([ev1, ev2])
        # Another member's verification fails: paper.
        other, other_address = ids()
        ev3, raw3 = event(other, 1)
        await hard_bounce(service, ev3, other, other_address, raw3)
        failed = AddressVerificationFailed(
            member_id=other, reason=FailureReason.NO_ANSWER, at=at(60)
        )
        await service.on_verification_result(failed, at=at(60))
        records = await trail.records()
    finally:
        await trail.close()
        await store.close()

    def story(event_id: str) -> list[tuple[AuditAction, str | None]]:
        return [(r.action, r.reason) for r in records if r.event_id == event_id]

    assert story(ev1)[-1] == (AuditAction.RELEASED, "phone")
    assert story(ev2) == [
        (AuditAction.HELD, "awaiting_verification"),
        (AuditAction.RELEASED, "phone"),
    ]
    assert story(ev3)[-1] == (AuditAction.PAPER_FALLBACK, "verification_failed")
    releases = [r for r in records if r.action is AuditAction.RELEASED]
    assert {(r.member_ref, r.recipient_ref) for r in releases} == {
        (member_ref(AUDIT_KEY, member), recipient_ref(AUDIT_KEY, new_address))
    }
    assert all(r.recipient_ref is None for r in records if r.action is not AuditAction.RELEASED)
    # The incident of no notice is named by the open request's id, which is keyed: its
    # time stands beside it, and an unkeyed id would give the member away to anyone who
    # tries member ids (earlier releases' ids did).
    (request_id,) = requests_of(publisher, member)
    (incident,) = [r for r in records if r.reason == "unverified_channel"]
    assert incident.event_id == request_id
    for candidate in (member, other, "M-0000000000"):
        for when in (at(1), incident.at, at(0)):
            assert unkeyed_request_id(candidate, when) != incident.event_id
    assert_names_nobody(
        await everything_in(audit_url), [member, other, address, new_address, other_address]
    )


async def test_request_ids_are_keyed_stable_across_restarts_and_still_answered_after_upgrade(
    urls: tuple[str, str],
) -> None:
    store_url, _ = urls
    publisher = RecordingPublisher()
    # The earlier release asks member A: its request's id is a bare hash.
    store = await open_bounce_store(store_url)
    earlier = BounceService(
        store, publisher, verp_keys=[VERP], bounce_domain=BOUNCE_DOMAIN, clock=lambda: T0
    )
    a, a_address = ids()
    ev_a, raw_a = event(a, 1)
    await hard_bounce(earlier, ev_a, a, a_address, raw_a)
    await store.close()
    (outstanding,) = requests_of(publisher, a)
    assert outstanding == unkeyed_request_id(a, at(1))

    # Upgraded: this release asks member B under a keyed id.
    store = await open_bounce_store(store_url)
    b, b_address = ids()
    ev_b, raw_b = event(b, 1)
    await hard_bounce(keyed(store, publisher), ev_b, b, b_address, raw_b)
    await store.close()
    (asked,) = requests_of(publisher, b)
    assert asked != unkeyed_request_id(b, at(1))

    # Restarted: the answer quoting that id is the open request's, and releases. A host
    # with another key would not know the id (it is keyed): to it the answer is stale.
    store = await open_bounce_store(store_url)
    try:
        stranger = await keyed(store, publisher, b"s" * 32).on_verification_result(
            answer(b, f"new-{b_address}", asked), at=at(100)
        )
        assert not stranger.accepted and stranger.resends == ()
        restarted = keyed(store, publisher)
        taken = await restarted.on_verification_result(
            answer(b, f"new-{b_address}", asked), at=at(110)
        )
        assert taken.accepted and [r.event_id for r in taken.resends] == [ev_b]

        # The request outstanding at the upgrade: its answer quotes the bare hash the
        # earlier release published, and still releases; an id of no request does not.
        wrong = await restarted.on_verification_result(
            answer(a, f"new-{a_address}", "0" * 32), at=at(120)
        )
        assert not wrong.accepted and wrong.resends == ()
        taken = await restarted.on_verification_result(
            answer(a, f"new-{a_address}", outstanding), at=at(130)
        )
        assert taken.accepted and [r.event_id for r in taken.resends] == [ev_a]
    finally:
        await store.close()


# ------------------------------------------------------------------ a real worker


@pytest.fixture
async def stack(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stack]:
    async with sandbox_stack(broker, tmp_path, accept_domains(51)) as built:
        yield built


@pytest.fixture
def pg_audit_url() -> Iterator[str]:
    with throwaway_pg_schema("audit_worker") as url:
        yield url


@pytest.mark.parametrize("trail_on", ["sqlite", "postgresql"])
async def test_a_worker_records_consent_holds_and_where_each_notice_went(
    stack: Stack, trail_on: str, request: pytest.FixtureRequest
) -> None:
    settings = stack.settings()
    if trail_on == "postgresql":
        settings["portal"]["audit_url"] = request.getfixturevalue("pg_audit_url")
    config = load_config(environ={}, overrides=settings)
    docs = [orjson.loads(value) for value in stack.events(3, seed=71)]
    docs[0]["member"]["consent"]["electronic_delivery"] = False
    values = [orjson.dumps(doc) for doc in docs]
    services = await ProtectionServices.open(config)
    key = services.audit_key
    _, stop, task = await start_worker(config, protection=services, bounce_store_as=lambda s: s)
    try:
        await stack.publish(values)
        found = statuses(await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=3))
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await services.close()
    event_ids = [doc["event_id"] for doc in docs]
    assert [found[e][-1].status for e in event_ids] == ["held", "delivered", "delivered"]
    trail: AuditTrail = await open_audit(config.portal.audit_url)
    try:
        (held,) = await trail.records(event_ids[0])
        assert (held.action, held.reason, held.recipient_ref) == (
            AuditAction.HELD,
            "no_consent",
            None,
        )
        assert held.member_ref == member_ref(key, docs[0]["member"]["id"])
        for doc in docs[1:]:
            (sent,) = await trail.records(doc["event_id"])
            assert (sent.action, sent.protection) == (AuditAction.SENT, "tls_required")
            assert sent.member_ref == member_ref(key, doc["member"]["id"])
            assert sent.recipient_ref == recipient_ref(key, doc["member"]["email"])
    finally:
        await trail.close()
    secrets = [doc["member"][name] for doc in docs for name in ("id", "email", "name")]
    assert_names_nobody(await everything_in(config.portal.audit_url), secrets)
