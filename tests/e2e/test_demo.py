"""The demo path end to end: generate, sandbox, pipeline, summary, as a new user runs it."""

from __future__ import annotations

import email
import email.policy
import json
import mailbox
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import dkim
import orjson
import pytest

from eobblast.events import EobIssued, validate_event
from eobblast.events.synthetic import PAYERS
from eobblast.protect.dkim import generate_keys
from eobblast.protect.testcerts import MemberCertificates

EVENTS = 240
DEMO_EHLO = "mta.demo-payer.test"
TLS_DOMAINS = ("alpha.sandbox.test", "bravo.sandbox.test", "charlie.sandbox.test")
UNVERIFIED_DOMAINS = (
    "notls.sandbox.test",
    "untrusted.sandbox.test",
    "expired.sandbox.test",
    "wronghost.sandbox.test",
    "dropper.sandbox.test",
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """One `eobblast demo` run, as a user starts it, with every log line of every process."""
    out = tmp_path_factory.mktemp("demo")
    # A setting of the user's own: it must reach the workers.
    config = tmp_path_factory.mktemp("demo-config") / "eobblast.toml"
    config.write_text(f'[transport]\nehlo_name = "{DEMO_EHLO}"\n')
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "eobblast",
            "demo",
            "--config",
            str(config),
            "--events",
            str(EVENTS),
            "--out",
            str(out),
            "--seed",
            "11",
            "--no-progress",
            "--log-level",
            "DEBUG",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return out, summary, run.stdout + run.stderr


def _events(out: Path) -> list[EobIssued]:
    events = []
    for line in (out / "events.jsonl").read_bytes().splitlines():
        result = validate_event(line, allow_test_domains=True)
        if isinstance(result, EobIssued):
            events.append(result)
    return events


def _delivered(out: Path) -> list[bytes]:
    messages: list[bytes] = []
    for domain_dir in (out / "maildir").iterdir():
        box = mailbox.Maildir(domain_dir, factory=None, create=False)
        messages.extend(box.get_bytes(key) for key in box.keys())
    return messages


def test_the_demo_workers_run_with_the_given_configuration(
    demo_run: tuple[Path, dict[str, Any], str],
) -> None:
    # `--config` used to reach the workers only for a few settings: they greeted with the
    # default EHLO name whatever the file said.
    out, _, _ = demo_run
    messages = _delivered(out)
    assert messages
    assert all(f"Received: from {DEMO_EHLO} ".encode() in m for m in messages)


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
    for key in ("elapsed_seconds", "messages_per_second", "latency_seconds"):
        assert key in summary
    assert summary["latency_seconds"]["p99"] >= summary["latency_seconds"]["p50"] > 0
    statuses = summary["by_status"]
    assert statuses["delivered"] > EVENTS // 2
    assert statuses["rejected"] > 0 and statuses["held"] > 0 and statuses["fallback"] > 0
    # verify-before-resend: bounced members were held, asked about, then released or papered
    history = summary["status_history"]
    assert history.get("held/awaiting_verification", 0) > 0
    assert history.get("deferred/retry_scheduled", 0) > 0
    answers = summary["verification_answers"]
    assert answers.get("verified", 0) > 0 and answers.get("failed", 0) > 0
    assert summary["by_reason"]["fallback"].get("verification_failed", 0) == answers["failed"]
    assert (out / "events.jsonl").read_bytes().count(b"\n") == EVENTS


def test_delivered_count_matches_the_maildirs(demo_run: tuple[Path, dict[str, Any], str]) -> None:
    out, summary, _ = demo_run
    # every accepted message was stored once; a DSN can later change a delivered status
    assert len(_delivered(out)) == summary["status_history"]["delivered/delivered"]
    for domain in TLS_DOMAINS:
        assert (out / "maildir" / domain / "new").is_dir()


def _readable(message: bytes) -> str:
    """Headers plus every text part decoded: what a reader at the receiver could see."""
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    texts = [str(parsed.items())]
    for part in parsed.walk():
        if part.get_content_maintype() == "text":
            texts.append(part.get_content())
    return "\n".join(texts)


def _phi(out: Path) -> set[str]:
    """Names, ids and amounts of every valid event: none may reach an unverified receiver."""
    phi: set[str] = set()
    for event in _events(out):
        phi.update({event.member.name, event.claim.patient_name, event.member.id})
        phi.update({event.claim.provider.name, event.claim.id})
        for line in event.claim.lines:
            # Amounts of 100.00 and more: shorter ones collide with timestamps' seconds.
            phi.update(v for v in (line.billed, line.plan_paid) if Decimal(v) >= 100)
    return phi


def _maildir(out: Path, domain: str) -> list[bytes]:
    path = out / "maildir" / domain
    if not (path / "new").exists():
        return []
    box = mailbox.Maildir(path, factory=None, create=False)
    return [box.get_bytes(key) for key in box.keys()]


def test_no_phi_reaches_receivers_without_verified_tls(
    demo_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, summary, _ = demo_run
    phi = _phi(out)
    assert len(phi) > 200
    seen = 0
    for domain in UNVERIFIED_DOMAINS:
        for message in _maildir(out, domain):
            seen += 1
            readable = _readable(message)
            assert ".portal@" in readable  # only secure-portal notices
            assert [value for value in phi if value in readable] == []
    assert seen > 0
    protection = summary["delivered_by_protection"]
    assert protection["portal"].get("tls_failed_at_delivery", 0) > 0
    assert protection["portal"].get("tls_unknown", 0) > 0
    assert protection["smime"].get("recipient_certificate", 0) > 0
    assert protection["tls_required"].get("tls_policy_list", 0) > 0
    # every full EOB (not a notice, not encrypted) arrived over TLS at a verifying domain
    for domain in TLS_DOMAINS:
        for message in _maildir(out, domain):
            assert b"ESMTPS" in message[:400] and b"TLSv1." in message[:400]


def test_members_who_asked_for_the_portal_get_only_portal_notices(
    demo_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, summary, _ = demo_run
    asked = {e.member.email for e in _events(out) if e.member.preference == "portal"}
    assert asked
    phi = _phi(out)
    seen = 0
    for message in _delivered(out):
        parsed = email.message_from_bytes(message, policy=email.policy.default)
        if str(parsed["To"]) in asked:
            seen += 1
            readable = _readable(message)
            assert ".portal@" in readable  # a notice, never the EOB, even to a TLS domain
            assert [value for value in phi if value in readable] == []
    assert seen > 0
    assert summary["delivered_by_protection"]["portal"].get("member_prefers_portal", 0) > 0


def test_workers_keep_what_they_learned_of_tls_beside_the_ledger(
    demo_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, summary, _ = demo_run
    db = sqlite3.connect(out / "ledger.db")
    try:
        rows = db.execute("SELECT domain, verified_at, failed_at FROM tls_knowledge").fetchall()
    finally:
        db.close()
    learned = {domain: (verified, failed) for domain, verified, failed in rows}
    # Verified handshakes with the domains that verify; the failures that sent EOBs to the
    # portal, where the next worker (or a restart) finds them.
    assert all(learned.get(domain, (None, None))[0] for domain in TLS_DOMAINS)
    failed = {domain for domain, (_, failed_at) in learned.items() if failed_at}
    assert failed and failed <= set(UNVERIFIED_DOMAINS)
    assert summary["delivered_by_protection"]["portal"].get("tls_failed_at_delivery", 0) > 0


def test_smime_messages_decrypt_with_openssl(
    demo_run: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    out, _, _ = demo_run
    certificates = MemberCertificates(out / "smime")
    phi = _phi(out)
    decrypted = 0
    for index, message in enumerate(_delivered(out)):
        if b"application/pkcs7-mime" not in message:
            continue
        parsed = email.message_from_bytes(message, policy=email.policy.default)
        key, cert = certificates.paths(str(parsed["To"]))
        path = tmp_path / f"m{index}.eml"
        path.write_bytes(message)
        result = subprocess.run(
            [
                "openssl",
                "cms",
                "-decrypt",
                "-in",
                str(path),
                "-recip",
                str(cert),
                "-inkey",
                str(key),
            ],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr.decode()[-300:]
        entity = email.message_from_bytes(result.stdout, policy=email.policy.default)
        assert entity.get_content_type() == "multipart/alternative"
        assert "Explanation of Benefits" in _readable(result.stdout) or "Explicaci" in _readable(
            result.stdout
        )
        outside = _readable(message)
        assert [v for v in phi if v in outside] == []  # nothing outside
        decrypted += 1
    assert decrypted > 0


def test_portal_links_in_notices_open_the_pickup_page(
    demo_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, _, _ = demo_run
    notices = [m for m in _delivered(out) if b".portal@" in m]
    assert notices
    link = re.search(r"http://127\.0\.0\.1:\d+/p/[A-Za-z0-9_-]+", _readable(notices[0]))
    assert link is not None
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eobblast",
            "portal",
            "--config",
            str(out / "eobblast.toml"),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = None
        for line in server.stdout:
            found = re.search(r"http://127\.0\.0\.1:(\d+)/p/", line)
            if found:
                port = found.group(1)
                break
        assert port is not None
        url = re.sub(r":\d+/p/", f":{port}/p/", link.group(0))
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "<form" in page  # the identity check (in the member's language)
        bogus = re.sub(r"/p/.*", "/p/not-a-real-token-0000000000000000000", url)
        try:
            refused = urllib.request.urlopen(bogus, timeout=10).read().decode()
        except urllib.error.HTTPError as error:
            assert error.code in (403, 404, 410)
            refused = error.read().decode()
        assert "<form" not in refused
    finally:
        server.terminate()
        server.wait(timeout=20)


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
    # the capture holds the workers' lines: rejections, holds and deliveries
    assert "event rejected" in logs and "event held" in logs and "delivered" in logs
    phi = _phi(out)
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


def test_cli_schema_generate_and_keys(tmp_path: Path) -> None:
    eob = [sys.executable, "-m", "eobblast"]
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


def _session(sid: int) -> list[int]:
    """Processes of a session: what the demo started, however deep."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def test_sigterm_stops_the_demo_and_everything_it_started(tmp_path: Path) -> None:
    # timeout(1), a CI runner, docker stop: SIGTERM must not leave the broker and the
    # workers running on their own.
    demo = subprocess.Popen(
        [sys.executable, "-m", "eobblast", "demo", "--events", "3000", "--out",
         str(tmp_path / "demo"), "--no-progress"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(_session(demo.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)  # the demo, its broker and its workers
        assert len(_session(demo.pid)) >= 3, "the demo did not start its broker and workers"
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(90) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 60
        while _session(demo.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session(demo.pid) == []
    finally:
        for pid in _session(demo.pid):
            os.kill(pid, signal.SIGKILL)
