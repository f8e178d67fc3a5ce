"""SMTP PIPELINING (RFC 2920): the exact bytes we send, and real transactions with the sandbox.

The sandbox (aiosmtpd) processes pipelined commands in order but does not advertise
PIPELINING; the `pipelining` fixture makes it do so for these tests only.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import Envelope, Session
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    PERIOD_REGEX,
    normalize_message_line_endings,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from eobblast.config import TransportConfig
from eobblast.errors import DeliveryError, ReasonCode
from eobblast.observe import metrics
from eobblast.sandbox import Behaviour, Sandbox, SandboxDomain, TestPki, make_test_pki
from eobblast.sandbox import server as sandbox_server
from eobblast.transport import PoolKey, Transport
from eobblast.transport.pool import (
    _PLAIN_ADDRESS,
    ConnectionNotAvailable,
    SmtpConnection,
    _command_address,
    _data_content,
    _PipelinedSession,
)

SENDER = "eob-notices@payer.test"
MESSAGE = (
    b"X-Probe: 1\r\nFrom: eob-notices@payer.test\r\nTo: someone\r\nSubject: EOB\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
)

# ------------------------------------------------------------------ pure: bytes on the wire


def aiosmtplib_content(data: bytes) -> bytes:
    """What aiosmtplib's `SMTP.data` writes after the 354."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


_PIECES = st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"..", b"\r\n.\r\n", b"a", b" "])


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.binary(max_size=6)), max_size=40).map(b"".join))
@example(b"")
@example(b".")
@example(b".\r\n")
@example(b"a\r\n.\r\n")
@example(b"a\n.\r\n")
@example(b"a\r\n..b\r\n")
@example(b"no final line end")
def test_data_content_is_what_aiosmtplib_sends(data: bytes) -> None:
    assert _data_content(data) == aiosmtplib_content(data)


def test_data_content_stuffs_leading_dots() -> None:
    data = b".first\r\nsecond\r\n.\r\n..two\r\n"
    assert _data_content(data) == b"..first\r\nsecond\r\n..\r\n...two\r\n.\r\n"


@settings(max_examples=300, deadline=None)
@given(st.from_regex(_PLAIN_ADDRESS, fullmatch=True))
def test_plain_addresses_are_quoted_as_aiosmtplib_does(address: str) -> None:
    assert _command_address(address) == quote_address(address).encode("ascii")


def aiosmtplib_address(address: str) -> bytes | None:
    """What aiosmtplib's MAIL or RCPT would put on the line, None where it refuses."""
    try:
        quoted = quote_address(address).encode("ascii")
    except ValueError:
        return None
    return None if COMMAND_INJECTION_REGEX.search(quoted) else quoted


@settings(max_examples=1000, deadline=None)
@given(st.text())
@example("a@b.test\r\nRSET")  # parseaddr keeps only a@b.test: no injection either way
@example("a@b.test> SIZE=1")
@example("a b@c.test")
@example("a@b.test\x00")
@example("zoë@b.test")
@example("Name <a@b.test>")
def test_any_address_is_quoted_or_refused_as_aiosmtplib_does(address: str) -> None:
    expected = aiosmtplib_address(address)
    if expected is None:
        with pytest.raises(ValueError) as caught:
            _command_address(address)
        assert str(caught.value) == "address cannot go on an SMTP command line"
    else:
        assert _command_address(address) == expected


# ------------------------------------------------------------------ scripted server


# What the scripted server answers to one write: bytes, None for silence, HANG_UP for EOF.
Script = Callable[[bytes], bytes | None]
HANG_UP = b""


class ScriptedTransport:
    """Stands in for the TLS transport: records writes, answers each one from a script."""

    def __init__(self, script: Script, *, split: bool = False) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self._script = script
        self._split = split
        self._protocol: _PipelinedSession | None = None

    def set_protocol(self, protocol: _PipelinedSession) -> None:
        self._protocol = protocol

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        answer = self._script(data)
        if answer == HANG_UP:
            self.hang_up()
        elif answer is not None:
            loop = asyncio.get_running_loop()
            assert self._protocol is not None
            # All replies in one read (as Postfix writes them), or one byte per read.
            chunks = [answer[i : i + 1] for i in range(len(answer))] if self._split else [answer]
            for chunk in chunks:
                loop.call_soon(self._protocol.data_received, chunk)

    def hang_up(self) -> None:
        assert self._protocol is not None
        asyncio.get_running_loop().call_soon(self._protocol.eof_received)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def server(
    *,
    mail: bytes = b"250 2.1.0 Ok",
    rcpt: bytes = b"250 2.1.5 Ok",
    data: bytes = b"354 End data with <CR><LF>.<CR><LF>",
    final: bytes | None = b"250 2.0.0 Ok: queued as ABC",
) -> Script:
    """A server that answers a pipelined group, the content, RSET and QUIT."""

    def answer(written: bytes) -> bytes | None:
        if written.startswith(b"MAIL FROM:"):
            return b"\r\n".join((mail, rcpt, data)) + b"\r\n"
        if written == b"RSET\r\n":
            return b"250 2.0.0 Ok\r\n"
        if written == b"QUIT\r\n":
            return b"221 2.0.0 Bye\r\n"
        if written.endswith(b"\r\n.\r\n") or written == b".\r\n":
            return final if final in (None, HANG_UP) else final + b"\r\n"
        raise AssertionError(f"unexpected write {written[:20]!r}")

    return answer


def connection(transport: ScriptedTransport, timeout: float = 5.0) -> SmtpConnection:
    session = _PipelinedSession(transport, timeout)  # type: ignore[arg-type]
    key = PoolKey(None, "127.0.0.1", 25, "mx.test")
    return SmtpConnection(key, aiosmtplib.SMTP(), "TLSv1.3", "TEST", session=session)


def _group(rcpt: str) -> bytes:
    return b"MAIL FROM:<eob-notices@payer.test>\r\nRCPT TO:<" + rcpt.encode() + b">\r\nDATA\r\n"


def _probe(i: int) -> bytes:
    """MESSAGE, told apart by its X-Probe field."""
    return MESSAGE.replace(b"X-Probe: 1", f"X-Probe: {i}".encode())


GROUP = (_group("bob@member.test"), _data_content(MESSAGE))


@pytest.mark.parametrize("split", [False, True])
async def test_group_goes_in_one_write_and_content_after_354(split: bool) -> None:
    transport = ScriptedTransport(server(), split=split)
    conn = connection(transport)
    for _ in range(3):
        reply = await conn.send(SENDER, "bob@member.test", MESSAGE)
        assert (reply.code, reply.enhanced, reply.tls_version) == (250, "2.0.0", "TLSv1.3")
    assert transport.writes == [*GROUP] * 3
    assert conn.messages == 3
    await conn.aclose()
    assert transport.writes[-1] == b"QUIT\r\n" and transport.closed


async def test_refused_recipient_sends_no_content_and_resets() -> None:
    transport = ScriptedTransport(
        server(
            rcpt=b"550 5.1.1 <bob@member.test>: Recipient address rejected",
            data=b"554 5.5.1 Error: no valid recipients",
        )
    )
    conn = connection(transport)
    with pytest.raises(DeliveryError) as caught:
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert caught.value.reason is ReasonCode.RECIPIENT_REJECTED and caught.value.permanent
    assert caught.value.smtp_code == 550 and caught.value.detail == "550 5.1.1"
    assert "bob" not in str(caught.value)
    assert transport.writes == [GROUP[0], b"RSET\r\n"]
    assert conn.is_usable(conn.idle_since, max_messages=10, idle_expiry=10)


@pytest.mark.parametrize(
    ("mail", "rcpt", "reason", "permanent", "code"),
    [
        (b"451 4.3.0 try later", b"503 5.5.1 need MAIL", ReasonCode.TEMPORARY_FAILURE, False, 451),
        (b"553 5.7.1 sender refused", b"503 5.5.1", ReasonCode.MESSAGE_REJECTED, True, 553),
        (b"250 2.1.0 Ok", b"452 4.2.2 mailbox full", ReasonCode.TEMPORARY_FAILURE, False, 452),
    ],
)
async def test_refused_envelope_maps_like_the_stepwise_path(
    mail: bytes, rcpt: bytes, reason: ReasonCode, permanent: bool, code: int
) -> None:
    transport = ScriptedTransport(server(mail=mail, rcpt=rcpt, data=b"503 5.5.1 no recipients"))
    conn = connection(transport)
    with pytest.raises(DeliveryError) as caught:
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert (caught.value.reason, caught.value.permanent, caught.value.smtp_code) == (
        reason,
        permanent,
        code,
    )
    assert transport.writes == [GROUP[0], b"RSET\r\n"]


async def test_data_accepted_after_refused_recipient_gets_an_empty_message() -> None:
    transport = ScriptedTransport(server(rcpt=b"550 5.1.1 unknown", final=b"554 5.5.1 no rcpt"))
    conn = connection(transport)
    with pytest.raises(DeliveryError) as caught:
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert caught.value.reason is ReasonCode.RECIPIENT_REJECTED
    assert transport.writes == [GROUP[0], b".\r\n", b"RSET\r\n"]


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
async def test_421_before_content_means_another_connection(stage: str) -> None:
    replies = {"mail": b"250 ok", "rcpt": b"250 ok", "data": b"354 go", stage: b"421 4.7.0 bye"}
    transport = ScriptedTransport(server(**replies))
    conn = connection(transport)
    with pytest.raises(ConnectionNotAvailable):
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert transport.writes == [GROUP[0]] and transport.closed
    assert not conn.is_usable(conn.idle_since, max_messages=10, idle_expiry=10)


async def test_hang_up_before_content_means_another_connection() -> None:
    transport = ScriptedTransport(lambda written: HANG_UP)
    conn = connection(transport)
    with pytest.raises(ConnectionNotAvailable):
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert transport.writes == [GROUP[0]]


async def test_hang_up_after_content_is_connection_lost() -> None:
    transport = ScriptedTransport(server(final=HANG_UP))
    conn = connection(transport)
    with pytest.raises(DeliveryError) as caught:
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert len(transport.writes) == 2
    assert caught.value.reason is ReasonCode.CONNECTION_LOST and not caught.value.permanent
    assert caught.value.sent  # the receiver may have it: not to be sent elsewhere at once


async def test_silence_is_a_timeout_and_closes() -> None:
    transport = ScriptedTransport(lambda written: None)
    conn = connection(transport, timeout=0.01)
    with pytest.raises(DeliveryError) as caught:
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert caught.value.reason is ReasonCode.TIMEOUT and caught.value.detail == "timeout at mail"
    assert transport.closed


async def test_cancelled_transaction_closes_the_connection() -> None:
    transport = ScriptedTransport(lambda written: None)
    conn = connection(transport)
    task = asyncio.create_task(conn.send(SENDER, "bob@member.test", MESSAGE))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Its replies may still come: they must never be read as another message's.
    assert transport.closed
    assert not conn.is_usable(conn.idle_since, max_messages=10, idle_expiry=10)


async def test_rejected_content_resets_and_421_after_content_closes() -> None:
    transport = ScriptedTransport(server(final=b"554 5.7.1 spam"))
    conn = connection(transport)
    with pytest.raises(DeliveryError) as caught:
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert caught.value.reason is ReasonCode.MESSAGE_REJECTED and caught.value.permanent
    assert transport.writes[-1] == b"RSET\r\n"

    transport = ScriptedTransport(server(final=b"421 4.3.2 shutting down"))
    conn = connection(transport)
    with pytest.raises(DeliveryError) as caught:
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    # The content was sent: retrying elsewhere could deliver it twice, so no new connection.
    assert caught.value.reason is ReasonCode.TEMPORARY_FAILURE and caught.value.smtp_code == 421
    assert transport.closed


async def test_multiline_and_malformed_replies() -> None:
    multiline = server(final=b"250-2.0.0 first line\r\n250-more\r\n250 2.0.0 Ok: queued")
    reply = await connection(ScriptedTransport(multiline)).send(SENDER, "b@m.test", MESSAGE)
    assert (reply.code, reply.enhanced) == (250, "2.0.0")

    for garbage in (b"hello, this is not SMTP", b"250-" + b"x" * 40_000):
        transport = ScriptedTransport(server(mail=garbage))
        with pytest.raises(ConnectionNotAvailable):
            await connection(transport).send(SENDER, "b@m.test", MESSAGE)
        assert transport.closed


async def test_unsolicited_reply_makes_an_idle_connection_unusable() -> None:
    transport = ScriptedTransport(server())
    conn = connection(transport)
    await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert conn.is_usable(conn.idle_since, max_messages=10, idle_expiry=10)
    assert conn.session is not None
    conn.session.data_received(b"421 4.4.2 idle timeout\r\n")
    assert not conn.is_usable(conn.idle_since, max_messages=10, idle_expiry=10)


# ------------------------------------------------------------------ handed over (RFC 2920 3.1)


def handover_server(finals: list[bytes | None]) -> Script:
    """Answers a write that may hold one message's content and the next one's commands:
    the content's final reply (the next of `finals`; None: silence) and the group's."""
    group_ok = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data\r\n"

    def answer(written: bytes) -> bytes | None:
        if written == b"QUIT\r\n":
            return b"221 2.0.0 Bye\r\n"
        if written.startswith(b"MAIL FROM:"):
            return group_ok
        content, end, group = written.partition(b"\r\n.\r\n")
        assert end and content, f"unexpected write {written[:20]!r}"
        final = finals.pop(0)
        if final is None:
            return None
        return final + b"\r\n" + (group_ok if group.startswith(b"MAIL FROM:") else b"")

    return answer


def hand_to(
    conn: SmtpConnection,
    rcpt: str,
    message: bytes,
    *,
    during_hold: Callable[[], object] | None = None,
) -> list[asyncio.Task[Any]]:
    """Make `conn` hand itself over once, as the pool does: the next caller's transaction
    starts (on the next turn of the loop) as the content goes. `during_hold` runs on that
    turn too, while the content is still held back."""
    started: list[asyncio.Task[Any]] = []

    def offer(_: SmtpConnection) -> bool:
        if started:
            return False
        if during_hold is not None:
            asyncio.get_running_loop().call_soon(during_hold)
        started.append(asyncio.create_task(conn.send(SENDER, rcpt, message)))
        return True

    conn.offer_next = offer
    return started


SECOND = _probe(2)


async def test_handed_connection_sends_its_commands_with_the_content() -> None:
    transport = ScriptedTransport(handover_server([b"250 2.0.0 first", b"250 2.6.0 second"]))
    conn = connection(transport)
    second = hand_to(conn, "carol@member.test", SECOND)
    first = await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert (first.code, first.enhanced) == (250, "2.0.0")
    assert ((await second[0]).code, (await second[0]).enhanced) == (250, "2.6.0")
    # Three writes for two messages: the second's MAIL, RCPT and DATA rode with the
    # first's content, and its replies were read after the first's final reply.
    assert transport.writes == [
        _group("bob@member.test"),
        _data_content(MESSAGE) + _group("carol@member.test"),
        _data_content(SECOND),
    ]
    assert conn.messages == 2


async def test_refused_content_before_a_handover_sends_no_rset() -> None:
    transport = ScriptedTransport(handover_server([b"554 5.7.1 spam", b"250 2.0.0 Ok"]))
    conn = connection(transport)
    second = hand_to(conn, "carol@member.test", SECOND)
    with pytest.raises(DeliveryError) as caught:
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert caught.value.reason is ReasonCode.MESSAGE_REJECTED
    # RSET would have landed in the second message's content, after its DATA.
    assert (await second[0]).code == 250
    assert b"RSET" not in b"".join(transport.writes)
    assert conn.is_usable(conn.idle_since, max_messages=10, idle_expiry=10)


async def test_421_to_the_content_sends_the_handed_message_elsewhere() -> None:
    transport = ScriptedTransport(handover_server([b"421 4.3.2 shutting down"]))
    conn = connection(transport)
    second = hand_to(conn, "carol@member.test", SECOND)
    with pytest.raises(DeliveryError) as caught:
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    assert caught.value.smtp_code == 421 and transport.closed
    # Only its commands went: another connection may carry it without a duplicate.
    with pytest.raises(ConnectionNotAvailable):
        await second[0]
    assert transport.writes[-1] == _data_content(MESSAGE) + _group("carol@member.test")


async def test_handed_caller_cancelled_leaves_the_first_its_reply() -> None:
    transport = ScriptedTransport(handover_server([None]))
    conn = connection(transport)
    second = hand_to(conn, "carol@member.test", SECOND)
    first = asyncio.create_task(conn.send(SENDER, "bob@member.test", MESSAGE))
    for _ in range(5):  # the group, its replies, then two turns until the held write
        await asyncio.sleep(0)
    assert len(transport.writes) == 2
    second[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await second[0]
    assert not transport.closed  # the first still waits for its final reply
    # From the cancellation on, nobody may take the connection: the second's DATA is open.
    assert not conn.is_usable(conn.idle_since, max_messages=10, idle_expiry=10)
    assert conn.session is not None
    conn.session.data_received(b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
    assert (await first).code == 250
    await asyncio.sleep(0)
    # The second's replies came, unread: the session ends rather than give them to a third.
    assert transport.closed


async def test_first_caller_gone_before_reading_its_reply_fails_the_handed_one_cleanly() -> None:
    transport = ScriptedTransport(handover_server([None]))
    conn = connection(transport)
    second = hand_to(conn, "carol@member.test", SECOND)
    first = asyncio.create_task(conn.send(SENDER, "bob@member.test", MESSAGE))
    for _ in range(5):
        await asyncio.sleep(0)
    assert conn.session is not None and len(transport.writes) == 2
    # Every reply arrives, and the first caller is cancelled in the same turn: its final
    # reply stays unread. The second must not take it for the reply to its MAIL.
    conn.session.data_received(b"554 5.7.1 first refused\r\n250 Ok\r\n250 Ok\r\n354 go\r\n")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(ConnectionNotAvailable):  # not sent: another connection carries it
        await second[0]
    assert transport.closed


async def test_421_to_handed_commands_reaches_the_handed_caller_after_a_hang_up() -> None:
    # The first message is taken; the server refuses the second's MAIL with 421 (too many
    # messages on this connection, say) and hangs up at once. The handed caller must still
    # read that 421: shaping learns from its code.
    loop = asyncio.get_running_loop()
    transport: ScriptedTransport

    def answer(written: bytes) -> bytes | None:
        if written.startswith(b"MAIL FROM:"):
            return b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data\r\n"
        loop.call_soon(transport.hang_up)  # the end of the stream right after the replies
        return b"250 2.0.0 Ok\r\n421 4.7.0 too many messages\r\n"

    transport = ScriptedTransport(answer)
    conn = connection(transport)
    second = hand_to(conn, "carol@member.test", SECOND)
    assert (await conn.send(SENDER, "bob@member.test", MESSAGE)).code == 250
    with pytest.raises(ConnectionNotAvailable) as caught:
        await second[0]
    assert (caught.value.code, caught.value.enhanced) == (421, "4.7.0")
    assert caught.value.messages == 1


async def test_first_caller_cancelled_while_its_content_is_held_sends_nothing() -> None:
    transport = ScriptedTransport(handover_server([]))
    conn = connection(transport)
    tasks: list[asyncio.Task[Any]] = []
    second = hand_to(conn, "carol@member.test", SECOND, during_hold=lambda: tasks[0].cancel())
    tasks.append(asyncio.create_task(conn.send(SENDER, "bob@member.test", MESSAGE)))
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    with pytest.raises(ConnectionNotAvailable):
        await second[0]
    # Cancelled before its content left: none of it went, nor the second's commands.
    assert transport.writes == [_group("bob@member.test")] and transport.closed


async def test_session_ended_while_content_is_held_means_not_sent() -> None:
    transport = ScriptedTransport(handover_server([]))
    conn = connection(transport)

    def hang_up() -> None:
        assert conn.session is not None
        conn.session.eof_received()

    second = hand_to(conn, "carol@member.test", SECOND, during_hold=hang_up)
    # The content never left: not "lost during DATA" (maybe delivered), but unsent.
    with pytest.raises(ConnectionNotAvailable):
        await conn.send(SENDER, "bob@member.test", MESSAGE)
    with pytest.raises(ConnectionNotAvailable):
        await second[0]
    assert transport.writes == [_group("bob@member.test")]


# ------------------------------------------------------------------ against the sandbox


OK = "pipe.sandbox.test"
CLOSER = "pipecloser.sandbox.test"
CLOSE_AFTER = 3
DOMAINS = [
    SandboxDomain(OK, "127.0.13.1", recipient_rules=(("unknown-", Behaviour.REJECT),)),
    SandboxDomain(CLOSER, "127.0.13.2", close_after=CLOSE_AFTER),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"), [d.name for d in DOMAINS])


@pytest.fixture
def pipelining(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the sandbox's EHLO reply offer PIPELINING, as real MXs do."""

    async def handle_EHLO(
        self: Any,
        server: Any,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument hook
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    monkeypatch.setattr(sandbox_server._DomainHandler, "handle_EHLO", handle_EHLO, raising=False)


@pytest.fixture
async def sandbox(tmp_path: Path, pki: TestPki, pipelining: None) -> AsyncIterator[Sandbox]:
    async with Sandbox(DOMAINS, tmp_path / "mail", pki) as running:
        yield running


def _transport(sandbox: Sandbox, pki: TestPki, **settings: object) -> Transport:
    routes = {name: f"{host}:{port}" for name, (host, port) in sandbox.routes.items()}
    config = TransportConfig(ca_bundle=pki.ca, routes=routes, **settings)  # type: ignore[arg-type]
    return Transport.from_config(config)


def _connects() -> float:
    return float(metrics.SMTP_CONNECTS.labels("ok")._value.get())


def _stored(path: Path) -> bytes:
    """A stored message without the sandbox's Received field (the first field, folded)."""
    raw = path.read_bytes()
    match = re.match(rb"Received: [^\r]*\r\n(?:\t[^\r]*\r\n)*", raw)
    assert match is not None
    return raw[match.end() :]


async def test_sandbox_session_is_pipelined(sandbox: Sandbox, pki: TestPki) -> None:
    transport = _transport(sandbox, pki, max_connections_per_destination=2)
    host, port = sandbox.routes[OK]
    async with transport.pool.connection(PoolKey(None, host, port, OK)) as conn:
        assert conn.session is not None  # the pipelined path, not aiosmtplib's commands
        await conn.send(SENDER, f"first@{OK}", MESSAGE)
    replies = await asyncio.gather(
        *(transport.deliver(SENDER, f"m{i}@{OK}", MESSAGE) for i in range(30))
    )
    await transport.aclose()
    assert {(r.code, r.enhanced) for r in replies} == {(250, "2.0.0")}
    assert sandbox.counts[OK] == 31
    assert all(_stored(r.path) == MESSAGE for r in sandbox.received)
    assert all(r.tls_version in ("TLSv1.2", "TLSv1.3") for r in sandbox.received)


async def test_sandbox_rejected_recipient_then_success_on_the_same_connection(
    sandbox: Sandbox, pki: TestPki
) -> None:
    transport = _transport(sandbox, pki, max_connections_per_destination=1)
    before = _connects()
    with pytest.raises(DeliveryError) as rejected:
        await transport.deliver(SENDER, f"unknown-bob@{OK}", MESSAGE)
    assert rejected.value.reason is ReasonCode.RECIPIENT_REJECTED and rejected.value.permanent
    assert rejected.value.detail == "550 5.1.1"
    assert "unknown-bob" not in str(rejected.value)
    reply = await transport.deliver(SENDER, f"bob@{OK}", MESSAGE)
    await transport.aclose()
    assert reply.code == 250
    assert _connects() - before == 1
    assert [r.rcpt_tos for r in sandbox.received] == [(f"bob@{OK}",)]


async def test_sandbox_421_after_k_messages_moves_to_a_fresh_connection(
    sandbox: Sandbox, pki: TestPki
) -> None:
    transport = _transport(sandbox, pki, max_connections_per_destination=1)
    before = _connects()
    for i in range(CLOSE_AFTER * 3 + 1):
        reply = await transport.deliver(SENDER, f"m{i}@{CLOSER}", MESSAGE)
        assert reply.code == 250
    await transport.aclose()
    assert sandbox.counts[CLOSER] == CLOSE_AFTER * 3 + 1
    assert _connects() - before == 4  # three full connections, then a fourth for the last


async def test_sandbox_lines_starting_with_dots_arrive_intact(
    sandbox: Sandbox, pki: TestPki
) -> None:
    message = MESSAGE + b".\r\n..\r\n.leading dot\r\n..two dots\r\nend.\r\n.\r\n"
    transport = _transport(sandbox, pki)
    await transport.deliver(SENDER, f"dots@{OK}", message)
    await transport.deliver(SENDER, f"bare@{OK}", b".starts with a dot\r\n.")
    await transport.aclose()
    first, second = sandbox.received
    assert _stored(first.path) == message
    assert _stored(second.path) == b".starts with a dot\r\n.\r\n"  # given its final CRLF


def _handovers() -> float:
    return float(metrics.SMTP_HANDOVERS._value.get())


def _active() -> float:
    return float(metrics.CONNECTIONS_ACTIVE._value.get())


async def test_sandbox_busy_connection_hands_itself_to_the_next_message(
    sandbox: Sandbox, pki: TestPki
) -> None:
    transport = _transport(sandbox, pki, max_connections_per_destination=1)
    before, handed, active = _connects(), _handovers(), _active()
    rcpts = [f"unknown-{i}@{OK}" if i % 5 == 3 else f"m{i}@{OK}" for i in range(20)]
    results = await asyncio.gather(
        *(transport.deliver(SENDER, rcpt, _probe(i)) for i, rcpt in enumerate(rcpts)),
        return_exceptions=True,
    )
    await transport.aclose()
    for rcpt, result in zip(rcpts, results, strict=True):
        if rcpt.startswith("unknown-"):
            assert isinstance(result, DeliveryError)
            assert result.reason is ReasonCode.RECIPIENT_REJECTED
        else:
            assert not isinstance(result, BaseException) and result.code == 250
    # One connection, handed to the next message waiting by every message that sent its
    # content, but the last (a refused recipient sends none, and hands nothing over).
    sent = [rcpt for rcpt in rcpts if not rcpt.startswith("unknown-")]
    assert _connects() - before == 1
    assert _handovers() - handed == len(sent) - 1
    # Each message reached the recipient it was meant for, intact.
    by_rcpt = {r.rcpt_tos: _stored(r.path) for r in sandbox.received}
    expected = {(rcpt,): _probe(i) for i, rcpt in enumerate(rcpts) if rcpt.startswith("m")}
    assert by_rcpt == expected
    assert _active() == active


async def test_sandbox_handovers_keep_the_messages_per_connection_limit(
    sandbox: Sandbox, pki: TestPki
) -> None:
    transport = _transport(
        sandbox, pki, max_connections_per_destination=1, max_messages_per_connection=3
    )
    before, handed = _connects(), _handovers()
    replies = await asyncio.gather(
        *(transport.deliver(SENDER, f"m{i}@{OK}", _probe(i)) for i in range(10))
    )
    await transport.aclose()
    assert {r.code for r in replies} == {250}
    assert sandbox.counts[OK] == 10
    # 3 + 3 + 3 + 1: within each connection the second and third were handed over.
    assert _connects() - before == 4
    assert _handovers() - handed == 6


async def test_sandbox_421_to_a_handed_message_moves_it_to_a_fresh_connection(
    sandbox: Sandbox, pki: TestPki
) -> None:
    transport = _transport(sandbox, pki, max_connections_per_destination=1)
    replies = await asyncio.gather(
        *(transport.deliver(SENDER, f"m{i}@{CLOSER}", _probe(i)) for i in range(CLOSE_AFTER * 3))
    )
    await transport.aclose()
    assert {r.code for r in replies} == {250}
    # Each message once: a 421 to commands sent with another's content sends nothing twice.
    assert sorted(r.rcpt_tos for r in sandbox.received) == sorted(
        (f"m{i}@{CLOSER}",) for i in range(CLOSE_AFTER * 3)
    )


async def test_sandbox_handed_caller_cancelled_gives_the_connection_back(
    sandbox: Sandbox, pki: TestPki
) -> None:
    transport = _transport(sandbox, pki, max_connections_per_destination=1)
    pool = transport.pool
    offer = pool._offer_next
    waiting: list[asyncio.Task[Any]] = []

    def offer_then_cancel(conn: SmtpConnection) -> bool:
        handed = offer(conn)
        if handed:
            waiting[0].cancel()  # handed the connection, cancelled before it could take it
        return handed

    pool._offer_next = offer_then_cancel  # type: ignore[method-assign]
    before, active = _connects(), _active()
    first = asyncio.create_task(transport.deliver(SENDER, f"first@{OK}", MESSAGE))
    waiting.append(asyncio.create_task(transport.deliver(SENDER, f"second@{OK}", SECOND)))
    assert (await first).code == 250
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    # The connection came back whole: idle, and the next message takes it.
    assert pool.open_connections == 1 and _active() == active
    assert (await transport.deliver(SENDER, f"third@{OK}", MESSAGE)).code == 250
    await transport.aclose()
    assert _connects() - before == 1
    assert [r.rcpt_tos for r in sandbox.received] == [(f"first@{OK}",), (f"third@{OK}",)]
