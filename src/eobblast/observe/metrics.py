"""Prometheus metrics. Labels are outcomes, reasons, stages and states: bounded, no PHI."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    start_http_server,
)

from eobblast.errors import INPUT_REASONS, Outcome

# The one piece of module-level mutable state allowed: the metrics registry.
REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS = Counter(
    "eobblast_events",
    "EOB events by final outcome and reason code.",
    ["outcome", "reason"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "eobblast_stage_seconds",
    "Time spent per pipeline stage for one event.",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
    registry=REGISTRY,
)
SMTP_CONNECTIONS = Gauge(
    "eobblast_smtp_connections",
    "SMTP connections currently held by the pool, by state.",
    ["state"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
SMTP_CONNECTS = Counter(
    "eobblast_smtp_connects",
    "SMTP connection attempts by result.",
    ["result"],
    registry=REGISTRY,
)
SMTP_HANDOVERS = Counter(
    "eobblast_smtp_handovers",
    "Messages whose MAIL, RCPT and DATA went out with the previous message's content on"
    " the same connection (RFC 2920 section 3.1): one round trip per message, not two.",
    registry=REGISTRY,
)
SMTP_POOL_WAITS = Counter(
    "eobblast_smtp_pool_waits",
    "Times a message waited for an SMTP connection: its destination or connection group"
    " was at its limit, every connection busy.",
    registry=REGISTRY,
)
SMTP_REPLIES = Counter(
    "eobblast_smtp_replies",
    "Final SMTP replies to message transactions, by reply class (2xx, 4xx, 5xx).",
    ["reply_class"],
    registry=REGISTRY,
)

MTA_STS_LOOKUPS = Counter(
    "eobblast_mta_sts_lookups",
    "MTA-STS policy lookups of MX-routed domains by result: fetched, unchanged (the TXT id"
    " matched the cached policy's), no_record, or why no policy was fetched.",
    ["result"],
    registry=REGISTRY,
)
MTA_STS_STORE_ERRORS = Counter(
    "eobblast_mta_sts_store_errors",
    "Failed reads (load), writes (save) and purges of the MTA-STS policy table beside the"
    " ledger; the lookup goes on with what this worker holds in memory.",
    ["operation"],
    registry=REGISTRY,
)
MTA_STS_DELIVERIES = Counter(
    "eobblast_mta_sts_deliveries",
    "Delivery attempts (EOBs and portal notices) to MX-routed domains by the MTA-STS mode"
    " in force (absent: no policy known).",
    ["mode"],
    registry=REGISTRY,
)
MTA_STS_MX_MISMATCHES = Counter(
    "eobblast_mta_sts_mx_mismatches",
    "MX hosts that the domain's MTA-STS policy does not list: skipped under enforce,"
    " still used under testing.",
    ["mode"],
    registry=REGISTRY,
)

OLDEST_IN_FLIGHT = Gauge(
    "eobblast_oldest_in_flight_seconds",
    "Age of the oldest event a worker has in flight (0 when none).",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
CLOCK_SKEW = Gauge(
    "eobblast_clock_skew_seconds",
    "How far a worker's clock is from its PostgreSQL ledger server's, either way (largest"
    " of the workers).",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
STUCK = Counter(
    "eobblast_events_stuck",
    "Events reported in flight longer than [workers] stuck_after, by the stage they were in.",
    ["stage"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "eobblast_events_in_flight",
    "Events handed to a worker and not yet accounted for.",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
# One series per live worker (a `pid` label): a worker just spawned reads 0 until it sets
# it, and a minimum over the processes would hide the others' age for that moment.
KAFKA_ANSWERED = Gauge(
    "eobblast_kafka_answered_timestamp_seconds",
    "When the brokers last answered a worker (Unix time; it asks every 15 s), or the"
    " worker's start until they first do.",
    multiprocess_mode="liveall",
    registry=REGISTRY,
)
BACKLOG = Gauge(
    "eobblast_backlog_events",
    "Input events the workers have not accounted for yet: on the broker past what they took"
    " (up to each partition's high watermark), plus those in flight.",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
RESENDS = Counter(
    "eobblast_resends",
    "Events sent again because the worker that was sending them died (bounded by in-flight).",
    registry=REGISTRY,
)
DUPLICATES = Counter(
    "eobblast_duplicates_skipped",
    "Redelivered or republished events that the send ledger stopped from being sent twice.",
    registry=REGISTRY,
)
RECORDS_GIVEN_UP = Counter(
    "eobblast_records_given_up",
    "Records a worker gave up after failing the same way in eobblast itself again and"
    " again (a bug, not an outage), so their partitions could move on.",
    registry=REGISTRY,
)
AUDIT_GAPS = Counter(
    "eobblast_audit_write_failures",
    "Audit records that could not be written: of delivered or held notices, releases,"
    " paper fallbacks and incidents (what they record stands), of pickup attempts at"
    " the portal (the member's answer stands), and of portal links revoked.",
    registry=REGISTRY,
)
CLAIM_WAITS = Counter(
    "eobblast_ledger_claim_waits",
    "Claims that found the event in flight under another live worker (waited for, then "
    "claimed again, never sent a second time meanwhile).",
    registry=REGISTRY,
)
LEDGER_MARK_FAILURES = Counter(
    "eobblast_ledger_mark_failures",
    "Times the ledger could not record acknowledged statuses (kept for the next commit; "
    "the offsets are committed all the same).",
    registry=REGISTRY,
)
LEDGER_PURGED = Counter(
    "eobblast_ledger_purged",
    "Events the send ledger forgot: settled longer ago than [ledger] retention_days, their"
    " status published (a copy arriving later is sent again).",
    registry=REGISTRY,
)
LEDGER_FINISH_RETRIES = Counter(
    "eobblast_ledger_finish_retries",
    "Times a sent event's outcome could not be written to the send ledger yet (tried again "
    "until it is, never by sending again; its status waits).",
    registry=REGISTRY,
)
DELIVERY_RECORD_RETRIES = Counter(
    "eobblast_delivery_record_retries",
    "Times a delivery's outcome (delivered, refused, or postponed by shaping) could not be "
    "recorded in the bounce store yet (tried again until it is; its status waits).",
    registry=REGISTRY,
)

STAGES = ("validate", "render", "sign", "deliver", "total")
# Cached children: `.labels()` costs more than the observation itself.
STAGE = {stage: STAGE_SECONDS.labels(stage) for stage in STAGES}
CONNECTIONS_IDLE = SMTP_CONNECTIONS.labels("idle")
CONNECTIONS_ACTIVE = SMTP_CONNECTIONS.labels("active")


VERIFICATION_RESULTS_REFUSED = Counter(
    "eobblast_verification_results_refused",
    "Address-verification results that could not be read (not JSON, a schema eobblast does"
    " not know, a field missing...), parked on the dead-letter topic, by reason code: the"
    " member's held notices wait for an answer that will not come.",
    ["reason"],
    registry=REGISTRY,
)


def show_rejections_from_zero() -> None:
    """Export every dead-letter reason's count from 0, before the first rejection.

    A labelled series appears only when it is first counted, and Prometheus's increase()
    needs a sample before the change: the first events (or verification results) rejected
    for a reason after a worker starts (often the only ones) would never reach an alert on
    them.
    """
    for reason in INPUT_REASONS:
        EVENTS.labels(Outcome.REJECTED, reason)
        VERIFICATION_RESULTS_REFUSED.labels(reason)


DEAD_LETTERS_CUT = Counter(
    "eobblast_dead_letters_cut",
    "Dead letters the DLQ topic refused whole (a record too large for it, or a policy) and"
    " that were parked without the original's bytes: its size, SHA-256 and source position"
    " still name it on the input topic.",
    registry=REGISTRY,
)

OFFSET_REREADS = Counter(
    "eobblast_offset_rereads",
    "Holes in a partition's fetched offsets read again before being believed (transaction"
    " markers, compaction, or a broker that served a batch out of order).",
    registry=REGISTRY,
)


def serve_metrics(port: int, address: str = "127.0.0.1") -> int:
    """Serve /metrics over HTTP; returns the port actually bound."""
    server, _thread = start_http_server(port, addr=address, registry=REGISTRY)
    return int(server.server_port)


class SupervisorMetrics:
    """The `eobblast run` supervisor's own metrics, served beside the workers' sums.

    Kept in memory in the supervisor's own registry: the supervisor imports the client
    before the multiprocess directory exists, and a counter the workers also defined would
    appear twice.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.worker_restarts = Counter(
            "eobblast_worker_restarts",
            "Worker processes restarted by the supervisor after they died.",
            registry=self.registry,
        )


def serve_multiprocess_metrics(
    port: int,
    address: str,
    directory: str,
    supervisor: SupervisorMetrics | None = None,
    health: Callable[[], tuple[bool, dict[str, object]]] | None = None,
) -> int:
    """Serve the summed metrics of every worker process (prometheus multiprocess mode),
    and the supervisor's own; with `health`, also GET /healthz: 200 when it says ok, else
    503, with its JSON body either way."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    if supervisor is not None:
        registry.register(supervisor.registry)
    if health is None:
        server, _thread = start_http_server(port, addr=address, registry=registry)
        return int(server.server_port)
    return _serve(port, address, _with_health(make_wsgi_app(registry), health))


def _with_health(
    metrics_app: Callable[..., Iterable[bytes]],
    health: Callable[[], tuple[bool, dict[str, object]]],
) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "").rstrip("/")
        if path in ("", "/metrics", "/favicon.ico"):
            return metrics_app(environ, start_response)
        if path != "/healthz":
            # Not the metrics text: a probe pointed at a wrong path must not read as healthy.
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"/metrics or /healthz\n"]
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        ok, body = health()
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
        )
        return [] if method == "HEAD" else [orjson.dumps(body) + b"\n"]

    return app


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log: probes every few seconds would drown the service's own lines."""


def _serve(port: int, address: str, app: Callable[..., Iterable[bytes]]) -> int:
    """Serve a WSGI app from daemon threads, as prometheus_client serves its own; returns
    the port bound."""
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = family

    server = make_server(address, port, app, Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return int(server.server_port)
