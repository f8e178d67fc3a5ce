"""Adaptive backoff per (source IP, provider): a pure state machine with an injected clock.

"Slow down" replies cut the rate multiplicatively and pause the pair; every quiet interval
afterwards gives back a fixed step (AIMD, as TCP does). Block replies suspend the pair for a
long cooldown or until an operator resumes it, and raise an alert. Reply texts are only
matched, never stored: they can quote a recipient address.
"""

from __future__ import annotations

import enum
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from eobblast._toml import Table
from eobblast.errors import ConfigError

_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})(?!\d)")


class ReplySignal(enum.StrEnum):
    """What a reply says about our sending pace."""

    NONE = "none"
    SLOW_DOWN = "slow_down"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """The numbers and reply patterns of adaptive backoff (the [backoff] table)."""

    decrease_factor: float
    min_rate_fraction: float
    pause: float
    max_pause: float
    recovery_interval: float
    recovery_step_fraction: float
    block_cooldown: float
    slow_down_codes: frozenset[int]
    slow_down_enhanced: frozenset[str]
    slow_down_phrases: tuple[str, ...]
    block_enhanced: frozenset[str]
    block_phrases: tuple[str, ...]

    def classify(self, code: int | None, enhanced: str | None, text: str) -> ReplySignal:
        """Classify a reply; `code` None means the connection was refused or dropped unanswered."""
        if code is None:
            return ReplySignal.SLOW_DOWN
        if code < 400:
            return ReplySignal.NONE
        if enhanced is None:
            found = _ENHANCED.match(text)
            enhanced = found.group(1) if found else None
        # Block wording wins over a temporary code: "421 ... blocked using Spamhaus" will not
        # get better by retrying sooner, and hammering a blocking receiver deepens the block.
        if enhanced in self.block_enhanced or _phrases(self.block_phrases).search(text):
            return ReplySignal.BLOCK
        if (
            code in self.slow_down_codes
            or enhanced in self.slow_down_enhanced
            or _phrases(self.slow_down_phrases).search(text)
        ):
            return ReplySignal.SLOW_DOWN
        return ReplySignal.NONE


@functools.lru_cache(maxsize=16)
def _phrases(phrases: tuple[str, ...]) -> re.Pattern[str]:
    if not phrases:
        return re.compile(r"(?!)")
    words = "|".join(re.escape(p) for p in phrases)
    return re.compile(rf"(?<![a-z0-9])(?:{words})(?![a-z0-9])", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class BackoffState:
    """One (source IP, provider) pair's pace."""

    policy: BackoffPolicy
    base_rate: float  # the configured messages per second
    rate: float  # the rate set at the last change; recovery adds to it from `since`
    since: float  # when recovery starts counting (end of the last pause or suspension)
    paused_until: float = 0.0
    pause: float = 0.0  # length of the last pause: doubles while slow-downs keep coming
    suspended_until: float | None = None
    alert: bool = False
    block_code: str | None = None  # the code that caused the suspension, never the text
    slow_downs: int = 0
    blocks: int = 0


def initial_state(policy: BackoffPolicy, base_rate: float, now: float) -> BackoffState:
    """A pair at full configured rate."""
    if base_rate <= 0:
        raise ValueError("base_rate must be positive")
    return BackoffState(policy, base_rate, base_rate, now)


def _min_rate(state: BackoffState) -> float:
    return state.base_rate * state.policy.min_rate_fraction


def _recovered_rate(state: BackoffState, now: float) -> float:
    policy = state.policy
    if now <= state.since:
        return state.rate
    steps = math.floor((now - state.since) / policy.recovery_interval)
    return min(
        state.base_rate, state.rate + steps * policy.recovery_step_fraction * state.base_rate
    )


def is_suspended(state: BackoffState, now: float) -> bool:
    """Whether a block suspends the pair at `now`."""
    return state.suspended_until is not None and now < state.suspended_until


def is_paused(state: BackoffState, now: float) -> bool:
    """Whether a slow-down pause holds the pair at `now`."""
    return now < state.paused_until


def available_at(state: BackoffState, now: float) -> float:
    """When the pair may send again (`now` if it may send now)."""
    until = state.suspended_until
    if until is not None and now < until:
        return until
    return max(now, state.paused_until)


def current_rate(state: BackoffState, now: float) -> float:
    """Messages per second the pair may send at `now`: 0 while paused or suspended."""
    if is_suspended(state, now) or is_paused(state, now):
        return 0.0
    return _recovered_rate(state, now)


def observe_reply(
    state: BackoffState, code: int | None, enhanced: str | None, text: str, now: float
) -> BackoffState:
    """The pair's next state after a reply (`code` None: connection refused or dropped)."""
    return apply_signal(state, state.policy.classify(code, enhanced, text), code, enhanced, now)


def apply_signal(
    state: BackoffState,
    signal: ReplySignal,
    code: int | None,
    enhanced: str | None,
    now: float,
) -> BackoffState:
    """`observe_reply` for a reply already classified (the text is matched once)."""
    if signal is ReplySignal.BLOCK:
        return _block(state, code, enhanced, now)
    if signal is ReplySignal.SLOW_DOWN:
        return _slow_down(state, now)
    return state


def _slow_down(state: BackoffState, now: float) -> BackoffState:
    policy = state.policy
    counted = replace(state, slow_downs=state.slow_downs + 1)
    if is_suspended(state, now) or is_paused(state, now):
        # Replies to messages already in flight when we backed off: one episode, one cut.
        return counted
    # Slowed down again within one quiet interval of the last pause: the pause was too short.
    again = state.pause > 0 and now < state.since + policy.recovery_interval
    pause = min(policy.max_pause, state.pause * 2) if again else policy.pause
    rate = max(_min_rate(state), _recovered_rate(state, now) * policy.decrease_factor)
    return replace(counted, rate=rate, since=now + pause, paused_until=now + pause, pause=pause)


def _block(state: BackoffState, code: int | None, enhanced: str | None, now: float) -> BackoffState:
    until = now + state.policy.block_cooldown
    if state.suspended_until is not None and state.suspended_until > until:
        until = state.suspended_until
    return replace(
        state,
        rate=_min_rate(state),
        since=until,
        suspended_until=until,
        alert=True,
        block_code=enhanced or (str(code) if code is not None else None),
        blocks=state.blocks + 1,
    )


def resume(state: BackoffState, now: float) -> BackoffState:
    """Operator resume: lift the suspension and clear the alert; the rate climbs from the floor."""
    return replace(
        state,
        rate=_min_rate(state),
        since=now,
        paused_until=0.0,
        pause=0.0,
        suspended_until=None,
        alert=False,
        block_code=None,
    )


def sync_suspension(state: BackoffState, until: float | None, now: float) -> BackoffState:
    """Mirror the shared store's suspension (set by another worker, or lifted by an operator)."""
    if until is None or until <= now:
        return resume(state, now) if is_suspended(state, now) else state
    if state.suspended_until == until:
        return state
    # The worker that saw the block raised the alert; mirroring it here would count it twice.
    return replace(state, rate=_min_rate(state), since=until, suspended_until=until)


def _enhanced_codes(table: Table, key: str) -> frozenset[str]:
    codes = table.strings(key)
    for code in codes:
        if not _ENHANCED.fullmatch(code):
            raise ConfigError(f"{table.where}.{key}: {code!r} is not an enhanced status code")
    return frozenset(codes)


def parse_policy(doc: Mapping[str, Any], source: str) -> BackoffPolicy:
    """Parse the [backoff] table of a shaping document."""
    table = Table(doc, source).table("backoff")
    codes = table.integers("slow_down_codes")
    if not all(400 <= c <= 599 for c in codes):
        raise ConfigError(f"{table.where}.slow_down_codes: expected SMTP codes 400-599")
    policy = BackoffPolicy(
        decrease_factor=table.number("decrease_factor", above=0.0, at_most=0.99),
        min_rate_fraction=table.number("min_rate_fraction", above=0.0, at_most=1.0),
        pause=table.number("pause_seconds", above=0.0),
        max_pause=table.number("max_pause_seconds", above=0.0),
        recovery_interval=table.number("recovery_interval_seconds", above=0.0),
        recovery_step_fraction=table.number("recovery_step_fraction", above=0.0, at_most=1.0),
        block_cooldown=table.number("block_cooldown_seconds", above=0.0),
        slow_down_codes=frozenset(codes),
        slow_down_enhanced=_enhanced_codes(table, "slow_down_enhanced"),
        slow_down_phrases=tuple(p.lower() for p in table.strings("slow_down_phrases")),
        block_enhanced=_enhanced_codes(table, "block_enhanced"),
        block_phrases=tuple(p.lower() for p in table.strings("block_phrases")),
    )
    if policy.max_pause < policy.pause:
        raise ConfigError(f"{table.where}.max_pause_seconds: must be at least pause_seconds")
    table.done()
    return policy
