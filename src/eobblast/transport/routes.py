"""Where to deliver a domain's mail: static routes from config, or DNS MX records (cached)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from eobblast.errors import ConfigError, DeliveryError, ReasonCode


@dataclass(frozen=True, slots=True)
class Route:
    """One destination SMTP server and the name its TLS certificate must carry."""

    host: str
    port: int
    tls_name: str


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_static_routes(routes: Mapping[str, str]) -> dict[str, Route]:
    """Parse `domain -> host:port` entries; an IP host is verified against the domain name."""
    parsed: dict[str, Route] = {}
    for domain, target in routes.items():
        host, sep, port_text = target.rpartition(":")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"route for {domain}: expected host:port")
        host = host.strip("[]")
        tls_name = domain if _is_ip(host) else host
        parsed[domain.lower()] = Route(host, int(port_text), tls_name)
    return parsed


MxLookup = Callable[[str], Awaitable[list[tuple[int, str]]]]


async def dns_mx_lookup(domain: str) -> list[tuple[int, str]]:
    """MX records of a domain as (preference, host); the implicit MX when there are none."""
    try:
        answer = await dns.asyncresolver.resolve(domain, "MX", lifetime=5.0)
    except dns.resolver.NoAnswer:
        return [(0, domain)]
    except dns.resolver.NXDOMAIN:
        raise DeliveryError(ReasonCode.NO_ROUTE, "domain does not exist", permanent=True) from None
    except dns.exception.DNSException:
        raise DeliveryError(ReasonCode.NO_ROUTE, "MX lookup failed", permanent=False) from None
    records = [(int(r.preference), str(r.exchange).rstrip(".")) for r in answer]
    if records == [(0, "")]:
        # RFC 7505 null MX: the domain accepts no mail.
        raise DeliveryError(ReasonCode.NO_ROUTE, "null MX", permanent=True)
    return records


class Router:
    """Resolves recipient domains to routes, static first, then MX with a TTL cache."""

    def __init__(
        self,
        static: Mapping[str, Route],
        *,
        mx_lookup: MxLookup = dns_mx_lookup,
        port: int = 25,
        cache_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        max_cached: int = 10_000,
    ) -> None:
        self._static = dict(static)
        self._mx_lookup = mx_lookup
        self._port = port
        self._ttl = cache_ttl
        self._clock = clock
        # Domains in the order they were last looked up: a run over millions of members'
        # domains keeps at most `max_cached`, the oldest lookups going first.
        self._cache: dict[str, tuple[float, list[Route]]] = {}
        self._max_cached = max(1, max_cached)

    def is_static(self, domain: str) -> bool:
        """Whether the domain has a configured route (never looked up in DNS)."""
        return domain.lower() in self._static

    async def resolve(self, domain: str) -> list[Route]:
        """Routes for a domain, best first."""
        domain = domain.lower()
        static = self._static.get(domain)
        if static is not None:
            return [static]
        now = self._clock()
        cached = self._cache.get(domain)
        if cached is not None and cached[0] > now:
            return cached[1]
        records = await self._mx_lookup(domain)
        routes = [Route(host, self._port, host) for _, host in sorted(records)]
        self._cache.pop(domain, None)
        while len(self._cache) >= self._max_cached:
            del self._cache[next(iter(self._cache))]
        self._cache[domain] = (now + self._ttl, routes)
        return routes

    @property
    def cached(self) -> int:
        """How many domains' MX answers are kept."""
        return len(self._cache)
