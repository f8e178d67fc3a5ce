"""Error hierarchy and reason codes carried by status events, DLQ records and metrics."""

from __future__ import annotations

import enum


class ReasonCode(enum.StrEnum):
    """Why an event ended where it did: machine-readable, never carries PHI."""

    # input (the event is parked, never sent)
    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    EVENT_TOO_LARGE = "event_too_large"
    NOT_AN_OBJECT = "not_an_object"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    MONEY_NOT_DECIMAL_STRING = "money_not_decimal_string"
    FIELD_TOO_LARGE = "field_too_large"
    CONTROL_CHARACTERS = "control_characters"
    INVALID_ADDRESS = "invalid_address"
    INVALID_VALUE = "invalid_value"
    EMPTY_VALUE = "empty_value"
    MISSING_KEY = "missing_key"
    # gate
    NO_CONSENT = "no_consent"
    # delivery
    DELIVERED = "delivered"
    NO_ROUTE = "no_route"
    STARTTLS_NOT_OFFERED = "starttls_not_offered"
    TLS_CERT_UNTRUSTED = "tls_cert_untrusted"
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"
    # the domain's MTA-STS policy (enforce) lists none of its MX hosts
    MTA_STS_NO_MATCHING_MX = "mta_sts_no_matching_mx"
    CONNECT_FAILED = "connect_failed"
    TIMEOUT = "timeout"
    RECIPIENT_REJECTED = "recipient_rejected"
    MESSAGE_REJECTED = "message_rejected"
    TEMPORARY_FAILURE = "temporary_failure"
    SHAPING_DEFERRED = "shaping_deferred"
    CONNECTION_LOST = "connection_lost"
    NO_SIGNING_KEY = "no_signing_key"
    PORTAL_UNAVAILABLE = "portal_unavailable"
    NO_PORTAL_IDENTITY = "no_portal_identity"
    SMIME_FAILED = "smime_failed"
    INTERNAL_ERROR = "internal_error"
    # verify-before-resend (values equal eobblast.bounces.service.BounceReason's)
    RETRY_SCHEDULED = "retry_scheduled"
    IN_FLIGHT = "in_flight"
    AWAITING_VERIFICATION = "awaiting_verification"
    ADDRESS_SUPPRESSED = "address_suppressed"
    RETRIES_EXHAUSTED = "retries_exhausted"
    UNDELIVERABLE = "undeliverable"
    VERIFICATION_FAILED = "verification_failed"
    VERIFICATION_TIMEOUT = "verification_timeout"
    PAYLOAD_UNAVAILABLE = "payload_unavailable"
    UNKNOWN_EVENT = "unknown_event"


# Why input is parked on the dead-letter topic (outcome rejected): nothing was sent. The
# codes declared in ReasonCode's input block, before the gate's first.
_CODES = list(ReasonCode)
INPUT_REASONS = tuple(_CODES[: _CODES.index(ReasonCode.NO_CONSENT)])


class Outcome(enum.StrEnum):
    """The final status of one event."""

    ACCEPTED = "accepted"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    HELD = "held"
    FAILED = "failed"
    REJECTED = "rejected"
    FALLBACK = "fallback"


class EobblastError(Exception):
    """Root of every error eobblast raises on purpose."""

    def __init__(self, reason: ReasonCode, detail: str = "") -> None:
        # detail must never carry PHI: callers pass fixed strings, codes and opaque ids only.
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


class ConfigError(EobblastError):
    """The configuration is unusable."""

    def __init__(self, detail: str) -> None:
        super().__init__(ReasonCode.INVALID_VALUE, detail)


class StoreUnavailable(EobblastError):
    """A store could not be read or written before anything was decided: the caller tries
    the event again later (an outage must not turn into notices failed for good)."""

    def __init__(self, store: str) -> None:
        super().__init__(ReasonCode.INTERNAL_ERROR, f"{store} unavailable")


class StoreNotAnswering(EobblastError, TimeoutError):
    """A store's server did not answer a call within its bound (a frozen server or network
    path): the connection was given up and the call failed. Transient (a TimeoutError, as
    the stores' callers expect of an outage): the next call opens a new connection. A
    transaction whose COMMIT was sent may have been committed all the same."""

    def __init__(self, store: str, seconds: float) -> None:
        super().__init__(ReasonCode.INTERNAL_ERROR, f"{store} gave no answer within {seconds:g} s")


class DeliveryError(EobblastError):
    """A message could not be handed to the receiving server."""

    def __init__(
        self,
        reason: ReasonCode,
        detail: str = "",
        *,
        smtp_code: int | None = None,
        permanent: bool,
        sent: bool = False,
    ) -> None:
        super().__init__(reason, detail)
        self.smtp_code = smtp_code
        self.permanent = permanent
        # The content went out before the line dropped or timed out: the receiver may have
        # accepted it. Sent again elsewhere at once, it could arrive twice.
        self.sent = sent
