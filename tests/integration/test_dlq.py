"""`eobblast dlq list` and `eobblast dlq replay` against dead letters a real worker parked on
a real broker (Tansu): listed without PHI, sent back once the configuration accepts them,
then delivered by the worker, once."""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import tomli_w

from eobblast.config import load_config
from eobblast.dlq import REPLAY_HEADER
from eobblast.streams import EmbeddedBroker, make_producer
from eobblast.streams.kafka import read_to_end
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
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eobblast", *args,
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
    _, stop, task = await start_worker(load_config(config))
    parked = await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=len(events) + 3)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert len(parked) == len(events) + 3


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
    producer = make_producer(stack.broker.bootstrap, client_id="test-other")
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
    assert all(row["replayable"] for row in by_reason["invalid_address"])
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
        " unreadable 1" in err
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

    for text in (out, err, table):
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

    # Nothing named: refused. A dry run sends nothing.
    code, _, err = await eobblast("dlq", "replay", "--config", str(config))
    assert code == 2 and "--all" in err
    code, out, err = await eobblast(
        "dlq", "replay", "--config", str(config), "--reason", "invalid_address", "--dry-run"
    )
    assert code == 0, err
    assert orjson.loads(out) == {
        "dry_run": True,
        "replayed": 4,
        "replayed_by_reason": {"invalid_address": 4},
        "skipped": 0,
        "skipped_by_cause": {},
    }
    assert len(await _records(stack, stack.events_topic)) == len(before)

    # The configuration now accepts them: sent back, each with its key and its origin.
    write_config(stack, config)
    code, out, err = await eobblast("dlq", "replay", "--config", str(config), "--all")
    assert code == 0, err
    report = orjson.loads(out)
    assert report["replayed_by_reason"] == {"invalid_address": 4, "invalid_json": 1}
    assert report["skipped_by_cause"] == {"key_missing": 1, "original_truncated": 1}
    after = await _records(stack, stack.events_topic)
    replayed = [record for record in after if record.headers]
    assert len(after) == len(before) + 5 == len(before) + len(replayed)
    assert sorted(r.value for r in replayed if r.value in events) == sorted(events)
    keys = {orjson.loads(raw)["member"]["id"].encode(): raw for raw in events}
    for record in replayed:
        [(name, origin)] = record.headers
        assert name == REPLAY_HEADER and origin.decode().startswith(f"{stack.dlq_topic}/0/")
        if record.value in events:
            assert keys[record.key] == record.value  # the original key: the member's order holds
    for text in (out, err):
        for secret in phi_of(events):
            assert secret not in text

    # The worker (same group, past the parked records) delivers the four; the poison is
    # parked again. Replaying once more sends no second email.
    ids = {orjson.loads(raw)["event_id"] for raw in events}
    worker, stop, task = await start_worker(load_config(config))
    try:
        await until("the replayed events delivered", lambda: _delivered(stack, ids))
        code, out, err = await eobblast(
            "dlq", "replay", "--config", str(config), "--reason", "invalid_address"
        )
        assert code == 0, err
        assert orjson.loads(out)["replayed"] == len(events)
        await until("the second replay seen as duplicates", lambda: _skipped(worker, len(events)))
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert sum(stack.sandbox.counts.values()) == len(events)


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
    return [r async for r in read_to_end(stack.broker.bootstrap, topic, client_id="test")]
