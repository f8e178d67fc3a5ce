"""`eobblast dlq list` and `eobblast dlq replay` against dead letters a real worker parked on
a real broker (Tansu): listed without PHI, sent back once the configuration accepts them,
then delivered by the worker, once."""

from __future__ import annotations

import asyncio
import base64
import getpass
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import tomli_w
from aiokafka.record.default_records import (  # type: ignore[import-untyped]
    DefaultRecordBatchBuilder,
)

from eobblast.config import load_config
from eobblast.dlq import REPLAY_HEADER
from eobblast.events.schema import Rejection, validate_event
from eobblast.observe.audit import AuditAction, AuditRecord, member_ref, open_audit
from eobblast.protect.services import ProtectionServices
from eobblast.streams import EmbeddedBroker, make_producer
from eobblast.streams.kafka import PLAINTEXT, read_to_end
from tests.integration.test_bounce_e2e import files_text
from tests.integration.worker_stack import (
    Stack,
    accept_domains,
    read_topic,
    sandbox_stack,
    start_worker,
    statuses,
    until,
)

# The stack's receivers are on *.sandbox.test: a worker that does not allow test domains
# parks their events as invalid_address, as it would a typo'd domain.
REFUSING = {"allow_test_domains": False}


@pytest.fixture
async def stack(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stack]:
    async with sandbox_stack(broker, tmp_path, accept_domains(41)) as built:
        yield built


def write_config(stack: Stack, path: Path, **pipeline: Any) -> Path:
    settings = stack.settings()
    settings["pipeline"] |= pipeline
    path.write_text(tomli_w.dumps(settings))
    return path


async def eobblast(*args: str) -> tuple[int, str, str]:
    return await eobblast_with("", *args)


async def eobblast_with(setup: str, *args: str) -> tuple[int, str, str]:
    """`eobblast ARGS` in a new process that first runs the Python statement `setup`."""
    script = f"{setup}\nimport sys\nfrom eobblast.cli import main\nmain(sys.argv[1:])"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def park(stack: Stack, events: list[bytes], config_file: Path) -> None:
    """Publish the events and some poison; a worker refusing test domains parks them all."""
    poison = [b"not json at all", b'{"event_id": "' + b"x" * (2 * 1024 * 1024) + b'"}']
    await stack.publish(events)
    await stack.publish(poison, keys=[b"M-poison-1", b"M-poison-2"])
    await stack.publish([events[0]], keys=[b""])  # no key: missing_key
    config = write_config(stack, config_file, **REFUSING)
    await member_reference_key(config)
    _, stop, task = await start_worker(load_config(config))
    parked = await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=len(events) + 3)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert len(parked) == len(events) + 3


async def member_reference_key(config: Path) -> bytes:
    """The member-reference key, made as `eobblast run` makes it: a replay is recorded in
    the audit trail with it."""
    services = await ProtectionServices.open(load_config(config))
    await services.close()
    return services.audit_key


def phi_of(events: list[bytes]) -> list[str]:
    """Names, addresses, member ids, dates of birth and claim ids of these events."""
    found: list[str] = []
    for raw in events:
        doc = orjson.loads(raw)
        member = doc["member"]
        found += [member["name"], member["email"], member["id"], member["date_of_birth"]]
        found += [doc["claim"]["id"], doc["claim"]["patient_name"]]
        # as a dead letter holds them: the original and the key, base64
        found += [
            base64.b64encode(raw)[:40].decode(),
            base64.b64encode(member["id"].encode()).decode(),
        ]
    return found


async def test_list_shows_why_each_event_was_parked_and_no_phi(
    stack: Stack, tmp_path: Path
) -> None:
    events = stack.events(4, seed=41)
    config = tmp_path / "eobblast.toml"
    await park(stack, events, config)
    # A record on the DLQ that is no dead letter (written by something else).
    producer = make_producer(stack.broker.bootstrap, client_id="test-other", security=PLAINTEXT)
    await producer.start()
    try:
        await producer.send_and_wait(stack.dlq_topic, b"garbage", key=b"x")
    finally:
        await producer.stop()

    code, out, err = await eobblast("dlq", "list", "--config", str(config), "--json")
    assert code == 0, err
    rows = [orjson.loads(line) for line in out.splitlines()]
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_reason.setdefault(row["reason"], []).append(row)
    assert {r: len(v) for r, v in by_reason.items()} == {
        "invalid_address": 4,
        "invalid_json": 1,
        "event_too_large": 1,
        "missing_key": 1,
        "unreadable": 1,
    }
    ids = {orjson.loads(raw)["event_id"] for raw in events}
    assert {row["event_id"] for row in by_reason["invalid_address"]} == ids
    assert all(row["field"] == "member.email" for row in by_reason["invalid_address"])
    # Under the configuration that parked them, they would be parked again.
    assert all(
        (row["not_replayable"], row["refused_now"]) == ("still_refused", "invalid_address")
        for row in by_reason["invalid_address"]
    )
    assert by_reason["invalid_json"][0]["refused_now"] == "invalid_json"
    assert by_reason["event_too_large"][0]["not_replayable"] == "original_truncated"
    assert by_reason["missing_key"][0]["not_replayable"] == "key_missing"
    assert all(
        row["source"].startswith(f"{stack.events_topic}/")
        for row in rows
        if row["reason"] != "unreadable"
    )
    assert by_reason["unreadable"][0]["not_replayable"] == "unreadable"
    assert (
        "8 dead letters: event_too_large 1, invalid_address 4, invalid_json 1, missing_key 1,"
        " unreadable 1; 0 replayable" in err
    )

    # The table an operator reads, and a filter.
    code, table, err = await eobblast(
        "dlq", "list", "--config", str(config), "--reason", "invalid_json"
    )
    assert code == 0, err
    assert "invalid_json" in table and "invalid_address" not in table
    assert "1 dead letters: invalid_json 1" in err
    code, unreadable, err = await eobblast(
        "dlq", "list", "--config", str(config), "--reason", "unreadable"
    )
    assert code == 0, err
    assert "no: unreadable" in unreadable and "None" not in unreadable

    # Once the configuration accepts test domains, those four could go back; the rest not.
    write_config(stack, config)
    code, fixed, err = await eobblast("dlq", "list", "--config", str(config), "--json")
    assert code == 0, err
    assert err.endswith("; 4 replayable\n")
    replayable: dict[str, set[bool]] = {}
    for row in map(orjson.loads, fixed.splitlines()):
        replayable.setdefault(row["reason"], set()).add(row["replayable"])
    assert replayable == {
        "invalid_address": {True},
        "invalid_json": {False},
        "event_too_large": {False},
        "missing_key": {False},
        "unreadable": {False},
    }
    code, refused, err = await eobblast(
        "dlq", "list", "--config", str(config), "--reason", "invalid_json"
    )
    assert code == 0, err
    assert "no: still_refused (invalid_json)" in refused

    for text in (out, err, table, fixed, refused):
        for secret in phi_of(events):
            assert secret not in text
        assert "M-poison" not in text and "not json at all" not in text


async def test_replay_sends_parked_events_back_and_the_worker_delivers_them_once(
    stack: Stack, tmp_path: Path
) -> None:
    events = stack.events(4, seed=42)
    config = tmp_path / "eobblast.toml"
    await park(stack, events, config)
    before = await _records(stack, stack.events_topic)
    key = await member_reference_key(config)

    # Nothing named: refused. A dry run sends nothing.
    code, _, err = await eobblast("dlq", "replay", "--config", str(config))
    assert code == 2 and "--all" in err
    # Under the configuration that parked them, nothing would go: each would be parked again.
    # Once it accepts test domains, all four would.
    dry_runs = []
    for accepting in (False, True):
        if accepting:
            write_config(stack, config)
        code, out, err = await eobblast(
            "dlq", "replay", "--config", str(config), "--reason", "invalid_address", "--dry-run"
        )
        assert code == 0, err
        dry_runs.append(orjson.loads(out))
    common = {
        "dry_run": True,
        "interrupted": False,
        "refused_by_broker_at": [],
        "not_acknowledged": 0,
    }
    assert dry_runs == [
        common
        | {"replayed": 0, "replayed_by_reason": {}, "skipped": 4}
        | {"skipped_by_cause": {"still_refused": 4}}
        | {"still_refused_by_reason": {"invalid_address": 4}},
        common
        | {"replayed": 4, "replayed_by_reason": {"invalid_address": 4}, "skipped": 0}
        | {"skipped_by_cause": {}, "still_refused_by_reason": {}},
    ]
    assert len(await _records(stack, stack.events_topic)) == len(before)
    assert await _replays(stack) == []  # nothing sent, nothing recorded

    # The configuration now accepts them: sent back, each with its key and its origin. The
    # poison is refused still, so it stays where it is.
    code, out, err = await eobblast("dlq", "replay", "--config", str(config), "--all")
    assert code == 0, err
    report = orjson.loads(out)
    assert report["replayed_by_reason"] == {"invalid_address": 4}
    assert report["skipped_by_cause"] == {
        "key_missing": 1,
        "original_truncated": 1,
        "still_refused": 1,
    }
    assert report["still_refused_by_reason"] == {"invalid_json": 1}
    after = await _records(stack, stack.events_topic)
    replayed = [record for record in after if record.headers]
    assert len(after) == len(before) + 4 == len(before) + len(replayed)
    assert sorted(r.value for r in replayed) == sorted(events)
    keys = {orjson.loads(raw)["member"]["id"].encode(): raw for raw in events}
    for record in replayed:
        [(name, origin)] = record.headers
        assert name == REPLAY_HEADER and origin.decode().startswith(f"{stack.dlq_topic}/0/")
        assert keys[record.key] == record.value  # the original key: the member's order holds
    for text in (out, err):
        for secret in phi_of(events):
            assert secret not in text
    # Each one recorded: who replayed which event, of which member (opaque), from where.
    members = {orjson.loads(raw)["event_id"]: orjson.loads(raw)["member"]["id"] for raw in events}
    replays = await _replays(stack)
    assert sorted(r.event_id for r in replays) == sorted(members)
    for record in replays:
        assert (record.actor, record.reason) == (getpass.getuser(), "invalid_address")
        assert record.member_ref == member_ref(key, members[record.event_id])
        assert record.item_id is not None and record.item_id.startswith("0:")
    written = repr(replays) + await asyncio.to_thread(files_text, tmp_path, "audit.db*")
    for secret in phi_of(events):
        assert secret not in written

    # The worker (same group, past the parked records) delivers the four. Replaying once
    # more sends no second email.
    ids = {orjson.loads(raw)["event_id"] for raw in events}
    worker, stop, task = await start_worker(load_config(config))
    try:
        await until("the replayed events delivered", lambda: _delivered(stack, ids))
        code, out, err = await eobblast(
            "dlq", "replay", "--config", str(config), "--reason", "invalid_address",
            "--actor", "ops-jane",
        )  # fmt: skip
        assert code == 0, err
        assert orjson.loads(out)["replayed"] == len(events)
        again = (await _replays(stack))[len(replays) :]
        assert [r.actor for r in again] == ["ops-jane"] * len(events)
        await until("the second replay seen as duplicates", lambda: _skipped(worker, len(events)))
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert sum(stack.sandbox.counts.values()) == len(events)


async def test_a_record_the_broker_refuses_is_skipped_and_the_others_go(
    stack: Stack, tmp_path: Path
) -> None:
    # An event with fifty service lines is parked first, five ordinary ones after it. The
    # broker (here the producer's own limit, lowered just under that record's size) refuses
    # the big one: it is skipped, its DLQ position is printed, and the five still go.
    config = tmp_path / "eobblast.toml"
    events = stack.events(6, seed=44)
    doc = orjson.loads(events[0])
    doc["claim"]["lines"] = (doc["claim"]["lines"] * 50)[:50]
    events[0] = orjson.dumps(doc)
    assert not isinstance(validate_event(events[0], allow_test_domains=True), Rejection)
    assert all(len(raw) < len(events[0]) - 1000 for raw in events[1:])
    await park(stack, events[:1], config)
    await stack.publish(events[1:])
    _, stop, task = await start_worker(load_config(config))
    letters = await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=len(events) + 3)
    stop.set()
    await asyncio.wait_for(task, 30)
    # (park also publishes it without a key: that one is parked as missing_key)
    [at] = [
        i
        for i, letter in enumerate(map(orjson.loads, (v for _, v in letters)))
        if (letter["event_id"], letter["reason"]) == (doc["event_id"], "invalid_address")
    ]
    big = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        letters[at][0], events[0], [(REPLAY_HEADER, f"{stack.dlq_topic}/0/{at}".encode())]
    )
    write_config(stack, config)
    before = len(await _records(stack, stack.events_topic))

    code, out, err = await eobblast_with(
        f"import eobblast.streams.kafka as k; k.MAX_REQUEST_SIZE = {big - 1}",
        "dlq", "replay", "--config", str(config), "--all",
    )  # fmt: skip
    assert code == 0, err
    report = orjson.loads(out)
    assert report["interrupted"] is False
    assert report["replayed_by_reason"] == {"invalid_address": 5}
    assert report["skipped_by_cause"]["refused_by_broker"] == 1
    assert report["refused_by_broker_at"] == [f"0:{at}"]
    assert report["not_acknowledged"] == 0
    assert f"refused by the broker (too large for the topic, or a policy), at 0:{at}" in err
    after = await _records(stack, stack.events_topic)
    assert len(after) == before + 5
    assert sorted(r.value for r in after if r.headers) == sorted(events[1:])
    for secret in phi_of(events):
        assert secret not in out and secret not in err


async def test_a_verification_result_parked_is_listed_and_never_replayed(
    stack: Stack, tmp_path: Path
) -> None:
    # A verification result the workers cannot read is parked on the same DLQ. Its original
    # is no record of eob.events: one that happens to be a valid event (published to the
    # wrong topic) would pass replay's check and be sent to eob.events.
    config_file = write_config(stack, tmp_path / "eobblast.toml")
    await member_reference_key(config_file)
    config = load_config(config_file)
    results = config.bounces.results_topic
    await stack.broker.create_topics({results: 1})
    (misrouted,) = stack.events(1, seed=45)
    member = orjson.loads(misrouted)["member"]["id"].encode()
    producer = make_producer(stack.broker.bootstrap, client_id="verifier", security=PLAINTEXT)
    await producer.start()
    try:
        await producer.send_and_wait(results, misrouted, key=member)
        await producer.send_and_wait(results, b"not json at all", key=b"M-results-2")
    finally:
        await producer.stop()
    _, stop, task = await start_worker(config, bounce_store_as=lambda store: store)
    try:
        await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    before = await _records(stack, stack.events_topic)

    code, out, err = await eobblast("dlq", "list", "--config", str(config_file), "--json")
    assert code == 0, err
    rows = [orjson.loads(line) for line in out.splitlines()]
    assert [(row["reason"], row["field"], row["source"]) for row in rows] == [
        ("unsupported_schema", "schema", f"{results}/0/0"),
        ("invalid_json", None, f"{results}/0/1"),
    ]
    assert all(
        (row["replayable"], row["not_replayable"], row["refused_now"])
        == (False, "other_topic", None)
        for row in rows
    )
    assert err.endswith("; 0 replayable\n")
    code, table, err = await eobblast("dlq", "list", "--config", str(config_file))
    assert code == 0, err
    assert results in table and "no: other_topic" in table

    code, out, err = await eobblast("dlq", "replay", "--config", str(config_file), "--all")
    assert code == 0, err
    report = orjson.loads(out)
    assert (report["replayed"], report["skipped"]) == (0, 2)
    assert report["skipped_by_cause"] == {"other_topic": 2}
    assert report["still_refused_by_reason"] == {}
    assert len(await _records(stack, stack.events_topic)) == len(before)
    for text in (out, err, table):
        for secret in phi_of([misrouted]):
            assert secret not in text


async def _delivered(stack: Stack, ids: set[str]) -> bool:
    records = [(r.key, r.value or b"") for r in await _records(stack, stack.delivery_topic)]
    done = {
        k for k, items in statuses(records).items() if any(s.status == "delivered" for s in items)
    }
    return done == ids


async def _skipped(worker: Any, count: int) -> bool:
    return bool(worker.duplicates_skipped >= count)


async def _records(stack: Stack, topic: str) -> list[Any]:
    """Every record of `topic` so far."""
    return [
        r
        async for r in read_to_end(
            stack.broker.bootstrap, topic, client_id="test", security=PLAINTEXT
        )
    ]


async def _replays(stack: Stack) -> list[AuditRecord]:
    """The trail's records of replays."""
    trail = await open_audit(stack.config().portal.audit_url)
    try:
        return [r for r in await trail.records() if r.action is AuditAction.DLQ_REPLAYED]
    finally:
        await trail.close()
