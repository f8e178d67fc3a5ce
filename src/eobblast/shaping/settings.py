"""The shaping data file (config/warmup.toml) as one typed object."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eobblast._toml import (
    parse_toml,
    read_toml,
)
from eobblast.errors import ConfigError
from eobblast.shaping.backoff import BackoffPolicy, parse_policy
from eobblast.shaping.limits import ShapingLimits, parse_limits
from eobblast.shaping.warmup import WarmupPlan, parse_plan

_SECTIONS = frozenset({"warmup", "providers", "limits", "backoff"})


DEFAULT_WARMUP_RESOURCE = "default_warmup.toml"


def default_warmup_text() -> str:
    """The packaged default warm-up/shaping data (a copy of config/warmup.toml)."""
    return (
        importlib.resources.files("eobblast.shaping")
        .joinpath(DEFAULT_WARMUP_RESOURCE)
        .read_text(encoding="utf-8")
    )


@dataclass(frozen=True, slots=True)
class ShapingSettings:
    """Warm-up plan, per-destination limits and backoff policy, all from one data file."""

    plan: WarmupPlan
    limits: ShapingLimits
    backoff: BackoffPolicy


def parse_shaping(doc: dict[str, Any], source: str) -> ShapingSettings:
    """Build the settings from a parsed shaping document."""
    unknown = set(doc) - _SECTIONS
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(unknown))}")
    plan = parse_plan(doc, source)
    limits = parse_limits(doc, source, plan.providers.names)
    return ShapingSettings(plan, limits, parse_policy(doc, source))


def load_shaping(path: Path | None = None) -> ShapingSettings:
    """Load a shaping file, or the packaged default (a copy of config/warmup.toml) if None."""
    if path is None:
        return parse_shaping(parse_toml(default_warmup_text(), DEFAULT_WARMUP_RESOURCE), "default")
    return parse_shaping(read_toml(path), path.name)


def loads_shaping(text: str, source: str = "shaping") -> ShapingSettings:
    """Parse shaping TOML text (for tests)."""
    return parse_shaping(parse_toml(text, source), source)


def load_warmup(path: Path | None = None) -> WarmupPlan:
    """The warm-up plan alone (see load_shaping)."""
    return load_shaping(path).plan
