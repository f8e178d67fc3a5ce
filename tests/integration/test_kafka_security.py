"""Kafka over TLS and with a SASL login, against a real broker.

Tansu (the embedded broker) speaks no TLS itself, so each test broker advertises the port of
socat's TLS front (Debian `socat`, OpenSSL) in front of it: every client connection after
the bootstrap goes through TLS, and a client that does not speak it reaches nothing. The
SASL tests run Tansu with `--authentication`: its memory storage cannot hold a user before
logins are required, so they show the SCRAM exchange taking place and being refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import orjson
import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from eobblast import worker as worker_module
from eobblast.config import KafkaConfig, load_config
from eobblast.demo import member_key
from eobblast.observe import metrics
from eobblast.sandbox import (
    Behaviour,
    Sandbox,
    TestPki,
    delivery_status_notification,
    make_test_pki,
)
from eobblast.streams import EmbeddedBroker, resolve_tansu_binary
from eobblast.streams.kafka import (
    PLAINTEXT,
    BrokerUnavailable,
    KafkaSecurity,
    create_topics,
    kafka_security,
    make_producer,
    probe_broker,
)
from tests.integration.test_dlq import member_reference_key
from tests.integration.worker_stack import (
    DIE_WITH_PARENT,
    Stack,
    accept_domains,
    prepare,
    read_topic,
    start_worker,
    statuses,
    until,
)
from tests.kafka_fixtures import free_port

pytestmark = pytest.mark.skipif(shutil.which("socat") is None, reason="needs Debian socat")

DOMAINS = accept_domains(44)
LOOPBACK = "127.0.0.1"


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    """One test CA for the receivers and the broker's front (which is 127.0.0.1)."""
    return make_test_pki(tmp_path / "pki", [LOOPBACK, *(d.name for d in DOMAINS)])


@contextlib.contextmanager
def tls_front(
    port: int, target: int, cert: Path, key: Path, client_ca: Path | None
) -> Iterator[None]:
    """socat terminating TLS on `port` for the broker on `target`; with `client_ca`, it asks
    for a client certificate signed by it."""
    verify = f"verify=1,cafile={client_ca}" if client_ca else "verify=0"
    front = subprocess.Popen(
        [
            *DIE_WITH_PARENT,
            "socat",
            f"OPENSSL-LISTEN:{port},bind={LOOPBACK},reuseaddr,fork,cert={cert},key={key},{verify}",
            f"TCP:{LOOPBACK}:{target}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its children (one per connection) end with it
    )
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(front.pid, signal.SIGTERM)
        front.wait(5)


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@dataclass(frozen=True, slots=True)
class TlsKafka:
    """A broker reachable only through TLS at `bootstrap`."""

    broker: EmbeddedBroker
    bootstrap: str


@contextlib.asynccontextmanager
async def tls_kafka(
    directory: Path, pki: TestPki, *, client_ca: Path | None = None
) -> AsyncIterator[TlsKafka]:
    try:
        resolve_tansu_binary()
    except BrokerUnavailable as error:
        pytest.skip(f"no Kafka broker for integration tests: {error.detail}")
    broker_port = free_port()
    while (tls_port := free_port()) == broker_port:
        pass
    with tls_front(tls_port, broker_port, pki.server_cert, pki.server_key, client_ca):
        broker = EmbeddedBroker(port=broker_port, advertised_port=tls_port, log_dir=directory)
        await broker.start()
        try:
            await until("the TLS front listens", lambda: _listening(tls_port), seconds=10)
            yield TlsKafka(broker, f"{LOOPBACK}:{tls_port}")
        finally:
            await broker.stop()


def _ssl(pki: TestPki, **more: str) -> KafkaSecurity:
    settings = KafkaConfig(security_protocol="SSL", ssl_ca_file=pki.ca)
    if more:
        settings = load_config(
            environ={},
            overrides={"kafka": {"security_protocol": "SSL", "ssl_ca_file": str(pki.ca), **more}},
        ).kafka
    return kafka_security(settings)


def _tls_settings(stack: Stack, bootstrap: str, ca: Path) -> dict[str, Any]:
    """The stack's settings, its Kafka at `bootstrap` over TLS trusting `ca`."""
    settings = stack.settings()
    settings["kafka"] |= {
        "bootstrap": bootstrap,
        "security_protocol": "SSL",
        "ssl_ca_file": str(ca),
    }
    return settings


async def test_a_worker_reads_and_reports_through_tls(
    tmp_path: Path, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    async with tls_kafka(tmp_path, pki) as kafka:
        security = _ssl(pki)
        prepare(tmp_path)
        async with Sandbox(DOMAINS, tmp_path / "mail", pki) as sandbox:
            stack = Stack(kafka.broker, sandbox, pki, tmp_path)
            settings = _tls_settings(stack, kafka.bootstrap, pki.ca)
            config = load_config(environ={}, overrides=settings)
            results = config.bounces.results_topic
            topics = {stack.events_topic: 2, stack.delivery_topic: 1, stack.dlq_topic: 1}
            await create_topics(kafka.bootstrap, {**topics, results: 1}, security=security)
            events = stack.events(20)
            producer = make_producer(kafka.bootstrap, client_id="claims", security=security)
            await producer.start()
            try:
                for value in events:
                    await producer.send_and_wait(stack.events_topic, value, key=member_key(value))
                await producer.send_and_wait(stack.events_topic, b"not json", key=b"M-poison")
                # An answer the verification consumer refuses: proof it reads through TLS.
                await producer.send_and_wait(results, b"not an answer", key=b"M-poison")
            finally:
                await producer.stop()
            with caplog.at_level(logging.WARNING, logger="eobblast.worker"):
                # With the bounce service, as `eobblast run` has it: its consumer too.
                _, stop, task = await start_worker(config, bounce_store_as=lambda store: store)
                try:
                    grouped = statuses(
                        await read_topic(
                            kafka.bootstrap, stack.delivery_topic, until=21, security=security
                        )
                    )

                    async def refused() -> bool:
                        return any(
                            r.getMessage().startswith("verification result refused")
                            for r in caplog.records
                        )

                    await until("the verification answer is read", refused, seconds=30)
                finally:
                    stop.set()
                    await task
            # The poison went to the DLQ, which `eobblast dlq list` reads through TLS too.
            config_file = tmp_path / "eobblast.toml"
            config_file.write_text(tomli_w.dumps(settings))
            listing = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "eobblast", "dlq", "list", "--config", str(config_file),
                "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(listing.communicate(), 120)
        assert listing.returncode == 0, err.decode()
        # (the refused verification answer is parked there too, read from its own topic)
        listed = sorted(
            (row["reason"], row["source"].rpartition("/")[0].rpartition("/")[0])
            for row in map(orjson.loads, out.splitlines())
        )
        assert listed == sorted([("invalid_json", results), ("invalid_json", stack.events_topic)])
        assert b"not encrypted" not in err  # loopback and TLS: no warning
        outcomes = Counter((s.status, s.reason) for items in grouped.values() for s in items)
        assert outcomes == {("delivered", "delivered"): 20, ("rejected", "invalid_json"): 1}
        assert len(sandbox.received) == 20


async def test_the_brokers_certificate_is_verified(tmp_path: Path, pki: TestPki) -> None:
    other = make_test_pki(tmp_path / "other-pki", [LOOPBACK])
    async with tls_kafka(tmp_path, pki) as kafka:
        await probe_broker(kafka.bootstrap, _ssl(pki))
        # Another CA's trust, and the system's: the handshake fails, nothing is sent.
        for trust in (_ssl(other), kafka_security(KafkaConfig(security_protocol="SSL"))):
            with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
                await probe_broker(kafka.bootstrap, trust)
        # A client that speaks no TLS gets no answer from the TLS port.
        with pytest.raises(OSError):
            await probe_broker(kafka.bootstrap, PLAINTEXT)
        # The host name counts: a valid certificate of the same CA for another host fails.
        wrong_port = free_port()
        with tls_front(
            wrong_port, kafka.broker.port, pki.wrong_host_cert, pki.wrong_host_key, None
        ):
            await until("the second front listens", lambda: _listening(wrong_port), seconds=10)
            with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch"):
                await probe_broker(f"{LOOPBACK}:{wrong_port}", _ssl(pki))


async def test_a_worker_that_cannot_verify_the_broker_waits_and_says_why(
    tmp_path: Path, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    other = make_test_pki(tmp_path / "other-pki", [LOOPBACK])
    async with tls_kafka(tmp_path, pki) as kafka:
        prepare(tmp_path)
        async with Sandbox(DOMAINS, tmp_path / "mail", pki) as sandbox:
            stack = Stack(kafka.broker, sandbox, pki, tmp_path)
            config = load_config(
                environ={}, overrides=_tls_settings(stack, kafka.bootstrap, other.ca)
            )
            with caplog.at_level(logging.WARNING, logger="eobblast.streams"):
                _, stop, task = await start_worker(config)
                try:

                    async def told() -> bool:
                        return any("CERTIFICATE_VERIFY_FAILED" in str(getattr(r, "error", ""))
                                   for r in caplog.records)  # fmt: skip

                    await until("the worker says why it cannot reach Kafka", told, seconds=40)
                    assert not task.done()  # waiting for a broker it can trust, not dead
                finally:
                    stop.set()
                    await asyncio.wait_for(task, 15)


def _answered() -> float:
    value = metrics.REGISTRY.get_sample_value("eobblast_kafka_answered_timestamp_seconds")
    assert value is not None
    return value


async def test_a_worker_times_the_brokers_answers_and_they_stop_out_of_reach(
    tmp_path: Path, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        resolve_tansu_binary()
    except BrokerUnavailable as error:
        pytest.skip(f"no Kafka broker for integration tests: {error.detail}")
    monkeypatch.setattr(worker_module, "END_OFFSETS_EVERY", 0.2)

    async def answered_since(moment: float) -> bool:
        return _answered() > moment

    broker_port = free_port()
    while (tls_port := free_port()) == broker_port:
        pass
    cert, key = pki.server_cert, pki.server_key
    broker = EmbeddedBroker(port=broker_port, advertised_port=tls_port, log_dir=tmp_path)
    prepare(tmp_path)
    with contextlib.ExitStack() as front:
        front.enter_context(tls_front(tls_port, broker_port, cert, key, None))
        await broker.start()
        try:
            await until("the TLS front listens", lambda: _listening(tls_port), seconds=10)
            async with Sandbox(DOMAINS, tmp_path / "mail", pki) as sandbox:
                stack = Stack(broker, sandbox, pki, tmp_path)
                settings = _tls_settings(stack, f"{LOOPBACK}:{tls_port}", pki.ca)
                config = load_config(environ={}, overrides=settings)
                topics = {stack.events_topic: 2}
                await create_topics(config.kafka.bootstrap, topics, security=_ssl(pki))
                worker, stop, task = await start_worker(config)
                try:

                    async def working() -> bool:
                        return bool(worker._consumer and worker._consumer.assignment())

                    await until("the worker has its partitions", working, seconds=40)
                    # Past its start and its clients' start, which also set the gauge.
                    working_since = time.time()
                    await until("answered", lambda: answered_since(working_since), seconds=40)
                    front.close()  # every connection to the brokers cut
                    await asyncio.sleep(1.5)  # a question in flight may still be answered
                    last = _answered()
                    await asyncio.sleep(3)  # fifteen rounds of asking
                    assert _answered() == last  # no answer: the alert's clock runs
                    front.enter_context(tls_front(tls_port, broker_port, cert, key, None))
                    await until("answered again", lambda: answered_since(last), seconds=40)
                finally:
                    stop.set()
                    await asyncio.wait_for(task, 30)
        finally:
            await broker.stop()


def _client_certificate(pki: TestPki, directory: Path) -> tuple[Path, Path]:
    """A client certificate (clientAuth) signed by the test CA."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eobblast-worker")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "client.pem", directory / "client.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_a_client_certificate_is_presented_when_asked(tmp_path: Path, pki: TestPki) -> None:
    if not isinstance(
        serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None),
        ec.EllipticCurvePrivateKey,
    ):
        pytest.skip("the test CA's key is not an EC key")
    cert, key = _client_certificate(pki, tmp_path)
    async with tls_kafka(tmp_path, pki, client_ca=pki.ca) as kafka:
        with pytest.raises(OSError):  # no certificate: the front hangs up
            await probe_broker(kafka.bootstrap, _ssl(pki))
        mutual = _ssl(pki, ssl_cert_file=str(cert), ssl_key_file=str(key))
        await probe_broker(kafka.bootstrap, mutual)
        await create_topics(kafka.bootstrap, {"mtls": 1}, security=mutual)
        producer = make_producer(kafka.bootstrap, client_id="mtls", security=mutual)
        await producer.start()
        try:
            sent = await producer.send_and_wait("mtls", b"x", key=b"k")
        finally:
            await producer.stop()
        assert sent.offset == 0


@pytest.fixture
def authenticating_broker(tmp_path: Path) -> Iterator[str]:
    """Tansu requiring a SASL login of every client (SCRAM only)."""
    try:
        binary = resolve_tansu_binary()
    except BrokerUnavailable as error:
        pytest.skip(f"no Kafka broker for integration tests: {error.detail}")
    port = free_port()
    address = f"tcp://{LOOPBACK}:{port}"
    with (tmp_path / "tansu-auth.log").open("wb") as log:
        broker = subprocess.Popen(
            [*DIE_WITH_PARENT, binary, "broker", "--listener-url", address,
             "--advertised-listener-url", address, "--authentication"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield f"{LOOPBACK}:{port}"
        finally:
            broker.terminate()
            broker.wait(5)


async def test_a_sasl_login_is_made_and_its_refusal_reported(
    authenticating_broker: str, tmp_path: Path
) -> None:
    await until("the broker listens", lambda: _listening(int(authenticating_broker.split(":")[1])))
    secret = tmp_path / "password"
    secret.write_text("not-on-file\n")
    security = kafka_security(
        KafkaConfig(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="eobblast",
            sasl_password_file=secret,
        )
    )
    # The SCRAM exchange runs to the broker's final answer, which refuses the login.
    with pytest.raises(OSError, match="SASL login refused"):
        await probe_broker(authenticating_broker, security)
    # Without a login the broker hangs up at the first request instead.
    with pytest.raises(OSError) as plain:
        await probe_broker(authenticating_broker, PLAINTEXT)
    assert "SASL" not in str(plain.value)


async def _eobblast(*args: str) -> tuple[int, str, str]:
    """`eobblast ARGS` in a new process: its return code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eobblast", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _records(
    bootstrap: str, topic: str, count: int, security: KafkaSecurity
) -> list[tuple[bytes | None, bytes]]:
    """The topic's records once it holds at least `count`."""

    async def enough() -> list[tuple[bytes | None, bytes]]:
        found = await read_topic(bootstrap, topic, until=count, seconds=3, security=security)
        return found if len(found) >= count else []

    return await until(f"{count} records on {topic}", enough, seconds=60)


async def test_replay_and_the_bounce_listener_go_through_tls(tmp_path: Path, pki: TestPki) -> None:
    # The two clients the first test leaves out: `eobblast dlq replay`'s producer, and
    # `eobblast bounces`, which publishes what a DSN says.
    async with tls_kafka(tmp_path, pki) as kafka:
        security = _ssl(pki)
        prepare(tmp_path)
        async with Sandbox(DOMAINS, tmp_path / "mail", pki) as sandbox:
            stack = Stack(kafka.broker, sandbox, pki, tmp_path)
            settings = _tls_settings(stack, kafka.bootstrap, pki.ca)
            verification = f"{stack.prefix}.verification"
            settings["bounces"] |= {
                "verification_topic": verification,
                "paper_topic": f"{stack.prefix}.paper",
                "listen_port": free_port(),
            }
            config = load_config(environ={}, overrides=settings)
            topics = {stack.events_topic: 2, stack.delivery_topic: 1, stack.dlq_topic: 1}
            topics |= {
                config.bounces.results_topic: 1,
                verification: 1,
                config.bounces.paper_topic: 1,
            }
            await create_topics(kafka.bootstrap, topics, security=security)
            events = stack.events(2, seed=5)
            producer = make_producer(kafka.bootstrap, client_id="claims", security=security)
            await producer.start()
            try:
                for value in events:
                    await producer.send_and_wait(stack.events_topic, value, key=member_key(value))
            finally:
                await producer.stop()
            # A worker that refuses test domains parks both.
            refusing = load_config(
                environ={},
                overrides={
                    **settings,
                    "pipeline": settings["pipeline"] | {"allow_test_domains": False},
                },
            )
            _, stop, task = await start_worker(refusing)
            try:
                parked = await read_topic(
                    kafka.bootstrap, stack.dlq_topic, until=2, security=security
                )
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
            assert len(parked) == 2
            config_file = tmp_path / "eobblast.toml"
            config_file.write_text(tomli_w.dumps(settings))
            await member_reference_key(config_file)  # a replay is recorded in the audit trail
            code, out, err = await _eobblast("dlq", "replay", "--config", str(config_file), "--all")
            assert code == 0, err
            assert orjson.loads(out)["replayed_by_reason"] == {"invalid_address": 2}
            # The replayed events are delivered; the bounce service's keys are made.
            _, stop, task = await start_worker(config, bounce_store_as=lambda store: store)
            try:
                reported = await _records(kafka.bootstrap, stack.delivery_topic, 4, security)
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
            finals = {key: items[-1].status for key, items in statuses(reported).items()}
            assert list(finals.values()) == ["delivered", "delivered"]
            code, _, err = await _eobblast("keys", "secrets", "--config", str(config_file))
            assert code == 0, err
            listener = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "eobblast", "bounces", "--config", str(config_file),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                # A receiver's late DSN for the first notice: user unknown, a hard bounce.
                sent = sandbox.received[0]
                dsn = delivery_status_notification(
                    behaviour=Behaviour.BOUNCE_LATER,
                    reporting_mta=sent.domain,
                    return_path=sent.mail_from,
                    recipient=sent.rcpt_tos[0],
                    returned_headers=sent.path.read_bytes().split(b"\r\n\r\n", 1)[0] + b"\r\n",
                    arrival=dt.datetime.now(dt.UTC),
                    queue_id=sent.queue_id,
                )

                async def handed_over() -> bool:
                    assert listener.returncode is None, "eobblast bounces stopped"
                    try:
                        async with aiosmtplib.SMTP(
                            hostname=LOOPBACK, port=config.bounces.listen_port, timeout=5
                        ) as smtp:
                            await smtp.sendmail("", [sent.mail_from], dsn)
                    except (OSError, aiosmtplib.SMTPException):
                        return False  # not listening yet, or waiting for the broker
                    return True

                await until("the listener takes the DSN", handed_over, seconds=60, every=0.5)
                asked = await read_topic(kafka.bootstrap, verification, until=1, security=security)
                after = statuses(await _records(kafka.bootstrap, stack.delivery_topic, 5, security))
            finally:
                with contextlib.suppress(ProcessLookupError):
                    listener.send_signal(signal.SIGTERM)
                _, listener_err = await asyncio.wait_for(listener.communicate(), 30)
        assert listener.returncode == 0, listener_err.decode()
        assert b"not encrypted" not in listener_err
        # The listener published through TLS: the notice's bounce, and the request to verify
        # its member's address.
        changed = {key: items[2:] for key, items in after.items() if len(items) > 2}
        [(bounced_id, later)] = changed.items()
        assert [s.status for s in after[bounced_id][:2]] == ["rejected", "delivered"]
        assert later and "delivered" not in {s.status for s in later}
        members = {orjson.loads(e)["event_id"]: orjson.loads(e)["member"]["id"] for e in events}
        assert [orjson.loads(value)["member_id"] for _, value in asked] == [members[bounced_id]]


async def test_eobblast_check_reaches_the_brokers_through_tls_or_says_why(
    tmp_path: Path, pki: TestPki
) -> None:
    other = make_test_pki(tmp_path / "other-pki", [LOOPBACK])
    async with tls_kafka(tmp_path, pki) as kafka:
        prepare(tmp_path)
        async with Sandbox(DOMAINS, tmp_path / "mail", pki) as sandbox:
            stack = Stack(kafka.broker, sandbox, pki, tmp_path)
            verdicts = []
            for ca in (pki.ca, other.ca):
                config_file = tmp_path / "eobblast.toml"
                config_file.write_text(tomli_w.dumps(_tls_settings(stack, kafka.bootstrap, ca)))
                _, out, _ = await _eobblast("check", "--config", str(config_file), "--json")
                [found] = [
                    f for line in out.splitlines() if (f := orjson.loads(line))["check"] == "kafka"
                ]
                verdicts.append((found["verdict"], found["detail"]))
    assert verdicts[0] == ("ok", f"{kafka.bootstrap} answered (SSL)")
    assert verdicts[1][0] == "fail" and "CERTIFICATE_VERIFY_FAILED" in verdicts[1][1]
