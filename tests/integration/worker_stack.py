"""A worker's world for tests: topics on the session broker, sandbox receivers, keys, config."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import tomli_w

from eobblast.bounces.store import BounceStore
from eobblast.config import Config, load_config
from eobblast.demo import member_key, prepare_keys
from eobblast.events.status import DeliveryStatus
from eobblast.events.synthetic import Mix, generate_events
from eobblast.pipeline import Pipeline
from eobblast.protect.services import ProtectionServices
from eobblast.sandbox import Sandbox, SandboxDomain, TestPki, make_test_pki
from eobblast.state import SendLedger, open_ledger
from eobblast.streams import EmbeddedBroker, make_consumer, make_producer
from eobblast.streams.kafka import PLAINTEXT, KafkaSecurity, ReadAgain
from eobblast.transport import Transport
from eobblast.worker import Worker, _LateBound, new_worker_id, open_bounces

T = TypeVar("T")

# util-linux's setpriv has Linux stop a server the tests start when the test process dies,
# even by SIGKILL; it then runs the server in its place (same pid, no Python in between).
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []

CLEAN = Mix(no_consent=0, invalid_address=0, malformed=0, unknown_user=0, busy_mailbox=0, gone=0)


def accept_domains(third_octet: int, count: int = 2) -> list[SandboxDomain]:
    """Sandbox domains that accept everything, on 127.0.<octet>.1..count."""
    return [
        SandboxDomain(f"d{i}.w{third_octet}.sandbox.test", f"127.0.{third_octet}.{i + 1}")
        for i in range(count)
    ]


@dataclass(slots=True)
class Stack:
    """Everything a worker needs, built around one sandbox and a set of fresh topics."""

    broker: EmbeddedBroker
    sandbox: Sandbox
    pki: TestPki
    directory: Path
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    max_in_flight: int = 32
    ledger_url: str | None = None

    @property
    def events_topic(self) -> str:
        """Input topic."""
        return f"{self.prefix}.events"

    @property
    def delivery_topic(self) -> str:
        """Status topic."""
        return f"{self.prefix}.delivery"

    @property
    def dlq_topic(self) -> str:
        """Dead-letter topic."""
        return f"{self.prefix}.dlq"

    @property
    def domains(self) -> list[str]:
        """Sandbox domain names."""
        return sorted(self.sandbox.routes)

    async def create_topics(self, partitions: int = 4) -> None:
        """Create this stack's topics."""
        await self.broker.create_topics(
            {self.events_topic: partitions, self.delivery_topic: 2, self.dlq_topic: 1}
        )

    def config(self, **workers: Any) -> Config:
        """Config pointing at this stack."""
        return load_config(environ={}, overrides=self.settings(**workers))

    def settings(self, **workers: Any) -> dict[str, Any]:
        """The settings of `config()`, by section (as a TOML file would hold them)."""
        routes = {name: f"{host}:{port}" for name, (host, port) in self.sandbox.routes.items()}
        return {
            "dkim": {"key_dir": str(self.directory / "keys"), "ed25519": False},
            "transport": {"ca_bundle": str(self.pki.ca), "routes": routes},
            "pipeline": {"allow_test_domains": True, "max_in_flight": self.max_in_flight},
            "kafka": {
                "bootstrap": self.broker.bootstrap,
                "group_id": f"{self.prefix}-group",
                "events_topic": self.events_topic,
                "delivery_topic": self.delivery_topic,
                "dlq_topic": self.dlq_topic,
                "session_timeout_ms": 3000,
                "heartbeat_interval_ms": 500,
            },
            "ledger": {"url": self.ledger_url or f"sqlite:///{self.directory / 'ledger.db'}"},
            "workers": {"grace_period": 10.0, "restart_delay": 0.2, **workers},
            # the stack's receivers verify: EOBs go over TLS, not to the portal
            "protection": {"tls_policy_domains": list(self.sandbox.routes)},
            "bounces": {
                "store_url": f"sqlite:///{self.directory / 'bounces.db'}",
                "verp_key_file": str(self.directory / "verp.key"),
                "review_dir": str(self.directory / "bounce-review"),
                "results_topic": f"{self.prefix}.verification-results",
                "results_group_id": f"{self.prefix}-verification",
            },
            "portal": {
                "escrow_url": f"sqlite:///{self.directory / 'escrow.db'}",
                "audit_url": f"sqlite:///{self.directory / 'audit.db'}",
                "key_dir": str(self.directory / "portal-keys"),
                "audit_key_file": str(self.directory / "portal-keys" / "audit.key"),
            },
        }

    def events(self, count: int, *, seed: int = 1, mix: Mix = CLEAN) -> list[bytes]:
        """Synthetic events addressed to this stack's sandbox domains."""
        now = dt.datetime.now(dt.UTC)
        return list(
            generate_events(count, seed=seed, domains=self.domains, weights=None, mix=mix, now=now)
        )

    async def publish(self, values: Iterable[bytes], *, keys: Sequence[bytes] | None = None) -> int:
        """Publish values to the events topic (keyed by member id unless keys are given)."""
        producer = make_producer(self.broker.bootstrap, client_id="test-claims", security=PLAINTEXT)
        await producer.start()
        count = 0
        try:
            pending = []
            for index, value in enumerate(values):
                key = keys[index] if keys is not None else member_key(value)
                pending.append(await producer.send(self.events_topic, value, key=key))
                count += 1
            await asyncio.gather(*pending)
        finally:
            await producer.stop()
        return count


async def start_eobblast_run(
    settings: dict[str, Any], config_file: Path
) -> asyncio.subprocess.Process:
    """`eobblast run` as an operator starts it, on `settings` written to `config_file`."""
    await asyncio.to_thread(config_file.write_text, tomli_w.dumps(settings))
    return await asyncio.create_subprocess_exec(
        *DIE_WITH_PARENT, sys.executable, "-m", "eobblast", "run", "--config", str(config_file),
        "--log-level", "WARNING",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def sandbox_stack(
    broker: EmbeddedBroker, directory: Path, domains: Sequence[SandboxDomain]
) -> AsyncIterator[Stack]:
    """A Stack on `broker` with its topics, keys and a running sandbox of `domains`."""
    pki = make_test_pki(directory / "pki", [d.name for d in domains])
    prepare(directory)
    async with Sandbox(domains, directory / "mail", pki) as sandbox:
        built = Stack(broker, sandbox, pki, directory)
        await built.create_topics()
        yield built


async def until(
    what: str, check: Callable[[], Awaitable[T]], seconds: float = 30.0, every: float = 0.05
) -> T:
    """`check()`'s first truthy result, looked for every `every` s for up to `seconds`."""
    deadline = time.monotonic() + seconds
    while not (found := await check()):
        assert time.monotonic() < deadline, f"not within {seconds:.0f} s: {what}"
        await asyncio.sleep(every)
    return found


def prepare(directory: Path) -> None:
    """Keys for the synthetic payers."""
    prepare_keys(directory / "keys", directory / "dns", "eob1", ed25519=False)


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: int,
    seconds: float = 60.0,
    security: KafkaSecurity = PLAINTEXT,
) -> list[tuple[bytes | None, bytes]]:
    """Records of a topic from the start until `until` distinct keys (or records) were seen.

    A hole in a partition's offsets is read again, as eobblast's own readers do: on Tansu a
    reader that follows a partition while several producers write it can otherwise miss
    records the broker acknowledged (`OffsetGaps`)."""
    holes = ReadAgain()
    consumer = make_consumer(
        bootstrap,
        f"reader-{uuid.uuid4().hex[:8]}",
        [topic],
        client_id="test-reader",
        max_poll_records=2000,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        rebalance_listener=holes.listener(),
        security=security,
    )
    await consumer.start()
    records: list[tuple[bytes | None, bytes]] = []
    keys: set[bytes | None] = set()
    deadline = time.monotonic() + seconds
    try:
        while len(keys) < until and time.monotonic() < deadline:
            batch = await holes.take(consumer, await consumer.getmany(timeout_ms=200))
            for items in batch.values():
                for record in items:
                    records.append((record.key, record.value))
                    keys.add(record.key if record.key is not None else record.value)
    finally:
        await consumer.stop()
    return records


def statuses(records: list[tuple[bytes | None, bytes]]) -> dict[str, list[DeliveryStatus]]:
    """Status events grouped by key."""
    grouped: dict[str, list[DeliveryStatus]] = {}
    for key, value in records:
        assert key is not None
        grouped.setdefault(key.decode(), []).append(DeliveryStatus.model_validate_json(value))
    return grouped


def distinct_final(grouped: dict[str, list[DeliveryStatus]]) -> Counter[str]:
    """How many distinct status ids each key has (1 means exactly one final status)."""
    return Counter({key: len({s.status_id for s in items}) for key, items in grouped.items()})


async def start_worker(
    config: Config,
    index: int = 0,
    *,
    ledger_as: Callable[[SendLedger], SendLedger] | None = None,
    protection: ProtectionServices | None = None,
    bounce_store_as: Callable[[BounceStore], BounceStore] | None = None,
) -> tuple[Worker, asyncio.Event, asyncio.Task[None]]:
    """A worker running in this event loop (its ledger wrapped by `ledger_as`, if given).

    With `bounce_store_as` it runs the bounce service too, as `eobblast run` does, on the
    bounce store that function wraps. The transport is shaped when `config.shaping` says."""
    transport = await Transport.open(config.transport, config.shaping)
    ledger = await open_ledger(config.ledger.url)
    if ledger_as is not None:
        ledger = ledger_as(ledger)
    bounces = None
    publisher = _LateBound()
    if bounce_store_as is not None:
        services = protection or ProtectionServices.policy_only(config)
        bounces = await open_bounces(config, services, publisher, actor=f"worker-{index}")
        bounces.store = bounce_store_as(bounces.store)
    pipeline = Pipeline(config, transport, protection=protection, bounces=bounces)
    worker = Worker(config, pipeline, ledger, worker_id=new_worker_id(index), bounces=bounces)
    publisher.target = worker
    stop = asyncio.Event()

    async def run() -> None:
        try:
            await worker.run(stop)
        finally:
            await transport.aclose()
            await ledger.close()
            if bounces is not None:
                await bounces.store.close()

    return worker, stop, asyncio.create_task(run())


def dumps(doc: Any) -> bytes:
    """JSON bytes."""
    return orjson.dumps(doc)
