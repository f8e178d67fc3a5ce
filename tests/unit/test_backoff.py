"""Adaptive backoff: reply classification, AIMD with pauses, block suspension, and the shaper."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eobblast.shaping import (
    BackoffState,
    RateShaper,
    ReplySignal,
    available_at,
    current_rate,
    initial_state,
    is_paused,
    is_suspended,
    load_shaping,
    observe_reply,
    resume,
    sync_suspension,
)

SETTINGS = load_shaping()
POLICY = SETTINGS.backoff
BASE = 10.0
T0 = 1_800_000_000.0


def _fresh() -> BackoffState:
    return initial_state(POLICY, BASE, T0)


def _slow(state: BackoffState, now: float) -> BackoffState:
    return observe_reply(state, 421, "4.7.0", "Try again later, closing connection.", now)


def _block(state: BackoffState, now: float) -> BackoffState:
    text = "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org"
    return observe_reply(state, 554, "5.7.1", text, now)


# --- classification ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "signal"),
    [
        # slow down
        (421, "4.7.0", "Try again later, closing connection.", ReplySignal.SLOW_DOWN),
        (
            421,
            "4.7.28",
            "Our system has detected an unusual rate of unsolicited mail originating from"
            " your IP address. To protect our users from spam, mail sent from your IP address"
            " has been temporarily rate limited.",
            ReplySignal.SLOW_DOWN,
        ),
        (
            451,
            None,
            "4.7.500 Server busy. Please try again later from [192.0.2.1]",
            ReplySignal.SLOW_DOWN,
        ),
        (
            451,
            "4.7.650",
            "The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
            ReplySignal.SLOW_DOWN,
        ),
        (
            421,
            "4.7.0",
            "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume",
            ReplySignal.SLOW_DOWN,
        ),
        (450, None, "Too many connections from your IP", ReplySignal.SLOW_DOWN),
        (452, None, "Rate limit exceeded, slow down", ReplySignal.SLOW_DOWN),
        (None, None, "connection refused", ReplySignal.SLOW_DOWN),
        (None, None, "", ReplySignal.SLOW_DOWN),
        # block
        (
            554,
            "5.7.1",
            "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
            ReplySignal.BLOCK,
        ),
        (
            550,
            "5.7.1",
            "Unfortunately, messages from [192.0.2.1] weren't sent. Our servers have blocked"
            " this IP address (S3150)",
            ReplySignal.BLOCK,
        ),
        (
            550,
            "5.7.515",
            "Access denied, sending domain does not meet the required authentication level.",
            ReplySignal.BLOCK,
        ),
        (550, None, "5.7.606 Access denied, banned sending IP [192.0.2.1]", ReplySignal.BLOCK),
        (554, None, "Your IP is BLACKLISTED", ReplySignal.BLOCK),
        (550, None, "listed by Spamhaus SBL", ReplySignal.BLOCK),
        (
            553,
            "5.7.2",
            "[TSS09] All messages from 192.0.2.1 will be permanently deferred",
            ReplySignal.BLOCK,
        ),
        (421, "4.7.0", "Temporarily blocked for sending spam", ReplySignal.BLOCK),
        # neither: a single recipient's fate, not our pace
        (250, "2.0.0", "OK queued as 12345", ReplySignal.NONE),
        (354, None, "End data with <CR><LF>.<CR><LF>", ReplySignal.NONE),
        (
            550,
            "5.1.1",
            "The email account that you tried to reach does not exist",
            ReplySignal.NONE,
        ),
        (550, "5.7.1", "Relaying denied", ReplySignal.NONE),
        (452, "4.2.2", "The email account that you tried to reach is over quota", ReplySignal.NONE),
        (450, "4.2.0", "Greylisted, please try again later", ReplySignal.NONE),
        (550, "5.7.26", "Unauthenticated email is not accepted from this domain", ReplySignal.NONE),
        (550, None, "User unblocked-mailbox@example.org unknown", ReplySignal.NONE),
        (451, "4.7.1", "4.7.10 is not 4.7.1", ReplySignal.NONE),
    ],
)
def test_classify_reply(
    code: int | None, enhanced: str | None, text: str, signal: ReplySignal
) -> None:
    assert POLICY.classify(code, enhanced, text) is signal


# --- slow down: multiplicative decrease, pause, additive increase ------------------------


def test_fresh_state_runs_at_the_configured_rate() -> None:
    state = _fresh()
    assert current_rate(state, T0) == BASE
    assert not is_paused(state, T0) and not is_suspended(state, T0)
    assert available_at(state, T0) == T0


def test_slow_down_halves_the_rate_and_pauses() -> None:
    state = _slow(_fresh(), T0)
    assert state.slow_downs == 1
    assert is_paused(state, T0 + 59) and current_rate(state, T0 + 59) == 0.0
    assert available_at(state, T0 + 1) == T0 + 60
    assert current_rate(state, T0 + 60) == BASE * 0.5


def test_recovery_adds_a_step_per_quiet_interval_up_to_the_configured_rate() -> None:
    state = _slow(_fresh(), T0)
    end = T0 + 60  # pause over
    assert current_rate(state, end + 59) == pytest.approx(5.0)
    assert current_rate(state, end + 60) == pytest.approx(6.0)
    assert current_rate(state, end + 150) == pytest.approx(7.0)
    assert current_rate(state, end + 5 * 60) == pytest.approx(BASE)
    assert current_rate(state, end + 50 * 60) == pytest.approx(BASE)


def test_replies_to_messages_in_flight_do_not_cut_again() -> None:
    state = _slow(_fresh(), T0)
    for second in range(1, 10):
        state = _slow(state, T0 + second)
    assert state.slow_downs == 10
    assert current_rate(state, T0 + 60) == BASE * 0.5
    assert state.paused_until == T0 + 60


def test_slow_down_soon_after_a_pause_doubles_the_pause_up_to_the_maximum() -> None:
    state = _slow(_fresh(), T0)
    pauses = []
    now = T0
    for _ in range(6):
        now = state.paused_until + 10  # right after the pause: the receiver is still unhappy
        state = _slow(state, now)
        pauses.append(state.pause)
    assert pauses == [120, 240, 480, 900, 900, 900]
    assert state.paused_until == now + 900


def test_a_quiet_interval_resets_the_pause_length() -> None:
    state = _slow(_fresh(), T0)
    state = _slow(state, state.paused_until + 10)
    assert state.pause == 120
    state = _slow(state, state.paused_until + 61)
    assert state.pause == 60


def test_decrease_starts_from_the_recovered_rate() -> None:
    state = _slow(_fresh(), T0)  # 5.0 from T0 + 60
    state = _slow(state, T0 + 60 + 3 * 60)  # recovered to 8.0, then halved
    assert current_rate(state, state.paused_until) == pytest.approx(4.0)


def test_rate_never_falls_below_the_floor() -> None:
    state = _fresh()
    for _ in range(20):
        state = _slow(state, state.paused_until + 1)
    assert state.rate == pytest.approx(BASE * POLICY.min_rate_fraction)


def test_unrelated_replies_leave_the_state_alone() -> None:
    state = _slow(_fresh(), T0)
    assert observe_reply(state, 250, "2.0.0", "OK", T0 + 5) is state
    assert observe_reply(state, 550, "5.1.1", "no such user", T0 + 5) is state


# --- blocks: suspension, alert, operator resume ------------------------------------------


def test_block_suspends_and_raises_an_alert_without_keeping_the_text() -> None:
    state = _block(_fresh(), T0)
    assert is_suspended(state, T0 + 1) and current_rate(state, T0 + 1) == 0.0
    assert state.alert and state.blocks == 1
    assert state.block_code == "5.7.1"
    assert "192.0.2.1" not in repr(state)
    assert available_at(state, T0) == T0 + POLICY.block_cooldown


def test_block_code_falls_back_to_the_basic_code() -> None:
    state = observe_reply(_fresh(), 554, None, "blocked", T0)
    assert state.block_code == "554"


def test_after_the_cooldown_the_ip_restarts_slowly_and_the_alert_stays() -> None:
    state = _block(_fresh(), T0)
    end = T0 + POLICY.block_cooldown
    assert not is_suspended(state, end)
    assert current_rate(state, end) == pytest.approx(BASE * POLICY.min_rate_fraction)
    assert current_rate(state, end + 60) == pytest.approx(BASE * (0.05 + 0.1))
    assert state.alert


def test_operator_resume_clears_the_alert_and_climbs_from_the_floor() -> None:
    state = resume(_block(_fresh(), T0), T0 + 100)
    assert not is_suspended(state, T0 + 100) and not state.alert and state.block_code is None
    assert current_rate(state, T0 + 100) == pytest.approx(BASE * POLICY.min_rate_fraction)
    assert current_rate(state, T0 + 100 + 10 * 60) == pytest.approx(BASE)


def test_slow_downs_while_suspended_change_nothing_but_the_count() -> None:
    state = _block(_fresh(), T0)
    after = _slow(state, T0 + 5)
    assert after == dataclasses.replace(state, slow_downs=1)


def test_a_second_block_never_shortens_the_suspension() -> None:
    state = _block(_fresh(), T0)
    again = _block(state, T0 + 10)
    assert again.suspended_until == T0 + 10 + POLICY.block_cooldown
    assert again.blocks == 2
    shorter = dataclasses.replace(POLICY, block_cooldown=5.0)
    third = _block(dataclasses.replace(again, policy=shorter), T0 + 20)
    assert third.suspended_until == again.suspended_until


def test_block_while_paused_suspends() -> None:
    state = _block(_slow(_fresh(), T0), T0 + 1)
    assert is_suspended(state, T0 + 3600)


def test_sync_suspension_mirrors_the_shared_store() -> None:
    state = _fresh()
    until = T0 + 3600
    mirrored = sync_suspension(state, until, T0)
    assert is_suspended(mirrored, T0) and mirrored.suspended_until == until
    assert not mirrored.alert  # the worker that saw the block raised it
    assert sync_suspension(mirrored, until, T0) is mirrored
    lifted = sync_suspension(mirrored, None, T0 + 10)
    assert not is_suspended(lifted, T0 + 10)
    assert current_rate(lifted, T0 + 10) == pytest.approx(BASE * POLICY.min_rate_fraction)
    assert sync_suspension(state, None, T0) is state
    assert sync_suspension(state, T0 - 1, T0) is state


def test_initial_state_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError, match="positive"):
        initial_state(POLICY, 0.0, T0)


REPLIES = st.sampled_from(
    [
        (250, "2.0.0", "OK"),
        (421, "4.7.0", "try later"),
        (451, "4.7.28", "unusual rate"),
        (None, None, "refused"),
        (554, "5.7.1", "blocked"),
        (550, "5.1.1", "unknown user"),
    ]
)


@given(st.lists(st.tuples(REPLIES, st.floats(0, 4000)), max_size=40))
def test_rate_stays_between_zero_and_the_configured_rate(
    events: list[tuple[tuple[int | None, str | None, str], float]],
) -> None:
    state = _fresh()
    now = T0
    for (code, enhanced, text), gap in events:
        now += gap
        state = observe_reply(state, code, enhanced, text, now)
        rate = current_rate(state, now)
        assert 0.0 <= rate <= BASE
        assert (rate == 0.0) == (is_paused(state, now) or is_suspended(state, now))
        assert state.rate >= BASE * POLICY.min_rate_fraction - 1e-9
        assert available_at(state, now) >= now


# --- the per-(provider, IP) rate shaper (aiolimiter) -------------------------------------


async def test_shaper_uses_the_provider_rate_and_a_small_bucket() -> None:
    shaper = RateShaper(SETTINGS.limits)
    limiter = shaper.limiter("yahoo", "127.0.0.10")
    assert limiter.max_rate == 5  # the burst
    assert limiter.time_period == pytest.approx(5 / 3.0)
    assert shaper.rate("yahoo", "127.0.0.10") == 3.0
    assert shaper.rate("gmail", "127.0.0.10") == 10.0
    assert shaper.limits_for("microsoft").messages_per_connection == 50


async def test_shaper_lets_a_burst_through_then_holds() -> None:
    shaper = RateShaper(SETTINGS.limits)
    for _ in range(5):
        await shaper.acquire("other", "127.0.0.10", rate=0.001)
    assert not shaper.limiter("other", "127.0.0.10", rate=0.001).has_capacity()
    # Pairs are independent.
    assert shaper.limiter("other", "127.0.0.11", rate=0.001).has_capacity()


async def test_shaper_applies_a_backed_off_rate_and_keeps_the_limiter_while_unchanged() -> None:
    shaper = RateShaper(SETTINGS.limits)
    first = shaper.limiter("gmail", "127.0.0.10")
    assert shaper.limiter("gmail", "127.0.0.10") is first
    slowed = shaper.limiter("gmail", "127.0.0.10", rate=2.5)
    assert slowed is not first
    assert slowed.time_period == pytest.approx(5 / 2.5)
    assert shaper.rate("gmail", "127.0.0.10") == 2.5
    assert shaper.limiter("gmail", "127.0.0.10", rate=2.5) is slowed
    with pytest.raises(ValueError, match="paused"):
        shaper.limiter("gmail", "127.0.0.10", rate=0.0)
