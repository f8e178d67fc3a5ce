"""The bounce listener over real SMTP: VERP recipients only, mapping, the review pile, 451s,
452s when the review pile is full, STARTTLS and its settings."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import json
import logging
import os
import quopri
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import tomli_w

from eobblast._net import is_loopback
from eobblast.bounces import listener as listener_module
from eobblast.bounces.category import BounceCategory
from eobblast.bounces.dsn import BounceKind
from eobblast.bounces.inbound import InboundBounce, MappedBy, ReviewReason, read_bounce
from eobblast.bounces.listener import (
    MAX_RECIPIENTS,
    MAX_REVIEW_BYTES,
    REDACTED,
    BounceListener,
    load_tls_context,
    serve_bounces,
    without_notice_bodies,
)
from eobblast.bounces.verp import VerpKey, make_return_path
from eobblast.errors import ConfigError
from eobblast.events import EobIssued, validate_event
from eobblast.events.synthetic import generate_events
from eobblast.observe.metrics import REGISTRY
from eobblast.render.mime import Renderer
from eobblast.sandbox import Behaviour, delivery_status_notification, make_test_pki

ROOT = Path(__file__).parents[2]
CORPUS = next(
    (
        c
        for c in (
            ROOT.parent / "shared" / "corpora" / "sisimai-set-of-emails",
            Path("/work/shared/corpora/sisimai-set-of-emails"),
        )
        if (c / "maildir").is_dir()
    ),
    None,
)
KEY = VerpKey(3, b"listener-test-secret-0123456789")
DOMAIN = "bounce.test"
HOST = "127.0.0.1"


class Recorder:
    """The handler: read and map each report (as BounceService.on_dsn does) and keep it."""

    def __init__(self) -> None:
        self.seen: list[InboundBounce] = []
        self.fail = False
        self.called = asyncio.Event()  # set at the first message handed over

    async def __call__(self, raw: bytes, envelope_to: str) -> InboundBounce:
        self.called.set()
        if self.fail:
            raise ConnectionError("store down")
        inbound = await read_bounce(raw, envelope_to, keys=[KEY], bounce_domain=DOMAIN)
        self.seen.append(inbound)
        return inbound


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def listener(recorder: Recorder, tmp_path: Path) -> AsyncIterator[BounceListener]:
    running = await serve_bounces(
        recorder, HOST, 0, bounce_domain=DOMAIN, review_dir=tmp_path / "review"
    )
    try:
        yield running
    finally:
        await running.stop()


async def send(listener: BounceListener, raw: bytes, rcpt: str) -> None:
    # A DSN comes from the null sender (aiosmtplib.send() refuses one; sendmail() does not).
    async with aiosmtplib.SMTP(hostname=HOST, port=listener.port, timeout=10) as smtp:
        await smtp.sendmail("", [rcpt], raw)


def dsn_for(event_id: str, address: str, *, to: str | None = None) -> bytes:
    headers = f"To: {address}\r\nX-EOB-Event-ID: {event_id}\r\n\r\n"
    return delivery_status_notification(
        behaviour=Behaviour.BOUNCE_LATER,
        reporting_mta="mx.example.net",
        return_path=to or make_return_path(event_id, KEY, DOMAIN),
        recipient=address,
        returned_headers=headers.encode(),
        arrival=dt.datetime.now(dt.UTC),
        queue_id="Q",
    )


def review_files(listener: BounceListener) -> list[Path]:
    return sorted((listener.review_dir / "new").iterdir())


def new_listener(
    recorder: Recorder, review_dir: Path, *, host: str = HOST, **options: Any
) -> BounceListener:
    """A listener on a free port, not started (`async with` it)."""
    return BounceListener(
        recorder, host=host, port=0, bounce_domain=DOMAIN, review_dir=review_dir, **options
    )


async def test_verp_dsn_is_mapped_to_its_event(
    listener: BounceListener, recorder: Recorder
) -> None:
    event_id = str(uuid.uuid4())
    await send(
        listener, dsn_for(event_id, "gone@example.org"), make_return_path(event_id, KEY, DOMAIN)
    )
    [inbound] = recorder.seen
    assert (inbound.event_id, inbound.mapped_by) == (event_id, MappedBy.VERP)
    assert inbound.parsed.category is BounceCategory.HARD_ADDRESS
    assert inbound.review_reason is None
    assert review_files(listener) == []
    assert listener.stats["handled"] == 1


async def test_tampered_token_falls_back_to_the_returned_header(
    listener: BounceListener, recorder: Recorder
) -> None:
    event_id = "claim-2026-000123"
    good = make_return_path(event_id, KEY, DOMAIN)
    local, _, domain = good.partition("@")
    flipped = local[:-1] + ("a" if local[-1] != "a" else "b")
    tampered = f"{flipped}@{domain}"
    await send(listener, dsn_for(event_id, "gone@example.org", to=tampered), tampered)
    [inbound] = recorder.seen
    assert (inbound.event_id, inbound.mapped_by) == (event_id, MappedBy.HEADER)


async def test_non_verp_recipients_get_550(listener: BounceListener, recorder: Recorder) -> None:
    for rcpt in ("postmaster@bounce.test", "bounces@bounce.test", "bounces+short@bounce.test"):
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await send(listener, b"Subject: x\r\n\r\nhi\r\n", rcpt)
        assert refused.value.recipients[0].code == 550
    ok = make_return_path("ev-1", KEY, DOMAIN)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(listener, b"Subject: x\r\n\r\nhi\r\n", ok.replace(DOMAIN, "elsewhere.test"))
    assert recorder.seen == [] and listener.stats["rejected_recipient"] == 4


async def test_unreadable_and_unmapped_messages_go_to_review(
    listener: BounceListener, recorder: Recorder
) -> None:
    rcpt = make_return_path("ev-review", KEY, DOMAIN)
    await send(listener, b"Subject: hello\r\n\r\njust chatting\r\n", rcpt)
    garbage = b"\x00\xff" * 50 + b"\r\n--\r\nContent-Type: multipart/report; boundary=\r\n\r\n"
    await send(listener, garbage, rcpt)
    # A real bounce for nothing of ours: a person should see it.
    unmapped = delivery_status_notification(
        behaviour=Behaviour.BOUNCE_LATER,
        reporting_mta="mx.example.net",
        return_path="someone@else.test",
        recipient="gone@example.org",
        returned_headers=b"To: gone@example.org\r\n\r\n",
        arrival=dt.datetime.now(dt.UTC),
        queue_id="Q",
    )
    tampered = "bounces+" + "a" * 30 + "@" + DOMAIN
    await send(listener, unmapped, tampered)
    reasons = [i.review_reason for i in recorder.seen]
    assert reasons[0] is ReviewReason.NOT_RECOGNISED
    assert reasons[2] is ReviewReason.UNMAPPED
    files = review_files(listener)
    assert len(files) == 3
    assert all(f.read_bytes().startswith(b"X-EOB-Review-Reason: ") for f in files)
    assert oct(listener.review_dir.stat().st_mode & 0o777) == "0o700"
    assert listener.stats["review"] == 3


def returned_notice() -> tuple[EobIssued, bytes]:
    """A notice as eobblast sends it (TLS-required: its PHI in the body), and its bytes."""
    for raw in generate_events(20, seed=11, domains=["member.example.org"], weights=None):
        event = validate_event(raw, allow_test_domains=True)
        if isinstance(event, EobIssued) and event.member.name.isascii():
            return event, Renderer().render(event).to_bytes()
    raise AssertionError("no event with an ASCII name")


def decoded_parts(raw: bytes) -> list[bytes]:
    """Every MIME part of a message as a reader would see it, transfer encoding undone."""
    message = email.message_from_bytes(raw)
    return [
        payload
        for part in message.walk()
        if isinstance(payload := part.get_payload(decode=True), bytes)
    ]


class UnknownEvent:
    """What BounceService.on_dsn says of a report about a notice it no longer knows."""

    review_reason = ReviewReason.UNKNOWN_EVENT


async def unknown_event(raw: bytes, envelope_to: str) -> UnknownEvent:
    return UnknownEvent()


async def test_review_copies_keep_the_headers_of_a_returned_notice_not_its_body(
    tmp_path: Path,
) -> None:
    event, notice = returned_notice()
    assert event.member.name.encode() in notice  # the PHI a careless copy would keep
    # An MTA that ignores RET=HDRS returns it whole (message/rfc822), one that predates
    # DSNs quotes it in plain text, perhaps with "> " before each line.
    full = (
        b"From: MAILER-DAEMON@mx.example.net\r\nTo: x@bounce.test\r\n"
        b"Subject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: text/plain\r\n\r\nThe mailbox is gone.\r\n"
        b"--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.example.net\r\n\r\nFinal-Recipient: rfc822; "
        + event.member.email.encode()
        + b"\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"--B\r\nContent-Type: message/rfc822\r\n\r\n" + notice + b"\r\n--B--\r\n"
    )
    # Others wrap the returned copy in a quoted-printable or base64 part, where a byte
    # search for its boundary lines finds "=3D_eob_" or nothing at all.
    encoded = [
        full.replace(
            b"--B\r\nContent-Type: message/rfc822\r\n\r\n" + notice,
            b"--B\r\nContent-Type: text/rfc822-headers\r\n"
            b"Content-Transfer-Encoding: " + name + b"\r\n\r\n" + encode(notice),
        )
        for name, encode in (
            (b"quoted-printable", quopri.encodestring),
            (b"base64", lambda data: base64.encodebytes(data).replace(b"\n", b"\r\n")),
        )
    ]
    assert all(b"--=_eob_" not in raw for raw in encoded)  # the boundary lines are hidden
    legacy = b"Subject: failure notice\r\n\r\nSorry, it did not work out.\r\n\r\n" + notice
    quoted = b"Subject: returned\r\n\r\nGone:\r\n" + b"".join(
        b"> " + line for line in notice.splitlines(keepends=True)
    )
    rcpt = make_return_path(event.event_id, KEY, DOMAIN)
    async with BounceListener(
        unknown_event, host=HOST, port=0, bounce_domain=DOMAIN, review_dir=tmp_path / "r"
    ) as listener:
        for raw in (full, legacy, quoted, *encoded):
            await send(listener, raw, rcpt)
    files = review_files(listener)
    assert len(files) == 5
    for path in files:
        kept = path.read_bytes()
        readable = kept + b"".join(decoded_parts(kept))
        assert event.member.name.encode() not in readable
        assert event.claim.patient_name.encode() not in readable
        assert REDACTED in kept
        assert f"X-EOB-Event-ID: {event.event_id}".encode() in kept  # what a person needs
    assert b"Status: 5.1.1" in files[0].read_bytes()


def all_readable_text(raw: bytes) -> str:
    """Everything a person could read in a kept file: its bytes, and every part decoded
    from its transfer encoding and its charset."""
    texts = [raw.decode("latin-1")]
    for part in email.message_from_bytes(raw).walk():
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            texts.append(payload.decode(part.get_content_charset() or "latin-1", "replace"))
    return "\n".join(texts)


def test_notices_in_any_wrapping_leave_nothing_readable_in_a_review_copy() -> None:
    event, notice = returned_notice()
    name = event.member.name
    head = (
        b"From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered Mail\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/report; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: text/plain\r\n\r\nThe mailbox is gone.\r\n"
    )

    def part(headers: bytes, body: bytes) -> bytes:
        return head + b"--B\r\n" + headers + b"\r\n\r\n" + body + b"\r\n--B--\r\n"

    def b64(data: bytes) -> bytes:
        return base64.encodebytes(data).replace(b"\n", b"\r\n")

    shapes = {
        # quoted-printable text in a part that says 7bit: "=3D_eob_", no boundary lines
        "qp labelled 7bit": part(
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 7bit",
            quopri.encodestring(notice),
        ),
        "quoted with '| '": part(
            b"Content-Type: text/plain",
            b"".join(b"| " + line for line in notice.splitlines(keepends=True)),
        ),
        "message/rfc822 in base64": part(
            b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64", b64(notice)
        ),
        "encoding with a comment": part(
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64 (the copy)",
            b64(notice),
        ),
        "utf-16 text": part(
            b"Content-Type: text/plain; charset=utf-16\r\nContent-Transfer-Encoding: base64",
            b64(notice.decode("utf-8").encode("utf-16")),
        ),
        "an unknown encoding": part(
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-gzip64", b64(notice)
        ),
        "no blank line at all": b"Subject: x\r\n" + notice.replace(b"\r\n\r\n", b"\r\n"),
    }
    for shape, raw in shapes.items():
        # The PHI a careless copy would keep (where the encoding is non-standard, a reader
        # decodes it by hand: its base64 text is there).
        assert name in all_readable_text(raw) or b64(notice)[:76] in raw, shape
        kept = without_notice_bodies(raw)
        assert name not in all_readable_text(kept), shape
        assert b64(notice)[:76] not in kept, shape
        assert REDACTED.strip() in kept or b"part that may hold" in kept, shape


async def test_a_message_is_parsed_for_at_most_ten_recipients(
    listener: BounceListener, recorder: Recorder
) -> None:
    # Every recipient costs a parse of the whole message on the event loop: 100 of them
    # on one large report would stall the listener. A repeated one is accepted once.
    event_ids = [str(uuid.uuid4()) for _ in range(12)]
    rcpts = [make_return_path(event_id, KEY, DOMAIN) for event_id in event_ids]
    async with aiosmtplib.SMTP(hostname=HOST, port=listener.port, timeout=10) as smtp:
        refused, _ = await smtp.sendmail(
            "", [rcpts[0], *rcpts], dsn_for(event_ids[0], "gone@example.org")
        )
    assert {address: code for address, (code, _) in refused.items()} == {
        address: 452 for address in rcpts[MAX_RECIPIENTS:]
    }
    assert [inbound.envelope_to for inbound in recorder.seen] == rcpts[:MAX_RECIPIENTS]


async def test_a_large_report_kept_for_review_is_cut_to_size(
    listener: BounceListener, recorder: Recorder
) -> None:
    junk = b"Subject: hello\r\n\r\n" + b"just chatting, at length\r\n" * 60_000
    await send(listener, junk, "bounces+" + "d" * 30 + "@" + DOMAIN)
    [kept] = review_files(listener)
    data = kept.read_bytes()
    assert len(junk) > 4 * MAX_REVIEW_BYTES
    assert MAX_REVIEW_BYTES < len(data) < MAX_REVIEW_BYTES + 200
    assert f"X-EOB-Review-Truncated: {len(junk)} bytes".encode() in data


def many_tiny_parts(parts: int) -> bytes:
    """A message of many tiny base64 parts: cheap to send, slow for a MIME parser."""
    part = b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nQUFB\r\n"
    return (
        b"From: someone@else.test\r\nSubject: not a report\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + part * parts + b"--b--\r\n"
    )


async def test_a_message_of_thousands_of_parts_goes_to_review_unread(
    listener: BounceListener, recorder: Recorder
) -> None:
    # 20,000 parts in 1.5 MB: parsed and cut for review, it held the event loop for seconds,
    # once per recipient. No report has more than a handful of parts: it is not read.
    junk = many_tiny_parts(20_000)
    rcpts = [make_return_path(f"ev-parts-{n}", KEY, DOMAIN) for n in range(MAX_RECIPIENTS)]
    async with aiosmtplib.SMTP(hostname=HOST, port=listener.port, timeout=60) as smtp:
        refused, reply = await smtp.sendmail("", rcpts, junk)
    assert refused == {} and reply.startswith("2.0.0")
    assert {i.review_reason for i in recorder.seen} == {ReviewReason.TOO_MANY_PARTS}
    [kept] = review_files(listener)
    assert kept.read_bytes().startswith(b"X-EOB-Review-Reason: too_many_parts\r\n")
    assert b"Subject: not a report" in kept.read_bytes() and b"QUFB" not in kept.read_bytes()
    # And a real report right after is read and mapped as ever.
    event_id = str(uuid.uuid4())
    rcpt = make_return_path(event_id, KEY, DOMAIN)
    await send(listener, dsn_for(event_id, "gone@example.org"), rcpt)
    assert (recorder.seen[-1].event_id, recorder.seen[-1].mapped_by) == (event_id, MappedBy.VERP)


def slow_to_read(size: int) -> bytes:
    """A report of one quoted-printable part, its soft line breaks making one long line of
    addresses: a few parts, under the size limit, yet a while for the parser."""
    line = b"see user@example.com 550 5.1.1 =\r\n"
    return (
        b"From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered Mail\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=r\r\n\r\n"
        b"--r\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        + line * (size // len(line))
        + b"\r\n--r--\r\n"
    )


async def test_a_slow_message_does_not_hold_up_the_next_report(
    listener: BounceListener, recorder: Recorder
) -> None:
    # The parse ran on the event loop: while one message was read (once per recipient),
    # no other MTA got an answer, and the store's connections waited too.
    rcpts = [make_return_path(f"ev-slow-{n}", KEY, DOMAIN) for n in range(4)]

    async def send_slow() -> None:
        async with aiosmtplib.SMTP(hostname=HOST, port=listener.port, timeout=120) as smtp:
            await smtp.sendmail("", rcpts, slow_to_read(1_200_000))

    slow = asyncio.create_task(send_slow())
    try:
        await asyncio.wait_for(recorder.called.wait(), 30)
        event_id = str(uuid.uuid4())
        await send(
            listener, dsn_for(event_id, "gone@example.org"), make_return_path(event_id, KEY, DOMAIN)
        )
        # Answered while the slow one is still being read, not after it.
        assert not slow.done()
        assert event_id in [i.event_id for i in recorder.seen]
    finally:
        await slow
    assert len(recorder.seen) == len(rcpts) + 1


async def test_a_message_over_the_size_limit_is_refused(recorder: Recorder, tmp_path: Path) -> None:
    # Reports are a few KiB (tens, returning a whole notice); ten megabytes of junk cost a
    # parse each. 552: the sender knows it was refused, nothing is taken and lost.
    big = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 40_000  # 3.2 MB
    async with new_listener(recorder, tmp_path / "review") as listener:
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await send(listener, big, make_return_path("ev-big", KEY, DOMAIN))
        assert refused.value.code == 552
    assert recorder.seen == []
    # `[bounces] max_message_bytes` sets it.
    async with new_listener(recorder, tmp_path / "r2", data_size_limit=4_000_000) as listener:
        await send(listener, big, make_return_path("ev-big", KEY, DOMAIN))
    assert len(recorder.seen) == 1


async def test_review_files_are_deleted_after_review_days(
    recorder: Recorder, tmp_path: Path
) -> None:
    listener = new_listener(recorder, tmp_path / "r", review_days=2)
    async with listener:
        await send(
            listener,
            b"Subject: hello\r\n\r\njust chatting\r\n",
            "bounces+" + "c" * 30 + "@" + DOMAIN,
        )
        [recent] = review_files(listener)
        old = listener.review_dir / "new" / "old-one"
        old.write_bytes(b"X-EOB-Review-Reason: not_recognised\r\n\r\nold\r\n")
        three_days_ago = recent.stat().st_mtime - 3 * 86400
        os.utime(old, (three_days_ago, three_days_ago))
        assert listener.sweep_review() == 1
        assert review_files(listener) == [recent]


async def test_a_failing_handler_makes_the_sender_retry(
    listener: BounceListener, recorder: Recorder
) -> None:
    recorder.fail = True
    event_id = str(uuid.uuid4())
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(
            listener, dsn_for(event_id, "x@example.org"), make_return_path(event_id, KEY, DOMAIN)
        )
    assert refused.value.code == 451
    assert review_files(listener) == [] and listener.stats["handler_error"] == 1
    recorder.fail = False
    await send(
        listener, dsn_for(event_id, "x@example.org"), make_return_path(event_id, KEY, DOMAIN)
    )
    assert [i.event_id for i in recorder.seen] == [event_id]


@pytest.mark.skipif(CORPUS is None, reason="shared/corpora/sisimai-set-of-emails not present")
async def test_corpus_bounces_over_smtp(listener: BounceListener, recorder: Recorder) -> None:
    # Every real-world report, delivered to its own VERP address: each maps to its event by
    # the envelope, and exactly the ones the parser cannot recognise land in review.
    assert CORPUS is not None
    files = sorted((CORPUS / "maildir").rglob("*.eml"))
    assert len(files) > 600
    sent: dict[str, str] = {}
    # One connection for all of them, as a busy MTA would keep it open.
    async with aiosmtplib.SMTP(hostname=HOST, port=listener.port, timeout=10) as smtp:
        for n, path in enumerate(files):
            event_id = f"corpus-{n}"
            rcpt = make_return_path(event_id, KEY, DOMAIN)
            sent[rcpt] = event_id
            await smtp.sendmail("", [rcpt], path.read_bytes())
    assert len(recorder.seen) == len(files)
    assert all(i.event_id == sent[i.envelope_to] for i in recorder.seen)
    assert all(i.mapped_by is MappedBy.VERP for i in recorder.seen)
    hard = sum(i.parsed.category is BounceCategory.HARD_ADDRESS for i in recorder.seen)
    assert hard > 150
    unknown = sum(i.parsed.kind is BounceKind.UNKNOWN for i in recorder.seen)
    assert len(review_files(listener)) == unknown == listener.stats["review"]
    labels = [json.loads(line) for line in (CORPUS / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == len(files)


async def test_starttls(tmp_path: Path, recorder: Recorder) -> None:
    pki = make_test_pki(tmp_path / "pki", [DOMAIN])
    context = load_tls_context(pki.server_cert, pki.server_key)
    async with new_listener(recorder, tmp_path / "review", tls_context=context) as listener:
        client = ssl.create_default_context(cafile=str(pki.ca))
        event_id = str(uuid.uuid4())
        smtp = aiosmtplib.SMTP(
            hostname=HOST, port=listener.port, start_tls=False, tls_context=client, timeout=10
        )
        await smtp.connect()
        await smtp.starttls(server_hostname=DOMAIN)
        rcpt = make_return_path(event_id, KEY, DOMAIN)
        await smtp.sendmail("", [rcpt], dsn_for(event_id, "gone@example.org"))
        await smtp.quit()
    assert [i.event_id for i in recorder.seen] == [event_id]


def _refused_for_review() -> float:
    return (
        REGISTRY.get_sample_value("eobblast_bounce_messages_total", {"result": "review_full"})
        or 0.0
    )


async def test_a_full_review_pile_makes_the_sender_retry(
    recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reports nobody could act on (complaints among them) used to be answered 250 and
    # thrown away once the pile was full: now the sender keeps them and tries again.
    async with new_listener(recorder, tmp_path / "review", review_max_messages=2) as listener:
        chat = b"Subject: hello\r\n\r\njust chatting\r\n"
        for letter in "ab":
            await send(listener, chat, "bounces+" + letter * 30 + "@" + DOMAIN)
        assert len(review_files(listener)) == 2
        refused_before = _refused_for_review()
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(listener, chat, "bounces+" + "c" * 30 + "@" + DOMAIN)
        assert (refused.value.code, refused.value.message) == (
            452,
            "4.3.1 Review pile full, try again later",
        )
        assert len(review_files(listener)) == 2
        assert listener.stats["review_full"] == 1 and listener.stats["handled"] == 2
        assert _refused_for_review() == refused_before + 1
        # A report the handler acts on needs no room in the pile: still accepted.
        event_id = str(uuid.uuid4())
        rcpt = make_return_path(event_id, KEY, DOMAIN)
        await send(listener, dsn_for(event_id, "gone@example.org"), rcpt)
        assert listener.stats["handled"] == 3
        # A person reads one (Maildir: new/ to cur/); the retried report then gets in.
        monkeypatch.setattr(listener_module, "_RECOUNT_FULL_EVERY", 0.0)
        first = review_files(listener)[0]
        first.rename(listener.review_dir / "cur" / first.name)
        await send(listener, chat, "bounces+" + "c" * 30 + "@" + DOMAIN)
        assert len(review_files(listener)) == 2 and listener.stats["review"] == 3


def test_the_review_cap_must_be_positive(recorder: Recorder, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="review_max_messages"):
        new_listener(recorder, tmp_path, review_max_messages=0)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.0.2.25", False),
        ("mx.payer.example", False),
    ],
)
def test_which_listen_addresses_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def test_listening_beyond_loopback_without_tls_warns_at_start(
    recorder: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = make_test_pki(tmp_path / "pki", [DOMAIN])
    contexts = {
        ("0.0.0.0", False): None,
        ("0.0.0.0", True): load_tls_context(pki.server_cert, pki.server_key),
        (HOST, False): None,
    }
    warned = {}
    for (host, tls), context in contexts.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="eobblast.bounces.listener"):
            async with new_listener(recorder, tmp_path / "review", host=host, tls_context=context):
                pass
        warned[host, tls] = [r.getMessage() for r in caplog.records]
    assert warned == {
        ("0.0.0.0", False): [
            "bounce listener on 0.0.0.0 without TLS: a receiver that ignores RET=HDRS returns"
            " the whole notice (PHI), in the clear; set bounces.tls_cert and bounces.tls_key"
        ],
        ("0.0.0.0", True): [],
        (HOST, False): [],
    }


def test_a_tls_pair_that_cannot_be_loaded_is_a_config_error(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", [DOMAIN])
    missing = tmp_path / "absent.pem"
    with pytest.raises(ConfigError, match=r"bounces\.tls_cert: cannot read .*FileNotFoundError"):
        load_tls_context(missing, pki.server_key)
    with pytest.raises(ConfigError, match=r"bounces\.tls_key: cannot read .*IsADirectoryError"):
        load_tls_context(pki.server_cert, tmp_path)
    with pytest.raises(
        ConfigError, match=r"bounces\.tls_cert/bounces\.tls_key: cannot be loaded \(SSLError"
    ):
        load_tls_context(pki.server_cert, pki.untrusted_key)  # not the certificate's key


@pytest.mark.parametrize("case", ["cert only", "key only", "missing cert", "wrong key"])
def test_eobblast_bounces_refuses_tls_settings_it_cannot_use(tmp_path: Path, case: str) -> None:
    # One of the two used to run the listener without TLS, unsaid; a wrong file, a
    # traceback after the broker had been waited for. Now: exit 1 at once, naming it.
    pki = make_test_pki(tmp_path / "pki", [DOMAIN])
    tls = {
        "cert only": {"tls_cert": str(pki.server_cert)},
        "key only": {"tls_key": str(pki.server_key)},
        "missing cert": {"tls_cert": str(tmp_path / "absent.pem"), "tls_key": str(pki.server_key)},
        "wrong key": {"tls_cert": str(pki.server_cert), "tls_key": str(pki.untrusted_key)},
    }[case]
    expected = {
        "cert only": "bounces.tls_cert and bounces.tls_key: set both (STARTTLS) or neither",
        "key only": "bounces.tls_cert and bounces.tls_key: set both (STARTTLS) or neither",
        "missing cert": f"bounces.tls_cert: cannot read {tmp_path / 'absent.pem'}"
        " (FileNotFoundError)",
        "wrong key": "bounces.tls_cert/bounces.tls_key: cannot be loaded (SSLError",
    }[case]
    config_file = tmp_path / "eobblast.toml"
    # Nothing listens at this broker, and no key exists: the TLS settings are said first.
    settings = {"kafka": {"bootstrap": "127.0.0.1:9"}, "bounces": {"listen_port": 0, **tls}}
    config_file.write_text(tomli_w.dumps(settings))
    done = subprocess.run(
        [sys.executable, "-m", "eobblast", "bounces", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr
