"""Verify-before-resend events: requests out, results in, paper fallbacks out.

* `eob.address-verification/v1` (topic `eob.address-verification`): eobblast asks the claims
  system to confirm a member's address through a verified channel.
* `eob.address-verified/v1` and `eob.address-verification-failed/v1` (topic
  `eob.address-verification.results`): the claims system's answer.
* `eob.paper-fallback/v1` (topic `eob.paper-fallback`): this notice goes by paper mail.

Every record is keyed by the member id, so one member's requests, answers and fallbacks stay
in order on one partition. The values carry ids and codes, never an address eobblast already
had (the claims system has it on file); the only address is the verified one coming in.
Errors name the field, never its value.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated, Any, Literal

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from eobblast.errors import EobblastError, ReasonCode
from eobblast.events.schema import (
    UNION_TAG_ERRORS,
    Email,
    Identifier,
    error_field,
    export_schema,
    reason_of,
)

__all__ = [
    "PAPER_FALLBACK_SCHEMA_ID",
    "REQUEST_SCHEMA_ID",
    "VERIFICATION_FAILED_SCHEMA_ID",
    "VERIFIED_SCHEMA_ID",
    "AddressVerificationFailed",
    "AddressVerificationRequested",
    "AddressVerified",
    "FailureReason",
    "PaperFallback",
    "PaperFallbackReason",
    "VerificationChannel",
    "VerificationResult",
    "VerificationResultError",
    "dump",
    "paper_fallback_json_schema",
    "parse_verification_result",
    "utc",
    "verification_request_json_schema",
    "verification_result_json_schema",
]

REQUEST_SCHEMA_ID = "eob.address-verification/v1"
VERIFIED_SCHEMA_ID = "eob.address-verified/v1"
VERIFICATION_FAILED_SCHEMA_ID = "eob.address-verification-failed/v1"
PAPER_FALLBACK_SCHEMA_ID = "eob.paper-fallback/v1"
MAX_RESULT_BYTES = 16 * 1024
MAX_EVENT_IDS = 1000

# Who or what confirmed the address: an operator or system id, never a person's name.
Actor = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")]


class VerificationChannel(enum.StrEnum):
    """How the claims system reached the member. Email is deliberately absent: an answer by
    email comes from whoever reads that mailbox, which is the very thing in doubt."""

    PHONE = "phone"
    SMS = "sms"
    PORTAL = "portal"
    MAIL = "mail"
    IN_PERSON = "in_person"


class FailureReason(enum.StrEnum):
    """Why a verification ended without a confirmed address."""

    NO_ANSWER = "no_answer"
    UNREACHABLE = "unreachable"
    DECLINED = "declined"
    IDENTITY_NOT_CONFIRMED = "identity_not_confirmed"
    NO_EMAIL_ON_FILE = "no_email_on_file"
    OTHER = "other"


class PaperFallbackReason(enum.StrEnum):
    """Why a notice goes by paper (the state machine's reasons plus the shell's own)."""

    RETRIES_EXHAUSTED = "retries_exhausted"
    UNDELIVERABLE = "undeliverable"
    VERIFICATION_FAILED = "verification_failed"
    VERIFICATION_TIMEOUT = "verification_timeout"
    # The raw event was no longer kept when the notice could be sent again.
    PAYLOAD_UNAVAILABLE = "payload_unavailable"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class AddressVerificationRequested(_Model):
    """eobblast asks for a member's address to be confirmed (key: the member id)."""

    schema_: Literal["eob.address-verification/v1"] = Field(
        default="eob.address-verification/v1", alias="schema"
    )
    request_id: str = Field(
        description="Deterministic: a republished request has the same id.",
        pattern=r"^[0-9a-f]{32}$",
    )
    member_id: Identifier
    event_ids: tuple[Identifier, ...] = Field(
        description="Notices held for this member when the request was made (more may follow "
        "until the answer arrives; all are released or fall back together).",
        max_length=MAX_EVENT_IDS,
    )
    reason: str = Field(
        description="The bounce category that suppressed the address, e.g. hard_address, or "
        "address_suppressed for a notice held on an address suppressed earlier.",
        pattern=r"^[a-z_]{1,32}$",
    )
    requested_at: AwareDatetime
    deadline: AwareDatetime = Field(
        description="Without an answer by then every held notice falls back to paper."
    )


class AddressVerified(_Model):
    """The member confirmed an address through a verified channel (key: the member id)."""

    schema_: Literal["eob.address-verified/v1"] = Field(
        default="eob.address-verified/v1", alias="schema"
    )
    request_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    member_id: Identifier
    address: Email = Field(description="The confirmed address: the same one or a new one.")
    channel: VerificationChannel
    verified_by: Actor
    at: AwareDatetime


class AddressVerificationFailed(_Model):
    """The member's address could not be confirmed (key: the member id)."""

    schema_: Literal["eob.address-verification-failed/v1"] = Field(
        default="eob.address-verification-failed/v1", alias="schema"
    )
    request_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    member_id: Identifier
    reason: FailureReason
    at: AwareDatetime


class PaperFallback(_Model):
    """Send this notice by paper mail instead (key: the member id). Final for the notice."""

    schema_: Literal["eob.paper-fallback/v1"] = Field(
        default="eob.paper-fallback/v1", alias="schema"
    )
    fallback_id: str = Field(
        description="Deterministic: a republished fallback has the same id.",
        pattern=r"^[0-9a-f]{32}$",
    )
    event_id: Identifier
    member_id: Identifier
    reason: PaperFallbackReason
    occurred_at: AwareDatetime


VerificationResult = Annotated[
    AddressVerified | AddressVerificationFailed, Field(discriminator="schema_")
]
_RESULT: TypeAdapter[AddressVerified | AddressVerificationFailed] = TypeAdapter(VerificationResult)


class VerificationResultError(EobblastError):
    """A verification result could not be read: an input reason code, the field path (or
    None) and a detail naming them, never a value."""

    def __init__(self, reason: ReasonCode, detail: str, field: str | None = None) -> None:
        super().__init__(reason, detail)
        self.field = field


def parse_verification_result(
    raw: bytes | None, *, allow_test_domains: bool = False
) -> AddressVerified | AddressVerificationFailed:
    """Validate one record's value from `eob.address-verification.results`."""
    if not raw:
        # A tombstone, or a value a producer forgot: nothing to apply.
        raise VerificationResultError(ReasonCode.EMPTY_VALUE, "verification result empty")
    if len(raw) > MAX_RESULT_BYTES:
        raise VerificationResultError(ReasonCode.EVENT_TOO_LARGE, "verification result too large")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise VerificationResultError(
            ReasonCode.INVALID_JSON, "verification result is not JSON"
        ) from None
    try:
        return _RESULT.validate_python(doc, context={"allow_test_domains": allow_test_domains})
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        # A result's path starts with its schema id (the union's tag), which is no field.
        tag_error = first["type"] in UNION_TAG_ERRORS
        where = "schema" if tag_error else error_field(first, skip=1)
        at = f" field {where}" if where else ""
        raise VerificationResultError(
            reason_of(first), f"verification result{at}: {first['type']}", where
        ) from None


def verification_request_json_schema() -> dict[str, Any]:
    """The JSON Schema of `eob.address-verification/v1`."""
    return export_schema(AddressVerificationRequested, REQUEST_SCHEMA_ID)


def verification_result_json_schema() -> dict[str, Any]:
    """The JSON Schema of a record on `eob.address-verification.results` (either result)."""
    return export_schema(_RESULT, "eob.address-verification.results/v1")


def paper_fallback_json_schema() -> dict[str, Any]:
    """The JSON Schema of `eob.paper-fallback/v1`."""
    return export_schema(PaperFallback, PAPER_FALLBACK_SCHEMA_ID)


def dump(model: BaseModel) -> bytes:
    """The wire form of an outgoing record (JSON, schema ids under their alias)."""
    return orjson.dumps(model.model_dump(mode="json", by_alias=True))


def utc(when: dt.datetime) -> dt.datetime:
    """A timezone-aware time in UTC (the schemas refuse naive times)."""
    return when.astimezone(dt.UTC)
