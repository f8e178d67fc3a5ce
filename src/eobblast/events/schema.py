"""The `eob.issued/v1` event, modelled on FHIR R4 ExplanationOfBenefit and CARIN Blue Button.

Validation uses pydantic at the boundary only. A rejected event yields a `Rejection`
carrying a reason code, the offending field's path and the event id: never the value,
so no PHI can leak through an error.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from eobblast.errors import ReasonCode

SCHEMA_ID = "eob.issued/v1"
MAX_EVENT_BYTES = 256 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
_EVENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def _no_control_characters(value: str) -> str:
    # Control characters (CR/LF above all) could forge headers or break the layout.
    if _CONTROL.search(value):
        raise PydanticCustomError("control_characters", "control characters are not allowed")
    return value


def _money_is_a_string(value: Any) -> Any:
    # Floats lose cents; integers hide the currency scale. Both are refused by type.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise PydanticCustomError("money_not_decimal_string", "money must be a decimal string")
    return value


# The plain addresses nearly every event carries: an ASCII dot-atom local part and an ASCII
# letter-digit-hyphen domain whose last label ends with a letter. email_validator accepts
# these unchanged but for the domain's case and spends ~35 us per address proving it, so
# they are checked here; everything else still goes to email_validator. This relies on its
# defaults (not strict, globally deliverable); tests/unit/test_event_fields.py holds
# the two to the same answers.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # 1-63, no hyphen at either end
_TOP_LABEL = r"(?:[A-Za-z0-9][A-Za-z0-9-]{0,61})?[A-Za-z]"  # the same, ending with a letter
_PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@(?:{_LABEL}\.)+{_TOP_LABEL}")
_EMAIL_MAX_LENGTH = 254
_DOMAIN_MAX_LENGTH = 253
# RFC 2142 mailbox names, which email_validator lowercases: left to it.
_CASE_INSENSITIVE_MAILBOXES = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)
# A longer local part is left to email_validator: whether it refuses one depends on its
# version (2.1-2.2 do; 2.3 and later only in strict mode).
_LOCAL_PART_MAX_LENGTH = 64
# "." + domain ends with one of these for a special-use name and for its subdomains.
_SPECIAL_USE_SUFFIXES = tuple("." + name for name in SPECIAL_USE_DOMAIN_NAMES)
_SPECIAL_USE_SUFFIXES_BUT_TEST = tuple(s for s in _SPECIAL_USE_SUFFIXES if s != ".test")


def _plain_address(value: str, *, allow_test: bool) -> str | None:
    """`value`'s ASCII form if it is a plain address email_validator accepts, else None."""
    if len(value) > _EMAIL_MAX_LENGTH or _PLAIN_ADDRESS.fullmatch(value) is None:
        return None
    local, _, domain = value.partition("@")
    # "--" covers Punycode ("xn--") labels, which need IDNA, and refused "ab--" labels.
    if (
        "--" in domain
        or len(domain) > _DOMAIN_MAX_LENGTH
        or len(local) > _LOCAL_PART_MAX_LENGTH
        or local.lower() in _CASE_INSENSITIVE_MAILBOXES
    ):
        return None
    domain = domain.lower()  # all that UTS 46 mapping does to an ASCII domain
    special = _SPECIAL_USE_SUFFIXES_BUT_TEST if allow_test else _SPECIAL_USE_SUFFIXES
    if ("." + domain).endswith(special):
        return None
    return f"{local}@{domain}"


def _checked_address(value: str, *, allow_test: bool) -> str | None:
    """`value`'s ASCII form as email_validator gives it, or None if it refuses `value`."""
    try:
        checked = validate_email(
            value,
            check_deliverability=False,
            test_environment=allow_test,
            allow_smtputf8=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
        )
    except EmailNotValidError:
        return None
    # None only for a non-ASCII local part, which allow_smtputf8=False already refuses.
    return checked.ascii_email


def _valid_address(value: str, info: ValidationInfo) -> str:
    allow_test = bool(info.context and info.context.get("allow_test_domains"))
    address = _plain_address(value, allow_test=allow_test)
    if address is None:
        address = _checked_address(value, allow_test=allow_test)
    if address is None:
        raise PydanticCustomError("invalid_address", "not a deliverable address")
    # An internationalised domain in its ASCII (punycode) form: what SMTP, the To header,
    # certificates' rfc822Name and the TLS and portal domain lists all use.
    return address


# NPI check digit: Luhn over "80840" + the ten digits (CMS NPI standard). The prefix adds
# 24; from the NPI's first digit on, every other digit is doubled (a two-digit product
# counts as its digit sum).
_NPI_PREFIX_SUM = 24
_LUHN_DOUBLED = dict(zip("0123456789", (0, 2, 4, 6, 8, 1, 3, 5, 7, 9), strict=True))
_LUHN_PLAIN = {c: int(c) for c in "0123456789"}


def _npi_checksum(value: str) -> str:
    # Runs after the ten-ASCII-digit pattern, so every character is a key of both tables.
    total = (
        _NPI_PREFIX_SUM
        + sum(map(_LUHN_DOUBLED.__getitem__, value[0::2]))
        + sum(map(_LUHN_PLAIN.__getitem__, value[1::2]))
    )
    if total % 10 != 0:
        raise PydanticCustomError("invalid_value", "NPI check digit mismatch")
    return value


Text = Annotated[
    str, StringConstraints(min_length=1, max_length=200), AfterValidator(_no_control_characters)
]
LongText = Annotated[
    str, StringConstraints(min_length=1, max_length=2000), AfterValidator(_no_control_characters)
]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
Money = Annotated[
    str,
    # [0-9], not \d: the validator's \d takes any script's digits, which Decimal may not.
    StringConstraints(pattern=r"^-?[0-9]{1,10}\.[0-9]{2}$"),
    # Outermost, so it sees the raw value first and the pattern stays in pydantic-core: a
    # constraint placed after a validator is checked by a Python wrapper on every value.
    BeforeValidator(_money_is_a_string),
    # The published contract stays as it was: money is a "string", pattern unpublished.
    WithJsonSchema({"type": "string"}),
]
Email = Annotated[str, StringConstraints(max_length=254), AfterValidator(_valid_address)]
Domain = Annotated[
    str,
    StringConstraints(
        max_length=253,
        pattern=r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,62}$",
    ),
]
Npi = Annotated[str, StringConstraints(pattern=r"^[0-9]{10}$"), AfterValidator(_npi_checksum)]
Language = Annotated[str, StringConstraints(pattern=r"^[a-z]{2}(-[A-Z]{2})?$")]
ProcedureCode = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]{4,7}$")]
RemarkCode = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]{1,6}$")]
# "none": no request on file, as for an event without the field (producers before it).
MemberPreference = Literal["none", "portal", "email"]
Pem = Annotated[
    str,
    StringConstraints(max_length=16384, pattern=r"^-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+"),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Payer(_Model):
    """The health plan sending the notice."""

    id: Identifier
    name: Text
    sending_domain: Domain


class Consent(_Model):
    """The member's consent to electronic delivery."""

    electronic_delivery: bool
    recorded_at: AwareDatetime | None = None


class Member(_Model):
    """The subscriber or dependant who receives the notice."""

    id: Identifier
    name: Text
    email: Email
    preferred_language: Language = "en"
    consent: Consent
    date_of_birth: dt.date | None = None
    smime_certificate: Pem | None = None
    # How the member asked to be sent their notices (protect.policy.Preference's values):
    # "portal" is a confidential-communications request, honoured above everything.
    preference: MemberPreference = "none"


class Provider(_Model):
    """Who rendered the service."""

    name: Text
    npi: Npi


class Period(_Model):
    """Service dates."""

    start: dt.date
    end: dt.date


class ServiceLine(_Model):
    """One adjudicated service line."""

    code: ProcedureCode
    description: Text
    billed: Money
    allowed: Money
    deductible: Money
    copay: Money
    coinsurance: Money
    plan_paid: Money
    member_owes: Money
    remark_codes: Annotated[list[RemarkCode], Field(max_length=10)] = []


class Claim(_Model):
    """The adjudicated claim."""

    id: Identifier
    patient_name: Text
    provider: Provider
    service_period: Period
    processed_date: dt.date
    lines: Annotated[list[ServiceLine], Field(min_length=1, max_length=50)]


class Accumulator(_Model):
    """How much of a yearly limit has been met."""

    met: Money
    limit: Money


class Accumulators(_Model):
    """Deductible and out-of-pocket progress."""

    deductible: Accumulator
    out_of_pocket: Accumulator


class AppealRights(_Model):
    """How and until when the member may appeal."""

    deadline: dt.date
    instructions: LongText


class EobIssued(_Model):
    """An Explanation of Benefits is ready to be sent to a member."""

    schema_: Literal["eob.issued/v1"] = Field(alias="schema")
    event_id: Identifier
    issued_at: AwareDatetime
    payer: Payer
    member: Member
    claim: Claim
    accumulators: Accumulators
    appeal: AppealRights


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an event was refused: a reason code, the field path and the event id only."""

    reason: ReasonCode
    event_id: str | None
    field: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        """The rejection as a plain mapping for status and DLQ records."""
        return {"reason": str(self.reason), "event_id": self.event_id, "field": self.field}


_TYPE_TO_REASON = {
    "missing": ReasonCode.MISSING_FIELD,
    "extra_forbidden": ReasonCode.UNKNOWN_FIELD,
    "json_invalid": ReasonCode.INVALID_JSON,
    "json_type": ReasonCode.INVALID_JSON,
    "string_too_long": ReasonCode.FIELD_TOO_LARGE,
    "too_long": ReasonCode.FIELD_TOO_LARGE,
    "control_characters": ReasonCode.CONTROL_CHARACTERS,
    "money_not_decimal_string": ReasonCode.MONEY_NOT_DECIMAL_STRING,
    "invalid_address": ReasonCode.INVALID_ADDRESS,
    "model_type": ReasonCode.WRONG_TYPE,
    "model_attributes_type": ReasonCode.WRONG_TYPE,
    # A union of record types told apart by their schema id (the verification results):
    # UNION_TAG_ERRORS.
    "union_tag_invalid": ReasonCode.UNSUPPORTED_SCHEMA,
    "union_tag_not_found": ReasonCode.MISSING_FIELD,
}
# The error types of a tagged union's tag (a record's schema id), which is no field.
UNION_TAG_ERRORS = frozenset({"union_tag_invalid", "union_tag_not_found"})


def _reason_for(error_type: str, loc: tuple[int | str, ...]) -> ReasonCode:
    if loc == ("schema",) and error_type == "literal_error":
        return ReasonCode.UNSUPPORTED_SCHEMA
    if error_type in _TYPE_TO_REASON:
        return _TYPE_TO_REASON[error_type]
    if error_type.endswith("_type") or error_type.endswith("_parsing"):
        return ReasonCode.WRONG_TYPE
    return ReasonCode.INVALID_VALUE


def reason_of(error: ErrorDetails) -> ReasonCode:
    """The reason code of a validation error of a record read from Kafka."""
    loc = tuple(error["loc"])
    reason = _reason_for(error["type"], loc)
    if reason is ReasonCode.WRONG_TYPE and loc == ():
        return ReasonCode.NOT_AN_OBJECT
    return reason


def error_field(error: ErrorDetails, *, skip: int = 0) -> str | None:
    """The dotted path of a validation error, without text taken from the input.

    For an unknown key the path stops at the object holding it: the key itself is the
    producer's text and could be PHI (a map keyed by patient name, say). `skip` leading
    parts name no field (a tagged union's tag).
    """
    loc = tuple(error["loc"])[skip:]
    if error["type"] == "extra_forbidden":
        loc = loc[:-1]
    return ".".join(str(part) for part in loc) or None


def _salvage_event_id(raw: bytes) -> str | None:
    # Only an id that looks like one is echoed back; anything else could be PHI.
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict):
        candidate = doc.get("event_id")
        if isinstance(candidate, str) and _EVENT_ID.match(candidate):
            return candidate
    return None


def validate_event(raw: bytes, *, allow_test_domains: bool = False) -> EobIssued | Rejection:
    """Validate one serialised event: the event, or a Rejection without PHI."""
    if len(raw) > MAX_EVENT_BYTES:
        return Rejection(ReasonCode.EVENT_TOO_LARGE, None)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return Rejection(ReasonCode.INVALID_UTF8, None)
    try:
        return EobIssued.model_validate_json(
            raw, context={"allow_test_domains": allow_test_domains}
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False, include_context=False)[0]
        reason = reason_of(first)
        field = error_field(first)
        event_id = None if reason is ReasonCode.INVALID_JSON else _salvage_event_id(raw)
        return Rejection(reason, event_id, field)


def export_schema(model: type[BaseModel] | TypeAdapter[Any], schema_id: str) -> dict[str, Any]:
    """A record type's JSON Schema (draft 2020-12) as published, `$id` from its schema id."""
    if isinstance(model, TypeAdapter):
        schema = model.json_schema(by_alias=True)
    else:
        schema = model.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://eobblast.dev/schemas/{schema_id}.json"
    return schema


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of `eob.issued/v1`."""
    return export_schema(EobIssued, SCHEMA_ID)
