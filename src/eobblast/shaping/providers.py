"""Receiving providers (gmail, yahoo, microsoft, other), recognised by MX host patterns."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from eobblast._toml import Table
from eobblast.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ProviderRule:
    """One provider: the MX host patterns that identify it and its share of an IP's hourly cap."""

    name: str
    mx_patterns: tuple[str, ...]
    share: float

    def matches(self, mx_host: str) -> bool:
        """Whether an MX host name belongs to this provider."""
        host = mx_host.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.mx_patterns)


@dataclass(frozen=True, slots=True)
class Providers:
    """The provider rules in file order; the first match wins, else the fallback."""

    rules: tuple[ProviderRule, ...]
    fallback: str

    @property
    def names(self) -> tuple[str, ...]:
        """Every provider name, the fallback included."""
        return tuple(rule.name for rule in self.rules)

    def rule(self, provider: str) -> ProviderRule:
        """The rule of a provider; unknown names get the fallback's (its share is the safe one)."""
        for rule in self.rules:
            if rule.name == provider:
                return rule
        return self.rule(self.fallback)

    def share(self, provider: str) -> float:
        """The fraction of an IP's hourly cap this provider may take."""
        return self.rule(provider).share

    def for_mx(self, mx_hosts: Iterable[str]) -> str:
        """The provider behind a domain's MX hosts (most preferred first)."""
        for host in mx_hosts:
            for rule in self.rules:
                if rule.matches(host):
                    return rule.name
        return self.fallback


def parse_providers(table: Table) -> Providers:
    """Parse the [providers] table: `fallback = "other"` and one sub-table per provider."""
    fallback = table.string("fallback")
    rules: list[ProviderRule] = []
    for name in list(table.keys()):
        if name == "fallback":
            continue
        entry = table.table(name)
        patterns = entry.strings("mx", ())
        for pattern in patterns:
            if pattern != pattern.lower() or " " in pattern:
                raise ConfigError(
                    f"{entry.where}.mx: {pattern!r} must be a lower-case host pattern"
                )
        share = entry.number("share", above=0.0, at_most=1.0)
        entry.done()
        rules.append(ProviderRule(name, patterns, share))
    table.done()
    by_name = {rule.name: rule for rule in rules}
    if fallback not in by_name:
        raise ConfigError(f"{table.where}.fallback: no provider table named {fallback!r}")
    if by_name[fallback].mx_patterns:
        raise ConfigError(f"{table.where}.{fallback}: the fallback provider takes no mx patterns")
    total = sum(rule.share for rule in rules)
    # Shares that sum to at most 1 keep the IP's total under its warm-up cap even when every
    # provider uses its whole share in the same hour.
    if total > 1.0 + 1e-9:
        raise ConfigError(f"{table.where}: shares add up to {total:g}, more than 1")
    return Providers(tuple(rules), fallback)
