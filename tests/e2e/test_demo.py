"""The demo path end to end: generate, sandbox, pipeline, summary, as a new user runs it."""

from __future__ import annotations

import json
import logging
import mailbox
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import dkim
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eobblast.demo import run_demo
from eobblast.events import EobIssued, validate_event
from eobblast.events.synthetic import PAYERS
from eobblast.observe.logs import JsonFormatter
from eobblast.observe.metrics import serve_metrics
from eobblast.protect.dkim import generate_keys

EVENTS = 240
TLS_DOMAINS = ("alpha.sandbox.test", "bravo.sandbox.test", "charlie.sandbox.test")


@pytest.fixture(scope="module")
def demo_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, dict[str, Any], str]]:
    """One demo run shared by the tests below, with every eobblast log line captured."""
    import asyncio

    out = tmp_path_factory.mktemp("demo")
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Capture(level=logging.DEBUG)
    handler.setFormatter(JsonFormatter())  # what operators see: message plus every field
    logger = logging.getLogger("eobblast")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        summary = asyncio.run(run_demo(EVENTS, out, seed=11))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    yield out, summary, "\n".join(records)


def _events(out: Path) -> list[EobIssued]:
    events = []
    for line in (out / "events.jsonl").read_bytes().splitlines():
        result = validate_event(line, allow_test_domains=True)
        if isinstance(result, EobIssued):
            events.append(result)
    return events


def _delivered(out: Path) -> list[bytes]:
    messages = []
    for domain_dir in (out / "maildir").iterdir():
        box = mailbox.Maildir(domain_dir, factory=None, create=False)
        messages.extend(box.get_bytes(key) for key in box.keys())
    return messages


def _dns_records(out: Path) -> dict[bytes, bytes]:
    records = {}
    for _, _, domain in PAYERS:
        for record in generate_keys(out / "keys", domain, "eob1"):  # existing keys: reloaded
            records[(record.name + ".").encode()] = record.value.encode()
    return records


def test_every_event_reaches_one_final_status(demo_run: tuple[Path, dict[str, Any], str]) -> None:
    out, summary, _ = demo_run
    assert summary["final_statuses"] == EVENTS
    assert sum(summary["by_status"].values()) == EVENTS
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    for key in ("elapsed_seconds", "messages_per_second", "latency_seconds"):
        assert key in summary
    assert summary["latency_seconds"]["p99"] >= summary["latency_seconds"]["p50"] > 0
    statuses = summary["by_status"]
    assert statuses["delivered"] > EVENTS // 2
    assert statuses["rejected"] > 0 and statuses["held"] > 0 and statuses["failed"] > 0
    assert (out / "events.jsonl").read_bytes().count(b"\n") == EVENTS


def test_delivered_count_matches_the_maildirs(demo_run: tuple[Path, dict[str, Any], str]) -> None:
    out, summary, _ = demo_run
    assert len(_delivered(out)) == summary["by_status"]["delivered"]
    for domain in TLS_DOMAINS:
        assert (out / "maildir" / domain / "new").is_dir()


def test_nothing_reaches_receivers_without_verified_tls(
    demo_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, summary, _ = demo_run
    for domain in ("notls.sandbox.test", "untrusted.sandbox.test"):
        new = out / "maildir" / domain / "new"
        assert not new.exists() or not any(new.iterdir())
    failed = summary["by_reason"]["failed"]
    assert failed.get("starttls_not_offered", 0) > 0
    assert failed.get("tls_cert_untrusted", 0) > 0
    for message in _delivered(out):
        assert message.startswith(b"Received:")
        assert b"ESMTPS" in message[:400] and b"TLSv1." in message[:400]


def test_every_delivered_message_verifies_with_dkimpy(
    demo_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, _, _ = demo_run
    records = _dns_records(out)
    messages = _delivered(out)
    assert messages
    for message in messages:
        signed = message[message.index(b"\r\nDKIM-Signature:") + 2 :]  # below Received:
        assert message.startswith(b"Received:")
        assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: records.get(name)), (
            "DKIM verification failed"
        )
        assert b"a=rsa-sha256" in signed[:200]


@pytest.mark.skipif(shutil.which("opendkim") is None, reason="opendkim not installed")
def test_every_delivered_message_verifies_with_opendkim(
    demo_run: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    out, _, _ = demo_run
    keys = tmp_path / "keys.txt"
    keys.write_text(
        "".join(
            r.opendkim_line() + "\n"
            for _, _, d in PAYERS
            for r in generate_keys(out / "keys", d, "eob1")
        )
    )
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {keys}\n")
    messages = _delivered(out)
    for index, message in enumerate(messages):
        path = tmp_path / f"m{index}.eml"
        path.write_bytes(message)
        result = subprocess.run(
            ["opendkim", "-x", str(conf), "-t", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        report = result.stdout + result.stderr
        assert "verification" in report and "succeeded" in report, report
        assert "failed" not in report


def test_no_phi_in_any_log_line(demo_run: tuple[Path, dict[str, Any], str]) -> None:
    out, _, logs = demo_run
    assert "event rejected" in logs and "event held" in logs  # the logs did capture events
    phi: set[str] = set()
    for event in _events(out):
        phi.update({event.member.name, event.claim.patient_name, event.member.id})
        phi.add(event.claim.provider.name)
        for line in event.claim.lines:
            # Amounts of 100.00 and more: shorter ones collide with timestamps' seconds.
            phi.update(v for v in (line.billed, line.plan_paid) if Decimal(v) >= 100)
    assert len(phi) > 100
    leaked = sorted(value for value in phi if value in logs)
    assert leaked == []


def test_dns_records_are_written_as_zone_lines(
    demo_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, _, _ = demo_run
    for _, _, domain in PAYERS:
        zone = (out / "dns" / f"{domain}.zone").read_text()
        assert f"eob1._domainkey.{domain}. 3600 IN TXT" in zone
        assert "k=rsa" in zone and "k=ed25519" in zone


def test_metrics_endpoint_reports_the_run(demo_run: tuple[Path, dict[str, Any], str]) -> None:
    _, summary, _ = demo_run
    port = serve_metrics(0)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    delivered = sum(
        s.value
        for s in families["eobblast_events"].samples
        if s.name == "eobblast_events_total" and s.labels["outcome"] == "delivered"
    )
    assert delivered >= summary["by_status"]["delivered"]
    stages = {s.labels["stage"] for s in families["eobblast_stage_seconds"].samples}
    assert {"validate", "render", "sign", "deliver", "total"} <= stages
    assert "eobblast_smtp_connections" in families
    # Labels are bounded vocabularies: no address, name or id ever becomes a label value.
    for family in families.values():
        for sample in family.samples:
            for value in sample.labels.values():
                assert "@" not in value and len(value) < 40


def test_cli_demo_schema_generate_and_keys(tmp_path: Path) -> None:
    eob = [sys.executable, "-m", "eobblast"]
    run = subprocess.run(
        [*eob, "demo", "--events", "40", "--out", str(tmp_path / "d"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "delivered" in run.stderr
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["final_statuses"] == 40
    schema = subprocess.run([*eob, "schema"], capture_output=True, timeout=60, check=True)
    assert orjson.loads(schema.stdout)["properties"]["schema"]["const"] == "eob.issued/v1"
    generated = subprocess.run(
        [*eob, "generate", "--count", "5"], capture_output=True, timeout=60, check=True
    )
    assert len(generated.stdout.splitlines()) == 5
    keys = subprocess.run(
        [*eob, "keys", "generate", "-d", "payer.test", "--key-dir", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "eob1._domainkey.payer.test. 3600 IN TXT" in keys.stdout
    assert "eob1e._domainkey.payer.test." in keys.stdout
    bad = subprocess.run([*eob, "generate"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--count" in bad.stderr
