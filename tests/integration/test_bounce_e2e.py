"""Verify-before-resend end to end: worker, bounce service, DSN listener, sandbox, Kafka.

A member's address hard-bounces (synchronously or by DSN): nothing is resent, a
verification request appears, AddressVerified releases the EOB to the verified address
exactly once, a failed verification ends in paper; soft bounces are retried on schedule.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import orjson

from eobblast.bounces.listener import serve_bounces
from eobblast.bounces.rules import DEFAULT_RULES_RESOURCE
from eobblast.events.status import DeliveryStatus
from eobblast.events.verification import (
    AddressVerificationFailed,
    AddressVerified,
    FailureReason,
    VerificationChannel,
    dump,
)
from eobblast.observe.audit import AuditAction, open_audit, recipient_ref
from eobblast.pipeline import Pipeline
from eobblast.protect.services import ProtectionServices
from eobblast.sandbox import Behaviour, Sandbox, SandboxDomain, make_test_pki
from eobblast.state import open_ledger
from eobblast.streams import EmbeddedBroker, make_producer
from eobblast.streams.kafka import PLAINTEXT
from eobblast.transport import Transport
from eobblast.worker import ProducerPublisher, Worker, _LateBound, new_worker_id, open_bounces
from tests.integration.worker_stack import CLEAN, Stack, prepare, read_topic

DOMAIN = "b.w31.sandbox.test"


def fast_rules(path: Path) -> Path:
    from importlib import resources

    text = (resources.files("eobblast.bounces") / DEFAULT_RULES_RESOURCE).read_text()
    text = text.replace("initial_delay_seconds = 300", "initial_delay_seconds = 1")
    text = text.replace("max_delay_seconds = 14400", "max_delay_seconds = 2")
    path.write_text(text)
    return path


def files_text(directory: Path, pattern: str) -> str:
    """The bytes of the files (a SQLite database, its WAL) as text, to look for names in."""
    return b"".join(p.read_bytes() for p in sorted(directory.glob(pattern))).decode("latin-1")


async def test_bounces_end_to_end(broker: EmbeddedBroker, tmp_path: Path) -> None:
    domains = [
        SandboxDomain(
            DOMAIN,
            "127.0.31.1",
            recipient_rules=(
                ("unknown-", Behaviour.REJECT),
                ("busy-", Behaviour.DEFER),
                ("gone-", Behaviour.BOUNCE_LATER),
                ("flaky-", Behaviour.DEFER_FIRST),
            ),
        )
    ]
    pki = make_test_pki(tmp_path / "pki", [DOMAIN])
    prepare(tmp_path)
    # The listener first (the sandbox needs its port); its service is built below.
    handler_box: dict[str, object] = {}

    async def handle(raw: bytes, rcpt: str):  # type: ignore[no-untyped-def]
        return await handler_box["service"].on_dsn(raw, rcpt)  # type: ignore[attr-defined]

    listener = await serve_bounces(
        handle, "127.0.0.1", 0, bounce_domain="bounces.eobblast.test", review_dir=tmp_path / "rv"
    )
    sandbox = Sandbox(domains, tmp_path / "mail", pki, bounce_route=("127.0.0.1", listener.port))
    await sandbox.start()
    stack = Stack(broker, sandbox, pki, tmp_path)
    await stack.create_topics()
    prefix = stack.prefix
    await broker.create_topics(
        {
            f"{prefix}.verification": 1,
            f"{prefix}.verification-results": 1,
            f"{prefix}.paper": 1,
        }
    )
    from eobblast.config import load_config

    config = load_config(
        environ={},
        overrides={
            "dkim": {"key_dir": str(tmp_path / "keys"), "ed25519": False},
            "transport": {
                "ca_bundle": str(pki.ca),
                "routes": {DOMAIN: "{}:{}".format(*sandbox.routes[DOMAIN])},
            },
            "pipeline": {"allow_test_domains": True},
            "kafka": {
                "bootstrap": broker.bootstrap,
                "group_id": f"{prefix}-group",
                "events_topic": stack.events_topic,
                "delivery_topic": stack.delivery_topic,
                "dlq_topic": stack.dlq_topic,
                "session_timeout_ms": 3000,
                "heartbeat_interval_ms": 500,
            },
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
            "protection": {"tls_policy_domains": [DOMAIN]},
            "portal": {
                "escrow_url": f"sqlite:///{tmp_path / 'escrow.db'}",
                "audit_url": f"sqlite:///{tmp_path / 'audit.db'}",
                "key_dir": str(tmp_path / "portal-keys"),
                "audit_key_file": str(tmp_path / "portal-keys" / "audit.key"),
            },
            "bounces": {
                "store_url": f"sqlite:///{tmp_path / 'bounces.db'}",
                "verp_key_file": str(tmp_path / "verp.key"),
                "rules_file": str(fast_rules(tmp_path / "rules.toml")),
                "verification_topic": f"{prefix}.verification",
                "results_topic": f"{prefix}.verification-results",
                "paper_topic": f"{prefix}.paper",
                "results_group_id": f"{prefix}-verification",
                "tick_interval": 0.2,
            },
        },
    )
    # The listener's own service (another "process"), publishing through its own producer.
    producer = make_producer(broker.bootstrap, client_id="bounce-listener", security=PLAINTEXT)
    await producer.start()
    protection_l = await ProtectionServices.open(config)
    listener_service = await open_bounces(
        config, protection_l, ProducerPublisher(producer), actor="bounce-listener"
    )
    handler_box["service"] = listener_service

    # Events: a normal one, a sync hard bounce, an async hard bounce, a soft bounce that
    # never clears, and a soft bounce that a retry gets through.
    raws = stack.events(5, seed=3, mix=CLEAN)
    locals_ = ["ok-1", "unknown-2", "gone-3", "busy-4", "flaky-5"]
    values = []
    members = []
    for raw, local in zip(raws, locals_, strict=True):
        doc = orjson.loads(raw)
        doc["member"]["email"] = f"{local}@{DOMAIN}"
        doc["member"]["consent"]["electronic_delivery"] = True
        members.append(doc["member"]["id"])
        values.append(orjson.dumps(doc))
    event_ids = [orjson.loads(v)["event_id"] for v in values]
    await stack.publish(values)

    # The worker, wired as proposed.
    transport = Transport.from_config(config.transport)
    ledger = await open_ledger(config.ledger.url)
    protection = await ProtectionServices.open(config)
    publisher = _LateBound()
    bounces = await open_bounces(config, protection, publisher, actor="worker-0")
    # The raw events kept for resends are sealed with the escrow's key ring: the release to
    # the verified address below opens one.
    assert protection.escrow is not None and bounces.store.sealer is protection.escrow.keys
    pipeline = Pipeline(config, transport, protection=protection, bounces=bounces)
    worker = Worker(config, pipeline, ledger, worker_id=new_worker_id(0), bounces=bounces)
    publisher.target = worker
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        requests = await read_topic(broker.bootstrap, f"{prefix}.verification", until=2, seconds=15)
        asked = {orjson.loads(v)["member_id"] for _, v in requests}
        assert asked == {members[1], members[2]}
        results = [
            dump(
                AddressVerified.model_validate(
                    {
                        "member_id": members[1],
                        "address": f"fixed-2@{DOMAIN}",
                        "channel": VerificationChannel.PHONE,
                        "verified_by": "csr-1",
                        "at": dt.datetime.now(dt.UTC),
                    },
                    context={"allow_test_domains": True},
                )
            ),
            dump(
                AddressVerificationFailed(
                    member_id=members[2],
                    reason=FailureReason.NO_ANSWER,
                    at=dt.datetime.now(dt.UTC),
                )
            ),
        ]
        claims = make_producer(broker.bootstrap, client_id="claims", security=PLAINTEXT)
        await claims.start()
        for member, value in zip(members[1:3], results, strict=True):
            await claims.send_and_wait(f"{prefix}.verification-results", value, key=member.encode())
        await claims.stop()
        papers = await read_topic(broker.bootstrap, f"{prefix}.paper", until=1)
        assert [orjson.loads(v)["event_id"] for _, v in papers] == [event_ids[2]]
        await asyncio.sleep(4)  # a few soft retries
        records = await read_topic(broker.bootstrap, stack.delivery_topic, until=5, seconds=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await transport.aclose()
        await ledger.close()
        await protection.close()
        await bounces.store.close()
        await listener_service.store.close()
        await protection_l.close()
        await producer.stop()
        await sandbox.stop()
        await listener.stop()
    by_event: dict[str, list[DeliveryStatus]] = {}
    for key, value in records:
        assert key is not None
        by_event.setdefault(key.decode(), []).append(DeliveryStatus.model_validate_json(value))
    story = {e: [(s.status, s.reason, s.attempt) for s in by_event[e]] for e in event_ids}
    assert story[event_ids[0]][-1][0] == "delivered"
    assert [s[0] for s in story[event_ids[1]]] == ["held", "delivered"]
    assert story[event_ids[2]][-1][:2] == ("fallback", "verification_failed")
    assert [s[0] for s in story[event_ids[3]]][:2] == ["deferred", "deferred"]
    # retried on schedule and delivered, once
    assert story[event_ids[4]][0][:2] == ("deferred", "retry_scheduled")
    assert story[event_ids[4]][-1][0] == "delivered"
    assert len([r for r in sandbox.received if r.rcpt_tos == (f"flaky-5@{DOMAIN}",)]) == 1
    fixed = [r for r in sandbox.received if r.rcpt_tos == (f"fixed-2@{DOMAIN}",)]
    assert len(fixed) == 1
    assert all(r.mail_from.startswith("bounces+") for r in sandbox.received)

    # The audit trail, written by the worker and the listener: where each notice went,
    # its release to the verified address, its paper fallback; nobody named.
    key = protection.audit_key
    trail = await open_audit(config.portal.audit_url)
    try:
        trails = {e: await trail.records(e) for e in event_ids}
    finally:
        await trail.close()

    def actions(event_id: str) -> list[AuditAction]:
        return [r.action for r in trails[event_id]]

    def sent_to(event_id: str) -> list[str | None]:
        return [r.recipient_ref for r in trails[event_id] if r.action is AuditAction.SENT]

    assert sent_to(event_ids[0]) == [recipient_ref(key, f"ok-1@{DOMAIN}")]
    # Bounced, held, released to the address the member verified by phone, sent there.
    assert actions(event_ids[1])[-2:] == [AuditAction.RELEASED, AuditAction.SENT]
    (released,) = [r for r in trails[event_ids[1]] if r.action is AuditAction.RELEASED]
    assert (released.reason, released.recipient_ref) == (
        "phone",
        recipient_ref(key, f"fixed-2@{DOMAIN}"),
    )
    assert sent_to(event_ids[1]) == [recipient_ref(key, f"fixed-2@{DOMAIN}")]
    # Delivered, bounced later by DSN, verification failed: paper.
    assert sent_to(event_ids[2]) == [recipient_ref(key, f"gone-3@{DOMAIN}")]
    assert actions(event_ids[2])[-1] is AuditAction.PAPER_FALLBACK
    assert trails[event_ids[2]][-1].reason == "verification_failed"
    written = await asyncio.to_thread(files_text, tmp_path, "audit.db*")
    for name in [*members, *locals_, "fixed-2", DOMAIN]:
        assert name not in written
