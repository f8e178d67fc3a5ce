"""SMTP delivery: routing, the connection pool and verified TLS. The only part that speaks SMTP."""

from __future__ import annotations

from collections.abc import Sequence

from eobblast.config import TransportConfig
from eobblast.errors import DeliveryError, ReasonCode
from eobblast.observe import metrics
from eobblast.protect.mta_sts import StsMode, StsPolicy
from eobblast.protect.mta_sts_store import StsStore
from eobblast.shaping.backoff import ReplySignal
from eobblast.shaping.engine import DeferReason, Shaper, ShapingConfig, Ticket
from eobblast.transport.mta_sts import MtaStsFetcher, MtaStsPolicies
from eobblast.transport.pool import (
    ConnectionLimits,
    ConnectionNotAvailable,
    GreetingRefused,
    PoolKey,
    SmtpPool,
    SmtpReply,
    SmtpReplyError,
    make_tls_context,
)
from eobblast.transport.probe import RouteTrouble, probe_route
from eobblast.transport.routes import Route, Router, parse_static_routes

__all__ = [
    "ConnectionLimits",
    "MtaStsFetcher",
    "MtaStsPolicies",
    "PoolKey",
    "Route",
    "RouteTrouble",
    "Router",
    "SmtpPool",
    "SmtpReply",
    "SmtpReplyError",
    "Transport",
    "make_tls_context",
    "parse_static_routes",
    "probe_route",
]

# A 421 or a hang-up before the message was accepted is retried on a fresh connection.
_ATTEMPTS_PER_ROUTE = 3


class _PushedBack(Exception):
    """The receiver told this source IP to slow down or blocked it: shaping picks again."""

    def __init__(self, reason: DeferReason) -> None:
        super().__init__(reason)
        self.reason = reason


# What a receiver's TLS can fail with, permanent for PHI (`transport.pool`).
_TLS_REFUSALS = frozenset(
    {
        ReasonCode.STARTTLS_NOT_OFFERED,
        ReasonCode.TLS_CERT_UNTRUSTED,
        ReasonCode.TLS_HANDSHAKE_FAILED,
    }
)


class Transport:
    """Delivers one message to its recipient's domain over a pooled, verified TLS connection.

    With a `Shaper`, every message is sent from the pool IP the shaper picks (bound as the
    source address, greeting with that IP's EHLO name), within its warm-up budget and
    per-destination limits, and the receiver's pushback is reported back to the shaper.

    With `mta_sts`, mail to a domain routed by MX lookup goes only to the MX hosts its
    MTA-STS policy lists when that policy is `enforce` (RFC 8461 section 4.2).
    """

    def __init__(
        self,
        router: Router,
        pool: SmtpPool,
        *,
        source_address: str | None = None,
        shaper: Shaper | None = None,
        mta_sts: MtaStsPolicies | None = None,
    ) -> None:
        self._router = router
        self._pool = pool
        self._source = source_address
        self._shaper = shaper
        self._owns_shaper = False
        self._mta_sts = mta_sts

    @classmethod
    def from_config(
        cls,
        config: TransportConfig,
        *,
        shaper: Shaper | None = None,
        mta_sts_fetch: bool = False,
        mta_sts_store: StsStore | None = None,
    ) -> Transport:
        """Build router and pool from the transport settings (the caller owns `shaper`);
        with `mta_sts_fetch`, MTA-STS policies of MX-routed domains are fetched, and kept
        in `mta_sts_store` if given (the transport owns it then: `aclose` closes it)."""
        ca = str(config.ca_bundle) if config.ca_bundle else None
        mta_sts = None
        if mta_sts_fetch:
            # Policy hosts are trusted as SMTP servers are (the same CA bundle); a context
            # of its own, as the HTTPS client sets its ALPN protocols on it.
            fetcher = MtaStsFetcher(make_tls_context(ca))
            mta_sts = MtaStsPolicies(fetcher, store=mta_sts_store)
        pool = SmtpPool(
            make_tls_context(ca),
            ehlo_name=config.ehlo_name,
            max_connections_per_destination=config.max_connections_per_destination,
            max_messages_per_connection=config.max_messages_per_connection,
            idle_expiry=config.idle_expiry,
            connect_timeout=config.connect_timeout,
            command_timeout=config.command_timeout,
        )
        router = Router(parse_static_routes(config.routes), cache_ttl=config.mx_cache_ttl)
        return cls(
            router, pool, source_address=config.source_address, shaper=shaper, mta_sts=mta_sts
        )

    @classmethod
    async def open(
        cls,
        config: TransportConfig,
        shaping: ShapingConfig | None = None,
        *,
        mta_sts_fetch: bool = False,
        mta_sts_store: StsStore | None = None,
    ) -> Transport:
        """Build the transport, shaped when `shaping` names a pools file; it owns the shaper
        (and `mta_sts_store`, as `from_config`)."""
        shaper = await Shaper.open(shaping) if shaping is not None else None
        transport = cls.from_config(
            config, shaper=shaper, mta_sts_fetch=mta_sts_fetch, mta_sts_store=mta_sts_store
        )
        transport._owns_shaper = shaper is not None
        return transport

    @property
    def pool(self) -> SmtpPool:
        """The connection pool (for metrics and tests)."""
        return self._pool

    @property
    def shaper(self) -> Shaper | None:
        """The shaping engine, if shaping is on."""
        return self._shaper

    async def mta_sts_policy(self, domain: str) -> StsPolicy | None:
        """The MTA-STS policy in force for `domain`: None when fetching is off, the domain
        has a static route (never fetched) or no policy is known."""
        if self._mta_sts is None or self._router.is_static(domain):
            return None
        return await self._mta_sts.policy(domain)

    async def _policy_routes(self, domain: str, routes: list[Route]) -> tuple[list[Route], bool]:
        """The routes mail may take, and whether an `enforce` policy holds: then only the
        MX hosts it lists."""
        if self._mta_sts is None or self._router.is_static(domain):
            return routes, False  # never fetched: not counted either
        policy = await self._mta_sts.policy(domain)
        metrics.MTA_STS_DELIVERIES.labels("absent" if policy is None else policy.mode).inc()
        if policy is None or policy.mode is StsMode.NONE:
            return routes, False
        listed = [route for route in routes if policy.allows(route.host)]
        if len(listed) < len(routes):
            metrics.MTA_STS_MX_MISMATCHES.labels(policy.mode).inc(len(routes) - len(listed))
        if policy.mode is StsMode.TESTING:
            return routes, False  # testing: report, deliver as before
        if not listed:
            # Not permanent: the receiver is not at fault. An EOB goes as a portal notice
            # instead, as after a failed TLS handshake (never plaintext); a notice is
            # deferred, tried again on the soft-bounce schedule, then paper.
            raise DeliveryError(
                ReasonCode.MTA_STS_NO_MATCHING_MX, "no MX host matches the policy", permanent=False
            )
        return listed, True

    async def deliver(
        self,
        mail_from: str,
        rcpt_to: str,
        data: bytes,
        *,
        verified_tls: bool = True,
        traffic_class: str | None = None,
    ) -> SmtpReply:
        """Send one message; returns the accepting reply or raises DeliveryError.

        `verified_tls=False` is for messages that carry no PHI (secure-portal notices): they
        may travel over unverified TLS or plaintext when the receiver offers nothing better.
        `traffic_class` picks the IP pool when shaping is on (default: the configured class).
        A shaped message that no IP may send within the shaper's wait bound raises
        ShapingDeferred (temporary): defer and re-queue it.
        """
        domain = rcpt_to.rpartition("@")[2]
        routes = await self._router.resolve(domain)
        # Every message, not only PHI (RFC 8461 section 4.2): a notice's pickup link at an
        # unlisted MX, or past an unverified certificate, may be at an attacker's.
        routes, enforced = await self._policy_routes(domain, routes)
        try:
            return await self._deliver(
                domain, routes, mail_from, rcpt_to, data, verified_tls or enforced, traffic_class
            )
        except DeliveryError as exc:
            if enforced and not verified_tls and exc.permanent and exc.reason in _TLS_REFUSALS:
                # The domain's policy, not the message, asked for verified TLS: temporary
                # (section 5), tried again later, never a bounce of the member's address.
                raise DeliveryError(exc.reason, exc.detail, permanent=False) from exc
            raise

    async def _deliver(
        self,
        domain: str,
        routes: list[Route],
        mail_from: str,
        rcpt_to: str,
        data: bytes,
        verified_tls: bool,
        traffic_class: str | None,
    ) -> SmtpReply:
        shaper = self._shaper
        if shaper is None:
            return await self._send(routes, None, mail_from, rcpt_to, data, verified_tls)
        hosts = [route.host for route in routes]
        since = shaper.now()
        while True:
            ticket = await shaper.acquire(domain, hosts, traffic_class=traffic_class, since=since)
            try:
                reply = await self._send(routes, ticket, mail_from, rcpt_to, data, verified_tls)
            except _PushedBack as pushed:
                # That IP is paused or suspended now: the shaper picks another one, or waits.
                shaper.deferred(ticket, pushed.reason)
                continue
            except DeliveryError as exc:
                if not exc.permanent:
                    reason = DeferReason.RECEIVER if exc.smtp_code else DeferReason.CONNECTION
                    shaper.deferred(ticket, reason)
                raise
            shaper.sent(ticket)
            return reply

    async def _send(
        self,
        routes: Sequence[Route],
        ticket: Ticket | None,
        mail_from: str,
        rcpt_to: str,
        data: bytes,
        verified_tls: bool,
    ) -> SmtpReply:
        if ticket is None:
            source, ehlo = self._source, None
        else:
            source, ehlo = ticket.address, ticket.ehlo_name
        limits: ConnectionLimits | None = None
        last: DeliveryError = DeliveryError(ReasonCode.NO_ROUTE, "no route", permanent=False)
        for route in routes:
            key = PoolKey(source, route.host, route.port, route.tls_name, verified_tls, ehlo)
            for _ in range(_ATTEMPTS_PER_ROUTE):
                if ticket is not None:
                    limits = self._connection_limits(ticket)
                try:
                    conn = await self._pool.acquire(key, limits)
                    try:
                        return await conn.send(mail_from, rcpt_to, data)
                    finally:
                        await self._pool.release(conn)
                except ConnectionNotAvailable as exc:
                    if ticket is not None and exc.code is not None:
                        await self._pushback(
                            ticket,
                            exc.code,
                            exc.enhanced,
                            exc.reply_text,
                            messages=exc.messages,
                            unsent=True,
                        )
                    last = DeliveryError(
                        ReasonCode.CONNECTION_LOST, "server closed the connection", permanent=False
                    )
                    continue
                except SmtpReplyError as exc:
                    if ticket is not None:
                        await self._pushback(ticket, exc.smtp_code, exc.enhanced, exc.reply_text)
                    raise  # the server answered: another MX would answer the same
                except DeliveryError as exc:
                    if exc.smtp_code is not None or exc.sent:
                        # The server answered, or may have taken the message already: another
                        # MX would answer the same, or deliver a second copy.
                        raise
                    if ticket is not None and isinstance(exc, GreetingRefused):
                        # The greeting said why: a block suspends this IP for the provider,
                        # as the same words after RCPT would.
                        await self._pushback(
                            ticket, exc.code, exc.enhanced, exc.reply_text, unsent=True
                        )
                    elif ticket is not None and exc.reason is ReasonCode.CONNECT_FAILED:
                        # A refused connection slows this IP down for the next messages; this
                        # one still tries the domain's other MX hosts.
                        assert self._shaper is not None
                        await self._shaper.observe(ticket, None)
                    last = exc
                    break  # connection-level failure: try the next route
        raise last

    def _connection_limits(self, ticket: Ticket) -> ConnectionLimits:
        """The limits of the ticket's (scope, IP) as the shaper knows them now."""
        assert self._shaper is not None
        return ConnectionLimits(
            (ticket.scope, ticket.address),
            ticket.max_connections,
            self._shaper.messages_per_connection(ticket),
        )

    async def _pushback(
        self,
        ticket: Ticket,
        code: int | None,
        enhanced: str | None,
        text: str,
        *,
        messages: int = 0,
        unsent: bool = False,
    ) -> None:
        """Report a refusal to the shaper; raise _PushedBack if it was about our pace or IP."""
        assert self._shaper is not None
        signal = await self._shaper.observe(
            ticket, code, enhanced, text, messages_on_connection=messages
        )
        if signal is ReplySignal.NONE:
            return
        if messages:
            # The shaper may have learnt the receiver's per-connection limit: messages
            # already queued for this IP's connections must keep it too.
            self._pool.restrict(self._connection_limits(ticket))
        if unsent:
            self._shaper.give_back(ticket)
        reason = DeferReason.BLOCK if signal is ReplySignal.BLOCK else DeferReason.SLOW_DOWN
        raise _PushedBack(reason)

    async def aclose(self) -> None:
        """Close pooled connections, the MTA-STS fetcher's and policy store (and the shaper,
        if `open` made it)."""
        try:
            await self._pool.aclose()
        finally:
            try:
                if self._mta_sts is not None:
                    await self._mta_sts.aclose()
            finally:
                if self._owns_shaper and self._shaper is not None:
                    await self._shaper.aclose()
