"""Warm-up: per-IP hourly caps from a schedule table, split per provider, and IP choice.

Everything here is pure: time comes in as `now` (epoch seconds, UTC), stored facts come in
as `IpActivity`, and decisions come out as values. Warm-up days are UTC calendar days, so
a day boundary is always an hour boundary and a cap never changes within an hour bucket.
"""

from __future__ import annotations

import datetime as dt
import enum
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eobblast._toml import Table
from eobblast.errors import ConfigError
from eobblast.shaping.pools import IpPool, SourceIp
from eobblast.shaping.providers import Providers, parse_providers

SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86_400


def hour_bucket(now: float) -> int:
    """The UTC hour that `now` falls in, as hours since the epoch (the budget counter key)."""
    return int(now // SECONDS_PER_HOUR)


def hour_start(bucket: int) -> float:
    """The first second of an hour bucket."""
    return float(bucket * SECONDS_PER_HOUR)


def utc_date(now: float) -> dt.date:
    """The UTC calendar date of an epoch time."""
    return dt.datetime.fromtimestamp(now, dt.UTC).date()


def _midnight(day: dt.date) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


@dataclass(frozen=True, slots=True)
class WarmupSchedule:
    """Hourly cap per IP by warm-up day, the cap once the table runs out, and the idle rule."""

    hourly: tuple[int, ...]
    mature_hourly: int
    idle_reset_days: int


@dataclass(frozen=True, slots=True)
class IpActivity:
    """What the state store knows of an IP: its last send and the date its warm-up restarted."""

    last_used: float | None = None
    warmup_restart: dt.date | None = None


NEVER_USED = IpActivity()


@dataclass(frozen=True, slots=True)
class WarmupPlan:
    """The warm-up schedule and the provider split: the whole engine's data."""

    schedule: WarmupSchedule
    providers: Providers

    def restart_on(self, ip: SourceIp, now: float, activity: IpActivity) -> dt.date | None:
        """The date to record if sending now (re)starts the IP's warm-up, else None."""
        today = utc_date(now)
        if activity.last_used is not None:
            idle = now - activity.last_used
            if idle >= self.schedule.idle_reset_days * SECONDS_PER_DAY:
                return today
            return None
        # Never sent from here: the counter starts at the first send, not at a start date that
        # slipped by, so a go-live delay cannot hand a cold IP a day-20 cap.
        if ip.warmup_start is not None and ip.warmup_start < today:
            return today
        return None

    def warmup_start(self, ip: SourceIp, now: float, activity: IpActivity) -> dt.date | None:
        """Day 0 of the IP's current warm-up, or None if it is mature."""
        restart = self.restart_on(ip, now, activity)
        if restart is not None:
            return restart
        # An operator who edits the start date forward restarts the warm-up: the later wins.
        starts = [d for d in (ip.warmup_start, activity.warmup_restart) if d is not None]
        return max(starts) if starts else None

    def warmup_day(self, ip: SourceIp, now: float, activity: IpActivity) -> int | None:
        """Days since warm-up day 0 (negative before the start date), or None if mature."""
        start = self.warmup_start(ip, now, activity)
        if start is None:
            return None
        return (utc_date(now) - start).days

    def is_warming(self, ip: SourceIp, now: float, activity: IpActivity) -> bool:
        """Whether the IP is inside its schedule table today."""
        day = self.warmup_day(ip, now, activity)
        return day is not None and 0 <= day < len(self.schedule.hourly)

    def ip_hourly_cap(self, ip: SourceIp, now: float, activity: IpActivity) -> int:
        """The IP's hourly cap over all providers."""
        day = self.warmup_day(ip, now, activity)
        if day is None or day >= len(self.schedule.hourly):
            return self.schedule.mature_hourly
        if day < 0:
            return 0
        return self.schedule.hourly[day]

    def hourly_cap(self, ip: SourceIp, provider: str, now: float, activity: IpActivity) -> int:
        """How many messages the IP may send to one provider in the hour containing `now`."""
        # Rounded down (the epsilon only absorbs float noise such as 100 * 0.29) so the
        # providers' caps never add up to more than the IP's.
        share = self.providers.share(provider)
        return math.floor(self.ip_hourly_cap(ip, now, activity) * share + 1e-9)


class WaitReason(enum.StrEnum):
    """Why no IP of a pool can take a message now."""

    BUDGET = "budget"  # every IP has spent this hour's cap for the provider
    PAUSED = "paused"  # the provider asked us to slow down (adaptive backoff)
    SUSPENDED = "suspended"  # the provider blocked the IP: an operator should look


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """Defer the message (re-queue it) until `at`; it is never dropped."""

    at: float
    reason: WaitReason


@dataclass(frozen=True, slots=True)
class IpBudget:
    """One (IP, provider)'s standing this hour, as the worker knows it."""

    cap: int
    remaining: int
    warming: bool = False
    # Backoff: not usable before this time (a pause, or a suspension if `suspended`).
    not_before: float = 0.0
    suspended: bool = False


def choose_ip(
    pool: IpPool, provider: str, budgets: Mapping[tuple[str, str], IpBudget], now: float
) -> SourceIp | WaitUntil:
    """Pick the pool's IP for a message to `provider`, or say when to try again.

    Warming IPs that are behind an even pace through the hour go first, so each gets its
    hourly cap spread over the hour rather than in one burst; everything else goes to the IP
    with the smallest used fraction of its cap, which sends the overflow to mature IPs.
    IPs that are paused, suspended or out of budget are skipped; if none is left the
    message waits until the earliest one frees up.
    """
    bucket = hour_bucket(now)
    next_hour = hour_start(bucket + 1)
    elapsed = (now - hour_start(bucket)) / SECONDS_PER_HOUR
    best: SourceIp | None = None
    best_key: tuple[int, float, int, int] | None = None
    wait: WaitUntil | None = None
    for index, source in enumerate(pool.ips):
        budget = budgets[(source.address, provider)]
        if budget.not_before > now:
            reason = WaitReason.SUSPENDED if budget.suspended else WaitReason.PAUSED
            # A pause that ends this hour helps only if budget is left; a new hour brings more.
            at = budget.not_before
            if budget.remaining <= 0 and at < next_hour:
                at = next_hour
            candidate = WaitUntil(at, reason)
        elif budget.remaining <= 0 or budget.cap <= 0:
            candidate = WaitUntil(next_hour, WaitReason.BUDGET)
        else:
            used = (budget.cap - budget.remaining) / budget.cap
            behind = budget.warming and used <= elapsed
            key = (0 if behind else 1, used, -budget.remaining, index)
            if best_key is None or key < best_key:
                best, best_key = source, key
            continue
        if wait is None or candidate.at < wait.at:
            wait = candidate
    if best is not None:
        return best
    return wait if wait is not None else WaitUntil(next_hour, WaitReason.BUDGET)


def parse_schedule(table: Table) -> WarmupSchedule:
    """Parse the [warmup] table."""
    hourly = table.integers("hourly")
    if not hourly:
        raise ConfigError(f"{table.where}.hourly: the schedule needs at least one day")
    for day, (before, after) in enumerate(itertools.pairwise(hourly), start=1):
        # A falling cap is almost always a typo (a dropped digit), never a warm-up plan.
        if after < before:
            raise ConfigError(f"{table.where}.hourly: day {day} ({after}) is below day {day - 1}")
    if hourly[0] < 1:
        raise ConfigError(f"{table.where}.hourly: caps must be at least 1")
    mature = table.integer("mature_hourly", minimum=1)
    idle = table.integer("idle_reset_days", minimum=1)
    table.done()
    return WarmupSchedule(hourly, mature, idle)


def parse_plan(doc: Mapping[str, Any], source: str) -> WarmupPlan:
    """Build the warm-up plan from the [warmup] and [providers] tables of a shaping document."""
    top = Table(doc, source)
    return WarmupPlan(parse_schedule(top.table("warmup")), parse_providers(top.table("providers")))
