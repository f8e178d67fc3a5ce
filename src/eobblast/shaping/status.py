"""A snapshot of every pool and IP for `eobblast pools status` (and the metrics exporter)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from eobblast.shaping.budgets import BudgetStore, BudgetUsage, Suspension
from eobblast.shaping.pools import PoolConfig
from eobblast.shaping.warmup import NEVER_USED, IpActivity, WarmupPlan, hour_bucket


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    """One IP's hour at one provider."""

    provider: str
    cap: int
    used: int  # spent or leased by any worker this hour
    sent: int  # spent, as reported (lags by at most one chunk per worker)
    deferred: int
    suspended_until: float | None = None
    suspension_code: str | None = None

    @property
    def suspended(self) -> bool:
        """Whether a block suspends this IP at this provider."""
        return self.suspended_until is not None


@dataclass(frozen=True, slots=True)
class IpStatus:
    """One source IP: warm-up progress and its providers this hour."""

    address: str
    ehlo_name: str
    warmup_day: int | None  # None: mature
    warming: bool
    hourly_cap: int
    last_used: float | None
    providers: tuple[ProviderStatus, ...]

    @property
    def suspended(self) -> bool:
        """Whether any provider has this IP suspended."""
        return any(p.suspended for p in self.providers)


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """One pool in the hour bucket `hour`."""

    name: str
    hour: int
    ips: tuple[IpStatus, ...]


def pool_status(
    pools: PoolConfig,
    plan: WarmupPlan,
    *,
    now: float,
    usage: Iterable[BudgetUsage],
    activity: Mapping[str, IpActivity],
    suspensions: Mapping[tuple[str, str], Suspension],
) -> tuple[PoolStatus, ...]:
    """Combine config, plan and store facts into the status of every pool (pure)."""
    hour = hour_bucket(now)
    counters = {(u.ip, u.provider): u for u in usage if u.hour == hour}
    result: list[PoolStatus] = []
    for pool in pools.pools:
        ips: list[IpStatus] = []
        for source in pool.ips:
            known = activity.get(source.address, NEVER_USED)
            providers: list[ProviderStatus] = []
            for provider in plan.providers.names:
                counter = counters.get((source.address, provider))
                block = suspensions.get((source.address, provider))
                active = block is not None and block.until > now
                providers.append(
                    ProviderStatus(
                        provider=provider,
                        cap=plan.hourly_cap(source, provider, now, known),
                        used=counter.used if counter else 0,
                        sent=counter.sent if counter else 0,
                        deferred=counter.deferred if counter else 0,
                        suspended_until=block.until if block and active else None,
                        suspension_code=block.code if block and active else None,
                    )
                )
            ips.append(
                IpStatus(
                    address=source.address,
                    ehlo_name=source.ehlo_name,
                    warmup_day=plan.warmup_day(source, now, known),
                    warming=plan.is_warming(source, now, known),
                    hourly_cap=plan.ip_hourly_cap(source, now, known),
                    last_used=known.last_used,
                    providers=tuple(providers),
                )
            )
        result.append(PoolStatus(pool.name, hour, tuple(ips)))
    return tuple(result)


async def read_pool_status(
    store: BudgetStore, pools: PoolConfig, plan: WarmupPlan, now: float
) -> tuple[PoolStatus, ...]:
    """Read the store and build the status of every pool at `now`."""
    return pool_status(
        pools,
        plan,
        now=now,
        usage=await store.usage(hour_bucket(now)),
        activity=await store.activities(),
        suspensions=await store.suspensions(now),
    )
