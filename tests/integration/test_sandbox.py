"""The sandbox receivers over real loopback sockets, with real STARTTLS and a verifying client."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import mailbox
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from cryptography import x509

from eobblast.errors import ConfigError
from eobblast.sandbox import (
    Behaviour,
    Sandbox,
    SandboxDomain,
    TestPki,
    certificate_dns_names,
    certificate_verifies,
    default_sandbox_domains,
    make_test_pki,
    rcpt_reply,
    sandbox_config_from_toml,
)
from eobblast.sandbox.ca import WRONG_HOST_NAME

ALPHA = "alpha.sandbox.test"
DEFER = "defer.sandbox.test"
REJECT = "reject.sandbox.test"
BRAVO = "bravo.sandbox.test"
NOTLS = "notls.sandbox.test"
UNTRUSTED = "untrusted.sandbox.test"
EXPIRED = "expired.sandbox.test"
WRONGHOST = "wronghost.sandbox.test"
DROPPER = "dropper.sandbox.test"
ALL_NAMES = [ALPHA, DEFER, REJECT, BRAVO, NOTLS, UNTRUSTED, EXPIRED, WRONGHOST, DROPPER]
CLOSE_AFTER = 3
# 127.0.11.x: apart from the demo's 127.0.10.x, so a running demo does not collide.
DOMAINS = [
    SandboxDomain(
        ALPHA,
        "127.0.11.1",
        recipient_rules=(("unknown-", Behaviour.REJECT), ("busy-", Behaviour.DEFER)),
    ),
    SandboxDomain(DEFER, "127.0.11.2", behaviour=Behaviour.DEFER),
    SandboxDomain(REJECT, "127.0.11.3", behaviour=Behaviour.REJECT),
    SandboxDomain(BRAVO, "127.0.11.4", close_after=CLOSE_AFTER),
    SandboxDomain(NOTLS, "127.0.11.5", behaviour=Behaviour.NO_STARTTLS),
    SandboxDomain(UNTRUSTED, "127.0.11.6", behaviour=Behaviour.UNTRUSTED_CERT),
    # .9 and .10 are taken by tests that start their own sandbox.
    SandboxDomain(EXPIRED, "127.0.11.11", behaviour=Behaviour.EXPIRED_CERT),
    SandboxDomain(WRONGHOST, "127.0.11.12", behaviour=Behaviour.WRONG_HOST_CERT),
    SandboxDomain(DROPPER, "127.0.11.13", behaviour=Behaviour.DROP_AFTER_STARTTLS),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"), ALL_NAMES)


@pytest.fixture
async def sandbox(tmp_path: Path, pki: TestPki) -> AsyncIterator[Sandbox]:
    async with Sandbox(DOMAINS, tmp_path / "mail", pki) as running:
        yield running


def verifying_context(pki: TestPki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


def unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait for the servers' threads to catch up (a session ends there after the client's end)."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - polling a counter in another thread
            await asyncio.sleep(0.005)


async def open_tls(
    sandbox: Sandbox,
    domain: str,
    pki: TestPki,
    *,
    source_address: tuple[str, int] | None = None,
    context: ssl.SSLContext | None = None,
) -> aiosmtplib.SMTP:
    """Connect to the domain's IP, then STARTTLS verifying the certificate against the domain."""
    host, port = sandbox.routes[domain]
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        # start_tls=True would verify against `hostname`, the IP; the MX name is what counts.
        start_tls=False,
        tls_context=context or verifying_context(pki),
        source_address=source_address,
        local_hostname="sender.eobblast.test",
        timeout=5,
    )
    await client.connect()
    await client.starttls(server_hostname=domain)
    return client


def message(to: str, n: int = 0) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "eob-notices@insurer.test"
    msg["To"] = to
    msg["Subject"] = "Your Explanation of Benefits is ready"
    msg["Message-ID"] = f"<test-{n}@insurer.test>"
    msg.set_content(f"Test notice number {n}.\n")
    return msg


def stored_files(root: Path, domain: str) -> list[Path]:
    return sorted((root / domain / "new").iterdir())


async def test_accepted_message_lands_in_maildir_with_trace_header(
    sandbox: Sandbox, pki: TestPki, tmp_path: Path
) -> None:
    client = await open_tls(sandbox, ALPHA, pki)
    ssl_object = client.get_transport_info("ssl_object")
    errors, reply = await client.send_message(message(f"member-1@{ALPHA}"))
    await client.quit()

    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    assert sandbox.counts[ALPHA] == 1
    [record] = sandbox.received
    # The record and header come from the server side of the same TLS session.
    assert record.tls_version == ssl_object.version() == "TLSv1.3"
    assert record.cipher == ssl_object.cipher()[0]
    assert record.tls_cert_trusted
    assert record.client_ip.startswith("127.")
    assert record.helo == "sender.eobblast.test"
    assert record.mail_from == "eob-notices@insurer.test"
    assert record.rcpt_tos == (f"member-1@{ALPHA}",)

    [path] = stored_files(tmp_path / "mail", ALPHA)
    assert record.path == path
    raw = path.read_bytes()
    assert raw.startswith(b"Received: from sender.eobblast.test ([")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    received = " ".join(str(parsed["Received"]).split())
    assert f"[{record.client_ip}]" in received
    assert f"by {ALPHA} (eobblast-sandbox) with ESMTPS id {record.queue_id}" in received
    assert f"(version=TLSv1.3 cipher={record.cipher} bits=256)" in received
    assert f"for <member-1@{ALPHA}>;" in received
    assert parsed["Subject"] == "Your Explanation of Benefits is ready"
    # size counts the message as the client sent it, without the trace header we added.
    assert record.size == len(raw) - len(raw.split(b"\r\nFrom: ", 1)[0]) - 2

    # Readable as a standard Maildir.
    box = mailbox.Maildir(tmp_path / "mail" / ALPHA, create=False)
    assert len(box) == 1


async def test_tls12_client_is_recorded_as_tls12(sandbox: Sandbox, pki: TestPki) -> None:
    context = verifying_context(pki)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    client = await open_tls(sandbox, ALPHA, pki, context=context)
    negotiated = client.get_transport_info("ssl_object").cipher()[0]
    await client.send_message(message(f"member-2@{ALPHA}"))
    await client.quit()

    [record] = sandbox.received
    assert record.tls_version == "TLSv1.2"
    assert record.cipher == negotiated
    assert "version=TLSv1.2" in record.path.read_text()


async def test_source_address_is_recorded(sandbox: Sandbox, pki: TestPki) -> None:
    client = await open_tls(sandbox, ALPHA, pki, source_address=("127.0.0.7", 0))
    await client.send_message(message(f"member-3@{ALPHA}"))
    await client.quit()

    [record] = sandbox.received
    assert record.client_ip == "127.0.0.7"
    assert "([127.0.0.7])" in record.path.read_text()


async def test_untrusted_certificate_fails_verification(
    sandbox: Sandbox, pki: TestPki, tmp_path: Path
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await open_tls(sandbox, UNTRUSTED, pki)
    assert sandbox.received == []
    assert stored_files(tmp_path / "mail", UNTRUSTED) == []


async def test_untrusted_domain_does_offer_starttls(sandbox: Sandbox, pki: TestPki) -> None:
    # Without verification the handshake succeeds: the failure above is the certificate's.
    client = await open_tls(sandbox, UNTRUSTED, pki, context=unverified_context())
    assert client.get_transport_info("ssl_object") is not None
    await client.quit()


@pytest.mark.parametrize(
    ("domain", "code", "reason"),
    [
        (EXPIRED, 10, "certificate has expired"),  # X509_V_ERR_CERT_HAS_EXPIRED
        (WRONGHOST, 62, f"Hostname mismatch, certificate is not valid for '{WRONGHOST}'"),
    ],
)
async def test_bad_certificate_fails_verification_for_its_one_reason(
    sandbox: Sandbox, pki: TestPki, tmp_path: Path, domain: str, code: int, reason: str
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as failed:
        await open_tls(sandbox, domain, pki)
    assert failed.value.verify_code == code
    assert reason in failed.value.verify_message
    await eventually(lambda: sandbox.empty_sessions[domain] == 1)
    assert sandbox.received == []
    assert stored_files(tmp_path / "mail", domain) == []


async def test_unverified_tls_is_recorded_as_untrusted(sandbox: Sandbox, pki: TestPki) -> None:
    # A careless client can still deliver to the bad-certificate domains: the record says so.
    for n, domain in enumerate([UNTRUSTED, EXPIRED, WRONGHOST, ALPHA]):
        client = await open_tls(sandbox, domain, pki, context=unverified_context())
        await client.send_message(message(f"member-{n}@{domain}", n))
        await client.quit()
    trusted = {r.domain: r.tls_cert_trusted for r in sandbox.received}
    assert trusted == {UNTRUSTED: False, EXPIRED: False, WRONGHOST: False, ALPHA: True}
    assert all(r.tls_version == "TLSv1.3" for r in sandbox.received)


async def test_dropper_completes_tls_then_never_accepts(
    sandbox: Sandbox, pki: TestPki, tmp_path: Path
) -> None:
    client = await open_tls(sandbox, DROPPER, pki)
    # The handshake verified against the test CA: the failure is the connection's, not TLS's.
    assert client.get_transport_info("ssl_object").version() == "TLSv1.3"
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.send_message(message(f"member-11@{DROPPER}"))
    assert not client.is_connected
    await eventually(lambda: sandbox.empty_sessions[DROPPER] == 1)
    assert sandbox.counts[DROPPER] == 0
    assert sandbox.received == []
    assert stored_files(tmp_path / "mail", DROPPER) == []


async def test_empty_sessions_count_only_connections_without_a_message(
    sandbox: Sandbox, pki: TestPki
) -> None:
    # aiosmtpd's start-up probe connected to every server: it is not a client session.
    assert sandbox.empty_sessions == {d.name: 0 for d in DOMAINS}
    client = await open_tls(sandbox, ALPHA, pki)
    await client.send_message(message(f"member-12@{ALPHA}"))
    await client.quit()
    client = await open_tls(sandbox, ALPHA, pki)
    await client.quit()
    await eventually(lambda: sandbox.empty_sessions[ALPHA] >= 1)
    assert sandbox.empty_sessions[ALPHA] == 1
    assert sandbox.counts[ALPHA] == 1


async def test_verification_is_against_the_name_not_the_ip(sandbox: Sandbox, pki: TestPki) -> None:
    host, port = sandbox.routes[ALPHA]
    # aiosmtplib's start_tls=True verifies against `hostname`; the certificate names no IP.
    client = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=True, tls_context=verifying_context(pki), timeout=5
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.connect()
    # The wrong name fails too.
    with pytest.raises(ssl.SSLCertVerificationError):
        await _starttls_as(sandbox, ALPHA, "mx.elsewhere.test", pki)


async def _starttls_as(sandbox: Sandbox, domain: str, name: str, pki: TestPki) -> None:
    host, port = sandbox.routes[domain]
    client = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, tls_context=verifying_context(pki), timeout=5
    )
    await client.connect()
    await client.starttls(server_hostname=name)


async def test_connected_socket_with_domain_hostname_verifies(
    sandbox: Sandbox, pki: TestPki
) -> None:
    # The other way to verify the name: hand aiosmtplib a connected socket, hostname = MX name.
    host, port = sandbox.routes[ALPHA]
    sock = socket.create_connection((host, port), timeout=5, source_address=("127.0.0.8", 0))
    sock.setblocking(False)
    client = aiosmtplib.SMTP(
        hostname=ALPHA, sock=sock, start_tls=True, tls_context=verifying_context(pki), timeout=5
    )
    await client.connect()
    await client.send_message(message(f"member-4@{ALPHA}"))
    await client.quit()
    [record] = sandbox.received
    assert record.client_ip == "127.0.0.8"
    assert record.tls_version == "TLSv1.3"


async def test_no_starttls_domain_fails_a_tls_requiring_client(
    sandbox: Sandbox, pki: TestPki, tmp_path: Path
) -> None:
    host, port = sandbox.routes[NOTLS]
    client = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=True, tls_context=verifying_context(pki), timeout=5
    )
    with pytest.raises(aiosmtplib.SMTPException, match="STARTTLS extension not supported"):
        await client.connect()
    assert sandbox.received == []
    assert stored_files(tmp_path / "mail", NOTLS) == []


async def test_no_starttls_domain_records_plaintext(sandbox: Sandbox, tmp_path: Path) -> None:
    host, port = sandbox.routes[NOTLS]
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=5)
    await client.connect()
    await client.send_message(message(f"member-5@{NOTLS}"))
    await client.quit()

    [record] = sandbox.received
    assert record.tls_version is None
    assert record.cipher is None
    assert not record.tls_cert_trusted
    text = record.path.read_text()
    assert f"with ESMTP id {record.queue_id}" in text
    assert "version=" not in text


async def test_recipient_rules_reject_and_defer(sandbox: Sandbox, pki: TestPki) -> None:
    client = await open_tls(sandbox, ALPHA, pki)
    await client.mail("eob-notices@insurer.test")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as rejected:
        await client.rcpt(f"unknown-7@{ALPHA}")
    assert rejected.value.code == 550
    assert rejected.value.message.startswith("5.1.1 ")
    assert "User unknown" in rejected.value.message
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as deferred:
        await client.rcpt(f"busy-7@{ALPHA}")
    assert deferred.value.code == 451
    assert deferred.value.message.startswith("4.2.1 Mailbox busy")
    await client.rset()

    # Mixed recipients: the accepted one gets the message, the rejected one is reported.
    errors, _ = await client.sendmail(
        "eob-notices@insurer.test",
        [f"member-8@{ALPHA}", f"unknown-8@{ALPHA}"],
        message(f"member-8@{ALPHA}").as_bytes(),
    )
    await client.quit()
    assert errors[f"unknown-8@{ALPHA}"].code == 550
    [record] = sandbox.received
    assert record.rcpt_tos == (f"member-8@{ALPHA}",)


@pytest.mark.parametrize(
    ("domain", "code", "status"), [(REJECT, 550, "5.1.1"), (DEFER, 451, "4.3.0")]
)
async def test_domain_wide_reject_and_defer(
    sandbox: Sandbox, pki: TestPki, domain: str, code: int, status: str
) -> None:
    client = await open_tls(sandbox, domain, pki)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await client.send_message(message(f"member-9@{domain}"))
    [error] = refused.value.recipients
    assert error.code == code
    assert error.message.startswith(status)
    await client.quit()
    assert sandbox.received == []


async def test_close_after_k_messages(sandbox: Sandbox, pki: TestPki, tmp_path: Path) -> None:
    client = await open_tls(sandbox, BRAVO, pki)
    for n in range(CLOSE_AFTER):
        await client.send_message(message(f"member-{n}@{BRAVO}", n))
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await client.send_message(message(f"member-x@{BRAVO}", 99))
    assert refused.value.code == 421
    assert refused.value.message.startswith("4.7.0 ")
    # The server hung up after its 421.
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        for _ in range(50):
            await client.noop()
    assert sandbox.counts[BRAVO] == CLOSE_AFTER
    assert len(stored_files(tmp_path / "mail", BRAVO)) == CLOSE_AFTER

    # A new connection gets a fresh allowance.
    client = await open_tls(sandbox, BRAVO, pki)
    await client.send_message(message(f"member-y@{BRAVO}", 100))
    await client.quit()
    assert sandbox.counts[BRAVO] == CLOSE_AFTER + 1


async def test_stop_releases_the_ports(tmp_path: Path, pki: TestPki) -> None:
    domains = [SandboxDomain(ALPHA, "127.0.11.9"), SandboxDomain(BRAVO, "127.0.11.9")]
    first = Sandbox(domains, tmp_path / "one", pki)
    await first.start()
    routes = first.routes
    assert routes[ALPHA][1] != routes[BRAVO][1] != 0
    client = await open_tls(first, ALPHA, pki)
    await client.send_message(message(f"member-10@{ALPHA}"))
    await client.quit()
    await first.stop()
    assert first.routes == {}

    with pytest.raises(aiosmtplib.SMTPConnectError):
        await aiosmtplib.SMTP(hostname=routes[ALPHA][0], port=routes[ALPHA][1], timeout=2).connect()
    # The same fixed ports can be bound again at once.
    again = [
        SandboxDomain(ALPHA, "127.0.11.9", routes[ALPHA][1]),
        SandboxDomain(BRAVO, "127.0.11.9", routes[BRAVO][1]),
    ]
    async with Sandbox(again, tmp_path / "two", pki) as second:
        assert second.routes == routes


@pytest.mark.parametrize(
    ("name", "behaviour", "error"),
    [
        (BRAVO, Behaviour.ACCEPT, f"does not name {BRAVO}"),
        (BRAVO, Behaviour.EXPIRED_CERT, f"does not name {BRAVO}"),
        # A wrong-host certificate that names the domain would verify.
        (
            WRONG_HOST_NAME,
            Behaviour.WRONG_HOST_CERT,
            f"wrong-host certificate names {WRONG_HOST_NAME}",
        ),
    ],
)
async def test_start_refuses_a_certificate_with_the_wrong_names(
    tmp_path: Path, name: str, behaviour: Behaviour, error: str
) -> None:
    pki = make_test_pki(tmp_path / "pki", [ALPHA])
    sandbox = Sandbox(
        [SandboxDomain(name, "127.0.11.10", behaviour=behaviour)], tmp_path / "mail", pki
    )
    with pytest.raises(ConfigError, match=error):
        await sandbox.start()
    assert sandbox.routes == {}


def test_pki_is_reused_and_reissued_for_new_names(tmp_path: Path) -> None:
    first = make_test_pki(tmp_path, [ALPHA])
    ca, server, untrusted, expired, wrong_host = (
        first.ca.read_bytes(),
        first.server_cert.read_bytes(),
        first.untrusted_cert.read_bytes(),
        first.expired_cert.read_bytes(),
        first.wrong_host_cert.read_bytes(),
    )
    again = make_test_pki(tmp_path, [ALPHA])
    assert again == first
    assert first.ca.read_bytes() == ca and first.server_cert.read_bytes() == server
    assert first.untrusted_cert.read_bytes() == untrusted
    assert first.expired_cert.read_bytes() == expired
    assert first.wrong_host_cert.read_bytes() == wrong_host
    make_test_pki(tmp_path, [ALPHA, BRAVO])
    assert first.ca.read_bytes() == ca  # clients that trust the CA keep trusting it
    assert first.server_cert.read_bytes() != server
    assert first.expired_cert.read_bytes() != expired
    assert BRAVO in certificate_dns_names(first.expired_cert)
    assert first.wrong_host_cert.read_bytes() == wrong_host  # still names neither
    for key in (first.server_key, first.expired_key, first.wrong_host_key):
        assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_pki_bad_certificates_fail_only_as_intended(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, [ALPHA, BRAVO])
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    now = dt.datetime.now(dt.UTC)
    expired = x509.load_pem_x509_certificate(pki.expired_cert.read_bytes())
    wrong_host = x509.load_pem_x509_certificate(pki.wrong_host_cert.read_bytes())
    for cert in (expired, wrong_host):
        cert.verify_directly_issued_by(ca)
    assert expired.not_valid_after_utc < now - dt.timedelta(hours=12)
    assert certificate_dns_names(pki.expired_cert) == {ALPHA, BRAVO}
    assert wrong_host.not_valid_before_utc < now < wrong_host.not_valid_after_utc
    assert certificate_dns_names(pki.wrong_host_cert) == {WRONG_HOST_NAME}

    assert certificate_verifies(pki.server_cert, pki.ca, ALPHA)
    assert certificate_verifies(pki.wrong_host_cert, pki.ca, WRONG_HOST_NAME)
    assert not certificate_verifies(pki.server_cert, pki.ca, "mx.elsewhere.test")
    for bad in (pki.expired_cert, pki.wrong_host_cert, pki.untrusted_cert):
        assert not certificate_verifies(bad, pki.ca, ALPHA)


def test_pki_replaces_a_bad_certificate_that_no_longer_fails(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, [ALPHA])
    # Say someone copied the good pair over the bad ones: reuse must not keep them.
    for cert, key in (
        (pki.expired_cert, pki.expired_key),
        (pki.wrong_host_cert, pki.wrong_host_key),
    ):
        cert.write_bytes(pki.server_cert.read_bytes())
        key.write_bytes(pki.server_key.read_bytes())
    make_test_pki(tmp_path, [ALPHA])
    assert not certificate_verifies(pki.expired_cert, pki.ca, ALPHA)
    assert certificate_dns_names(pki.expired_cert) == {ALPHA}
    assert certificate_dns_names(pki.wrong_host_cert) == {WRONG_HOST_NAME}


def test_pki_reserves_the_wrong_host_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        make_test_pki(tmp_path, [ALPHA, WRONG_HOST_NAME])


def test_rcpt_reply_precedence() -> None:
    domain = SandboxDomain(
        DEFER, "127.0.0.1", behaviour=Behaviour.DEFER, recipient_rules=(("vip-", Behaviour.ACCEPT),)
    )
    assert rcpt_reply(domain, f"vip-1@{DEFER}") is None
    assert (rcpt_reply(domain, f"member@{DEFER}") or "").startswith("451 4.3.0")


def test_default_domains() -> None:
    domains = {d.name: d for d in default_sandbox_domains()}
    assert [d.host for d in domains.values()] == [f"127.0.10.{i}" for i in range(1, 9)]
    assert domains["bravo.sandbox.test"].close_after == 25
    assert domains["notls.sandbox.test"].behaviour is Behaviour.NO_STARTTLS
    assert domains["untrusted.sandbox.test"].behaviour is Behaviour.UNTRUSTED_CERT
    assert domains[EXPIRED].behaviour is Behaviour.EXPIRED_CERT
    assert domains[WRONGHOST].behaviour is Behaviour.WRONG_HOST_CERT
    assert domains[DROPPER].behaviour is Behaviour.DROP_AFTER_STARTTLS


def test_config_from_toml() -> None:
    import tomllib

    data = tomllib.loads(
        """
        [[sandbox.domains]]
        name = "alpha.sandbox.test"
        host = "127.0.10.1"
        port = 2525
        recipient_rules = { "unknown-" = "reject", "busy-" = "defer" }

        [[sandbox.domains]]
        name = "bravo.sandbox.test"
        host = "127.0.10.2"
        behaviour = "accept"
        close_after = 25

        [[sandbox.domains]]
        name = "expired.sandbox.test"
        host = "127.0.10.6"
        behaviour = "expired_cert"

        [[sandbox.domains]]
        name = "wronghost.sandbox.test"
        host = "127.0.10.7"
        behaviour = "WRONG_HOST_CERT"

        [[sandbox.domains]]
        name = "dropper.sandbox.test"
        host = "127.0.10.8"
        behaviour = "drop_after_starttls"
        """
    )
    alpha, bravo, *tls_failures = sandbox_config_from_toml(data)
    assert [d.behaviour for d in tls_failures] == [
        Behaviour.EXPIRED_CERT,
        Behaviour.WRONG_HOST_CERT,
        Behaviour.DROP_AFTER_STARTTLS,
    ]
    assert alpha.port == 2525
    assert alpha.recipient_rules == (("unknown-", Behaviour.REJECT), ("busy-", Behaviour.DEFER))
    assert bravo.close_after == 25 and bravo.port == 0
    assert sandbox_config_from_toml({}) == default_sandbox_domains()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"host": "127.0.0.1"}, r"sandbox\.domains\[0\]\.name: missing"),
        ({"name": "a.test", "host": "10.0.0.1"}, r"\.host: 10\.0\.0\.1 is not a loopback"),
        ({"name": "a.test", "host": "nope"}, r"\.host: 'nope' is not an IP"),
        ({"name": "a.test", "host": "127.0.0.1", "port": "25"}, r"\.port: expected an integer"),
        ({"name": "a.test", "host": "127.0.0.1", "port": 70000}, r"\.port: 70000 is not"),
        ({"name": "a.test", "host": "127.0.0.1", "behaviour": "bounce"}, r"'bounce' is not one"),
        ({"name": "a.test", "host": "127.0.0.1", "close_after": -1}, r"\.close_after: -1"),
        ({"name": "a.test", "host": "127.0.0.1", "colour": 1}, r"unknown key\(s\) colour"),
        (
            {"name": "a.test", "host": "127.0.0.1", "recipient_rules": {"x-": "no_starttls"}},
            r"recipient_rules: 'x-'",
        ),
        (
            {"name": "a.test", "host": "127.0.0.1", "recipient_rules": {"x-": "expired_cert"}},
            r"recipient_rules: 'x-'",
        ),
        (
            {"name": "a.test", "host": "127.0.0.1", "recipient_rules": ["x-"]},
            r"recipient_rules: expected a table",
        ),
    ],
)
def test_config_errors(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sandbox_config_from_toml({"sandbox": {"domains": [entry]}})


def test_config_rejects_duplicates() -> None:
    entry = {"name": "a.test", "host": "127.0.0.1", "port": 2525}
    with pytest.raises(ConfigError, match=r"domains\[1\]\.name: a\.test is listed twice"):
        sandbox_config_from_toml({"sandbox": {"domains": [entry, entry]}})
    other = {"name": "b.test", "host": "127.0.0.1", "port": 2525}
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:2525 is used twice"):
        sandbox_config_from_toml({"sandbox": {"domains": [entry, other]}})
