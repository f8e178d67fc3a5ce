"""Realistic fake `eob.issued/v1` events for the demo, tests and benchmarks (no real PHI)."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal

import orjson
from faker import Faker

DEFAULT_DOMAINS = (
    "alpha.sandbox.test",
    "bravo.sandbox.test",
    "charlie.sandbox.test",
    "notls.sandbox.test",
    "untrusted.sandbox.test",
    "expired.sandbox.test",
    "wronghost.sandbox.test",
    "dropper.sandbox.test",
)
# Most members sit at receivers that work; a few at ones that must never get PHI.
DEFAULT_DOMAIN_WEIGHTS = (30, 20, 20, 6, 6, 6, 6, 6)
PAYERS = (
    ("BHP001", "Bluehaven Health Plan", "bluehaven.test"),
    ("RVM002", "Riverside Mutual Health", "riverside.test"),
)
# CPT/HCPCS codes with lay descriptions, as an EOB prints them.
PROCEDURES = (
    ("99213", "Office visit, established patient", 80, 180),
    ("99214", "Office visit, moderate complexity", 120, 260),
    ("80053", "Comprehensive metabolic panel", 25, 90),
    ("85025", "Complete blood count", 15, 60),
    ("71046", "Chest X-ray, two views", 60, 220),
    ("93000", "Electrocardiogram", 40, 150),
    ("36415", "Blood draw", 8, 30),
    ("97110", "Physical therapy, exercises", 50, 140),
    ("J1100", "Injection, dexamethasone", 10, 45),
    ("G0439", "Annual wellness visit", 150, 300),
)
REMARKS = ("N130", "M15", "N381", "MA01", "N657", "45")
CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Mix:
    """Share of each unusual case among generated events (the rest are ordinary)."""

    no_consent: float = 0.04
    invalid_address: float = 0.02
    malformed: float = 0.03
    unknown_user: float = 0.03
    busy_mailbox: float = 0.02
    # Accepted, then bounced by a DSN a moment later (the sandbox's "gone-" rule).
    gone: float = 0.03
    spanish: float = 0.3
    # Members with an S/MIME certificate on file (only when a certificate source is given).
    smime: float = 0.05
    # Members who asked for the secure portal (`member.preference`). None by default, and
    # drawn from a stream of its own: turning it on changes no other field of any event.
    prefers_portal: float = 0.0


def _npi(rng: random.Random) -> str:
    base = "1" + "".join(str(rng.randrange(10)) for _ in range(8))
    digits = [int(c) for c in "80840" + base]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return base + str((10 - total % 10) % 10)


def _money(value: Decimal) -> str:
    return str(value.quantize(CENT))


def _service_line(rng: random.Random) -> dict[str, object]:
    code, description, low, high = rng.choice(PROCEDURES)
    billed = Decimal(rng.randrange(low * 100, high * 100)) / 100
    allowed = (billed * Decimal(rng.randrange(45, 85)) / 100).quantize(CENT)
    deductible = min(allowed, Decimal(rng.choice((0, 0, 20, 50)))).quantize(CENT)
    copay = min(allowed - deductible, Decimal(rng.choice((0, 0, 10, 25)))).quantize(CENT)
    coinsurance = ((allowed - deductible - copay) * Decimal("0.20")).quantize(CENT)
    plan_paid = allowed - deductible - copay - coinsurance
    return {
        "code": code,
        "description": description,
        "billed": _money(billed),
        "allowed": _money(allowed),
        "deductible": _money(deductible),
        "copay": _money(copay),
        "coinsurance": _money(coinsurance),
        "plan_paid": _money(plan_paid),
        "member_owes": _money(deductible + copay + coinsurance),
        "remark_codes": rng.sample(REMARKS, rng.randrange(0, 3)),
    }


def _local_part(fake: Faker, rng: random.Random) -> str:
    return f"{fake.user_name()}{rng.randrange(1000, 99999)}".lower().replace(".", "")


def synthetic_event(
    fake: Faker,
    rng: random.Random,
    domains: Sequence[str],
    mix: Mix,
    now: dt.datetime,
    weights: Sequence[float] | None = None,
) -> dict[str, object]:
    """One well-formed event as a plain mapping (callers may then spoil it on purpose)."""
    payer_id, payer_name, sending_domain = rng.choice(PAYERS)
    spanish = rng.random() < mix.spanish
    name = fake.name()
    local = _local_part(fake, rng)
    roll = rng.random()
    if roll < mix.unknown_user:
        local = "unknown-" + local
    elif roll < mix.unknown_user + mix.busy_mailbox:
        local = "busy-" + local
    elif roll < mix.unknown_user + mix.busy_mailbox + mix.gone:
        local = "gone-" + local
    start = now.date() - dt.timedelta(days=rng.randrange(10, 90))
    lines = [_service_line(rng) for _ in range(rng.randrange(1, 5))]
    consent = rng.random() >= mix.no_consent
    ded_limit = Decimal(rng.choice((500, 1000, 1500, 3000)))
    oop_limit = ded_limit * 4
    return {
        "schema": "eob.issued/v1",
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "issued_at": now.isoformat(),
        "payer": {"id": payer_id, "name": payer_name, "sending_domain": sending_domain},
        "member": {
            "id": f"M{rng.randrange(10**9, 10**10)}",
            "name": name,
            "email": f"{local}@{rng.choices(domains, weights)[0]}",
            "preferred_language": "es" if spanish else "en",
            "consent": {
                "electronic_delivery": consent,
                "recorded_at": (now - dt.timedelta(days=rng.randrange(30, 900))).isoformat(),
            },
            "date_of_birth": fake.date_of_birth(minimum_age=1, maximum_age=90).isoformat(),
        },
        "claim": {
            "id": f"C{rng.randrange(10**11, 10**12)}",
            "patient_name": name,
            "provider": {"name": fake.company() + " Medical Group", "npi": _npi(rng)},
            "service_period": {
                "start": start.isoformat(),
                "end": (start + dt.timedelta(days=rng.randrange(0, 3))).isoformat(),
            },
            "processed_date": (now.date() - dt.timedelta(days=rng.randrange(1, 9))).isoformat(),
            "lines": lines,
        },
        "accumulators": {
            "deductible": {
                "met": _money(ded_limit * Decimal(rng.randrange(0, 101)) / 100),
                "limit": _money(ded_limit),
            },
            "out_of_pocket": {
                "met": _money(oop_limit * Decimal(rng.randrange(0, 60)) / 100),
                "limit": _money(oop_limit),
            },
        },
        "appeal": {
            "deadline": (now.date() + dt.timedelta(days=180)).isoformat(),
            "instructions": (
                f"Write to {payer_name} Appeals, PO Box {rng.randrange(1000, 9999)}, "
                f"or call 1-800-555-{rng.randrange(1000, 9999)} within 180 days."
            ),
        },
    }


# Each malformation exercises one rejection path of the validator.
def _spoil(event: dict[str, object], rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    member = event["member"]
    claim = event["claim"]
    assert isinstance(member, dict) and isinstance(claim, dict)
    if kind == 0:
        return orjson.dumps(event)[:-7]  # truncated JSON
    if kind == 1:
        del member["email"]
    elif kind == 2:
        claim["lines"][0]["billed"] = float(claim["lines"][0]["billed"])
    elif kind == 3:
        member["name"] = member["name"] + "\r\nBcc: attacker@evil.test"
    elif kind == 4:
        claim["lines"][0]["description"] = "x" * 1_100_000
    elif kind == 5:
        member["consent"] = "yes"
    else:
        event["schema"] = "eob.issued/v0"
    return orjson.dumps(event)


def generate_events(
    count: int,
    *,
    seed: int = 1,
    domains: Sequence[str] = DEFAULT_DOMAINS,
    weights: Sequence[float] | None = DEFAULT_DOMAIN_WEIGHTS,
    mix: Mix | None = None,
    now: dt.datetime | None = None,
    certificates: Callable[[str], str] | None = None,
) -> Iterator[bytes]:
    """Yield `count` serialised events (one JSON document each), deterministic for a seed.

    `certificates(address) -> PEM`, when given, supplies S/MIME certificates for a share
    (`mix.smime`) of the members.
    """
    mix = mix or Mix()
    rng = random.Random(seed)
    fake_en = Faker("en_US")
    fake_es = Faker("es_MX")
    fake_en.seed_instance(seed)
    fake_es.seed_instance(seed + 1)
    now = now or dt.datetime.now(dt.UTC).replace(microsecond=0)
    preferences = random.Random(f"preference-{seed}")
    for _ in range(count):
        fake = fake_es if rng.random() < mix.spanish else fake_en
        if weights is not None and len(weights) != len(domains):
            weights = None
        event = synthetic_event(fake, rng, domains, mix, now, weights)
        if certificates is not None and rng.random() < mix.smime:
            member = event["member"]
            assert isinstance(member, dict)
            member["smime_certificate"] = certificates(str(member["email"]))
        if preferences.random() < mix.prefers_portal:
            member = event["member"]
            assert isinstance(member, dict)
            member["preference"] = "portal"
        roll = rng.random()
        if roll < mix.malformed:
            yield _spoil(event, rng)
            continue
        if roll < mix.malformed + mix.invalid_address:
            member = event["member"]
            assert isinstance(member, dict)
            member["email"] = rng.choice(
                ("not-an-address", "two@@signs.test", "trailing-dot@alpha.sandbox.test.")
            )
        yield orjson.dumps(event)
