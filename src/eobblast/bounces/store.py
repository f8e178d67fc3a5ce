"""Durable, shared state for verify-before-resend: SQLite on one machine, PostgreSQL across.

The pure state machine (`bounces.state`) works on a `BounceBook`; this store keeps the book
in tables so that it survives restarts and is shared by every worker process, the bounce
listener and the timers:

* `bounce_eobs`: one row per notice the bounce service knows (status, address, retry
  schedule: attempt, next_at, age_from = first attempt), plus the shell's lease;
* `bounce_members`: per member, the outstanding verification (addresses, deadline), the
  redirects to verified addresses and the addresses whose verification failed;
* `bounce_suppressed`: suppressed addresses (by their comparison key);
* `bounce_payloads`: the raw events of notices that may have to be sent again (held,
  awaiting a retry, or recently sent and still open to an asynchronous bounce). It is the
  one table with PHI, kept apart so it can be access-controlled, compressed, and sealed
  (AES-256-GCM) with the escrow's key ring where the store has one (`sealer`);
* `bounce_incidents`: incidents for ops (ids and codes only);
* `bounce_outbox`: records to publish to Kafka, written in the same transaction as the state
  they announce, so a crash between commit and publish loses nothing;
* `bounce_marks`: where housekeeping got to (the last purge's cutoff for raw events), so
  that no process walks again what another purged.

Settled notices' rows stay for weeks (a late DSN still finds its event), so the indexes of
`bounce_eobs` other than its key and the purge's are partial: a notice is in the member,
address, retry and lease indexes only while its status says it may be looked up that way,
and in the reference index only if a return path may carry it by reference. A notice sent
and delivered then touches no random index page but its key's, however large the table;
every lookup names its status as a literal, which is what lets SQLite and PostgreSQL use a
partial index. A store of an earlier release gets these indexes when first opened (a few
seconds per million rows).

Concurrency: a change runs in `transaction(member_ids, address_keys)`, which serialises all
changes for those members and addresses across processes: `BEGIN IMMEDIATE` on SQLite (one
writer at a time), and transaction-scoped advisory locks per member and per address (taken
in one sorted order) on PostgreSQL, so a send decided for one member cannot slip past the
suppression of its address by another member's bounce. Timers
are claimed with a lease: `FOR UPDATE SKIP LOCKED` on PostgreSQL, `BEGIN IMMEDIATE` on
SQLite, so two workers never take the same due retry.

Times are stored as integer microseconds since the epoch: exact round trips, so a timer that
is due by the database's comparison is also due by the state machine's.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime as dt
import enum
import logging
import sqlite3
import time
import zlib
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import orjson
import zstandard

from eobblast.bounces.category import BounceCategory
from eobblast.bounces.state import (
    BounceBook,
    Eob,
    EobStatus,
    IncidentKind,
    Member,
    PendingVerification,
    address_key,
)
from eobblast.bounces.verp import carried_by_reference, event_reference
from eobblast.errors import EobblastError, ReasonCode
from eobblast.protect.escrow import ENVELOPE_VERSION
from eobblast.state.group import TRANSIENT_ERRORS
from eobblast.state.postgres import PURGE_ANSWER_WAIT, connect_postgres
from eobblast.state.sqlite import begin_immediate, is_busy, open_sqlite, open_store

log = logging.getLogger("eobblast.bounces")

__all__ = [
    "ACTIVE_STATUSES",
    "NO_EXTRAS",
    "BounceStore",
    "BounceTx",
    "Claim",
    "EobExtras",
    "IncidentRow",
    "OutboxMessage",
    "PostgresBounceStore",
    "Slice",
    "SqliteBounceStore",
    "StoreBusy",
    "open_bounce_store",
]

# Notices the state machine may still move on its own (a member's loops look at these).
ACTIVE_STATUSES = (
    EobStatus.SENDING,
    EobStatus.RETRY_SCHEDULED,
    EobStatus.HELD_FOR_VERIFICATION,
    EobStatus.RELEASED,
)
SETTLED_STATUSES = tuple(s for s in EobStatus if s not in ACTIVE_STATUSES)
_ACTIVE = f"status IN ({', '.join(repr(str(s)) for s in ACTIVE_STATUSES)})"
_SETTLED = f"status IN ({', '.join(repr(str(s)) for s in SETTLED_STATUSES)})"
# Settled rows whose raw event is gone. NOT EXISTS, not NOT IN: PostgreSQL cannot hash a
# NOT IN subquery larger than work_mem and then reads the whole payload table again for
# every candidate row (minutes at a few hundred thousand payloads); this is an anti-join.
PURGE_ROWS = (
    f"DELETE FROM bounce_eobs WHERE {_SETTLED} AND updated_at < ? AND NOT EXISTS"  # noqa: S608
    " (SELECT 1 FROM bounce_payloads p WHERE p.eob_id = bounce_eobs.eob_id)"
)
_PURGE_PAYLOADS = (
    "DELETE FROM bounce_payloads WHERE eob_id IN (SELECT eob_id FROM bounce_eobs"  # noqa: S608
    f" WHERE {_SETTLED} AND updated_at < ? AND updated_at >= ?)"
)
# How far before the last purge's cutoff a purge looks again for raw events (see `purge`).
PURGE_OVERLAP = dt.timedelta(hours=1)
_PURGE_OVERLAP_US = int(PURGE_OVERLAP.total_seconds() * 1_000_000)
# Where the store's housekeeping got to, shared by every process (`bounce_marks`).
_PAYLOADS_PURGED = "payloads_purged_before"
_GET_MARK = "SELECT at FROM bounce_marks WHERE name = ?"
_SET_MARK = (
    "INSERT INTO bounce_marks (name, at) VALUES (?, ?) ON CONFLICT (name)"
    " DO UPDATE SET at = excluded.at WHERE bounce_marks.at < excluded.at"
)
_RETRYING = f"status = '{EobStatus.RETRY_SCHEDULED}'"
_AWAITING_REPLY = f"status IN ('{EobStatus.SENDING}', '{EobStatus.RELEASED}')"
_IN_CHUNK = 500
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_K = TypeVar("_K", str, int)
# Raw events kept for late bounces: one per notice sent, compressed on the hot path. zstd at
# level 1 takes about a quarter of zlib level 1's time for the same size. Used on the event
# loop's thread only (the objects are not thread-safe).
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PACK = zstandard.ZstdCompressor(level=1)
_UNPACK = zstandard.ZstdDecompressor()


# A sealed payload is an escrow envelope, whose first byte is its version (1): neither a zstd
# frame (0x28) nor a zlib stream (0x78), so rows written before sealing still read.
# Sealed for this item id and no other: an escrow envelope copied into the table does not open.
_PAYLOAD_ITEM = "bounce-payload/"


class Sealer(Protocol):
    """What seals a kept raw event at rest (the escrow's `KeyRing`)."""

    def seal(self, item_id: str, plaintext: bytes) -> bytes:
        """Encrypt `plaintext` for `item_id`."""

    def open(self, item_id: str, envelope: bytes) -> bytes:
        """Decrypt what `seal` made for `item_id`; an EobblastError if it does not verify."""


def pack_payload(raw: bytes) -> bytes:
    """A raw event as the store keeps it (a zstd frame)."""
    return _PACK.compress(raw)


def unpack_payload(stored: bytes) -> bytes:
    """A kept raw event: a zstd frame, or zlib as stores written before zstd hold."""
    if stored.startswith(_ZSTD_MAGIC):
        return _UNPACK.decompress(stored)
    return zlib.decompress(stored)


class StoreBusy(EobblastError):
    """A transaction lost a race (deadlock, lock timeout); running it again is safe."""

    def __init__(self) -> None:
        super().__init__(ReasonCode.INTERNAL_ERROR, "bounce store busy")


# What any of eobblast's stores raises when it is down or locked: worth trying again later.
STORE_ERRORS: tuple[type[BaseException], ...] = (StoreBusy, *TRANSIENT_ERRORS)


@dataclass(frozen=True, slots=True)
class EobExtras:
    """What the shell keeps beside a notice's state-machine fields."""

    # A resend handed out without Kafka behind it must be reported by then, or it is
    # taken again; on a due retry, the claim of the worker processing it.
    lease_until: dt.datetime | None = None
    fallback_reason: str | None = None
    # The last bounce category seen for the notice (for status events and requests).
    category: str | None = None


# A notice the shell keeps nothing beside (immutable: shared).
NO_EXTRAS = EobExtras()


@dataclass(frozen=True, slots=True)
class Slice:
    """Part of the book, loaded under the members' locks, and the shell's extras."""

    book: BounceBook
    extras: Mapping[str, EobExtras]
    # The address keys whose suppression was looked up: the book is silent about others, so
    # the shell must not let the machine decide about any address outside this set.
    checked_keys: frozenset[str] = frozenset()

    @property
    def member_ids(self) -> frozenset[str]:
        """Every member the slice touches."""
        return frozenset(self.book.members) | {e.member_id for e in self.book.eobs.values()}


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One record to publish to Kafka."""

    topic: str
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class IncidentRow:
    """An incident as stored (ids and codes only)."""

    seq: int
    at: dt.datetime
    kind: IncidentKind
    member_id: str
    eob_id: str | None
    category: str | None


@dataclass(frozen=True, slots=True)
class Claim:
    """A timer taken by one worker: a due retry, a lost resend or an expired verification."""

    kind: ClaimKind
    member_id: str
    eob_id: str | None = None


class ClaimKind(enum.StrEnum):
    """Which timer fired."""

    RETRY_DUE = "retry_due"
    LOST_SEND = "lost_send"
    VERIFICATION_EXPIRED = "verification_expired"


def _us(when: dt.datetime) -> int:
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _time(us: int | None) -> dt.datetime | None:
    return None if us is None else _EPOCH + dt.timedelta(microseconds=int(us))


def _must_time(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=int(us))


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _chunks(items: Collection[_K]) -> Iterable[list[_K]]:
    ordered = sorted(items)
    for start in range(0, len(ordered), _IN_CHUNK):
        yield ordered[start : start + _IN_CHUNK]


def _padded(chunk: list[_K], size: int) -> list[_K]:
    # Its last item repeated: an IN list matches the same rows.
    return chunk + chunk[-1:] * (size - len(chunk))


# --------------------------------------------------------------------------- SQL access

_EOB_COLUMNS = (
    "eob_id, member_id, address, status, age_from, attempt, next_at, incident_recorded,"
    " lease_until, fallback_reason, category"
)
_MEMBER_COLUMNS = "member_id, pending, redirects, failed"
_UPSERT_EOB = (
    "INSERT INTO bounce_eobs (eob_id, member_id, address, address_key, status,"
    " age_from, attempt, next_at, incident_recorded, lease_until, fallback_reason,"
    " category, ref, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (eob_id) DO UPDATE SET address = excluded.address,"
    " address_key = excluded.address_key, status = excluded.status,"
    " age_from = excluded.age_from, attempt = excluded.attempt,"
    " next_at = excluded.next_at, incident_recorded = excluded.incident_recorded,"
    " lease_until = excluded.lease_until,"
    " fallback_reason = excluded.fallback_reason, category = excluded.category,"
    " updated_at = excluded.updated_at"
)


def _reference(eob_id: str) -> str:
    # Only ids that a return path may carry by reference need one: an empty `ref` keeps the
    # rest out of its index (one random index page less to write per notice).
    return event_reference(eob_id) if carried_by_reference(eob_id) else ""


def _eob_from_row(row: Sequence[Any]) -> tuple[Eob, EobExtras]:
    eob = Eob(
        eob_id=str(row[0]),
        member_id=str(row[1]),
        address=str(row[2]),
        status=EobStatus(row[3]),
        age_from=_must_time(row[4]),
        attempt=int(row[5]),
        next_at=_time(row[6]),
        incident_recorded=bool(row[7]),
    )
    return eob, EobExtras(_time(row[8]), row[9], row[10])


def _member_from_row(row: Sequence[Any]) -> Member:
    pending = None
    if row[1] is not None:
        doc = orjson.loads(row[1])
        pending = PendingVerification(
            frozenset(doc["addresses"]),
            _must_time(doc["requested_at"]),
            _must_time(doc["deadline"]),
        )
    return Member(
        pending=pending,
        redirects=MappingProxyType(dict(orjson.loads(row[2]))),
        failed=frozenset(orjson.loads(row[3])),
    )


class _Sql(abc.ABC):
    """The few statements shapes the store needs, with `?` placeholders on both backends."""

    @abc.abstractmethod
    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query and return every row."""

    @abc.abstractmethod
    async def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement and return the number of rows it changed."""

    @abc.abstractmethod
    async def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run a statement once for each row of arguments, in order."""


class BounceTx:
    """One transaction over some members' slice of the book (see BounceStore.transaction)."""

    def __init__(self, sql: _Sql, now: dt.datetime, sealer: Sealer | None = None) -> None:
        self._sql = sql
        self._now = now
        self._sealer = sealer

    async def load(
        self,
        *,
        member_ids: Collection[str] = (),
        eob_ids: Collection[str] = (),
        address_keys: Collection[str] = (),
        suppression_keys: Collection[str] = (),
    ) -> Slice:
        """The named notices, every active notice of the named members, the retrying notices
        on the named addresses, those notices' members, and the suppression status of every
        address they involve plus `suppression_keys` (addresses about to be sent to)."""
        eobs: dict[str, Eob] = {}
        extras: dict[str, EobExtras] = {}
        rows_seen: dict[str, tuple[Any, ...]] = {}

        def keep(rows: list[tuple[Any, ...]]) -> None:
            for row in rows:
                eob_id = str(row[0])
                if rows_seen.get(eob_id) == row:
                    continue  # found by an earlier query too, unchanged: parsed already
                rows_seen[eob_id] = row
                eob, extra = _eob_from_row(row)
                eobs[eob_id] = eob
                extras[eob_id] = extra

        members = set(member_ids)
        if address_keys:
            # A bounce: named notices, then those retrying at the addresses, then the
            # members' own, the order in which a hard bounce walks them (and asks members).
            keep(await self._select_eobs(eob_ids=eob_ids))
            for chunk in _chunks(address_keys):
                keep(
                    await self._sql.all(
                        f"SELECT {_EOB_COLUMNS} FROM bounce_eobs"  # noqa: S608
                        f" WHERE address_key IN ({_marks(len(chunk))}) AND {_RETRYING}",
                        chunk,
                    )
                )
            members |= {eob.member_id for eob in eobs.values()}
            keep(await self._select_eobs(member_ids=members))
        else:
            # The send path (gate, delivery): named notices and the members' in one query.
            keep(await self._select_eobs(eob_ids=eob_ids, member_ids=members))
            # A named notice of a member not named (the caller did not know it, or it
            # moved): that member's active notices too.
            others = {eob.member_id for eob in eobs.values()} - members
            if others:
                members |= others
                keep(await self._select_eobs(member_ids=others))
        book_members: dict[str, Member] = {}
        for chunk in _chunks(members):
            for row in await self._sql.all(
                f"SELECT {_MEMBER_COLUMNS} FROM bounce_members"  # noqa: S608
                f" WHERE member_id IN ({_marks(len(chunk))})",
                chunk,
            ):
                book_members[str(row[0])] = _member_from_row(row)
        keys = set(address_keys) | set(suppression_keys)
        keys |= {address_key(e.address) for e in eobs.values()}
        for member in book_members.values():
            keys |= set(member.redirects) | {address_key(v) for v in member.redirects.values()}
            keys |= set(member.failed)
            if member.pending is not None:
                keys |= member.pending.addresses
        suppressed = await self.suppressed(keys)
        book = BounceBook(
            eobs=MappingProxyType(eobs),
            members=MappingProxyType(book_members),
            suppressed=frozenset(suppressed),
        )
        return Slice(book, MappingProxyType(extras), frozenset(keys))

    async def _select_eobs(
        self, *, eob_ids: Collection[str] = (), member_ids: Collection[str] = ()
    ) -> list[tuple[Any, ...]]:
        """Rows of the named notices and of the named members' active notices."""
        ids = sorted(eob_ids)
        members = sorted(member_ids)
        found: list[tuple[Any, ...]] = []
        for start in range(0, max(len(ids), len(members)), _IN_CHUNK):
            id_chunk = ids[start : start + _IN_CHUNK]
            member_chunk = members[start : start + _IN_CHUNK]
            if id_chunk and member_chunk:
                # Both lists as long: one statement text per size, not one per pair of
                # sizes, or the shapes outgrow SQLite's statement cache (128 entries).
                width = max(len(id_chunk), len(member_chunk))
                id_chunk = _padded(id_chunk, width)
                member_chunk = _padded(member_chunk, width)
            terms: list[str] = []
            args: list[str] = []
            if id_chunk:
                terms.append(f"eob_id IN ({_marks(len(id_chunk))})")
                args += id_chunk
            if member_chunk:
                terms.append(f"(member_id IN ({_marks(len(member_chunk))}) AND {_ACTIVE})")
                args += member_chunk
            found += await self._sql.all(
                f"SELECT {_EOB_COLUMNS} FROM bounce_eobs WHERE {' OR '.join(terms)}",  # noqa: S608
                args,
            )
        return found

    async def suppressed(self, keys: Collection[str]) -> set[str]:
        """Which of these address keys are suppressed."""
        found: set[str] = set()
        for chunk in _chunks(keys):
            rows = await self._sql.all(
                "SELECT address_key FROM bounce_suppressed"  # noqa: S608
                f" WHERE address_key IN ({_marks(len(chunk))})",
                chunk,
            )
            found |= {str(row[0]) for row in rows}
        return found

    async def save(
        self,
        before: Slice,
        after: BounceBook,
        extras: Mapping[str, EobExtras],
        *,
        categories: Mapping[str, BounceCategory] | None = None,
    ) -> None:
        """Write what changed between `before` and `after`.

        A notice whose state changed gets the extras given for it (default: none, which
        clears a lease); categories name why newly suppressed address keys were suppressed.
        """
        now = _us(self._now)
        rows = []
        for eob_id, eob in after.eobs.items():
            extra = extras.get(eob_id, NO_EXTRAS)
            if before.book.eobs.get(eob_id) == eob and before.extras.get(eob_id) == extra:
                continue
            rows.append(
                (
                    eob.eob_id,
                    eob.member_id,
                    eob.address,
                    address_key(eob.address),
                    str(eob.status),
                    _us(eob.age_from),
                    eob.attempt,
                    None if eob.next_at is None else _us(eob.next_at),
                    int(eob.incident_recorded),
                    None if extra.lease_until is None else _us(extra.lease_until),
                    extra.fallback_reason,
                    extra.category,
                    _reference(eob.eob_id),
                    now,
                )
            )
        if rows:
            await self._sql.many(_UPSERT_EOB, rows)
        for member_id, member in after.members.items():
            if before.book.members.get(member_id) == member:
                continue
            pending = None
            deadline = None
            if member.pending is not None:
                deadline = _us(member.pending.deadline)
                pending = orjson.dumps(
                    {
                        "addresses": sorted(member.pending.addresses),
                        "requested_at": _us(member.pending.requested_at),
                        "deadline": deadline,
                    }
                ).decode()
            await self._sql.run(
                "INSERT INTO bounce_members (member_id, pending, deadline, redirects, failed,"
                " claim_until, updated_at) VALUES (?, ?, ?, ?, ?, NULL, ?)"
                " ON CONFLICT (member_id) DO UPDATE SET pending = excluded.pending,"
                " deadline = excluded.deadline, redirects = excluded.redirects,"
                " failed = excluded.failed, claim_until = NULL,"
                " updated_at = excluded.updated_at",
                (
                    member_id,
                    pending,
                    deadline,
                    orjson.dumps(dict(sorted(member.redirects.items()))).decode(),
                    orjson.dumps(sorted(member.failed)).decode(),
                    now,
                ),
            )
        categories = categories or {}
        for key in sorted(after.suppressed - before.book.suppressed):
            category = categories.get(key, BounceCategory.HARD_ADDRESS)
            await self._sql.run(
                "INSERT INTO bounce_suppressed (address_key, category, suppressed_at)"
                " VALUES (?, ?, ?) ON CONFLICT (address_key) DO NOTHING",
                (key, str(category), now),
            )
        for key in sorted(before.book.suppressed - after.suppressed):
            await self._sql.run("DELETE FROM bounce_suppressed WHERE address_key = ?", (key,))

    async def put_payload(self, eob_id: str, member_id: str, raw: bytes) -> None:
        """Keep a notice's raw event (compressed, and sealed if the store has a sealer),
        replacing an older copy."""
        kept = pack_payload(raw)
        if self._sealer is not None:
            kept = self._sealer.seal(_PAYLOAD_ITEM + eob_id, kept)
        await self._sql.run(
            "INSERT INTO bounce_payloads (eob_id, member_id, raw, stored_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (eob_id) DO UPDATE SET raw = excluded.raw,"
            " stored_at = excluded.stored_at",
            (eob_id, member_id, kept, _us(self._now)),
        )

    async def payloads(self, eob_ids: Collection[str]) -> dict[str, bytes]:
        """The raw events kept for these notices (absent ones are missing from the result,
        and so are sealed ones this store cannot open: logged, their notices go to paper)."""
        found: dict[str, bytes] = {}
        for chunk in _chunks(eob_ids):
            rows = await self._sql.all(
                "SELECT eob_id, raw FROM bounce_payloads"  # noqa: S608
                f" WHERE eob_id IN ({_marks(len(chunk))})",
                chunk,
            )
            for eob_id, kept in rows:
                raw = self._unsealed(str(eob_id), bytes(kept))
                if raw is not None:
                    found[str(eob_id)] = unpack_payload(raw)
        return found

    def _unsealed(self, eob_id: str, kept: bytes) -> bytes | None:
        if kept[:1] != bytes((ENVELOPE_VERSION,)):
            return kept  # kept before payloads were sealed, or by a store without a sealer
        # Another key ring's (a host's keys not copied), damaged, or no key ring here: never
        # sent again from here; its notice goes to paper, as a payload kept too briefly does.
        why = "no key ring to open it with"
        if self._sealer is not None:
            try:
                return self._sealer.open(_PAYLOAD_ITEM + eob_id, kept)
            except EobblastError as exc:
                why = exc.detail
        log.error("kept raw event cannot be opened", extra={"event_id": eob_id, "error": why})
        return None

    async def drop_payloads(self, eob_ids: Collection[str]) -> None:
        """Forget the raw events of these notices."""
        for chunk in _chunks(eob_ids):
            await self._sql.run(
                f"DELETE FROM bounce_payloads WHERE eob_id IN ({_marks(len(chunk))})",  # noqa: S608
                chunk,
            )

    async def forget(self, eob_ids: Collection[str]) -> None:
        """Forget these notices altogether: their rows and their raw events."""
        await self.drop_payloads(eob_ids)
        for chunk in _chunks(eob_ids):
            await self._sql.run(
                f"DELETE FROM bounce_eobs WHERE eob_id IN ({_marks(len(chunk))})",  # noqa: S608
                chunk,
            )

    async def record_incident(
        self, kind: IncidentKind, member_id: str, eob_id: str | None, category: str | None
    ) -> None:
        """Append an incident for ops."""
        await self._sql.run(
            "INSERT INTO bounce_incidents (at, kind, member_id, eob_id, category)"
            " VALUES (?, ?, ?, ?, ?)",
            (_us(self._now), str(kind), member_id, eob_id, category),
        )

    async def enqueue(self, messages: Sequence[OutboxMessage], claim_for: float) -> list[int]:
        """Add records to publish; the caller owns them for `claim_for` seconds (wall clock)."""
        ids: list[int] = []
        claim_until = int((time.time() + claim_for) * 1_000_000)
        for message in messages:
            rows = await self._sql.all(
                "INSERT INTO bounce_outbox (topic, msg_key, msg_value, created_at, claim_until)"
                " VALUES (?, ?, ?, ?, ?) RETURNING seq",
                (message.topic, message.key, message.value, _us(self._now), claim_until),
            )
            ids.append(int(rows[0][0]))
        return ids


# --------------------------------------------------------------------------- schema

_COMMON_TABLES = (
    "CREATE TABLE IF NOT EXISTS bounce_eobs ("
    " eob_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, address TEXT NOT NULL,"
    " address_key TEXT NOT NULL, status TEXT NOT NULL, age_from BIGINT NOT NULL,"
    " attempt INTEGER NOT NULL, next_at BIGINT, incident_recorded INTEGER NOT NULL,"
    " lease_until BIGINT, fallback_reason TEXT, category TEXT, ref TEXT NOT NULL,"
    " updated_at BIGINT NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS bounce_eobs_active_member ON bounce_eobs (member_id, status)"
    f" WHERE {_ACTIVE}",
    f"CREATE INDEX IF NOT EXISTS bounce_eobs_retry_due ON bounce_eobs (next_at) WHERE {_RETRYING}",
    "CREATE INDEX IF NOT EXISTS bounce_eobs_retry_address ON bounce_eobs (address_key)"
    f" WHERE {_RETRYING}",
    "CREATE INDEX IF NOT EXISTS bounce_eobs_sent_lease ON bounce_eobs (lease_until)"
    f" WHERE {_AWAITING_REPLY}",
    "CREATE INDEX IF NOT EXISTS bounce_eobs_long_ref ON bounce_eobs (ref) WHERE ref <> ''",
    "CREATE INDEX IF NOT EXISTS bounce_eobs_settled ON bounce_eobs (status, updated_at)"
    f" WHERE {_SETTLED}",
    # An earlier release's full indexes, dropped only once their partial successors exist:
    # until then, other processes' statements keep an index to use.
    *(
        f"DROP INDEX IF EXISTS bounce_eobs_{name}"
        for name in ("member", "due", "lease", "address", "ref", "updated")
    ),
    "CREATE TABLE IF NOT EXISTS bounce_members ("
    " member_id TEXT PRIMARY KEY, pending TEXT, deadline BIGINT, redirects TEXT NOT NULL,"
    " failed TEXT NOT NULL, claim_until BIGINT, updated_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS bounce_members_deadline ON bounce_members (deadline)",
    "CREATE TABLE IF NOT EXISTS bounce_suppressed ("
    " address_key TEXT PRIMARY KEY, category TEXT NOT NULL, suppressed_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bounce_marks (name TEXT PRIMARY KEY, at BIGINT NOT NULL)",
)
_SQLITE_TABLES = (
    *_COMMON_TABLES,
    "CREATE TABLE IF NOT EXISTS bounce_payloads ("
    " eob_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, raw BLOB NOT NULL,"
    " stored_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bounce_incidents ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT, at BIGINT NOT NULL, kind TEXT NOT NULL,"
    " member_id TEXT NOT NULL, eob_id TEXT, category TEXT)",
    "CREATE TABLE IF NOT EXISTS bounce_outbox ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, msg_key BLOB NOT NULL,"
    " msg_value BLOB NOT NULL, created_at BIGINT NOT NULL, claim_until BIGINT NOT NULL)",
)
_PG_TABLES = (
    *_COMMON_TABLES,
    "CREATE TABLE IF NOT EXISTS bounce_payloads ("
    " eob_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, raw BYTEA NOT NULL,"
    " stored_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bounce_incidents ("
    " seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at BIGINT NOT NULL,"
    " kind TEXT NOT NULL, member_id TEXT NOT NULL, eob_id TEXT, category TEXT)",
    "CREATE TABLE IF NOT EXISTS bounce_outbox ("
    " seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, topic TEXT NOT NULL,"
    " msg_key BYTEA NOT NULL, msg_value BYTEA NOT NULL, created_at BIGINT NOT NULL,"
    " claim_until BIGINT NOT NULL)",
)
_OUTBOX_INDEX = "CREATE INDEX IF NOT EXISTS bounce_outbox_claim ON bounce_outbox (claim_until)"

# Claim statements: `{lock}` is FOR UPDATE SKIP LOCKED on PostgreSQL, empty on SQLite (whose
# BEGIN IMMEDIATE already excludes every other writer).
_CLAIM_RETRIES = (
    "UPDATE bounce_eobs SET lease_until = ? WHERE eob_id IN ("  # noqa: S608
    f" SELECT eob_id FROM bounce_eobs WHERE {_RETRYING} AND next_at <= ?"
    " AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_at LIMIT ? {lock})"
    " RETURNING eob_id, member_id"
)
_CLAIM_LOST = (
    "UPDATE bounce_eobs SET lease_until = ? WHERE eob_id IN ("  # noqa: S608
    f" SELECT eob_id FROM bounce_eobs WHERE {_AWAITING_REPLY}"
    " AND lease_until IS NOT NULL AND lease_until <= ? ORDER BY lease_until LIMIT ? {lock})"
    " RETURNING eob_id, member_id"
)
_CLAIM_VERIFICATIONS = (
    "UPDATE bounce_members SET claim_until = ? WHERE member_id IN ("
    " SELECT member_id FROM bounce_members WHERE deadline IS NOT NULL AND deadline <= ?"
    " AND (claim_until IS NULL OR claim_until <= ?) ORDER BY deadline LIMIT ? {lock})"
    " RETURNING member_id"
)
_CLAIM_OUTBOX = (
    "UPDATE bounce_outbox SET claim_until = ? WHERE seq IN ("
    " SELECT seq FROM bounce_outbox WHERE claim_until <= ? ORDER BY seq LIMIT ? {lock})"
    " RETURNING seq, topic, msg_key, msg_value"
)


class BounceStore(abc.ABC):
    """The bounce service's durable state; SQLite and PostgreSQL behave the same."""

    _lock_clause = ""

    def __init__(self) -> None:
        # One connection per store: its statements and transactions take turns.
        self._lock = asyncio.Lock()
        # What seals the raw events kept (the escrow's key ring; `open_bounces` sets it).
        self.sealer: Sealer | None = None

    @abc.abstractmethod
    def _sql(self) -> _Sql:
        """The statement runner of this store's connection."""

    @abc.abstractmethod
    def _begin(
        self,
        member_ids: Collection[str],
        address_keys: Collection[str] = (),
        *,
        purge: bool = False,
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """A database transaction holding the members' and addresses' locks (or every
        writer's, on SQLite); `purge`: a purge's, which may take longer on PostgreSQL."""

    @contextlib.asynccontextmanager
    async def transaction(
        self,
        member_ids: Collection[str],
        now: dt.datetime,
        *,
        address_keys: Collection[str] = (),
    ) -> AsyncIterator[BounceTx]:
        """A transaction over these members' slice; changes to them (and to the suppression
        of these addresses) are serialised."""
        async with self._lock, self._begin(member_ids, address_keys):
            yield BounceTx(self._sql(), now, self.sealer)

    async def _read(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with self._lock:
            return await self._sql().all(sql, args)

    async def members_of(self, eob_ids: Collection[str]) -> dict[str, str]:
        """Notice id -> member id, for the notices the store knows (no locks taken)."""
        found: dict[str, str] = {}
        for chunk in _chunks(eob_ids):
            rows = await self._read(
                f"SELECT eob_id, member_id FROM bounce_eobs WHERE eob_id IN ({_marks(len(chunk))})",  # noqa: S608
                chunk,
            )
            found.update({str(r[0]): str(r[1]) for r in rows})
        return found

    async def members_retrying_at(self, keys: Collection[str]) -> set[str]:
        """Members with a notice awaiting a retry to one of these addresses (no locks)."""
        found: set[str] = set()
        for chunk in _chunks(keys):
            rows = await self._read(
                "SELECT DISTINCT member_id FROM bounce_eobs"  # noqa: S608
                f" WHERE address_key IN ({_marks(len(chunk))}) AND {_RETRYING}",
                chunk,
            )
            found |= {str(r[0]) for r in rows}
        return found

    async def resolve_reference(self, reference: str) -> str | None:
        """The event id behind a VERP reference token (long ids), if the store knows it."""
        rows = await self._read(
            "SELECT eob_id FROM bounce_eobs WHERE ref = ? AND ref <> '' LIMIT 1", [reference]
        )
        return str(rows[0][0]) if rows else None

    async def _claim(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with self._lock, self._begin(()):
            return await self._sql().all(sql.format(lock=self._lock_clause), args)

    async def claim_timers(
        self, now: dt.datetime, *, limit: int, claim_for: dt.timedelta
    ) -> list[Claim]:
        """Take up to `limit` due timers of each kind for `claim_for` (nobody else gets them)."""
        until = _us(now + claim_for)
        at = _us(now)
        claims: list[Claim] = []
        for row in await self._claim(_CLAIM_RETRIES, (until, at, at, limit)):
            claims.append(Claim(ClaimKind.RETRY_DUE, str(row[1]), str(row[0])))
        for row in await self._claim(_CLAIM_LOST, (until, at, limit)):
            claims.append(Claim(ClaimKind.LOST_SEND, str(row[1]), str(row[0])))
        for row in await self._claim(_CLAIM_VERIFICATIONS, (until, at, at, limit)):
            claims.append(Claim(ClaimKind.VERIFICATION_EXPIRED, str(row[0])))
        return claims

    async def claim_outbox(
        self, *, limit: int, claim_for: float
    ) -> list[tuple[int, OutboxMessage]]:
        """Take records whose publisher's claim ran out (it crashed or failed to publish)."""
        now = int(time.time() * 1_000_000)
        rows = await self._claim(_CLAIM_OUTBOX, (now + int(claim_for * 1_000_000), now, limit))
        return [
            (int(row[0]), OutboxMessage(str(row[1]), bytes(row[2]), bytes(row[3])))
            for row in sorted(rows)
        ]

    async def ack_outbox(self, ids: Collection[int]) -> None:
        """Forget records Kafka has acknowledged (in one transaction)."""
        if not ids:
            return
        async with self._lock, self._begin(()):
            for chunk in _chunks(ids):
                await self._sql().run(
                    f"DELETE FROM bounce_outbox WHERE seq IN ({_marks(len(chunk))})",  # noqa: S608
                    chunk,
                )

    async def purge(self, *, payloads_before: dt.datetime, rows_before: dt.datetime) -> int:
        """Drop raw events of notices settled before `payloads_before`, and rows of notices
        settled before `rows_before`; returns the number of rows dropped.

        Raw events are looked for only among notices settled since the last purge's
        `payloads_before` (which the store keeps for every process) less PURGE_OVERLAP. A
        settled row outlives its raw event by weeks: walking all of those again, under the
        store's write lock, held every gate for seconds at a few million rows, each time a
        worker started. The overlap takes in notices stamped a little before that cutoff:
        a transaction's time is taken before it waits for the store (a tick's, before its
        timers' publishes), commits on PostgreSQL can land after another worker's purge,
        and workers' clocks differ.
        """
        dropped = 0
        cutoff = _us(payloads_before)
        async with self._lock, self._begin((), purge=True):
            sql = self._sql()
            marks = await sql.all(_GET_MARK, (_PAYLOADS_PURGED,))
            since = max(0, int(marks[0][0]) - _PURGE_OVERLAP_US) if marks else 0
            if since < cutoff:
                dropped += await sql.run(_PURGE_PAYLOADS, (cutoff, since))
                await sql.run(_SET_MARK, (_PAYLOADS_PURGED, cutoff))
            dropped += await sql.run(PURGE_ROWS, (_us(rows_before),))
        return dropped

    async def status_counts(self, *, settled: bool = True) -> dict[str, int]:
        """Notices by status (statuses with none left out). `settled=False` counts only
        the notices still moving, cheap however many settled rows the store keeps."""
        # Each part over its own partial index: settled rows are counted from theirs alone.
        sql = " UNION ALL ".join(
            f"SELECT status, COUNT(*) FROM bounce_eobs WHERE {where} GROUP BY status"  # noqa: S608
            for where in ((_SETTLED, _ACTIVE) if settled else (_ACTIVE,))
        )
        rows = await self._read(sql, ())
        return {str(r[0]): int(r[1]) for r in rows}

    async def eob(self, eob_id: str) -> tuple[Eob, EobExtras] | None:
        """One notice's row (tools and tests)."""
        rows = await self._read(
            f"SELECT {_EOB_COLUMNS} FROM bounce_eobs WHERE eob_id = ?",  # noqa: S608
            [eob_id],
        )
        return _eob_from_row(rows[0]) if rows else None

    async def is_suppressed(self, address: str) -> bool:
        """Whether an address is suppressed (tools and tests)."""
        rows = await self._read(
            "SELECT 1 FROM bounce_suppressed WHERE address_key = ?", [address_key(address)]
        )
        return bool(rows)

    async def incidents(self, member_id: str | None = None) -> list[IncidentRow]:
        """Incidents in the order recorded, optionally of one member."""
        where, args = (" WHERE member_id = ?", [member_id]) if member_id else ("", [])
        rows = await self._read(
            f"SELECT seq, at, kind, member_id, eob_id, category FROM bounce_incidents{where}"  # noqa: S608
            " ORDER BY seq",
            args,
        )
        return [
            IncidentRow(int(r[0]), _must_time(r[1]), IncidentKind(r[2]), str(r[3]), r[4], r[5])
            for r in rows
        ]

    async def payload_ids(self) -> set[str]:
        """Notices whose raw event is kept (tools and tests)."""
        rows = await self._read("SELECT eob_id FROM bounce_payloads", ())
        return {str(r[0]) for r in rows}

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection."""


# --------------------------------------------------------------------------- SQLite


class _SqliteSql(_Sql):
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, tuple(args)).fetchall()

    async def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self.db.execute(sql, tuple(args)).rowcount

    async def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.db.executemany(sql, rows)


class SqliteBounceStore(BounceStore):
    """The store in one SQLite file (WAL), shared by the processes of one machine.

    Statements are small indexed reads and writes that run on the event loop's thread, as
    the send ledger's do; `BEGIN IMMEDIATE` makes every change exclusive, and a change waits
    for another process's write lock with the loop running (`begin_immediate`).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._db = open_sqlite(path, (*_SQLITE_TABLES, _OUTBOX_INDEX))
        self._runner = _SqliteSql(self._db)

    def _sql(self) -> _Sql:
        return self._runner

    @contextlib.asynccontextmanager
    async def _begin(
        self,
        member_ids: Collection[str],
        address_keys: Collection[str] = (),
        *,
        purge: bool = False,
    ) -> AsyncIterator[None]:
        try:
            await begin_immediate(self._db)
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise StoreBusy from None
            raise
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    async def close(self) -> None:
        """Close the database."""
        self._db.close()


# --------------------------------------------------------------------------- PostgreSQL

_PG_SCHEMA_LOCK = 0x0E0B_B0CE
# Advisory locks are (namespace, hashtext(id)): apart from every other user's.
_PG_MEMBER_LOCKS = 0x0E0B_B0CF
_PG_ADDRESS_LOCKS = 0x0E0B_B0D0


class _PostgresSql(_Sql):
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = await self.conn.execute(sql.replace("?", "%s"), tuple(args))
        if cur.description is None:
            return []
        rows: list[tuple[Any, ...]] = await cur.fetchall()
        return rows

    async def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        cur = await self.conn.execute(sql.replace("?", "%s"), tuple(args))
        return int(cur.rowcount)

    async def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self.conn.cursor() as cur:
            await cur.executemany(sql.replace("?", "%s"), rows)


# A transaction's advisory locks in one statement, in the order of the locks themselves,
# (namespace, hashtext(name)): ordered by name, two names whose hashes collide could be
# taken in opposite orders by two transactions (one lock each) and deadlock. Each lock
# once (two colliding names are one lock). The subquery's rows come sorted (an ordered
# subquery is not flattened into the aggregate), and the aggregate takes each lock as its
# row comes; `count(... ORDER BY ...)` would take them all before sorting.
_PG_LOCK_ALL = (
    "SELECT count(pg_advisory_xact_lock(lock.namespace, lock.hash))"
    " FROM (SELECT DISTINCT l.namespace, hashtext(l.name) AS hash"
    " FROM unnest(%s::int[], %s::text[]) AS l(namespace, name) ORDER BY 1, 2) AS lock"
)


class PostgresBounceStore(BounceStore):
    """The store in PostgreSQL, for workers on several machines."""

    _lock_clause = "FOR UPDATE SKIP LOCKED"

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self._conn = conn
        self._runner = _PostgresSql(conn)

    @classmethod
    async def connect(cls, dsn: str) -> PostgresBounceStore:
        """Connect and create the tables if needed."""
        conn = await connect_postgres(
            dsn, "bounce store", _PG_SCHEMA_LOCK, (*_PG_TABLES, _OUTBOX_INDEX)
        )
        return cls(conn)

    def _sql(self) -> _Sql:
        return self._runner

    @contextlib.asynccontextmanager
    async def _begin(
        self,
        member_ids: Collection[str],
        address_keys: Collection[str] = (),
        *,
        purge: bool = False,
    ) -> AsyncIterator[None]:
        import psycopg

        locks = [(_PG_MEMBER_LOCKS, m) for m in member_ids]
        locks += [(_PG_ADDRESS_LOCKS, k) for k in address_keys]
        try:
            async with self._conn.transaction(answer_within=PURGE_ANSWER_WAIT if purge else None):
                # One order for every transaction (the statement sorts the locks), so
                # overlapping ones cannot deadlock; one statement, not a round trip each.
                if locks:
                    await self._conn.execute(
                        _PG_LOCK_ALL, ([ns for ns, _ in locks], [name for _, name in locks])
                    )
                yield
        except (
            psycopg.errors.DeadlockDetected,
            psycopg.errors.SerializationFailure,
            # Waited LOCK_TIMEOUT behind a transaction that is stuck or whose worker is gone
            # (the server ends that one once it has idled too long): try again.
            psycopg.errors.LockNotAvailable,
        ):
            raise StoreBusy from None

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()


async def open_bounce_store(url: str) -> BounceStore:
    """Open the store named by a URL (`eobblast.state.sqlite.open_store`)."""
    return await open_store(url, "bounce store", SqliteBounceStore, PostgresBounceStore.connect)
