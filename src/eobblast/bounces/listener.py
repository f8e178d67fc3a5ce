"""`eobblast bounces`: the SMTP listener (aiosmtpd) that receives asynchronous bounces.

It accepts mail only for VERP return paths (`bounces+<token>@<bounce domain>`; any other
recipient gets 550), hands each message to a handler (`BounceService.on_dsn` in production,
which parses, maps and acts), and keeps what the handler could not read or map in a review
Maildir for a person. A handler that raises (the store is down, say) makes the listener
answer 451, so the sending MTA keeps the report and tries again: nothing is lost, and
handling the same report twice changes nothing. So does a full review pile (452): a
report nobody could act on, a complaint among them, is never accepted and then dropped.

The server runs on the caller's event loop (not aiosmtpd's threaded Controller), so the
handler shares the loop with the store's connections. The review pile holds the reports
with the body of any returned notice cut out (its headers stay: they name the event), in a
private directory (0700), each file deleted `review_days` after it arrived.

STARTTLS is offered when a certificate and key are configured (`load_tls_context`); a
listener on a non-loopback address without them says so at start, since a receiver that
ignores RET=HDRS returns the whole notice.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import itertools
import logging
import os
import re
import ssl
import time
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiosmtpd.smtp import SMTP, Envelope, Session
from prometheus_client import Counter

from eobblast._net import is_loopback
from eobblast.bounces.dsn import read_mime
from eobblast.bounces.inbound import BounceHandler, ReviewReason
from eobblast.config import BOUNCE_MESSAGE_BYTES
from eobblast.errors import ConfigError
from eobblast.observe.metrics import REGISTRY
from eobblast.render.mime import BOUNDARY_PREFIX

__all__ = ["BOUNCE_MESSAGES", "BounceListener", "load_tls_context", "serve_bounces"]

log = logging.getLogger("eobblast.bounces.listener")

# What became of each message at the bounce listener (BOUNCE_MESSAGES's `result`);
# review_full: refused with 452 because the review pile was full (the sender retries).
RESULTS = ("handled", "review", "rejected_recipient", "handler_error", "review_full")
BOUNCE_MESSAGES = Counter(
    "eobblast_bounce_messages",
    f"Messages at the bounce listener by result ({', '.join(RESULTS)}).",
    ["result"],
    registry=REGISTRY,
)

DEFAULT_DATA_LIMIT = BOUNCE_MESSAGE_BYTES
MAX_RECIPIENTS = 10
# What a review file keeps of one report (its headers, the delivery status and the returned
# headers fit many times over): a flood of large junk cannot fill the disk.
MAX_REVIEW_BYTES = 256 * 1024
DEFAULT_MAX_REVIEW = 10_000
DEFAULT_REVIEW_DAYS = 30.0
_TOKEN = re.compile(r"^[a-z2-7]{18,60}$")
# A returned copy of one of our notices: from its first MIME boundary line to its closing
# one (or the end, when the sender truncated it), quoted ("> ") or not.
_BOUNDARY = rb"^[>|:\t ]*--" + re.escape(BOUNDARY_PREFIX.encode()) + rb"[0-9a-f]{32}"
_NOTICE_BODY = re.compile(
    _BOUNDARY + rb"[\t ]*\r?$.*?(?:" + _BOUNDARY + rb"--[\t ]*\r?$|\Z)", re.M | re.S
)
REDACTED = b"[eobblast: the body of the returned notice was removed; it may hold PHI]\r"
# The review pile is swept at most this often (seconds); while it is full, counted again
# at most this often, so reports flow again soon after a person has cleared it.
_SWEEP_EVERY = 3600.0
_RECOUNT_FULL_EVERY = 60.0
REVIEW_FULL_REPLY = "452 4.3.1 Review pile full, try again later"


_MARK = b"--" + BOUNDARY_PREFIX.encode()
_QP_MARK = b"=3D" + BOUNDARY_PREFIX[1:].encode()
_PLAIN_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})
_DECODABLE = frozenset({"base64", "quoted-printable", "x-uuencode", "uuencode", "uue", "x-uue"})
_REMOVED = "[eobblast: a part that may hold a returned notice was removed]\r\n"


def without_notice_bodies(content: bytes) -> bytes:
    """A report with the body of every returned notice cut out, its headers left.

    A copy returned as it was sent (raw or quoted) loses the body between its boundaries.
    A part in a transfer encoding or charset that hides those lines from a byte search is
    decoded and cut the same way, or removed whole when that cannot be done cleanly; a
    message/* part in an encoding it may not have is removed. If anything of a notice is
    still found, or the report cannot be read as MIME, only its headers are kept.
    """
    cut = _NOTICE_BODY.sub(REDACTED, content)
    try:
        message = read_mime(cut)  # TooManyParts: no report, its top headers are kept
        changed = _redact_part(message)
        kept = message.as_bytes(policy=email.policy.compat32.clone(linesep="\r\n"))
        if not changed:
            kept = cut
    except Exception:  # whatever the report is, PHI must not stay in it
        return _headers_only(cut)
    if _MARK in kept or _QP_MARK in kept:
        return _headers_only(cut)
    return kept


def _redact_part(part: Message) -> bool:
    """Cut or remove what of a returned notice hides in `part`; whether anything changed."""
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower().split()
    token = encoding[0].rstrip(";") if encoding else ""
    if part.is_multipart():
        if part.get_content_maintype() == "message" and token not in _PLAIN_ENCODINGS:
            _replace(part)  # RFC 2046 allows message/* only in 7bit, 8bit or binary
            return True
        changed = False
        for sub in part.get_payload():
            if isinstance(sub, Message):
                changed = _redact_part(sub) or changed
        return changed
    if token in _PLAIN_ENCODINGS and part.get_content_charset() in (None, "us-ascii", "utf-8"):
        return False  # the byte search over the whole report already saw this part
    if token not in _PLAIN_ENCODINGS and token not in _DECODABLE:
        _replace(part)  # an encoding nobody can read back: nothing to check it with
        return True
    if encoding and encoding != [token]:
        # "base64 (the copy)": the library decodes only the bare token, a reader any.
        part.replace_header("Content-Transfer-Encoding", token)
    decoded = part.get_payload(decode=True)
    if not isinstance(decoded, bytes):
        return False
    charset = part.get_content_charset() or "us-ascii"
    try:
        text = decoded.decode(charset, errors="replace")
    except LookupError:
        text = decoded.decode("latin-1")
    if BOUNDARY_PREFIX not in text and _MARK not in decoded:
        return False
    trimmed = _NOTICE_BODY.sub(REDACTED, text.encode("utf-8", errors="replace"))
    if _MARK in trimmed or not trimmed.isascii():
        _replace(part)
    else:
        del part["Content-Transfer-Encoding"]
        part.set_payload(trimmed.decode("ascii"))
    return True


def _replace(part: Message) -> None:
    for name in ("Content-Transfer-Encoding", "Content-Type"):
        del part[name]
    part["Content-Type"] = "text/plain; charset=us-ascii"
    part.set_payload(_REMOVED)


def _headers_only(raw: bytes) -> bytes:
    """The top header block alone (nothing, if no blank line ends it), then the marker."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, _ = raw.partition(separator)
        if found:
            return head + b"\r\n\r\n" + REDACTED + b"\n"
    return REDACTED + b"\n"


class _ListenerSMTP(SMTP):
    """aiosmtpd's session, registered with its listener so `stop` can end it."""

    # Broken MTAs send bounce lines longer than RFC 5321's 1000; Postfix's smtpd takes them
    # too. Refusing would only make them retry forever; the parser bounds its own work.
    line_length_limit = 64 * 1024

    def __init__(self, listener: BounceListener, **kwargs: Any) -> None:
        super().__init__(_Hooks(listener), **kwargs)
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register the session, then let aiosmtpd greet the client."""
        self._listener.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """Forget the session."""
        self._listener.sessions.discard(self)
        super().connection_lost(error)


class _Hooks:
    """aiosmtpd hooks: VERP recipients only, then the handler, then the review pile."""

    def __init__(self, listener: BounceListener) -> None:
        self._listener = listener

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not self._listener.is_bounce_address(address):
            self._listener.stats["rejected_recipient"] += 1
            BOUNCE_MESSAGES.labels("rejected_recipient").inc()
            return "550 5.1.1 Recipient address rejected: not a bounce address"
        if address in envelope.rcpt_tos:
            return "250 2.1.5 Ok"  # once is enough: each recipient costs a parse
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            # A report goes to one return path; the client sends the rest in a later
            # transaction (RFC 5321 4.5.3.1.10), and one message cannot be parsed 100 times.
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        assert isinstance(content, bytes)  # decode_data=False keeps the exact bytes
        return await self._listener.deliver(content, tuple(envelope.rcpt_tos))

    async def handle_exception(self, error: Exception) -> str:
        """Log by type only: exception text can quote envelope addresses."""
        log.warning("bounce listener session error %s", type(error).__name__)
        return "451 4.3.0 Local error in processing"


class BounceListener:
    """The bounce listener: start it, read `port`, stop it (or use `async with`)."""

    def __init__(
        self,
        handler: BounceHandler,
        *,
        host: str,
        port: int,
        bounce_domain: str,
        review_dir: Path,
        prefix: str = "bounces",
        tls_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
        handler_timeout: float = 30.0,
        data_size_limit: int = DEFAULT_DATA_LIMIT,
        review_max_messages: int = DEFAULT_MAX_REVIEW,
        review_days: float = DEFAULT_REVIEW_DAYS,
    ) -> None:
        if not review_days > 0:
            raise ValueError("review_days must be > 0")
        if not review_max_messages > 0:
            raise ValueError("review_max_messages must be > 0")
        self._handler = handler
        self._host = host
        self._port = port
        self._domain = bounce_domain.strip().lower().rstrip(".")
        self._prefix = prefix.lower()
        self._review = review_dir
        self._tls = tls_context
        self._server_name = server_name or self._domain
        self._timeout = handler_timeout
        self._data_limit = data_size_limit
        self._max_review = review_max_messages
        self._review_seconds = review_days * 86400.0
        self._swept_at = 0.0
        self._server: asyncio.Server | None = None
        self._seq = itertools.count()
        self._review_count = 0
        self.sessions: set[_ListenerSMTP] = set()
        # Per-listener counts for tests and the command's summary (metrics are global).
        self.stats: dict[str, int] = {
            "handled": 0,
            "review": 0,
            "rejected_recipient": 0,
            "handler_error": 0,
            "review_full": 0,
        }

    @property
    def port(self) -> int:
        """The port actually bound (after start)."""
        if self._server is None:
            raise RuntimeError("bounce listener not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def review_dir(self) -> Path:
        """The review Maildir (messages in new/)."""
        return self._review

    def is_bounce_address(self, address: str) -> bool:
        """Whether an envelope recipient has the shape of one of our VERP return paths."""
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at or domain.lower().rstrip(".") != self._domain:
            return False
        head, plus, token = local.lower().partition("+")
        return bool(plus) and head == self._prefix and _TOKEN.match(token) is not None

    async def bind(self) -> None:
        """Take the address (OSError if it cannot be had) without serving yet: `start`
        serves. Stop a listener bound and never started too."""
        if self._server is not None:
            raise RuntimeError("bounce listener already bound")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._session, self._host, self._port, start_serving=False
        )

    async def start(self) -> None:
        """Bind (unless `bind` did) and serve on the running loop."""
        if self._server is not None and self._server.is_serving():
            raise RuntimeError("bounce listener already started")
        await asyncio.to_thread(self._prepare_review)
        _quiet_aiosmtpd_logging()
        # Every result counted from 0: an alert on the first handler error needs a sample
        # before it (a labelled series appears only when first counted).
        for result in RESULTS:
            BOUNCE_MESSAGES.labels(result)
        if self._server is None:
            await self.bind()
        assert self._server is not None
        await self._server.start_serving()
        log.info("bounce listener on %s:%d", self._host, self.port)
        if self._tls is None and not is_loopback(self._host):
            log.warning(
                "bounce listener on %s without TLS: a receiver that ignores RET=HDRS returns"
                " the whole notice (PHI), in the clear; set bounces.tls_cert and"
                " bounces.tls_key",
                self._host or "all addresses",
            )

    def _session(self) -> _ListenerSMTP:
        return _ListenerSMTP(
            self,
            hostname=self._server_name,
            ident="eobblast bounce listener",
            tls_context=self._tls,
            require_starttls=False,
            decode_data=False,
            data_size_limit=self._data_limit,
            timeout=60,
        )

    async def stop(self) -> None:
        """Stop accepting, end open sessions, release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = []
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
            task = getattr(session, "_handler_coroutine", None)
            if isinstance(task, asyncio.Task):
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await server.wait_closed()
        log.info("bounce listener stopped")

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

    async def deliver(self, content: bytes, recipients: tuple[str, ...]) -> str:
        """Hand one message to the handler for each recipient; the SMTP reply to DATA."""
        review: ReviewReason | None = None
        for recipient in recipients:
            try:
                async with asyncio.timeout(self._timeout):
                    result = await self._handler(content, recipient)
            except Exception as exc:
                self.stats["handler_error"] += 1
                BOUNCE_MESSAGES.labels("handler_error").inc()
                # By type only: a driver's message can quote an address from the report.
                log.error("bounce handler failed (%s); the sender will retry", type(exc).__name__)
                return "451 4.3.0 Temporary failure processing the report, try again later"
            review = review or result.review_reason
        if review is not None and not await self._keep_for_review(content, review):
            return REVIEW_FULL_REPLY
        self.stats["handled"] += 1
        BOUNCE_MESSAGES.labels("handled").inc()
        return "250 2.0.0 Ok"

    def _prepare_review(self) -> None:
        for sub in ("tmp", "new", "cur"):
            (self._review / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._review.chmod(0o700)
        self.sweep_review()

    def sweep_review(self, now: float | None = None) -> int:
        """Delete review files older than `review_days` (blocking); how many went."""
        now = time.time() if now is None else now
        self._swept_at = now
        removed = 0
        for sub in ("new", "cur", "tmp"):
            for path in (self._review / sub).iterdir():
                try:
                    if now - path.stat().st_mtime > self._review_seconds:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue  # a person moved or removed it meanwhile
        self._review_count = sum(1 for _ in (self._review / "new").iterdir())
        if removed:
            log.info("review pile swept", extra={"removed": removed})
        return removed

    async def _keep_for_review(self, content: bytes, reason: ReviewReason) -> bool:
        """Keep a report for a person; False when the pile is full and it was not kept."""
        full = self._review_count >= self._max_review
        if time.time() - self._swept_at > (_RECOUNT_FULL_EVERY if full else _SWEEP_EVERY):
            await asyncio.to_thread(self.sweep_review)
        if self._review_count >= self._max_review:
            # A flood of junk at the bounce address must not fill the disk, and a complaint
            # in it must not vanish: refused, so the sender keeps it and tries again.
            self.stats["review_full"] += 1
            BOUNCE_MESSAGES.labels("review_full").inc()
            log.warning(
                "review pile full (bounces.review_max_messages); report refused with 452,"
                " the sender will retry",
                extra={"reason": str(reason)},
            )
            return False
        self._review_count += 1
        name = f"{time.time_ns()}.P{os.getpid()}Q{next(self._seq)}.{reason}"
        header = f"X-EOB-Review-Reason: {reason}\r\n".encode()
        # Off the event loop, as the parse is: cutting a large report takes a while.
        kept = await asyncio.to_thread(without_notice_bodies, content)
        if len(kept) > MAX_REVIEW_BYTES:
            header += f"X-EOB-Review-Truncated: {len(kept)} bytes\r\n".encode()
            kept = kept[:MAX_REVIEW_BYTES]
        await asyncio.to_thread(self._write_review, name, header + kept)
        self.stats["review"] += 1
        BOUNCE_MESSAGES.labels("review").inc()
        log.info("bounce kept for review", extra={"reason": str(reason)})
        return True

    def _write_review(self, name: str, data: bytes) -> None:
        # Maildir delivery: write under tmp/, then rename into new/, never a partial file.
        tmp = self._review / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        tmp.rename(self._review / "new" / name)


async def serve_bounces(
    handler: BounceHandler,
    host: str,
    port: int,
    *,
    bounce_domain: str,
    review_dir: Path,
    prefix: str = "bounces",
    tls_context: ssl.SSLContext | None = None,
    review_days: float = DEFAULT_REVIEW_DAYS,
    review_max_messages: int = DEFAULT_MAX_REVIEW,
    data_size_limit: int = DEFAULT_DATA_LIMIT,
) -> BounceListener:
    """Start a bounce listener on the running loop; the caller stops it."""
    listener = BounceListener(
        handler,
        host=host,
        port=port,
        bounce_domain=bounce_domain,
        review_dir=review_dir,
        prefix=prefix,
        tls_context=tls_context,
        review_days=review_days,
        review_max_messages=review_max_messages,
        data_size_limit=data_size_limit,
    )
    await listener.start()
    return listener


def load_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The listener's STARTTLS context from `bounces.tls_cert` and `bounces.tls_key`;
    ConfigError naming the setting and the kind of failure when they cannot be loaded."""
    for setting, path in (("bounces.tls_cert", cert), ("bounces.tls_key", key)):
        try:
            with path.open("rb"):
                pass
        except OSError as error:
            raise ConfigError(f"{setting}: cannot read {path} ({type(error).__name__})") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # Never OpenSSL's prompt on a terminal: an encrypted key fails to load.
        context.load_cert_chain(cert, key, b"")
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise ConfigError(
            "bounces.tls_cert/bounces.tls_key: cannot be loaded"
            f" ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    return context


def _quiet_aiosmtpd_logging() -> None:
    # aiosmtpd logs envelope addresses at INFO on "mail.log": raise the level unless someone
    # configured that logger on purpose.
    mail_log = logging.getLogger("mail.log")
    if mail_log.level == logging.NOTSET:
        mail_log.setLevel(logging.WARNING)
