"""SMTP delivery: routing, the connection pool and verified TLS. The only part that speaks SMTP."""

from __future__ import annotations

from eobblast.config import TransportConfig
from eobblast.errors import DeliveryError, ReasonCode
from eobblast.transport.pool import (
    ConnectionNotAvailable,
    PoolKey,
    SmtpPool,
    SmtpReply,
    make_tls_context,
)
from eobblast.transport.routes import Route, Router, parse_static_routes

__all__ = [
    "PoolKey",
    "Route",
    "Router",
    "SmtpPool",
    "SmtpReply",
    "Transport",
    "make_tls_context",
    "parse_static_routes",
]

# A 421 or a hang-up before the message was accepted is retried on a fresh connection.
_ATTEMPTS_PER_ROUTE = 3


class Transport:
    """Delivers one message to its recipient's domain over a pooled, verified TLS connection."""

    def __init__(self, router: Router, pool: SmtpPool, *, source_address: str | None = None):
        self._router = router
        self._pool = pool
        self._source = source_address

    @classmethod
    def from_config(cls, config: TransportConfig) -> Transport:
        """Build router and pool from the transport settings."""
        ca = str(config.ca_bundle) if config.ca_bundle else None
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
        return cls(router, pool, source_address=config.source_address)

    @property
    def pool(self) -> SmtpPool:
        """The connection pool (for metrics and tests)."""
        return self._pool

    async def deliver(
        self, mail_from: str, rcpt_to: str, data: bytes, *, verified_tls: bool = True
    ) -> SmtpReply:
        """Send one message; returns the accepting reply or raises DeliveryError.

        `verified_tls=False` is for messages that carry no PHI (secure-portal notices): they
        may travel over unverified TLS or plaintext when the receiver offers nothing better.
        """
        domain = rcpt_to.rpartition("@")[2]
        routes = await self._router.resolve(domain)
        last: DeliveryError = DeliveryError(ReasonCode.NO_ROUTE, "no route", permanent=False)
        for route in routes:
            key = PoolKey(self._source, route.host, route.port, route.tls_name, verified_tls)
            for _ in range(_ATTEMPTS_PER_ROUTE):
                try:
                    async with self._pool.connection(key) as conn:
                        return await conn.send(mail_from, rcpt_to, data)
                except ConnectionNotAvailable:
                    last = DeliveryError(
                        ReasonCode.CONNECTION_LOST, "server closed the connection", permanent=False
                    )
                    continue
                except DeliveryError as exc:
                    if exc.smtp_code is not None:
                        raise  # the server answered: another MX would answer the same
                    last = exc
                    break  # connection-level failure: try the next route
        raise last

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._pool.aclose()
