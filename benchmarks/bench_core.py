"""eobblast's core throughput: per-stage cost, one process end to end, and a naive baseline.

All in one run, against one receiver: Postfix's `smtp-sink` behind a STARTTLS front
(benchmarks/tls_front.py, its own process), because eobblast refuses to send without
verified TLS. The naive baseline (stdlib `email` + `smtplib`, dkimpy's own `dkim.sign`,
one message at a time) sends through the same front, so the ratio compares senders only.

Prints one JSON line per result on stdout, then a table (unless --json-only). Progress
goes to stderr. Nothing derived from message content is printed: counts and times only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import ctypes
import datetime as dt
import email.policy
import gc
import html
import json
import os
import pwd
import selectors
import shutil
import signal
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import dkim
import orjson
import uvloop
from rich.console import Console
from rich.table import Table

from eobblast.config import Config, load_config
from eobblast.events import EobIssued, validate_event
from eobblast.events.synthetic import PAYERS, Mix, generate_events
from eobblast.pipeline import EventOutcome, Pipeline
from eobblast.protect.dkim import DkimSigner, DnsRecord, generate_keys, load_signer
from eobblast.render import RenderedMessage, Renderer
from eobblast.runner import run_events
from eobblast.sandbox import TestPki, make_test_pki
from eobblast.transport import Transport

SINK_DOMAIN = "sink.bench.test"
SELECTOR = "bench"
TARGET_RATIO = 10.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
HERE = Path(__file__).resolve().parent
# Every generated event is deliverable: the benchmark measures sending, not rejecting.
DELIVERABLE = Mix(
    no_consent=0, invalid_address=0, malformed=0, unknown_user=0, busy_mailbox=0, gone=0
)
# Same fields eobblast signs when present, minus oversigning (dkimpy would need them listed).
NAIVE_SIGN_HEADERS = [
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
]
# Warm-up calls before each timed stage: first calls pay for lazy imports and caches.
WARMUP = 50
NAIVE_WARMUP = 5

T = TypeVar("T")
R = TypeVar("R")


class BenchError(Exception):
    """The benchmark cannot run or its results are not valid."""


@dataclass(frozen=True, slots=True)
class Result:
    """One measured figure: `messages` handled in `seconds` (wall or CPU, see `detail`)."""

    name: str
    label: str
    messages: int
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def us_per_msg(self) -> float:
        """Mean microseconds per message."""
        return self.seconds / self.messages * 1e6 if self.messages else 0.0

    @property
    def msgs_per_s(self) -> float:
        """Messages per second."""
        return self.messages / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, Any]:
        """The result as one JSON object."""
        return {
            "name": self.name,
            "messages": self.messages,
            "seconds": round(self.seconds, 4),
            "us_per_msg": round(self.us_per_msg, 1),
            "msgs_per_s": round(self.msgs_per_s, 1),
            **self.detail,
        }


# ---------------------------------------------------------------------------- processes


@dataclass(frozen=True, slots=True)
class Receiver:
    """The STARTTLS front's port and the pids whose CPU time we report."""

    port: int
    front_pid: int
    sink_pid: int


def find_smtp_sink() -> str:
    """Path of Postfix's smtp-sink (often in /usr/sbin, which non-root PATHs lack)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which("smtp-sink", path=path)
    if found is None:
        raise BenchError(
            "smtp-sink not found: install Postfix (`make system-deps` as root, "
            "or `apt-get install postfix`)"
        )
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes] | None, port: int, timeout: float = 5.0) -> bool:
    """Whether something listens on the loopback port within `timeout` (False at once if
    `proc`, the process meant to, has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[-500:]
    except OSError:
        return ""


def _die_with_parent() -> None:
    # Runs in the child before exec: Linux sends it SIGTERM when we die, even by SIGKILL,
    # which no finally block survives. Elsewhere the try/finally clean-up is all there is.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _as_nobody() -> dict[str, Any]:
    # As root smtp-sink insists on dropping privileges (-u). Dropping them ourselves in
    # Popen does the same, and happens before _die_with_parent: a later credential change,
    # as -u would make, clears the parent-death signal.
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def start_listening(
    name: str,
    args_for: Callable[[int], list[str]],
    log: Path,
    *,
    stdout: Path | None = None,
    **popen: Any,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server on a loopback port probed free, and wait until it listens there.

    The port is probed free, then bound by the server: a race another process could win,
    hence the retries (these servers cannot report a port they picked themselves).
    """
    for _ in range(3):
        port = _free_port()
        with log.open("ab") as err, (stdout or log).open("ab") as out:
            proc = subprocess.Popen(
                args_for(port),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=_die_with_parent,
                **popen,
            )
        if _wait_listening(proc, port):
            return proc, port
        _stop(proc)
    raise BenchError(f"{name} did not start: {_log_tail(log)}")


def _start_sink(
    binary: str, logs: Path, *, counters: Path | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    # -a -C -F: no AUTH, XCLIENT or XFORWARD, like an ordinary receiving MX.
    # Backlog 1024: no refused connects when the pool opens its connections at once.
    # With `counters`: -c, and its running counters go there (stdout).
    count = ["-c"] if counters is not None else []
    return start_listening(
        "smtp-sink",
        lambda port: [
            binary,
            "-a",
            "-C",
            "-F",
            *count,
            "-h",
            SINK_DOMAIN,
            f"127.0.0.1:{port}",
            "1024",
        ],
        logs / "smtp-sink.log",
        stdout=counters,
        **_as_nobody(),
    )


def _start_front(pki: TestPki, sink_port: int, logs: Path) -> tuple[subprocess.Popen[bytes], int]:
    args = [
        sys.executable,
        str(HERE / "tls_front.py"),
        "--cert",
        str(pki.server_cert),
        "--key",
        str(pki.server_key),
        "--sink",
        f"127.0.0.1:{sink_port}",
    ]
    with (logs / "tls-front.log").open("ab") as log:
        # stdin stays open for the front's lifetime: it exits when we do, even on SIGKILL.
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        line = proc.stdout.readline() if sel.select(timeout=15) else b""
    if not line.strip().isdigit():
        _stop(proc)
        raise BenchError(f"TLS front did not start: {_log_tail(logs / 'tls-front.log')}")
    return proc, int(line)


@contextlib.contextmanager
def receiver(pki: TestPki, workdir: Path) -> Iterator[Receiver]:
    """smtp-sink plus its STARTTLS front, both stopped on exit whatever happens."""
    binary = find_smtp_sink()
    with contextlib.ExitStack() as stack:
        sink, sink_port = _start_sink(binary, workdir)
        stack.callback(_stop, sink)
        front, port = _start_front(pki, sink_port, workdir)
        stack.callback(_stop, front)
        yield Receiver(port, front.pid, sink.pid)


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may contain spaces.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def cpu_of(pids: dict[str, int], into: dict[str, Any]) -> Iterator[None]:
    """Record each process's CPU use during the block, as a share of one core."""
    before = {name: process_cpu(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    for name, pid in pids.items():
        after, was = process_cpu(pid), before[name]
        if after is not None and was is not None and elapsed > 0:
            into[f"{name}_cpu_pct"] = round((after - was) / elapsed * 100, 1)


# ---------------------------------------------------------------------------- set-up


@dataclass(frozen=True, slots=True)
class Setup:
    """Keys, test PKI and events shared by every phase."""

    workdir: Path
    key_dir: Path
    pki: TestPki
    dns: dict[bytes, bytes]
    events: list[bytes]


def prepare(workdir: Path, count: int) -> Setup:
    """Write RSA-only DKIM keys for the synthetic payers, the test PKI, and the events."""
    key_dir = workdir / "keys"
    records: list[DnsRecord] = []
    for _, _, domain in PAYERS:
        records += generate_keys(key_dir, domain, SELECTOR, ed25519=False)
    # The certificate names the route's domain (what eobblast verifies) and 127.0.0.1
    # (what smtplib verifies: it checks the host it connected to).
    pki = make_test_pki(workdir / "pki", [SINK_DOMAIN, "127.0.0.1"])
    events = list(
        generate_events(count, mix=DELIVERABLE, domains=(SINK_DOMAIN,), weights=None, seed=7)
    )
    dns = {(r.name + ".").encode(): r.value.encode() for r in records}
    return Setup(workdir, key_dir, pki, dns, events)


def eobblast_config(setup: Setup, port: int, in_flight: int, connections: int) -> Config:
    """The configuration the demo would build, pointed at the front."""
    return load_config(
        environ={},
        overrides={
            "dkim": {"key_dir": str(setup.key_dir), "selector": SELECTOR, "ed25519": False},
            "transport": {
                "ca_bundle": str(setup.pki.ca),
                "routes": {SINK_DOMAIN: f"127.0.0.1:{port}"},
                "max_connections_per_destination": connections,
                "max_messages_per_connection": 1000,
            },
            "pipeline": {"allow_test_domains": True, "max_in_flight": in_flight},
            # The sink verifies as sink.bench.test: EOBs go over verified TLS (tls_required).
            "protection": {"tls_policy_domains": [SINK_DOMAIN]},
            "portal": {
                "escrow_url": f"sqlite:///{setup.key_dir.parent / 'escrow.db'}",
                "audit_url": f"sqlite:///{setup.key_dir.parent / 'audit.db'}",
                "key_dir": str(setup.key_dir.parent / "portal-keys"),
                "audit_key_file": str(setup.key_dir.parent / "portal-keys" / "audit.key"),
            },
            # Each run's own bounce store: notices from an earlier run must not look settled.
            "bounces": {
                "store_url": f"sqlite:///{setup.key_dir.parent / 'bounces.db'}",
                "verp_key_file": str(setup.key_dir.parent / "verp.key"),
                "review_dir": str(setup.key_dir.parent / "bounce-review"),
            },
        },
    )


# ---------------------------------------------------------------------------- stages


def time_each(fn: Callable[[T], R], items: Sequence[T]) -> tuple[list[R], list[float]]:
    """Call fn on every item (after a warm-up), returning results and per-call seconds."""
    for item in items[:WARMUP]:
        fn(item)
    clock = time.perf_counter
    results: list[R] = []
    durations: list[float] = []
    for item in items:
        start = clock()
        results.append(fn(item))
        durations.append(clock() - start)
    return results, durations


def stage_result(name: str, label: str, durations: list[float], **detail: Any) -> Result:
    """A stage's figures, with the median and tail next to the mean."""
    cuts = statistics.quantiles(durations, n=100, method="inclusive")
    return Result(
        name,
        label,
        len(durations),
        sum(durations),
        {"p50_us": round(cuts[49] * 1e6, 1), "p99_us": round(cuts[98] * 1e6, 1), **detail},
    )


@dataclass(frozen=True, slots=True)
class Built:
    """Messages ready for the wire, and the stage results that produced them."""

    envelopes: list[tuple[str, str, bytes]]
    results: list[Result]


def cpu_stages(setup: Setup, count: int) -> Built:
    """validate, render, MIME serialisation and DKIM signing, each timed on its own."""
    raws = setup.events[:count]
    validated, t_validate = time_each(
        lambda raw: validate_event(raw, allow_test_domains=True), raws
    )
    events = [e for e in validated if isinstance(e, EobIssued)]
    if len(events) != len(raws):
        raise BenchError(f"{len(raws) - len(events)} synthetic events failed validation")

    renderer = Renderer()
    messages, t_render = time_each(renderer.render, events)

    signers: dict[str, DkimSigner] = {
        domain: load_signer(setup.key_dir, domain, SELECTOR, ed25519=False)
        for _, _, domain in PAYERS
    }
    pairs = [(signers[e.payer.sending_domain], m) for e, m in zip(events, messages, strict=True)]

    def sign(pair: tuple[DkimSigner, RenderedMessage]) -> list[bytes]:
        signer, message = pair
        return signer.sign(message.headers, message.body)

    signatures, t_sign = time_each(sign, pairs)

    def serialise(item: tuple[RenderedMessage, list[bytes]]) -> bytes:
        message, lines = item
        return message.to_bytes(lines)

    wire, t_mime = time_each(serialise, list(zip(messages, signatures, strict=True)))

    # A benchmark of a signer that signs wrongly would be meaningless: verify one.
    if not dkim.verify(wire[0], dnsfunc=lambda name, timeout=5: setup.dns.get(name)):
        raise BenchError("eobblast's DKIM signature did not verify with dkimpy")
    mean_size = round(sum(map(len, wire)) / len(wire))
    envelopes = [(m.mail_from, m.rcpt_to, data) for m, data in zip(messages, wire, strict=True)]
    return Built(
        envelopes,
        [
            stage_result("stage.validate", "validate (pydantic)", t_validate),
            stage_result("stage.render", "render (jinja2 text+html)", t_render),
            stage_result("stage.mime", "MIME serialisation", t_mime, mean_bytes=mean_size),
            stage_result("stage.dkim", "DKIM sign rsa-sha256 2048", t_sign, dkim_verified=True),
        ],
    )


async def _deliver_all(
    transport: Transport, envelopes: Sequence[tuple[str, str, bytes]], in_flight: int
) -> None:
    source = iter(envelopes)

    async def worker() -> None:
        # Workers share one iterator, as the runner does, so at most in_flight are open.
        for mail_from, rcpt_to, data in source:
            await transport.deliver(mail_from, rcpt_to, data)

    async with asyncio.TaskGroup() as group:
        for _ in range(in_flight):
            group.create_task(worker())


async def smtp_stage(
    config: Config, envelopes: Sequence[tuple[str, str, bytes]], rx: Receiver
) -> Result:
    """Deliver pre-built messages through eobblast's Transport at the pipeline's concurrency."""
    in_flight = config.pipeline.max_in_flight
    transport = Transport.from_config(config.transport)
    detail: dict[str, Any] = {
        "in_flight": in_flight,
        "connections": config.transport.max_connections_per_destination,
    }
    try:
        # Warm-up opens the pool's connections, so the timed part is steady-state sending.
        await _deliver_all(transport, envelopes[: in_flight * 2], in_flight)
        cpu = time.process_time()
        start = time.perf_counter()
        with cpu_of({"front": rx.front_pid, "sink": rx.sink_pid}, detail):
            await _deliver_all(transport, envelopes, in_flight)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
    finally:
        await transport.aclose()
    detail["cpu_us_per_msg"] = round(cpu / len(envelopes) * 1e6, 1)
    return Result("stage.smtp", "SMTP via Transport (wall)", len(envelopes), elapsed, detail)


# ---------------------------------------------------------------------------- end to end


async def eobblast_e2e(config: Config, events: list[bytes], rx: Receiver) -> Result:
    """Raw events through Pipeline.process via run_events, one process, uvloop."""
    transport = Transport.from_config(config.transport)
    pipeline = Pipeline(config, transport)
    outcomes: Counter[str] = Counter()
    tls: Counter[str] = Counter()

    def record(outcome: EventOutcome) -> None:
        outcomes[f"{outcome.outcome}/{outcome.reason}"] += 1
        tls[str(outcome.tls_version)] += 1

    detail: dict[str, Any] = {
        "in_flight": config.pipeline.max_in_flight,
        "connections": config.transport.max_connections_per_destination,
    }
    try:
        cpu = time.process_time()
        start = time.perf_counter()
        with cpu_of({"front": rx.front_pid, "sink": rx.sink_pid}, detail):
            await run_events(
                pipeline, events, max_in_flight=config.pipeline.max_in_flight, on_outcome=record
            )
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
    finally:
        await transport.aclose()
    delivered = outcomes.get("delivered/delivered", 0)
    if delivered != len(events):
        raise BenchError(f"eobblast delivered {delivered} of {len(events)}: {dict(outcomes)}")
    if set(tls) - {"TLSv1.2", "TLSv1.3"}:
        raise BenchError(f"messages delivered without TLS: {dict(tls)}")
    detail["cpu_us_per_msg"] = round(cpu / len(events) * 1e6, 1)
    detail["tls"] = sorted(tls)
    return Result("e2e.eobblast", "eobblast end to end", delivered, elapsed, detail)


# ---------------------------------------------------------------------------- naive baseline


_NAIVE_MONEY = ("billed", "allowed", "deductible", "copay", "coinsurance", "plan_paid")
_NAIVE_COLUMNS = (
    "Code",
    "Service",
    "Billed",
    "Allowed",
    "Deductible",
    "Copay",
    "Coinsurance",
    "Plan paid",
    "You may owe",
    "Remark codes",
)


_NAIVE_FOOTER = (
    "Please keep this notice for your records. Your provider may bill you "
    "for the amount shown under 'You may owe'."
)


def _naive_totals(lines: list[dict[str, Any]]) -> dict[str, Decimal]:
    return {
        k: sum((Decimal(ln[k]) for ln in lines), Decimal(0)) for k in (*_NAIVE_MONEY, "member_owes")
    }


def _naive_text(doc: dict[str, Any]) -> str:
    claim, member, payer = doc["claim"], doc["member"], doc["payer"]
    lines = "\n".join(
        f"{ln['code']}  {ln['description']}\n"
        f"    Billed: ${ln['billed']} | Allowed: ${ln['allowed']} | "
        f"Deductible: ${ln['deductible']} | Copay: ${ln['copay']} | "
        f"Coinsurance: ${ln['coinsurance']}\n"
        f"    Plan paid: ${ln['plan_paid']} | You may owe: ${ln['member_owes']}"
        f" | Remark codes: {', '.join(ln['remark_codes'])}"
        for ln in claim["lines"]
    )
    totals = _naive_totals(claim["lines"])
    acc = doc["accumulators"]
    return (
        f"Explanation of Benefits - {payer['name']}\nTHIS IS NOT A BILL\n\n"
        f"Dear {member['name']},\n\n{payer['name']} processed a claim for care you received. "
        "This notice explains what was billed, what your plan paid and what you may owe.\n\n"
        f"Patient: {claim['patient_name']}\nClaim number: {claim['id']}\n"
        f"Provider: {claim['provider']['name']} (NPI {claim['provider']['npi']})\n"
        f"Service dates: {claim['service_period']['start']} - {claim['service_period']['end']}\n"
        f"Processed on: {claim['processed_date']}\n\n{lines}\n\n"
        f"Totals: Billed ${totals['billed']} | Plan paid ${totals['plan_paid']} | "
        f"You may owe ${totals['member_owes']}\n\n"
        f"Deductible met: ${acc['deductible']['met']} of ${acc['deductible']['limit']}\n"
        f"Out-of-pocket met: ${acc['out_of_pocket']['met']} of "
        f"${acc['out_of_pocket']['limit']}\n\n"
        f"Your right to appeal: until {doc['appeal']['deadline']}.\n"
        f"{doc['appeal']['instructions']}\n\n"
        f"{_NAIVE_FOOTER}\n"
    )


def _naive_html(doc: dict[str, Any]) -> str:
    # Laid out like eobblast's HTML template (header table, service-line table, limits),
    # so both senders put messages of about the same size through DKIM and SMTP.
    e = html.escape
    claim, payer, acc = doc["claim"], doc["payer"], doc["accumulators"]
    cell = '<td align="right">'
    rows = "".join(
        f"<tr><td>{e(ln['code'])}</td><td>{e(ln['description'])}</td>"
        + "".join(f"{cell}${ln[k]}</td>" for k in (*_NAIVE_MONEY, "member_owes"))
        + f"<td>{e(', '.join(ln['remark_codes']))}</td></tr>\n"
        for ln in claim["lines"]
    )
    heads = "".join(f"<th>{h}</th>" for h in _NAIVE_COLUMNS)
    totals = _naive_totals(claim["lines"])
    total_row = (
        '<tr style="font-weight:bold"><td></td><td>Totals</td>'
        + "".join(f"{cell}${totals[k]}</td>" for k in (*_NAIVE_MONEY, "member_owes"))
        + "<td></td></tr>\n"
    )
    facts = "".join(
        f'<tr><th align="left">{k}</th><td>{e(v)}</td></tr>\n'
        for k, v in (
            ("Patient", claim["patient_name"]),
            ("Claim number", claim["id"]),
            ("Provider", f"{claim['provider']['name']} (NPI {claim['provider']['npi']})"),
            (
                "Service dates",
                f"{claim['service_period']['start']} - {claim['service_period']['end']}",
            ),
            ("Processed on", claim["processed_date"]),
        )
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8">'
        "<title>Explanation of Benefits</title></head>\n"
        '<body style="font-family:Arial,Helvetica,sans-serif;color:#222;max-width:760px">\n'
        f'<h1 style="font-size:20px">Explanation of Benefits &middot; {e(payer["name"])}</h1>\n'
        '<p style="font-weight:bold;font-size:18px;border:2px solid #222;padding:6px;'
        'text-align:center">THIS IS NOT A BILL</p>\n'
        f"<p>Dear {e(doc['member']['name'])},</p>\n"
        f"<p>{e(payer['name'])} processed a claim for care you received. This notice explains "
        "what was billed, what your plan paid and what you may owe.</p>\n"
        f'<table cellpadding="3">\n{facts}</table>\n'
        '<table border="1" cellpadding="4" cellspacing="0" '
        'style="border-collapse:collapse;margin-top:12px">\n'
        f"<tr>{heads}</tr>\n{rows}{total_row}</table>\n"
        '<h2 style="font-size:16px">Your progress this plan year</h2>\n<ul>\n'
        f"<li>Deductible met: ${acc['deductible']['met']} of ${acc['deductible']['limit']}</li>\n"
        f"<li>Out-of-pocket maximum met: ${acc['out_of_pocket']['met']} of "
        f"${acc['out_of_pocket']['limit']}</li>\n</ul>\n"
        '<h2 style="font-size:16px">Your right to appeal</h2>\n'
        f"<p>If you disagree with this decision, you may appeal until "
        f"{e(doc['appeal']['deadline'])}.</p>\n<p>{e(doc['appeal']['instructions'])}</p>\n"
        f'<p style="font-size:12px;color:#555">{_NAIVE_FOOTER}</p>\n'
        "</body>\n</html>\n"
    )


def naive_message(raw: bytes, now: dt.datetime) -> tuple[str, str, bytes]:
    """A multipart/alternative EOB built the textbook way with email.message."""
    doc = json.loads(raw)
    domain = doc["payer"]["sending_domain"]
    sender = f"eob-notices@{domain}"
    msg = EmailMessage()
    msg["From"] = formataddr((doc["payer"]["name"], sender))
    msg["To"] = doc["member"]["email"]
    msg["Subject"] = "Your Explanation of Benefits is ready"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = f"<eob.{doc['event_id']}@{domain}>"
    msg.set_content(_naive_text(doc), cte="quoted-printable")
    msg.add_alternative(_naive_html(doc), subtype="html", cte="quoted-printable")
    return sender, doc["member"]["email"], msg.as_bytes(policy=email.policy.SMTP)


def naive_baseline(setup: Setup, count: int, rx: Receiver) -> Result:
    """Sequential smtplib + email + dkim.sign (pure-Python RSA), one STARTTLS connection."""
    pems = {
        domain: (setup.key_dir / f"{domain}.{SELECTOR}.rsa.pem").read_bytes()
        for _, _, domain in PAYERS
    }
    context = ssl.create_default_context(cafile=str(setup.pki.ca))
    clock = time.perf_counter
    spent = {"build": 0.0, "sign": 0.0, "send": 0.0}
    sizes = 0

    def sign(data: bytes, domain: str) -> bytes:
        return bytes(
            dkim.sign(
                data,
                SELECTOR.encode(),
                domain.encode(),
                pems[domain],
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=NAIVE_SIGN_HEADERS,
            )
        )

    def send(smtp: smtplib.SMTP, raw: bytes) -> None:
        nonlocal sizes
        t0 = clock()
        sender, rcpt, data = naive_message(raw, dt.datetime.now(dt.UTC))
        t1 = clock()
        signature = sign(data, sender.rpartition("@")[2])
        t2 = clock()
        if smtp.sendmail(sender, [rcpt], signature + data):
            raise BenchError("naive baseline: recipient refused")
        spent["build"] += t1 - t0
        spent["sign"] += t2 - t1
        spent["send"] += clock() - t2
        sizes += len(signature) + len(data)

    # The baseline's signatures must verify too, or the comparison would flatter it.
    sender, _, sample = naive_message(setup.events[0], dt.datetime.now(dt.UTC))
    signed = sign(sample, sender.rpartition("@")[2]) + sample
    if not dkim.verify(signed, dnsfunc=lambda name, timeout=5: setup.dns.get(name)):
        raise BenchError("the naive baseline's DKIM signature did not verify with dkimpy")

    detail: dict[str, Any] = {}
    raws = setup.events[NAIVE_WARMUP : NAIVE_WARMUP + count]
    with smtplib.SMTP("127.0.0.1", rx.port, local_hostname="naive.bench.test", timeout=30) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo()
        tls_version = smtp.sock.version() if isinstance(smtp.sock, ssl.SSLSocket) else None
        if tls_version is None:
            raise BenchError("naive baseline: no TLS session")
        for raw in setup.events[:NAIVE_WARMUP]:
            send(smtp, raw)
        spent.update(dict.fromkeys(spent, 0.0))
        sizes = 0
        start = clock()
        with cpu_of({"front": rx.front_pid, "sink": rx.sink_pid}, detail):
            for raw in raws:
                send(smtp, raw)
        elapsed = clock() - start
    sent = len(raws)
    detail.update({f"{k}_us_per_msg": round(v / sent * 1e6, 1) for k, v in spent.items()})
    detail.update({"mean_bytes": round(sizes / sent), "tls": [tls_version], "dkim_verified": True})
    return Result("e2e.naive", "naive: email+dkimpy+smtplib", sent, elapsed, detail)


# ---------------------------------------------------------------------------- report


def summarise(results: list[Result]) -> dict[str, Any]:
    """The stage total and the eobblast/naive ratio, as one JSON object."""
    by_name = {r.name: r for r in results}
    cpu_stages_us = sum(
        by_name[n].us_per_msg
        for n in ("stage.validate", "stage.render", "stage.mime", "stage.dkim")
    )
    smtp_cpu = by_name["stage.smtp"].detail["cpu_us_per_msg"]
    ours, naive = by_name["e2e.eobblast"].msgs_per_s, by_name["e2e.naive"].msgs_per_s
    ratio = ours / naive if naive else 0.0
    return {
        "name": "summary",
        "stages_cpu_us_per_msg": round(cpu_stages_us + smtp_cpu, 1),
        "stages_ceiling_msgs_per_s": round(1e6 / (cpu_stages_us + smtp_cpu), 1),
        "eobblast_msgs_per_s": round(ours, 1),
        "naive_msgs_per_s": round(naive, 1),
        "ratio": round(ratio, 2),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }


def print_table(results: list[Result], summary: dict[str, Any]) -> None:
    """The human-readable table."""
    table = Table(title="eobblast core benchmark (one process, uvloop, smtp-sink via STARTTLS)")
    table.add_column("benchmark")
    table.add_column("messages", justify="right")
    table.add_column("us/msg", justify="right")
    table.add_column("msgs/s", justify="right")
    table.add_column("notes")
    for r in results:
        d = r.detail
        notes: list[str] = []
        if "p99_us" in d:
            notes.append(f"p50 {d['p50_us']:.0f} us, p99 {d['p99_us']:.0f} us")
        if "cpu_us_per_msg" in d:
            notes.append(f"eobblast CPU {d['cpu_us_per_msg']:.0f} us/msg")
        if "in_flight" in d:
            notes.append(f"{d['in_flight']} in flight, {d['connections']} conns")
        if "front_cpu_pct" in d:
            notes.append(f"front/sink CPU {d['front_cpu_pct']:.0f}/{d.get('sink_cpu_pct', 0):.0f}%")
        if "sign_us_per_msg" in d:
            notes.append(
                f"build {d['build_us_per_msg']:.0f} / sign {d['sign_us_per_msg']:.0f} / "
                f"send {d['send_us_per_msg']:.0f} us"
            )
        if "mean_bytes" in d:
            notes.append(f"{d['mean_bytes']} B/msg")
        table.add_row(
            r.label,
            str(r.messages),
            f"{r.us_per_msg:,.1f}",
            f"{r.msgs_per_s:,.0f}",
            "; ".join(notes),
        )
    table.add_section()
    table.add_row(
        "stages summed (CPU, SMTP client CPU)",
        "",
        f"{summary['stages_cpu_us_per_msg']:,.1f}",
        f"{summary['stages_ceiling_msgs_per_s']:,.0f}",
        "ceiling for one process if nothing else cost anything",
    )
    verdict = "meets" if summary["meets_target"] else "BELOW"
    table.add_row(
        "ratio eobblast / naive",
        "",
        "",
        f"{summary['ratio']:.1f}x",
        f"target >= {TARGET_RATIO:.0f}x: {verdict}",
    )
    # Under `make` stdout is a pipe and rich would assume 80 columns: the notes need more.
    Console(width=None if sys.stdout.isatty() else 140).print(table)


# ---------------------------------------------------------------------------- main


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so the finally blocks stop smtp-sink and the front.
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="eobblast end-to-end")
    parser.add_argument("--naive-messages", type=int, default=300, help="naive baseline")
    parser.add_argument("--stage-messages", type=int, default=2000, help="per-stage runs")
    parser.add_argument("--in-flight", type=int, default=64, help="pipeline.max_in_flight")
    parser.add_argument(
        "--connections", type=int, default=16, help="max_connections_per_destination"
    )
    parser.add_argument("--json-only", action="store_true", help="no table, no progress")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="afterwards, run the end-to-end phase again under cProfile and save the stats",
    )
    args = parser.parse_args(argv)
    for name in ("messages", "naive_messages", "stage_messages", "in_flight", "connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    # Percentiles need a few samples.
    args.stage_messages = max(args.stage_messages, 2)
    return args


def run(args: argparse.Namespace) -> None:
    """Every phase, in order, against one receiver."""
    quiet = args.json_only

    def progress(text: str) -> None:
        if not quiet:
            print(f"... {text}", file=sys.stderr, flush=True)

    find_smtp_sink()  # fail before minutes of set-up if the receiver cannot exist
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="eobblast-bench-") as tmp:
        workdir = Path(tmp)
        count = max(args.messages, args.stage_messages, args.naive_messages + NAIVE_WARMUP)
        progress(f"generating keys, test PKI and {count} synthetic events")
        setup = prepare(workdir, count)
        # Faker's locale tables and the set-up's objects would otherwise be rescanned by
        # every full collection during the timed phases; a production worker has none.
        gc.collect()
        gc.freeze()
        progress(f"CPU stages on {args.stage_messages} messages")
        built = cpu_stages(setup, args.stage_messages)
        results += built.results
        with receiver(setup.pki, workdir) as rx:
            config = eobblast_config(setup, rx.port, args.in_flight, args.connections)
            progress("SMTP stage through eobblast's Transport")
            results.append(uvloop.run(smtp_stage(config, built.envelopes, rx)))
            progress(f"eobblast end to end on {args.messages} events")
            results.append(uvloop.run(eobblast_e2e(config, setup.events[: args.messages], rx)))
            progress(f"naive baseline on {args.naive_messages} events")
            results.append(naive_baseline(setup, args.naive_messages, rx))
            if args.profile is not None:
                progress(f"profiling end to end into {args.profile}")
                profiler = cProfile.Profile()
                profiler.enable()
                try:
                    uvloop.run(eobblast_e2e(config, setup.events[: args.messages], rx))
                finally:
                    profiler.disable()
                profiler.dump_stats(args.profile)
    summary = summarise(results)
    for result in results:
        print(orjson.dumps(result.as_json()).decode())
    print(orjson.dumps(summary).decode(), flush=True)
    if not quiet:
        print_table(results, summary)


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 1 when the benchmark could not run or was invalid."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run(args)
    except BenchError as exc:
        print(f"bench_core: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
