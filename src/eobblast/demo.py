"""`eobblast demo`: generate events, start the sandbox, send everything, summarise."""

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
from eobblast.events.synthetic import PAYERS, generate_events
from eobblast.pipeline import EventOutcome, Pipeline
from eobblast.protect.dkim import generate_keys
from eobblast.runner import run_events
from eobblast.sandbox import Sandbox, TestPki, default_sandbox_domains, make_test_pki
from eobblast.transport import Transport


@dataclass(slots=True)
class Tally:
    """Counts outcomes as they arrive; keeps latencies for percentiles."""

    by_status: Counter[str] = field(default_factory=Counter)
    by_reason: dict[str, Counter[str]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def add(self, outcome: EventOutcome) -> None:
        """Record one final outcome."""
        status, reason = str(outcome.outcome), str(outcome.reason)
        self.by_status[status] += 1
        self.by_reason.setdefault(status, Counter())[reason] += 1
        self.latencies.append(outcome.latency)

    @property
    def total(self) -> int:
        """Events with a final status."""
        return sum(self.by_status.values())


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def build_summary(tally: Tally, events: int, elapsed: float, sandbox: Sandbox) -> dict[str, Any]:
    """The demo's summary.json document."""
    received = sandbox.received
    per_domain: dict[str, dict[str, int]] = {}
    for record in received:
        entry = per_domain.setdefault(record.domain, {"received": 0, "received_over_tls": 0})
        entry["received"] += 1
        entry["received_over_tls"] += record.tls_version is not None
    delivered = tally.by_status.get("delivered", 0)
    return {
        "events": events,
        "final_statuses": tally.total,
        "by_status": dict(sorted(tally.by_status.items())),
        "by_reason": {k: dict(sorted(v.items())) for k, v in sorted(tally.by_reason.items())},
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
    with (out / "events.jsonl").open("wb") as sink:
        for raw in generate_events(events, seed=seed, now=dt.datetime.now(dt.UTC)):
            sink.write(raw + b"\n")
    return make_test_pki(out / "pki", hosts)


async def run_demo(
    events: int,
    out: Path,
    *,
    seed: int = 1,
    config: Config | None = None,
    on_start: Callable[[int], None] | None = None,
    on_outcome: Callable[[EventOutcome], None] | None = None,
) -> dict[str, Any]:
    """Run the whole demo into `out` and return the summary."""
    base = config or load_config()
    key_dir = out / "keys"
    events_path = out / "events.jsonl"
    domains = default_sandbox_domains()
    pki = await asyncio.to_thread(_prepare, out, events, seed, base, [d.name for d in domains])
    tally = Tally()

    def record(outcome: EventOutcome) -> None:
        tally.add(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    async with Sandbox(domains, out / "maildir", pki) as sandbox:
        routes = {name: f"{host}:{port}" for name, (host, port) in sandbox.routes.items()}
        config = load_config(
            environ={},
            overrides={
                "dkim": {"key_dir": str(key_dir), "selector": base.dkim.selector},
                "transport": {"ca_bundle": str(pki.ca), "routes": routes},
                "pipeline": {"allow_test_domains": True},
            },
        )
        transport = Transport.from_config(config.transport)
        pipeline = Pipeline(config, transport)
        if on_start is not None:
            on_start(events)
        started = time.perf_counter()
        try:
            with events_path.open("rb") as source:
                await run_events(
                    pipeline,
                    (line.rstrip(b"\n") for line in source),
                    max_in_flight=config.pipeline.max_in_flight,
                    on_outcome=record,
                )
        finally:
            await transport.aclose()
        elapsed = time.perf_counter() - started
        summary = build_summary(tally, events, elapsed, sandbox)
    document = orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n"
    await asyncio.to_thread((out / "summary.json").write_bytes, document)
    return summary
