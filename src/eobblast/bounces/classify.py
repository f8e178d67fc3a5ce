"""Classify an SMTP reply or a DSN diagnostic into a BounceCategory, by the rules table."""

from __future__ import annotations

import re
from dataclasses import dataclass

from eobblast.bounces.category import BounceCategory, HandlingAction
from eobblast.bounces.rules import MAX_TEXT, BounceRules, default_rules

__all__ = [
    "BounceCategory",
    "Classification",
    "HandlingAction",
    "classify_reply",
    "find_enhanced_status",
    "find_reply_code",
    "parse_enhanced_status",
]

# A status code is not part of a dotted number (IP address, version) on either side.
_ENHANCED = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?![\w]|\.\d)")
# In free text only failures count: a transcript's "220"/"250" lines are not the verdict.
_FAILURE_ENHANCED = re.compile(r"(?<![\w.])([45])\.(\d{1,3})\.(\d{1,3})(?![\w]|\.\d)")
_REPLY_CODE = re.compile(r"(?<![\w.\-=/:#\[])([45]\d\d)(?=[ \-]|$)")
# "550-5.7.1 " continuation prefixes inside a joined multi-line reply split the wording.
_CODE_PREFIX = re.compile(r"(?<!\S)[245]\d\d[ \-](?:#?[245]\.\d{1,3}\.\d{1,3}\s+)?")
_SPACE = re.compile(r"\s+")
_PERMANENT_BY_NATURE = frozenset({BounceCategory.HARD_ADDRESS, BounceCategory.MESSAGE_TOO_LARGE})


@dataclass(frozen=True, slots=True)
class Classification:
    """What a reply means: its category, the rule that decided it, and whether it is final."""

    category: BounceCategory
    matched_rule: str
    permanent: bool


def parse_enhanced_status(value: str | None) -> tuple[int, int, int] | None:
    """An RFC 3463 status "5.1.1" as (5, 1, 1); None when absent or malformed."""
    if not value:
        return None
    match = _ENHANCED.search(value.strip()[:64])
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3])


def find_enhanced_status(text: str) -> tuple[int, int, int] | None:
    """The first failure (4.x.x or 5.x.x) enhanced status code written in free text, if any."""
    match = _FAILURE_ENHANCED.search(text[:MAX_TEXT])
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3])


def find_reply_code(text: str) -> int | None:
    """The first failure (4xx or 5xx) SMTP reply code written in free text, if any."""
    match = _REPLY_CODE.search(text[:MAX_TEXT])
    return int(match[1]) if match else None


def _normalise(text: str) -> str:
    return _SPACE.sub(" ", _CODE_PREFIX.sub(" ", text[:MAX_TEXT])).strip()


def classify_reply(
    code: int | None,
    enhanced: str | None,
    text: str,
    *,
    rules: BounceRules | None = None,
) -> Classification:
    """Classify one failure reply (sync SMTP or a DSN's Status + Diagnostic-Code)."""
    rules = rules or default_rules()
    text = text or ""
    status = parse_enhanced_status(enhanced)
    in_text = find_enhanced_status(text)
    # A generic x.0.0 (DSN Status fields often are) says less than a code in the wording.
    if in_text is not None and (
        status is None or (status[1:] == (0, 0) and in_text[0] == status[0])
    ):
        status = in_text
    if code is None or not 200 <= code <= 599:
        code = find_reply_code(text)
    status_class = status[0] if status else (code // 100 if code else None)
    if status_class == 2:
        # Not a failure at all: callers should not ask, but an answer beats an exception.
        return Classification(BounceCategory.OTHER, "not-a-failure", permanent=False)
    wording = _normalise(text)
    found = _decide(rules, status, code, status_class, wording)
    category, rule = found if found else (BounceCategory.OTHER, "default")
    if status_class == 4 and category is BounceCategory.HARD_ADDRESS:
        # Verify-before-resend holds a member's mail: only a permanent refusal may do that.
        category, rule = BounceCategory.SOFT, f"{rule}+temporary"
    if status_class is None:
        permanent = category in _PERMANENT_BY_NATURE
    else:
        permanent = status_class == 5
    return Classification(category, rule, permanent)


def _decide(
    rules: BounceRules,
    status: tuple[int, int, int] | None,
    code: int | None,
    status_class: int | None,
    wording: str,
) -> tuple[BounceCategory, str] | None:
    for text_rule in rules.text:
        if (
            text_rule.first
            and text_rule.applies(status_class)
            and text_rule.pattern.search(wording)
        ):
            return text_rule.category, f"text:{text_rule.name}"
    if status is not None:
        for status_rule in rules.status:
            if status_rule.final and status_rule.matches(status):
                return status_rule.category, status_rule.name
    if wording:
        for text_rule in rules.text:
            if (
                not text_rule.first
                and text_rule.applies(status_class)
                and text_rule.pattern.search(wording)
            ):
                return text_rule.category, f"text:{text_rule.name}"
    if status is not None:
        for status_rule in rules.status:
            if not status_rule.final and status_rule.matches(status):
                return status_rule.category, status_rule.name
    if code is not None:
        for reply_rule in rules.reply:
            if reply_rule.matches(code):
                return reply_rule.category, reply_rule.name
    return None
