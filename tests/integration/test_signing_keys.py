"""DKIM keys as an operator meets them: a sending domain whose key is missing fails its
notices (never sends them unsigned) and says why in the log, and a key added while the
workers run is used without a restart."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import dkim
import orjson
import pytest

from eobblast import pipeline as pipeline_module
from eobblast.protect.dkim import generate_keys
from eobblast.streams import EmbeddedBroker
from tests.integration.worker_stack import (
    Stack,
    accept_domains,
    dumps,
    read_topic,
    sandbox_stack,
    start_worker,
    statuses,
)

LATE = "late-payer.example"


@pytest.fixture
async def stack(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stack]:
    async with sandbox_stack(broker, tmp_path, accept_domains(43)) as built:
        yield built


async def test_a_key_added_while_the_workers_run_is_used_without_a_restart(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pipeline_module, "MISSING_KEY_RETRY", 1.0)
    caplog.set_level(logging.INFO, logger="eobblast")
    docs = [orjson.loads(raw) for raw in stack.events(3, seed=58)]
    for doc in docs:
        doc["payer"]["sending_domain"] = LATE
    await stack.publish([dumps(docs[0]), dumps(docs[1])])
    _, stop, task = await start_worker(stack.config())
    try:
        # No key for the payer's domain: both notices fail, nothing leaves unsigned, and the
        # log says why once (the second notice finds the domain already known as keyless).
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=2)
        for doc in docs[:2]:
            [status] = statuses(records)[doc["event_id"]]
            assert (status.status, status.reason) == ("failed", "no_signing_key")
        assert sum(stack.sandbox.counts.values()) == 0

        records_dns = {
            (r.name + ".").encode(): r.value.encode()
            for r in generate_keys(stack.directory / "keys", LATE, "eob1", ed25519=False)
        }
        await asyncio.sleep(1.2)  # the worker looks for the key again after MISSING_KEY_RETRY
        await stack.publish([dumps(docs[2])])
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=3)
        [status] = statuses(records)[docs[2]["event_id"]]
        assert (status.status, status.reason) == ("delivered", "delivered")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    assert sum(stack.sandbox.counts.values()) == 1
    domain = docs[2]["member"]["email"].rpartition("@")[2]
    [message] = (stack.sandbox.maildir(domain) / "new").iterdir()
    raw = message.read_bytes()
    assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: records_dns.get(name))
    assert f"d={LATE}".encode() in raw.replace(b"\r\n ", b"").replace(b"\n ", b"")

    missing = [r for r in caplog.records if r.getMessage() == "no DKIM key for sending domain"]
    assert len(missing) == 1
    assert missing[0].domain == LATE  # type: ignore[attr-defined]
    assert f"{LATE}.eob1.rsa.pem" in missing[0].cause  # type: ignore[attr-defined]
    for doc in docs:
        for phi in (doc["member"]["name"], doc["member"]["email"], doc["member"]["id"]):
            assert phi not in caplog.text


async def eobblast_run(config: Path) -> tuple[int | None, str]:
    """`eobblast run --config CONFIG` until it exits (within a minute): code and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eobblast", "run", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def test_eobblast_run_refuses_to_start_without_a_usable_signing_key(
    tmp_path: Path,
) -> None:
    # Workers that could sign nothing would fail every notice: the operator hears it at once.
    config = tmp_path / "eobblast.toml"
    keys = tmp_path / "keys"
    config.write_text(f'[kafka]\nbootstrap = "127.0.0.1:1"\n[dkim]\nkey_dir = "{keys}"\n')
    keys.mkdir()
    generate_keys(keys, "payer.example", "other", ed25519=True)  # another selector's
    code, out = await eobblast_run(config)
    assert code == 1
    assert f"no usable DKIM key for selector 'eob1' in {keys}" in out
    assert f"eobblast keys generate -d DOMAIN --key-dir {keys} --selector eob1" in out
    assert "worker started" not in out

    # The selector's RSA key alone, while [dkim] ed25519 is on (the default): nothing could
    # be signed either, and the log says what is wrong with the key that is there.
    generate_keys(keys, "payer.example", "eob1", ed25519=False)
    code, out = await eobblast_run(config)
    assert code == 1
    assert "an RSA key and an Ed25519 key ([dkim] ed25519 is on)" in out
    [unusable] = [orjson.loads(line) for line in out.splitlines() if "key unusable" in line]
    assert unusable["domain"] == "payer.example"
    assert "payer.example.eob1e.ed25519.pem" in unusable["cause"]
    assert "worker started" not in out
