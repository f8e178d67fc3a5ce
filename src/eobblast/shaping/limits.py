"""Per-destination limits from config, and a per-(provider, IP) message rate shaper.

The rate shaper uses aiolimiter rather than asyncio-throttle: aiolimiter is maintained, is a
leaky bucket whose waiters are woken in FIFO order by timers, and costs little CPU with many
waiters; asyncio-throttle polls with sleep(0.01), lets one task take every slot, and burns
CPU as waiters grow (measurements in LIBRARIES.md). Both are per-process: the caps that
must hold across processes live in the budget store, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiolimiter import AsyncLimiter

from eobblast._toml import Table
from eobblast.errors import ConfigError

DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class DestinationLimits:
    """How hard one source IP may push one provider."""

    max_connections: int
    messages_per_connection: int
    messages_per_second: float
    # Messages that may go back to back before the rate applies (the leaky bucket's size).
    burst: int


@dataclass(frozen=True, slots=True)
class ShapingLimits:
    """Limits per provider, with a default for providers not listed."""

    default: DestinationLimits
    by_provider: Mapping[str, DestinationLimits]

    def for_provider(self, provider: str) -> DestinationLimits:
        """The limits that apply to one provider."""
        return self.by_provider.get(provider, self.default)


def _parse_entry(table: Table, base: DestinationLimits | None) -> DestinationLimits:
    def pick(key: str, fallback: Any) -> Any:
        return fallback if base is None else getattr(base, key)

    limits = DestinationLimits(
        max_connections=table.integer("max_connections", pick("max_connections", None), minimum=1),
        messages_per_connection=table.integer(
            "messages_per_connection", pick("messages_per_connection", None), minimum=1
        ),
        messages_per_second=table.number(
            "messages_per_second", pick("messages_per_second", None), above=0.0
        ),
        burst=table.integer("burst", pick("burst", None), minimum=1),
    )
    table.done()
    return limits


def parse_limits(doc: Mapping[str, Any], source: str, providers: tuple[str, ...]) -> ShapingLimits:
    """Parse [limits.default] and [limits.<provider>] from a shaping document."""
    table = Table(doc, source).table("limits")
    default = _parse_entry(table.table(DEFAULT), None)
    by_provider: dict[str, DestinationLimits] = {}
    for name in list(table.keys()):
        if name == DEFAULT:
            continue
        if name not in providers:
            raise ConfigError(f"{table.where}.{name}: no provider named {name!r}")
        by_provider[name] = _parse_entry(table.table(name), default)
    table.done()
    return ShapingLimits(default, by_provider)


class RateShaper:
    """Paces sends per (provider, source IP) at the configured rate, or a backed-off one.

    One per worker process (aiolimiter limiters belong to one event loop). The bucket holds
    `burst` messages and drains at the rate, so bursts stay small whatever the rate.
    """

    def __init__(self, limits: ShapingLimits) -> None:
        self._limits = limits
        self._buckets: dict[tuple[str, str], tuple[float, AsyncLimiter]] = {}

    def limits_for(self, provider: str) -> DestinationLimits:
        """The configured limits of a provider (for the connection pool)."""
        return self._limits.for_provider(provider)

    def rate(self, provider: str, ip: str, *, scope: str | None = None) -> float:
        """The rate (messages per second) the (provider, IP) bucket currently drains at."""
        entry = self._buckets.get((scope or provider, ip))
        return entry[0] if entry else self._limits.for_provider(provider).messages_per_second

    def limiter(
        self, provider: str, ip: str, rate: float | None = None, *, scope: str | None = None
    ) -> AsyncLimiter:
        """The limiter for (provider, IP), rebuilt if the wanted rate changed.

        `scope` gives a destination its own bucket under the provider's limits (the engine
        shapes each receiving site of the fallback provider on its own).
        """
        if rate is not None and rate <= 0:
            # A zero rate is a pause: callers skip paused IPs (choose_ip) instead of waiting.
            raise ValueError("rate must be positive; a paused IP should not be chosen")
        limits = self._limits.for_provider(provider)
        wanted = limits.messages_per_second if rate is None else rate
        key = (scope or provider, ip)
        entry = self._buckets.get(key)
        if entry is None or entry[0] != wanted:
            # aiolimiter fixes its rate at construction; tasks already queued on the old
            # bucket finish at the old pace (a handful, bounded by the connection limit).
            burst = limits.burst
            entry = (wanted, AsyncLimiter(burst, burst / wanted))
            self._buckets[key] = entry
        return entry[1]

    async def acquire(
        self, provider: str, ip: str, rate: float | None = None, *, scope: str | None = None
    ) -> None:
        """Wait for the next send slot of (provider, IP); `rate` overrides the configured one."""
        await self.limiter(provider, ip, rate, scope=scope).acquire()

    def prune(self) -> int:
        """Forget drained buckets (nobody waiting, back to full burst); returns how many.

        Per-site buckets would otherwise grow with every receiving site ever seen; a drained
        bucket holds no state that a new one would not have.
        """
        # A full bucket is one whose last sends have leaked away: a task still queued on it
        # (woken but not yet run) keeps its own reference and finishes normally.
        idle = [
            key
            for key, (_, limiter) in self._buckets.items()
            if limiter.has_capacity(limiter.max_rate)
        ]
        for key in idle:
            del self._buckets[key]
        return len(idle)
