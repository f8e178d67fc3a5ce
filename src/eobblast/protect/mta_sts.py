"""MTA-STS (RFC 8461): the `_mta-sts` TXT record, the policy file, MX matching, the cache.

The functional core of MTA-STS: parsing and caching decisions over plain data, with the
clock passed in. Fetching (DNS and HTTPS) is `eobblast.transport.mta_sts`. Malformed
input is never an exception: the parsers return a `StsProblem`, a reason fit for a metric
label, and a domain whose record or policy is malformed is treated as having no policy
(RFC 8461 sections 3.1 and 3.2), which the protection policy reads as "nothing known".
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from eobblast.protect.policy import normalise_domain

__all__ = [
    "MAX_AGE_LIMIT",
    "CachedPolicy",
    "PolicyCache",
    "StoredPolicy",
    "StsMode",
    "StsPolicy",
    "StsProblem",
    "StsRecord",
    "mx_matches",
    "parse_policy",
    "parse_txt",
    "policy_from_columns",
]

#: RFC 8461 section 3.2: max_age is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31_557_600


class StsMode(enum.StrEnum):
    """A policy's mode: only `enforce` changes where and how mail goes."""

    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


class StsProblem(enum.StrEnum):
    """Why a domain has no usable policy (metrics label values: bounded, no domain names)."""

    # the TXT record
    NO_RECORD = "no_record"  # no TXT record beginning with v=STSv1: the domain has none
    TXT_MULTIPLE = "txt_multiple"
    TXT_SYNTAX = "txt_syntax"
    TXT_NO_ID = "txt_no_id"
    DNS_ERROR = "dns_error"
    # fetching the policy
    NO_ADDRESS = "no_address"  # mta-sts.<domain> has no A/AAAA record
    CONNECT_FAILED = "connect_failed"
    TLS_ERROR = "tls_error"  # certificate not valid for mta-sts.<domain>, or handshake
    HTTP_REDIRECT = "http_redirect"  # RFC 8461 section 3.3: redirects are not followed
    HTTP_STATUS = "http_status"
    CONTENT_TYPE = "content_type"
    TOO_LARGE = "too_large"
    TIMEOUT = "timeout"
    # the policy file
    POLICY_ENCODING = "policy_encoding"
    POLICY_SYNTAX = "policy_syntax"
    POLICY_DUPLICATE = "policy_duplicate"
    POLICY_VERSION = "policy_version"
    POLICY_MODE = "policy_mode"
    POLICY_MAX_AGE = "policy_max_age"
    POLICY_MX = "policy_mx"
    # a bug in the lookup: the notice goes on as if the domain had no policy
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class StsRecord:
    """A valid `_mta-sts` TXT record: its id changes whenever the policy does."""

    id: str


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A valid policy file's content; `mx` patterns lower-cased."""

    mode: StsMode
    max_age: int
    mx: tuple[str, ...]

    def allows(self, host: str) -> bool:
        """Whether MX `host` matches one of the policy's mx patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


# RFC 8461 section 3.1 ABNF (sts-version, sts-field-delim, sts-id, sts-extension).
_VERSION = re.compile(r"v[ \t]*=[ \t]*STSv1(?=[ \t;]|$)")
_TXT_FIELD = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,31})[ \t]*=[ \t]*(?P<value>[\x21-\x3a\x3c\x3e-\x7e]+)"
)
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
# RFC 8461 section 3.2 ABNF (sts-policy-field and friends); names are case-sensitive.
_POLICY_FIELD = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,31}):[ \t]*(?P<value>.*)")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_AGE_DIGITS = 10


def parse_txt(texts: Sequence[str]) -> StsRecord | StsProblem:
    """The STSv1 record among a name's TXT records (each its strings joined), or why none."""
    # RFC 8461 section 3.1: records not beginning with the version are not ours; exactly
    # one must remain, or the domain is taken to have no policy.
    versions = [found for found in map(_VERSION.match, texts) if found is not None]
    if not versions:
        return StsProblem.NO_RECORD
    if len(versions) > 1:
        return StsProblem.TXT_MULTIPLE
    rest = versions[0].string[versions[0].end() :]
    parts = [part.strip(" \t") for part in rest.split(";")]
    # 1*(delimiter field) with an optional trailing delimiter: nothing after the version
    # but a delimiter, and no empty field except the very last.
    if parts[0] != "" or len(parts) < 2:
        return StsProblem.TXT_SYNTAX
    fields = parts[1:-1] if parts[-1] == "" else parts[1:]
    ids: list[str] = []
    for part in fields:
        found = _TXT_FIELD.fullmatch(part)
        if found is None:
            return StsProblem.TXT_SYNTAX
        if found["name"] == "id":
            ids.append(found["value"])
    if not ids:
        return StsProblem.TXT_NO_ID
    # Two ids would make "has the policy changed?" ambiguous.
    if len(ids) > 1 or not _ID.fullmatch(ids[0]):
        return StsProblem.TXT_SYNTAX
    return StsRecord(ids[0])


def parse_policy(body: bytes) -> StsPolicy | StsProblem:
    """The policy a `.well-known/mta-sts.txt` body states, or why it is not valid."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return StsProblem.POLICY_ENCODING
    single: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.split("\n"):
        line = raw.removesuffix("\r").rstrip(" \t")
        if not line:
            continue  # blank lines (a trailing one is common) carry nothing
        found = _POLICY_FIELD.fullmatch(line)
        if found is None:
            return StsProblem.POLICY_SYNTAX
        name, value = found["name"], found["value"]
        if name == "mx":
            mx.append(value)
        elif name in ("version", "mode", "max_age"):
            # A second value for one of these leaves the policy's meaning in doubt.
            if name in single:
                return StsProblem.POLICY_DUPLICATE
            single[name] = value
        # other names are extensions, ignored (RFC 8461 section 3.2)
    if single.get("version") != "STSv1":
        return StsProblem.POLICY_VERSION
    try:
        mode = StsMode(single.get("mode", ""))
    except ValueError:
        return StsProblem.POLICY_MODE
    max_age = single.get("max_age", "")
    if not (max_age.isascii() and max_age.isdigit() and len(max_age) <= _MAX_AGE_DIGITS):
        return StsProblem.POLICY_MAX_AGE
    if int(max_age) > MAX_AGE_LIMIT:
        return StsProblem.POLICY_MAX_AGE
    patterns = tuple(pattern.lower() for pattern in mx)
    if not all(map(_valid_pattern, patterns)):
        return StsProblem.POLICY_MX
    # Without an mx pattern an enforce or testing policy would allow no MX at all.
    if mode is not StsMode.NONE and not patterns:
        return StsProblem.POLICY_MX
    return StsPolicy(mode, int(max_age), patterns)


def _valid_pattern(pattern: str) -> bool:
    name = pattern.removeprefix("*.")
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def mx_matches(pattern: str, host: str) -> bool:
    """Whether MX `host` matches `pattern`; a `*.` wildcard stands for one leftmost label."""
    host = normalise_domain(host)
    pattern = pattern.lower()
    if pattern.startswith("*."):
        label, dot, parent = host.partition(".")
        # RFC 8461 section 4.1: "*.example.com" matches "mx.example.com", but neither
        # "example.com" nor "a.mx.example.com".
        return bool(label) and bool(dot) and parent == pattern[2:]
    return host == pattern


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A fetched policy, the TXT id it was fetched under and when it expires."""

    policy: StsPolicy
    id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """A policy as the shared table keeps it: expiry on the wall clock (epoch seconds)."""

    domain: str
    id: str
    policy: StsPolicy
    expires_at: float

    def cached(self, now: float, wall_now: float) -> CachedPolicy | None:
        """The policy as the cache keeps it (expiry at monotonic `now`), None if expired.

        What is left of it is counted on the wall clock, which may have been stepped since
        it was written (or be another machine's). More than max_age left is no expiry this
        policy could have been given: such a row (a clock stepped back since, or a clock
        ahead that wrote it) is not used, as read again and again it would never expire."""
        left = self.expires_at - wall_now
        if not math.isfinite(left) or left <= 0 or left > self.policy.max_age:
            return None
        return CachedPolicy(self.policy, self.id, now + left)


def policy_from_columns(mode: str, max_age: int, mx: str) -> StsPolicy | None:
    """The policy a stored row's columns state (`mx` space-separated), checked as a fetched
    policy is; None if they do not make a valid one (a row written by hand, say)."""
    lines = ["version: STSv1", f"mode: {mode}", f"max_age: {max_age}"]
    lines += [f"mx: {pattern}" for pattern in mx.split()]
    if any("\n" in line or "\r" in line for line in lines):
        return None
    found = parse_policy("\n".join(lines).encode())
    return found if isinstance(found, StsPolicy) else None


@dataclass(slots=True)
class _Entry:
    cached: CachedPolicy | None
    next_check: float


@dataclass(slots=True)
class PolicyCache:
    """Policies by domain, and when each domain's TXT record is to be looked at again.

    Deterministic: every method takes the clock (seconds, monotonic) as `now`. A domain
    without a policy is remembered too, so that it is not looked up for every message;
    at most `max_domains` are kept, the least recently stored going first.
    """

    recheck: float
    max_domains: int = 10_000
    _entries: dict[str, _Entry] = field(default_factory=dict, init=False, repr=False)

    def current(self, domain: str, now: float) -> StsPolicy | None:
        """The domain's cached policy if it has not expired at `now`."""
        valid = self._valid(domain, now)
        return None if valid is None else valid.policy

    def due(self, domain: str, now: float) -> bool:
        """Whether the domain's TXT record should be looked up at `now`."""
        entry = self._entries.get(domain)
        return entry is None or now >= entry.next_check

    def restore(self, domain: str, cached: CachedPolicy, now: float) -> None:
        """A policy read from the shared table, in place of none, of an expired one or of
        one under another id (the caller saw that id in the TXT record); never of a valid
        one under the same id. The TXT record is looked up at once (if not already)."""
        valid = self._valid(domain, now)
        if valid is None or valid.id != cached.id:
            self._put(domain, _Entry(cached, now))

    def needs_fetch(self, domain: str, record: StsRecord, now: float) -> bool:
        """Whether the policy must be fetched: none cached and valid, or the id changed."""
        valid = self._valid(domain, now)
        return valid is None or valid.id != record.id

    def checked(self, domain: str, now: float) -> None:
        """The domain was looked at (or could not be): keep what is cached, look again later.

        A failed refresh keeps a still-valid policy (RFC 8461 section 5.1)."""
        self._put(domain, _Entry(self._valid(domain, now), now + self.recheck))

    def _valid(self, domain: str, now: float) -> CachedPolicy | None:
        """The domain's cached policy unless it is missing or expired at `now`."""
        entry = self._entries.get(domain)
        if entry is None or entry.cached is None or now >= entry.cached.expires_at:
            return None
        return entry.cached

    def store(self, domain: str, policy: StsPolicy, record: StsRecord, now: float) -> None:
        """A policy fetched under `record` at `now`, valid for its max_age."""
        cached = CachedPolicy(policy, record.id, now + policy.max_age)
        self._put(domain, _Entry(cached, now + self.recheck))

    def _put(self, domain: str, entry: _Entry) -> None:
        self._entries.pop(domain, None)
        while len(self._entries) >= max(1, self.max_domains):
            del self._entries[next(iter(self._entries))]
        self._entries[domain] = entry

    def __len__(self) -> int:
        return len(self._entries)
