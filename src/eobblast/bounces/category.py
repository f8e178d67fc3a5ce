"""What kind of failure a bounce is, and what eobblast does about each kind."""

from __future__ import annotations

import enum


class BounceCategory(enum.StrEnum):
    """The class of one failed delivery: the vocabulary of rules, status events and metrics."""

    SOFT = "soft"
    HARD_ADDRESS = "hard_address"
    MAILBOX_FULL = "mailbox_full"
    MESSAGE_TOO_LARGE = "message_too_large"
    POLICY_TLS = "policy_tls"
    SPAM_BLOCK = "spam_block"
    THROTTLE = "throttle"
    OTHER = "other"


class HandlingAction(enum.StrEnum):
    """What the verify-before-resend state machine does with a bounce of some category."""

    # Try the same address again later, on the backoff schedule, until the maximum age.
    RETRY = "retry"
    # Suppress the address, hold the member's notices and ask for a verified address.
    VERIFY_ADDRESS = "verify_address"
    # Resending cannot help: the notice goes by paper now.
    FALLBACK = "fallback"
    # A person must look (an incident is recorded); meanwhile the notice retries as RETRY does.
    REVIEW = "review"
