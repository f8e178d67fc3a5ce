"""The audit trail: who was sent what, when, how protected, and what happened. Never content.

Compliance officers read it. A record holds an event id, an opaque member reference (a
keyed HMAC of the member id, never the id itself), an action, the protection level, a
reason code, the actor and the time; a notice sent or released also an opaque reference
to the address it went to (a keyed HMAC of the address, never the address). Every text
field is a short machine token, checked on the way in, so no free text (and so no PHI) can
be written. The store is append-only: the API has no update or delete, and the table
refuses them with triggers.
"""

from __future__ import annotations

import abc
import asyncio
import datetime as dt
import enum
import hashlib
import hmac
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eobblast._addresses import address_key
from eobblast.errors import ConfigError, EobblastError, ReasonCode
from eobblast.observe.metrics import AUDIT_GAPS
from eobblast.state.group import TRANSIENT_ERRORS, GroupCommit
from eobblast.state.postgres import connect_postgres
from eobblast.state.sqlite import add_column, open_sqlite, open_store, write_transaction

_EVENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
# A member reference is hex, so a raw member id (or a name) cannot be passed by mistake.
_MEMBER_REF = re.compile(r"^[0-9a-f]{32,64}$")
_MEMBER_REF_CONTEXT = b"eobblast.member_ref.v1\x00"
_RECIPIENT_REF_CONTEXT = b"eobblast.recipient_ref.v1\x00"


class AuditAction(enum.StrEnum):
    """What happened. New members may be added; none is ever removed or renamed (the
    trail keeps what earlier releases wrote, and reads it back)."""

    # Written by releases before the SENT record carried the protection (one record per
    # notice, not two); still read in older trails, never written now.
    PROTECTION_CHOSEN = "protection_chosen"
    # Delivered to the receiver: the protection level and reason, and `recipient_ref`.
    SENT = "sent"
    BOUNCE = "bounce"
    INCIDENT = "incident"
    PORTAL_ESCROWED = "portal_escrowed"
    PORTAL_PICKUP = "portal_pickup"
    PORTAL_PICKUP_FAILED = "portal_pickup_failed"
    PORTAL_LOCKED = "portal_locked"
    PORTAL_EXPIRED_PURGED = "portal_expired_purged"
    # Not sent: no e-delivery consent (reason `no_consent`), or the address is suppressed
    # or awaiting verification (verify-before-resend).
    HELD = "held"
    # A held notice let go to the address the member verified (reason: the channel);
    # `recipient_ref` names that address. Its SENT record follows once it is delivered.
    RELEASED = "released"
    # Handed to paper mail instead (reason: why, as in the eob.paper-fallback event).
    PAPER_FALLBACK = "paper_fallback"
    # An operator sent a dead letter back to the input topic (`eobblast dlq replay`; the
    # actor is who ran it, reason the code it was parked with, item_id its DLQ position).
    DLQ_REPLAYED = "dlq_replayed"


class AuditError(EobblastError):
    """A record was refused (a field is not an id or a code) or could not be written."""

    def __init__(self, detail: str) -> None:
        super().__init__(ReasonCode.INVALID_VALUE, detail)


class AuditOutcomeUnknown(EobblastError):
    """A batch of records' COMMIT was sent and its answer lost (the connection dropped or
    the server stopped answering): the records may be in the trail or not. They are never
    written again (a second copy is a false record); the caller counts a gap to check."""

    def __init__(self, records: int) -> None:
        super().__init__(
            ReasonCode.INTERNAL_ERROR, f"audit trail commit of {records} records unconfirmed"
        )


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One line of the trail. `seq` is assigned by the store and set on records read back."""

    event_id: str
    action: AuditAction
    actor: str
    at: dt.datetime
    member_ref: str | None = None
    protection: str | None = None
    reason: str | None = None
    item_id: str | None = None
    seq: int | None = None
    recipient_ref: str | None = None


def member_ref(key: bytes, member_id: str) -> str:
    """The opaque reference to a member the trail stores: HMAC-SHA256 of the id, 128 bits.

    Keyed, so nobody without the key can confirm a guessed member id against the trail;
    the same key always gives the same reference, so one member's records can be found.
    """
    return _keyed_ref(key, _MEMBER_REF_CONTEXT, member_id)


def recipient_ref(key: bytes, address: str) -> str:
    """The opaque reference to an email address the trail stores: HMAC-SHA256 of the
    address as eobblast compares addresses (case-insensitive), 128 bits, with the
    member-reference key.

    So a compliance officer holding an address (and the key) can tell whether a notice
    went there, and records of notices sent to one address match; the trail alone names
    no address, and a guessed address cannot be confirmed against it without the key.
    """
    return _keyed_ref(key, _RECIPIENT_REF_CONTEXT, address_key(address))


def _keyed_ref(key: bytes, context: bytes, text: str) -> str:
    """HMAC-SHA256 of `text` in `context` under the member-reference key, 128 bits."""
    if len(key) < 16:
        raise ConfigError("the member reference key must be at least 16 bytes")
    return hmac.new(key, context + text.encode(), hashlib.sha256).hexdigest()[:32]


def is_token(value: str) -> bool:
    """Whether `value` may stand in a record's short-code fields (actor, reason ...)."""
    return _TOKEN.match(value) is not None


def _check(record: AuditRecord) -> None:
    # Messages name the field, never its value: the value may be what must not leak.
    if not _EVENT_ID.match(record.event_id):
        raise AuditError("audit event_id is not an event id")
    if record.member_ref is not None and not _MEMBER_REF.match(record.member_ref):
        raise AuditError("audit member_ref is not an opaque reference")
    if record.recipient_ref is not None and not _MEMBER_REF.match(record.recipient_ref):
        raise AuditError("audit recipient_ref is not an opaque reference")
    for name in ("actor", "protection", "reason", "item_id"):
        value = getattr(record, name)
        if value is not None and not _TOKEN.match(value):
            raise AuditError(f"audit {name} must be a short code")
    if record.at.tzinfo is None:
        raise AuditError("audit times must be timezone-aware")
    AuditAction(record.action)


def _iso(when: dt.datetime) -> str:
    # Fixed width in UTC, so text order is time order in SQLite.
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_COLUMNS = (
    "seq, at, event_id, action, actor, member_ref, protection, reason, item_id, recipient_ref"
)


def _record(row: Sequence[Any]) -> AuditRecord:
    at = row[1]
    if isinstance(at, str):
        at = dt.datetime.strptime(at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    return AuditRecord(
        event_id=str(row[2]),
        action=AuditAction(row[3]),
        actor=str(row[4]),
        at=at,
        member_ref=row[5],
        protection=row[6],
        reason=row[7],
        item_id=row[8],
        seq=int(row[0]),
        recipient_ref=row[9],
    )


def _where(event_id: str | None, since: dt.datetime | None, mark: str) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if event_id is not None:
        clauses.append(f"event_id = {mark}")
        args.append(event_id)
    if since is not None:
        clauses.append(f"at >= {mark}")
        args.append(since)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class AuditTrail(abc.ABC):
    """Append-only audit records; SQLite and PostgreSQL behave the same."""

    @abc.abstractmethod
    async def append(self, record: AuditRecord) -> None:
        """Add one record (AuditError if a field is not an id or a code)."""

    @abc.abstractmethod
    async def records(
        self, event_id: str | None = None, since: dt.datetime | None = None
    ) -> list[AuditRecord]:
        """Records in the order written, optionally of one event and/or from a time on."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""


_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS audit_trail ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " at TEXT NOT NULL, event_id TEXT NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,"
    " member_ref TEXT, protection TEXT, reason TEXT, item_id TEXT, recipient_ref TEXT)",
    "CREATE INDEX IF NOT EXISTS audit_trail_event_id ON audit_trail (event_id)",
    "CREATE INDEX IF NOT EXISTS audit_trail_at ON audit_trail (at)",
    "CREATE TRIGGER IF NOT EXISTS audit_trail_no_update BEFORE UPDATE ON audit_trail"
    " BEGIN SELECT RAISE(ABORT, 'audit_trail is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_trail_no_delete BEFORE DELETE ON audit_trail"
    " BEGIN SELECT RAISE(ABORT, 'audit_trail is append-only'); END",
)

# `recipient_ref` came with a later release: a table an earlier one made gets it on open
# (its rows read NULL there), and the earlier release's workers, whose INSERTs name their
# columns, go on writing to it during a rolling upgrade.
_INSERT = (
    "INSERT INTO audit_trail (at, event_id, action, actor, member_ref, protection, reason,"
    " item_id, recipient_ref) VALUES ({0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0})"
)


def _row(record: AuditRecord, at: object) -> tuple[object, ...]:
    """The INSERT's values: `at` as the store keeps times (ISO text, or the datetime)."""
    return (
        at,
        record.event_id,
        str(record.action),
        record.actor,
        record.member_ref,
        record.protection,
        record.reason,
        record.item_id,
        record.recipient_ref,
    )


class SqliteAuditTrail(AuditTrail):
    """The trail in a SQLite file (WAL), shared by the processes of one machine."""

    def __init__(self, path: Path) -> None:
        self._db = open_sqlite(path, _SQLITE_SCHEMA)
        add_column(self._db, "audit_trail", "recipient_ref", "TEXT")
        # One record per event sent: concurrent appends share one commit.
        self._appends: GroupCommit[AuditRecord, None] = GroupCommit(self._append_many)

    async def append(self, record: AuditRecord) -> None:
        """Add one record (in a transaction shared with concurrent appends)."""
        _check(record)
        await self._appends.submit(record)

    async def _append_many(self, records: Sequence[AuditRecord]) -> list[None]:
        rows = [_row(r, _iso(r.at)) for r in records]
        await write_transaction(self._db, lambda: self._db.executemany(_INSERT.format("?"), rows))
        return [None] * len(records)

    async def records(
        self, event_id: str | None = None, since: dt.datetime | None = None
    ) -> list[AuditRecord]:
        """Records in the order written."""
        where, args = _where(event_id, since, "?")
        if since is not None:
            args[-1] = _iso(since)
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM audit_trail{where} ORDER BY seq",  # noqa: S608
            args,
        ).fetchall()
        return [_record(row) for row in rows]

    async def close(self) -> None:
        """Close the database."""
        self._db.close()


_PG_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS audit_trail ("
    " seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " at TIMESTAMPTZ NOT NULL, event_id TEXT NOT NULL, action TEXT NOT NULL,"
    " actor TEXT NOT NULL, member_ref TEXT, protection TEXT, reason TEXT, item_id TEXT,"
    " recipient_ref TEXT)",
    "ALTER TABLE audit_trail ADD COLUMN IF NOT EXISTS recipient_ref TEXT",
    "CREATE INDEX IF NOT EXISTS audit_trail_event_id ON audit_trail (event_id)",
    "CREATE INDEX IF NOT EXISTS audit_trail_at ON audit_trail (at)",
    "CREATE OR REPLACE FUNCTION audit_trail_append_only() RETURNS trigger LANGUAGE plpgsql"
    " AS $$ BEGIN RAISE EXCEPTION 'audit_trail is append-only'; END $$",
    "CREATE OR REPLACE TRIGGER audit_trail_no_change BEFORE UPDATE OR DELETE ON audit_trail"
    " FOR EACH ROW EXECUTE FUNCTION audit_trail_append_only()",
    "CREATE OR REPLACE TRIGGER audit_trail_no_truncate BEFORE TRUNCATE ON audit_trail"
    " FOR EACH STATEMENT EXECUTE FUNCTION audit_trail_append_only()",
)
_SCHEMA_LOCK = 0x0E0B_A0D1


class PostgresAuditTrail(AuditTrail):
    """The trail in PostgreSQL, for processes on several machines."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()
        # One record per event sent: concurrent appends share one commit, as on SQLite. A
        # commit whose outcome is unknown fails the whole batch: split, each record would
        # be written again on its own.
        self._appends: GroupCommit[AuditRecord, None] = GroupCommit(
            self._append_many, transient=(*TRANSIENT_ERRORS, AuditOutcomeUnknown)
        )

    @classmethod
    async def connect(cls, dsn: str) -> PostgresAuditTrail:
        """Connect and create the table and its append-only triggers if needed."""
        conn = await connect_postgres(dsn, "audit trail", _SCHEMA_LOCK, _PG_SCHEMA)
        return cls(conn)

    async def append(self, record: AuditRecord) -> None:
        """Add one record (in a transaction shared with concurrent appends)."""
        _check(record)
        await self._appends.submit(record)

    async def _append_many(self, records: Sequence[AuditRecord]) -> list[None]:
        import psycopg

        rows = [_row(r, r.at) for r in records]
        async with self._lock:
            for attempt in range(2):
                committing = False
                try:
                    async with self._conn.transaction():
                        # In the order given (the trail's order); psycopg pipelines the rows.
                        await self._conn.cursor().executemany(_INSERT.format("%s"), rows)
                        committing = True
                    break
                except Exception as exc:
                    # Whatever failed once COMMIT was sent, the batch may have been written:
                    # never twice. Not an error the server answered COMMIT with (a deferred
                    # trigger's, say): it has a SQLSTATE, and the batch was rolled back.
                    if committing and getattr(exc, "sqlstate", None) is None:
                        raise AuditOutcomeUnknown(len(records)) from exc
                    # Dropped before COMMIT was sent, nothing of the batch was written, and
                    # its callers would only count a gap: once more, on a new connection
                    # (not after a server that did not answer: it would not now either).
                    if not isinstance(exc, psycopg.Error) or not self._conn.broken or attempt:
                        raise
        return [None] * len(records)

    async def records(
        self, event_id: str | None = None, since: dt.datetime | None = None
    ) -> list[AuditRecord]:
        """Records in the order written."""
        where, args = _where(event_id, since, "%s")
        async with self._lock:
            cur = await self._conn.execute(
                f"SELECT {_COLUMNS} FROM audit_trail{where} ORDER BY seq",  # noqa: S608
                args,
            )
            rows = await cur.fetchall()
        return [_record(row) for row in rows]

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()


async def open_audit(url: str) -> AuditTrail:
    """Open the trail named by a URL (`eobblast.state.sqlite.open_store`)."""
    return await open_store(url, "audit", SqliteAuditTrail, PostgresAuditTrail.connect)


async def append_or_count_gap(
    trail: AuditTrail, record: AuditRecord, logger: logging.Logger, message: str
) -> bool:
    """Append `record`; if the trail refuses it, count an audit gap (EobblastAuditGap) and
    log `message` on `logger` with the record's ids and the error's type only (a driver's
    message could quote a value). What the record records stands either way."""
    try:
        await trail.append(record)
    except Exception as exc:
        AUDIT_GAPS.inc()
        logger.error(
            message,
            extra={
                "action": str(record.action),
                "event_id": record.event_id,
                "item_id": record.item_id,
                "exc_type": type(exc).__name__,
            },
        )
        return False
    return True
