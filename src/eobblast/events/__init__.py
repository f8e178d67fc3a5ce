"""Event schemas: the `eob.issued/v1` input event, its validation and JSON Schema export."""

from eobblast.events.schema import (
    SCHEMA_ID,
    EobIssued,
    Rejection,
    json_schema,
    validate_event,
)

__all__ = ["SCHEMA_ID", "EobIssued", "Rejection", "json_schema", "validate_event"]
