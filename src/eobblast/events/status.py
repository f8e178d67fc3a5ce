"""Outgoing schemas: `eob.delivery/v1` status events and `eob.events.dlq/v1` dead letters.

Both are versioned and exported as JSON Schema like the input. Neither carries PHI: a
status names the event, the outcome and codes; a dead letter carries the original bytes
(the DLQ topic is access-controlled like the input topic) plus the reason.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from eobblast.errors import Outcome, ReasonCode
from eobblast.events.schema import MAX_EVENT_BYTES, export_schema

STATUS_SCHEMA_ID = "eob.delivery/v1"
DLQ_SCHEMA_ID = "eob.events.dlq/v1"
# Originals above this size are kept as a prefix plus their size and digest. A larger one
# is refused as event_too_large, so it could never be replayed; the original itself stays on
# the input topic at `source` within its retention. Base64 and the envelope keep every dead
# letter under 360 KiB, well inside Apache Kafka's default max.message.bytes (1 MiB).
DLQ_MAX_ORIGINAL = MAX_EVENT_BYTES
# A record's key is a member id: a longer one is kept as a prefix (and the dead letter's own
# Kafka key becomes its hash), so a huge key cannot make the dead letter too large to send.
DLQ_MAX_KEY = 1024


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeliveryStatus(_Out):
    """The final status of one input record (key: the event id)."""

    schema_: Literal["eob.delivery/v1"] = Field(default="eob.delivery/v1", alias="schema")
    status_id: str = Field(
        description="Deterministic id: the same status republished has the same id."
    )
    event_id: str | None = Field(description="The event id, when the input carried a valid one.")
    status: Outcome
    reason: ReasonCode
    field: str | None = None
    smtp_code: int | None = None
    enhanced_status: str | None = None
    tls_version: str | None = None
    protection: str | None = Field(
        default=None, description="smime, tls_required or portal (never plaintext)."
    )
    protection_reason: str | None = Field(
        default=None, description="Why that protection level (a policy reason code)."
    )
    retry_at: dt.datetime | None = Field(
        default=None, description="For deferred: when the next attempt is due."
    )
    bounce_category: str | None = Field(
        default=None, description="The bounce category (hard_address, soft ...), if any."
    )
    attempt: int = 1
    worker: str
    occurred_at: dt.datetime
    source_timestamp: dt.datetime | None = Field(
        default=None, description="When the input record was appended to eob.events."
    )


class SourcePosition(_Out):
    """Where the rejected record was read: the input topic, or the address-verification
    results topic."""

    topic: str
    partition: int
    offset: int

    def key(self) -> str:
        """`topic/partition/offset`: the status key of a record with no event id."""
        return f"{self.topic}/{self.partition}/{self.offset}"


class DeadLetter(_Out):
    """A rejected input record (an event, or an address-verification result), parked with
    its reason and the original bytes. Only one read from the input topic can be replayed."""

    schema_: Literal["eob.events.dlq/v1"] = Field(default="eob.events.dlq/v1", alias="schema")
    reason: ReasonCode
    field: str | None = None
    event_id: str | None = None
    source: SourcePosition
    original_base64: str = Field(
        description="The original value (a prefix when truncated; empty when truncated and"
        " the dead-letter topic refused the whole letter)."
    )
    original_size: int
    original_sha256: str
    truncated: bool
    key_base64: str | None = Field(
        default=None, description="The original key (a prefix when key_truncated)."
    )
    key_size: int | None = None
    key_truncated: bool = False
    rejected_at: dt.datetime


def status_id(event_key: str, status: str, attempt: int) -> str:
    """A stable id for a status, so consumers can recognise a republished one."""
    return hashlib.sha256(f"{event_key}|{status}|{attempt}".encode()).hexdigest()[:32]


def dead_letter(
    original: bytes | None,
    key: bytes | None,
    *,
    reason: ReasonCode,
    field: str | None,
    event_id: str | None,
    source: SourcePosition,
) -> DeadLetter:
    """Build the dead letter for a rejected record."""
    data = original or b""
    kept = data[:DLQ_MAX_ORIGINAL]
    return DeadLetter(
        reason=reason,
        field=field,
        event_id=event_id,
        source=source,
        original_base64=base64.b64encode(kept).decode("ascii"),
        original_size=len(data),
        original_sha256=hashlib.sha256(data).hexdigest(),
        truncated=len(kept) < len(data),
        key_base64=base64.b64encode(key[:DLQ_MAX_KEY]).decode("ascii") if key is not None else None,
        key_size=len(key) if key is not None else None,
        key_truncated=key is not None and len(key) > DLQ_MAX_KEY,
        rejected_at=dt.datetime.now(dt.UTC),
    )


def without_original(letter: DeadLetter) -> DeadLetter:
    """The dead letter with no original bytes, for a DLQ topic that refused it whole.

    Its size, digest and source position still say which record it was.
    """
    if not letter.original_base64:
        return letter
    return letter.model_copy(update={"original_base64": "", "truncated": True})


def dead_letter_key(key: bytes | None) -> bytes | None:
    """The dead letter's own Kafka key: the original one, or its SHA-256 (hex) when it is
    longer than DLQ_MAX_KEY."""
    if key is None or len(key) <= DLQ_MAX_KEY:
        return key
    return hashlib.sha256(key).hexdigest().encode("ascii")


def status_json_schema() -> dict[str, Any]:
    """The JSON Schema of `eob.delivery/v1`."""
    return export_schema(DeliveryStatus, STATUS_SCHEMA_ID)


def dlq_json_schema() -> dict[str, Any]:
    """The JSON Schema of `eob.events.dlq/v1`."""
    return export_schema(DeadLetter, DLQ_SCHEMA_ID)
