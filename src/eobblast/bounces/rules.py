"""The bounce rules table: loaded from TOML, validated, with the packaged default."""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from eobblast._toml import parse_toml, read_text
from eobblast.bounces.category import BounceCategory, HandlingAction
from eobblast.errors import ConfigError

DEFAULT_RULES_RESOURCE = "default_rules.toml"
# Rules only ever see this much of a reply: bounded work per message, whatever arrives.
MAX_TEXT = 4096

When = Literal["any", "permanent", "temporary"]


@dataclass(frozen=True, slots=True)
class StatusRule:
    """An enhanced status code pattern ("5.1.1", "*.2.2", "5.7.*") and its category."""

    code: str
    category: BounceCategory
    final: bool
    parts: tuple[int | None, int | None, int | None]

    @property
    def name(self) -> str:
        """The rule's name as reported in a Classification."""
        return f"status:{self.code}"

    def matches(self, status: tuple[int, int, int]) -> bool:
        """Whether an enhanced status (class, subject, detail) falls under this rule."""
        return all(
            want is None or want == have for want, have in zip(self.parts, status, strict=True)
        )


@dataclass(frozen=True, slots=True)
class TextRule:
    """A named regular expression over reply text and the category it implies."""

    name: str
    pattern: re.Pattern[str]
    category: BounceCategory
    first: bool
    when: When

    def applies(self, status_class: int | None) -> bool:
        """Whether the rule may fire for a reply of this class (2, 4, 5 or unknown)."""
        if self.when == "permanent":
            return status_class in (5, None)
        if self.when == "temporary":
            return status_class == 4
        return True


@dataclass(frozen=True, slots=True)
class ReplyRule:
    """A basic reply code ("552") or class ("5*") and its category."""

    code: str
    category: BounceCategory

    @property
    def name(self) -> str:
        """The rule's name as reported in a Classification."""
        return f"reply:{self.code}"

    def matches(self, code: int) -> bool:
        """Whether a three-digit reply code falls under this rule."""
        text = str(code)
        if self.code.endswith("*"):
            return text.startswith(self.code[:-1])
        return text == self.code


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """The soft-bounce backoff schedule and how long a notice may keep trying."""

    initial_delay: timedelta = timedelta(minutes=5)
    multiplier: float = 2.0
    max_delay: timedelta = timedelta(hours=4)
    jitter: float = 0.5
    max_age: timedelta = timedelta(hours=72)


@dataclass(frozen=True, slots=True)
class VerificationSettings:
    """How long a verification may stay unanswered and which channels count as verified."""

    timeout: timedelta = timedelta(days=7)
    channels: frozenset[str] = frozenset({"phone", "sms", "portal"})


@dataclass(frozen=True, slots=True)
class BounceRules:
    """Everything the classifier and the verify-before-resend state machine read from data."""

    status: tuple[StatusRule, ...]
    text: tuple[TextRule, ...]
    reply: tuple[ReplyRule, ...]
    handling: Mapping[BounceCategory, HandlingAction]
    retry: RetrySettings
    verification: VerificationSettings


_TOP_KEYS = {"schema", "handling", "retry", "verification", "status", "text", "reply"}
_CODE = re.compile(r"^(\*|[245])\.(\*|\d{1,3})\.(\*|\d{1,3})$")
_REPLY = re.compile(r"^[245](\d\d|\d\*|\*)$")


def load_rules(path: Path | None = None) -> BounceRules:
    """Load a rules file, or the packaged default when path is None."""
    if path is None:
        return default_rules()
    return parse_rules(read_text(path, "bounce rules"), source=str(path))


@functools.cache
def default_rules() -> BounceRules:
    """The rules shipped inside the package (parsed once; the result is immutable)."""
    text = resources.files(__package__).joinpath(DEFAULT_RULES_RESOURCE).read_text("utf-8")
    return parse_rules(text, source="packaged default")


def parse_rules(text: str, *, source: str = "bounce rules") -> BounceRules:
    """Parse and validate a rules document; every problem is a ConfigError naming where."""
    data = parse_toml(text, source)
    _only(data, _TOP_KEYS, source)
    if data.get("schema") != 1:
        raise ConfigError(f"{source}: schema must be 1")
    return BounceRules(
        status=tuple(
            _status_rule(item, f"{source}: status[{i}]")
            for i, item in enumerate(_tables(data, "status", source))
        ),
        text=_text_rules(_tables(data, "text", source), source),
        reply=tuple(
            _reply_rule(item, f"{source}: reply[{i}]")
            for i, item in enumerate(_tables(data, "reply", source))
        ),
        handling=_handling(data.get("handling"), f"{source}: handling"),
        retry=_retry(data.get("retry", {}), f"{source}: retry"),
        verification=_verification(data.get("verification", {}), f"{source}: verification"),
    )


def _only(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")


def _tables(data: Mapping[str, Any], key: str, source: str) -> list[Mapping[str, Any]]:
    items = data.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{source}: {key} must be an array of tables ([[{key}]])")
    return items


def _category(table: Mapping[str, Any], where: str) -> BounceCategory:
    value = table.get("category")
    try:
        return BounceCategory(str(value))
    except ValueError:
        choices = ", ".join(c.value for c in BounceCategory)
        raise ConfigError(f"{where}: category must be one of {choices}") from None


def _flag(table: Mapping[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false")
    return value


def _status_rule(table: Mapping[str, Any], where: str) -> StatusRule:
    _only(table, {"code", "category", "final"}, where)
    code = table.get("code")
    match = _CODE.match(code) if isinstance(code, str) else None
    if match is None:
        raise ConfigError(f"{where}: code must look like 5.1.1, *.2.2 or 5.7.*")
    parts = tuple(None if p == "*" else int(p) for p in match.groups())
    return StatusRule(
        code=str(code),
        category=_category(table, where),
        final=_flag(table, "final", where),
        parts=(parts[0], parts[1], parts[2]),
    )


def _text_rules(items: list[Mapping[str, Any]], source: str) -> tuple[TextRule, ...]:
    rules: list[TextRule] = []
    seen: set[str] = set()
    for i, table in enumerate(items):
        where = f"{source}: text[{i}]"
        _only(table, {"name", "pattern", "category", "first", "when"}, where)
        name = table.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", name):
            raise ConfigError(f"{where}: name must be a short lowercase identifier")
        where = f"{where} ({name})"
        if name in seen:
            raise ConfigError(f"{where}: duplicate rule name")
        seen.add(name)
        pattern = table.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}: pattern must be a non-empty string")
        try:
            compiled = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"{where}: pattern does not compile: {exc}") from None
        if compiled.search("") is not None:
            raise ConfigError(f"{where}: pattern matches empty text, so it would match anything")
        when = table.get("when", "any")
        if when not in ("any", "permanent", "temporary"):
            raise ConfigError(f"{where}: when must be any, permanent or temporary")
        rules.append(
            TextRule(
                name=name,
                pattern=compiled,
                category=_category(table, where),
                first=_flag(table, "first", where),
                when=when,
            )
        )
    return tuple(rules)


def _reply_rule(table: Mapping[str, Any], where: str) -> ReplyRule:
    _only(table, {"code", "category"}, where)
    code = table.get("code")
    if not isinstance(code, str) or not _REPLY.match(code):
        raise ConfigError(f"{where}: code must look like 550, 55* or 5*")
    return ReplyRule(code=code, category=_category(table, where))


def _handling(table: Any, where: str) -> Mapping[BounceCategory, HandlingAction]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: a [handling] table is required")
    _only(table, {c.value for c in BounceCategory}, where)
    missing = [c.value for c in BounceCategory if c.value not in table]
    if missing:
        raise ConfigError(f"{where}: no action for {', '.join(missing)}")
    out: dict[BounceCategory, HandlingAction] = {}
    for category in BounceCategory:
        try:
            out[category] = HandlingAction(table[category.value])
        except ValueError:
            choices = ", ".join(a.value for a in HandlingAction)
            raise ConfigError(f"{where}.{category.value}: must be one of {choices}") from None
    if out[BounceCategory.HARD_ADDRESS] is not HandlingAction.VERIFY_ADDRESS:
        # The design's one non-negotiable rule: a hard bounce is never retried or resent
        # without a verified address.
        raise ConfigError(f"{where}.hard_address: must be verify_address (verify-before-resend)")
    return types.MappingProxyType(out)


def _seconds(table: Mapping[str, Any], key: str, default: timedelta, where: str) -> timedelta:
    value = table.get(key, default.total_seconds())
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where}.{key}: must be a positive number of seconds")
    return timedelta(seconds=value)


def _retry(table: Any, where: str) -> RetrySettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    keys = {
        "initial_delay_seconds",
        "multiplier",
        "max_delay_seconds",
        "jitter",
        "max_age_seconds",
    }
    _only(table, keys, where)
    base = RetrySettings()
    multiplier = table.get("multiplier", base.multiplier)
    if isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or multiplier < 1:
        raise ConfigError(f"{where}.multiplier: must be a number >= 1")
    jitter = table.get("jitter", base.jitter)
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
        raise ConfigError(f"{where}.jitter: must be a number in [0, 1)")
    settings = RetrySettings(
        initial_delay=_seconds(table, "initial_delay_seconds", base.initial_delay, where),
        multiplier=float(multiplier),
        max_delay=_seconds(table, "max_delay_seconds", base.max_delay, where),
        jitter=float(jitter),
        max_age=_seconds(table, "max_age_seconds", base.max_age, where),
    )
    if settings.max_delay < settings.initial_delay:
        raise ConfigError(f"{where}: max_delay_seconds is shorter than initial_delay_seconds")
    return settings


def _verification(table: Any, where: str) -> VerificationSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    _only(table, {"timeout_seconds", "channels"}, where)
    base = VerificationSettings()
    channels = table.get("channels", sorted(base.channels))
    if (
        not isinstance(channels, list)
        or not channels
        or not all(isinstance(c, str) and c for c in channels)
    ):
        raise ConfigError(f"{where}.channels: must be a non-empty list of channel names")
    if "email" in channels:
        # An answer by email comes from whoever reads that mailbox: the very thing in doubt.
        raise ConfigError(f"{where}.channels: email is not a verified channel")
    return VerificationSettings(
        timeout=_seconds(table, "timeout_seconds", base.timeout, where),
        channels=frozenset(channels),
    )
