"""Durable shared state: the send ledger (SQLite on one machine, PostgreSQL across machines)."""

from eobblast.state.ledger import (
    Claim,
    ClaimKind,
    LedgerEntry,
    LedgerState,
    PostgresLedger,
    SendLedger,
    SqliteLedger,
    open_ledger,
)

__all__ = [
    "Claim",
    "ClaimKind",
    "LedgerEntry",
    "LedgerState",
    "PostgresLedger",
    "SendLedger",
    "SqliteLedger",
    "open_ledger",
]
