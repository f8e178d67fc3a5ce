"""Which protection each recipient gets: S/MIME, TLS-required delivery or a secure-portal notice.

A pure decision over plain data: no I/O and no clock of its own (`now` is passed in), so
every branch is tested without sockets. There is deliberately no plaintext level: when
nothing positive is known about a recipient, the answer is the portal, whose notice
carries no PHI.

Precedence (first match wins), and why:

1. The member asked for the portal -> PORTAL. A member's request for confidential
   communications by another channel (HIPAA 45 CFR 164.522(b)) is honoured even when a
   certificate is on file: the portal is never less safe, and it is what they asked for.
2. A usable recipient certificate (and S/MIME enabled) -> SMIME. End-to-end encryption
   protects the EOB whatever the receiving domain or its TLS, so it outranks every
   domain-level rule, including the organisation's portal domains (those exist because of
   untrusted transport and mailbox providers, which S/MIME makes irrelevant).
3. The domain is one of the organisation's portal domains -> PORTAL. An organisation rule
   (e.g. consumer webmail) overrides anything learned about the domain's TLS.
4. A TLS failure recorded within `failure_ttl` -> PORTAL, even for a domain on the TLS
   policy list or with an MTA-STS `enforce` policy. Those say TLS *must* be used, not
   that it currently works: a recent failure means the next attempt would most likely
   fail too (delaying the notice) or that something between us and the domain is wrong.
   PHI never goes over a channel that recently failed verification.
5. The domain is on the TLS policy list, publishes MTA-STS `enforce`, or verified TLS
   within `tls_cache_ttl` -> TLS_REQUIRED (delivery must verify TLS 1.2+ or downgrade to
   the portal, never to plaintext).
6. Nothing positive is known -> PORTAL (`tls_unknown`), the safe default.

A member preference for email (`Preference.EMAIL`) never weakens a safeguard: it changes
nothing above.

Domains are matched after lower-casing and dropping a trailing dot. Portal domains match
by suffix on label boundaries (`example.com` covers `mail.example.com`), because widening
the safe direction is harmless; the TLS policy list matches exactly, because a subdomain
may have other mail servers and trust is not inherited.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CERTIFICATE_REASONS",
    "MIN_RSA_KEY_BITS",
    "Decision",
    "DomainTls",
    "OrgPolicy",
    "PolicyReason",
    "Preference",
    "ProtectionLevel",
    "RecipientFacts",
    "TlsCache",
    "TlsRecord",
    "certificate_usable",
    "choose_protection",
    "domain_in",
    "normalise_address",
    "normalise_domain",
    "parse_certificate",
]

#: RSA recipients below this size are refused: the content-encryption key would be the
#: weakest link (CA/Browser Forum S/MIME requirements also set 2048 as the floor).
MIN_RSA_KEY_BITS = 2048


class ProtectionLevel(enum.StrEnum):
    """How one message is protected. There is no plaintext level, on purpose."""

    SMIME = "smime"
    TLS_REQUIRED = "tls_required"
    PORTAL = "portal"


class PolicyReason(enum.StrEnum):
    """Why a level was chosen (or a certificate not used): for status events and the audit."""

    # why the level was chosen
    RECIPIENT_CERTIFICATE = "recipient_certificate"
    MEMBER_PREFERS_PORTAL = "member_prefers_portal"
    ORG_PORTAL_DOMAIN = "org_portal_domain"
    TLS_FAILED_RECENTLY = "tls_failed_recently"
    TLS_POLICY_LIST = "tls_policy_list"
    MTA_STS_ENFORCE = "mta_sts_enforce"
    TLS_VERIFIED_RECENTLY = "tls_verified_recently"
    TLS_UNKNOWN = "tls_unknown"
    # Not a choice of the policy: TLS failed when the message was delivered, so the EOB
    # was protected again as a portal notice (never retried in plaintext).
    TLS_FAILED_AT_DELIVERY = "tls_failed_at_delivery"
    # why a certificate on file was not used (Decision.certificate_issue)
    CERTIFICATE_UNUSABLE = "certificate_unusable"  # on file but could not be parsed
    CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_KEY_UNSUPPORTED = "certificate_key_unsupported"
    CERTIFICATE_KEY_USAGE = "certificate_key_usage"
    CERTIFICATE_EXTENDED_KEY_USAGE = "certificate_extended_key_usage"
    CERTIFICATE_ADDRESS_MISMATCH = "certificate_address_mismatch"
    SMIME_DISABLED = "smime_disabled"


_EMAIL_USAGES = frozenset(
    {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
)

#: The reasons `certificate_usable` can return.
CERTIFICATE_REASONS = frozenset(
    {
        PolicyReason.CERTIFICATE_UNUSABLE,
        PolicyReason.CERTIFICATE_NOT_YET_VALID,
        PolicyReason.CERTIFICATE_EXPIRED,
        PolicyReason.CERTIFICATE_KEY_UNSUPPORTED,
        PolicyReason.CERTIFICATE_KEY_USAGE,
        PolicyReason.CERTIFICATE_EXTENDED_KEY_USAGE,
        PolicyReason.CERTIFICATE_ADDRESS_MISMATCH,
    }
)


class Preference(enum.StrEnum):
    """What the member asked for. EMAIL never overrides a safeguard."""

    NONE = "none"
    PORTAL = "portal"
    EMAIL = "email"


@dataclass(frozen=True, slots=True)
class RecipientFacts:
    """What is known of the recipient: address, domain, certificate, preference."""

    address: str
    domain: str
    certificate: x509.Certificate | None = None
    preference: Preference = Preference.NONE
    # A certificate was on file but could not be parsed: recorded, never silently ignored.
    certificate_unparseable: bool = False

    @classmethod
    def for_member(
        cls,
        address: str,
        certificate_pem: str | None = None,
        preference: Preference = Preference.NONE,
    ) -> RecipientFacts:
        """Facts for an address and the PEM certificate on file (if any), domain derived."""
        certificate = parse_certificate(certificate_pem) if certificate_pem else None
        return cls(
            address=address,
            domain=normalise_domain(address.rpartition("@")[2]),
            certificate=certificate,
            preference=preference,
            certificate_unparseable=bool(certificate_pem) and certificate is None,
        )


@dataclass(frozen=True, slots=True)
class DomainTls:
    """What is known of the recipient domain's TLS. Datetimes are timezone-aware."""

    on_policy_list: bool = False
    mta_sts_enforce: bool = False
    last_verified_at: dt.datetime | None = None
    last_failed_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class OrgPolicy:
    """The organisation's protection policy (from configuration)."""

    portal_domains: frozenset[str] = frozenset()
    tls_policy_domains: frozenset[str] = frozenset()
    smime_enabled: bool = True
    tls_cache_ttl: dt.timedelta = dt.timedelta(days=7)
    failure_ttl: dt.timedelta = dt.timedelta(hours=6)
    # Whether a verified handshake we observed ourselves (no published or configured
    # policy) is enough for TLS_REQUIRED; off means only the list and MTA-STS count.
    allow_opportunistic_verified_cache: bool = True

    def __post_init__(self) -> None:
        # Normalised once here, not for every message (choose_protection looks them up).
        for name in ("portal_domains", "tls_policy_domains"):
            object.__setattr__(self, name, _normalised(getattr(self, name)))


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen level, why, and (if a certificate was on file but not used) why not."""

    level: ProtectionLevel
    reason: PolicyReason
    certificate_issue: PolicyReason | None = None


def normalise_domain(domain: str) -> str:
    """`domain` lower-cased, without surrounding whitespace or a trailing dot."""
    return domain.strip().rstrip(".").lower()


def _normalised(domains: Iterable[str]) -> frozenset[str]:
    return frozenset(name for name in map(normalise_domain, domains) if name)


def _listed(name: str, domains: frozenset[str], *, suffix: bool) -> bool:
    # `name` and `domains` normalised: a set lookup per label instead of a scan.
    if not name:
        return False
    if name in domains:
        return True
    labels = name.split(".")
    return suffix and any(".".join(labels[i:]) in domains for i in range(1, len(labels)))


def domain_in(domain: str, domains: Iterable[str], *, suffix: bool) -> bool:
    """Whether `domain` is one of `domains` (or, with `suffix`, a subdomain of one)."""
    return _listed(normalise_domain(domain), _normalised(domains), suffix=suffix)


def parse_certificate(pem: str) -> x509.Certificate | None:
    """The first certificate of a PEM text, or None if it is not one."""
    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return None


def certificate_usable(
    cert: x509.Certificate, address: str, now: dt.datetime
) -> PolicyReason | None:
    """None if `cert` can receive S/MIME for `address` at `now`, else why it cannot."""
    _require_aware(now)
    try:
        return _certificate_problem(cert, address, now)
    except (
        ValueError,
        UnsupportedAlgorithm,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ):
        # cryptography parses extensions and keys lazily: a malformed or repeated extension
        # or an unknown key algorithm surfaces here, and must not stop the pipeline.
        return PolicyReason.CERTIFICATE_UNUSABLE


def _certificate_problem(
    cert: x509.Certificate, address: str, now: dt.datetime
) -> PolicyReason | None:
    # Chain and revocation are not checked: certificates come from the claims system's
    # member record (a trusted source), not from the wire.
    if now < cert.not_valid_before_utc:
        return PolicyReason.CERTIFICATE_NOT_YET_VALID
    if now > cert.not_valid_after_utc:
        return PolicyReason.CERTIFICATE_EXPIRED
    key = cert.public_key()
    # cryptography's PKCS7EnvelopeBuilder only does RSA key transport (no ECDH/KEM).
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_RSA_KEY_BITS:
        return PolicyReason.CERTIFICATE_KEY_UNSUPPORTED
    try:
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        # RSA key transport wraps the content key: keyEncipherment (RFC 8550 section 4.4.2).
        if not key_usage.key_encipherment:
            return PolicyReason.CERTIFICATE_KEY_USAGE
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        # RFC 8550 section 4.4.4: emailProtection or anyExtendedKeyUsage when EKU is present.
        if _EMAIL_USAGES.isdisjoint(eku):
            return PolicyReason.CERTIFICATE_EXTENDED_KEY_USAGE
    if normalise_address(address) not in _certificate_addresses(cert):
        return PolicyReason.CERTIFICATE_ADDRESS_MISMATCH
    return None


def normalise_address(address: str) -> str:
    """`address` stripped and lower-cased, for comparing with certificate addresses."""
    return address.strip().lower()


def _certificate_addresses(cert: x509.Certificate) -> frozenset[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.RFC822Name)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        # RFC 8550 section 3: the subject's emailAddress is the legacy place for it,
        # consulted only when the SAN holds no rfc822Name.
        names = [
            str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
        ]
    return frozenset(normalise_address(name) for name in names)


def _require_aware(now: dt.datetime) -> None:
    # Certificates' validity is in UTC; a naive `now` would compare by accident or raise.
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")


def choose_protection(
    recipient: RecipientFacts, domain_tls: DomainTls, org: OrgPolicy, now: dt.datetime
) -> Decision:
    """The protection level for one recipient (see the module docstring for precedence)."""
    _require_aware(now)
    if recipient.preference is Preference.PORTAL:
        return Decision(ProtectionLevel.PORTAL, PolicyReason.MEMBER_PREFERS_PORTAL)

    issue: PolicyReason | None = None
    if recipient.certificate is not None:
        issue = certificate_usable(recipient.certificate, recipient.address, now)
        if issue is None and not org.smime_enabled:
            issue = PolicyReason.SMIME_DISABLED
        if issue is None:
            return Decision(ProtectionLevel.SMIME, PolicyReason.RECIPIENT_CERTIFICATE)
    elif recipient.certificate_unparseable:
        issue = PolicyReason.CERTIFICATE_UNUSABLE

    def portal(reason: PolicyReason) -> Decision:
        return Decision(ProtectionLevel.PORTAL, reason, issue)

    def tls(reason: PolicyReason) -> Decision:
        return Decision(ProtectionLevel.TLS_REQUIRED, reason, issue)

    domain = normalise_domain(recipient.domain)
    if _listed(domain, org.portal_domains, suffix=True):
        return portal(PolicyReason.ORG_PORTAL_DOMAIN)
    # A failure timestamp ahead of `now` (clock skew between workers) counts as recent.
    if domain_tls.last_failed_at is not None and now - domain_tls.last_failed_at < org.failure_ttl:
        return portal(PolicyReason.TLS_FAILED_RECENTLY)
    if domain_tls.on_policy_list or _listed(domain, org.tls_policy_domains, suffix=False):
        return tls(PolicyReason.TLS_POLICY_LIST)
    if domain_tls.mta_sts_enforce:
        return tls(PolicyReason.MTA_STS_ENFORCE)
    verified = domain_tls.last_verified_at
    # A verification stamped in the future is not trusted: the safe reading of skew.
    if (
        org.allow_opportunistic_verified_cache
        and verified is not None
        and verified <= now
        and now - verified < org.tls_cache_ttl
    ):
        return tls(PolicyReason.TLS_VERIFIED_RECENTLY)
    return portal(PolicyReason.TLS_UNKNOWN)


@dataclass(frozen=True, slots=True)
class TlsRecord:
    """What the cache holds for one domain (for persistence by the state store)."""

    domain: str
    last_verified_at: dt.datetime | None
    last_failed_at: dt.datetime | None


@dataclass(slots=True)
class _Entry:
    verified_at: dt.datetime | None = None
    failed_at: dt.datetime | None = None


@dataclass(slots=True)
class TlsCache:
    """Verified handshakes and TLS failures per domain, expiring; plus static TLS knowledge.

    The TTLs here only bound what is kept (set them >= the OrgPolicy's, which decide).
    Deterministic: every method takes the clock as `now`. Expired observations are dropped
    by `facts` for the domain asked and by `prune` for all of them, so memory is bounded by
    the domains seen within the longer of the two TTLs.
    """

    verified_ttl: dt.timedelta
    failure_ttl: dt.timedelta
    policy_domains: frozenset[str] = frozenset()
    mta_sts_enforce_domains: frozenset[str] = frozenset()
    _entries: dict[str, _Entry] = field(default_factory=dict, init=False, repr=False)
    # Domains observed here since the last `take_unsaved` (for sharing with other workers).
    _unsaved: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self.policy_domains = _normalised(self.policy_domains)
        self.mta_sts_enforce_domains = _normalised(self.mta_sts_enforce_domains)

    def record_verified(self, domain: str, now: dt.datetime) -> None:
        """Note a verified TLS handshake with `domain`'s mail server at `now`."""
        self._note(normalise_domain(domain), now, None, unsaved=True)

    def record_failure(self, domain: str, now: dt.datetime) -> None:
        """Note a TLS failure (no STARTTLS, untrusted certificate, handshake) at `now`."""
        self._note(normalise_domain(domain), None, now, unsaved=True)

    def merge(self, record: TlsRecord) -> None:
        """Take in another worker's observations of a domain (not to be saved again)."""
        name = normalise_domain(record.domain)
        self._note(name, record.last_verified_at, record.last_failed_at, unsaved=False)

    def take_unsaved(self) -> list[TlsRecord]:
        """This worker's observations since the last call, to be shared."""
        names, self._unsaved = self._unsaved, set()
        return [
            TlsRecord(name, entry.verified_at, entry.failed_at)
            for name in sorted(names)
            if (entry := self._entries.get(name)) is not None
        ]

    def unsaved(self, records: Sequence[TlsRecord]) -> None:
        """Records `take_unsaved` gave out that could not be saved: offer them again."""
        self._unsaved.update(record.domain for record in records)

    def _note(
        self,
        name: str,
        verified: dt.datetime | None,
        failed: dt.datetime | None,
        *,
        unsaved: bool,
    ) -> None:
        entry = self._entries.setdefault(name, _Entry())
        # Keep the latest: records may arrive out of order from several workers. A success
        # does not erase a failure: the policy lets a failure win for failure_ttl.
        if verified is not None and (entry.verified_at is None or verified > entry.verified_at):
            entry.verified_at = verified
        if failed is not None and (entry.failed_at is None or failed > entry.failed_at):
            entry.failed_at = failed
        if unsaved:
            self._unsaved.add(name)

    def facts(self, domain: str, now: dt.datetime) -> DomainTls:
        """What is known of `domain`'s TLS at `now`, expired observations left out."""
        name = normalise_domain(domain)
        entry = self._entries.get(name)
        verified = failed = None
        if entry is not None:
            self._expire(entry, now)
            if entry.verified_at is None and entry.failed_at is None:
                del self._entries[name]
            verified, failed = entry.verified_at, entry.failed_at
        return DomainTls(
            on_policy_list=name in self.policy_domains,
            mta_sts_enforce=name in self.mta_sts_enforce_domains,
            last_verified_at=verified,
            last_failed_at=failed,
        )

    def prune(self, now: dt.datetime) -> int:
        """Drop expired observations of every domain; returns how many domains were dropped."""
        dropped = 0
        for name in list(self._entries):
            entry = self._entries[name]
            self._expire(entry, now)
            if entry.verified_at is None and entry.failed_at is None:
                del self._entries[name]
                dropped += 1
        return dropped

    def records(self) -> Iterator[TlsRecord]:
        """Every domain's observations, for persisting (reload with record_* calls)."""
        for name, entry in self._entries.items():
            yield TlsRecord(name, entry.verified_at, entry.failed_at)

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, entry: _Entry, now: dt.datetime) -> None:
        if entry.verified_at is not None and now - entry.verified_at >= self.verified_ttl:
            entry.verified_at = None
        if entry.failed_at is not None and now - entry.failed_at >= self.failure_ttl:
            entry.failed_at = None
