"""Which keys a host may use with what a store records: the decision alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from eobblast.config import load_config
from eobblast.protect.services import portal_secrets, secret_trouble, verp_secrets

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
