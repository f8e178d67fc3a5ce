"""Local MX servers (aiosmtpd) that accept, defer, reject or misbehave like real receivers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import enum
import ipaddress
import itertools
import logging
import os
import secrets
import socket
import ssl
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import format_datetime, make_msgid
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any, AnyStr, Self

import aiosmtplib
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException, syntax

from eobblast.errors import ConfigError
from eobblast.sandbox.ca import TestPki, certificate_dns_names, certificate_verifies

log = logging.getLogger(__name__)

# Records kept in memory by default; older ones are dropped so a long demo stays bounded.
DEFAULT_MAX_RECORDS = 100_000
READY_TIMEOUT = 5.0


class Behaviour(enum.StrEnum):
    """How a sandbox domain (or one recipient of it) answers."""

    ACCEPT = "accept"
    DEFER = "defer"
    REJECT = "reject"
    NO_STARTTLS = "no_starttls"
    UNTRUSTED_CERT = "untrusted_cert"
    EXPIRED_CERT = "expired_cert"
    WRONG_HOST_CERT = "wrong_host_cert"
    # STARTTLS offered, but only TLS 1.0 and 1.1 (an old appliance): no handshake with a
    # client that requires TLS 1.2, as eobblast does.
    OLD_TLS_ONLY = "old_tls_only"
    # Valid STARTTLS, then the connection breaks at the end of DATA: no message is ever accepted.
    DROP_AFTER_STARTTLS = "drop_after_starttls"
    # Accept (250), then a moment later send an RFC 3464 DSN to the return path: a hard
    # bounce (5.1.1 user unknown), or a soft one (4.2.2 mailbox full, given up).
    BOUNCE_LATER = "bounce_later"
    DEFER_LATER = "defer_later"
    # 451 to the first attempt for each recipient, then accept: a soft bounce that a retry
    # on schedule gets through.
    DEFER_FIRST = "defer_first"


# Only these make sense for a single recipient; the TLS ones are properties of the server.
RECIPIENT_BEHAVIOURS = frozenset(
    {
        Behaviour.ACCEPT,
        Behaviour.DEFER,
        Behaviour.REJECT,
        Behaviour.BOUNCE_LATER,
        Behaviour.DEFER_LATER,
        Behaviour.DEFER_FIRST,
    }
)
# Accepted now, reported on later by a DSN.
LATER_BEHAVIOURS = frozenset({Behaviour.BOUNCE_LATER, Behaviour.DEFER_LATER})
DEFAULT_BOUNCE_DELAY = 0.2


@dataclass(frozen=True, slots=True)
class SandboxDomain:
    """One receiving domain: its own loopback address, port and behaviour."""

    name: str
    host: str
    port: int = 0
    behaviour: Behaviour = Behaviour.ACCEPT
    close_after: int | None = None
    recipient_rules: tuple[tuple[str, Behaviour], ...] = ()
    # Real MXs offer PIPELINING (RFC 2920); a domain can turn it off to exercise the
    # one-command-at-a-time path.
    pipelining: bool = True
    # Real MXs offer DSN (RFC 3461) and take its parameters (MAIL: RET, ENVID; RCPT:
    # NOTIFY, ORCPT).
    dsn: bool = True

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() or c in "/:@[]" for c in self.name):
            raise ConfigError(f"name: {self.name!r} is not a domain name")
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError(f"host: {self.host!r} is not an IP address") from None
        if not address.is_loopback:
            raise ConfigError(f"host: {self.host} is not a loopback address")
        if isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port!r} is not 0-65535")
        if not isinstance(self.behaviour, Behaviour):
            raise ConfigError(f"behaviour: {self.behaviour!r} is not a Behaviour")
        if self.close_after is not None and (
            isinstance(self.close_after, bool) or self.close_after < 0
        ):
            raise ConfigError(f"close_after: {self.close_after!r} is not a count >= 0")
        for prefix, behaviour in self.recipient_rules:
            if not prefix:
                raise ConfigError("recipient_rules: a prefix must not be empty")
            if behaviour not in RECIPIENT_BEHAVIOURS:
                raise ConfigError(
                    f"recipient_rules: {prefix!r} -> {behaviour!r}: only accept, defer, "
                    "reject, bounce_later, defer_later or defer_first apply to a recipient"
                )


@dataclass(frozen=True, slots=True)
class Received:
    """What the sandbox recorded about one accepted message (never its body)."""

    domain: str
    queue_id: str
    client_ip: str
    helo: str
    tls_version: str | None
    cipher: str | None
    # True only over TLS with a certificate a client trusting just the test CA accepts for
    # this domain: a message with False was readable by whoever could sit in the middle.
    tls_cert_trusted: bool
    mail_from: str
    rcpt_tos: tuple[str, ...]
    size: int
    path: Path
    received_at: dt.datetime
    # What MAIL FROM asked a DSN to return (RFC 3461 RET: "HDRS" or "FULL"), if anything.
    dsn_ret: str | None = None


def recipient_behaviour(domain: SandboxDomain, address: str) -> Behaviour:
    """How a domain treats one recipient: its first matching rule, else the domain's own."""
    local = address.rpartition("@")[0].casefold() if "@" in address else address.casefold()
    for prefix, behaviour in domain.recipient_rules:
        if local.startswith(prefix.casefold()):
            return behaviour
    return domain.behaviour


def rcpt_reply(domain: SandboxDomain, address: str) -> str | None:
    """The reply a domain gives to RCPT TO:<address>, or None when it accepts the recipient."""
    local = address.rpartition("@")[0].casefold() if "@" in address else address.casefold()
    for prefix, behaviour in domain.recipient_rules:
        if local.startswith(prefix.casefold()):
            if behaviour is Behaviour.REJECT:
                return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
            if behaviour is Behaviour.DEFER:
                return "451 4.2.1 Mailbox busy, try again later"
            return None
    if domain.behaviour is Behaviour.REJECT:
        return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
    if domain.behaviour is Behaviour.DEFER:
        return "451 4.3.0 Temporary failure, try again later"
    return None


def received_header(
    *,
    helo: str,
    client_ip: str,
    by_host: str,
    queue_id: str,
    extended: bool,
    tls: tuple[str, str, int] | None,
    rcpt_tos: Sequence[str],
    when: dt.datetime,
) -> bytes:
    """An RFC 5321 trace header (CRLF-terminated); tls is (version, cipher, bits) or None."""
    protocol = ("ESMTP" if extended else "SMTP") + ("S" if tls else "")
    # RFC 5321 TCP-info: without a reverse lookup (none in a sandbox) the address literal alone.
    literal = f"[IPv6:{client_ip}]" if ":" in client_ip else f"[{client_ip}]"
    parts = [f"Received: from {helo} ({literal})", f"\tby {by_host} (eobblast-sandbox)"]
    with_clause = f"\twith {protocol} id {queue_id}"
    if tls is not None:
        version, cipher, bits = tls
        with_clause += f" (version={version} cipher={cipher} bits={bits})"
    parts.append(with_clause)
    # A "for" clause names the recipient only when there is exactly one (as Postfix does).
    date = format_datetime(when)
    if len(rcpt_tos) == 1:
        parts.append(f"\tfor <{rcpt_tos[0]}>; {date}")
    else:
        parts[-1] += f"; {date}"
    return ("\r\n".join(parts) + "\r\n").encode("utf-8", "surrogateescape")


# What a later DSN reports for each behaviour: (Status, SMTP reply, human explanation).
_LATER_REPORTS = {
    Behaviour.BOUNCE_LATER: (
        "5.1.1",
        "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table",
        "The mail system does not know this recipient.",
    ),
    Behaviour.DEFER_LATER: (
        "4.2.2",
        "452 4.2.2 <{rcpt}>: Mailbox full",
        "The recipient's mailbox stayed full; the mail system gave up retrying.",
    ),
}


def delivery_status_notification(
    *,
    behaviour: Behaviour,
    reporting_mta: str,
    return_path: str,
    recipient: str,
    returned_headers: bytes,
    arrival: dt.datetime,
    queue_id: str,
    envelope_id: str | None = None,
) -> bytes:
    """An RFC 3464 DSN (multipart/report) for one recipient, as a receiving MTA sends it.

    Only the original's headers are returned (text/rfc822-headers), never its body: that is
    enough to find the event (X-EOB-Event-ID, Return-Path) and carries no notice content.
    """
    status, reply, explanation = _LATER_REPORTS[behaviour]
    reply = reply.format(rcpt=recipient)
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = return_path
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    report["Message-ID"] = make_msgid(domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    notice = MIMEText(
        f"This is the mail system at host {reporting_mta}.\n\n"
        "Your message could not be delivered to one or more recipients.\n\n"
        f"<{recipient}>: {explanation}\n    {reply}\n",
        "plain",
        "utf-8" if not recipient.isascii() else "us-ascii",
    )
    notice["Content-Description"] = "Notification"
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    if envelope_id:
        per_message["Original-Envelope-Id"] = envelope_id
    per_message["X-Sandbox-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = format_datetime(arrival)
    per_recipient = Message()
    per_recipient["Final-Recipient"] = f"rfc822; {recipient}"
    per_recipient["Original-Recipient"] = f"rfc822;{recipient}"
    per_recipient["Action"] = "failed"
    per_recipient["Status"] = status
    per_recipient["Remote-MTA"] = f"dns; {reporting_mta}"
    per_recipient["Diagnostic-Code"] = f"smtp; {reply}"
    delivery_status = Message()
    delivery_status["Content-Description"] = "Delivery report"
    delivery_status["Content-Type"] = "message/delivery-status"
    delivery_status.set_payload([per_message, per_recipient])
    headers = Message()
    headers["Content-Description"] = "Undelivered Message Headers"
    headers["Content-Type"] = "text/rfc822-headers"
    headers.set_payload(returned_headers.decode("ascii", "surrogateescape"))
    for part in (notice, delivery_status, headers):
        report.attach(part)
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=compat32.clone(linesep="\r\n")).flatten(report)
    return out.getvalue()


def _header_block(data: bytes) -> bytes:
    """The header section of a message (CRLF or LF line ends), with its line ends kept."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, _ = data.partition(separator)
        if found:
            return head + separator[: len(separator) // 2]
    return data


class _Recorder:
    """Counts and records shared by the servers' threads and the caller's loop."""

    def __init__(self, max_records: int) -> None:
        self._lock = threading.Lock()
        self._records: collections.deque[Received] = collections.deque(maxlen=max_records)
        self._counts: dict[str, int] = {}
        self._empty: dict[str, int] = {}
        self._dsns: dict[str, int] = {}
        self._dsn_failures: dict[str, int] = {}

    def add(self, record: Received) -> None:
        with self._lock:
            self._records.append(record)
            self._counts[record.domain] = self._counts.get(record.domain, 0) + 1

    def records(self) -> list[Received]:
        with self._lock:
            return list(self._records)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def add_empty_session(self, domain: str) -> None:
        with self._lock:
            self._empty[domain] = self._empty.get(domain, 0) + 1

    def empty_sessions(self) -> dict[str, int]:
        with self._lock:
            return dict(self._empty)

    def add_dsn(self, domain: str, *, sent: bool) -> None:
        with self._lock:
            table = self._dsns if sent else self._dsn_failures
            table[domain] = table.get(domain, 0) + 1

    def dsns(self, *, sent: bool) -> dict[str, int]:
        with self._lock:
            return dict(self._dsns if sent else self._dsn_failures)

    def init_domain(self, name: str) -> None:
        with self._lock:
            self._counts.setdefault(name, 0)
            self._empty.setdefault(name, 0)


_DSN_MAIL_PARAMS = ("RET=", "ENVID=")
_DSN_RCPT_PARAMS = ("NOTIFY=", "ORCPT=")


def _mail_param(envelope: Envelope, name: str) -> str | None:
    """The value of a MAIL FROM parameter kept on the envelope, if given."""
    prefix = name.upper() + "="
    for option in envelope.mail_options:
        if option.upper().startswith(prefix):
            return str(option[len(prefix) :])
    return None


class _SandboxSMTP(SMTP):
    """aiosmtpd's SMTP session plus what a hook cannot do: hang up after or instead of a reply."""

    def __init__(self, handler: _DomainHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.domain_handler = handler
        self.transactions = 0  # MAIL commands accepted on this connection
        self.accepted = 0  # messages accepted on this connection
        self.hang_up_after_reply = False
        self.hang_up_instead_of_reply = False
        self._ended = False

    def _without_dsn_params(
        self, arg: str | None, names: tuple[str, ...]
    ) -> tuple[str | None, list[str]]:
        # aiosmtpd refuses parameters it does not know (555): RFC 3461's are taken out first
        # when the domain offers DSN (a relay such as Postfix passes them on), as a real MTA
        # would accept them.
        if not arg or not self.domain_handler.offers_dsn:
            return arg, []
        words = arg.split(" ")
        taken = [w for w in words if w.upper().startswith(names)]
        return " ".join(w for w in words if w not in taken), taken

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        arg, _ = self._without_dsn_params(arg, _DSN_RCPT_PARAMS)
        await super().smtp_RCPT(arg)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        arg, dsn_params = self._without_dsn_params(arg, _DSN_MAIL_PARAMS)
        await super().smtp_MAIL(arg)
        envelope = self.envelope
        if dsn_params and envelope is not None and envelope.mail_from is not None:
            envelope.mail_options.extend(dsn_params)
        if self.hang_up_after_reply and self.transport is not None:
            # The reply is already written; close() flushes it before the socket goes.
            self.transport.close()

    async def push(self, status: AnyStr) -> None:
        """Send a reply, unless a hook asked to break the connection instead."""
        if self.hang_up_instead_of_reply:
            # connection_lost() follows and cancels the session task: nothing more is read.
            if self.transport is not None:
                self.transport.close()
            return
        await super().push(status)

    def connection_lost(self, error: Exception | None) -> None:
        """Count the session if it ends without a message, then let aiosmtpd clean up."""
        # aiosmtpd calls this twice after a failed TLS handshake (itself, then the transport).
        if not self._ended:
            self._ended = True
            self.domain_handler.session_ended(self)
        super().connection_lost(error)


class _DomainHandler:
    """aiosmtpd hooks applying one SandboxDomain's behaviour and storing what it accepts."""

    def __init__(
        self,
        domain: SandboxDomain,
        maildir: Path,
        recorder: _Recorder,
        *,
        cert_trusted: bool,
        bounce_route: tuple[str, int] | None = None,
        bounce_delay: float = DEFAULT_BOUNCE_DELAY,
    ) -> None:
        self._domain = domain
        self._tmp = maildir / "tmp"
        self._new = maildir / "new"
        self._recorder = recorder
        self._cert_trusted = cert_trusted
        self._seq = itertools.count()
        self._deferred_once: set[str] = set()
        self._probe_peer: object = None
        self._bounce_route = bounce_route
        self._bounce_delay = bounce_delay
        # DSNs waiting for their moment, owned here and awaited by drain() at stop.
        self._later: set[asyncio.Task[None]] = set()

    def ignore_probe(self, peer: object) -> None:
        """Do not count the start-up probe connecting from peer as a client session."""
        self._probe_peer = peer

    def session_ended(self, server: _SandboxSMTP) -> None:
        """Count a connection that closed without any message accepted."""
        peer = server.session.peer if server.session is not None else None
        if peer is not None and peer == self._probe_peer:
            self._probe_peer = None
            return
        if server.accepted == 0:
            self._recorder.add_empty_session(self._domain.name)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Offer PIPELINING and DSN when the domain does (aiosmtpd reads pipelined commands
        fine; `_SandboxSMTP` takes DSN's MAIL and RCPT parameters)."""
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument hook
        offers = [
            *(["250-PIPELINING"] if self._domain.pipelining else []),
            *(["250-DSN"] if self._domain.dsn else []),
        ]
        return [*responses[:-1], *offers, responses[-1]]

    @property
    def offers_dsn(self) -> bool:
        """Whether this domain's EHLO offers DSN."""
        return self._domain.dsn

    async def handle_MAIL(
        self,
        server: _SandboxSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        close_after = self._domain.close_after
        if close_after is not None and server.transactions >= close_after:
            server.hang_up_after_reply = True
            log.debug(
                "sandbox %s: closing a connection after %d messages", self._domain.name, close_after
            )
            return f"421 4.7.0 {self._domain.name} Too many messages, closing connection"
        server.transactions += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    def _defers_first(self, address: str) -> bool:
        local = address.rpartition("@")[0].casefold()
        for prefix, behaviour in self._domain.recipient_rules:
            if local.startswith(prefix.casefold()):
                if behaviour is not Behaviour.DEFER_FIRST or address in self._deferred_once:
                    return False
                self._deferred_once.add(address)
                return True
        return False

    async def handle_RCPT(
        self,
        server: _SandboxSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = rcpt_reply(self._domain, address)
        if reply is None and self._defers_first(address):
            reply = "451 4.2.1 Mailbox temporarily unavailable, try again later"
        if reply is not None:
            log.debug("sandbox %s: RCPT answered %s", self._domain.name, reply[:9])
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: _SandboxSMTP, session: Session, envelope: Envelope) -> str:
        if self._domain.behaviour is Behaviour.DROP_AFTER_STARTTLS:
            # The worst moment to lose a connection: the client sent everything and cannot
            # tell whether it was accepted. It was not; nothing is stored.
            server.hang_up_instead_of_reply = True
            log.debug("sandbox %s: dropping the connection at end of DATA", self._domain.name)
            return "421 4.4.2 not sent: push() hangs up instead"
        content = envelope.original_content
        assert isinstance(content, bytes)  # decode_data=False keeps the exact bytes
        assert envelope.mail_from is not None
        now = dt.datetime.now(dt.UTC).astimezone()
        queue_id = secrets.token_hex(6).upper()
        tls = _tls_details(session)
        peer = session.peer
        client_ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        # The HELO name goes into a header: keep a hostile one from breaking the header.
        helo = "".join(c if c.isprintable() else "?" for c in session.host_name or "unknown")
        rcpt_tos = tuple(envelope.rcpt_tos)
        header = received_header(
            helo=helo,
            client_ip=client_ip,
            by_host=self._domain.name,
            queue_id=queue_id,
            extended=session.extended_smtp,
            tls=tls,
            rcpt_tos=rcpt_tos,
            when=now,
        )
        path = self._store(header, content, queue_id, now)
        self._recorder.add(
            Received(
                domain=self._domain.name,
                queue_id=queue_id,
                client_ip=client_ip,
                helo=helo,
                tls_version=tls[0] if tls else None,
                cipher=tls[1] if tls else None,
                tls_cert_trusted=tls is not None and self._cert_trusted,
                mail_from=envelope.mail_from,
                rcpt_tos=rcpt_tos,
                size=len(content),
                path=path,
                received_at=now,
                dsn_ret=_mail_param(envelope, "RET"),
            )
        )
        server.accepted += 1
        log.debug("sandbox %s: accepted %s", self._domain.name, queue_id)
        self._bounce_later(envelope, rcpt_tos, header + content, queue_id, now)
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _bounce_later(
        self,
        envelope: Envelope,
        rcpt_tos: tuple[str, ...],
        stored: bytes,
        queue_id: str,
        now: dt.datetime,
    ) -> None:
        """Schedule a DSN to the return path for each recipient that bounces later."""
        return_path = str(envelope.mail_from or "").strip("<>")
        if not return_path:
            return  # never bounce a bounce (null sender)
        envid = _mail_param(envelope, "ENVID")
        for rcpt in rcpt_tos:
            behaviour = recipient_behaviour(self._domain, rcpt)
            if behaviour not in LATER_BEHAVIOURS:
                continue
            if self._bounce_route is None:
                log.warning("sandbox %s: no bounce route; DSN not sent", self._domain.name)
                continue
            dsn = delivery_status_notification(
                behaviour=behaviour,
                reporting_mta=self._domain.name,
                return_path=return_path,
                recipient=rcpt,
                returned_headers=_header_block(stored),
                arrival=now,
                queue_id=queue_id,
                envelope_id=envid,
            )
            task = asyncio.get_running_loop().create_task(self._send_dsn(return_path, dsn))
            self._later.add(task)
            task.add_done_callback(self._later.discard)

    async def _send_dsn(self, return_path: str, dsn: bytes) -> None:
        assert self._bounce_route is not None
        host, port = self._bounce_route
        await asyncio.sleep(self._bounce_delay)
        try:
            client = aiosmtplib.SMTP(
                hostname=host,
                port=port,
                local_hostname=self._domain.name,
                start_tls=False,
                timeout=5,
            )
            async with client:
                # The null sender (MAIL FROM:<>) marks a DSN, so it can never bounce back.
                # (aiosmtplib.send() refuses an empty sender; SMTP.sendmail() sends <>.)
                await client.sendmail("", [return_path], dsn)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            log.warning("sandbox %s: DSN not delivered: %s", self._domain.name, type(exc).__name__)
            self._recorder.add_dsn(self._domain.name, sent=False)
            return
        self._recorder.add_dsn(self._domain.name, sent=True)

    @property
    def dsns_pending(self) -> int:
        """DSNs still to go out (waiting their delay, or being sent)."""
        return len(self._later)

    async def drain(self, grace: float) -> None:
        """Let the pending DSNs go out (for up to `grace` seconds), then cancel the rest."""
        pending = set(self._later)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=grace)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=1.0)

    async def handle_exception(self, error: Exception) -> str:
        """Log the failure by type only: exception text can quote envelope addresses."""
        if isinstance(error, TLSSetupException):
            # Expected for the bad-certificate domains: the client refused our certificate.
            log.info("sandbox %s: TLS handshake failed", self._domain.name)
        else:
            log.warning("sandbox %s: session error %s", self._domain.name, type(error).__name__)
        return "451 4.3.0 Local error in processing"

    def _store(self, header: bytes, content: bytes, queue_id: str, now: dt.datetime) -> Path:
        # Maildir delivery: write under tmp/, then rename into new/ so readers never see a
        # partial file. Blocking I/O is fine here: this runs on the domain's own server thread.
        # No fsync: a sandbox trades durability for speed. Bytes are kept as received (CRLF)
        # so signatures over them can still be verified.
        seconds = now.timestamp()
        name = (
            f"{int(seconds)}.M{int(seconds % 1 * 1e6)}P{os.getpid()}Q{next(self._seq)}"
            f"_{queue_id}.{self._domain.name}"
        )
        tmp = self._tmp / name
        with tmp.open("xb") as handle:
            handle.write(header)
            handle.write(content)
        final = self._new / name
        tmp.rename(final)
        return final


def _tls_details(session: Session) -> tuple[str, str, int] | None:
    """(version, cipher, bits) from the session's real SSL object, None for plaintext."""
    info = session.ssl
    if not info:
        return None
    ssl_object = info.get("ssl_object")
    cipher = ssl_object.cipher() if isinstance(ssl_object, ssl.SSLObject) else info.get("cipher")
    version = ssl_object.version() if isinstance(ssl_object, ssl.SSLObject) else None
    if not cipher:
        return None
    name, protocol, bits = cipher
    return str(version or protocol), str(name), int(bits)


class _SandboxController(Controller):
    """aiosmtpd's threaded Controller, with our SMTP class and support for port 0."""

    def factory(self) -> SMTP:
        return _SandboxSMTP(self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # With port 0 the kernel picked the port when the listener was bound; learn it
        # before the start-up probe connects. This avoids the race of probing a free
        # port with a separate socket and binding it later.
        assert isinstance(self.server, asyncio.Server)
        self.port = int(self.server.sockets[0].getsockname()[1])
        # aiosmtpd's probe (we never use implicit TLS), but the handler learns its address
        # before it hangs up, so it is not counted as a client session without a message.
        with socket.create_connection((self.hostname, self.port), timeout=1.0) as probe:
            self.handler.ignore_probe(probe.getsockname())
            probe.recv(1024)


def _server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class Sandbox:
    """A set of sandbox MX servers, one per SandboxDomain, each on its own loopback address."""

    def __init__(
        self,
        domains: Sequence[SandboxDomain],
        maildir_root: Path,
        pki: TestPki,
        *,
        max_records: int = DEFAULT_MAX_RECORDS,
        bounce_route: tuple[str, int] | None = None,
        bounce_delay: float = DEFAULT_BOUNCE_DELAY,
    ) -> None:
        names = [d.name.lower() for d in domains]
        if len(set(names)) != len(names):
            raise ConfigError("sandbox: domain names must be unique")
        self._domains = tuple(domains)
        self._maildir_root = maildir_root
        self._pki = pki
        self._recorder = _Recorder(max_records)
        self._controllers: dict[str, _SandboxController] = {}
        self._routes: dict[str, tuple[str, int]] = {}
        # Where bounce_later/defer_later DSNs go (the bounce listener), whatever the return
        # path's domain: a sandbox has no MX records to look up.
        self._bounce_route = bounce_route
        self._bounce_delay = bounce_delay

    @property
    def routes(self) -> dict[str, tuple[str, int]]:
        """Domain name -> (host, port) it actually listens on; empty until started."""
        return dict(self._routes)

    @property
    def counts(self) -> dict[str, int]:
        """Domain name -> number of messages accepted since start."""
        return self._recorder.counts()

    @property
    def empty_sessions(self) -> dict[str, int]:
        """Domain name -> connections that closed without a message accepted (e.g. TLS refused)."""
        return self._recorder.empty_sessions()

    @property
    def dsns_sent(self) -> dict[str, int]:
        """Domain name -> DSNs delivered to the bounce route (bounce_later, defer_later)."""
        return self._recorder.dsns(sent=True)

    @property
    def dsns_pending(self) -> int:
        """DSNs accepted messages will still send (each is done once the bounce route has
        answered it, i.e. once the bounce listener has acted on it)."""
        # A set's length, read from this thread while the servers' loops change it: a
        # count of the moment, which is all a caller waiting for zero needs.
        return sum(
            controller.handler.dsns_pending
            for controller in self._controllers.values()
            if isinstance(controller.handler, _DomainHandler)
        )

    @property
    def dsn_failures(self) -> dict[str, int]:
        """Domain name -> DSNs the bounce route did not take."""
        return self._recorder.dsns(sent=False)

    @property
    def received(self) -> list[Received]:
        """Records of accepted messages, oldest first (at most max_records of them)."""
        return self._recorder.records()

    def maildir(self, domain: str) -> Path:
        """The Maildir directory of one domain."""
        return self._maildir_root / domain

    async def start(self) -> None:
        """Bind and start every domain's server; on any failure, stop those already started."""
        if self._controllers:
            raise RuntimeError("sandbox already started")
        self._check_certificate_names()
        _quiet_aiosmtpd_logging()
        try:
            for domain in self._domains:
                await self._start_domain(domain)
        except BaseException:
            await self.stop()
            raise
        log.info("sandbox started: %d domains", len(self._domains))

    async def stop(self) -> None:
        """Stop every server and release its port."""
        controllers, self._controllers = self._controllers, {}
        self._routes = {}
        for controller in controllers.values():
            # Pending DSNs run on the server's own loop: let them finish there first.
            handler = controller.handler
            if isinstance(handler, _DomainHandler) and controller.loop.is_running():
                drained = asyncio.run_coroutine_threadsafe(handler.drain(2.0), controller.loop)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(drained), timeout=5.0)
            # Controller.stop() joins the server thread: keep our own loop responsive.
            await asyncio.to_thread(controller.stop)
        if controllers:
            log.info("sandbox stopped: %d domains", len(controllers))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _start_domain(self, domain: SandboxDomain) -> None:
        maildir = self.maildir(domain.name)
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        pair = _certificate_for(domain.behaviour, self._pki)
        tls_context = None if pair is None else _server_tls_context(*pair)
        if tls_context is not None and domain.behaviour is Behaviour.OLD_TLS_ONLY:
            with warnings.catch_warnings():  # deprecated protocols: this receiver's point
                warnings.simplefilter("ignore", DeprecationWarning)
                tls_context.minimum_version = ssl.TLSVersion.TLSv1
                tls_context.maximum_version = ssl.TLSVersion.TLSv1_1
        # Decided by real path validation, not by the behaviour's name, so a record's flag
        # holds even if the PKI files were swapped.
        trusted = pair is not None and await asyncio.to_thread(
            certificate_verifies, pair[0], self._pki.ca, domain.name
        )
        controller = _SandboxController(
            _DomainHandler(
                domain,
                maildir,
                self._recorder,
                cert_trusted=trusted,
                bounce_route=self._bounce_route,
                bounce_delay=self._bounce_delay,
            ),
            hostname=domain.host,
            port=domain.port,
            ready_timeout=READY_TIMEOUT,
            server_hostname=domain.name,
            tls_context=tls_context,
            require_starttls=False,
            auth_require_tls=False,
            decode_data=False,
        )
        await asyncio.to_thread(controller.start)
        self._controllers[domain.name] = controller
        self._routes[domain.name] = (domain.host, int(controller.port))
        self._recorder.init_domain(domain.name)
        log.info(
            "sandbox %s: listening on %s:%d, behaviour %s",
            domain.name,
            domain.host,
            controller.port,
            domain.behaviour,
        )

    def _check_certificate_names(self) -> None:
        # A missing name would surface as a confusing verification failure in the client,
        # and a bad-certificate domain must fail for its one intended reason only.
        for domain in self._domains:
            pair = _certificate_for(domain.behaviour, self._pki)
            if pair is None:
                continue
            named = domain.name.lower() in certificate_dns_names(pair[0])
            if domain.behaviour is Behaviour.WRONG_HOST_CERT and named:
                raise ConfigError(f"sandbox: the wrong-host certificate names {domain.name}")
            if domain.behaviour is not Behaviour.WRONG_HOST_CERT and not named:
                raise ConfigError(
                    f"sandbox: the test certificate does not name {domain.name}; "
                    "pass it to make_test_pki"
                )


def _certificate_for(behaviour: Behaviour, pki: TestPki) -> tuple[Path, Path] | None:
    """The (certificate, key) a domain with this behaviour offers over STARTTLS, if any."""
    if behaviour is Behaviour.NO_STARTTLS:
        return None
    if behaviour is Behaviour.UNTRUSTED_CERT:
        return pki.untrusted_cert, pki.untrusted_key
    if behaviour is Behaviour.EXPIRED_CERT:
        return pki.expired_cert, pki.expired_key
    if behaviour is Behaviour.WRONG_HOST_CERT:
        return pki.wrong_host_cert, pki.wrong_host_key
    return pki.server_cert, pki.server_key


def _quiet_aiosmtpd_logging() -> None:
    # aiosmtpd logs envelope addresses and command lines at INFO on "mail.log": PHI. Raise
    # the level unless someone already configured that logger on purpose.
    mail_log = logging.getLogger("mail.log")
    if mail_log.level == logging.NOTSET:
        mail_log.setLevel(logging.WARNING)


def default_sandbox_domains(
    base_ip_prefix: str = "127.0.10.", *, port: int = 0
) -> list[SandboxDomain]:
    """The demo's receivers on .1 to .8: alpha, bravo, charlie, then one per TLS failure mode."""
    return [
        SandboxDomain(
            "alpha.sandbox.test",
            f"{base_ip_prefix}1",
            port,
            recipient_rules=(
                ("unknown-", Behaviour.REJECT),
                ("busy-", Behaviour.DEFER),
                ("gone-", Behaviour.BOUNCE_LATER),
                ("full-", Behaviour.DEFER_LATER),
            ),
        ),
        SandboxDomain("bravo.sandbox.test", f"{base_ip_prefix}2", port, close_after=25),
        SandboxDomain("charlie.sandbox.test", f"{base_ip_prefix}3", port),
        SandboxDomain(
            "notls.sandbox.test", f"{base_ip_prefix}4", port, behaviour=Behaviour.NO_STARTTLS
        ),
        SandboxDomain(
            "untrusted.sandbox.test",
            f"{base_ip_prefix}5",
            port,
            behaviour=Behaviour.UNTRUSTED_CERT,
        ),
        SandboxDomain(
            "expired.sandbox.test", f"{base_ip_prefix}6", port, behaviour=Behaviour.EXPIRED_CERT
        ),
        SandboxDomain(
            "wronghost.sandbox.test",
            f"{base_ip_prefix}7",
            port,
            behaviour=Behaviour.WRONG_HOST_CERT,
        ),
        SandboxDomain(
            "dropper.sandbox.test",
            f"{base_ip_prefix}8",
            port,
            behaviour=Behaviour.DROP_AFTER_STARTTLS,
        ),
    ]


_DOMAIN_KEYS = frozenset(
    {"name", "host", "port", "behaviour", "close_after", "recipient_rules", "pipelining"}
)


def sandbox_config_from_toml(data: Mapping[str, Any]) -> list[SandboxDomain]:
    """Parse [[sandbox.domains]] tables of a TOML document; no such tables -> the defaults."""
    sandbox = data.get("sandbox", {})
    if not isinstance(sandbox, Mapping):
        raise ConfigError("sandbox: expected a table")
    if "domains" not in sandbox:
        return default_sandbox_domains()
    entries = sandbox["domains"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError("sandbox.domains: expected a non-empty array of tables")
    domains: list[SandboxDomain] = []
    for index, entry in enumerate(entries):
        where = f"sandbox.domains[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a table")
        domains.append(_domain_from_table(entry, where))
    seen_names: set[str] = set()
    seen_binds: set[tuple[str, int]] = set()
    for index, domain in enumerate(domains):
        where = f"sandbox.domains[{index}]"
        if domain.name.lower() in seen_names:
            raise ConfigError(f"{where}.name: {domain.name} is listed twice")
        seen_names.add(domain.name.lower())
        # Port 0 means "any free port", so several domains may share a host with it.
        if domain.port:
            bind = (str(ipaddress.ip_address(domain.host)), domain.port)
            if bind in seen_binds:
                raise ConfigError(f"{where}: {domain.host}:{domain.port} is used twice")
            seen_binds.add(bind)
    return domains


def _domain_from_table(entry: Mapping[str, Any], where: str) -> SandboxDomain:
    unknown = sorted(set(entry) - _DOMAIN_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    for key in ("name", "host"):
        if key not in entry:
            raise ConfigError(f"{where}.{key}: missing")
        if not isinstance(entry[key], str):
            raise ConfigError(f"{where}.{key}: expected a string")
    port = entry.get("port", 0)
    if isinstance(port, bool) or not isinstance(port, int):
        raise ConfigError(f"{where}.port: expected an integer 0-65535")
    close_after = entry.get("close_after")
    if close_after is not None and (
        isinstance(close_after, bool) or not isinstance(close_after, int)
    ):
        raise ConfigError(f"{where}.close_after: expected an integer >= 0")
    behaviour = _behaviour(entry.get("behaviour", "accept"), f"{where}.behaviour")
    pipelining = entry.get("pipelining", True)
    if not isinstance(pipelining, bool):
        raise ConfigError(f"{where}.pipelining: expected true or false")
    rules_table = entry.get("recipient_rules", {})
    if not isinstance(rules_table, Mapping):
        raise ConfigError(
            f'{where}.recipient_rules: expected a table like {{"unknown-" = "reject"}}'
        )
    rules = tuple(
        (str(prefix), _behaviour(value, f"{where}.recipient_rules.{prefix}"))
        for prefix, value in rules_table.items()
    )
    try:
        return SandboxDomain(
            name=entry["name"],
            host=entry["host"],
            port=port,
            behaviour=behaviour,
            close_after=close_after,
            recipient_rules=rules,
            pipelining=pipelining,
        )
    except ConfigError as error:
        raise ConfigError(f"{where}.{error.detail}") from None


def _behaviour(value: Any, where: str) -> Behaviour:
    choices = ", ".join(b.value for b in Behaviour)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected one of {choices}")
    try:
        return Behaviour(value.lower())
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not one of {choices}") from None
