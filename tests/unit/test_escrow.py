"""Escrow crypto and pickup decisions: pure, no database, no sockets."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import secrets
from pathlib import Path
from typing import Any

import orjson
import pytest

from eobblast.errors import ConfigError
from eobblast.portal.app import KeyedTokenBucket, Rate, csrf_token, csrf_valid, parse_dob
from eobblast.protect.escrow import (
    EscrowIntegrityError,
    ItemRow,
    KeyRing,
    PickupClient,
    PickupFailure,
    PickupOpened,
    PickupRefused,
    attempt_pickup,
    identity_matches,
    last4_digits,
    link_failure,
)

ITEM = "a" * 32
OTHER = "b" * 32
SECRET = b"<html>Jane Roe, DOB 1961-04-02, claim C123456789012</html>"


def ring(*names: str, active: str | None = None) -> KeyRing:
    keys = {name: secrets.token_bytes(32) for name in names}
    return KeyRing(keys, active or names[-1])


def test_round_trip() -> None:
    keys = ring("k1")
    sealed = keys.seal(ITEM, SECRET)
    assert SECRET not in sealed
    assert keys.open(ITEM, sealed) == SECRET


def test_each_seal_uses_fresh_nonces_and_data_keys() -> None:
    keys = ring("k1")
    assert keys.seal(ITEM, SECRET) != keys.seal(ITEM, SECRET)


def test_flipping_any_byte_fails() -> None:
    keys = ring("k1", "k2")
    sealed = keys.seal(ITEM, SECRET)
    for i in range(len(sealed)):
        spoiled = bytearray(sealed)
        spoiled[i] ^= 0x01
        with pytest.raises(EscrowIntegrityError):
            keys.open(ITEM, bytes(spoiled))


def test_truncated_and_empty_envelopes_fail() -> None:
    keys = ring("k1")
    sealed = keys.seal(ITEM, SECRET)
    for cut in (0, 1, 2, 10, 60, len(sealed) - 1):
        with pytest.raises(EscrowIntegrityError):
            keys.open(ITEM, sealed[:cut])


def test_ciphertext_is_bound_to_its_item() -> None:
    keys = ring("k1")
    mine, theirs = keys.seal(ITEM, SECRET), keys.seal(OTHER, b"other")
    # Swapped between rows, neither opens: the item id is associated data.
    with pytest.raises(EscrowIntegrityError):
        keys.open(ITEM, theirs)
    with pytest.raises(EscrowIntegrityError):
        keys.open(OTHER, mine)


def test_rotation_keeps_old_items_readable() -> None:
    k1 = secrets.token_bytes(32)
    before = KeyRing({"k1": k1}, "k1")
    old = before.seal(ITEM, SECRET)
    after = KeyRing({"k1": k1, "k2": secrets.token_bytes(32)}, "k2")
    assert after.open(ITEM, old) == SECRET
    new = after.seal(OTHER, SECRET)
    assert KeyRing.key_id_of(old) == "k1"
    assert KeyRing.key_id_of(new) == "k2"
    with pytest.raises(EscrowIntegrityError):
        before.open(OTHER, new)  # k2 is unknown to the old ring
    rewrapped = after.rewrap(ITEM, old)
    assert KeyRing.key_id_of(rewrapped) == "k2"
    assert after.open(ITEM, rewrapped) == SECRET


def test_generate_and_load_from_directory(tmp_path: Path) -> None:
    first = KeyRing.generate(tmp_path, "k1")
    sealed = first.seal(ITEM, SECRET)
    second = KeyRing.generate(tmp_path)
    assert second.active_id != "k1"
    assert second.key_ids == {"k1", second.active_id}
    assert second.open(ITEM, sealed) == SECRET
    assert KeyRing.from_directory(tmp_path).active_id == second.active_id
    assert (tmp_path / "k1.key").stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        KeyRing.generate(tmp_path, "k1")  # a key file is never overwritten


def test_from_mapping_checks_keys() -> None:
    good = base64.b64encode(secrets.token_bytes(32)).decode()
    assert KeyRing.from_mapping({"k1": good}, "k1").active_id == "k1"
    with pytest.raises(ConfigError):
        KeyRing.from_mapping({"k1": base64.b64encode(b"short").decode()}, "k1")
    with pytest.raises(ConfigError):
        KeyRing.from_mapping({"k1": "not base64!"}, "k1")
    with pytest.raises(ConfigError):
        KeyRing.from_mapping({"k1": good}, "k2")
    with pytest.raises(ConfigError):
        KeyRing.from_mapping({"bad id": good}, "bad id")


# ---- pickup decisions

NOW = 1_800_000_000.0
DOB = dt.date(1961, 4, 2)


def row(keys: KeyRing, **changes: Any) -> ItemRow:
    payload = orjson.dumps({"html": "<p>EOB</p>", "dob": DOB.isoformat(), "last4_digits": "7890"})
    base = ItemRow(
        item_id=ITEM,
        event_id="evt-1",
        member_ref="0" * 32,
        language="en",
        envelope=keys.seal(ITEM, payload),
        expires_at=NOW + 3600,
        failed_attempts=0,
        locked=False,
        picked_up_at=None,
    )
    return dataclasses.replace(base, **changes)


def test_right_answers_open_once() -> None:
    keys = ring("k1")
    result, change = attempt_pickup(keys, row(keys), DOB, " 7890 ", NOW, 5)
    assert isinstance(result, PickupOpened) and result.html == "<p>EOB</p>"
    assert change is not None and change.picked_up_at == NOW


@pytest.mark.parametrize(
    ("member_id", "digits"),
    [
        ("XYZ123456789-01", "8901"),  # a dependant's suffix: what "last 4 digits" means
        ("M1234567890", "7890"),
        ("AB-12", "12"),  # fewer than 4 digits: all of them
        ("7", "7"),
        ("1.2:3_4-5", "2345"),
        ("ABCD-XY", ""),  # none: no answer can match
    ],
)
def test_the_check_takes_the_last_4_digits_of_the_member_id(member_id: str, digits: str) -> None:
    assert last4_digits(member_id) == digits
    payload = {"dob": DOB.isoformat(), "last4_digits": last4_digits(member_id)}
    assert identity_matches(payload, DOB, f" {digits} ") is bool(digits)
    if member_id[-4:] != digits:  # the last four characters are not the answer
        assert not identity_matches(payload, DOB, member_id[-4:])
    assert not identity_matches(payload, dt.date(1961, 4, 3), digits)
    assert not identity_matches(payload, DOB, "")


def test_items_sealed_with_the_last_4_characters_open_with_the_digits() -> None:
    # Items escrowed before the check took digits hold "9-01" for XYZ123456789-01: the
    # member following the notice types 8901, which ends in the 901 known.
    legacy = {"dob": DOB.isoformat(), "last4": "9-01"}
    assert identity_matches(legacy, DOB, "8901")
    assert identity_matches(legacy, DOB, "901")
    assert not identity_matches(legacy, DOB, "8900")
    assert not identity_matches(legacy, DOB, "01")
    assert not identity_matches(legacy, dt.date(2000, 1, 1), "8901")
    assert identity_matches({"dob": DOB.isoformat(), "last4": "7890"}, DOB, "7890")
    assert not identity_matches({"dob": DOB.isoformat(), "last4": "ABCD"}, DOB, "")
    # One digit among the four characters would leave "the answer ends in 5": not opened.
    assert not identity_matches({"dob": DOB.isoformat(), "last4": "5-AB"}, DOB, "12345")
    assert identity_matches({"dob": DOB.isoformat(), "last4": "45-A"}, DOB, "2345")
    keys = ring("k1")
    sealed = keys.seal(ITEM, orjson.dumps({"html": "x", **legacy}))
    result, _ = attempt_pickup(keys, row(keys, envelope=sealed), DOB, "8901", NOW, 5)
    assert isinstance(result, PickupOpened)


def test_a_pickup_client_is_stored_as_an_address_and_a_short_printable_agent() -> None:
    client = PickupClient.of("2001:DB8::0001", "Mozilla/5.0 \x00\u00e9" + "x" * 500)
    assert client.address == "2001:db8::1"
    assert client.user_agent.startswith("Mozilla/5.0 ??") and len(client.user_agent) == 128
    assert PickupClient.of("not-an-address", None) == PickupClient("unknown", "")
    assert PickupClient.of(None, "curl/8") == PickupClient("unknown", "curl/8")


@pytest.mark.parametrize(
    ("dob", "last4"), [(dt.date(1961, 4, 3), "7890"), (DOB, "7891"), (dt.date(2000, 1, 1), "0000")]
)
def test_wrong_answers_are_counted_then_lock(dob: dt.date, last4: str) -> None:
    keys = ring("k1")
    result, change = attempt_pickup(keys, row(keys, failed_attempts=3), dob, last4, NOW, 5)
    assert isinstance(result, PickupRefused)
    assert result.reason is PickupFailure.WRONG_ANSWER and result.failed_attempts == 4
    assert not result.just_locked and change is not None and not change.locked
    result, change = attempt_pickup(keys, row(keys, failed_attempts=4), dob, last4, NOW, 5)
    assert isinstance(result, PickupRefused) and result.just_locked
    assert change is not None and change.locked and change.picked_up_at is None


def test_dead_links_are_refused_without_a_change() -> None:
    keys = ring("k1")
    cases = {
        PickupFailure.UNKNOWN: None,
        PickupFailure.ALREADY_USED: row(keys, picked_up_at=NOW - 5, envelope=None),
        PickupFailure.LOCKED: row(keys, locked=True, failed_attempts=5),
        PickupFailure.EXPIRED: row(keys, expires_at=NOW),
    }
    for failure, item in cases.items():
        assert link_failure(item, NOW) is failure
        # Even the right answers do not open a dead link, and nothing is counted.
        result, change = attempt_pickup(keys, item, DOB, "7890", NOW, 5)
        assert isinstance(result, PickupRefused) and result.reason is failure
        assert change is None


def test_tampered_row_raises_instead_of_counting() -> None:
    keys = ring("k1")
    item = row(keys)
    swapped = row(keys, item_id=OTHER, envelope=item.envelope)
    with pytest.raises(EscrowIntegrityError):
        attempt_pickup(keys, swapped, DOB, "7890", NOW, 5)


# ---- portal helpers


def test_token_bucket_allows_a_burst_then_refills() -> None:
    bucket = KeyedTokenBucket(Rate(burst=3, per_minute=60))
    assert [bucket.take("ip", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("ip", 0.0) == pytest.approx(1.0)
    assert bucket.take("other", 0.0) == 0.0  # keys are independent
    assert bucket.take("ip", 1.5) == 0.0  # one token back after a second


def test_token_bucket_is_bounded() -> None:
    bucket = KeyedTokenBucket(Rate(burst=1, per_minute=1), max_keys=10)
    for i in range(100):
        bucket.take(str(i), 0.0)
    assert len(bucket._buckets) == 10


def test_csrf_token_is_bound_to_link_browser_and_time() -> None:
    secret = secrets.token_bytes(32)
    token = csrf_token(secret, "link-a", "nonce-1", 1000)
    assert csrf_valid(secret, "link-a", "nonce-1", token, 1100, 1800)
    assert not csrf_valid(secret, "link-b", "nonce-1", token, 1100, 1800)
    assert not csrf_valid(secret, "link-a", "nonce-2", token, 1100, 1800)
    assert not csrf_valid(secret, "link-a", None, token, 1100, 1800)
    assert not csrf_valid(secret, "link-a", "nonce-1", token, 5000, 1800)  # too old
    assert not csrf_valid(b"x" * 32, "link-a", "nonce-1", token, 1100, 1800)
    assert not csrf_valid(secret, "link-a", "nonce-1", "garbage", 1100, 1800)


def test_parse_dob() -> None:
    assert parse_dob("4", "2", "1961") == DOB
    assert parse_dob(" 04", "02 ", "1961") == DOB
    assert parse_dob("2", "30", "1961") is None
    assert parse_dob("4", "2", "61") is None
    assert parse_dob("", "2", "1961") is None
    assert parse_dob("٤", "2", "1961") is None  # non-ASCII digits
