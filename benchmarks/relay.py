"""Postfix + OpenDKIM as a signing relay: the baseline the 1,500 EOB/s target is set against.

What many insurers run today: the claims side hands finished messages to a local Postfix,
whose `smtpd` passes each through the OpenDKIM milter (rsa-sha256 2048, relaxed/relaxed,
the bench's own keys), queues it, and relays it over verified STARTTLS to the same receiver
eobblast sends to (smtp-sink behind benchmarks/tls_front.py). Postfix and OpenDKIM run
with their defaults apart from what this set-up needs; both come from Debian (`make
system-deps`) and run as a private instance in a temporary directory of their own, stopped
and removed on exit (a SIGKILL of the bench leaves Postfix's detached master running).

The relay is given finished, unsigned messages (the naive baseline's), so it neither
renders nor validates: the comparison flatters it. The clock runs from the first
submission until smtp-sink has counted every message. CPU is the whole machine's busy time
over the run (Postfix's processes come and go), per message.

Before the timed run one message goes through the relay to a capturing SMTP server on
loopback, and its DKIM signature must verify with dkimpy, so the relay is known to sign.

Postfix must start as root; elsewhere `relay_available()` says why the baseline is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
from aiosmtpd.controller import Controller
from aiosmtplib import SMTP

from bench_core import (
    SELECTOR,
    SINK_DOMAIN,
    BenchError,
    Result,
    Setup,
    _free_port,
    _log_tail,
    _stop,
    _wait_listening,
    naive_message,
    start_listening,
)
from common import CountingReceiver, system_cpu_seconds
from eobblast.events.synthetic import PAYERS

CHECK_DOMAIN = "check.bench.test"
POSTFIX = "/usr/sbin/postfix"
OPENDKIM = "/usr/sbin/opendkim"
MASTER_CF = Path("/usr/share/postfix/master.cf.dist")  # Debian's copy of the default
SUBMIT_CONNECTIONS = 16


@dataclass(frozen=True, slots=True)
class Relay:
    """The private Postfix's submission port and the capture server's received messages."""

    port: int
    captured: list[bytes]
    maillog: Path


def relay_available() -> str | None:
    """None when the relay can run here, else why not (one line)."""
    if os.geteuid() != 0:
        return "Postfix's master must start as root"
    for needed in (Path(POSTFIX), Path(OPENDKIM), MASTER_CF):
        if not needed.exists():
            return f"{needed} not found: `make system-deps` installs postfix and opendkim"
    for user in ("postfix", "opendkim"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no {user} user: install Debian's {user} package"
    return None


def _chown(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _opendkim(setup: Setup, home: Path) -> tuple[subprocess.Popen[bytes], int]:
    keys = home / "keys"
    keys.mkdir(mode=0o700)
    _chown(keys, "opendkim")
    table, signing = [], []
    for _, _, domain in PAYERS:
        key = keys / f"{domain}.pem"
        shutil.copyfile(setup.key_dir / f"{domain}.{SELECTOR}.rsa.pem", key)
        key.chmod(0o600)
        _chown(key, "opendkim")
        name = f"{SELECTOR}._domainkey.{domain}"
        table.append(f"{name} {domain}:{SELECTOR}:{key}")
        signing.append(f"*@{domain} {name}")
    (home / "key.table").write_text("\n".join(table) + "\n")
    (home / "signing.table").write_text("\n".join(signing) + "\n")
    conf = home / "opendkim.conf"

    def args_for(port: int) -> list[str]:
        conf.write_text(
            "\n".join(
                [
                    "Mode s",
                    "Canonicalization relaxed/relaxed",
                    "SignatureAlgorithm rsa-sha256",
                    f"Socket inet:{port}@127.0.0.1",
                    f"KeyTable file:{home / 'key.table'}",
                    f"SigningTable refile:{home / 'signing.table'}",
                    "UserID opendkim",
                    "Syslog no",
                    "UMask 007",
                    # The bench's throwaway keys live under /tmp, which OpenDKIM's path
                    # check refuses (world-writable parent).
                    "RequireSafeKeys false",
                ]
            )
            + "\n"
        )
        return [OPENDKIM, "-f", "-x", str(conf)]

    return start_listening("opendkim", args_for, home / "opendkim.log")


def _postfix_conf(
    home: Path, setup: Setup, front_port: int, milter_port: int, check_port: int, port: int
) -> Path:
    etc, queue, data = home / "etc", home / "queue", home / "data"
    for path in (etc, queue, data):
        path.mkdir()
    _chown(data, "postfix")
    policy = etc / "tls_policy"
    policy.write_text(
        f"[127.0.0.1]:{front_port} verify match={SINK_DOMAIN}\n[127.0.0.1]:{check_port} none\n"
    )
    (etc / "transport").write_text(f"{CHECK_DOMAIN} smtp:[127.0.0.1]:{check_port}\n")
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": queue,
        "data_directory": data,
        "meta_directory": "/etc/postfix",
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "maillog_file_prefixes": home,
        "maillog_file": home / "maillog",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "myhostname": "relay.bench.test",
        "mydestination": "",
        "mynetworks": "127.0.0.0/8",
        "relayhost": f"[127.0.0.1]:{front_port}",
        "transport_maps": f"texthash:{etc / 'transport'}",
        "smtpd_milters": f"inet:127.0.0.1:{milter_port}",
        # No unsigned message leaves: a milter failure defers rather than sends.
        "milter_default_action": "tempfail",
        "smtp_tls_security_level": "verify",
        "smtp_tls_policy_maps": f"texthash:{policy}",
        "smtp_tls_CAfile": setup.pki.ca,
        "smtp_tls_mandatory_protocols": ">=TLSv1.2",
    }
    (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    # Debian's master.cf with smtpd on our port; no chroot (the queue holds no /etc copy).
    lines = []
    for line in MASTER_CF.read_text().splitlines():
        fields = line.split()
        if line[:1] not in ("", "#", " ") and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{port}"
            fields[4] = "n"
            line = " ".join(fields)
        lines.append(line)
    (etc / "master.cf").write_text("\n".join(lines) + "\n")
    return etc


class _Capture:
    """aiosmtpd handler keeping the messages the relay hands to the check domain."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(bytes(envelope.original_content or envelope.content))
        return "250 OK"


@contextlib.contextmanager
def postfix_relay(setup: Setup, rx: CountingReceiver) -> Iterator[Relay]:
    """A private Postfix + OpenDKIM relaying to `rx`, stopped and removed on exit (but not
    after a SIGKILL of the bench: Postfix's master runs detached, as it always does)."""
    # A directory of its own that Postfix's daemons (user postfix) can enter; the bench's
    # work directory stays private.
    home = Path(tempfile.mkdtemp(prefix="eobblast-bench-relay-"))
    home.chmod(0o755)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        capture = _Capture()
        controller = Controller(capture, hostname="127.0.0.1", port=_free_port())
        controller.start()
        stack.callback(controller.stop)
        milter, milter_port = _opendkim(setup, home)
        stack.callback(_stop, milter)
        port = _free_port()
        etc = _postfix_conf(home, setup, rx.rx.port, milter_port, controller.port, port)
        _postfix(etc, "check", home)
        # Registered before starting: a start that fails half-way is stopped too.
        stack.callback(_stop_postfix, etc)
        _postfix(etc, "start", home)
        if not _wait_listening(None, port, timeout=10):
            raise BenchError(f"postfix did not listen: {_log_tail(home / 'maillog')}")
        yield Relay(port, capture.messages, home / "maillog")


def _postfix(etc: Path, action: str, home: Path) -> None:
    done = subprocess.run([POSTFIX, "-c", str(etc), action], capture_output=True, check=False)
    if done.returncode != 0:
        # The maillog of synthetic events only: no real member's address can be in it.
        raise BenchError(
            f"postfix {action} failed: {_log_tail(home / 'maillog')}"
            f" {done.stderr.decode(errors='replace')[-300:]}"
        )


def _stop_postfix(etc: Path) -> None:
    # `stop` lets the master end its daemons; `status` fails once it is gone. If it has
    # not gone in 10 s, `abort` kills it, so its queue directory can be removed.
    subprocess.run([POSTFIX, "-c", str(etc), "stop"], capture_output=True, check=False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = subprocess.run(
            [POSTFIX, "-c", str(etc), "status"], capture_output=True, check=False
        )
        if status.returncode != 0:
            return
        time.sleep(0.1)
    subprocess.run([POSTFIX, "-c", str(etc), "abort"], capture_output=True, check=False)


async def _submit(port: int, messages: list[tuple[str, str, bytes]]) -> None:
    async with SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        for sender, rcpt, data in messages:
            await smtp.sendmail(sender, [rcpt], data)


async def _wait_for(predicate: Any, seconds: float, what: str, home: Path) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"relay: {what} not done in {seconds:.0f} s: {_log_tail(home)}")
        await asyncio.sleep(0.01)


async def relay_baseline(
    setup: Setup, relay: Relay, rx: CountingReceiver, events: list[bytes], wait_s: float
) -> Result:
    """Submit `events` as finished messages; time until smtp-sink counted them all."""
    now = dt.datetime.now(dt.UTC)
    maillog = relay.maillog
    # The relay must sign: one message to the capture server, verified with dkimpy.
    sender, _, sample = naive_message(events[0], now)
    await _submit(relay.port, [(sender, f"check@{CHECK_DOMAIN}", sample)])
    await _wait_for(lambda: relay.captured, 30, "the signing check", maillog)
    signed = relay.captured[0]
    if b"DKIM-Signature:" not in signed or not dkim.verify(
        signed, dnsfunc=lambda name, timeout=5: setup.dns.get(name)
    ):
        raise BenchError("the Postfix + OpenDKIM relay's DKIM signature did not verify")
    messages = [naive_message(raw, now) for raw in events]
    shares = [messages[i::SUBMIT_CONNECTIONS] for i in range(SUBMIT_CONNECTIONS)]
    before = rx.messages()
    machine = system_cpu_seconds()
    start = time.perf_counter()
    await asyncio.gather(*(_submit(relay.port, share) for share in shares if share))
    submitted = time.perf_counter() - start
    await _wait_for(lambda: rx.messages() - before >= len(messages), wait_s, "delivery", maillog)
    elapsed = time.perf_counter() - start
    detail: dict[str, Any] = {
        "submit_connections": SUBMIT_CONNECTIONS,
        "submit_seconds": round(submitted, 3),
        "sink_accepted": rx.messages() - before,
        "dkim_verified": True,
    }
    after = system_cpu_seconds()
    if machine is not None and after is not None:
        busy = after[0] - machine[0]
        detail["machine_cpu_us_per_msg"] = round(busy / len(messages) * 1e6, 1)
        detail["machine_busy_cores"] = round(busy / elapsed, 2)
    return Result(
        "relay.postfix_opendkim", "Postfix + OpenDKIM relay", len(messages), elapsed, detail
    )
