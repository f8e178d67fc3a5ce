"""The eob.issued/v1 schema: valid events pass, every kind of bad input gets its reason code."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections import Counter
from typing import Any

import jsonschema
import orjson
import pytest

from eobblast.errors import ReasonCode
from eobblast.events import EobIssued, Rejection, json_schema, validate_event
from eobblast.events.status import DLQ_MAX_KEY, SourcePosition, dead_letter, dead_letter_key
from eobblast.events.synthetic import Mix, generate_events
from eobblast.events.verification import VerificationResultError, parse_verification_result
from eobblast.protect.policy import Preference
from eobblast.render.mime import Renderer
from tests.conftest import spoiled


def test_valid_event_is_accepted(event_doc: dict[str, Any]) -> None:
    event = validate_event(orjson.dumps(event_doc), allow_test_domains=True)
    assert isinstance(event, EobIssued)
    assert event.claim.lines[0].billed == event_doc["claim"]["lines"][0]["billed"]
    assert event.issued_at.tzinfo is not None


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("member.email", ..., ReasonCode.MISSING_FIELD),
        ("claim.lines.0.billed", 12.5, ReasonCode.MONEY_NOT_DECIMAL_STRING),
        ("claim.lines.0.plan_paid", 100, ReasonCode.MONEY_NOT_DECIMAL_STRING),
        ("claim.lines.0.copay", "12.5", ReasonCode.INVALID_VALUE),
        ("member.name", "Ann\r\nBcc: x@evil.test", ReasonCode.CONTROL_CHARACTERS),
        ("claim.patient_name", "Ann\x00", ReasonCode.CONTROL_CHARACTERS),
        ("claim.lines.0.description", "x" * 1_000_000, ReasonCode.EVENT_TOO_LARGE),
        ("claim.lines.0.description", "x" * 5000, ReasonCode.FIELD_TOO_LARGE),
        ("member.email", "not-an-address", ReasonCode.INVALID_ADDRESS),
        ("member.email", "a@b@alpha.sandbox.test", ReasonCode.INVALID_ADDRESS),
        ("member.email", "x@alpha.sandbox.test\r\nBcc: y@evil.test", ReasonCode.INVALID_ADDRESS),
        ("member.consent", "yes", ReasonCode.WRONG_TYPE),
        ("member.consent.electronic_delivery", "true", ReasonCode.WRONG_TYPE),
        ("claim.lines", [], ReasonCode.INVALID_VALUE),
        ("claim.provider.npi", "1234567890", ReasonCode.INVALID_VALUE),
        ("schema", "eob.issued/v0", ReasonCode.UNSUPPORTED_SCHEMA),
        ("member.nickname", "Bo", ReasonCode.UNKNOWN_FIELD),
        ("member.preference", "paper", ReasonCode.INVALID_VALUE),
        ("member.preference", "Portal", ReasonCode.INVALID_VALUE),
        ("member.preference", None, ReasonCode.INVALID_VALUE),
        ("issued_at", "2026-11-26T09:00:00", ReasonCode.INVALID_VALUE),
    ],
)
def test_bad_field_gets_reason_and_event_id(
    event_doc: dict[str, Any], path: str, value: Any, reason: ReasonCode
) -> None:
    result = validate_event(spoiled(event_doc, path, value), allow_test_domains=True)
    assert isinstance(result, Rejection)
    assert result.reason is reason
    if reason is not ReasonCode.EVENT_TOO_LARGE:
        assert result.event_id == event_doc["event_id"]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", ReasonCode.INVALID_JSON),
        (b"", ReasonCode.INVALID_JSON),
        (b"[1, 2]", ReasonCode.NOT_AN_OBJECT),
        (b'"just a string"', ReasonCode.NOT_AN_OBJECT),
        (b'{"event_id": "\xff\xfe"}', ReasonCode.INVALID_UTF8),
        (b"x" * 300_000, ReasonCode.EVENT_TOO_LARGE),
    ],
)
def test_unreadable_input_gets_reason(raw: bytes, reason: ReasonCode) -> None:
    result = validate_event(raw)
    assert isinstance(result, Rejection)
    assert result.reason is reason


def test_rejection_never_echoes_values(event_doc: dict[str, Any]) -> None:
    name = event_doc["member"]["name"]
    raw = spoiled(event_doc, "member.name", name + "\n")
    result = validate_event(raw, allow_test_domains=True)
    assert isinstance(result, Rejection)
    assert name not in repr(result) and name not in json.dumps(result.as_dict())
    assert result.as_dict() == {
        "reason": "control_characters",
        "event_id": event_doc["event_id"],
        "field": "member.name",
    }


def test_event_id_that_looks_like_phi_is_not_echoed(event_doc: dict[str, Any]) -> None:
    raw = spoiled(event_doc, "event_id", "Jane Doe, 12 Elm St")
    result = validate_event(raw, allow_test_domains=True)
    assert isinstance(result, Rejection)
    assert result.event_id is None


def test_an_internationalised_domain_is_kept_in_its_ascii_form(event_doc: dict[str, Any]) -> None:
    # "bücher.example" passed as Unicode, then every render failed on the ASCII To header.
    doc = {**event_doc, "member": {**event_doc["member"], "email": "Maria@Bücher.example"}}
    event = validate_event(orjson.dumps(doc), allow_test_domains=True)
    assert isinstance(event, EobIssued)
    assert event.member.email == "Maria@xn--bcher-kva.example"
    message = Renderer().render(event)
    assert (b"To", b"Maria@xn--bcher-kva.example") in message.headers
    assert message.rcpt_to == "Maria@xn--bcher-kva.example"


@pytest.mark.parametrize("preference", list(Preference))
def test_a_members_delivery_preference_is_read(
    event_doc: dict[str, Any], preference: Preference
) -> None:
    # A member's request for the portal (a confidential-communications request) was an
    # unknown field: the whole event was parked, and the request could never take effect.
    raw = spoiled(event_doc, "member.preference", str(preference))
    event = validate_event(raw, allow_test_domains=True)
    assert isinstance(event, EobIssued)
    assert Preference(event.member.preference) is preference


def test_an_event_without_a_preference_means_none(event_doc: dict[str, Any]) -> None:
    assert "preference" not in event_doc["member"]  # as producers before the field send it
    event = validate_event(orjson.dumps(event_doc), allow_test_domains=True)
    assert isinstance(event, EobIssued)
    assert Preference(event.member.preference) is Preference.NONE


def test_an_unknown_preference_names_its_field_not_its_value(event_doc: dict[str, Any]) -> None:
    result = validate_event(
        spoiled(event_doc, "member.preference", "fax to Jane"), allow_test_domains=True
    )
    assert isinstance(result, Rejection)
    assert result.as_dict() == {
        "reason": "invalid_value",
        "event_id": event_doc["event_id"],
        "field": "member.preference",
    }


def test_the_exported_schema_lists_the_preferences(event_doc: dict[str, Any]) -> None:
    schema = json_schema()
    member = schema["$defs"]["Member"]
    assert "preference" not in member["required"]
    assert member["properties"]["preference"]["enum"] == [str(p) for p in Preference]
    assert member["properties"]["preference"]["default"] == "none"
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(orjson.loads(spoiled(event_doc, "member.preference", "portal")))
    assert not validator.is_valid(orjson.loads(spoiled(event_doc, "member.preference", "paper")))


def test_test_domains_need_opt_in(event_doc: dict[str, Any]) -> None:
    result = validate_event(orjson.dumps(event_doc))
    assert isinstance(result, Rejection)
    assert result.reason is ReasonCode.INVALID_ADDRESS


def test_exported_json_schema_agrees_with_the_validator(event_doc: dict[str, Any]) -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(event_doc)  # a valid event is valid under the exported schema
    bad = orjson.loads(spoiled(event_doc, "claim.lines.0.billed", 12.5))
    assert not validator.is_valid(bad)  # money as a float is refused by both


def test_generator_exercises_every_path() -> None:
    now = dt.datetime(2026, 11, 26, tzinfo=dt.UTC)
    outcomes: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    domains: Counter[str] = Counter()
    for raw in generate_events(1500, seed=3, now=now):
        result = validate_event(raw, allow_test_domains=True)
        if isinstance(result, Rejection):
            outcomes[result.reason] += 1
            continue
        outcomes["valid"] += 1
        languages[result.member.preferred_language] += 1
        domains[result.member.email.rpartition("@")[2]] += 1
        if not result.member.consent.electronic_delivery:
            outcomes["no_consent"] += 1
        if result.member.email.startswith("unknown-"):
            outcomes["unknown_user"] += 1
    assert outcomes["valid"] > 1300
    for reason in ("no_consent", "unknown_user", "invalid_address", "invalid_json"):
        assert outcomes[reason] > 0, reason
    assert languages["en"] > 0 and languages["es"] > 0
    assert len(domains) == 8


def test_generator_is_deterministic() -> None:
    now = dt.datetime(2026, 11, 26, tzinfo=dt.UTC)
    assert list(generate_events(20, seed=5, now=now)) == list(generate_events(20, seed=5, now=now))


def test_the_generator_can_make_members_who_asked_for_the_portal() -> None:
    now = dt.datetime(2026, 11, 26, tzinfo=dt.UTC)
    plain = [orjson.loads(raw) for raw in generate_events(200, seed=5, now=now)]
    asked = [
        orjson.loads(raw)
        for raw in generate_events(200, seed=5, now=now, mix=Mix(prefers_portal=0.1))
    ]
    # By default nobody asks (the output as before the field); turned on, some do, and
    # nothing else of any event changes.
    assert not any("preference" in doc.get("member", {}) for doc in plain)
    chosen = [doc for doc in asked if doc.get("member", {}).pop("preference", None) == "portal"]
    assert 5 < len(chosen) < 40
    assert asked == plain


def test_unknown_key_names_are_not_echoed(event_doc: dict[str, Any]) -> None:
    # A producer that keys a map by patient name must not see the name come back.
    key = "Jane Q Public, DOB 1970-01-01"
    raw = spoiled(event_doc, f"member.{key}", "x")
    result = validate_event(raw, allow_test_domains=True)
    assert isinstance(result, Rejection)
    assert result.reason is ReasonCode.UNKNOWN_FIELD
    assert result.field == "member"  # the object holding the unknown key, not the key
    assert "Jane" not in json.dumps(result.as_dict())


def test_verification_result_errors_do_not_echo_key_names() -> None:
    doc = {
        "schema": "eob.address-verification-failed/v1",
        "member_id": "M-1",
        "reason": "no_answer",
        "at": "2026-11-26T09:00:00Z",
        "Jane Q Public": "x",
    }
    with pytest.raises(VerificationResultError) as caught:
        parse_verification_result(orjson.dumps(doc))
    assert "Jane" not in str(caught.value)
    assert "extra_forbidden" in str(caught.value)
    assert (caught.value.reason, caught.value.field) == (ReasonCode.UNKNOWN_FIELD, None)


FAILED_RESULT = {
    "schema": "eob.address-verification-failed/v1",
    "member_id": "M-1",
    "reason": "no_answer",
    "at": "2026-11-26T09:00:00Z",
}


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        (None, ReasonCode.EMPTY_VALUE, None),  # a tombstone
        (b"", ReasonCode.EMPTY_VALUE, None),
        (b"{not json", ReasonCode.INVALID_JSON, None),
        (b"x" * (16 * 1024 + 1), ReasonCode.EVENT_TOO_LARGE, None),
        (b"[1, 2]", ReasonCode.NOT_AN_OBJECT, None),
        (
            orjson.dumps(FAILED_RESULT | {"schema": "eob.issued/v1"}),
            ReasonCode.UNSUPPORTED_SCHEMA,
            "schema",
        ),
        (orjson.dumps({"member_id": "M-1"}), ReasonCode.MISSING_FIELD, "schema"),
        (orjson.dumps(FAILED_RESULT | {"member_id": None}), ReasonCode.WRONG_TYPE, "member_id"),
        (orjson.dumps(FAILED_RESULT | {"reason": "lost"}), ReasonCode.INVALID_VALUE, "reason"),
        (
            orjson.dumps({k: v for k, v in FAILED_RESULT.items() if k != "at"}),
            ReasonCode.MISSING_FIELD,
            "at",
        ),
    ],
)
def test_a_verification_result_refused_gets_an_input_reason_and_its_field(
    raw: bytes | None, reason: ReasonCode, field: str | None
) -> None:
    # The reason goes onto the dead letter and into the metric: the schema id that tells
    # the two results apart is no field of either.
    with pytest.raises(VerificationResultError) as caught:
        parse_verification_result(raw)
    assert (caught.value.reason, caught.value.field) == (reason, field)


def test_a_huge_key_cannot_make_its_dead_letter_too_large_to_send() -> None:
    # The key was kept whole (raw as the dead letter's Kafka key, and again in base64): a
    # 7 MiB key made a record over the producer's limit, retried for ever, and the
    # partition's commits stopped.
    key = b"k" * (7 * 1024 * 1024)
    letter = dead_letter(
        b"{",
        key,
        reason=ReasonCode.INVALID_JSON,
        field=None,
        event_id=None,
        source=SourcePosition(topic="eob.events", partition=0, offset=1),
    )
    assert letter.key_truncated and letter.key_size == len(key)
    assert base64.b64decode(letter.key_base64 or "") == key[:DLQ_MAX_KEY]
    assert len(orjson.dumps(letter.model_dump(mode="json", by_alias=True))) < 4096
    assert dead_letter_key(key) == hashlib.sha256(key).hexdigest().encode()
    assert dead_letter_key(b"M-123") == b"M-123" and dead_letter_key(None) is None
