"""Reading TOML files (configuration, bounce rules, shaping data): problems as ConfigError
naming the file, and typed values with the file and key in every error."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from eobblast.errors import ConfigError


def read_text(path: Path, what: str = "") -> str:
    """A UTF-8 file's text; an I/O problem is a ConfigError ("cannot read <what> <path>")."""
    named = f"{what} {path}" if what else str(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {named}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read {named}: not UTF-8 (byte {exc.start})") from None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning I/O and syntax problems into ConfigError."""
    return parse_toml(read_text(path), str(path))


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text; `source` names it in errors."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None


class Table:
    """One TOML table: typed getters that name the key on error, and a check for unknown keys."""

    __slots__ = ("_data", "_seen", "where")

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table")
        self._data: Mapping[str, Any] = data
        self._seen: set[str] = set()
        self.where = where

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def keys(self) -> Iterator[str]:
        """The table's keys in file order."""
        return iter(self._data)

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key in self._data:
            return self._data[key]
        if default is _MISSING:
            raise ConfigError(f"{self.where}.{key}: missing")
        return default

    def table(self, key: str) -> Table:
        """A sub-table (required)."""
        return Table(self._get(key, _MISSING), f"{self.where}.{key}")

    def optional_table(self, key: str) -> Table:
        """A sub-table, empty when absent."""
        return Table(self._get(key, {}), f"{self.where}.{key}")

    def integer(self, key: str, default: Any = None, *, minimum: int | None = None) -> int:
        """An integer, at least `minimum` if given."""
        value = self._get(key, _MISSING if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where}.{key}: expected an integer")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.where}.{key}: must be at least {minimum}")
        return value

    def number(
        self,
        key: str,
        default: Any = None,
        *,
        above: float | None = None,
        at_most: float | None = None,
    ) -> float:
        """A number (int or float), strictly above `above` and at most `at_most` if given."""
        value = self._get(key, _MISSING if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.where}.{key}: expected a number")
        number = float(value)
        if above is not None and not number > above:
            raise ConfigError(f"{self.where}.{key}: must be greater than {above:g}")
        if at_most is not None and number > at_most:
            raise ConfigError(f"{self.where}.{key}: must be at most {at_most:g}")
        return number

    def string(self, key: str, default: Any = None) -> str:
        """A non-empty string."""
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self.where}.{key}: expected a non-empty string")
        return value

    def raw(self, key: str, default: Any = None) -> Any:
        """The value as parsed, for callers that accept several types."""
        return self._get(key, _MISSING if default is None else default)

    def strings(self, key: str, default: Any = None) -> tuple[str, ...]:
        """A list of non-empty strings."""
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self.where}.{key}: expected a list of non-empty strings")
        return tuple(value)

    def integers(self, key: str, default: Any = None) -> tuple[int, ...]:
        """A list of integers."""
        value = self._get(key, _MISSING if default is None else default)
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{self.where}.{key}: expected a list of integers")
        return tuple(value)

    def done(self) -> None:
        """Reject keys nobody asked for: a typo must not silently fall back to a default."""
        unknown = set(self._data) - self._seen
        if unknown:
            raise ConfigError(f"{self.where}: unknown setting(s) {', '.join(sorted(unknown))}")


class _Missing:
    __slots__ = ()


_MISSING: Any = _Missing()
