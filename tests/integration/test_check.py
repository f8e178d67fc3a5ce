"""`eobblast check` against a real broker, the machine's PostgreSQL and the sandbox's SMTP
receivers: what it finds, what it names, and that it changes nothing."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import tomli_w

from eobblast.streams import EmbeddedBroker
from eobblast.streams.kafka import PLAINTEXT, topic_partitions
from tests.conftest import throwaway_pg_schema
from tests.integration.worker_stack import Stack, accept_domains, sandbox_stack
from tests.kafka_fixtures import free_port

PASSWORD = "s3cret-pw"  # in a store URL: never in what check prints


@pytest.fixture
async def stack(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stack]:
    async with sandbox_stack(broker, tmp_path, accept_domains(46)) as built:
        yield built


def _settings(stack: Stack) -> dict[str, Any]:
    settings = stack.settings()
    settings["bounces"] |= {
        "verification_topic": f"{stack.prefix}.verification",
        "paper_topic": f"{stack.prefix}.paper",
    }
    return settings


async def _bounce_topics(stack: Stack) -> None:
    settings = _settings(stack)["bounces"]
    names = ("verification_topic", "results_topic", "paper_topic")
    await stack.broker.create_topics({settings[name]: 1 for name in names})


async def check(
    settings: dict[str, Any], path: Path, *args: str
) -> tuple[int, dict[str, Any], str]:
    """`eobblast check --json` on `settings`: its exit code, findings by check, stderr."""
    await asyncio.to_thread(path.write_text, tomli_w.dumps(settings))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eobblast", "check", "--config", str(path), "--json", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    findings = {}
    for line in out.splitlines():
        finding = orjson.loads(line)
        findings[finding.pop("check")] = finding
    return process.returncode, findings, out.decode() + err.decode()


async def test_a_ready_setup_passes_and_nothing_is_created(stack: Stack, tmp_path: Path) -> None:
    await _bounce_topics(stack)
    settings = _settings(stack)
    with throwaway_pg_schema("check") as pg_url:
        settings["ledger"]["url"] = pg_url
        # More workers than the events topic has partitions: a warning, not a failure.
        code, findings, text = await check(settings, tmp_path / "eobblast.toml", "--workers", "6")
    assert code == 0, text
    verdicts = {name: finding["verdict"] for name, finding in findings.items()}
    assert verdicts == {
        "dkim keys": "ok",
        "kafka": "ok",
        "topic events": "warn",
        "topic delivery": "ok",
        "topic dlq": "ok",
        "topic verification": "ok",
        "topic verification results": "ok",
        "topic paper fallback": "ok",
        "store ledger.url": "ok",
        "store portal.escrow_url": "ok",
        "store portal.audit_url": "ok",
        "store bounces.store_url": "ok",
        **{f"route {domain}": "ok" for domain in stack.domains},
    }
    assert findings["topic events"]["detail"] == (
        f"{stack.events_topic}: 4 partition(s) for 6 workers: 2 would have nothing to read"
    )
    assert findings["store ledger.url"]["detail"] == "PostgreSQL answered"
    assert "created at the first start" in findings["store portal.escrow_url"]["detail"]
    # Read, not made: the stores' files are still to be created.
    assert not (tmp_path / "escrow.db").exists()
    assert not (tmp_path / "bounces.db").exists()


async def test_each_problem_is_named_and_fails_the_check(stack: Stack, tmp_path: Path) -> None:
    await _bounce_topics(stack)
    settings = _settings(stack)
    missing_topic = f"{stack.prefix}.typo"
    settings["kafka"]["delivery_topic"] = missing_topic
    settings["ledger"]["url"] = f"postgresql://eob:{PASSWORD}@127.0.0.1:{free_port()}/eob"
    settings["portal"]["escrow_url"] = f"sqlite:///{tmp_path / 'no-such-dir' / 'escrow.db'}"
    domain = stack.domains[0]
    settings["transport"]["routes"][domain] = f"127.0.0.1:{free_port()}"
    settings["dkim"]["key_dir"] = str(tmp_path / "empty-keys")
    (tmp_path / "empty-keys").mkdir()
    code, findings, text = await check(settings, tmp_path / "eobblast.toml")
    assert code == 1
    failed = {name for name, finding in findings.items() if finding["verdict"] == "fail"}
    assert failed == {
        "dkim keys",
        "topic delivery",
        "store ledger.url",
        "store portal.escrow_url",
        f"route {domain}",
    }
    assert "Error: 5 check(s) failed" in text
    assert findings["topic delivery"]["detail"] == f"{missing_topic} is not on the brokers"
    assert "eobblast keys generate" in findings["dkim keys"]["detail"]
    assert findings["store ledger.url"]["detail"].startswith("PostgreSQL not reached")
    assert "no-such-dir" in findings["store portal.escrow_url"]["detail"]
    assert PASSWORD not in text
    # Asking created nothing: the misspelt topic is still not there.
    assert missing_topic not in await topic_partitions(stack.broker.bootstrap, PLAINTEXT)
    assert not (tmp_path / "no-such-dir").exists()


async def test_brokers_out_of_reach_fail_and_their_topics_are_not_checked(
    stack: Stack, tmp_path: Path
) -> None:
    settings = _settings(stack)
    settings["kafka"]["bootstrap"] = f"127.0.0.1:{free_port()}"
    code, findings, _ = await check(settings, tmp_path / "eobblast.toml")
    assert code == 1
    assert findings["kafka"]["verdict"] == "fail"
    assert "Connection refused" in findings["kafka"]["detail"]
    topics = {name: f for name, f in findings.items() if name.startswith("topic ")}
    assert len(topics) == 6
    assert {f["verdict"] for f in topics.values()} == {"skipped"}
    assert findings["dkim keys"]["verdict"] == "ok"
