"""How eobblast compares email addresses, shared by the bounce rules and the audit trail."""

from __future__ import annotations

import contextlib

import idna


def address_key(address: str) -> str:
    """How addresses are compared: case-insensitively (conservative for suppression), an
    internationalised domain in its ASCII form (a report may name it either way)."""
    key = address.strip().strip("<>").lower()
    local, at, domain = key.rpartition("@")
    if at and not domain.isascii():
        with contextlib.suppress(idna.IDNAError, UnicodeError):
            return f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"
    return key
