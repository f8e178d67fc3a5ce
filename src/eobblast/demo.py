"""`eobblast demo`: the real path on embedded defaults.

It generates events, starts the sandbox receivers and an embedded Kafka-compatible broker
(Tansu), publishes the events to `eob.events` as a claims system would, runs the worker
processes under the supervisor, and builds its summary from `eob.delivery`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from eobblast.config import Config, load_config
from eobblast.errors import EobblastError, ReasonCode
from eobblast.events.status import DeliveryStatus
from eobblast.events.synthetic import PAYERS, generate_events
from eobblast.portal import create_app, serve_portal
from eobblast.protect.dkim import generate_keys
from eobblast.protect.services import ProtectionServices
from eobblast.protect.testcerts import MemberCertificates
from eobblast.sandbox import Sandbox, TestPki, default_sandbox_domains, make_test_pki
from eobblast.streams import EmbeddedBroker, make_consumer, make_producer
from eobblast.supervisor import Supervisor

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


@dataclass(slots=True)
class Tally:
    """Final statuses as they arrive from eob.delivery, one per event key."""

    by_status: Counter[str] = field(default_factory=Counter)
    by_reason: dict[str, Counter[str]] = field(default_factory=dict)
    by_tls: Counter[str] = field(default_factory=Counter)
    by_protection: dict[str, Counter[str]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    republished: int = 0

    def add(self, key: str, status: DeliveryStatus) -> bool:
        """Record one status; False if this event already had one (a republished status)."""
        if key in self.seen:
            self.republished += 1
            return False
        self.seen.add(key)
        name, reason = str(status.status), str(status.reason)
        self.by_status[name] += 1
        self.by_reason.setdefault(name, Counter())[reason] += 1
        if status.tls_version:
            self.by_tls[status.tls_version] += 1
        if status.protection and name == "delivered":
            reasons = self.by_protection.setdefault(status.protection, Counter())
            reasons[status.protection_reason or "unknown"] += 1
        if status.source_timestamp is not None:
            delta = (status.occurred_at - status.source_timestamp).total_seconds()
            self.latencies.append(max(0.0, delta))
        return True

    @property
    def total(self) -> int:
        """Events with a final status."""
        return len(self.seen)


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
    delivered = tally.by_status.get("delivered", 0)
    return {
        "events": events,
        "final_statuses": tally.total,
        "by_status": dict(sorted(tally.by_status.items())),
        "by_reason": {k: dict(sorted(v.items())) for k, v in sorted(tally.by_reason.items())},
        "delivered_by_tls_version": dict(sorted(tally.by_tls.items())),
        "delivered_by_protection": {
            level: dict(sorted(reasons.items()))
            for level, reasons in sorted(tally.by_protection.items())
        },
        "republished_statuses": tally.republished,
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
            events, seed=seed, now=dt.datetime.now(dt.UTC), certificates=certificates
        ):
            sink.write(raw + b"\n")
    for store in ("ledger.db", "escrow.db", "audit.db"):
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
    producer = make_producer(bootstrap, client_id="eobblast-demo-claims")
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
) -> None:
    """Read eob.delivery until every event has a final status or the time is up."""
    consumer = make_consumer(
        bootstrap,
        f"eobblast-demo-{time.time_ns()}",
        [topic],
        client_id="eobblast-demo-summary",
        max_poll_records=1000,
        session_timeout_ms=3000,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    deadline = time.monotonic() + wait_seconds
    try:
        while tally.total < expected and time.monotonic() < deadline and not failed():
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    status = DeliveryStatus.model_validate_json(record.value)
                    if tally.add(record.key.decode(), status) and on_status is not None:
                        on_status(status)
    finally:
        await consumer.stop()


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
    base = config or load_config()
    domains = default_sandbox_domains()
    pki = await asyncio.to_thread(_prepare, out, events, seed, base, [d.name for d in domains])
    tally = Tally()
    async with (
        EmbeddedBroker(log_dir=out) as broker,
        Sandbox(domains, out / "maildir", pki) as sandbox,
    ):
        kafka = base.kafka
        await broker.create_topics(
            {kafka.events_topic: EVENT_PARTITIONS, kafka.delivery_topic: 4, kafka.dlq_topic: 1}
        )
        routes = {name: f"{host}:{port}" for name, (host, port) in sandbox.routes.items()}
        portal_settings = {
            "escrow_url": f"sqlite:///{out / 'escrow.db'}",
            "audit_url": f"sqlite:///{out / 'audit.db'}",
            "key_dir": str(out / "portal-keys"),
            "audit_key_file": str(out / "portal-keys" / "audit.key"),
        }
        portal_config = load_config(environ={}, overrides={"portal": portal_settings})
        services = await ProtectionServices.open(portal_config)  # creates the portal keys
        assert services.escrow is not None and services.audit is not None
        portal = await serve_portal(create_app(services.escrow, services.audit, hsts=False))
        portal_settings["base_url"] = f"{portal.url}/p/"
        config = load_config(
            environ={},
            overrides={
                "protection": {"tls_policy_domains": list(DEMO_TLS_POLICY_DOMAINS)},
                "portal": portal_settings,
                "dkim": {"key_dir": str(out / "keys"), "selector": base.dkim.selector},
                "transport": {"ca_bundle": str(pki.ca), "routes": routes},
                "pipeline": {"allow_test_domains": True},
                "kafka": {
                    "bootstrap": broker.bootstrap,
                    "session_timeout_ms": 3000,
                    "heartbeat_interval_ms": 1000,
                },
                "ledger": {"url": f"sqlite:///{out / 'ledger.db'}"},
                "workers": {"count": workers, "grace_period": 10.0},
            },
        )
        await asyncio.to_thread(write_config, out / "eobblast.toml", portal_settings)
        started = time.perf_counter()
        published = await publish_events(broker.bootstrap, kafka.events_topic, out / "events.jsonl")
        stop = asyncio.Event()
        supervisor = Supervisor(config, workers=workers, log_level=log_level)
        supervising = asyncio.create_task(supervisor.run(stop))
        try:
            await collect_statuses(
                broker.bootstrap,
                kafka.delivery_topic,
                published,
                tally,
                wait_seconds=wait_seconds or 60.0 + events / 20,
                on_status=on_status,
                failed=supervising.done,
            )
        finally:
            stop.set()
            await supervising
            await portal.stop()
            await services.close()
        elapsed = time.perf_counter() - started
        summary = build_summary(tally, events, elapsed, sandbox)
    document = orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n"
    await asyncio.to_thread((out / "summary.json").write_bytes, document)
    return summary
