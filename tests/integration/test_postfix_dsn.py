"""Real DSNs written by Postfix reach the bounce listener and map to the right event.

A throwaway Postfix instance (own config and queue directories under tmp, smtpd on a free
loopback port) relays our messages to sandbox receivers that reject (550 5.1.1) or defer
(451) them. Postfix writes the DSN itself, to the envelope sender: our VERP return path,
which `transport_maps` routes to the bounce listener. The listener hands it to the real
BounceService, which maps it (VERP) to its event and decides.

Postfix must run as root here (it drops to the `postfix` user itself) and logs to a file
only under /var (`maillog_file`); the test skips, saying why, when either is not possible.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import orjson
import pytest

from eobblast.bounces.category import BounceCategory
from eobblast.bounces.inbound import MappedBy
from eobblast.bounces.listener import BounceListener, serve_bounces
from eobblast.bounces.service import BounceReason, BounceService, DsnReport, SendPermitted
from eobblast.bounces.store import open_bounce_store
from eobblast.bounces.verp import VerpKey, make_return_path
from eobblast.errors import Outcome
from eobblast.sandbox import Behaviour, Sandbox, SandboxDomain, TestPki, make_test_pki
from tests.kafka_fixtures import free_port

REJECT = "reject.sandbox.test"
DEFER = "defer.sandbox.test"
BOUNCE_DOMAIN = "bounce.test"
KEY = VerpKey(5, b"postfix-test-verp-secret-012345")
HOST = "127.0.0.1"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"

MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

# No chroot, no DNS, no TLS, no local delivery: a relay that only knows our three routes.
# The short lifetimes make a deferred message expire (and bounce) within seconds.
MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
myhostname = mta.postfix.test
mydomain = postfix.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
relay_domains =
alias_maps =
alias_database =
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
transport_maps = texthash:{transport}
smtp_dns_support_level = disabled
smtp_tls_security_level = none
maillog_file = {log}
biff = no
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 1s
maximal_queue_lifetime = 1s
bounce_queue_lifetime = 1s
delay_warning_time = 0
smtp_connect_timeout = 5s
"""


# (directory, group, mode) under queue_directory, as Debian's postfix-files sets them up.
QUEUE_DIRS = (
    ("pid", "root", 0o755),
    ("public", "postdrop", 0o710),
    ("maildrop", "postdrop", 0o730),
    *(
        (name, "root", 0o700)
        for name in (
            "active",
            "bounce",
            "corrupt",
            "defer",
            "deferred",
            "flush",
            "hold",
            "incoming",
            "private",
            "saved",
            "trace",
        )
    ),
)


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a test Postfix instance must be started as root (it drops privileges itself)"
    if not Path(POSTFIX).exists() or not Path(POSTCONF).exists():
        return "Postfix is not installed (Debian package postfix)"
    try:
        import pwd

        pwd.getpwnam("postfix")
    except KeyError:
        return "the postfix user does not exist"
    if not os.access("/var/log", os.W_OK):
        return "Postfix logs to a file only under /var and /var/log is not writable"
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=_unavailable() or "")


@dataclass
class PostfixRelay:
    """A started Postfix instance: where to submit, and its log for failure messages."""

    config_dir: Path
    port: int
    log: Path

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return "(no log)"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def _master_pid(queue: Path) -> int | None:
    try:
        return int((queue / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _configure(routes: dict[str, tuple[str, int]]) -> tuple[Path, PostfixRelay]:
    """Write a fresh instance's directories and configuration; returns (root, relay)."""
    # Not under pytest's tmp_path: that is private to root, and Postfix's daemons run as the
    # postfix user and must reach their queue and data directories.
    root = Path(tempfile.mkdtemp(prefix="eobblast-postfix-"))
    root.chmod(0o755)
    etc, queue, data = root / "etc", root / "queue", root / "data"
    for directory in (etc, queue, data):
        directory.mkdir(parents=True)
    shutil.chown(data, "postfix", "postfix")
    # The queue's layout, as `postfix check` would create it (in a slow 3 s).
    for name, group, mode in QUEUE_DIRS:
        path = queue / name
        path.mkdir(mode=mode)
        path.chmod(mode)
        shutil.chown(path, "root" if name == "pid" else "postfix", group)
    # postfix-script skips its integrity checks (seconds of `find`) once after this file.
    (queue / "quick-start").touch()
    log = Path(f"/var/log/eobblast-test-postfix-{uuid.uuid4().hex[:8]}.log")
    transport = etc / "transport"
    transport.write_text(
        "".join(f"{domain} smtp:[{host}]:{port}\n" for domain, (host, port) in routes.items())
    )
    port = free_port(HOST)
    (etc / "master.cf").write_text(MASTER_CF.format(host=HOST, port=port))
    (etc / "main.cf").write_text(
        MAIN_CF.format(queue=queue, data=data, host=HOST, transport=transport, log=log)
    )
    return root, PostfixRelay(etc, port, log)


async def _start_postfix(relay: PostfixRelay, queue: Path) -> None:
    done = await asyncio.to_thread(_run, POSTFIX, "-c", str(relay.config_dir), "start")
    if done.returncode != 0:
        await _stop_postfix(relay, queue)
        output = (done.stdout + done.stderr).strip()
        pytest.fail(f"postfix start failed: {output}\n{relay.log_tail()}")
    # smtpd is spawned by master on the first connection; wait until master listens.
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection(HOST, relay.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break


async def _stop_postfix(relay: PostfixRelay, queue: Path) -> None:
    pid = _master_pid(queue)
    await asyncio.to_thread(_run, POSTFIX, "-c", str(relay.config_dir), "stop")
    if pid is not None:
        # `postfix stop` signals master and returns: wait for it (and its children) to go.
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
    relay.log.unlink(missing_ok=True)


@dataclass
class Stack:
    relay: PostfixRelay
    service: BounceService
    listener: BounceListener
    reports: list[DsnReport]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"), [REJECT, DEFER])


@pytest.fixture
async def stack(tmp_path: Path, pki: TestPki) -> AsyncIterator[Stack]:
    store = await open_bounce_store(f"sqlite:///{tmp_path / 'bounces.db'}")

    class Quiet:
        async def publish(self, topic: str, key: bytes, value: bytes) -> None:
            pass

    service = BounceService(store, Quiet(), verp_keys=[KEY], bounce_domain=BOUNCE_DOMAIN)
    reports: list[DsnReport] = []

    async def handle(raw: bytes, envelope_to: str) -> DsnReport:
        report = await service.on_dsn(raw, envelope_to)
        reports.append(report)
        return report

    listener = await serve_bounces(
        handle, HOST, 0, bounce_domain=BOUNCE_DOMAIN, review_dir=tmp_path / "review"
    )
    domains = [
        SandboxDomain(REJECT, "127.0.17.1", behaviour=Behaviour.REJECT),
        SandboxDomain(DEFER, "127.0.17.2", behaviour=Behaviour.DEFER),
    ]
    sandbox = Sandbox(domains, tmp_path / "mail", pki)
    await sandbox.start()
    root: Path | None = None
    try:
        routes = {**sandbox.routes, BOUNCE_DOMAIN: (HOST, listener.port)}
        root_dir, relay = await asyncio.to_thread(_configure, routes)
        root = root_dir
        await _start_postfix(relay, root_dir / "queue")
        yield Stack(relay, service, listener, reports)
    finally:
        if root is not None:
            await _stop_postfix(relay, root / "queue")
            await asyncio.to_thread(shutil.rmtree, root, True)
        await sandbox.stop()
        await listener.stop()
        await store.close()


async def submit(stack: Stack, event_id: str, member_id: str, to: str) -> None:
    raw_event = orjson.dumps({"event_id": event_id})
    gate = await stack.service.gate(event_id, member_id, to, raw_event)
    assert isinstance(gate, SendPermitted)
    return_path = make_return_path(event_id, KEY, BOUNCE_DOMAIN)
    message = (
        f"From: eob-notices@payer.test\r\nTo: {to}\r\nSubject: Your EOB\r\n"
        f"X-EOB-Event-ID: {event_id}\r\n\r\nA notice.\r\n"
    ).encode()
    async with aiosmtplib.SMTP(hostname=HOST, port=stack.relay.port, timeout=10) as smtp:
        await smtp.sendmail(return_path, [gate.to], message)


async def wait_for(stack: Stack, condition: Callable[[], bool], seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            while not condition():  # noqa: ASYNC110 - Postfix works in its own processes
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"no DSN from Postfix in {seconds} s; its log:\n{stack.relay.log_tail()}")


async def test_postfix_hard_bounce_maps_to_its_event(stack: Stack) -> None:
    event_id = str(uuid.uuid4())
    await submit(stack, event_id, "M-pf-hard", f"gone@{REJECT}")
    await wait_for(stack, lambda: len(stack.reports) == 1, 15)
    [report] = stack.reports
    assert report.inbound.event_id == event_id
    assert report.inbound.mapped_by is MappedBy.VERP
    assert report.inbound.parsed.original_headers.eob_event_id == event_id
    assert not report.needs_review
    [result] = report.results
    assert result.category is BounceCategory.HARD_ADDRESS
    assert result.outcome.outcome is Outcome.HELD
    assert result.outcome.reason is BounceReason.AWAITING_VERIFICATION
    recipient = report.inbound.parsed.recipients[0]
    assert (recipient.address, recipient.status, recipient.action) == (
        f"gone@{REJECT}",
        "5.1.1",
        "failed",
    )


async def test_postfix_expired_soft_bounce_schedules_a_retry(stack: Stack) -> None:
    event_id = str(uuid.uuid4())
    await submit(stack, event_id, "M-pf-soft", f"member@{DEFER}")
    # Deferred first; after the (1 s) queue lifetime Postfix gives up and returns it.
    await wait_for(stack, lambda: len(stack.reports) == 1, 20)
    [report] = stack.reports
    assert report.inbound.event_id == event_id
    [result] = report.results
    assert result.category is BounceCategory.SOFT
    assert result.outcome.outcome is Outcome.DEFERRED
    assert result.outcome.reason is BounceReason.RETRY_SCHEDULED
