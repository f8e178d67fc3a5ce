"""Protection policy: every branch, every certificate check, and properties over all inputs."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from eobblast.protect.policy import (
    CERTIFICATE_REASONS,
    Decision,
    DomainTls,
    OrgPolicy,
    PolicyReason,
    Preference,
    ProtectionLevel,
    RecipientFacts,
    TlsCache,
    TlsRecord,
    certificate_usable,
    choose_protection,
    domain_in,
    normalise_domain,
    parse_certificate,
)

NOW = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)
ADDRESS = "Jo.Member@Member.Example"
DOMAIN = "member.example"
DAY = dt.timedelta(days=1)

# Keys are made once: RSA generation is the slow part of these tests.
ISSUER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
MEMBER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SMALL_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
EC_KEY = ec.generate_private_key(ec.SECP256R1())

_DEFAULT_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_SIGN_ONLY = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_EMAIL_EKU = [ExtendedKeyUsageOID.EMAIL_PROTECTION]  # never mutated


def make_cert(
    *,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = MEMBER_KEY,
    san: list[str] | None = None,
    subject_email: str | None = None,
    not_before: dt.datetime = NOW - DAY,
    not_after: dt.datetime = NOW + 365 * DAY,
    key_usage: x509.KeyUsage | None = _DEFAULT_USAGE,
    eku: list[x509.ObjectIdentifier] | None = _EMAIL_EKU,
) -> x509.Certificate:
    """A member certificate, signed by a test issuer; defaults make a usable one."""
    names = [x509.NameAttribute(NameOID.COMMON_NAME, "Test Member")]
    if subject_email is not None:
        names.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, subject_email))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Issuer")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    san = ["jo.member@member.example"] if san is None else san
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(a) for a in san]), critical=False
        )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(ISSUER_KEY, hashes.SHA256())


VALID = make_cert()
CERTS: dict[str, tuple[x509.Certificate, PolicyReason | None]] = {
    "valid": (VALID, None),
    "valid, no key usage or EKU extensions": (make_cert(key_usage=None, eku=None), None),
    "valid, anyExtendedKeyUsage": (
        make_cert(eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]),
        None,
    ),
    "valid, address only in subject emailAddress": (
        make_cert(san=[], subject_email="jo.member@member.example"),
        None,
    ),
    "valid, second SAN address": (
        make_cert(san=["other@member.example", "JO.MEMBER@member.example"]),
        None,
    ),
    "expired": (
        make_cert(not_before=NOW - 400 * DAY, not_after=NOW - DAY),
        PolicyReason.CERTIFICATE_EXPIRED,
    ),
    "not yet valid": (
        make_cert(not_before=NOW + DAY, not_after=NOW + 400 * DAY),
        PolicyReason.CERTIFICATE_NOT_YET_VALID,
    ),
    "EC key": (make_cert(key=EC_KEY), PolicyReason.CERTIFICATE_KEY_UNSUPPORTED),
    "RSA-1024 key": (make_cert(key=SMALL_KEY), PolicyReason.CERTIFICATE_KEY_UNSUPPORTED),
    "key usage without keyEncipherment": (
        make_cert(key_usage=_SIGN_ONLY),
        PolicyReason.CERTIFICATE_KEY_USAGE,
    ),
    "EKU without emailProtection": (
        make_cert(eku=[ExtendedKeyUsageOID.CLIENT_AUTH]),
        PolicyReason.CERTIFICATE_EXTENDED_KEY_USAGE,
    ),
    "SAN for another address": (
        make_cert(san=["someone.else@member.example"]),
        PolicyReason.CERTIFICATE_ADDRESS_MISMATCH,
    ),
    "subject email ignored when SAN has rfc822Name": (
        make_cert(san=["someone.else@member.example"], subject_email="jo.member@member.example"),
        PolicyReason.CERTIFICATE_ADDRESS_MISMATCH,
    ),
    "no address at all": (make_cert(san=[]), PolicyReason.CERTIFICATE_ADDRESS_MISMATCH),
}


# ---------------------------------------------------------------- certificate checks


@pytest.mark.parametrize("name", list(CERTS))
def test_certificate_checks(name: str) -> None:
    cert, expected = CERTS[name]
    assert certificate_usable(cert, ADDRESS, NOW) is expected


def test_validity_bounds_are_inclusive() -> None:
    cert = make_cert(not_before=NOW - DAY, not_after=NOW + DAY)
    assert certificate_usable(cert, ADDRESS, cert.not_valid_before_utc) is None
    assert certificate_usable(cert, ADDRESS, cert.not_valid_after_utc) is None
    assert (
        certificate_usable(cert, ADDRESS, cert.not_valid_after_utc + dt.timedelta(seconds=1))
        is PolicyReason.CERTIFICATE_EXPIRED
    )


def test_address_compared_case_insensitively_and_stripped() -> None:
    assert certificate_usable(VALID, " JO.MEMBER@MEMBER.EXAMPLE ", NOW) is None
    assert (
        certificate_usable(VALID, "jo.member@member.example.evil", NOW)
        is PolicyReason.CERTIFICATE_ADDRESS_MISMATCH
    )


class _BrokenCertificate:
    """Stands in for a certificate whose key or extensions cryptography cannot parse."""

    not_valid_before_utc = NOW - DAY
    not_valid_after_utc = NOW + DAY

    def public_key(self) -> object:
        raise UnsupportedAlgorithm("unknown key type")


def test_unparseable_key_or_extension_is_unusable_not_a_crash() -> None:
    broken: Any = _BrokenCertificate()
    assert certificate_usable(broken, ADDRESS, NOW) is PolicyReason.CERTIFICATE_UNUSABLE
    recipient = RecipientFacts(ADDRESS, DOMAIN, broken)
    assert choose_protection(recipient, DomainTls(), ORG, NOW) == Decision(
        ProtectionLevel.PORTAL, PolicyReason.TLS_UNKNOWN, PolicyReason.CERTIFICATE_UNUSABLE
    )


def test_a_certificate_with_a_repeated_extension_is_unusable_not_a_crash() -> None:
    # cryptography's builder refuses duplicates: rename the EKU extension's OID (2.5.29.37)
    # to key usage's (2.5.29.15) in the DER, as a careless issuer could have produced it.
    der = VALID.public_bytes(serialization.Encoding.DER)
    eku, key_usage = bytes.fromhex("0603551d25"), bytes.fromhex("0603551d0f")
    assert der.count(eku) == 1 and der.count(key_usage) == 1
    repeated = x509.load_der_x509_certificate(der.replace(eku, key_usage))
    assert certificate_usable(repeated, ADDRESS, NOW) is PolicyReason.CERTIFICATE_UNUSABLE
    decision = choose_protection(RecipientFacts(ADDRESS, DOMAIN, repeated), DomainTls(), ORG, NOW)
    assert decision.level is ProtectionLevel.PORTAL


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        certificate_usable(VALID, ADDRESS, NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="timezone-aware"):
        choose_protection(
            RecipientFacts(ADDRESS, DOMAIN), DomainTls(), OrgPolicy(), NOW.replace(tzinfo=None)
        )


def test_parse_certificate_and_for_member() -> None:
    pem = VALID.public_bytes(serialization.Encoding.PEM).decode()
    assert parse_certificate(pem) == VALID
    assert (
        parse_certificate("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n") is None
    )
    assert parse_certificate("Zoë") is None

    facts = RecipientFacts.for_member(ADDRESS, pem, Preference.EMAIL)
    assert facts == RecipientFacts(ADDRESS, DOMAIN, VALID, Preference.EMAIL)
    broken = RecipientFacts.for_member(ADDRESS, "garbage")
    assert broken.certificate is None and broken.certificate_unparseable
    none = RecipientFacts.for_member(ADDRESS, None)
    assert none.certificate is None and not none.certificate_unparseable


# ---------------------------------------------------------------- choose_protection branches

ORG = OrgPolicy(
    portal_domains=frozenset({"gmail.example", "WebMail.Example."}),
    tls_policy_domains=frozenset({"partner.example"}),
    tls_cache_ttl=7 * DAY,
    failure_ttl=dt.timedelta(hours=6),
)
FAILED = DomainTls(last_failed_at=NOW - dt.timedelta(hours=1))
STALE_FAILURE = DomainTls(last_failed_at=NOW - dt.timedelta(hours=6))
VERIFIED = DomainTls(last_verified_at=NOW - DAY)
STALE_VERIFIED = DomainTls(last_verified_at=NOW - 7 * DAY)
EVERYTHING_GOOD = DomainTls(on_policy_list=True, mta_sts_enforce=True, last_verified_at=NOW)
EXPIRED = CERTS["expired"][0]

S, T, P = ProtectionLevel.SMIME, ProtectionLevel.TLS_REQUIRED, ProtectionLevel.PORTAL
R = PolicyReason

# (case, address, certificate, preference, domain facts, org, expected decision)
BRANCHES: list[
    tuple[str, str, x509.Certificate | None, Preference, DomainTls, OrgPolicy, Decision]
] = [
    (
        "usable certificate",
        ADDRESS,
        VALID,
        Preference.NONE,
        DomainTls(),
        ORG,
        Decision(S, R.RECIPIENT_CERTIFICATE),
    ),
    (
        "certificate beats org portal domain",
        "jo.member@gmail.example",
        make_cert(san=["jo.member@gmail.example"]),
        Preference.NONE,
        FAILED,
        ORG,
        Decision(S, R.RECIPIENT_CERTIFICATE),
    ),
    (
        "member preference beats certificate",
        ADDRESS,
        VALID,
        Preference.PORTAL,
        EVERYTHING_GOOD,
        ORG,
        Decision(P, R.MEMBER_PREFERS_PORTAL),
    ),
    (
        "email preference changes nothing",
        ADDRESS,
        None,
        Preference.EMAIL,
        DomainTls(),
        ORG,
        Decision(P, R.TLS_UNKNOWN),
    ),
    (
        "S/MIME disabled falls through",
        ADDRESS,
        VALID,
        Preference.NONE,
        VERIFIED,
        replace(ORG, smime_enabled=False),
        Decision(T, R.TLS_VERIFIED_RECENTLY, R.SMIME_DISABLED),
    ),
    (
        "expired certificate falls through to TLS",
        ADDRESS,
        EXPIRED,
        Preference.NONE,
        DomainTls(mta_sts_enforce=True),
        ORG,
        Decision(T, R.MTA_STS_ENFORCE, R.CERTIFICATE_EXPIRED),
    ),
    (
        "expired certificate falls through to portal",
        ADDRESS,
        EXPIRED,
        Preference.NONE,
        DomainTls(),
        ORG,
        Decision(P, R.TLS_UNKNOWN, R.CERTIFICATE_EXPIRED),
    ),
    (
        "org portal domain",
        "someone@gmail.example",
        None,
        Preference.EMAIL,
        EVERYTHING_GOOD,
        ORG,
        Decision(P, R.ORG_PORTAL_DOMAIN),
    ),
    (
        "org portal domain, subdomain and case",
        "someone@Mail.WEBMAIL.example",
        None,
        Preference.NONE,
        EVERYTHING_GOOD,
        ORG,
        Decision(P, R.ORG_PORTAL_DOMAIN),
    ),
    (
        "recent failure beats policy list and MTA-STS",
        ADDRESS,
        None,
        Preference.NONE,
        replace(EVERYTHING_GOOD, last_failed_at=NOW - dt.timedelta(minutes=5)),
        ORG,
        Decision(P, R.TLS_FAILED_RECENTLY),
    ),
    (
        "recent failure beats a later verification",
        ADDRESS,
        None,
        Preference.NONE,
        DomainTls(last_verified_at=NOW, last_failed_at=NOW - dt.timedelta(hours=1)),
        ORG,
        Decision(P, R.TLS_FAILED_RECENTLY),
    ),
    (
        "failure stamped in the future counts as recent",
        ADDRESS,
        None,
        Preference.NONE,
        DomainTls(mta_sts_enforce=True, last_failed_at=NOW + dt.timedelta(minutes=1)),
        ORG,
        Decision(P, R.TLS_FAILED_RECENTLY),
    ),
    (
        "failure older than failure_ttl is forgotten",
        ADDRESS,
        None,
        Preference.NONE,
        replace(STALE_FAILURE, last_verified_at=NOW - DAY),
        ORG,
        Decision(T, R.TLS_VERIFIED_RECENTLY),
    ),
    (
        "policy list from the cache",
        ADDRESS,
        None,
        Preference.NONE,
        DomainTls(on_policy_list=True),
        ORG,
        Decision(T, R.TLS_POLICY_LIST),
    ),
    (
        "policy list from the org, exact match",
        "a@Partner.Example.",
        None,
        Preference.NONE,
        DomainTls(),
        ORG,
        Decision(T, R.TLS_POLICY_LIST),
    ),
    (
        "policy list does not cover subdomains",
        "a@mx.partner.example",
        None,
        Preference.NONE,
        DomainTls(),
        ORG,
        Decision(P, R.TLS_UNKNOWN),
    ),
    (
        "MTA-STS enforce",
        ADDRESS,
        None,
        Preference.NONE,
        DomainTls(mta_sts_enforce=True),
        ORG,
        Decision(T, R.MTA_STS_ENFORCE),
    ),
    (
        "verified recently",
        ADDRESS,
        None,
        Preference.NONE,
        VERIFIED,
        ORG,
        Decision(T, R.TLS_VERIFIED_RECENTLY),
    ),
    (
        "verification older than tls_cache_ttl",
        ADDRESS,
        None,
        Preference.NONE,
        STALE_VERIFIED,
        ORG,
        Decision(P, R.TLS_UNKNOWN),
    ),
    (
        "verification stamped in the future is not trusted",
        ADDRESS,
        None,
        Preference.NONE,
        DomainTls(last_verified_at=NOW + dt.timedelta(seconds=1)),
        ORG,
        Decision(P, R.TLS_UNKNOWN),
    ),
    (
        "opportunistic cache disabled",
        ADDRESS,
        None,
        Preference.NONE,
        VERIFIED,
        replace(ORG, allow_opportunistic_verified_cache=False),
        Decision(P, R.TLS_UNKNOWN),
    ),
    (
        "opportunistic cache disabled, MTA-STS still counts",
        ADDRESS,
        None,
        Preference.NONE,
        replace(VERIFIED, mta_sts_enforce=True),
        replace(ORG, allow_opportunistic_verified_cache=False),
        Decision(T, R.MTA_STS_ENFORCE),
    ),
    (
        "nothing known",
        ADDRESS,
        None,
        Preference.NONE,
        DomainTls(),
        ORG,
        Decision(P, R.TLS_UNKNOWN),
    ),
]


@pytest.mark.parametrize(
    ("address", "cert", "preference", "tls", "org", "expected"),
    [case[1:] for case in BRANCHES],
    ids=[case[0] for case in BRANCHES],
)
def test_choose_protection_branches(
    address: str,
    cert: x509.Certificate | None,
    preference: Preference,
    tls: DomainTls,
    org: OrgPolicy,
    expected: Decision,
) -> None:
    recipient = RecipientFacts(
        address, normalise_domain(address.rpartition("@")[2]), cert, preference
    )
    assert choose_protection(recipient, tls, org, NOW) == expected


@pytest.mark.parametrize("name", [n for n, (_, why) in CERTS.items() if why is not None])
def test_every_unusable_certificate_falls_through_with_its_reason(name: str) -> None:
    cert, why = CERTS[name]
    recipient = RecipientFacts(ADDRESS, DOMAIN, cert)
    assert choose_protection(recipient, VERIFIED, ORG, NOW) == Decision(
        T, R.TLS_VERIFIED_RECENTLY, why
    )


def test_unparseable_certificate_is_reported() -> None:
    recipient = RecipientFacts.for_member(ADDRESS, "not a certificate")
    assert choose_protection(recipient, DomainTls(), ORG, NOW) == Decision(
        P, R.TLS_UNKNOWN, R.CERTIFICATE_UNUSABLE
    )


def test_there_is_no_plaintext_level() -> None:
    assert {level.value for level in ProtectionLevel} == {"smime", "tls_required", "portal"}


@pytest.mark.parametrize(
    ("domain", "domains", "suffix", "expected"),
    [
        ("example.com", {"example.com"}, False, True),
        ("EXAMPLE.com.", {"example.COM"}, False, True),
        ("mail.example.com", {"example.com"}, False, False),
        ("mail.example.com", {"example.com"}, True, True),
        ("badexample.com", {"example.com"}, True, False),
        ("example.com", {"mail.example.com"}, True, False),
        ("example.com", {""}, True, False),
        ("", {"example.com", ""}, True, False),
        ("example.com", set(), True, False),
    ],
)
def test_domain_in(domain: str, domains: set[str], suffix: bool, expected: bool) -> None:
    assert domain_in(domain, domains, suffix=suffix) is expected


# ---------------------------------------------------------------- TlsCache

HOUR = dt.timedelta(hours=1)


def cache() -> TlsCache:
    return TlsCache(
        verified_ttl=7 * DAY,
        failure_ttl=6 * HOUR,
        policy_domains=frozenset({"Partner.Example"}),
        mta_sts_enforce_domains=frozenset({"sts.example."}),
    )


def test_cache_static_knowledge_is_normalised() -> None:
    c = cache()
    assert c.facts("partner.example", NOW) == DomainTls(on_policy_list=True)
    assert c.facts("STS.example", NOW) == DomainTls(mta_sts_enforce=True)
    assert c.facts("mx.partner.example", NOW) == DomainTls()
    assert len(c) == 0


def test_cache_records_and_expires() -> None:
    c = cache()
    c.record_verified("Member.Example", NOW)
    assert c.facts(DOMAIN, NOW + DAY) == DomainTls(last_verified_at=NOW)
    c.record_failure(DOMAIN, NOW + DAY)
    assert c.facts(DOMAIN, NOW + DAY) == DomainTls(last_verified_at=NOW, last_failed_at=NOW + DAY)
    # the failure expires first, then the verification, then the entry itself
    assert c.facts(DOMAIN, NOW + DAY + 6 * HOUR) == DomainTls(last_verified_at=NOW)
    assert c.facts(DOMAIN, NOW + 7 * DAY) == DomainTls()
    assert len(c) == 0


def test_cache_keeps_the_latest_observation() -> None:
    c = cache()
    c.record_verified(DOMAIN, NOW)
    c.record_verified(DOMAIN, NOW - HOUR)  # late arrival from another worker
    c.record_failure(DOMAIN, NOW - HOUR)
    c.record_failure(DOMAIN, NOW - 2 * HOUR)
    assert c.facts(DOMAIN, NOW) == DomainTls(last_verified_at=NOW, last_failed_at=NOW - HOUR)


def test_cache_prune_and_records() -> None:
    c = cache()
    c.record_verified("a.example", NOW - 8 * DAY)
    c.record_failure("b.example", NOW - HOUR)
    c.record_verified("c.example", NOW - DAY)
    c.record_failure("c.example", NOW - 7 * HOUR)
    assert len(c) == 3
    assert c.prune(NOW) == 1
    assert sorted(c.records(), key=lambda r: r.domain) == [
        TlsRecord("b.example", None, NOW - HOUR),
        TlsRecord("c.example", NOW - DAY, None),
    ]
    # reloading through record_* reproduces the same facts
    reloaded = cache()
    for record in c.records():
        if record.last_verified_at:
            reloaded.record_verified(record.domain, record.last_verified_at)
        if record.last_failed_at:
            reloaded.record_failure(record.domain, record.last_failed_at)
    for domain in ("a.example", "b.example", "c.example"):
        assert reloaded.facts(domain, NOW) == c.facts(domain, NOW)


def test_cache_failure_then_policy_gives_portal() -> None:
    c = cache()
    c.record_verified("sts.example", NOW - HOUR)
    c.record_failure("sts.example", NOW - 30 * dt.timedelta(minutes=1))
    recipient = RecipientFacts.for_member("a@sts.example")
    decision = choose_protection(recipient, c.facts("sts.example", NOW), ORG, NOW)
    assert decision == Decision(P, R.TLS_FAILED_RECENTLY)
    later = NOW + 6 * HOUR
    decision = choose_protection(recipient, c.facts("sts.example", later), ORG, later)
    assert decision == Decision(T, R.MTA_STS_ENFORCE)


# ---------------------------------------------------------------- properties

ADDRESSES = [
    ADDRESS,
    "jo.member@member.example",
    "someone@gmail.example",
    "a@mail.webmail.example",
    "a@partner.example",
    "a@mx.partner.example",
    "x@other.example",
]
CERT_CHOICES = [None, *(cert for cert, _ in CERTS.values())]
offsets = st.timedeltas(min_value=-2 * DAY, max_value=30 * DAY)
domain_names = st.sampled_from(
    ["gmail.example", "webmail.example", "partner.example", "member.example", "other.example"]
)

recipients = st.builds(
    lambda address, cert, preference, unparseable: RecipientFacts(
        address,
        normalise_domain(address.rpartition("@")[2]),
        cert,
        preference,
        certificate_unparseable=unparseable and cert is None,
    ),
    st.sampled_from(ADDRESSES),
    st.sampled_from(CERT_CHOICES),
    st.sampled_from(Preference),
    st.booleans(),
)
domain_facts = st.builds(
    DomainTls,
    on_policy_list=st.booleans(),
    mta_sts_enforce=st.booleans(),
    last_verified_at=st.none() | offsets.map(lambda d: NOW - d),
    last_failed_at=st.none() | offsets.map(lambda d: NOW - d),
)
orgs = st.builds(
    OrgPolicy,
    portal_domains=st.frozensets(domain_names, max_size=3),
    tls_policy_domains=st.frozensets(domain_names, max_size=3),
    smime_enabled=st.booleans(),
    tls_cache_ttl=st.timedeltas(min_value=dt.timedelta(0), max_value=14 * DAY),
    failure_ttl=st.timedeltas(min_value=dt.timedelta(0), max_value=3 * DAY),
    allow_opportunistic_verified_cache=st.booleans(),
)
nows = st.timedeltas(min_value=-500 * DAY, max_value=500 * DAY).map(lambda d: NOW + d)

LEVEL_REASONS = {
    S: {R.RECIPIENT_CERTIFICATE},
    T: {R.TLS_POLICY_LIST, R.MTA_STS_ENFORCE, R.TLS_VERIFIED_RECENTLY},
    P: {R.MEMBER_PREFERS_PORTAL, R.ORG_PORTAL_DOMAIN, R.TLS_FAILED_RECENTLY, R.TLS_UNKNOWN},
}
ISSUES = CERTIFICATE_REASONS | {R.SMIME_DISABLED}


def _positive_tls(
    recipient: RecipientFacts, tls: DomainTls, org: OrgPolicy, now: dt.datetime
) -> bool:
    verified = tls.last_verified_at
    return (
        tls.on_policy_list
        or tls.mta_sts_enforce
        or domain_in(recipient.domain, org.tls_policy_domains, suffix=False)
        or (
            org.allow_opportunistic_verified_cache
            and verified is not None
            and verified <= now
            and now - verified < org.tls_cache_ttl
        )
    )


@settings(max_examples=600, deadline=None)
@given(recipients, domain_facts, orgs, nows)
def test_properties_of_choose_protection(
    recipient: RecipientFacts, tls: DomainTls, org: OrgPolicy, now: dt.datetime
) -> None:
    decision = choose_protection(recipient, tls, org, now)

    # always one of the three levels, with a reason that belongs to it
    assert isinstance(decision, Decision)
    assert type(decision.level) is ProtectionLevel
    assert decision.level in (S, T, P)
    assert decision.reason in LEVEL_REASONS[decision.level]
    assert decision.certificate_issue is None or decision.certificate_issue in ISSUES
    assert choose_protection(recipient, tls, org, now) == decision  # deterministic

    cert = recipient.certificate
    usable = cert is not None and certificate_usable(cert, recipient.address, now) is None

    # an unusable (or absent, or disabled) certificate never yields S/MIME; a usable one
    # always does unless the member asked for the portal
    if decision.level is S:
        assert usable and org.smime_enabled and recipient.preference is not Preference.PORTAL
    if usable and org.smime_enabled and recipient.preference is not Preference.PORTAL:
        assert decision.level is S

    # no certificate and nothing positive known of TLS: the portal
    if cert is None and not _positive_tls(recipient, tls, org, now):
        assert decision.level is P

    # a recent failure (or an org portal domain, or the member's wish) is never TLS_REQUIRED
    failed_recently = tls.last_failed_at is not None and now - tls.last_failed_at < org.failure_ttl
    if (
        failed_recently
        or domain_in(recipient.domain, org.portal_domains, suffix=True)
        or recipient.preference is Preference.PORTAL
    ):
        assert decision.level is not T
    if recipient.preference is Preference.PORTAL:
        assert decision == Decision(P, R.MEMBER_PREFERS_PORTAL)

    # TLS_REQUIRED only on positive knowledge
    if decision.level is T:
        assert _positive_tls(recipient, tls, org, now)

    # asking for email never changes what would have been chosen without a preference
    if recipient.preference is Preference.EMAIL:
        assert choose_protection(replace(recipient, preference=Preference.NONE), tls, org, now) == (
            decision
        )

    # learning of a failure now never raises the level from the portal
    if decision.level is P:
        latest = max(tls.last_failed_at or now, now)
        worse = choose_protection(recipient, replace(tls, last_failed_at=latest), org, now)
        assert worse.level is P


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), domain_names, st.timedeltas(min_value=-10 * DAY, max_value=DAY)),
        max_size=20,
    ),
    domain_names,
)
def test_cache_facts_never_hold_expired_observations(
    events: list[tuple[bool, str, dt.timedelta]], domain: str
) -> None:
    c = cache()
    for verified, name, offset in events:
        (c.record_verified if verified else c.record_failure)(name, NOW + offset)
    facts = c.facts(domain, NOW)
    if facts.last_verified_at is not None:
        assert NOW - facts.last_verified_at < c.verified_ttl
    if facts.last_failed_at is not None:
        assert NOW - facts.last_failed_at < c.failure_ttl
    recorded_failures = [
        NOW + off for ok, name, off in events if not ok and name == domain and -off < 6 * HOUR
    ]
    assert facts.last_failed_at == (max(recorded_failures) if recorded_failures else None)


def test_org_policy_normalises_its_domain_lists_once() -> None:
    org = OrgPolicy(
        portal_domains=frozenset({"WebMail.Example.", " ", ""}),
        tls_policy_domains=frozenset({" Partner.EXAMPLE "}),
    )
    assert org.portal_domains == {"webmail.example"}
    assert org.tls_policy_domains == {"partner.example"}
    webmail = RecipientFacts("a@Mail.WebMail.example.", "Mail.WebMail.example.")
    partner = RecipientFacts("b@partner.example", "PARTNER.example")
    assert choose_protection(webmail, DomainTls(), org, NOW).reason is R.ORG_PORTAL_DOMAIN
    assert choose_protection(partner, DomainTls(), org, NOW).reason is R.TLS_POLICY_LIST


def test_tls_cache_gives_out_its_own_observations_once_and_not_others() -> None:
    cache = TlsCache(verified_ttl=7 * DAY, failure_ttl=dt.timedelta(hours=6))
    cache.record_verified("A.example.", NOW - DAY)
    cache.merge(TlsRecord("b.example", NOW, None))  # another worker's: not given out again
    taken = cache.take_unsaved()
    assert taken == [TlsRecord("a.example", NOW - DAY, None)]
    assert cache.take_unsaved() == []
    cache.unsaved(taken)  # could not be saved: offered again
    assert cache.take_unsaved() == taken
    # Merging keeps the latest of each observation, as recording does.
    cache.merge(TlsRecord("a.example", NOW - 2 * DAY, NOW - dt.timedelta(hours=1)))
    facts = cache.facts("a.example", NOW)
    assert facts.last_verified_at == NOW - DAY
    assert facts.last_failed_at == NOW - dt.timedelta(hours=1)
