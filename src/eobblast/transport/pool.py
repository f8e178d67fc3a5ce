"""A pool of verified-TLS SMTP connections keyed by (source address, destination).

Shaped like httpcore's pool: `SmtpPool.acquire(key) -> SmtpConnection`; limits, reuse and
idle expiry live in the pool, the protocol in the connection. A connection that cannot
take a message (the server said 421 or hung up before the message was accepted) raises
`ConnectionNotAvailable`, and the caller gets another one.

aiosmtplib opens the session (connect, EHLO, STARTTLS, EHLO again). When the server offers
PIPELINING (RFC 2920), the transaction is ours: MAIL, RCPT and DATA go in one write, their
replies are read in order, and the content follows the 354: two round trips, not four.
When the content goes, a caller waiting for a connection to the same destination is handed
this one, and its MAIL, RCPT and DATA go out in the same write as the content (RFC 2920
section 3.1: content may open a group). A busy connection then takes one round trip per
message, and its replies are read in the order their commands went. aiosmtplib cannot do
that (its protocol keeps one reply waiter and drops bytes that arrive while no command
waits), so `_PipelinedSession` takes the TLS transport over from it.
"""

from __future__ import annotations

import asyncio
import enum
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import normalize_message_line_endings

from eobblast.errors import DeliveryError, ReasonCode
from eobblast.observe import metrics

_ENHANCED = re.compile(rb"\b([245]\.\d{1,3}\.\d{1,3})\b")
_MIN_TLS = ssl.TLSVersion.TLSv1_2
# A dot-atom mailbox at a host name: email.utils.parseaddr (what aiosmtplib's quoting runs,
# ~8 us) returns such an address unchanged, so it goes on the command line as it is.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# Bounds the memory one reply may take, as aiosmtplib does (4 x its 8 KB line limit).
_MAX_REPLY = 32 * 1024
# Reply text kept for classification: the wording that matters comes first.
_MAX_KEPT_TEXT = 512
_QUIT_TIMEOUT = 2.0
_REPLIES_2XX = metrics.SMTP_REPLIES.labels("2xx")
# RFC 3461 section 4.3: a DSN is to carry only the headers of the returned message.
_RET_HEADERS = "RET=HDRS"
_RET_HEADERS_PARAM = b" " + _RET_HEADERS.encode()
# A pipelined group's commands, and the replies that let the transaction go on.
_GROUP_STAGES = ("mail", "rcpt", "data")
_GROUP_ACCEPTS = ((250,), (250, 251), (354,))


class GreetingRefused(DeliveryError):
    """The server refused the session in its greeting (554 ... blocked, 421 busy): nothing
    was sent. `code`, `enhanced` and `reply_text` say why, for shaping to read (a block of
    this IP, or a request to slow down). `reply_text` can quote an address: match it,
    never log or store it."""

    def __init__(self, code: int, enhanced: str | None, reply_text: str) -> None:
        super().__init__(ReasonCode.CONNECT_FAILED, f"greeting refused ({code})", permanent=False)
        self.code = code
        self.enhanced = enhanced
        self.reply_text = reply_text


class ConnectionNotAvailable(Exception):
    """This connection cannot take the message; acquire another and try again.

    When the server said why (a 421 before the message was sent), `code`, `enhanced` and
    `reply_text` carry it, and `messages` how many messages the connection had carried:
    shaping reads them to slow down. `reply_text` can quote an address: match it, never
    log or store it.
    """

    def __init__(
        self,
        code: int | None = None,
        enhanced: str | None = None,
        reply_text: str = "",
        *,
        messages: int = 0,
    ) -> None:
        super().__init__(code)
        self.code = code
        self.enhanced = enhanced
        self.reply_text = reply_text
        self.messages = messages


class SmtpReplyError(DeliveryError):
    """The server refused the message with a reply (`smtp_code` is set).

    `reply_text` is kept for classification only (shaping's slow-down and block wording):
    it can quote the recipient's address, so it is in no message, log or metric.
    """

    def __init__(
        self,
        reason: ReasonCode,
        detail: str,
        *,
        smtp_code: int,
        permanent: bool,
        enhanced: str | None,
        reply_text: str,
    ) -> None:
        super().__init__(reason, detail, smtp_code=smtp_code, permanent=permanent)
        self.enhanced = enhanced
        self.reply_text = reply_text


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Limits a caller (shaping) puts on one destination, instead of the pool's defaults.

    Destinations with the same `group` share `max_connections`: shaping limits connections
    per (provider, source IP), whichever MX host or TLS mode they go to. Every open
    connection of the group counts, idle or in use. `max_messages` is shaping's current
    figure (it learns receivers' per-connection limits, and raises it again as they recover):
    the latest one given holds for the whole group.
    """

    group: Hashable
    max_connections: int
    max_messages: int


@dataclass(frozen=True, slots=True)
class PoolKey:
    """What makes two connections interchangeable."""

    source_address: str | None
    host: str
    port: int
    tls_name: str
    # True: STARTTLS with a verified certificate or nothing (anything carrying PHI).
    # False: opportunistic, for messages that carry no PHI (secure-portal notices): verified
    # TLS when the receiver allows it, else unverified TLS, else plaintext.
    verified_tls: bool = True
    # The EHLO name to greet with (a pool IP's own, matching its PTR record); None: the
    # pool's default name.
    ehlo_name: str | None = None


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """A server's final reply to a message: the code and the enhanced status, never the text."""

    code: int
    enhanced: str | None
    tls_version: str | None
    cipher: str | None
    tls_verified: bool = True


class ConnectionState(enum.Enum):
    """Lifecycle of one pooled connection."""

    IDLE = "idle"
    ACTIVE = "active"
    CLOSED = "closed"


def make_unverified_tls_context() -> ssl.SSLContext:
    """Encryption without authentication: only for messages that carry no PHI."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def make_tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """A client context that verifies chain and host name and refuses anything below TLS 1.2."""
    context = ssl.create_default_context(cafile=ca_bundle)
    context.minimum_version = _MIN_TLS
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _enhanced_status(message: str | bytes) -> str | None:
    if isinstance(message, str):
        message = message.encode("utf-8", "replace")
    found = _ENHANCED.search(message)
    return found.group(1).decode() if found else None


def _text(message: str | bytes) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return message[:_MAX_KEPT_TEXT]


def _reply_error(code: int, message: str | bytes, *, stage: str) -> SmtpReplyError:
    # The reply text may quote the recipient's address: the detail (what reaches logs and
    # status events) keeps only codes; the text stays on the exception for classification.
    enhanced = _enhanced_status(message)
    detail = f"{code} {enhanced}" if enhanced else str(code)
    if code < 500:
        reason = ReasonCode.TEMPORARY_FAILURE
    elif stage == "rcpt":
        reason = ReasonCode.RECIPIENT_REJECTED
    else:
        reason = ReasonCode.MESSAGE_REJECTED
    return SmtpReplyError(
        reason,
        detail,
        smtp_code=code,
        permanent=code >= 500,
        enhanced=enhanced,
        reply_text=_text(message),
    )


def _not_available(code: int, message: str | bytes, messages: int) -> ConnectionNotAvailable:
    return ConnectionNotAvailable(
        code, _enhanced_status(message), _text(message), messages=messages
    )


def _command_address(address: str) -> bytes:
    """`<address>` for MAIL FROM or RCPT TO, as aiosmtplib's MAIL and RCPT would send it."""
    if _PLAIN_ADDRESS.fullmatch(address):
        return b"<" + address.encode("ascii") + b">"
    try:
        quoted = quote_address(address).encode("ascii")
    except ValueError:
        quoted = b"\x00"
    # aiosmtplib refuses control characters when it writes a command; we write our own.
    if _CONTROL.search(quoted):
        # Not aiosmtplib's message: that one quotes the address, which must stay out of logs.
        raise ValueError("address cannot go on an SMTP command line")
    return quoted


def _data_content(data: bytes) -> bytes:
    """The message as sent after the 354: CRLF lines, dot-stuffed, ended by CRLF.CRLF."""
    # Our messages are CRLF already: counting is much cheaper than aiosmtplib's regex
    # rewrite of every line ending. Anything else gets that rewrite, so the bytes on the
    # wire never differ from what aiosmtplib would send (a lone LF before a dot must not
    # look like the end of data to a lenient server).
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = normalize_message_line_endings(data)
    elif not data.endswith(b"\r\n"):
        data += b"\r\n"
    # RFC 5321 section 4.5.2: a line that starts with "." gets another one.
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


class _ServerGone(Exception):
    """The session is over: the server hung up, or sent something that is not SMTP."""


@dataclass(frozen=True, slots=True)
class _Reply:
    code: int
    # Only ever searched for the enhanced status code: it can quote the address.
    text: bytes


class _PipelinedSession(asyncio.Protocol):
    """A TLS session after EHLO, read as a queue of replies of which none is dropped.

    Created on aiosmtplib's transport once EHLO is answered, it becomes the transport's
    protocol: from then on aiosmtplib's `SMTP` object is only used to close the connection.
    """

    def __init__(self, transport: asyncio.Transport, timeout: float) -> None:
        self._transport = transport
        self._timeout = timeout
        self._partial = b""  # a line still without its LF
        self._lines: list[bytes] = []  # the reply being received, when it has several lines
        self._size = 0
        self._replies: deque[_Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._gone = False
        # Bytes held back a moment, so that the next transaction's commands go with them.
        self._held: list[bytes] | None = None
        # Held bytes never went: the session ended first.
        self.held_dropped = False
        transport.set_protocol(self)

    @property
    def is_open(self) -> bool:
        """Whether the server is still there, as far as we have heard."""
        return not self._gone and not self._transport.is_closing()

    @property
    def has_unread(self) -> bool:
        """Whether the server sent anything nobody asked for (usually a 421 before closing)."""
        return bool(self._replies or self._lines or self._partial)

    def data_received(self, data: bytes) -> None:
        """Split what arrived into complete replies."""
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._size += len(line) + 1
            if not line[:3].isdigit() or self._size > _MAX_REPLY:
                self._abandon()
                return
            self._lines.append(line[4:].strip(b" \t\r"))
            if line[3:4] != b"-":
                self._replies.append(_Reply(int(line[:3]), b"\n".join(self._lines)))
                self._lines = []
                self._size = 0
        if len(self._partial) > _MAX_REPLY:
            self._abandon()
        elif self._replies:
            self._wake()

    def eof_received(self) -> bool:
        """The server hung up: replies already received stay readable."""
        self._gone = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone."""
        self._gone = True
        self._wake()

    def write(self, data: bytes, *, hold: bool = False) -> None:
        """Send bytes; raises _ServerGone when the connection is closed.

        With `hold`, they go out two turns of the event loop later (a caller handed this
        connection is woken on the next turn and writes at once), together with whatever
        is written meanwhile: one TLS record and one system call, not two. Writes always
        leave in the order they were made.
        """
        if not self.is_open:
            raise _ServerGone
        if self._held is not None:
            self._held.append(data)
        elif hold:
            self._held = [data]
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        if not self.is_open:
            self._drop_held()
            return
        held, self._held = self._held, None
        if held:
            self._transport.write(b"".join(held))

    def _drop_held(self) -> None:
        if self._held:
            self.held_dropped = True
        self._held = None

    def close(self, *, send_held: bool = True) -> None:
        """Close the transport, once what is held has gone (or dropping it); replies
        already received stay readable."""
        if send_held:
            self._flush()
        else:
            self._drop_held()
        self._gone = True
        self._transport.close()

    async def reply(self) -> _Reply:
        """The next reply; raises _ServerGone, or TimeoutError after the command timeout."""
        while not self._replies:
            if self._gone:
                raise _ServerGone
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._timeout):
                    await waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _abandon(self) -> None:
        # Not SMTP, or unbounded: nothing later on this stream can be trusted.
        self._gone = True
        self._partial = b""
        self._drop_held()
        self._transport.abort()
        self._wake()


@dataclass(slots=True, eq=False)
class SmtpConnection:
    """One SMTP session: verified STARTTLS, or for portal notices what the receiver allows."""

    key: PoolKey
    smtp: aiosmtplib.SMTP
    tls_version: str | None
    cipher: str | None
    tls_verified: bool = True
    # Set when the server offers PIPELINING: the session then belongs to it, not to `smtp`.
    session: _PipelinedSession | None = None
    # The server offers DSN (RFC 3461): MAIL FROM asks for RET=HDRS, so a bounce returns the
    # notice's headers, not its body (which can hold PHI), to the bounce listener.
    dsn: bool = False
    messages: int = 0
    state: ConnectionState = ConnectionState.IDLE
    idle_since: float = field(default_factory=time.monotonic)
    # Callers between the pool's acquire and release: two while one handed this connection
    # waits for the replies to the message before its own.
    users: int = 0
    # Set by the pool: offers this connection to a caller waiting for its destination, as a
    # message's content goes; true when one was handed it.
    offer_next: Callable[[SmtpConnection], bool] | None = None
    # Done once the last transaction begun on the session is over: true when it read the
    # reply to its content (every reply of its own), false when it ended otherwise.
    _reading: asyncio.Future[bool] | None = None

    def is_usable(self, now: float, *, max_messages: int, idle_expiry: float) -> bool:
        """Whether the connection may carry another message."""
        if self.session is not None:
            # Anything unread on an idle session is a server that is leaving (421).
            connected = self.session.is_open and not self.session.has_unread
        else:
            connected = self.smtp.is_connected
        return (
            self.state is not ConnectionState.CLOSED
            and connected
            and self.messages < max_messages
            and now - self.idle_since < idle_expiry
        )

    def close(self, *, send_held: bool = True) -> None:
        """Drop the connection at once, without a QUIT (`send_held=False`: what the
        session holds back does not go either)."""
        self.state = ConnectionState.CLOSED
        if self.session is not None:
            self.session.close(send_held=send_held)
        self.smtp.close()

    async def send(self, mail_from: str, rcpt_to: str, data: bytes) -> SmtpReply:
        """Run one mail transaction; raises DeliveryError or ConnectionNotAvailable."""
        if self.session is None:
            return await self._send_stepwise(mail_from, rcpt_to, data)
        # Built before the first write: a refused address must not leave half a group sent.
        group = (
            b"MAIL FROM:"
            + _command_address(mail_from)
            + (_RET_HEADERS_PARAM if self.dsn else b"")
            + b"\r\nRCPT TO:"
            + _command_address(rcpt_to)
            + b"\r\nDATA\r\n"
        )
        content = _data_content(data)
        before = self._reading
        mine = self._reading = asyncio.get_running_loop().create_future()
        try:
            return await self._send_pipelined(self.session, group, content, before, mine)
        except asyncio.CancelledError:
            # Replies still due would be read as the next transaction's: end the session.
            if before is not None and not before.done():
                # Handed over, and the message before ours still waits for its reply: the
                # session ends once it has read it. Nobody may take the connection
                # meanwhile (no handover, no RSET, no QUIT after our DATA).
                self.state = ConnectionState.CLOSED
                before.add_done_callback(lambda _: self.close())
            else:
                # Our content, if still held back, does not go: not sent is not sent.
                self.close(send_held=False)
            raise
        finally:
            if not mine.done():
                mine.set_result(False)

    async def _send_pipelined(
        self,
        session: _PipelinedSession,
        group: bytes,
        content: bytes,
        before: asyncio.Future[bool] | None,
        mine: asyncio.Future[bool],
    ) -> SmtpReply:
        replies: list[_Reply] = []
        try:
            session.write(group)
            if before is not None and not before.done():
                # Handed over as the message before ours went: its final reply comes
                # first. (Its reader closes the session on a timeout: no wait for ever.)
                metrics.SMTP_HANDOVERS.inc()
                if not await asyncio.shield(before):
                    # It ended without its final reply (cancelled, timed out, cut off):
                    # that reply may be the next one unread. Nothing of ours went beyond
                    # the commands. (After a clean end our replies are read even if the
                    # server has hung up since: a 421 of its own still says why.)
                    raise _ServerGone
            for _ in _GROUP_STAGES:
                reply = await session.reply()
                if reply.code == 421:
                    # The server is closing; nothing was sent after DATA, so retrying the
                    # message on another connection cannot duplicate it.
                    self.close()
                    raise _not_available(reply.code, reply.text, self.messages)
                replies.append(reply)
        except _ServerGone:
            self.close()
            raise ConnectionNotAvailable from None
        except TimeoutError:
            self.close()
            stage = _GROUP_STAGES[len(replies)]
            raise DeliveryError(
                ReasonCode.TIMEOUT, f"timeout at {stage}", permanent=False
            ) from None
        for reply, stage, accepted in zip(replies, _GROUP_STAGES, _GROUP_ACCEPTS, strict=True):
            if reply.code not in accepted:
                self.messages += 1
                if replies[-1].code == 354:
                    # RFC 2920 section 3.1: a server that takes DATA after refusing the
                    # envelope gets an empty message, with no recipient to deliver it to.
                    await self._end_refused_data(session)
                await self._reset(session)
                metrics.SMTP_REPLIES.labels(f"{reply.code // 100}xx").inc()
                raise _reply_error(reply.code, reply.text, stage=stage)
        # The next caller of this destination may send its commands with our content.
        handed = self.offer_next is not None and self.offer_next(self)
        try:
            session.write(content, hold=handed)
        except _ServerGone:
            # Closed before any of the content went (by the transaction before ours, say,
            # after its 421): another connection may carry it.
            self.close()
            raise ConnectionNotAvailable from None
        try:
            final = await session.reply()
            mine.set_result(True)  # the next caller's replies come next
        except _ServerGone:
            self.close()
            if session.held_dropped:
                # The session ended while our content was held back: none of it went.
                raise ConnectionNotAvailable from None
            # The message may have been accepted before the line dropped.
            raise DeliveryError(
                ReasonCode.CONNECTION_LOST, "lost during DATA", permanent=False, sent=True
            ) from None
        except TimeoutError:
            self.close()
            raise DeliveryError(
                ReasonCode.TIMEOUT, "timeout at data", permanent=False, sent=True
            ) from None
        self.messages += 1
        if final.code != 250:
            if final.code == 421 or not session.is_open:
                self.close()
            elif not handed:
                # Not needed after the reply to the content (the transaction is over), but
                # harmless; never with the next caller's commands already sent.
                await self._reset(session)
            metrics.SMTP_REPLIES.labels(f"{final.code // 100}xx").inc()
            raise _reply_error(final.code, final.text, stage="data")
        _REPLIES_2XX.inc()
        return SmtpReply(
            final.code,
            _enhanced_status(final.text),
            self.tls_version,
            self.cipher,
            self.tls_verified,
        )

    async def _end_refused_data(self, session: _PipelinedSession) -> None:
        try:
            session.write(b".\r\n")
            await session.reply()
        except (_ServerGone, TimeoutError):
            self.close()

    async def _reset(self, session: _PipelinedSession) -> None:
        """RSET after a refused transaction; a connection that cannot reset is closed."""
        if self.state is ConnectionState.CLOSED:
            return
        try:
            session.write(b"RSET\r\n")
            reply = await session.reply()
        except (_ServerGone, TimeoutError):
            self.close()
            return
        if reply.code != 250:
            self.close()

    async def _send_stepwise(self, mail_from: str, rcpt_to: str, data: bytes) -> SmtpReply:
        # Without PIPELINING: one command, one round trip, through aiosmtplib.
        stage = "mail"
        try:
            await self.smtp.mail(mail_from, options=[_RET_HEADERS] if self.dsn else None)
            stage = "rcpt"
            await self.smtp.rcpt(rcpt_to)
            stage = "data"
            response = await self.smtp.data(data)
        except aiosmtplib.SMTPServerDisconnected:
            self.state = ConnectionState.CLOSED
            if stage == "data":
                # The message may have been accepted before the line dropped.
                raise DeliveryError(
                    ReasonCode.CONNECTION_LOST, "lost during DATA", permanent=False, sent=True
                ) from None
            raise ConnectionNotAvailable from None
        except aiosmtplib.SMTPTimeoutError:
            self.close()
            raise DeliveryError(
                ReasonCode.TIMEOUT,
                f"timeout at {stage}",
                permanent=False,
                sent=stage == "data",
            ) from None
        except aiosmtplib.SMTPResponseException as exc:
            self.messages += 1
            if exc.code == 421 or not self.smtp.is_connected:
                self.close()
                if stage != "data":
                    raise _not_available(exc.code, exc.message, self.messages - 1) from None
            else:
                with suppress(aiosmtplib.SMTPException):
                    await self.smtp.rset()
            metrics.SMTP_REPLIES.labels(f"{exc.code // 100}xx").inc()
            raise _reply_error(exc.code, exc.message, stage=stage) from None
        self.messages += 1
        _REPLIES_2XX.inc()
        return SmtpReply(
            response.code,
            _enhanced_status(response.message),
            self.tls_version,
            self.cipher,
            self.tls_verified,
        )

    async def aclose(self) -> None:
        """Say QUIT and close, ignoring a server that is already gone. The socket is closed
        however this ends, a cancellation included: the pool counts it closed. A session
        already marked closed (a transaction's replies still due) gets no QUIT."""
        polite = self.state is not ConnectionState.CLOSED
        self.state = ConnectionState.CLOSED
        session = self.session
        try:
            if session is not None:
                if session.is_open and polite:
                    with suppress(_ServerGone, TimeoutError):
                        session.write(b"QUIT\r\n")
                        async with asyncio.timeout(_QUIT_TIMEOUT):
                            await session.reply()
            elif self.smtp.is_connected:
                with suppress(aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                    await self.smtp.quit(timeout=_QUIT_TIMEOUT)
        finally:
            self.close()


class _Limits:
    """Connection slots and messages per connection, shared by a group of destinations.

    Every open connection of the group holds a slot, idle or in use: a receiver counts the
    connections it sees, not the ones busy at the moment. A caller that needs a new
    connection while the group is full closes the group's oldest idle one elsewhere, or
    waits for a connection to be returned or closed.
    """

    __slots__ = ("max_connections", "max_messages", "members", "open", "waiters")

    def __init__(self, max_connections: int, max_messages: int) -> None:
        self.max_connections = max_connections
        self.max_messages = max_messages
        self.open = 0  # connections open or being opened
        self.members: set[_Destination] = set()
        # In arrival order, with the destination each waits for. A waiter's result is a
        # connection handed to it (`hand_over`), or None: look again.
        self.waiters: deque[tuple[asyncio.Future[SmtpConnection | None], _Destination]] = deque()

    async def changed(
        self, dest: _Destination, give_back: Callable[[SmtpConnection], None]
    ) -> SmtpConnection | None:
        """Wait until a connection of the group is returned or closed (woken in turn); the
        connection handed over to this caller, if one was (`give_back` returns it when the
        caller is cancelled before it could take it)."""
        waiter: asyncio.Future[SmtpConnection | None] = asyncio.get_running_loop().create_future()
        entry = (waiter, dest)
        self.waiters.append(entry)
        try:
            return await waiter  # whoever wakes it takes it out of the queue
        except asyncio.CancelledError:
            if waiter.cancelled():
                with suppress(ValueError):
                    self.waiters.remove(entry)
            elif (handed := waiter.result()) is not None:
                give_back(handed)
            else:
                # Woken, then cancelled before it could look: the next one looks instead
                # (one of the same destination first, as a returned connection wakes).
                self.wake_one(dest)
            raise

    def hand_over(self, dest: _Destination, conn: SmtpConnection) -> bool:
        """Give `conn` to the first caller waiting for `dest`, if there is one."""
        waiter = self._take_waiter(dest, or_any=False)
        if waiter is None:
            return False
        waiter.set_result(conn)
        return True

    def follow(self, limits: ConnectionLimits) -> None:
        """Take the caller's current limits (shaping may raise them again)."""
        if limits.max_connections > self.max_connections:
            self.wake()  # room for those waiting
        self.max_connections = limits.max_connections
        self.max_messages = limits.max_messages

    def wake(self) -> None:
        """Every waiter looks again (limits raised, pool closing)."""
        waiters, self.waiters = self.waiters, deque()
        for waiter, _ in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def wake_one(self, dest: _Destination | None = None) -> None:
        """One waiter looks again: the first waiting for `dest`, else the first of all.

        One connection returned or one slot freed serves one caller: waking every waiter
        would have all but one look, find nothing and queue again (with dozens of events in
        flight, most of the pool's work).
        """
        waiter = self._take_waiter(dest, or_any=True)
        if waiter is not None:
            waiter.set_result(None)

    def _take_waiter(
        self, dest: _Destination | None, *, or_any: bool
    ) -> asyncio.Future[SmtpConnection | None] | None:
        """Take the first live waiter for `dest` (None: for any) out of the queue; failing
        that, with `or_any`, the first live one of all."""
        chosen = None
        for entry in self.waiters:
            waiter, wanted = entry
            if waiter.done():
                continue
            if wanted is dest or dest is None:
                chosen = entry
                break
            if or_any and chosen is None:
                chosen = entry
        if chosen is None:
            return None
        self.waiters.remove(chosen)
        return chosen[0]

    def oldest_idle(self) -> SmtpConnection | None:
        """Take the group's longest-idle connection out of its destination, if any."""
        oldest: _Destination | None = None
        for dest in self.members:
            if dest.idle and (
                oldest is None or dest.idle[0].idle_since < oldest.idle[0].idle_since
            ):
                oldest = dest
        return None if oldest is None else oldest.idle.popleft()


class _Destination:
    __slots__ = ("idle", "limits", "users")

    def __init__(self, limits: _Limits) -> None:
        # Returned connections in order: the oldest left, the most recently used right.
        self.idle: deque[SmtpConnection] = deque()
        self.limits = limits
        # Callers between acquire and release (waiting for a slot included): a destination
        # is forgotten only when it has none and no idle connection.
        self.users = 0


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
        self._unverified_tls = make_unverified_tls_context()
        self._ehlo = ehlo_name
        self._limit = max_connections_per_destination
        self._max_messages = max_messages_per_connection
        self._idle_expiry = idle_expiry
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._clock = clock
        self._destinations: dict[PoolKey, _Destination] = {}
        self._groups: dict[Hashable, _Limits] = {}
        self._last_sweep = clock()
        self._closed = False
        # Every open connection, with the group whose slot it holds.
        self._live: dict[SmtpConnection, _Limits] = {}

    def _destination(self, key: PoolKey, limits: ConnectionLimits | None = None) -> _Destination:
        dest = self._destinations.get(key)
        if dest is None:
            if limits is None:
                shared = _Limits(self._limit, self._max_messages)
            else:
                shared = self._group(limits)
            dest = self._destinations[key] = _Destination(shared)
            shared.members.add(dest)
        elif limits is not None:
            self.restrict(limits)
        return dest

    def _group(self, limits: ConnectionLimits) -> _Limits:
        group = self._groups.get(limits.group)
        if group is None:
            group = self._groups[limits.group] = _Limits(
                limits.max_connections, limits.max_messages
            )
        else:
            group.follow(limits)
        return group

    def restrict(self, limits: ConnectionLimits) -> None:
        """Apply a group's limits at once, for every connection in it.

        Shaping calls this when a receiver hung up after N messages on one connection:
        messages already waiting for a connection must not carry the old figure past N.
        Later limits (each acquire passes shaping's current ones) may raise it again.
        """
        self._group(limits)

    @property
    def groups(self) -> int:
        """Connection groups with destinations or open connections."""
        return len(self._groups)

    @property
    def destinations(self) -> int:
        """Destinations with connections open or callers using them."""
        return len(self._destinations)

    @property
    def open_connections(self) -> int:
        """Connections currently open (idle or active) across all destinations."""
        return len(self._live)

    async def _discard(self, conn: SmtpConnection) -> None:
        """Close a connection politely; its slot is free once it is closed."""
        try:
            await conn.aclose()
        finally:
            self._forget(conn)

    def _forget(self, conn: SmtpConnection) -> None:
        group = self._live.pop(conn, None)
        if group is not None:
            group.open -= 1
            group.wake_one()

    async def acquire(self, key: PoolKey, limits: ConnectionLimits | None = None) -> SmtpConnection:
        """An idle connection for `key`, or a new one; waits while the destination is full.

        `limits` (from shaping) replace the pool's per-destination defaults for this key.
        """
        if self._closed:
            raise RuntimeError("pool is closed")
        dest = self._destination(key, limits)
        dest.users += 1
        try:
            conn = await self._take(key, dest)
        except BaseException:
            dest.users -= 1
            raise
        return conn

    async def _take(self, key: PoolKey, dest: _Destination) -> SmtpConnection:
        """An idle connection of `dest`, or a new one once the group has a slot for it."""
        group = dest.limits
        while True:
            if self._closed:
                raise RuntimeError("pool is closed")
            now = self._clock()
            self._sweep(now)
            while dest.idle:
                conn = dest.idle.pop()  # most recently used first: its socket is warm
                metrics.CONNECTIONS_IDLE.dec()
                if conn.is_usable(
                    now, max_messages=group.max_messages, idle_expiry=self._idle_expiry
                ):
                    return self._first_user(conn)
                await self._discard(conn)
            if group.open < group.max_connections:
                group.open += 1
                try:
                    conn = await self._open(key)
                except BaseException:
                    group.open -= 1
                    group.wake_one()
                    raise
                self._live[conn] = group
                conn.offer_next = self._offer_next
                return self._first_user(conn)
            spare = group.oldest_idle()
            if spare is not None:
                # Idle at another host or TLS mode of the group: its slot is needed here.
                metrics.CONNECTIONS_IDLE.dec()
                await self._discard(spare)
                continue
            metrics.SMTP_POOL_WAITS.inc()
            handed = await group.changed(dest, self._give_back)
            if handed is not None:
                return handed  # still active for the caller before (`_offer_next`)

    @staticmethod
    def _first_user(conn: SmtpConnection) -> SmtpConnection:
        conn.users = 1
        conn.state = ConnectionState.ACTIVE
        metrics.CONNECTIONS_ACTIVE.inc()
        return conn

    def _offer_next(self, conn: SmtpConnection) -> bool:
        """Hand `conn`, whose caller is about to send its content, to the next caller
        waiting for its destination: that caller's commands go with the content. Only a
        connection with room for both messages, and only one caller at a time."""
        dest = self._destinations.get(conn.key)
        session = conn.session
        if (
            dest is None
            or self._closed
            or conn.users != 1
            or dest.users < 2  # nobody but its own caller: nobody waits for it
            or conn.state is ConnectionState.CLOSED
            or session is None
            or not session.is_open
            or session.has_unread
            or conn.messages + 2 > dest.limits.max_messages
        ):
            return False
        if not dest.limits.hand_over(dest, conn):
            return False
        conn.users = 2
        return True

    def _give_back(self, conn: SmtpConnection) -> None:
        """A caller handed `conn` was cancelled before it could take it (nothing sent)."""
        conn.users -= 1
        if conn.users > 0:
            return
        # Its first caller has released it meanwhile: back to idle, or closed (no QUIT:
        # this runs in a cancellation), as a release would.
        if not self._kept_idle(conn, self._destination(conn.key)):
            conn.close()
            self._forget(conn)

    async def release(self, conn: SmtpConnection) -> None:
        """Return a connection: kept idle if it can carry more, closed otherwise (once the
        caller it was handed to has returned it too)."""
        dest = self._destination(conn.key)
        conn.users -= 1
        try:
            if conn.users == 0 and not self._kept_idle(conn, dest):
                await self._discard(conn)
        finally:
            dest.users -= 1

    def _kept_idle(self, conn: SmtpConnection, dest: _Destination) -> bool:
        """A connection nobody uses any more, kept idle if it can carry more (False: the
        caller closes it)."""
        metrics.CONNECTIONS_ACTIVE.dec()
        now = self._clock()
        if self._closed or not conn.is_usable(
            now, max_messages=dest.limits.max_messages, idle_expiry=float("inf")
        ):
            return False
        conn.state = ConnectionState.IDLE
        conn.idle_since = now
        dest.idle.append(conn)
        metrics.CONNECTIONS_IDLE.inc()
        # For a caller of this destination, or else one that needs its slot.
        dest.limits.wake_one(dest)
        return True

    @asynccontextmanager
    async def connection(
        self, key: PoolKey, limits: ConnectionLimits | None = None
    ) -> AsyncIterator[SmtpConnection]:
        """Acquire a connection for the duration of a block."""
        conn = await self.acquire(key, limits)
        try:
            yield conn
        finally:
            await self.release(conn)

    def _sweep(self, now: float) -> None:
        # At most once a second: drop idle connections that expired or that the server closed.
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for key, dest in list(self._destinations.items()):
            if not dest.idle and not dest.users:
                # Nothing open, nobody waiting: a worker meets many MX hosts over a run.
                del self._destinations[key]
                dest.limits.members.discard(dest)
                continue
            keep: deque[SmtpConnection] = deque()
            for conn in dest.idle:
                if conn.is_usable(
                    now, max_messages=dest.limits.max_messages, idle_expiry=self._idle_expiry
                ):
                    keep.append(conn)
                else:
                    conn.close()
                    self._forget(conn)
                    metrics.CONNECTIONS_IDLE.dec()
            dest.idle = keep
        # Shaping's groups, one per (site, IP) ever met: kept while they have a destination
        # or an open connection. The limits come back with the next acquire.
        for name, group in list(self._groups.items()):
            if not group.members and not group.open:
                del self._groups[name]

    async def _connect(self, key: PoolKey) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(
            hostname=key.host,
            port=key.port,
            source_address=(key.source_address, 0) if key.source_address else None,
            local_hostname=key.ehlo_name or self._ehlo,
            timeout=self._command_timeout,
            start_tls=False,  # done by hand below: opportunistic TLS would fall back silently
            use_tls=False,
        )
        try:
            await smtp.connect(timeout=self._connect_timeout)
        except aiosmtplib.SMTPConnectTimeoutError:
            metrics.SMTP_CONNECTS.labels("timeout").inc()
            raise DeliveryError(ReasonCode.TIMEOUT, "connect timeout", permanent=False) from None
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            metrics.SMTP_CONNECTS.labels("greeting_refused").inc()
            raise GreetingRefused(
                exc.code, _enhanced_status(exc.message), _text(exc.message)
            ) from None
        except (aiosmtplib.SMTPException, OSError):
            metrics.SMTP_CONNECTS.labels("failed").inc()
            raise DeliveryError(
                ReasonCode.CONNECT_FAILED, "connect failed", permanent=False
            ) from None
        return smtp

    async def _open(self, key: PoolKey) -> SmtpConnection:
        if not key.verified_tls:
            return await self._open_opportunistic(key)
        smtp = await self._connect(key)
        return await self._secure(key, smtp, self._tls, verified=True)

    async def _greeted(self, key: PoolKey) -> aiosmtplib.SMTP:
        """A new connection that has said EHLO."""
        smtp = await self._connect(key)
        try:
            await smtp.ehlo()
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            smtp.close()
            raise DeliveryError(ReasonCode.CONNECT_FAILED, "EHLO failed", permanent=False) from None
        except BaseException:  # cancelled: the slot is given back, so is the socket
            smtp.close()
            raise
        return smtp

    async def _open_opportunistic(self, key: PoolKey) -> SmtpConnection:
        # Verified TLS first, so a notice still teaches us whether the domain verifies;
        # then unverified TLS; then plaintext. Only messages without PHI come here.
        smtp = await self._greeted(key)
        if not smtp.supports_extension("starttls"):
            return self._plaintext(key, smtp, "plaintext")
        try:
            return await self._secure(key, smtp, self._tls, verified=True, greeted=True)
        except DeliveryError as exc:
            if exc.reason is ReasonCode.TLS_HANDSHAKE_FAILED:
                # STARTTLS offered, but no TLS we both speak (an old protocol, a broken
                # stack): the notice goes as it would to a receiver without STARTTLS, as
                # opportunistic TLS does, rather than waiting days for a paper fallback.
                smtp = await self._greeted(key)
                return self._plaintext(key, smtp, "plaintext_after_tls_failure")
            if exc.reason is not ReasonCode.TLS_CERT_UNTRUSTED:
                raise
        smtp = await self._connect(key)
        return await self._secure(key, smtp, self._unverified_tls, verified=False)

    def _plaintext(self, key: PoolKey, smtp: aiosmtplib.SMTP, label: str) -> SmtpConnection:
        metrics.SMTP_CONNECTS.labels(label).inc()
        return SmtpConnection(
            key,
            smtp,
            None,
            None,
            tls_verified=False,
            dsn=smtp.supports_extension("dsn"),
            idle_since=self._clock(),
        )

    async def _secure(
        self,
        key: PoolKey,
        smtp: aiosmtplib.SMTP,
        context: ssl.SSLContext,
        *,
        verified: bool,
        greeted: bool = False,
    ) -> SmtpConnection:
        try:
            if not greeted:
                await smtp.ehlo()
            if not smtp.supports_extension("starttls"):
                metrics.SMTP_CONNECTS.labels("no_starttls").inc()
                raise DeliveryError(
                    ReasonCode.STARTTLS_NOT_OFFERED, "no STARTTLS offered", permanent=True
                )
            await smtp.starttls(server_hostname=key.tls_name, tls_context=context)
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
        except BaseException:  # cancelled: the slot is given back, so is the socket
            smtp.close()
            raise
        ssl_object = smtp.get_transport_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            smtp.close()
            raise DeliveryError(ReasonCode.TLS_HANDSHAKE_FAILED, "no TLS session", permanent=True)
        try:
            # RFC 3207 section 4.2: extensions are learnt again over TLS. aiosmtplib would
            # say EHLO before the first MAIL anyway; here the answer decides how we send.
            await smtp.ehlo()
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            smtp.close()
            metrics.SMTP_CONNECTS.labels("failed").inc()
            raise DeliveryError(
                ReasonCode.CONNECT_FAILED, "EHLO after STARTTLS failed", permanent=False
            ) from None
        except BaseException:
            smtp.close()
            raise
        session = None
        if smtp.supports_extension("pipelining") and smtp.transport is not None:
            # uvloop's transports do not subclass asyncio.Transport: a cast, not a check.
            transport = cast(asyncio.Transport, smtp.transport)
            session = _PipelinedSession(transport, self._command_timeout)
        cipher = ssl_object.cipher()
        metrics.SMTP_CONNECTS.labels("ok" if verified else "tls_unverified").inc()
        return SmtpConnection(
            key,
            smtp,
            ssl_object.version(),
            cipher[0] if cipher else None,
            tls_verified=verified,
            session=session,
            dsn=smtp.supports_extension("dsn"),
            idle_since=self._clock(),
        )

    async def aclose(self) -> None:
        """Close every idle connection politely; active ones close when released, and
        callers waiting for a connection get RuntimeError."""
        self._closed = True
        for group in {dest.limits for dest in self._destinations.values()}:
            group.wake()
        for dest in list(self._destinations.values()):
            while dest.idle:
                conn = dest.idle.pop()
                metrics.CONNECTIONS_IDLE.dec()
                await self._discard(conn)
