"""`eobblast demo`: the real path on embedded defaults.

It generates events, starts the sandbox receivers and an embedded Kafka-compatible broker
(Tansu), publishes the events to `eob.events` as a claims system would, runs the worker
processes under the supervisor, and builds its summary from `eob.delivery`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from eobblast._holes import HOLE_SETTLE
from eobblast.bounces.listener import serve_bounces
from eobblast.bounces.rules import DEFAULT_RULES_RESOURCE
from eobblast.config import BouncesConfig, Config, load_config, with_settings
from eobblast.errors import EobblastError, ReasonCode
from eobblast.events.status import DeliveryStatus
from eobblast.events.synthetic import PAYERS, Mix, generate_events
from eobblast.events.verification import (
    AddressVerificationFailed,
    AddressVerificationRequested,
    AddressVerified,
    FailureReason,
    VerificationChannel,
    dump,
)
from eobblast.portal import create_app, serve_portal
from eobblast.protect.dkim import generate_keys
from eobblast.protect.services import ProtectionServices
from eobblast.protect.testcerts import MemberCertificates
from eobblast.sandbox import Sandbox, TestPki, default_sandbox_domains, make_test_pki
from eobblast.streams import EmbeddedBroker, make_consumer, make_producer
from eobblast.streams.kafka import PLAINTEXT, ReadAgain
from eobblast.supervisor import Supervisor
from eobblast.worker import ProducerPublisher, dsn_handler, open_bounces

EVENT_PARTITIONS = 4
# The demo's TLS policy list: domains the insurer believes accept verified TLS. Some of them
# fail at delivery time (no STARTTLS, expired certificate, dropped connection), which shows
# the fallback to the portal; the others are learnt from verified handshakes.
DEMO_TLS_POLICY_DOMAINS = (
    "alpha.sandbox.test",
    "bravo.sandbox.test",
    "notls.sandbox.test",
    "expired.sandbox.test",
    "dropper.sandbox.test",
)

# A few members asked for the portal: their notices go there whatever else is known.
DEMO_MIX = Mix(prefers_portal=0.04)


def write_config(path: Path, portal: dict[str, str]) -> None:
    """A config file for `eobblast portal --config` to serve the demo's pickup links."""
    lines = ["# Written by eobblast demo: serves this run's pickup links.", "[portal]"]
    lines += [f"{key} = {orjson.dumps(value).decode()}" for key, value in portal.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class DemoIncomplete(EobblastError):
    """Not every event reached a final status in time."""

    def __init__(self, missing: int) -> None:
        super().__init__(ReasonCode.INTERNAL_ERROR, f"{missing} events have no final status")
        self.missing = missing


# Statuses that will change again: a retry is scheduled, or the notice waits for the
# member's address to be verified. Everything else is final for the demo.
PENDING = {
    "deferred": {"retry_scheduled", "in_flight"},
    "held": {"awaiting_verification", "address_suppressed", "in_flight"},
}


def is_final(status: DeliveryStatus) -> bool:
    """Whether a status ends its event's story (not a scheduled retry or a hold)."""
    return str(status.reason) not in PENDING.get(str(status.status), set())


@dataclass(slots=True)
class Tally:
    """The latest status of every event key, as they arrive from eob.delivery."""

    latest: dict[str, DeliveryStatus] = field(default_factory=dict)
    history: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    republished: int = 0
    changed_at: float = field(default_factory=time.monotonic)

    def add(self, key: str, status: DeliveryStatus) -> bool:
        """Record one status; True when this event has just reached a final status."""
        previous = self.latest.get(key)
        if previous is not None and previous.status_id == status.status_id:
            self.republished += 1
            return False
        self.latest[key] = status
        self.changed_at = time.monotonic()
        self.history[f"{status.status}/{status.reason}"] += 1
        if status.source_timestamp is not None and previous is None:
            delta = (status.occurred_at - status.source_timestamp).total_seconds()
            self.latencies.append(max(0.0, delta))
        return is_final(status) and (previous is None or not is_final(previous))

    @property
    def total(self) -> int:
        """Events whose latest status is final."""
        return sum(1 for status in self.latest.values() if is_final(status))

    def counts(self) -> tuple[Counter[str], dict[str, Counter[str]]]:
        """Final statuses by status and by status/reason."""
        by_status: Counter[str] = Counter()
        by_reason: dict[str, Counter[str]] = {}
        for status in self.latest.values():
            by_status[str(status.status)] += 1
            by_reason.setdefault(str(status.status), Counter())[str(status.reason)] += 1
        return by_status, by_reason


def _percentile(values: list[float], q: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def build_summary(tally: Tally, events: int, elapsed: float, sandbox: Sandbox) -> dict[str, Any]:
    """The demo's summary.json document."""
    per_domain: dict[str, dict[str, int]] = {}
    for record in sandbox.received:
        entry = per_domain.setdefault(record.domain, {"received": 0, "received_over_tls": 0})
        entry["received"] += 1
        entry["received_over_tls"] += record.tls_version is not None
    by_status, by_reason = tally.counts()
    by_tls: Counter[str] = Counter()
    by_protection: dict[str, Counter[str]] = {}
    for status in tally.latest.values():
        if str(status.status) != "delivered":
            continue
        if status.tls_version:
            by_tls[status.tls_version] += 1
        if status.protection:
            by_protection.setdefault(status.protection, Counter())[
                status.protection_reason or "unknown"
            ] += 1
    delivered = by_status.get("delivered", 0)
    return {
        "events": events,
        "final_statuses": tally.total,
        "by_status": dict(sorted(by_status.items())),
        "by_reason": {k: dict(sorted(v.items())) for k, v in sorted(by_reason.items())},
        "delivered_by_tls_version": dict(sorted(by_tls.items())),
        "delivered_by_protection": {
            level: dict(sorted(reasons.items())) for level, reasons in sorted(by_protection.items())
        },
        "status_history": dict(sorted(tally.history.items())),
        "republished_statuses": tally.republished,
        "dsns_sent_by_receivers": sum(sandbox.dsns_sent.values()),
        "elapsed_seconds": round(elapsed, 3),
        "events_per_second": round(tally.total / elapsed, 1) if elapsed else 0.0,
        "messages_per_second": round(delivered / elapsed, 1) if elapsed else 0.0,
        "latency_seconds": {
            "p50": round(_percentile(tally.latencies, 50), 6),
            "p99": round(_percentile(tally.latencies, 99), 6),
        },
        "sandbox": dict(sorted(per_domain.items())),
    }


def prepare_keys(key_dir: Path, dns_dir: Path, selector: str, *, ed25519: bool) -> None:
    """Create the demo payers' DKIM keys and write their DNS records as zone-file lines."""
    dns_dir.mkdir(parents=True, exist_ok=True)
    for _, _, domain in PAYERS:
        records = generate_keys(key_dir, domain, selector, ed25519=ed25519)
        (dns_dir / f"{domain}.zone").write_text(
            "".join(record.zone_line() + "\n" for record in records), encoding="utf-8"
        )


def _prepare(out: Path, events: int, seed: int, config: Config, hosts: list[str]) -> TestPki:
    # Files first (keys, DNS records, events, test CA): blocking work, done off the loop.
    out.mkdir(parents=True, exist_ok=True)
    prepare_keys(out / "keys", out / "dns", config.dkim.selector, ed25519=config.dkim.ed25519)
    certificates = MemberCertificates(out / "smime")
    with (out / "events.jsonl").open("wb") as sink:
        for raw in generate_events(
            events,
            seed=seed,
            now=dt.datetime.now(dt.UTC),
            certificates=certificates,
            mix=DEMO_MIX,
        ):
            sink.write(raw + b"\n")
    for store in ("ledger.db", "escrow.db", "audit.db", "bounces.db"):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{out / store}{suffix}").unlink(missing_ok=True)  # a fresh run, fresh stores
    return make_test_pki(out / "pki", hosts)


def member_key(raw: bytes) -> bytes:
    """The Kafka key a claims system would use: the member id (one member's EOBs in order)."""
    try:
        doc = orjson.loads(raw)
        member_id = doc["member"]["id"]
        if isinstance(member_id, str) and member_id:
            return member_id.encode()
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    # A claims system always knows the member; for our spoiled samples any stable key does.
    return b"unknown-member"


async def publish_events(bootstrap: str, topic: str, path: Path) -> int:
    """Publish every line of a JSON Lines file to `topic`, keyed by member id."""
    producer = make_producer(bootstrap, client_id="eobblast-demo-claims", security=PLAINTEXT)
    await producer.start()
    count = 0
    try:
        pending = []
        with path.open("rb") as source:
            for line in source:
                raw = line.rstrip(b"\n")
                pending.append(await producer.send(topic, raw, key=member_key(raw)))
                count += 1
                if len(pending) >= 1000:
                    await asyncio.gather(*pending)
                    pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return count


async def collect_statuses(
    bootstrap: str,
    topic: str,
    expected: int,
    tally: Tally,
    *,
    wait_seconds: float,
    on_status: Callable[[DeliveryStatus], None] | None = None,
    failed: Callable[[], bool] = lambda: False,
    busy: Callable[[], bool] = lambda: False,
    settle: float = 2.0,
) -> None:
    """Read eob.delivery until every event has a final status, nothing is `busy` (a DSN
    still on its way could turn a delivered notice into a held one) and nothing changed
    for `settle` seconds; or until the time is up."""
    holes = ReadAgain()
    consumer = make_consumer(
        bootstrap,
        f"eobblast-demo-{time.time_ns()}",
        [topic],
        client_id="eobblast-demo-summary",
        max_poll_records=1000,
        session_timeout_ms=3000,
        heartbeat_interval_ms=1000,
        rebalance_listener=holes.listener(),
        security=PLAINTEXT,
    )
    await consumer.start()
    deadline = time.monotonic() + wait_seconds
    try:
        # Done when every event is final and, for a moment, nothing has changed and no DSN
        # was on its way (the status its handling published may still be in transit).
        busy_at = time.monotonic()
        while (now := time.monotonic()) < deadline and not failed():
            if busy():
                busy_at = now
            if tally.total >= expected and now - max(tally.changed_at, busy_at) > settle:
                break
            batch = await holes.take(consumer, await consumer.getmany(timeout_ms=200))
            for records in batch.values():
                for record in records:
                    status = DeliveryStatus.model_validate_json(record.value)
                    if tally.add(record.key.decode(), status) and on_status is not None:
                        on_status(status)
    finally:
        await consumer.stop()


def demo_rules(path: Path) -> Path:
    """The packaged bounce rules with demo timings: retries in seconds, not hours."""
    text = (resources.files("eobblast.bounces") / DEFAULT_RULES_RESOURCE).read_text("utf-8")
    for old, new in (
        ("initial_delay_seconds = 300", "initial_delay_seconds = 1"),
        ("max_delay_seconds = 14400", "max_delay_seconds = 2"),
        ("max_age_seconds = 259200", "max_age_seconds = 6"),
        ("timeout_seconds = 604800", "timeout_seconds = 8"),
    ):
        if old not in text:
            raise EobblastError(ReasonCode.INTERNAL_ERROR, f"demo rules: {old!r} not found")
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    return path


def member_addresses(path: Path) -> dict[str, str]:
    """Member id -> address, from the demo's events (what the claims system knows)."""
    known: dict[str, str] = {}
    for line in path.read_bytes().splitlines():
        try:
            member = orjson.loads(line)["member"]
            known[str(member["id"])] = str(member["email"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
    return known


async def simulate_claims_system(
    bootstrap: str, settings: BouncesConfig, addresses: dict[str, str], stop: asyncio.Event
) -> Counter[str]:
    """Answer verification requests as a member-services team would, by phone.

    Every other member confirms a corrected address (the bouncing prefix removed); the
    rest cannot be reached, and their notices fall back to paper.
    """
    holes = ReadAgain()
    consumer = make_consumer(
        bootstrap,
        f"eobblast-demo-claims-{time.time_ns()}",
        [settings.verification_topic],
        client_id="eobblast-demo-claims",
        max_poll_records=100,
        session_timeout_ms=3000,
        heartbeat_interval_ms=1000,
        rebalance_listener=holes.listener(),
        security=PLAINTEXT,
    )
    producer = make_producer(bootstrap, client_id="eobblast-demo-claims", security=PLAINTEXT)
    await consumer.start()
    await producer.start()
    answered: Counter[str] = Counter()
    try:
        while not stop.is_set():
            batch = await holes.take(consumer, await consumer.getmany(timeout_ms=200))
            for records in batch.values():
                for record in records:
                    request = AddressVerificationRequested.model_validate_json(record.value)
                    member = request.member_id
                    now = dt.datetime.now(dt.UTC)
                    result: AddressVerified | AddressVerificationFailed
                    local, _, domain = addresses.get(member, "").partition("@")
                    if domain and int(hashlib.sha256(member.encode()).hexdigest(), 16) % 2:
                        for prefix in ("unknown-", "gone-"):
                            local = local.removeprefix(prefix)
                        result = AddressVerified.model_validate(
                            {
                                "request_id": request.request_id,
                                "member_id": member,
                                "address": f"{local}@{domain}",
                                "channel": VerificationChannel.PHONE,
                                "verified_by": "demo-member-services",
                                "at": now,
                            },
                            context={"allow_test_domains": True},
                        )
                        answered["verified"] += 1
                    else:
                        result = AddressVerificationFailed(
                            request_id=request.request_id,
                            member_id=member,
                            reason=FailureReason.NO_ANSWER,
                            at=now,
                        )
                        answered["failed"] += 1
                    await producer.send_and_wait(
                        settings.results_topic, dump(result), key=member.encode()
                    )
    finally:
        await consumer.stop()
        await producer.stop()
    return answered


def demo_worker_config(
    base: Config,
    shared: dict[str, Any],
    out: Path,
    ca: Path,
    routes: dict[str, str],
    workers: int,
) -> Config:
    """The workers' configuration: `base` (the user's file and EOBBLAST_* variables) with
    what the demo owns replaced: its stores and keys under `out`, its broker and receivers,
    its test CA, and sending from loopback with no IP pools (a production pool's addresses
    and warm-up budgets stay out of it)."""
    return with_settings(
        base,
        {
            **shared,
            "protection": {
                "tls_policy_domains": [
                    *base.protection.tls_policy_domains,
                    *DEMO_TLS_POLICY_DOMAINS,
                ]
            },
            "dkim": {"key_dir": str(out / "keys")},
            "transport": {"ca_bundle": str(ca), "routes": routes, "source_address": None},
            "shaping": {"pools_file": None},
            "ledger": {"url": f"sqlite:///{out / 'ledger.db'}"},
            "workers": {"count": workers, "grace_period": 10.0},
            # The demo's broker is Tansu: its holes are read again, whatever was given.
            "kafka": {
                **shared.get("kafka", {}),
                "hole_settle": max(base.kafka.hole_settle, HOLE_SETTLE),
            },
        },
    )


async def run_demo(
    events: int,
    out: Path,
    *,
    seed: int = 1,
    workers: int = 2,
    config: Config | None = None,
    log_level: str = "WARNING",
    on_status: Callable[[DeliveryStatus], None] | None = None,
    wait_seconds: float | None = None,
) -> dict[str, Any]:
    """Run the whole demo into `out` and return the summary (also written to summary.json)."""
    # Its stores are named by absolute paths: where the demo runs is where they are.
    out = await asyncio.to_thread(out.absolute)
    base = config or load_config()
    domains = default_sandbox_domains()
    pki = await asyncio.to_thread(_prepare, out, events, seed, base, [d.name for d in domains])
    tally = Tally()
    kafka = base.kafka
    bounce_settings: dict[str, Any] = {
        "store_url": f"sqlite:///{out / 'bounces.db'}",
        "verp_key_file": str(out / "keys" / "verp.key"),
        "review_dir": str(out / "bounce-review"),
        "bounce_domain": "bounces.sandbox.test",
        "rules_file": str(await asyncio.to_thread(demo_rules, out / "bounce_rules.toml")),
        "tick_interval": 0.5,
        "verp_previous_keys": [],  # the demo's own key only: a production key's files stay out
    }
    async with EmbeddedBroker(log_dir=out) as broker:
        await broker.create_topics(
            {
                kafka.events_topic: EVENT_PARTITIONS,
                kafka.delivery_topic: 4,
                kafka.dlq_topic: 1,
                base.bounces.verification_topic: 1,
                base.bounces.results_topic: 1,
                base.bounces.paper_topic: 1,
            }
        )
        portal_settings = {
            "escrow_url": f"sqlite:///{out / 'escrow.db'}",
            "audit_url": f"sqlite:///{out / 'audit.db'}",
            "key_dir": str(out / "portal-keys"),
            "audit_key_file": str(out / "portal-keys" / "audit.key"),
        }
        shared = {
            "portal": portal_settings,
            "bounces": bounce_settings,
            "kafka": {
                "bootstrap": broker.bootstrap,
                "session_timeout_ms": 3000,
                "heartbeat_interval_ms": 1000,
            },
            "pipeline": {"allow_test_domains": True},
        }
        # The given configuration, with the demo's own stores, keys, broker and receivers:
        # everything else (and every EOBBLAST_* variable) reaches the workers as given.
        services = await ProtectionServices.open(with_settings(base, shared))
        assert services.escrow is not None and services.audit is not None
        portal = await serve_portal(create_app(services.escrow, services.audit, hsts=False))
        portal_settings["base_url"] = f"{portal.url}/p/"
        # The bounce listener: receivers send their DSNs to the VERP return path's MX.
        listener_config = with_settings(base, shared)
        bounce_producer = make_producer(
            broker.bootstrap, client_id="eobblast-demo-bounces", security=PLAINTEXT
        )
        await bounce_producer.start()
        bounce_service = await open_bounces(
            listener_config,
            services,
            ProducerPublisher(bounce_producer),
            actor="bounce-listener",
        )
        listener = await serve_bounces(
            dsn_handler(bounce_service, bounce_producer),
            "127.0.0.1",
            0,
            bounce_domain=listener_config.bounces.bounce_domain,
            review_dir=listener_config.bounces.review_dir,
            prefix=listener_config.bounces.verp_prefix,
            data_size_limit=listener_config.bounces.max_message_bytes,
        )
        try:
            async with Sandbox(
                domains, out / "maildir", pki, bounce_route=("127.0.0.1", listener.port)
            ) as sandbox:
                routes = {n: f"{host}:{port}" for n, (host, port) in sandbox.routes.items()}
                config = demo_worker_config(base, shared, out, pki.ca, routes, workers)
                await asyncio.to_thread(write_config, out / "eobblast.toml", portal_settings)
                addresses = await asyncio.to_thread(member_addresses, out / "events.jsonl")
                started = time.perf_counter()
                published = await publish_events(
                    broker.bootstrap, kafka.events_topic, out / "events.jsonl"
                )
                stop = asyncio.Event()
                supervisor = Supervisor(config, workers=workers, log_level=log_level)
                supervising = asyncio.create_task(supervisor.run(stop))
                claims = asyncio.create_task(
                    simulate_claims_system(broker.bootstrap, config.bounces, addresses, stop)
                )
                try:
                    await collect_statuses(
                        broker.bootstrap,
                        kafka.delivery_topic,
                        published,
                        tally,
                        wait_seconds=wait_seconds or 90.0 + events / 20,
                        on_status=on_status,
                        failed=supervising.done,
                        busy=lambda: sandbox.dsns_pending > 0,
                    )
                finally:
                    stop.set()
                    await supervising
                    answered = await claims
                elapsed = time.perf_counter() - started
                summary = build_summary(tally, events, elapsed, sandbox)
                summary["verification_answers"] = dict(sorted(answered.items()))
        finally:
            await listener.stop()
            await bounce_service.store.close()
            await bounce_producer.stop()
            await portal.stop()
            await services.close()
    document = orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n"
    await asyncio.to_thread((out / "summary.json").write_bytes, document)
    return summary
