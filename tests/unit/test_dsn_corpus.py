"""DSN parsing against 629 real bounces (sisimai set-of-emails), plus fuzzing: it never raises."""

from __future__ import annotations

import collections
import json
import time
from email.message import EmailMessage
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eobblast.bounces.category import BounceCategory as C
from eobblast.bounces.dsn import BounceKind, ParsedBounce, parse_bounce
from eobblast.bounces.verp import VerpKey, make_return_path, parse_return_path

ROOT = Path(__file__).parents[2]
CANDIDATES = (
    ROOT.parent / "shared" / "corpora" / "sisimai-set-of-emails",
    Path("/work/shared/corpora/sisimai-set-of-emails"),
)
# Records that are not delivery failures: complaints, vacation replies, success reports.
NOT_FAILURES = {"feedback", "vacation", "delivered"}
# RFC 3463 says these are address failures even where sisimai's verdict says soft.
HARD_CODES = {"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1", "5.7.13", "5.7.17", "5.7.18"}
# sisimai's reasons in our vocabulary (coarse: its "filtered" and "rejected" are too mixed).
REASONS = {
    "userunknown": C.HARD_ADDRESS,
    "hostunknown": C.HARD_ADDRESS,
    "hasmoved": C.HARD_ADDRESS,
    "suspend": C.HARD_ADDRESS,
    "mailboxfull": C.MAILBOX_FULL,
    "mesgtoobig": C.MESSAGE_TOO_LARGE,
    "exceedlimit": C.MESSAGE_TOO_LARGE,
    "blocked": C.SPAM_BLOCK,
    "spamdetected": C.SPAM_BLOCK,
    "badreputation": C.SPAM_BLOCK,
    "virusdetected": C.SPAM_BLOCK,
    "securityerror": C.POLICY_TLS,
    "authfailure": C.POLICY_TLS,
    "failedstarttls": C.POLICY_TLS,
    "norelaying": C.POLICY_TLS,
    "notcompliantrfc": C.POLICY_TLS,
    "requireptr": C.POLICY_TLS,
    "expired": C.SOFT,
    "networkerror": C.SOFT,
    "toomanyconn": C.THROTTLE,
    "speeding": C.THROTTLE,
}
# Measured 2026-11 on this corpus: count recall 99.5 %, address recall 98.8 %,
# hard/soft agreement 90.4 %, reason agreement 88.6 %. Floors sit a little below.
FLOORS = {"count": 0.97, "address": 0.96, "hard": 0.87, "reason": 0.85}


def corpus_dir() -> Path | None:
    for candidate in CANDIDATES:
        if (candidate / "labels.jsonl").is_file():
            return candidate
    return None


@cache
def corpus() -> list[tuple[dict[str, Any], bytes]]:
    root = corpus_dir()
    if root is None:
        return []
    rows = [json.loads(line) for line in (root / "labels.jsonl").read_text().splitlines()]
    return [(row, (root / row["file"]).read_bytes()) for row in rows]


needs_corpus = pytest.mark.skipif(corpus_dir() is None, reason="shared/corpora not present")


@cache
def parsed() -> list[tuple[dict[str, Any], ParsedBounce]]:
    return [(row, parse_bounce(raw)) for row, raw in corpus()]


@needs_corpus
def test_every_message_parses_without_raising() -> None:
    results = [parse_bounce(raw) for _, raw in corpus()]
    assert len(results) == 632
    assert all(isinstance(r, ParsedBounce) for r in results)


@needs_corpus
def test_failed_recipients_and_categories_match_the_labels() -> None:
    expected_total = found_total = 0
    address_total = address_found = 0
    hard_total = hard_agree = sisimai_agree = 0
    reason_total = reason_agree = 0
    kinds: collections.Counter[str] = collections.Counter()
    categories: collections.Counter[str] = collections.Counter()
    for row, result in parsed():
        kinds[result.kind.value] += 1
        categories.update(r.category.value for r in result.recipients)
        failures = [e for e in row["expected"] or [] if e["reason"] not in NOT_FAILURES]
        if not failures:
            continue
        got = [r for r in result.recipients if r.action != "feedback"]
        expected_total += len(failures)
        found_total += min(len(failures), len(got))
        heuristic = row["heuristic_final_recipients"] or row["heuristic_x_failed_recipients"]
        wanted = {a.lower() for a in heuristic}
        address_total += len(wanted)
        address_found += len(wanted & {r.address.lower() for r in got})
        for label, recipient in zip(failures, got, strict=False):
            hard = recipient.category is C.HARD_ADDRESS
            rfc_hard = label["hardbounce"] or label["status"] in HARD_CODES
            rfc_hard = rfc_hard or label["reason"] == "suspend"
            hard_total += 1
            hard_agree += hard == rfc_hard
            sisimai_agree += hard == label["hardbounce"]
            if label["reason"] in REASONS:
                reason_total += 1
                reason_agree += recipient.category is REASONS[label["reason"]]
    ratios = {
        "count": found_total / expected_total,
        "address": address_found / address_total,
        "hard": hard_agree / hard_total,
        "reason": reason_agree / reason_total,
    }
    print(
        f"\nfailed-recipient recall {found_total}/{expected_total} = {ratios['count']:.1%}"
        f"\naddress recall (Final-Recipient/X-Failed-Recipients) {address_found}/{address_total}"
        f" = {ratios['address']:.1%}"
        f"\nhard/soft agreement (RFC 3463-adjusted) {hard_agree}/{hard_total}"
        f" = {ratios['hard']:.1%}"
        f"\nhard/soft agreement (sisimai verdict as is) {sisimai_agree}/{hard_total}"
        f" = {sisimai_agree / hard_total:.1%}"
        f"\nreason agreement {reason_agree}/{reason_total} = {ratios['reason']:.1%}"
        f"\nkinds {dict(kinds.most_common())}"
        f"\ncategories {dict(categories.most_common())}"
    )
    for name, floor in FLOORS.items():
        assert ratios[name] >= floor, name


@needs_corpus
def test_non_bounces_are_not_called_bounces() -> None:
    results = {row["file"]: result for row, result in parsed()}
    for name in ("maildir/not/is-not-bounce-01.eml", "maildir/not/is-not-bounce-02.eml"):
        assert results[name].is_bounce is not True
        assert results[name].needs_review
    # Listed under "not" upstream, but it is a mailbox-full notice from a vendor MTA.
    odd = results["maildir/not/rb-issue-368-bug.eml"]
    assert odd.category is C.MAILBOX_FULL


@needs_corpus
def test_report_kinds_are_recognised() -> None:
    by_kind: dict[str, set[BounceKind]] = collections.defaultdict(set)
    for row, result in parsed():
        prefix = row["file"].rsplit("/", 1)[-1].rsplit("-", 1)[0]
        by_kind[prefix].add(result.kind)
    assert by_kind["arf"] == {BounceKind.FEEDBACK}
    assert by_kind["rfc3834"] <= {BounceKind.AUTOREPLY, BounceKind.UNKNOWN}
    assert BounceKind.DSN in by_kind["lhost-postfix"]
    assert by_kind["lhost-qmail"] == {BounceKind.VENDOR}


# --------------------------------------------------------------------------- our own mail

KEY = VerpKey(1, b"s" * 32)
EVENT_ID = "5f0c3c1e-8d6b-4e7a-9c61-2d8b8c0a4f10"
RETURN_PATH = make_return_path(EVENT_ID, KEY, "bounce.example.org")


def our_bounce(status: str, diagnostic: str) -> bytes:
    original = EmailMessage()
    original["From"] = "Acme Health <eob-notices@acme.example>"
    original["To"] = "member@example.net"
    original["Subject"] = "Your Explanation of Benefits is ready"
    original["Message-ID"] = "<eob.1@acme.example>"
    original["X-EOB-Event-ID"] = EVENT_ID
    original.set_content("not PHI")
    report = EmailMessage()
    report["From"] = "Mail Delivery System <MAILER-DAEMON@mx.example.net>"
    report["To"] = RETURN_PATH
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report.set_content("This is the mail system at host mx.example.net.\n")
    report.make_mixed()
    status_part = EmailMessage()
    status_part.set_content(
        "Reporting-MTA: dns; mx.example.net\n\n"
        "Final-Recipient: rfc822; member@example.net\n"
        f"Action: failed\nStatus: {status}\nRemote-MTA: dns; mx.example.net\n"
        f"Diagnostic-Code: smtp; {diagnostic}\n"
    )
    report.attach(status_part)
    returned = EmailMessage()
    returned.set_content(original)
    report.attach(returned)
    raw = report.as_bytes()
    # EmailMessage cannot build message/delivery-status directly; relabel the part.
    return raw.replace(
        b'Content-Type: text/plain; charset="utf-8"\nContent-Transfer-Encoding: 7bit\n\nReporting',
        b"Content-Type: message/delivery-status\n\nReporting",
        1,
    ).replace(b"multipart/mixed", b"multipart/report; report-type=delivery-status", 1)


def test_our_own_bounce_leads_back_to_the_event() -> None:
    result = parse_bounce(our_bounce("5.1.1", "550 5.1.1 <member@example.net>: User unknown"))
    assert result.kind is BounceKind.DSN and result.is_bounce is True
    (recipient,) = result.recipients
    assert recipient.address == "member@example.net"
    assert recipient.category is C.HARD_ADDRESS and recipient.permanent
    assert recipient.remote_mta == "mx.example.net"
    assert result.original_headers.eob_event_id == EVENT_ID
    assert result.original_message_id == "<eob.1@acme.example>"
    found = {parse_return_path(a, [KEY]) for a in result.original_headers.verp_candidates}
    assert EVENT_ID in found


def test_envelope_recipient_from_the_listener_is_a_verp_candidate() -> None:
    result = parse_bounce(b"garbage", envelope_to=RETURN_PATH)
    assert result.original_headers.verp_candidates == (RETURN_PATH,)
    assert parse_return_path(result.original_headers.verp_candidates[0], [KEY]) == EVENT_ID


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@given(st.binary(max_size=4000))
@FUZZ
def test_random_bytes_are_other_and_never_raise(data: bytes) -> None:
    result = parse_bounce(data)
    assert result.category is C.OTHER
    # Hypothesis also tries the parser's own phrases ("RCPT TO:" opens an SMTP transcript):
    # junk taken for a bounce names nobody and goes to review, never to an action.
    if result.is_bounce:
        assert result.needs_review and not result.recipients


@given(st.text(max_size=3000))
@FUZZ
def test_random_text_never_raises(text: str) -> None:
    assert isinstance(parse_bounce(text), ParsedBounce)


@needs_corpus
@given(st.data())
@FUZZ
def test_truncated_and_mangled_corpus_messages_never_raise(data: st.DataObject) -> None:
    messages = corpus()
    _, raw = messages[data.draw(st.integers(0, len(messages) - 1))]
    cut = data.draw(st.integers(0, len(raw)))
    mangled = bytearray(raw[:cut])
    for _ in range(data.draw(st.integers(0, 8))):
        if mangled:
            position = data.draw(st.integers(0, len(mangled) - 1))
            mangled[position] = data.draw(st.integers(0, 255))
    assert isinstance(parse_bounce(bytes(mangled)), ParsedBounce)


MIME_PIECES = st.sampled_from(
    [
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n",
        b"Content-Type: message/delivery-status\n",
        b"Content-Type: message/rfc822\n",
        b"Content-Type: text/plain; charset=x-unknown\n",
        b"Content-Transfer-Encoding: base64\n",
        b"Content-Transfer-Encoding: quoted-printable\n",
        b"Final-Recipient: rfc822; \n",
        b"Status: 9.9.9\n",
        b"Action: failed\n",
        b"Diagnostic-Code: smtp; 550 \xff\xfe\n",
        b"\n",
        b"--b\n",
        b"--b--\n",
        b"=?utf-8?b?!!!?=\n",
        b"From: MAILER-DAEMON@\n",
        b"X-EOB-Event-ID: " + b"x" * 200 + b"\n",
        b"\x00\r\r\n",
    ]
)


@given(st.lists(MIME_PIECES, max_size=60))
@FUZZ
def test_garbage_mime_never_raises(pieces: list[bytes]) -> None:
    assert isinstance(parse_bounce(b"".join(pieces)), ParsedBounce)


def test_deeply_nested_multiparts_are_bounded() -> None:
    depth = 3000
    head = b"".join(
        b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i, i + 1) for i in range(depth)
    )
    raw = b"From: MAILER-DAEMON@mx.example\nContent-Type: multipart/mixed; boundary=b0\n\n" + head
    start = time.perf_counter()
    result = parse_bounce(raw)
    assert isinstance(result, ParsedBounce)
    # A hang guard, not a speed measure (benchmarks measure speed): it took 7 s once in a
    # loaded CI run where it usually takes 2; work that grew with the nesting's square
    # would take many minutes.
    assert time.perf_counter() - start < 60.0


def test_huge_headers_and_bodies_are_bounded() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example\nSubject: "
        + b"Undeliverable " * 100_000
        + b"\nX-Failed-Recipients: "
        + b"a@example.org, " * 10_000
        + b"\n\n"
        + b"user@example.org: 550 user unknown\n" * 50_000
    )
    start = time.perf_counter()
    result = parse_bounce(raw)
    # A hang guard, not a speed measure (benchmarks measure speed): work quadratic in
    # these 2 MB would take many minutes on any machine; the parse takes well under 1 s.
    assert time.perf_counter() - start < 60.0
    assert result.is_bounce is True
    assert len(result.recipients) <= 100


def test_a_notice_of_one_long_line_of_addresses_is_read_in_linear_time() -> None:
    # Quoted-printable soft line breaks join 1.8 MB into one line: each of its addresses
    # searched the whole line for a Message-ID, 30 s for one message (once per recipient).
    lines = b"see user@example.com 550 5.1.1 =\r\n" * 50_000
    raw = (
        b"From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered Mail\r\n"
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + lines
    )
    started = time.perf_counter()
    parsed = parse_bounce(raw, envelope_to="bounces+x@bounce.test")
    assert [r.address for r in parsed.recipients] == ["user@example.com"]
    assert time.perf_counter() - started < 10  # generous: linear is well under 1 s
