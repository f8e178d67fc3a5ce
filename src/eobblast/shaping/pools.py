"""Dedicated IP pools as data: named pools of source IPs, and which traffic class uses which."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eobblast._toml import Table, parse_toml, read_toml
from eobblast.errors import ConfigError

MATURE = "mature"

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class SourceIp:
    """One sending IP: the address bound as source, its EHLO name, and its warm-up start date."""

    address: str
    ehlo_name: str
    # None: the IP is mature (already warm) and is capped only by the mature cap.
    warmup_start: dt.date | None

    @property
    def mature(self) -> bool:
        """Whether the IP was configured as already warm."""
        return self.warmup_start is None


@dataclass(frozen=True, slots=True)
class IpPool:
    """A named pool of source IPs that share a reputation purpose (e.g. transactional EOBs)."""

    name: str
    ips: tuple[SourceIp, ...]

    def ip(self, address: str) -> SourceIp:
        """The member with this address."""
        for source in self.ips:
            if source.address == address:
                return source
        raise KeyError(address)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Every pool, and the traffic class -> pool mapping."""

    pools: tuple[IpPool, ...]
    classes: Mapping[str, str]
    default_pool: str | None = None

    def pool(self, name: str) -> IpPool:
        """The pool of this name."""
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise ConfigError(f"no IP pool named {name!r}")

    def pool_for(self, traffic_class: str) -> IpPool:
        """The pool a traffic class sends from (the default pool for unlisted classes)."""
        name = self.classes.get(traffic_class, self.default_pool)
        if name is None:
            raise ConfigError(
                f"traffic class {traffic_class!r} has no pool and there is no default"
            )
        return self.pool(name)

    def all_ips(self) -> tuple[SourceIp, ...]:
        """Every source IP of every pool."""
        return tuple(source for pool in self.pools for source in pool.ips)


def _address(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected an IP address string")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an IP address") from None


def is_fqdn(value: str) -> bool:
    """Whether `value` is a fully qualified host name: two labels or more, letters, digits
    and inner hyphens, a top-level label that is not all digits (an IP address is not)."""
    name = value.lower().rstrip(".")
    labels = name.split(".")
    return (
        len(name) <= 253
        and len(labels) >= 2
        and all(_HOST_LABEL.match(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _ehlo_name(value: str, where: str) -> str:
    # Receivers check the EHLO name against the IP's PTR record: it must be a real FQDN.
    if not is_fqdn(value):
        raise ConfigError(f"{where}: {value!r} is not a fully qualified host name")
    return value.lower().rstrip(".")


def _warmup_start(value: Any, where: str) -> dt.date | None:
    if isinstance(value, dt.datetime):
        raise ConfigError(f"{where}: expected a date (YYYY-MM-DD) or {MATURE!r}, not a date-time")
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        if value.strip().lower() == MATURE:
            return None
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a date (YYYY-MM-DD) or {MATURE!r}")


def parse_pools(doc: Mapping[str, Any], source: str = "pools") -> PoolConfig:
    """Build the pool configuration from a parsed pools TOML document."""
    top = Table(doc, source)
    pools_table = top.table("pools")
    pools: list[IpPool] = []
    seen: dict[str, str] = {}
    for name in list(pools_table.keys()):
        entry = pools_table.table(name)
        raw_ips = entry.raw("ips")
        if not isinstance(raw_ips, list) or not raw_ips:
            raise ConfigError(f"{entry.where}.ips: expected a non-empty list of IP tables")
        members: list[SourceIp] = []
        for index, raw in enumerate(raw_ips):
            item = Table(raw, f"{entry.where}.ips[{index}]")
            address = _address(item.raw("address"), f"{item.where}.address")
            if address in seen:
                # A dedicated pool owns its IPs' reputation: sharing an IP would mix traffic
                # classes and give one IP two warm-up start dates.
                raise ConfigError(
                    f"{item.where}.address: {address} is already in pool {seen[address]!r}"
                )
            seen[address] = name
            ehlo = _ehlo_name(item.string("ehlo"), f"{item.where}.ehlo")
            start = _warmup_start(item.raw("warmup_start"), f"{item.where}.warmup_start")
            item.done()
            members.append(SourceIp(address, ehlo, start))
        entry.done()
        pools.append(IpPool(name, tuple(members)))
    if not pools:
        raise ConfigError(f"{pools_table.where}: no pools defined")
    names = {pool.name for pool in pools}
    classes_table = top.optional_table("classes")
    classes: dict[str, str] = {}
    for traffic_class in list(classes_table.keys()):
        pool_name = classes_table.string(traffic_class)
        if pool_name not in names:
            raise ConfigError(f"{classes_table.where}.{traffic_class}: no pool named {pool_name!r}")
        classes[traffic_class] = pool_name
    classes_table.done()
    default_pool: str | None = None
    if "default_pool" in top:
        default_pool = top.string("default_pool")
        if default_pool not in names:
            raise ConfigError(f"{source}.default_pool: no pool named {default_pool!r}")
    top.done()
    return PoolConfig(tuple(pools), classes, default_pool)


def load_pools(path: Path) -> PoolConfig:
    """Load and validate a pools TOML file (see config/pools.example.toml)."""
    return parse_pools(read_toml(path), path.name)


def loads_pools(text: str, source: str = "pools") -> PoolConfig:
    """Parse pools TOML text (for tests and embedded defaults)."""
    return parse_pools(parse_toml(text, source), source)
