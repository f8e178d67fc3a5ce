"""Reply classification: RFC 3463 codes, receiver wording, basic codes, and the rules table."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eobblast.bounces.category import BounceCategory as C
from eobblast.bounces.category import HandlingAction
from eobblast.bounces.classify import classify_reply, find_enhanced_status, find_reply_code
from eobblast.bounces.rules import default_rules, load_rules, parse_rules
from eobblast.errors import ConfigError

ROOT = Path(__file__).parents[2]
PACKAGED = ROOT / "src" / "eobblast" / "bounces" / "default_rules.toml"
EXAMPLE = ROOT / "config" / "bounce_rules.toml"

# (code, enhanced, text, category, permanent)
REPLIES = [
    # RFC 3463 codes with an unambiguous meaning
    (550, "5.1.1", "5.1.1 <a@example.com>: Recipient address rejected", C.HARD_ADDRESS, True),
    (550, "5.1.2", "Host unknown", C.HARD_ADDRESS, True),
    (
        550,
        "5.1.10",
        "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        C.HARD_ADDRESS,
        True,
    ),
    (550, "5.2.1", "The email account that you tried to reach is disabled.", C.HARD_ADDRESS, True),
    (550, "5.7.17", "Mailbox owner has changed", C.HARD_ADDRESS, True),
    (
        452,
        "4.2.2",
        "The email account that you tried to reach is over quota.",
        C.MAILBOX_FULL,
        False,
    ),
    (552, "5.2.2", "Mailbox full", C.MAILBOX_FULL, True),
    (552, "5.3.4", "Message size exceeds fixed maximum message size", C.MESSAGE_TOO_LARGE, True),
    (
        550,
        "5.2.3",
        "RESOLVER.RST.RecipSizeLimit; message too large for this recipient",
        C.MESSAGE_TOO_LARGE,
        True,
    ),
    (
        421,
        "4.7.28",
        "Our system has detected an unusual rate of unsolicited mail originating from your IP "
        "address.",
        C.THROTTLE,
        False,
    ),
    (450, "4.4.1", "Connection timed out", C.SOFT, False),
    (451, "4.3.0", "Temporary local problem - please try later", C.SOFT, False),
    # Gmail
    (
        550,
        None,
        "5.1.1 The email account that you tried to reach does not exist. Please try "
        "double-checking",
        C.HARD_ADDRESS,
        True,
    ),
    (
        550,
        "5.2.1",
        "The user you are trying to contact is receiving mail at a rate that prevents "
        "additional messages",
        C.THROTTLE,
        True,
    ),
    (421, "4.7.0", "Try again later, closing connection. (EHLO) - gsmtp", C.SOFT, False),
    (
        550,
        "5.7.26",
        "This mail has been blocked because the sender is unauthenticated.",
        C.POLICY_TLS,
        True,
    ),
    (
        550,
        "5.7.1",
        "Our system has detected that this message is likely unsolicited mail.",
        C.SPAM_BLOCK,
        True,
    ),
    (
        550,
        "5.7.1",
        "This message does not have authentication information or fails to pass "
        "authentication checks",
        C.POLICY_TLS,
        True,
    ),
    (
        550,
        "5.7.25",
        "The IP address sending this message does not have a PTR record setup",
        C.POLICY_TLS,
        True,
    ),
    # Microsoft
    (
        550,
        "5.7.515",
        "Access denied, sending domain example.com does not meet the required authentication "
        "level.",
        C.POLICY_TLS,
        True,
    ),
    (550, "5.7.606", "Access denied, banned sending IP [192.0.2.1].", C.SPAM_BLOCK, True),
    (
        550,
        None,
        "SC-001 (BAY004-MC1F58) Unfortunately, messages from 192.0.2.1 weren't sent. Please "
        "contact your Internet service provider since part of their network is on our block "
        "list (S3150).",
        C.SPAM_BLOCK,
        True,
    ),
    (
        550,
        "5.4.1",
        "Recipient address rejected: Access denied. AS(201806281)",
        C.HARD_ADDRESS,
        True,
    ),
    (
        451,
        "4.7.650",
        "The mail server [192.0.2.25] has been temporarily rate limited due to IP reputation.",
        C.THROTTLE,
        False,
    ),
    # Yahoo
    (
        554,
        None,
        "delivery error: dd This user doesn't have a yahoo.com account (x@yahoo.com) [0]",
        C.HARD_ADDRESS,
        True,
    ),
    (
        554,
        None,
        "delivery error: dd Sorry your message to x@yahoo.com cannot be delivered. This "
        "account has been disabled or discontinued [#102].",
        C.HARD_ADDRESS,
        True,
    ),
    (
        421,
        "4.7.0",
        "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or "
        "user complaints",
        C.THROTTLE,
        False,
    ),
    (
        553,
        "5.7.1",
        "[BL21] Connections will not be accepted from 192.0.2.1, because the ip is in "
        "Spamhaus's list",
        C.SPAM_BLOCK,
        True,
    ),
    (554, "5.7.9", "Message not accepted for policy reasons.", C.SPAM_BLOCK, True),
    # Postfix
    (
        550,
        None,
        "5.1.1 <a@example.com>: Recipient address rejected: User unknown in local recipient table",
        C.HARD_ADDRESS,
        True,
    ),
    (
        None,
        None,
        "Host or domain name not found. Name service error for name=example.invalid type=A: "
        "Host not found",
        C.HARD_ADDRESS,
        True,
    ),
    (
        None,
        None,
        "Name service error for domain example.com: Host not found, try again",
        C.SOFT,
        False,
    ),
    (554, "5.7.1", "<a@example.com>: Relay access denied", C.POLICY_TLS, True),
    (554, "5.7.1", "Client host rejected: blocked using zen.spamhaus.org", C.SPAM_BLOCK, True),
    (
        450,
        "4.7.1",
        "<a@example.com>: Recipient address rejected: Greylisted, see http://postgrey",
        C.SOFT,
        False,
    ),
    # Exim, qmail, Sendmail
    (None, None, "Unrouteable address", C.HARD_ADDRESS, True),
    (None, None, "Sorry, no mailbox here by that name. (#5.1.1)", C.HARD_ADDRESS, True),
    (
        None,
        None,
        "The users mailfolder is over the allowed quota (size). (#5.2.2)",
        C.MAILBOX_FULL,
        True,
    ),
    (None, None, "Connected to 192.0.2.1 but connection died. (#4.4.2)", C.SOFT, False),
    (None, None, "550 5.1.1 <a@example.com>... User unknown", C.HARD_ADDRESS, True),
    (None, None, "Deferred: Connection refused by mx.example.com.", C.SOFT, False),
    # our side
    (530, "5.7.0", "Must issue a STARTTLS command first", C.POLICY_TLS, True),
    (
        553,
        "5.1.8",
        "Domain of sender address bounces@example.org does not exist",
        C.POLICY_TLS,
        True,
    ),
    # basic codes
    (551, None, "", C.HARD_ADDRESS, True),
    (552, None, "", C.MAILBOX_FULL, True),
    (421, None, "", C.SOFT, False),
    (554, None, "Transaction failed", C.OTHER, True),
    (None, None, "", C.OTHER, False),
]


@pytest.mark.parametrize(("code", "enhanced", "text", "category", "permanent"), REPLIES)
def test_replies_are_classified(
    code: int | None, enhanced: str | None, text: str, category: C, permanent: bool
) -> None:
    verdict = classify_reply(code, enhanced, text)
    assert (verdict.category, verdict.permanent) == (category, permanent), verdict.matched_rule


def test_a_temporary_reply_never_suppresses_an_address() -> None:
    verdict = classify_reply(
        450, "4.1.1", "<a@example.com>: Recipient address rejected: User unknown"
    )
    assert verdict.category is C.SOFT
    assert verdict.matched_rule.endswith("+temporary")


def test_generic_status_defers_to_the_code_in_the_wording() -> None:
    verdict = classify_reply(550, "5.0.0", "550 5.2.2 <a@example.com>... Mailbox Full")
    assert verdict.category is C.MAILBOX_FULL


def test_success_is_not_a_failure() -> None:
    verdict = classify_reply(250, "2.0.0", "OK")
    assert verdict.category is C.OTHER and verdict.matched_rule == "not-a-failure"


def test_codes_in_addresses_and_versions_are_not_status_codes() -> None:
    assert find_enhanced_status("connect to 10.4.2.12[10.4.2.12]: Exim 4.72") is None
    assert find_enhanced_status("said: 550-5.7.26 unauthenticated") == (5, 7, 26)
    assert find_reply_code("Out: 220 ready\nIn: RCPT TO\nOut: 550 no") == 550
    assert find_reply_code("id=00000-22-225 ok") is None


@given(
    st.one_of(st.none(), st.integers(-1000, 1000)),
    st.one_of(st.none(), st.text(max_size=20)),
    st.text(max_size=3000),
)
@settings(max_examples=200, deadline=None)
def test_classification_never_raises(code: int | None, enhanced: str | None, text: str) -> None:
    verdict = classify_reply(code, enhanced, text)
    assert isinstance(verdict.category, C)


def test_pathological_text_is_classified_quickly() -> None:
    import time

    start = time.perf_counter()
    for text in ("a" * 100_000, "550 " * 20_000, "mailbox " * 10_000 + "full", "@" * 50_000):
        classify_reply(550, None, text)
    # A hang guard, not a speed measure (benchmarks measure speed): a pattern that
    # backtracked on these texts would take minutes; classifying them takes milliseconds.
    assert time.perf_counter() - start < 60.0


# --------------------------------------------------------------------------- rules table


def test_the_example_config_is_the_packaged_default() -> None:
    assert EXAMPLE.read_bytes() == PACKAGED.read_bytes()
    assert load_rules(EXAMPLE) == load_rules(None) == default_rules()


def test_default_handling_covers_every_category() -> None:
    handling = default_rules().handling
    assert set(handling) == set(C)
    assert handling[C.HARD_ADDRESS] is HandlingAction.VERIFY_ADDRESS
    assert handling[C.MESSAGE_TOO_LARGE] is HandlingAction.FALLBACK
    assert default_rules().retry.max_age.total_seconds() == 72 * 3600


MINIMAL = """
schema = 1
[handling]
soft = "retry"
throttle = "retry"
mailbox_full = "retry"
hard_address = "verify_address"
message_too_large = "fallback"
policy_tls = "review"
spam_block = "review"
other = "review"
"""


def test_a_minimal_table_loads_and_uses_only_its_rules() -> None:
    rules = parse_rules(
        MINIMAL + '[[text]]\nname = "x"\npattern = "frobnicated"\ncategory = "spam_block"\n'
    )
    assert classify_reply(550, None, "you were frobnicated", rules=rules).category is C.SPAM_BLOCK
    assert classify_reply(550, "5.1.1", "user unknown", rules=rules).category is C.OTHER


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("schema = 1\n[handling\n", "not valid TOML"),
        ("schema = 2\n", "schema must be 1"),
        (MINIMAL + "colour = 1\n", "unknown key(s) colour"),
        (MINIMAL.replace('other = "review"\n', ""), "no action for other"),
        (MINIMAL.replace('other = "review"', 'other = "ignore"'), "handling.other: must be one of"),
        (
            MINIMAL.replace('hard_address = "verify_address"', 'hard_address = "retry"'),
            "verify-before-resend",
        ),
        (
            MINIMAL + '[[text]]\nname = "bad"\npattern = "(unclosed"\ncategory = "soft"\n',
            "text[0] (bad): pattern does not compile",
        ),
        (
            MINIMAL + '[[text]]\nname = "empty"\npattern = "x*"\ncategory = "soft"\n',
            "matches empty text",
        ),
        (
            MINIMAL + '[[text]]\nname = "a"\npattern = "x"\ncategory = "squishy"\n',
            "category must be one of",
        ),
        (
            MINIMAL
            + '[[text]]\nname = "a"\npattern = "x"\ncategory = "soft"\n'
            + '[[text]]\nname = "a"\npattern = "y"\ncategory = "soft"\n',
            "duplicate rule name",
        ),
        (
            MINIMAL
            + '[[text]]\nname = "a"\npattern = "x"\ncategory = "soft"\nwhen = "sometimes"\n',
            "when must be",
        ),
        (MINIMAL + '[[status]]\ncode = "5.1"\ncategory = "soft"\n', "code must look like"),
        (
            MINIMAL + '[[status]]\ncode = "5.1.1"\ncategory = "soft"\nfinal = "yes"\n',
            "final must be true or false",
        ),
        (MINIMAL + '[[reply]]\ncode = "55"\ncategory = "soft"\n', "code must look like 550"),
        (MINIMAL + "[retry]\njitter = 1.5\n", "jitter: must be a number in [0, 1)"),
        (MINIMAL + "[retry]\nmax_age_seconds = -1\n", "max_age_seconds: must be a positive number"),
        (
            MINIMAL + "[retry]\ninitial_delay_seconds = 100\nmax_delay_seconds = 10\n",
            "shorter than",
        ),
        (
            MINIMAL + '[verification]\nchannels = ["phone", "email"]\n',
            "email is not a verified channel",
        ),
        (MINIMAL + "[verification]\nchannels = []\n", "non-empty list"),
        ("status = 3\n" + MINIMAL, "array of tables"),
    ],
)
def test_bad_tables_are_clear_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rules(text, source="bounce_rules.toml")
    assert message in str(info.value)
    assert "bounce_rules.toml" in str(info.value)


def test_missing_rules_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read bounce rules"):
        load_rules(tmp_path / "absent.toml")
