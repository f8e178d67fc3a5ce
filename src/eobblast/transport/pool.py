"""A pool of verified-TLS SMTP connections keyed by (source address, destination).

Shaped like httpcore's pool: `SmtpPool.acquire(key) -> SmtpConnection`; limits, reuse and
idle expiry live in the pool, the protocol in the connection. A connection that cannot
take a message (the server said 421 or hung up before the message was accepted) raises
`ConnectionNotAvailable`, and the caller gets another one.
"""

from __future__ import annotations

import asyncio
import enum
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import aiosmtplib

from eobblast.errors import DeliveryError, ReasonCode
from eobblast.observe import metrics

_ENHANCED = re.compile(rb"\b([245]\.\d{1,3}\.\d{1,3})\b")
_MIN_TLS = ssl.TLSVersion.TLSv1_2


class ConnectionNotAvailable(Exception):
    """This connection cannot take the message; acquire another and try again."""


@dataclass(frozen=True, slots=True)
class PoolKey:
    """What makes two connections interchangeable."""

    source_address: str | None
    host: str
    port: int
    tls_name: str


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """A server's final reply to a message: the code and the enhanced status, never the text."""

    code: int
    enhanced: str | None
    tls_version: str | None
    cipher: str | None


class ConnectionState(enum.Enum):
    """Lifecycle of one pooled connection."""

    IDLE = "idle"
    ACTIVE = "active"
    CLOSED = "closed"


def make_tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """A client context that verifies chain and host name and refuses anything below TLS 1.2."""
    context = ssl.create_default_context(cafile=ca_bundle)
    context.minimum_version = _MIN_TLS
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _enhanced_status(message: str) -> str | None:
    found = _ENHANCED.search(message.encode("utf-8", "replace"))
    return found.group(1).decode() if found else None


def _reply_error(code: int, message: str, *, stage: str) -> DeliveryError:
    # The reply text may quote the recipient's address: keep only codes.
    enhanced = _enhanced_status(message)
    detail = f"{code} {enhanced}" if enhanced else str(code)
    if code < 500:
        return DeliveryError(ReasonCode.TEMPORARY_FAILURE, detail, smtp_code=code, permanent=False)
    reason = ReasonCode.RECIPIENT_REJECTED if stage == "rcpt" else ReasonCode.MESSAGE_REJECTED
    return DeliveryError(reason, detail, smtp_code=code, permanent=True)


@dataclass(slots=True, eq=False)
class SmtpConnection:
    """One SMTP session that has passed STARTTLS with a verified certificate."""

    key: PoolKey
    smtp: aiosmtplib.SMTP
    tls_version: str | None
    cipher: str | None
    messages: int = 0
    state: ConnectionState = ConnectionState.IDLE
    idle_since: float = field(default_factory=time.monotonic)

    def is_usable(self, now: float, *, max_messages: int, idle_expiry: float) -> bool:
        """Whether the connection may carry another message."""
        return (
            self.state is not ConnectionState.CLOSED
            and self.smtp.is_connected
            and self.messages < max_messages
            and now - self.idle_since < idle_expiry
        )

    async def send(self, mail_from: str, rcpt_to: str, data: bytes) -> SmtpReply:
        """Run one mail transaction; raises DeliveryError or ConnectionNotAvailable."""
        stage = "mail"
        try:
            await self.smtp.mail(mail_from)
            stage = "rcpt"
            await self.smtp.rcpt(rcpt_to)
            stage = "data"
            response = await self.smtp.data(data)
        except aiosmtplib.SMTPServerDisconnected:
            self.state = ConnectionState.CLOSED
            if stage == "data":
                # The message may have been accepted before the line dropped.
                raise DeliveryError(
                    ReasonCode.CONNECTION_LOST, "lost during DATA", permanent=False
                ) from None
            raise ConnectionNotAvailable from None
        except aiosmtplib.SMTPTimeoutError:
            self.state = ConnectionState.CLOSED
            self.smtp.close()
            raise DeliveryError(
                ReasonCode.TIMEOUT, f"timeout at {stage}", permanent=False
            ) from None
        except aiosmtplib.SMTPResponseException as exc:
            self.messages += 1
            if exc.code == 421 or not self.smtp.is_connected:
                self.state = ConnectionState.CLOSED
                self.smtp.close()
                if stage != "data":
                    raise ConnectionNotAvailable from None
            else:
                with suppress(aiosmtplib.SMTPException):
                    await self.smtp.rset()
            metrics.SMTP_REPLIES.labels(f"{exc.code // 100}xx").inc()
            raise _reply_error(exc.code, exc.message, stage=stage) from None
        self.messages += 1
        metrics.SMTP_REPLIES.labels("2xx").inc()
        return SmtpReply(
            response.code, _enhanced_status(response.message), self.tls_version, self.cipher
        )

    async def aclose(self) -> None:
        """Say QUIT and close, ignoring a server that is already gone."""
        self.state = ConnectionState.CLOSED
        if self.smtp.is_connected:
            with suppress(aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                await self.smtp.quit(timeout=2.0)
        self.smtp.close()


class _Destination:
    __slots__ = ("idle", "slots")

    def __init__(self, limit: int) -> None:
        self.idle: deque[SmtpConnection] = deque()
        self.slots = asyncio.Semaphore(limit)


class SmtpPool:
    """Reusable verified-TLS SMTP connections with per-destination limits and idle expiry."""

    def __init__(
        self,
        tls_context: ssl.SSLContext,
        *,
        ehlo_name: str,
        max_connections_per_destination: int = 8,
        max_messages_per_connection: int = 100,
        idle_expiry: float = 30.0,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tls = tls_context
        self._ehlo = ehlo_name
        self._limit = max_connections_per_destination
        self._max_messages = max_messages_per_connection
        self._idle_expiry = idle_expiry
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._clock = clock
        self._destinations: dict[PoolKey, _Destination] = {}
        self._last_sweep = clock()
        self._closed = False
        self._live: set[SmtpConnection] = set()

    def _destination(self, key: PoolKey) -> _Destination:
        dest = self._destinations.get(key)
        if dest is None:
            dest = self._destinations[key] = _Destination(self._limit)
        return dest

    @property
    def open_connections(self) -> int:
        """Connections currently open (idle or active) across all destinations."""
        return len(self._live)

    async def _discard(self, conn: SmtpConnection) -> None:
        self._live.discard(conn)
        await conn.aclose()

    async def acquire(self, key: PoolKey) -> SmtpConnection:
        """An idle connection for `key`, or a new one; waits while the destination is full."""
        if self._closed:
            raise RuntimeError("pool is closed")
        dest = self._destination(key)
        await dest.slots.acquire()
        try:
            now = self._clock()
            self._sweep(now)
            while dest.idle:
                conn = dest.idle.pop()  # most recently used first: its socket is warm
                metrics.CONNECTIONS_IDLE.dec()
                if conn.is_usable(
                    now, max_messages=self._max_messages, idle_expiry=self._idle_expiry
                ):
                    conn.state = ConnectionState.ACTIVE
                    metrics.CONNECTIONS_ACTIVE.inc()
                    return conn
                await self._discard(conn)
            conn = await self._open(key)
            self._live.add(conn)
        except BaseException:
            dest.slots.release()
            raise
        conn.state = ConnectionState.ACTIVE
        metrics.CONNECTIONS_ACTIVE.inc()
        return conn

    async def release(self, conn: SmtpConnection) -> None:
        """Return a connection: kept idle if it can carry more, closed otherwise."""
        dest = self._destination(conn.key)
        metrics.CONNECTIONS_ACTIVE.dec()
        now = self._clock()
        try:
            if not self._closed and conn.is_usable(
                now, max_messages=self._max_messages, idle_expiry=float("inf")
            ):
                conn.state = ConnectionState.IDLE
                conn.idle_since = now
                dest.idle.append(conn)
                metrics.CONNECTIONS_IDLE.inc()
            else:
                await self._discard(conn)
        finally:
            dest.slots.release()

    @asynccontextmanager
    async def connection(self, key: PoolKey) -> AsyncIterator[SmtpConnection]:
        """Acquire a connection for the duration of a block."""
        conn = await self.acquire(key)
        try:
            yield conn
        finally:
            await self.release(conn)

    def _sweep(self, now: float) -> None:
        # At most once a second: drop idle connections that expired or that the server closed.
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for dest in self._destinations.values():
            keep: deque[SmtpConnection] = deque()
            for conn in dest.idle:
                if conn.is_usable(
                    now, max_messages=self._max_messages, idle_expiry=self._idle_expiry
                ):
                    keep.append(conn)
                else:
                    conn.state = ConnectionState.CLOSED
                    conn.smtp.close()
                    self._live.discard(conn)
                    metrics.CONNECTIONS_IDLE.dec()
            dest.idle = keep

    async def _open(self, key: PoolKey) -> SmtpConnection:
        smtp = aiosmtplib.SMTP(
            hostname=key.host,
            port=key.port,
            source_address=(key.source_address, 0) if key.source_address else None,
            local_hostname=self._ehlo,
            timeout=self._command_timeout,
            start_tls=False,  # done by hand below: opportunistic TLS would fall back silently
            use_tls=False,
        )
        try:
            await smtp.connect(timeout=self._connect_timeout)
        except aiosmtplib.SMTPConnectTimeoutError:
            metrics.SMTP_CONNECTS.labels("timeout").inc()
            raise DeliveryError(ReasonCode.TIMEOUT, "connect timeout", permanent=False) from None
        except (aiosmtplib.SMTPException, OSError):
            metrics.SMTP_CONNECTS.labels("failed").inc()
            raise DeliveryError(
                ReasonCode.CONNECT_FAILED, "connect failed", permanent=False
            ) from None
        try:
            await smtp.ehlo()
            if not smtp.supports_extension("starttls"):
                metrics.SMTP_CONNECTS.labels("no_starttls").inc()
                raise DeliveryError(
                    ReasonCode.STARTTLS_NOT_OFFERED, "no STARTTLS offered", permanent=True
                )
            await smtp.starttls(server_hostname=key.tls_name, tls_context=self._tls)
        except DeliveryError:
            smtp.close()
            raise
        except ssl.SSLCertVerificationError:
            smtp.close()
            metrics.SMTP_CONNECTS.labels("tls_untrusted").inc()
            raise DeliveryError(
                ReasonCode.TLS_CERT_UNTRUSTED, "certificate verification failed", permanent=True
            ) from None
        except (TimeoutError, ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ssl.SSLCertVerificationError):
                metrics.SMTP_CONNECTS.labels("tls_untrusted").inc()
                raise DeliveryError(
                    ReasonCode.TLS_CERT_UNTRUSTED,
                    "certificate verification failed",
                    permanent=True,
                ) from None
            metrics.SMTP_CONNECTS.labels("tls_failed").inc()
            raise DeliveryError(
                ReasonCode.TLS_HANDSHAKE_FAILED, "TLS handshake failed", permanent=False
            ) from None
        ssl_object = smtp.get_transport_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            smtp.close()
            raise DeliveryError(ReasonCode.TLS_HANDSHAKE_FAILED, "no TLS session", permanent=True)
        cipher = ssl_object.cipher()
        metrics.SMTP_CONNECTS.labels("ok").inc()
        return SmtpConnection(
            key, smtp, ssl_object.version(), cipher[0] if cipher else None, idle_since=self._clock()
        )

    async def aclose(self) -> None:
        """Close every idle connection politely; active ones close when released."""
        self._closed = True
        for dest in self._destinations.values():
            while dest.idle:
                conn = dest.idle.pop()
                metrics.CONNECTIONS_IDLE.dec()
                await self._discard(conn)
