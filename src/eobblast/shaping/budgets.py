"""Shared hourly budgets: counters in the state store, leased to workers in small chunks.

Every (source IP, provider, UTC hour) has one counter row. A worker takes `min(chunk, cap -
used)` units with one atomic upsert, spends them locally without further round trips, and
returns what it did not spend when it stops. A worker that dies keeps its unspent units
until the hour ends, so a crash can only make the cap stricter, never exceed it. Because
the counter lives in the store, a restart mid-hour continues the count.

The same store keeps each IP's last send (for the 30-idle-days warm-up reset) and the
suspensions raised by block replies, so every worker on every machine sees them.
SQLite (one file, WAL) serves the workers of one machine; PostgreSQL serves many machines.
"""

from __future__ import annotations

import abc
import asyncio
import datetime as dt
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eobblast.shaping.pools import SourceIp
from eobblast.shaping.warmup import (
    NEVER_USED,
    SECONDS_PER_DAY,
    IpActivity,
    IpBudget,
    WarmupPlan,
    hour_bucket,
)
from eobblast.state.postgres import PgConnection, connect_postgres
from eobblast.state.sqlite import open_sqlite, open_store, write_transaction

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS shaping_budget (
        ip TEXT NOT NULL,
        provider TEXT NOT NULL,
        hour_bucket BIGINT NOT NULL,
        used BIGINT NOT NULL,
        sent BIGINT NOT NULL DEFAULT 0,
        deferred BIGINT NOT NULL DEFAULT 0,
        last_grant BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (ip, provider, hour_bucket)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS shaping_ip_activity (
        ip TEXT PRIMARY KEY,
        last_used DOUBLE PRECISION NOT NULL,
        warmup_restart TEXT
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS shaping_suspension (
        ip TEXT NOT NULL,
        provider TEXT NOT NULL,
        suspended_until DOUBLE PRECISION NOT NULL,
        code TEXT NOT NULL,
        since DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (ip, provider)
    )
    """,
)

_SCHEMA_LOCK = 0x0E0B_5A9E

# Statements are written once, in PostgreSQL's dialect; `_sqlite` rewrites the placeholders
# and the two-argument LEAST/GREATEST, which SQLite spells MIN/MAX.
_SUSPENDED = (
    "SELECT suspended_until FROM shaping_suspension"
    " WHERE ip = %(ip)s AND provider = %(provider)s AND suspended_until > %(now)s"
)
# All SET expressions see the row as it was before the update, so last_grant records exactly
# what this statement added: one statement, one row lock, no read-then-write race.
_TAKE = """
    INSERT INTO shaping_budget (ip, provider, hour_bucket, used, sent, deferred, last_grant)
    VALUES (%(ip)s, %(provider)s, %(hour)s, %(first)s, %(sent)s, %(deferred)s, %(first)s)
    ON CONFLICT (ip, provider, hour_bucket) DO UPDATE SET
        last_grant = LEAST(%(want)s, GREATEST(%(cap)s - shaping_budget.used, 0)),
        used = shaping_budget.used + LEAST(%(want)s, GREATEST(%(cap)s - shaping_budget.used, 0)),
        sent = shaping_budget.sent + excluded.sent,
        deferred = shaping_budget.deferred + excluded.deferred
    RETURNING used, last_grant
"""
# A warm-up restart is recorded only if the stored last send is really that old: a worker
# with a stale view must not reset an IP that another worker has been sending from.
_TOUCH = """
    INSERT INTO shaping_ip_activity (ip, last_used, warmup_restart)
    VALUES (%(ip)s, %(now)s, %(restart)s)
    ON CONFLICT (ip) DO UPDATE SET
        warmup_restart = CASE WHEN shaping_ip_activity.last_used < %(idle_before)s
            THEN COALESCE(excluded.warmup_restart, shaping_ip_activity.warmup_restart)
            ELSE shaping_ip_activity.warmup_restart END,
        last_used = GREATEST(shaping_ip_activity.last_used, excluded.last_used)
    RETURNING last_used, warmup_restart
"""
_ACTIVITY = "SELECT last_used, warmup_restart FROM shaping_ip_activity WHERE ip = %(ip)s"
_ACTIVITIES = "SELECT ip, last_used, warmup_restart FROM shaping_ip_activity"
_RELEASE = """
    INSERT INTO shaping_budget (ip, provider, hour_bucket, used, sent, deferred, last_grant)
    VALUES (%(ip)s, %(provider)s, %(hour)s, 0, %(sent)s, %(deferred)s, 0)
    ON CONFLICT (ip, provider, hour_bucket) DO UPDATE SET
        used = GREATEST(shaping_budget.used - %(unused)s, 0),
        sent = shaping_budget.sent + excluded.sent,
        deferred = shaping_budget.deferred + excluded.deferred
"""
_USAGE = (
    "SELECT ip, provider, hour_bucket, used, sent, deferred FROM shaping_budget"
    " WHERE hour_bucket = %(hour)s ORDER BY ip, provider"
)
_SUSPEND = """
    INSERT INTO shaping_suspension (ip, provider, suspended_until, code, since)
    VALUES (%(ip)s, %(provider)s, %(until)s, %(code)s, %(now)s)
    ON CONFLICT (ip, provider) DO UPDATE SET
        suspended_until = GREATEST(shaping_suspension.suspended_until, excluded.suspended_until),
        code = excluded.code,
        since = excluded.since
"""
_RESUME = "DELETE FROM shaping_suspension WHERE ip = %(ip)s AND provider = %(provider)s"
_SUSPENSIONS = (
    "SELECT ip, provider, suspended_until, code, since FROM shaping_suspension"
    " WHERE suspended_until > %(now)s ORDER BY ip, provider"
)
_PRUNE_BUDGETS = "DELETE FROM shaping_budget WHERE hour_bucket < %(hour)s"
_PRUNE_SUSPENSIONS = "DELETE FROM shaping_suspension WHERE suspended_until <= %(now)s"

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def _sqlite(sql: str) -> str:
    sql = _PLACEHOLDER.sub(r":\1", sql)
    return sql.replace("LEAST(", "MIN(").replace("GREATEST(", "MAX(")


@dataclass(frozen=True, slots=True)
class BudgetKey:
    """One counter: a source IP's sends to one provider in one UTC hour."""

    ip: str
    provider: str
    hour: int


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """Ask for up to `want` units under `cap`, reporting what was spent since the last call."""

    key: BudgetKey
    cap: int
    want: int
    now: float
    sent: int = 0
    deferred: int = 0
    # Record a warm-up restart on this date, but only if the IP's stored last send is
    # before `idle_before` (or there is none).
    restart_on: dt.date | None = None
    idle_before: float = 0.0


@dataclass(frozen=True, slots=True)
class Lease:
    """What the store granted, and what it knows of the key's IP."""

    granted: int
    used: int  # the hour's counter after this lease, over all workers
    activity: IpActivity
    suspended_until: float | None = None


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """One counter row: `used` includes units leased but not yet spent; `sent` was spent."""

    ip: str
    provider: str
    hour: int
    used: int
    sent: int
    deferred: int


@dataclass(frozen=True, slots=True)
class Suspension:
    """A block: the IP sends nothing to the provider until `until` or an operator resumes it."""

    ip: str
    provider: str
    until: float
    code: str  # the reply code that caused it (never the reply text)
    since: float


def _activity(row: Sequence[Any] | None) -> IpActivity:
    if row is None:
        return NEVER_USED
    restart = dt.date.fromisoformat(row[1]) if row[1] else None
    return IpActivity(float(row[0]), restart)


def _take_params(request: LeaseRequest, suspended: bool) -> dict[str, Any]:
    want = 0 if suspended else max(0, request.want)
    return {
        "ip": request.key.ip,
        "provider": request.key.provider,
        "hour": request.key.hour,
        "want": want,
        "cap": request.cap,
        "first": max(0, min(want, request.cap)),
        "sent": request.sent,
        "deferred": request.deferred,
    }


def _touch_params(request: LeaseRequest) -> dict[str, Any]:
    return {
        "ip": request.key.ip,
        "now": request.now,
        "restart": request.restart_on.isoformat() if request.restart_on else None,
        "idle_before": request.idle_before,
    }


def _key_params(key: BudgetKey, *, unused: int, sent: int, deferred: int) -> dict[str, Any]:
    return {
        "ip": key.ip,
        "provider": key.provider,
        "hour": key.hour,
        "unused": unused,
        "sent": sent,
        "deferred": deferred,
    }


class BudgetStore(abc.ABC):
    """The shared counters; SQLite and PostgreSQL pass the same tests."""

    @abc.abstractmethod
    async def lease(self, request: LeaseRequest) -> Lease:
        """Atomically take up to `want` units of the key's remaining budget."""

    @abc.abstractmethod
    async def release(self, key: BudgetKey, *, unused: int, sent: int, deferred: int) -> None:
        """Give back unspent units and report spent/deferred counts."""

    @abc.abstractmethod
    async def usage(self, hour: int) -> list[BudgetUsage]:
        """Every counter of one hour."""

    @abc.abstractmethod
    async def activity(self, ip: str) -> IpActivity:
        """What the store knows of an IP's sending."""

    @abc.abstractmethod
    async def activities(self) -> dict[str, IpActivity]:
        """Every IP's activity."""

    @abc.abstractmethod
    async def suspend(self, ip: str, provider: str, *, until: float, code: str, now: float) -> None:
        """Suspend an IP for one provider (a block reply), for every worker."""

    @abc.abstractmethod
    async def resume(self, ip: str, provider: str) -> None:
        """Lift a suspension (operator action)."""

    @abc.abstractmethod
    async def suspensions(self, now: float) -> dict[tuple[str, str], Suspension]:
        """Suspensions in force at `now`, keyed by (ip, provider)."""

    @abc.abstractmethod
    async def prune(self, before_hour: int, now: float) -> None:
        """Delete counters older than `before_hour` and expired suspensions."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""


class SqliteBudgetStore(BudgetStore):
    """Budgets in one SQLite file (WAL), shared by the worker processes of one machine.

    Like the send ledger, statements are microsecond single-row writes run on the event
    loop's thread; a write waits for another process's write lock with the loop running
    (`begin_immediate`).
    """

    def __init__(self, path: Path) -> None:
        self._db = open_sqlite(path, _SCHEMA)

    def _one(self, sql: str, params: Mapping[str, Any]) -> Any:
        # fetchall: a RETURNING statement left half-read would keep the transaction busy.
        rows = self._db.execute(_sqlite(sql), params).fetchall()
        return rows[0] if rows else None

    async def lease(self, request: LeaseRequest) -> Lease:
        """Atomically take up to `want` units of the key's remaining budget."""
        key = request.key

        def take() -> Lease:
            row = self._one(
                _SUSPENDED, {"ip": key.ip, "provider": key.provider, "now": request.now}
            )
            suspended_until = float(row[0]) if row else None
            used, granted = self._one(_TAKE, _take_params(request, suspended_until is not None))
            if granted > 0:
                activity = _activity(self._one(_TOUCH, _touch_params(request)))
            else:
                activity = _activity(self._one(_ACTIVITY, {"ip": key.ip}))
            return Lease(int(granted), int(used), activity, suspended_until)

        # IMMEDIATE takes the write lock up front, so the three statements commit as one.
        return await write_transaction(self._db, take)

    async def release(self, key: BudgetKey, *, unused: int, sent: int, deferred: int) -> None:
        """Give back unspent units and report spent/deferred counts."""
        params = _key_params(key, unused=unused, sent=sent, deferred=deferred)
        await write_transaction(self._db, lambda: self._db.execute(_sqlite(_RELEASE), params))

    async def usage(self, hour: int) -> list[BudgetUsage]:
        """Every counter of one hour."""
        rows = self._db.execute(_sqlite(_USAGE), {"hour": hour}).fetchall()
        return [BudgetUsage(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows]

    async def activity(self, ip: str) -> IpActivity:
        """What the store knows of an IP's sending."""
        return _activity(self._one(_ACTIVITY, {"ip": ip}))

    async def activities(self) -> dict[str, IpActivity]:
        """Every IP's activity."""
        rows = self._db.execute(_ACTIVITIES).fetchall()
        return {str(r[0]): _activity(r[1:]) for r in rows}

    async def suspend(self, ip: str, provider: str, *, until: float, code: str, now: float) -> None:
        """Suspend an IP for one provider, for every worker."""
        params = {"ip": ip, "provider": provider, "until": until, "code": code, "now": now}
        await write_transaction(self._db, lambda: self._db.execute(_sqlite(_SUSPEND), params))

    async def resume(self, ip: str, provider: str) -> None:
        """Lift a suspension."""
        params = {"ip": ip, "provider": provider}
        await write_transaction(self._db, lambda: self._db.execute(_sqlite(_RESUME), params))

    async def suspensions(self, now: float) -> dict[tuple[str, str], Suspension]:
        """Suspensions in force at `now`."""
        rows = self._db.execute(_sqlite(_SUSPENSIONS), {"now": now}).fetchall()
        return {(r[0], r[1]): Suspension(r[0], r[1], float(r[2]), r[3], float(r[4])) for r in rows}

    async def prune(self, before_hour: int, now: float) -> None:
        """Delete old counters and expired suspensions."""
        db = self._db

        def prune() -> None:
            db.execute(_sqlite(_PRUNE_BUDGETS), {"hour": before_hour})
            db.execute(_sqlite(_PRUNE_SUSPENSIONS), {"now": now})

        await write_transaction(db, prune)

    async def close(self) -> None:
        """Close the database."""
        self._db.close()


class PostgresBudgetStore(BudgetStore):
    """Budgets in PostgreSQL, for workers that span machines."""

    def __init__(self, conn: PgConnection) -> None:
        self._conn = conn
        # One connection per worker: statements are serialised, as psycopg requires.
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, dsn: str) -> PostgresBudgetStore:
        """Connect and create the tables if needed."""
        conn = await connect_postgres(dsn, "budget store", _SCHEMA_LOCK, _SCHEMA)
        return cls(conn)

    async def _one(self, sql: str, params: Mapping[str, Any]) -> Any:
        cur = await self._conn.execute(sql, params)
        return await cur.fetchone()

    async def _all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        async with self._lock:
            cur = await self._conn.execute(sql, params)
            rows: list[Any] = await cur.fetchall()
            return rows

    async def _run(self, sql: str, params: Mapping[str, Any]) -> None:
        async with self._lock:
            await self._conn.execute(sql, params)

    async def lease(self, request: LeaseRequest) -> Lease:
        """Atomically take up to `want` units of the key's remaining budget."""
        key = request.key
        async with self._lock, self._conn.transaction():
            row = await self._one(
                _SUSPENDED, {"ip": key.ip, "provider": key.provider, "now": request.now}
            )
            suspended_until = float(row[0]) if row else None
            used, granted = await self._one(
                _TAKE, _take_params(request, suspended_until is not None)
            )
            if granted > 0:
                activity = _activity(await self._one(_TOUCH, _touch_params(request)))
            else:
                activity = _activity(await self._one(_ACTIVITY, {"ip": key.ip}))
        return Lease(int(granted), int(used), activity, suspended_until)

    async def release(self, key: BudgetKey, *, unused: int, sent: int, deferred: int) -> None:
        """Give back unspent units and report spent/deferred counts."""
        await self._run(_RELEASE, _key_params(key, unused=unused, sent=sent, deferred=deferred))

    async def usage(self, hour: int) -> list[BudgetUsage]:
        """Every counter of one hour."""
        rows = await self._all(_USAGE, {"hour": hour})
        return [BudgetUsage(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows]

    async def activity(self, ip: str) -> IpActivity:
        """What the store knows of an IP's sending."""
        async with self._lock:
            return _activity(await self._one(_ACTIVITY, {"ip": ip}))

    async def activities(self) -> dict[str, IpActivity]:
        """Every IP's activity."""
        rows = await self._all(_ACTIVITIES)
        return {str(r[0]): _activity(r[1:]) for r in rows}

    async def suspend(self, ip: str, provider: str, *, until: float, code: str, now: float) -> None:
        """Suspend an IP for one provider, for every worker."""
        params = {"ip": ip, "provider": provider, "until": until, "code": code, "now": now}
        await self._run(_SUSPEND, params)

    async def resume(self, ip: str, provider: str) -> None:
        """Lift a suspension."""
        await self._run(_RESUME, {"ip": ip, "provider": provider})

    async def suspensions(self, now: float) -> dict[tuple[str, str], Suspension]:
        """Suspensions in force at `now`."""
        rows = await self._all(_SUSPENSIONS, {"now": now})
        return {(r[0], r[1]): Suspension(r[0], r[1], float(r[2]), r[3], float(r[4])) for r in rows}

    async def prune(self, before_hour: int, now: float) -> None:
        """Delete old counters and expired suspensions."""
        await self._run(_PRUNE_BUDGETS, {"hour": before_hour})
        await self._run(_PRUNE_SUSPENSIONS, {"now": now})

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()


async def open_budgets(url: str) -> BudgetStore:
    """Open the budget store named by a URL (`eobblast.state.sqlite.open_store`)."""
    return await open_store(url, "budget store", SqliteBudgetStore, PostgresBudgetStore.connect)


class _Held:
    """This worker's share of one (ip, provider) counter for the current hour (mutable)."""

    __slots__ = ("deferred", "hour", "sent", "store_left", "suspended_until", "units")

    def __init__(self, hour: int) -> None:
        self.hour = hour
        self.units = 0  # leased, not yet spent
        self.sent = 0  # spent since the last report to the store
        self.deferred = 0  # deferrals noted since the last report
        self.store_left: int | None = None  # cap - used at the last lease; None: not asked yet
        self.suspended_until: float | None = None

    def report(self) -> bool:
        return bool(self.units or self.sent or self.deferred)


class BudgetLeaser:
    """One worker's client of the budget store: spends leased chunks locally.

    `acquire` costs no round trip while the local chunk lasts. Chunks are small next to the
    cap (at most cap / spread) so a cold IP's few units are not all parked in one worker.
    """

    def __init__(
        self,
        store: BudgetStore,
        plan: WarmupPlan,
        *,
        chunk: int = 50,
        spread: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if chunk < 1 or spread < 1:
            raise ValueError("chunk and spread must be at least 1")
        self._store = store
        self._plan = plan
        self._chunk = chunk
        self._spread = spread
        self._clock = clock
        self._held: dict[tuple[str, str], _Held] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._activity: dict[str, IpActivity] = {}
        # (ip, provider) -> (hour, activity, cap, warming): the cap cannot change within an
        # hour bucket for the same activity, and working it out costs several date
        # conversions, which a busy worker would otherwise pay for every IP of every message.
        self._caps: dict[tuple[str, str], tuple[int, IpActivity, int, bool]] = {}

    def take_local(self, ip: str, provider: str, hour: int) -> bool:
        """Spend a unit of the chunk this worker holds for the hour, if any (no I/O, no await)."""
        held = self._held.get((ip, provider))
        if held is not None and held.units > 0 and held.hour == hour:
            held.units -= 1
            held.sent += 1
            return True
        return False

    async def acquire(self, ip: SourceIp, provider: str) -> bool:
        """Take one unit of this hour's budget for (ip, provider); False: none left (defer)."""
        if self.take_local(ip.address, provider, hour_bucket(self._clock())):
            return True
        key = (ip.address, provider)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            now = self._clock()
            held = await self._current(key, hour_bucket(now))
            if held.units == 0:
                await self._refill(ip, provider, held, now)
            if held.units == 0:
                return False
            held.units -= 1
            held.sent += 1
            return True

    async def _current(self, key: tuple[str, str], hour: int) -> _Held:
        held = self._held.get(key)
        if held is not None and held.hour != hour:
            # Units of a past hour must not be spent in this one: this hour's counter never
            # saw them. Report the old hour and start afresh.
            await self._settle(key, held)
            held = None
        if held is None:
            held = self._held[key] = _Held(hour)
        return held

    async def _refill(self, ip: SourceIp, provider: str, held: _Held, now: float) -> None:
        if ip.address not in self._activity:
            self._activity[ip.address] = await self._store.activity(ip.address)
        activity = self._activity[ip.address]
        cap = self._plan.hourly_cap(ip, provider, now, activity)
        if cap <= 0:
            # Not started yet, or a zero share: nothing to ask the store for this hour.
            held.store_left = 0
            return
        want = max(1, min(self._chunk, cap // self._spread))
        idle = self._plan.schedule.idle_reset_days * SECONDS_PER_DAY
        lease = await self._store.lease(
            LeaseRequest(
                BudgetKey(ip.address, provider, held.hour),
                cap=cap,
                want=want,
                now=now,
                sent=held.sent,
                deferred=held.deferred,
                restart_on=self._plan.restart_on(ip, now, activity),
                idle_before=now - idle,
            )
        )
        held.sent = held.deferred = 0
        held.units += lease.granted
        held.store_left = max(0, cap - lease.used)
        held.suspended_until = lease.suspended_until
        self._activity[ip.address] = lease.activity

    async def _settle(self, key: tuple[str, str], held: _Held) -> None:
        if held.report():
            await self._store.release(
                BudgetKey(key[0], key[1], held.hour),
                unused=held.units,
                sent=held.sent,
                deferred=held.deferred,
            )
        held.units = held.sent = held.deferred = 0

    async def refresh_activity(self) -> None:
        """Load every IP's activity from the store (at start, then now and then for status)."""
        self._activity.update(await self._store.activities())

    def give_back(self, ip: str, provider: str, hour: int) -> None:
        """Return one unit taken this hour for a message that never reached the receiver."""
        held = self._held.get((ip, provider))
        # Only into the hour it came from: a unit of a settled hour would let this hour's
        # counter exceed its cap.
        if held is not None and held.hour == hour and held.sent > 0:
            held.sent -= 1
            held.units += 1

    def known_activity(self, ip: str) -> IpActivity:
        """The worker's last view of an IP's activity (for status and metrics)."""
        return self._activity.get(ip, NEVER_USED)

    def note_deferred(self, ip: str, provider: str) -> None:
        """Count a message the receiver deferred; reported with the next store call."""
        key = (ip, provider)
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _Held(hour_bucket(self._clock()))
        # Noted just after the hour turned, it counts toward the hour being settled: a
        # status figure a few seconds off beats losing the count.
        held.deferred += 1

    def ip_budget(
        self,
        ip: SourceIp,
        provider: str,
        *,
        not_before: float = 0.0,
        suspended: bool = False,
        now: float | None = None,
    ) -> IpBudget:
        """The worker's view of (ip, provider) for choose_ip, merged with the backoff state."""
        if now is None:
            now = self._clock()
        hour = hour_bucket(now)
        key = (ip.address, provider)
        activity = self._activity.get(ip.address, NEVER_USED)
        cached = self._caps.get(key)
        if cached is not None and cached[0] == hour and cached[1] is activity:
            cap, warming = cached[2], cached[3]
        else:
            cap = self._plan.hourly_cap(ip, provider, now, activity)
            warming = self._plan.is_warming(ip, now, activity)
            self._caps[key] = (hour, activity, cap, warming)
        held = self._held.get(key)
        remaining = cap
        if held is not None and held.hour == hour:
            left = held.store_left if held.store_left is not None else cap
            remaining = held.units + left
            until = held.suspended_until
            if until is not None and until > max(now, not_before):
                not_before, suspended = until, True
        return IpBudget(cap, remaining, warming, not_before, suspended)

    async def sync_suspensions(self) -> dict[tuple[str, str], float]:
        """Read the store's suspensions (to mirror into backoff state); lifts resumed ones here."""
        now = self._clock()
        current = await self._store.suspensions(now)
        for key, held in self._held.items():
            held.suspended_until = current[key].until if key in current else None
        return {key: suspension.until for key, suspension in current.items()}

    async def flush(self) -> None:
        """Report spent and deferred counts without giving back units (keeps status fresh)."""
        for key, held in list(self._held.items()):
            if held.sent or held.deferred:
                await self._store.release(
                    BudgetKey(key[0], key[1], held.hour),
                    unused=0,
                    sent=held.sent,
                    deferred=held.deferred,
                )
                held.sent = held.deferred = 0

    async def close(self) -> None:
        """Give back every unspent unit and report counts; the store stays open (caller owns it)."""
        for key, held in list(self._held.items()):
            await self._settle(key, held)
        self._held.clear()
