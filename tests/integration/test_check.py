"""`eobblast check` against a real broker, the machine's PostgreSQL and the sandbox's SMTP
receivers: what it finds, what it names, and that it changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import tomli_w

from eobblast.sandbox import make_test_pki
from eobblast.streams import EmbeddedBroker
from eobblast.streams.kafka import PLAINTEXT, topic_partitions
from tests.conftest import throwaway_pg_schema
from tests.integration.worker_stack import DIE_WITH_PARENT, Stack, accept_domains, sandbox_stack

# In store URLs: never in what check prints. libpq quotes the second in its error message.
PASSWORD = "s3cret-pw"
UNPARSABLE = "s3cret%zz"
# What members and receivers would see: names of a real deployment, not reserved ones.
BASE_URL = "https://eob.acme-health.com/p/"
BOUNCE_DOMAIN = "bounces.acme-health.com"
EHLO_NAME = "mta1.acme-health.com"


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port bound and not listening, for the test's duration: connections to it
    are refused, and no other test can take it meanwhile."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


@pytest.fixture
async def stack(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stack]:
    async with sandbox_stack(broker, tmp_path, accept_domains(46)) as built:
        yield built


def _settings(stack: Stack) -> dict[str, Any]:
    settings = stack.settings()
    settings["bounces"] |= {
        "verification_topic": f"{stack.prefix}.verification",
        "paper_topic": f"{stack.prefix}.paper",
        "bounce_domain": BOUNCE_DOMAIN,
    }
    settings["portal"]["base_url"] = BASE_URL
    settings["transport"]["ehlo_name"] = EHLO_NAME
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


async def run(settings: dict[str, Any], path: Path, seconds: float = 30.0) -> tuple[int, str]:
    """`eobblast run` on `settings`, from `path`'s directory, until it exits by itself
    within `seconds` (it failed to start): its exit code and output."""
    async with running(settings, path) as process:
        try:
            out, _ = await asyncio.wait_for(process.communicate(), seconds)
        except TimeoutError:
            pytest.fail(f"eobblast run still running after {seconds:.0f} s: it started or waits")
    assert process.returncode is not None
    return process.returncode, out.decode()


@contextlib.asynccontextmanager
async def running(
    settings: dict[str, Any], path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`eobblast run` on `settings`, from `path`'s directory, its output (stderr too) on its
    stdout; terminated at the end if it still runs."""
    await asyncio.to_thread(path.write_text, tomli_w.dumps(settings))
    process = await asyncio.create_subprocess_exec(
        *DIE_WITH_PARENT, sys.executable, "-m", "eobblast", "run", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=path.parent,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()  # the supervisor stops the workers it started
            await asyncio.wait_for(process.communicate(), 60)


async def test_a_ready_setup_passes_and_nothing_is_created(stack: Stack, tmp_path: Path) -> None:
    await _bounce_topics(stack)
    settings = _settings(stack)
    # A store whose directory the first start makes: fine.
    settings["portal"]["escrow_url"] = f"sqlite:///{tmp_path / 'new' / 'escrow.db'}"
    # More workers than the events topic has partitions: a warning, not a failure.
    code, findings, text = await check(settings, tmp_path / "eobblast.toml", "--workers", "6")
    assert code == 0, text
    verdicts = {name: finding["verdict"] for name, finding in findings.items()}
    assert verdicts == {
        "dkim keys": "ok",
        "transport ca_bundle": "ok",
        "bounces rules_file": "ok",
        "portal key_dir": "ok",
        "portal audit_key_file": "ok",
        "bounces verp_key_file": "ok",
        "portal base_url": "ok",
        "bounces bounce_domain": "ok",
        "transport ehlo_name": "ok",
        "shaping pools_file": "warn",
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
    assert "created at the first start" in findings["store portal.escrow_url"]["detail"]
    assert findings["portal base_url"]["detail"] == BASE_URL
    assert findings["bounces bounce_domain"]["detail"] == BOUNCE_DOMAIN
    # No pools file: it works, unshaped. A new IP sending at full speed is likely not meant.
    assert findings["shaping pools_file"]["detail"].startswith(
        "not set: shaping is off (no IP warm-up, no per-provider caps)"
    )
    for domain in stack.domains:  # STARTTLS, verified against the configured CA
        assert findings[f"route {domain}"]["detail"].endswith("TLSv1.3 verified")
    # Read, not made: the stores' files and directories are still to be created.
    assert not (tmp_path / "new").exists()
    assert not (tmp_path / "bounces.db").exists()


async def test_a_postgresql_store_is_reached_and_nothing_is_created(
    stack: Stack, tmp_path: Path
) -> None:
    await _bounce_topics(stack)
    settings = _settings(stack)
    with throwaway_pg_schema("check") as pg_url:
        settings["ledger"]["url"] = pg_url
        code, findings, text = await check(settings, tmp_path / "eobblast.toml")
        with psycopg.connect(pg_url) as conn:
            tables = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
            ).fetchone()
    assert code == 0, text
    assert findings["store ledger.url"]["verdict"] == "ok"
    assert findings["store ledger.url"]["detail"].startswith("PostgreSQL answered (schema check_")
    assert tables == (0,)


async def test_each_problem_is_named_and_fails_the_check(stack: Stack, tmp_path: Path) -> None:
    await _bounce_topics(stack)
    settings = _settings(stack)
    missing_topic = f"{stack.prefix}.typo"
    settings["kafka"]["delivery_topic"] = missing_topic
    (tmp_path / "a-file").write_text("")
    settings["portal"]["escrow_url"] = f"sqlite:///{tmp_path / 'a-file' / 'escrow.db'}"
    domain = stack.domains[0]
    settings["dkim"]["key_dir"] = str(tmp_path / "empty-keys")
    (tmp_path / "empty-keys").mkdir()
    settings["bounces"]["rules_file"] = str(tmp_path / "no-rules.toml")
    settings["bounces"]["verp_previous_keys"] = [f"7:{tmp_path / 'retired-verp.key'}"]
    # An escrow key ring whose key files are not base64 text.
    ring = tmp_path / "ring"
    ring.mkdir()
    (ring / "active").write_bytes(b"\xff\xfe")
    settings["portal"]["key_dir"] = str(ring)
    # The placeholder defaults: portal links to example.com, return paths in .test, EHLO
    # in .localhost.
    del settings["portal"]["base_url"], settings["bounces"]["bounce_domain"]
    del settings["transport"]["ehlo_name"]
    with refusing_port() as pg_port, refusing_port() as smtp_port:
        settings["ledger"]["url"] = f"postgresql://eob:{PASSWORD}@127.0.0.1:{pg_port}/eob"
        settings["bounces"]["store_url"] = f"postgresql://eob:{UNPARSABLE}@127.0.0.1:{pg_port}/eob"
        settings["transport"]["routes"][domain] = f"127.0.0.1:{smtp_port}"
        code, findings, text = await check(settings, tmp_path / "eobblast.toml")
    assert code == 1
    failed = {name for name, finding in findings.items() if finding["verdict"] == "fail"}
    assert failed == {
        "dkim keys",
        "bounces rules_file",
        "bounces verp_previous_keys 7",
        "portal key_dir",
        "topic delivery",
        "store ledger.url",
        "store bounces.store_url",
        "store portal.escrow_url",
        f"route {domain}",
        "portal base_url",
        "bounces bounce_domain",
        "transport ehlo_name",
    }
    assert "Error: 12 check(s) failed" in text
    assert "retired-verp.key does not exist" in findings["bounces verp_previous_keys 7"]["detail"]
    assert findings["topic delivery"]["detail"].startswith(f"{missing_topic} is not on the brokers")
    assert "eobblast keys generate" in findings["dkim keys"]["detail"]
    assert "no-rules.toml" in findings["bounces rules_file"]["detail"]
    assert findings["store ledger.url"]["detail"].endswith(
        f"port {pg_port} failed: Connection refused"
    )
    assert findings["store bounces.store_url"]["detail"] == "the PostgreSQL URL cannot be parsed"
    assert "is not a writable directory" in findings["store portal.escrow_url"]["detail"]
    assert findings["portal base_url"]["detail"].startswith(
        "https://eob.example.com/p/: eob.example.com is a reserved name: "
    )
    assert findings["bounces bounce_domain"]["detail"].startswith(
        "bounces.eobblast.test is a reserved name: "
    )
    assert findings["transport ehlo_name"]["detail"].startswith(
        "eobblast.localhost is a reserved name: "
    )
    assert findings[f"route {domain}"]["detail"].startswith(f"127.0.0.1:{smtp_port} not reached")
    for secret in (PASSWORD, UNPARSABLE, "s3cret"):
        assert secret not in text
    # Asking created nothing: the misspelt topic is still not there.
    assert missing_topic not in await topic_partitions(stack.broker.bootstrap, PLAINTEXT)


async def test_a_route_whose_certificate_is_not_trusted_fails(stack: Stack, tmp_path: Path) -> None:
    await _bounce_topics(stack)
    settings = _settings(stack)
    other = make_test_pki(tmp_path / "other-pki", ["elsewhere.test"])
    settings["transport"]["ca_bundle"] = str(other.ca)
    code, findings, _ = await check(settings, tmp_path / "eobblast.toml")
    assert code == 1
    for domain in stack.domains:
        finding = findings[f"route {domain}"]
        assert finding["verdict"] == "fail"
        assert (
            "TLS failed (CERTIFICATE_VERIFY_FAILED: unable to get local issuer" in finding["detail"]
        )


async def test_brokers_out_of_reach_fail_and_their_topics_are_not_checked(
    stack: Stack, tmp_path: Path
) -> None:
    settings = _settings(stack)
    with refusing_port() as port:
        settings["kafka"]["bootstrap"] = f"127.0.0.1:{port}"
        code, findings, _ = await check(settings, tmp_path / "eobblast.toml")
    assert code == 1
    assert findings["kafka"]["verdict"] == "fail"
    assert "ConnectionRefusedError" in findings["kafka"]["detail"]
    topics = {name: f for name, f in findings.items() if name.startswith("topic ")}
    assert len(topics) == 6
    assert {f["verdict"] for f in topics.values()} == {"skipped"}
    assert findings["dkim keys"]["verdict"] == "ok"


async def test_files_the_workers_read_at_start_are_read_and_the_report_goes_to_stdout(
    stack: Stack, tmp_path: Path
) -> None:
    await _bounce_topics(stack)
    settings = _settings(stack)
    settings["transport"]["ca_bundle"] = str(tmp_path / "no-ca.pem")
    (tmp_path / "rules.toml").write_bytes(b"\xff\xfe not UTF-8")
    settings["bounces"]["rules_file"] = str(tmp_path / "rules.toml")
    pools = tmp_path / "pools.toml"
    pools.write_text(
        'default_pool = "p"\n[classes]\neob = "p"\n[[pools.p.ips]]\n'
        'address = "127.0.0.1"\nehlo = "mta1.payer.test"\nwarmup_start = 2026-01-01\n'
    )
    settings["shaping"] = {"pools_file": str(pools), "provider_overrides": {"x.test": "nope"}}
    code, findings, _ = await check(settings, tmp_path / "eobblast.toml")
    assert code == 1
    assert findings["transport ca_bundle"]["verdict"] == "fail"
    assert {findings[f"route {d}"]["verdict"] for d in stack.domains} == {"skipped"}
    assert findings["bounces rules_file"]["detail"].endswith("not UTF-8 (byte 0)")
    assert findings["shaping pools_file"]["verdict"] == "ok"
    assert findings["shaping warmup_file"]["detail"] == (
        "shaping.provider_overrides.x.test: no provider 'nope'"
    )
    # A route that does not parse is a finding too; and the table goes to standard output.
    settings["transport"]["routes"] = {"x.test": "no-port"}
    (tmp_path / "eobblast.toml").write_text(tomli_w.dumps(settings))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eobblast", "check", "--config", str(tmp_path / "eobblast.toml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=os.environ | {"COLUMNS": "250"},  # one line per check
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 1
    table = out.decode()
    assert "routes" in table and "route for x.test: expected host:port" in table
    assert "Error:" in err.decode() and "Error:" not in table


async def test_run_refuses_to_start_on_a_store_waiting_cannot_heal_saying_what_check_says(
    stack: Stack, tmp_path: Path
) -> None:
    # Workers would die opening the bounce store and be restarted forever: a URL that cannot
    # be parsed will not get better, so run stops at once, with the causes check gives
    # (libpq's words, no URL, no password), without a traceback and without waiting for
    # the ledger's server, which refuses now but might answer later.
    await _bounce_topics(stack)
    settings = _settings(stack)
    with refusing_port() as pg_port:
        settings["ledger"]["url"] = f"postgresql://eob:{PASSWORD}@127.0.0.1:{pg_port}/eob"
        settings["bounces"]["store_url"] = f"postgresql://eob:{UNPARSABLE}@127.0.0.1:{pg_port}/eob"
        _, findings, _ = await check(settings, tmp_path / "check.toml")
        started = time.monotonic()
        code, out = await run(settings, tmp_path / "eobblast.toml")
        took = time.monotonic() - started
    assert code == 1
    ledger = findings["store ledger.url"]["detail"]
    assert ledger.endswith(f"port {pg_port} failed: Connection refused")
    error = out.strip().splitlines()[-1]
    assert error == (
        f"Error: store ledger.url: {ledger}; store bounces.store_url: the PostgreSQL URL"
        " cannot be parsed (no worker started)"
    )
    assert "Traceback" not in out
    assert '"msg":"worker started"' not in out  # the supervisor's log line
    assert '"level":"error"' not in out  # no "waiting for it": it did not wait
    for secret in (PASSWORD, UNPARSABLE, "s3cret"):
        assert secret not in out
    assert took < 20  # a refused connection is answered at once: no waiting for a timeout


async def said(process: asyncio.subprocess.Process, seen: list[str], text: str) -> None:
    """Read `process`'s output into `seen`, a line at a time, until a line holds `text`."""
    assert process.stdout is not None
    try:
        async with asyncio.timeout(60):
            while line := await process.stdout.readline():
                seen.append(line.decode())
                if text in seen[-1]:
                    return
    except TimeoutError:
        pass
    pytest.fail(f"eobblast run did not say {text!r}:\n{''.join(seen)}")


def _waits(seen: list[str]) -> list[dict[str, Any]]:
    """What run logged as errors while it waited for a store."""
    logged = (orjson.loads(line) for line in seen if line.startswith("{"))
    return [doc for doc in logged if doc["level"] == "error" and "retry_in" in doc]


async def test_run_waits_for_a_postgresql_server_that_does_not_answer_yet(
    stack: Stack, tmp_path: Path
) -> None:
    # A database that starts with eobblast (one compose stack, one host's boot) is waited
    # for, as brokers are: run says why at each attempt, starts no worker meanwhile, and
    # starts them once the server answers.
    await _bounce_topics(stack)
    settings = _settings(stack)
    settings["workers"]["count"] = 1
    seen: list[str] = []
    with throwaway_pg_schema("runwait") as pg_url, socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # connections refused: bound, not listening
        pg_port = refusing.getsockname()[1]
        # The machine's server, through pg_port once it listens. Trust: the password is
        # never asked for, and never shown.
        ledger_url = pg_url.replace("@127.0.0.1:5432/", f":{PASSWORD}@127.0.0.1:{pg_port}/")
        settings["ledger"]["url"] = ledger_url
        assert PASSWORD in settings["ledger"]["url"]
        async with running(settings, tmp_path / "eobblast.toml") as process:
            await said(process, seen, "waiting for it")
            await said(process, seen, "waiting for it")  # and again, after a pause
            assert not any('"msg":"worker started"' in line for line in seen)
            refusing.close()  # its port, for socat: PostgreSQL answers there now
            socat = await asyncio.create_subprocess_exec(
                *DIE_WITH_PARENT, "socat",
                f"TCP-LISTEN:{pg_port},bind=127.0.0.1,reuseaddr,fork", "TCP:127.0.0.1:5432",
            )  # fmt: skip
            try:
                await said(process, seen, '"msg":"worker started"')
                process.terminate()
                rest, _ = await asyncio.wait_for(process.communicate(), 60)
            finally:
                socat.terminate()
                await socat.wait()
    assert process.returncode == 0
    out = "".join(seen) + rest.decode()
    waits = _waits(seen)
    attempts = [doc["attempt"] for doc in waits]
    assert len(attempts) >= 2 and attempts == list(range(1, len(attempts) + 1)), attempts
    for doc in waits:
        assert doc["check"] == "store ledger.url"
        assert doc["msg"].startswith("store ledger.url: PostgreSQL: connection failed: ")
        assert doc["msg"].endswith(
            f"port {pg_port} failed: Connection refused; waiting for it, no worker started"
        )
    assert '"msg":"stores answer"' in out
    assert "Traceback" not in out
    for secret in (PASSWORD, "s3cret"):
        assert secret not in out


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
async def test_run_waiting_for_a_store_stops_at_once_on_sigterm_or_ctrl_c(
    stack: Stack, tmp_path: Path, stop: signal.Signals
) -> None:
    settings = _settings(stack)
    seen: list[str] = []
    with refusing_port() as pg_port:
        settings["ledger"]["url"] = f"postgresql://eob:{PASSWORD}@127.0.0.1:{pg_port}/eob"
        async with running(settings, tmp_path / "eobblast.toml") as process:
            await said(process, seen, "waiting for it")
            process.send_signal(stop)
            rest, _ = await asyncio.wait_for(process.communicate(), 5)
    out = "".join(seen) + rest.decode()
    assert process.returncode == 0, out  # stopped as asked, nothing to stop
    assert '"msg":"stopped while waiting for the stores; no worker started"' in out
    assert "Traceback" not in out and "Aborted" not in out
    assert '"msg":"worker started"' not in out
    assert PASSWORD not in out


async def test_run_warns_of_placeholder_names_and_shaping_off(stack: Stack, tmp_path: Path) -> None:
    # Tests mean .test names and no shaping: run says so in its log at start, and goes on.
    # (An empty key directory then stops it before any worker starts.)
    settings = stack.settings()  # the defaults' portal base_url and bounce_domain
    settings["dkim"]["key_dir"] = str(tmp_path / "no-keys")
    (tmp_path / "no-keys").mkdir()
    code, out = await run(settings, tmp_path / "eobblast.toml")
    assert code == 1 and "no usable DKIM key" in out
    logged = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    warned = {doc["check"]: doc for doc in logged if doc["level"] == "warning" and "check" in doc}
    assert set(warned) == {
        "portal base_url",
        "bounces bounce_domain",
        "transport ehlo_name",
        "shaping pools_file",
    }
    assert warned["portal base_url"]["msg"].startswith(
        "portal base_url: https://eob.example.com/p/: eob.example.com is a reserved name"
    )
    assert warned["bounces bounce_domain"]["msg"].startswith(
        "bounces bounce_domain: bounces.eobblast.test is a reserved name"
    )
    assert warned["transport ehlo_name"]["msg"].startswith(
        "transport ehlo_name: eobblast.localhost is a reserved name"
    )
    assert "shaping is off" in warned["shaping pools_file"]["msg"]

    # Real names and a pools file: nothing to warn of.
    settings = _settings(stack) | {"dkim": settings["dkim"]}
    pools = tmp_path / "pools.toml"
    pools.write_text(
        'default_pool = "p"\n[classes]\neob = "p"\n[[pools.p.ips]]\n'
        'address = "127.0.0.1"\nehlo = "mta1.acme-health.com"\nwarmup_start = 2026-01-01\n'
    )
    settings["shaping"] = {"pools_file": str(pools)}
    code, out = await run(settings, tmp_path / "eobblast.toml")
    assert code == 1 and "no usable DKIM key" in out
    assert '"check"' not in out
