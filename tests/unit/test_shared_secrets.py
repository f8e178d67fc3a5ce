"""Which keys a host may use with what a store records: the decision alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from eobblast.config import load_config
from eobblast.protect.services import (
    missed_rotations,
    portal_secrets,
    secret_trouble,
    verp_secrets,
)
from eobblast.state.fingerprints import Recorded, fingerprint

CONFIG = load_config(
    environ={}, overrides={"bounces": {"verp_previous_keys": ["3:/keys/verp-3.key"]}}
)
RING, REFERENCE = portal_secrets(CONFIG)
VERP, PREVIOUS = verp_secrets(CONFIG)


def test_names_and_settings() -> None:
    assert [s.check for s in (RING, REFERENCE, VERP, PREVIOUS)] == [
        "portal key_dir",
        "portal audit_key_file",
        "bounces verp_key_file",
        "bounces verp_previous_keys 3",
    ]
    assert (VERP.recorded_as("1"), PREVIOUS.path) == ("VERP key 1", Path("/keys/verp-3.key"))
    assert REFERENCE.recorded_as("") == "member-reference key"
    assert not PREVIOUS.made  # a rotated-out key is never made afresh


@pytest.mark.parametrize(
    ("ours", "recorded"),
    [
        ({"k1": "a"}, {}),  # the first host records its ring
        ({"k1": "a", "k2": "b"}, {"escrow key k1": "a"}),  # a rotation adds a key
        ({"k2": "b"}, {"escrow key k1": "a", "escrow key k2": "b"}),  # k1 retired
        ({"k1": "a"}, {"escrow key k1": "a", "escrow key k2": "b"}),  # k2 not copied yet
        ({"k1": "a"}, {"VERP key 1": "z", "member-reference key": "y"}),  # others' names
    ],
)
def test_a_key_ring_sharing_a_recorded_key_may_be_used(
    ours: dict[str, str], recorded: dict[str, str]
) -> None:
    assert secret_trouble(RING, ours, recorded) is None


def test_what_is_refused() -> None:
    recorded = {"escrow key k1": "a", "VERP key 1": "v", "member-reference key": "m"}
    assert "escrow key k1 in [portal] key_dir" in str(
        secret_trouble(RING, {"k1": "other", "k2": "b"}, recorded)
    )
    assert "holds none of the keys" in str(secret_trouble(RING, {"k9": "a"}, recorded))
    assert "one made here would differ" in str(secret_trouble(RING, None, recorded))
    assert "VERP key 1 in [bounces] verp_key_file" in str(
        secret_trouble(VERP, {"1": "other"}, recorded)
    )
    assert "member-reference key in" in str(secret_trouble(REFERENCE, {"": "x"}, recorded))
    # A missing key may be made where the store records none under its name: at the
    # first start, and at a rotation to a new VERP key id.
    assert secret_trouble(VERP, None, {}) is None
    assert secret_trouble(VERP, None, {"VERP key 2": "v"}) is None


def test_what_to_do_is_said() -> None:
    recorded = {"escrow key k1": "a", "VERP key 1": "v"}
    missing = str(secret_trouble(VERP, None, recorded))
    differs = str(secret_trouble(VERP, {"1": "other"}, recorded))
    made_here = str(secret_trouble(RING, {"k9": "b"}, recorded))
    for said in (missing, differs, made_here):
        assert "from the host whose keys the" in said and "first used" not in said
    # Recording this host's keys instead is for keys it holds, not for one it would make.
    assert "`eobblast keys record --config FILE verp --yes`" in differs
    assert "`eobblast keys record --config FILE escrow --yes`" in made_here
    assert "keys record" not in missing
    assert "a previous key is never made" in PREVIOUS.missing_previous()


def test_a_fingerprint_depends_on_the_name_it_is_recorded_under() -> None:
    key = bytes(range(32))
    assert fingerprint("VERP key 1", key) != fingerprint("member-reference key", key)
    assert fingerprint("VERP key 1", key) != fingerprint("VERP key 2", key)
    assert fingerprint("VERP key 1", key) == fingerprint("VERP key 1", bytes(range(32)))


def _at(**names: int) -> dict[str, Recorded]:
    """Recorded at the times given, by name (`VERP_1`: "VERP key 1")."""
    return {name.replace("_", " key "): Recorded("f", at) for name, at in names.items()}


@pytest.mark.parametrize(
    ("ours", "recorded", "missed"),
    [
        # Holds the newest VERP key (and the previous one): nothing missed.
        ({"1": "f", "2": "f"}, _at(VERP_1=1, VERP_2=2), []),
        # Key 1 retired: nothing missed either.
        ({"2": "f"}, _at(VERP_1=1, VERP_2=2), []),
        # Still signs with key 1 while the store records key 2 since: missed.
        ({"1": "f"}, _at(VERP_1=1, VERP_2=2), ["VERP key 2"]),
        # Key 1 recorded again after key 2 (`keys record`): nothing newer.
        ({"1": "f"}, _at(VERP_1=3, VERP_2=2), []),
        # A key of this host's that the store does not know yet is the newest.
        ({"3": "f"}, _at(VERP_1=1, VERP_2=2), []),
        # Other secrets' keys are no rotation of this one.
        ({"1": "f"}, _at(VERP_1=1, escrow_k2=9), []),
    ],
)
def test_a_rotation_this_host_missed(
    ours: dict[str, str], recorded: dict[str, Recorded], missed: list[str]
) -> None:
    assert missed_rotations([(VERP, ours)], recorded) == missed


def test_a_ring_that_missed_a_rotation() -> None:
    recorded = _at(escrow_k1=1, escrow_k2=2, VERP_1=5)
    assert missed_rotations([(RING, {"k1": "f"})], recorded) == ["escrow key k2"]
    assert missed_rotations([(RING, {"k1": "f", "k2": "f"})], recorded) == []
