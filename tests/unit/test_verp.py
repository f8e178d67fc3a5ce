"""VERP return paths: round trips, tamper resistance, key rotation, safe characters."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eobblast.bounces.verp import (
    TokenKind,
    VerpKey,
    carried_by_reference,
    event_reference,
    make_return_path,
    parse_return_path,
    read_return_path,
)

KEY = VerpKey(1, b"k" * 32)
NEW_KEY = VerpKey(2, b"n" * 32)
DOMAIN = "bounce.example.org"
EVENT_IDS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
SAFE_LOCAL = re.compile(r"^bounces\+[a-z2-7]+$")


def local_part(address: str) -> str:
    return address.rpartition("@")[0]


@given(EVENT_IDS)
@settings(max_examples=300)
def test_every_event_id_round_trips_within_64_safe_characters(event_id: str) -> None:
    address = make_return_path(event_id, KEY, DOMAIN)
    assert len(local_part(address)) <= 64
    assert SAFE_LOCAL.match(local_part(address))
    assert address.endswith("@" + DOMAIN)
    token = read_return_path(address, [KEY])
    assert token is not None
    if token.kind is TokenKind.REF:
        assert token.event_id is None and token.reference == event_reference(event_id)
        ledger = {event_reference(event_id): event_id}
        assert parse_return_path(address, [KEY], resolve_reference=ledger.get) == event_id
    else:
        assert parse_return_path(address, [KEY]) == event_id
    # MTAs that change case or add angle brackets do not break it.
    assert read_return_path(f"<{address.upper()}>", [KEY]) == token


def test_uuid_ids_are_carried_whole_and_compactly() -> None:
    event_id = str(uuid.UUID(int=7, version=4))
    address = make_return_path(event_id, KEY, DOMAIN)
    token = read_return_path(address, [KEY])
    assert token is not None and token.kind is TokenKind.UUID and token.event_id == event_id
    assert len(local_part(address)) == len("bounces+") + 44


@pytest.mark.parametrize(
    ("event_id", "kind"),
    [("EV-1", TokenKind.TEXT), ("a" * 31, TokenKind.TEXT), ("a" * 32, TokenKind.REF)],
)
def test_short_ids_are_direct_and_long_ones_by_reference(event_id: str, kind: TokenKind) -> None:
    token = read_return_path(make_return_path(event_id, KEY, DOMAIN), [KEY])
    assert token is not None and token.kind is kind


@given(EVENT_IDS, st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,15}\Z"))
@settings(max_examples=500)
def test_every_id_a_return_path_carries_by_reference_is_known_as_one(
    event_id: str, prefix: str
) -> None:
    # The bounce store keeps references of these ids only: one it lacks could not be mapped.
    address = make_return_path(event_id, KEY, DOMAIN, prefix=prefix)
    token = read_return_path(address, [KEY], prefix=prefix)
    assert token is not None
    if token.kind is TokenKind.REF:
        assert carried_by_reference(event_id)


@pytest.mark.parametrize("event_id", [str(uuid.UUID(int=7, version=4)), "EV-1", "a" * 23])
def test_uuids_and_short_ids_are_never_carried_by_reference(event_id: str) -> None:
    assert not carried_by_reference(event_id)
    for prefix in ("b", "bounces", "p" * 16):
        token = read_return_path(
            make_return_path(event_id, KEY, DOMAIN, prefix=prefix), [KEY], prefix=prefix
        )
        assert token is not None and token.kind is not TokenKind.REF


def test_the_event_id_is_not_readable_in_the_address() -> None:
    address = make_return_path("CLAIM-123456", KEY, DOMAIN)
    assert "claim" not in address.lower() and "123456" not in address


@given(
    EVENT_IDS,
    st.integers(min_value=8, max_value=63),
    st.sampled_from("abcdefghijklmnopqrstuvwxyz234567"),
)
@settings(max_examples=200)
def test_any_changed_character_is_rejected(event_id: str, position: int, char: str) -> None:
    address = make_return_path(event_id, KEY, DOMAIN)
    local = local_part(address)
    if position >= len(local) or local[position] == char:
        return
    tampered = local[:position] + char + local[position + 1 :] + "@" + DOMAIN
    assert read_return_path(tampered, [KEY]) is None


def test_rotation_old_keys_verify_and_unknown_keys_do_not() -> None:
    old = make_return_path("EV-1", KEY, DOMAIN)
    new = make_return_path("EV-1", NEW_KEY, DOMAIN)
    assert old != new
    assert parse_return_path(old, [NEW_KEY, KEY]) == "EV-1"
    assert parse_return_path(new, [NEW_KEY, KEY]) == "EV-1"
    assert parse_return_path(old, [NEW_KEY]) is None
    # Same key id, different secret (a forged key): rejected.
    assert parse_return_path(old, [VerpKey(1, b"x" * 32)]) is None


@pytest.mark.parametrize(
    "address",
    [
        "",
        "bounces@bounce.example.org",
        "bounces+@bounce.example.org",
        "other+aaaaaaaaaaaaaaaaaaaaaa@bounce.example.org",
        "bounces+aaaaaaaaaaaaaaaaaaaaaa@bounce.example.org",
        "bounces+!!!!!!!!!!!!!!!!!!!!@bounce.example.org",
        "bounces+" + "a" * 80 + "@bounce.example.org",
        "no-at-sign",
        "\x00\udcff@@",
    ],
)
def test_garbage_is_rejected_quietly(address: str) -> None:
    assert read_return_path(address, [KEY]) is None
    assert parse_return_path(address, [KEY]) is None


def test_bounce_domain_can_be_enforced() -> None:
    address = make_return_path("EV-1", KEY, DOMAIN)
    assert parse_return_path(address, [KEY], bounce_domain=DOMAIN) == "EV-1"
    assert parse_return_path(address, [KEY], bounce_domain="elsewhere.example") is None


@pytest.mark.parametrize(
    ("event_id", "domain", "prefix"),
    [
        ("bad id", DOMAIN, "bounces"),
        ("", DOMAIN, "bounces"),
        ("x" * 65, DOMAIN, "bounces"),
        ("EV-1", "not a domain", "bounces"),
        ("EV-1", DOMAIN, "Bounces!"),
    ],
)
def test_bad_inputs_are_refused_without_echoing_them(
    event_id: str, domain: str, prefix: str
) -> None:
    with pytest.raises(ValueError) as info:
        make_return_path(event_id, KEY, domain, prefix=prefix)
    if event_id:
        assert event_id not in str(info.value)


def test_key_validation_and_secret_hidden_from_repr() -> None:
    with pytest.raises(ValueError):
        VerpKey(64, b"k" * 32)
    with pytest.raises(ValueError):
        VerpKey(1, b"short")
    assert "kkkk" not in repr(KEY)
