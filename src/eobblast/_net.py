"""Small facts about network addresses, shared by the Kafka clients and the listeners."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether `host` reaches this machine only: a loopback address or "localhost" (a
    listen address of "" or 0.0.0.0 means every address, and a host name is not known to be
    loopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
