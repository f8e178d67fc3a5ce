"""The shaping engine the Transport consults for every message.

`Shaper.acquire` answers "from which source IP, and when": it recognises the receiving
provider, lets `choose_ip` pick among the pool's IPs that are neither paused, suspended nor
out of this hour's budget, takes one unit of the shared budget (`BudgetLeaser`, no round
trip while its chunk lasts) and waits for the rate limiter. After the SMTP exchange the
Transport reports refusals to `Shaper.observe`: "slow down" replies cut the rate and pause
the pair, block replies suspend it in the shared store, for every worker, and raise an
alert. The decisions are the pure functions of `warmup` and `backoff`; this module holds
one worker's state and does the waiting.

Scopes. Warm-up caps are per (IP, provider), as configured. Backoff, the rate limiter and
the connection limit are per (IP, scope): the scope is the provider itself for recognised
providers (gmail, yahoo, microsoft: one reputation system behind many MX hosts) and the
receiving site (primary MX host) for the fallback provider, so that one small domain
throttling or blocking an IP does not stop that IP for every other domain.

Over-budget messages are never dropped: `acquire` waits up to `max_wait` for an IP to
free up and otherwise raises `ShapingDeferred` (a temporary `DeliveryError` that says when
to try again), so the caller defers and re-queues the event.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge

from eobblast.errors import ConfigError, DeliveryError, ReasonCode
from eobblast.observe.metrics import REGISTRY
from eobblast.shaping.backoff import (
    BackoffState,
    ReplySignal,
    apply_signal,
    available_at,
    current_rate,
    initial_state,
    is_paused,
    is_suspended,
    sync_suspension,
)
from eobblast.shaping.budgets import BudgetLeaser, BudgetStore, open_budgets
from eobblast.shaping.limits import RateShaper
from eobblast.shaping.pools import IpPool, PoolConfig, SourceIp, load_pools
from eobblast.shaping.settings import ShapingSettings, load_shaping
from eobblast.shaping.warmup import IpBudget, WaitReason, WaitUntil, choose_ip, hour_bucket

log = logging.getLogger("eobblast.shaping")

DEFAULT_TRAFFIC_CLASS = "eob"
# Entries kept in the per-domain and per-site caches; cleared when full (rebuilt cheaply).
_DOMAIN_CACHE_SIZE = 10_000
# Messages in a row a warm IP takes once chosen before the choice is made again. The IPs
# take turns in short runs rather than one message each: the choice is most of what
# shaping costs per message, and runs this short still keep every IP's connections busy.
_RUN = 8

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


# Budget counters kept in the store (hours), and how often a worker prunes older ones.
_KEEP_HOURS = 48
_PRUNE_EVERY = 3600.0
# A lowered messages-per-connection figure rises one step after this long without a hang-up.
_MESSAGES_RECOVERY = 3600.0


class DeferReason(enum.StrEnum):
    """Why a message did not go out now: the `reason` label of the deferral metric."""

    # The shaper held it back (no IP of the pool could take it within the wait bound).
    BUDGET = "budget"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    # The receiver pushed back on this IP: the message goes from another IP, or later.
    SLOW_DOWN = "slow_down"
    BLOCK = "block"
    # Any other temporary reply, and failures without a reply (refused, lost, TLS).
    RECEIVER = "receiver"
    CONNECTION = "connection"


_WAIT_REASONS = {
    WaitReason.BUDGET: DeferReason.BUDGET,
    WaitReason.PAUSED: DeferReason.PAUSED,
    WaitReason.SUSPENDED: DeferReason.SUSPENDED,
}

# Labels are pool, source IP and provider names from config, and fixed reasons: bounded,
# never a recipient or a domain. Gauges set to the same value by every worker use
# "livemax" (a dead worker's stale value must not stick); the rate is per process, so
# the workers' rates add up ("livesum").
SENT = Counter(
    "eobblast_shaping_sent",
    "Messages the receiver accepted, per pool, source IP and receiving provider.",
    ["pool", "ip", "provider"],
    registry=REGISTRY,
)
DEFERRED = Counter(
    "eobblast_shaping_deferred",
    "Messages not sent now, per pool, source IP, provider and reason; ip is empty when no "
    "IP of the pool could take the message (budget spent, paused or suspended).",
    ["pool", "ip", "provider", "reason"],
    registry=REGISTRY,
)
HOURLY_CAP = Gauge(
    "eobblast_shaping_hourly_cap",
    "Messages the source IP may send to the provider in the current UTC hour.",
    ["pool", "ip", "provider"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
WARMUP_DAY = Gauge(
    "eobblast_shaping_warmup_day",
    "Warm-up day of the source IP (-1: mature, capped only by the mature cap).",
    ["pool", "ip"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
SUSPENDED = Gauge(
    "eobblast_shaping_suspended",
    "1 while a block reply suspends the source IP for the provider.",
    ["pool", "ip", "provider"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
SEND_RATE = Gauge(
    "eobblast_shaping_send_rate",
    "Messages per second the source IP may send to the provider now, summed over worker "
    "processes (0 while paused or suspended; falls after slow-down replies).",
    ["pool", "ip", "provider"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
BLOCK_ALERTS = Counter(
    "eobblast_shaping_block_alerts",
    "Block replies that suspended a source IP for a provider (or one of the fallback "
    "provider's sites): someone should look at the IP's reputation.",
    ["pool", "ip", "provider"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class ShapingConfig:
    """The [shaping] section of the main configuration: where shaping's data and state live."""

    # No pools file: shaping is off, and the transport sends from `transport.source_address`.
    pools_file: Path | None = None
    # The warm-up/limits/backoff data file; None: the packaged copy of config/warmup.toml.
    warmup_file: Path | None = None
    # Shared budgets: sqlite:///file for the workers of one machine, postgresql://... across.
    budgets_url: str = "sqlite:///eobblast-budgets.db"
    # Recipient domain -> provider, for domains whose MX host names do not tell (static
    # routes, the sandbox, a provider's custom-domain customers).
    provider_overrides: dict[str, str] = field(default_factory=dict)
    # How long one message may wait for an IP before it is deferred and re-queued: it
    # holds one of the worker's in-flight slots meanwhile.
    max_wait_seconds: float = 30.0
    # The traffic class of messages that do not name one (config/pools.toml [classes]).
    traffic_class: str = DEFAULT_TRAFFIC_CLASS
    # Budget units a worker leases at a time. The leaser never takes more than a tenth of a
    # cap, so this only matters for warm IPs, where a lease per message would cost more
    # than the message (a lease is one store transaction, ~0.1 ms with SQLite).
    lease_chunk: int = 500

    @property
    def enabled(self) -> bool:
        """Whether shaping is on (a pools file is configured)."""
        return self.pools_file is not None

    def __post_init__(self) -> None:
        # Types are checked where the configuration is read (eobblast.config); ranges here.
        if self.max_wait_seconds < 0:
            raise ConfigError("shaping.max_wait_seconds: expected a number >= 0")
        if self.lease_chunk < 1:
            raise ConfigError("shaping.lease_chunk: expected an integer >= 1")


class ShapingDeferred(DeliveryError):
    """No IP of the pool may send the message within the wait bound: defer and re-queue it."""

    def __init__(self, wait: WaitUntil) -> None:
        super().__init__(ReasonCode.SHAPING_DEFERRED, f"shaping: {wait.reason}", permanent=False)
        self.wait_reason = wait.reason
        # Epoch seconds (the shaper's clock) when an IP may be free: the earliest sensible retry.
        self.retry_at = wait.at


@dataclass(frozen=True, slots=True)
class Ticket:
    """Leave to send one message: the source IP, and the limits its connection must keep."""

    pool: str
    source: SourceIp
    provider: str
    scope: str
    hour: int  # the budget hour the message's unit came from
    max_connections: int

    @property
    def address(self) -> str:
        """The source address to bind."""
        return self.source.address

    @property
    def ehlo_name(self) -> str:
        """The name to greet with (the IP's PTR name)."""
        return self.source.ehlo_name


@dataclass(frozen=True, slots=True)
class PairView:
    """One (source IP, scope)'s adaptive state, for tests, status and debugging."""

    pool: str
    ip: str
    provider: str
    scope: str
    rate: float  # messages per second allowed now (0 while paused or suspended)
    base_rate: float
    paused_until: float
    suspended_until: float | None
    slow_downs: int
    blocks: int
    messages_per_connection: int


class _Choice:
    """The IP last chosen for a (pool, scope), and how many more messages it may take."""

    __slots__ = ("epoch", "hour", "left", "source")

    def __init__(self, source: SourceIp, hour: int, epoch: int, left: int) -> None:
        self.source = source
        self.hour = hour
        self.epoch = epoch
        self.left = left


class _Pair:
    """One (source IP, scope)'s adaptive state in this worker."""

    __slots__ = (
        "lowered_at",
        "max_messages",
        "pool",
        "provider",
        "published_rate",
        "scope",
        "source",
        "state",
    )

    def __init__(
        self,
        pool: str,
        source: SourceIp,
        provider: str,
        scope: str,
        state: BackoffState,
        max_messages: int,
    ) -> None:
        self.pool = pool
        self.source = source
        self.provider = provider
        self.scope = scope
        self.state = state
        self.max_messages = max_messages
        # When a receiver's hang-up last lowered max_messages (None: not lowered since).
        self.lowered_at: float | None = None
        self.published_rate = -1.0

    @property
    def site_scoped(self) -> bool:
        return self.scope != self.provider


def checked_overrides(settings: ShapingSettings, overrides: Mapping[str, str]) -> dict[str, str]:
    """`[shaping] provider_overrides` by lower-case domain; ConfigError for one that names a
    provider the warm-up file does not have."""
    checked = {domain.lower(): name for domain, name in overrides.items()}
    for domain, name in checked.items():
        if name not in settings.plan.providers.names:
            raise ConfigError(f"shaping.provider_overrides.{domain}: no provider {name!r}")
    return checked


class Shaper:
    """One worker's shaping engine over its pools, warm-up plan, limits and shared budgets."""

    def __init__(
        self,
        pools: PoolConfig,
        settings: ShapingSettings,
        leaser: BudgetLeaser,
        store: BudgetStore,
        *,
        provider_overrides: Mapping[str, str] | None = None,
        max_wait: float = 30.0,
        default_class: str = DEFAULT_TRAFFIC_CLASS,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        housekeeping_interval: float = 5.0,
        recheck_interval: float = 1.0,
        owns_store: bool = False,
    ) -> None:
        providers = settings.plan.providers
        overrides = checked_overrides(settings, provider_overrides or {})
        self._pools = pools
        self._plan = settings.plan
        # Block alerts counted from 0, so an alert sees the first block of a pair (a
        # labelled series appears only when first counted).
        for pool in pools.pools:
            for source in pool.ips:
                for provider in providers.names:
                    BLOCK_ALERTS.labels(pool.name, source.address, provider)
        self._limits = settings.limits
        self._policy = settings.backoff
        self._leaser = leaser
        self._store = store
        self._owns_store = owns_store
        self._rates = RateShaper(settings.limits)
        self._overrides = overrides
        self._max_wait = max_wait
        self._default_class = default_class
        self._clock = clock
        self._sleep = sleep
        self._housekeeping_interval = housekeeping_interval
        self._recheck = recheck_interval
        self._next_housekeeping = 0.0
        self._next_prune = 0.0
        # Blocks the store has not taken yet ((address, scope) -> until, code), and blocks
        # seen since this housekeeping round read the store: a read that predates them
        # must not lift them.
        self._unsaved_blocks: dict[tuple[str, str], tuple[float, str]] = {}
        self._blocked_this_round: set[tuple[str, str]] = set()
        self._destinations: dict[str, tuple[str, str]] = {}
        self._classes: dict[str, IpPool] = {}
        self._pairs: dict[tuple[str, str], _Pair] = {}
        # (address, scope) -> the last ticket issued: tickets are immutable and mostly the
        # same from one message to the next, so one is reused while it stays right.
        self._tickets: dict[tuple[str, str], Ticket] = {}
        # (pool, scope) -> the run in progress (see _RUN). `_epoch` moves whenever a pair's
        # standing may have changed (a reply, the store's suspensions): runs end then.
        self._choices: dict[tuple[str, str], _Choice] = {}
        self._epoch = 0
        # Accepted messages per (address, provider) not yet added to the metric: counted
        # here and published by housekeeping, which keeps a metric lock off every message.
        self._sent_counts: dict[tuple[str, str], int] = {}
        self._sources: dict[str, tuple[str, SourceIp]] = {
            source.address: (pool.name, source) for pool in pools.pools for source in pool.ips
        }
        self._sent = {
            (source.address, provider): SENT.labels(pool.name, source.address, provider)
            for pool in pools.pools
            for source in pool.ips
            for provider in providers.names
        }
        # Tasks inside `acquire` waiting for an IP to free up (tests wait for quiescence).
        self.waiting = 0
        self._pool_for(default_class)  # an unusable default class fails at start, not per message
        now = clock()
        for pool in pools.pools:
            for source in pool.ips:
                for provider in providers.names:
                    self._pair(pool.name, source, provider, provider, now)

    @classmethod
    async def open(
        cls, config: ShapingConfig, *, clock: Clock = time.time, sleep: Sleep = asyncio.sleep
    ) -> Shaper | None:
        """Load the pools and shaping data and open the budget store; None when shaping is off."""
        if config.pools_file is None:
            return None
        pools = load_pools(config.pools_file)
        settings = load_shaping(config.warmup_file)
        store = await open_budgets(config.budgets_url)
        try:
            leaser = BudgetLeaser(store, settings.plan, chunk=config.lease_chunk, clock=clock)
            shaper = cls(
                pools,
                settings,
                leaser,
                store,
                provider_overrides=config.provider_overrides,
                max_wait=config.max_wait_seconds,
                default_class=config.traffic_class,
                clock=clock,
                sleep=sleep,
                owns_store=True,
            )
            await shaper.start()
        except BaseException:
            await store.close()
            raise
        return shaper

    async def start(self) -> None:
        """Read the store's view (activity, suspensions) and publish every gauge."""
        await self._housekeeping(self._clock())

    def now(self) -> float:
        """The shaper's clock (epoch seconds)."""
        return self._clock()

    # -------------------------------------------------------------------- destinations

    def destination(self, domain: str, mx_hosts: Sequence[str]) -> tuple[str, str]:
        """(provider, scope) of a recipient domain, from overrides or its MX host names."""
        domain = domain.lower()
        found = self._destinations.get(domain)
        if found is None:
            providers = self._plan.providers
            provider = self._overrides.get(domain) or providers.for_mx(mx_hosts)
            scope = provider
            if provider == providers.fallback:
                site = mx_hosts[0].lower().rstrip(".") if mx_hosts else domain
                scope = f"{provider}:{site}"
            if len(self._destinations) >= _DOMAIN_CACHE_SIZE:
                self._destinations.clear()
            found = self._destinations[domain] = (provider, scope)
        return found

    def provider_for(self, domain: str, mx_hosts: Sequence[str]) -> str:
        """The receiving provider of a recipient domain."""
        return self.destination(domain, mx_hosts)[0]

    def _pool_for(self, traffic_class: str | None) -> IpPool:
        name = traffic_class or self._default_class
        pool = self._classes.get(name)
        if pool is None:
            pool = self._classes[name] = self._pools.pool_for(name)
        return pool

    def _pair(self, pool: str, source: SourceIp, provider: str, scope: str, now: float) -> _Pair:
        key = (source.address, scope)
        pair = self._pairs.get(key)
        if pair is None:
            limits = self._limits.for_provider(provider)
            state = initial_state(self._policy, limits.messages_per_second, now)
            pair = self._pairs[key] = _Pair(
                pool, source, provider, scope, state, limits.messages_per_connection
            )
        return pair

    # -------------------------------------------------------------------- before sending

    async def acquire(
        self,
        domain: str,
        mx_hosts: Sequence[str],
        *,
        traffic_class: str | None = None,
        since: float | None = None,
    ) -> Ticket:
        """Pick the source IP for one message to `domain` and wait for its turn.

        Waits while no IP may send (budget spent, paused, suspended) but not past `since`
        (when the message first asked; default now) plus the max wait: beyond that it
        raises ShapingDeferred at once rather than hold an in-flight slot for nothing.
        """
        provider, scope = self.destination(domain, mx_hosts)
        pool = self._pool_for(traffic_class)
        now = self._clock()
        deadline = (now if since is None else since) + self._max_wait
        while True:
            if now >= self._next_housekeeping:
                await self._housekeeping(now)
            run = self._choices.get((pool.name, scope))
            if (
                run is not None
                and run.left > 0
                and run.epoch == self._epoch
                and run.hour == hour_bucket(now)
            ):
                run.left -= 1
                ticket = await self._take(pool, run.source, provider, scope, now)
                if ticket is not None:
                    return ticket
                run.left = 0  # its chunk ran out: choose again
            choice = self._choose(pool, provider, scope, now)
            if isinstance(choice, SourceIp):
                ticket = await self._take(pool, choice, provider, scope, now)
                if ticket is not None:
                    return ticket
            elif choice.at > deadline:
                DEFERRED.labels(pool.name, "", provider, _WAIT_REASONS[choice.reason]).inc()
                raise ShapingDeferred(choice)
            else:
                # Woken at least every recheck interval: another worker's give-back or an
                # operator's resume can free an IP before `choice.at`.
                self.waiting += 1
                try:
                    await self._sleep(min(choice.at, now + self._recheck) - now)
                finally:
                    self.waiting -= 1
            now = self._clock()

    def _choose(self, pool: IpPool, provider: str, scope: str, now: float) -> SourceIp | WaitUntil:
        leaser = self._leaser
        pairs = self._pairs
        budgets: dict[tuple[str, str], IpBudget] = {}
        for source in pool.ips:
            pair = pairs.get((source.address, scope))
            if pair is None:  # a site nothing has gone wrong with yet
                budget = leaser.ip_budget(source, provider, now=now)
            else:
                state = pair.state
                budget = leaser.ip_budget(
                    source,
                    provider,
                    not_before=available_at(state, now),
                    suspended=is_suspended(state, now),
                    now=now,
                )
            budgets[(source.address, provider)] = budget
        choice = choose_ip(pool, provider, budgets, now)
        if isinstance(choice, SourceIp):
            if budgets[(choice.address, provider)].warming:
                # A warming IP is paced message by message (choose_ip spreads its small
                # hourly cap over the hour): no runs.
                self._choices.pop((pool.name, scope), None)
            else:
                self._choices[(pool.name, scope)] = _Choice(
                    choice, hour_bucket(now), self._epoch, _RUN - 1
                )
        return choice

    async def _take(
        self, pool: IpPool, source: SourceIp, provider: str, scope: str, now: float
    ) -> Ticket | None:
        # This runs for every message: the common case (a unit left in the local chunk, a
        # pair in good standing, the same ticket as last time) awaits nothing but the rate.
        address = source.address
        hour = hour_bucket(now)
        if not self._leaser.take_local(address, provider, hour):
            try:
                granted = await self._leaser.acquire(source, provider)
            except Exception:
                # The store is down: the message is deferred, not failed; nothing is lost.
                log.warning("budget store unavailable", exc_info=True)
                raise DeliveryError(
                    ReasonCode.TEMPORARY_FAILURE,
                    "shaping: budget store unavailable",
                    permanent=False,
                ) from None
            if not granted:
                return None  # other workers spent it: choose again with the store's answer
            now = self._clock()
            hour = hour_bucket(now)
        limits = self._limits.for_provider(provider)
        pair = self._pairs.get((address, scope))
        if pair is None:
            rate = limits.messages_per_second
        else:
            rate = current_rate(pair.state, now)
            if rate <= 0:
                # Paused while the store answered: the unit goes back, choose again.
                self._leaser.give_back(address, provider, hour)
                return None
            if rate != pair.published_rate and not pair.site_scoped:
                pair.published_rate = rate
                SEND_RATE.labels(pair.pool, address, provider).set(rate)
        await self._rates.limiter(provider, address, rate, scope=scope).acquire()
        ticket = self._tickets.get((address, scope))
        if (
            ticket is None
            or ticket.hour != hour
            or ticket.max_connections != limits.max_connections
        ):
            ticket = Ticket(pool.name, source, provider, scope, hour, limits.max_connections)
            self._tickets[(address, scope)] = ticket
        return ticket

    def messages_per_connection(self, ticket: Ticket) -> int:
        """How many messages one connection may carry for the ticket's (IP, scope), now.

        Read at each connection attempt rather than when the ticket was issued, so that a
        per-connection limit learnt from one message's 421 holds for messages in flight.
        """
        pair = self._pairs.get((ticket.source.address, ticket.scope))
        if pair is not None:
            return pair.max_messages
        return self._limits.for_provider(ticket.provider).messages_per_connection

    # -------------------------------------------------------------------- after sending

    def sent(self, ticket: Ticket) -> None:
        """The receiver accepted the message (published to the metric by housekeeping)."""
        key = (ticket.source.address, ticket.provider)
        self._sent_counts[key] = self._sent_counts.get(key, 0) + 1

    def _publish_sent(self) -> None:
        counts, self._sent_counts = self._sent_counts, {}
        for key, count in counts.items():
            self._sent[key].inc(count)

    def deferred(self, ticket: Ticket, reason: DeferReason) -> None:
        """The message did not go from this IP (counted in metrics and the store's status)."""
        DEFERRED.labels(ticket.pool, ticket.address, ticket.provider, reason).inc()
        self._leaser.note_deferred(ticket.address, ticket.provider)

    def give_back(self, ticket: Ticket) -> None:
        """The message never reached the receiver: its budget unit may carry another one."""
        self._leaser.give_back(ticket.address, ticket.provider, ticket.hour)

    async def observe(
        self,
        ticket: Ticket,
        code: int | None,
        enhanced: str | None = None,
        text: str = "",
        *,
        messages_on_connection: int = 0,
    ) -> ReplySignal:
        """Learn from a refusal (`code` None: the connection was refused); returns its signal.

        `text` is only matched against the policy's wording, never kept. With
        `messages_on_connection` > 0 the receiver hung up after that many messages on one
        connection: this pair's connections are retired before reaching it again.
        """
        if code is not None and code < 400:
            return ReplySignal.NONE
        signal = self._policy.classify(code, enhanced, text)
        if signal is ReplySignal.NONE:
            return signal
        now = self._clock()
        pair = self._pair(ticket.pool, ticket.source, ticket.provider, ticket.scope, now)
        was_suspended = is_suspended(pair.state, now)
        was_paused = is_paused(pair.state, now)
        # Classified above with the policy every pair's state carries: not matched again.
        pair.state = apply_signal(pair.state, signal, code, enhanced, now)
        self._epoch += 1  # runs in progress end: this IP may be paused or suspended now
        facts = {"pool": ticket.pool, "ip": ticket.address, "provider": ticket.provider}
        if signal is ReplySignal.SLOW_DOWN:
            if 0 < messages_on_connection < pair.max_messages:
                pair.max_messages = messages_on_connection
                pair.lowered_at = now
            if not was_paused:
                log.info(
                    "receiver asked to slow down",
                    extra={**facts, "code": code, "rate": pair.state.rate},
                )
        else:
            until = pair.state.suspended_until
            assert until is not None  # a block always suspends
            code_text = pair.state.block_code or "block"
            key = (ticket.address, ticket.scope)
            self._blocked_this_round.add(key)
            try:
                await self._store.suspend(
                    ticket.address, ticket.scope, until=until, code=code_text, now=now
                )
            except Exception:
                # This worker holds the suspension, and housekeeping writes it again until
                # the store takes it; meanwhile the others learn it from the receiver.
                self._unsaved_blocks[key] = (until, code_text)
                log.warning("could not record a suspension in the store", exc_info=True)
            else:
                self._unsaved_blocks.pop(key, None)
            if not was_suspended:
                BLOCK_ALERTS.labels(ticket.pool, ticket.address, ticket.provider).inc()
                log.warning(
                    "source IP suspended after a block reply", extra={**facts, "code": code_text}
                )
        self._publish_pair(pair, now)
        return signal

    # -------------------------------------------------------------------- housekeeping

    async def _housekeeping(self, now: float) -> None:
        # Set first: tasks arriving while this awaits the store must not start another round.
        self._next_housekeeping = now + self._housekeeping_interval
        self._publish_sent()
        self._blocked_this_round = set()
        try:
            for (address, scope), (until, code) in list(self._unsaved_blocks.items()):
                if until > now:
                    await self._store.suspend(address, scope, until=until, code=code, now=now)
                del self._unsaved_blocks[(address, scope)]
            await self._leaser.refresh_activity()
            suspensions = await self._leaser.sync_suspensions()
            await self._leaser.flush()
            if now >= self._next_prune:
                # Counters of hours long gone, and expired suspensions: the shared store
                # keeps two days of counters, whatever the number of IPs and providers.
                await self._store.prune(hour_bucket(now) - _KEEP_HOURS, now)
                self._next_prune = now + _PRUNE_EVERY
        except Exception:
            log.warning("budget store unavailable; shaping state not refreshed", exc_info=True)
            return
        providers = self._plan.providers.names
        for address, scope in suspensions:
            known = self._sources.get(address)
            provider = scope.partition(":")[0]
            if known is not None and provider in providers:
                # Another worker's block on a site this worker has not met yet.
                self._pair(known[0], known[1], provider, scope, now)
        self._epoch += 1  # the store's suspensions may differ from what runs were chosen on
        for key, pair in list(self._pairs.items()):
            if key not in self._blocked_this_round:
                pair.state = sync_suspension(pair.state, suspensions.get(key), now)
            configured = self._limits.for_provider(pair.provider).messages_per_connection
            _raise_messages(pair, now, configured)
            if pair.site_scoped and _recovered(pair, now, configured):
                del self._pairs[key]  # back to defaults: memory grows with trouble, not sites
        self._rates.prune()
        # One entry per (IP, site) or (pool, site) ever met: caches, rebuilt on demand.
        for cache in (self._tickets, self._choices):
            if len(cache) > _DOMAIN_CACHE_SIZE:
                cache.clear()
        self._publish_all(now)

    def _publish_pair(self, pair: _Pair, now: float) -> None:
        if pair.site_scoped:
            return  # per-site state is not a metric: sites are unbounded
        labels = (pair.pool, pair.source.address, pair.provider)
        rate = current_rate(pair.state, now)
        pair.published_rate = rate
        SEND_RATE.labels(*labels).set(rate)
        SUSPENDED.labels(*labels).set(1 if is_suspended(pair.state, now) else 0)

    def _publish_all(self, now: float) -> None:
        plan = self._plan
        for pool in self._pools.pools:
            for source in pool.ips:
                activity = self._leaser.known_activity(source.address)
                day = plan.warmup_day(source, now, activity)
                WARMUP_DAY.labels(pool.name, source.address).set(-1 if day is None else day)
                for provider in plan.providers.names:
                    cap = plan.hourly_cap(source, provider, now, activity)
                    HOURLY_CAP.labels(pool.name, source.address, provider).set(cap)
        for pair in self._pairs.values():
            self._publish_pair(pair, now)

    # -------------------------------------------------------------------- views

    def rate(self, ip: str, scope: str) -> float:
        """Messages per second (ip, scope) may send now, after backoff."""
        pair = self._pairs.get((ip, scope))
        if pair is None:
            return self._limits.for_provider(scope.partition(":")[0]).messages_per_second
        return current_rate(pair.state, self._clock())

    def snapshot(self) -> list[PairView]:
        """Every (IP, scope) this worker holds state for."""
        now = self._clock()
        return [
            PairView(
                pool=pair.pool,
                ip=pair.source.address,
                provider=pair.provider,
                scope=pair.scope,
                rate=current_rate(pair.state, now),
                base_rate=pair.state.base_rate,
                paused_until=pair.state.paused_until,
                suspended_until=pair.state.suspended_until,
                slow_downs=pair.state.slow_downs,
                blocks=pair.state.blocks,
                messages_per_connection=pair.max_messages,
            )
            for pair in self._pairs.values()
        ]

    async def aclose(self) -> None:
        """Give unspent budget back to the store (and close it if this shaper opened it)."""
        self._publish_sent()
        try:
            await self._leaser.close()
        finally:
            if self._owns_store:
                await self._store.close()


def _raise_messages(pair: _Pair, now: float, configured: int) -> None:
    """Messages per connection double back toward the configured figure, one step per quiet
    hour once the pair's rate has recovered: a limit learnt from one hang-up is not kept
    for the life of the process. A receiver whose limit is real hangs up again (at most
    once an hour per pair), which lowers it again."""
    if pair.lowered_at is None:
        return
    state = pair.state
    quiet = now - pair.lowered_at >= _MESSAGES_RECOVERY
    if not quiet or is_paused(state, now) or is_suspended(state, now):
        return
    if current_rate(state, now) < state.base_rate:
        return
    pair.max_messages = min(configured, pair.max_messages * 2)
    pair.lowered_at = now if pair.max_messages < configured else None


def _recovered(pair: _Pair, now: float, configured_messages: int) -> bool:
    state = pair.state
    return (
        not is_paused(state, now)
        and not is_suspended(state, now)
        and current_rate(state, now) >= state.base_rate
        and pair.max_messages >= configured_messages
    )
