"""A worker's memory under a large backlog: RSS sampled while it works through 1M events.

The embedded broker (Tansu, in memory) is loaded with a backlog of valid, deliverable
events on eob.events: a few thousand distinct synthetic events (one service line each, to
keep the broker's memory and the publish time down) republished with fresh event ids.
Then ONE worker process (`eobblast run --workers 1`) consumes for a fixed time, sending
to Postfix's `smtp-sink` behind the STARTTLS front with DKIM rsa-sha256 2048 on, while
its resident set (/proc/<pid>/status VmRSS) is sampled every second. If the worker only
ever holds `max_in_flight` events plus one fetch, the RSS stays flat however large the
backlog: the slope of a least-squares line through the samples after a warm-up is the
figure to watch (the RSS climbs in steps for the first minute or two, then holds).

Tansu keeps everything in memory (1M events of ~1.1 KB took ~1.2 GB of broker RSS): the
backlog is scaled down, with a message, when less than --min-available-gb of memory is
available, and publishing stops early if the machine runs short while it loads.

The worker is started the way an operator starts it, `eobblast run --config FILE` (a
subprocess with its own supervisor), so its memory holds what a production worker's holds
and nothing this script imported.

Prints JSON lines on stdout (the result, then the samples), then a table and a sparkline
(unless --json-only). Progress goes to stderr. Nothing derived from message content is
printed: counts, sizes and times only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvloop
from rich.console import Console
from rich.table import Table

# bench_core and common are sibling scripts: Python puts a script's own directory first on
# sys.path, which is how these imports (and spawned worker processes) find them.
from bench_core import BenchError, Setup, _on_sigterm, eobblast_config, prepare
from common import (
    TLS_VERSIONS,
    CountingReceiver,
    RunTopics,
    StatusCollector,
    committed_total,
    counting_receiver,
    eobblast_run,
    kafka_config,
    mem_available_bytes,
    proc_status_kib,
    publish,
    write_run_config,
)
from eobblast.config import PipelineConfig
from eobblast.demo import member_key
from eobblast.streams import EmbeddedBroker

GIB = 1024**3
# Publishing stops early below this much available memory: the broker must not take the
# machine (and the other people's work on it) down.
PUBLISH_FLOOR_BYTES = 1 * GIB
MEMORY_CHECK_EVERY = 20_000
ID_PLACEHOLDER = "bench-event-id-placeholder"
SPARK = "▁▂▃▄▅▆▇█"


# ---------------------------------------------------------------------------- backlog


@dataclass(frozen=True, slots=True)
class Template:
    """One distinct event, split around its event id so fresh copies cost a concatenation."""

    key: bytes
    head: bytes
    tail: bytes


def make_templates(events: list[bytes]) -> list[Template]:
    """Shrink each event to one service line and cut it around a placeholder event id."""
    templates = []
    for raw in events:
        doc = orjson.loads(raw)
        # One line is a valid EOB and keeps a million of them small in the broker.
        doc["claim"]["lines"] = doc["claim"]["lines"][:1]
        doc["event_id"] = ID_PLACEHOLDER
        head, _, tail = orjson.dumps(doc).partition(ID_PLACEHOLDER.encode())
        templates.append(Template(member_key(raw), head, tail))
    return templates


@dataclass(slots=True)
class Backlog:
    """The (key, value) records to publish; stops early if memory runs short."""

    templates: list[Template]
    count: int
    run_id: str
    produced: int = 0
    truncated: bool = False
    value_bytes: int = 0

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        templates, run_id = self.templates, self.run_id
        for index in range(self.count):
            if index % MEMORY_CHECK_EVERY == 0 and index:
                available = mem_available_bytes()
                if available is not None and available < PUBLISH_FLOOR_BYTES:
                    self.truncated = True
                    return
            template = templates[index % len(templates)]
            # Fresh ids: the ledger would (rightly) skip a repeated event id.
            value = template.head + f"{run_id}-{index:08d}".encode() + template.tail
            self.produced += 1
            self.value_bytes += len(value)
            yield template.key, value


def plan_backlog(requested: int, min_available_gb: float) -> tuple[int, str | None]:
    """The backlog size to use, and why it was scaled down (None if it was not)."""
    available = mem_available_bytes()
    if available is None:
        return requested, None
    wanted = min_available_gb * GIB
    if available >= wanted:
        return requested, None
    scaled = max(10_000, int(requested * available / wanted))
    return scaled, (
        f"only {available / GIB:.1f} GB of memory available (want {min_available_gb:.0f} GB "
        f"for {requested:,} events in the in-memory broker): backlog scaled down to {scaled:,}"
    )


# ---------------------------------------------------------------------------- sampling


@dataclass(frozen=True, slots=True)
class Sample:
    """One observation during the run."""

    seconds: float  # since the worker was started
    worker_rss_kib: int
    broker_rss_kib: int
    processed: int  # events with a final status


def slope_mb_per_min(samples: list[Sample]) -> float:
    """Least-squares slope of the worker's RSS over time, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    xs = [s.seconds / 60 for s in samples]
    ys = [s.worker_rss_kib / 1024 for s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def sparkline(values: list[float], width: int = 60) -> str:
    """The values as one line of block characters (bucketed to `width`)."""
    if not values:
        return ""
    step = max(1, -(-len(values) // width))
    buckets = [max(values[i : i + step]) for i in range(0, len(values), step)]
    low, high = min(buckets), max(buckets)
    span = high - low or 1.0
    return "".join(SPARK[int((v - low) / span * (len(SPARK) - 1))] for v in buckets)


async def sample_run(
    config_file: Path,
    broker: EmbeddedBroker,
    collector: StatusCollector,
    args: argparse.Namespace,
    progress: Callable[[str], None],
    workdir: Path,
) -> tuple[list[Sample], int, float, int]:
    """Run one worker; sample until `args.seconds` after its first status.

    Returns (samples, index of the first sample with a status, seconds from `eobblast run`
    to the first status, the worker's peak RSS in KiB as the kernel recorded it).
    """
    samples: list[Sample] = []
    first: int | None = None
    first_status_s = 0.0
    peak = 0
    t0 = time.perf_counter()
    async with eobblast_run(config_file, 1, workdir, args.log_level) as run:
        (pid,) = await run.wait_for_workers(1)
        end: float | None = None
        next_sample = time.perf_counter()
        while end is None or time.perf_counter() < end:
            now = time.perf_counter()
            if now >= next_sample:
                if run.exited():
                    raise BenchError("eobblast run exited early")
                if run.workers() != [pid]:
                    raise BenchError("the worker died and was restarted: not one run's memory")
                rss = proc_status_kib(pid) or 0
                peak = max(peak, proc_status_kib(pid, "VmHWM") or 0)
                samples.append(
                    Sample(now - t0, rss, proc_status_kib(broker.pid or 0) or 0, collector.total)
                )
                if first is None and collector.total:
                    first, first_status_s = len(samples) - 1, now - t0
                    end = now + args.seconds
                    progress(
                        f"first status after {first_status_s:.1f} s; sampling {args.seconds:.0f} s"
                    )
                elif first is None and now - t0 > args.start_timeout:
                    raise BenchError(f"no status within {args.start_timeout:.0f} s")
                next_sample += args.interval
            wait_ms = max(1, int((next_sample - time.perf_counter()) * 1000))
            await collector.poll(timeout_ms=min(wait_ms, 200))
    assert first is not None
    return samples, first, first_status_s, peak


# ---------------------------------------------------------------------------- run


async def run_memory(
    setup: Setup, rx: CountingReceiver, args: argparse.Namespace, progress: Callable[[str], None]
) -> tuple[dict[str, Any], list[Sample]]:
    """Load the backlog, run one worker against it, and summarise its memory."""
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    assert current is not None
    # SIGTERM cancels the run, so the finally blocks stop the worker and the broker.
    loop.add_signal_handler(signal.SIGTERM, current.cancel)
    try:
        async with EmbeddedBroker(log_dir=setup.workdir) as broker:
            return await _run_on(broker, setup, rx, args, progress)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _run_on(
    broker: EmbeddedBroker,
    setup: Setup,
    rx: CountingReceiver,
    args: argparse.Namespace,
    progress: Callable[[str], None],
) -> tuple[dict[str, Any], list[Sample]]:
    topics = RunTopics(f"mem-{uuid.uuid4().hex[:8]}")
    await topics.create(broker, args.partitions)
    backlog = Backlog(make_templates(setup.events), args.events, uuid.uuid4().hex[:8])
    progress(f"publishing {args.events:,} events ({len(backlog.templates)} distinct)")
    started = time.perf_counter()
    await publish(
        broker.bootstrap,
        topics.events,
        backlog,
        on_progress=lambda n: progress(f"  {n:,} published") if n % 100_000 == 0 else None,
    )
    publish_seconds = time.perf_counter() - started
    if backlog.truncated:
        progress(f"memory ran short: publishing stopped at {backlog.produced:,} events")
    broker_rss_loaded = proc_status_kib(broker.pid or 0) or 0
    progress(f"published in {publish_seconds:.1f} s; broker RSS {broker_rss_loaded / 1024:.0f} MB")

    base = eobblast_config(setup, rx.rx.port, args.in_flight, args.connections)
    config = kafka_config(base, broker.bootstrap, topics, setup.workdir / "ledger.db", 1)
    config_file = write_run_config(config, setup.workdir / "eobblast.toml")
    collector = StatusCollector(broker.bootstrap, topics.delivery)
    await collector.start()
    sink_before = rx.messages()
    try:
        samples, first, first_status_s, peak = await sample_run(
            config_file, broker, collector, args, progress, setup.workdir
        )
        # Statuses of the events the worker finished while draining.
        await collector.drain()
    finally:
        await collector.stop()
    sink_accepted = rx.messages() - sink_before
    committed = await committed_total(broker.bootstrap, topics.group, topics.events)

    delivered = collector.by_status.get("delivered", 0)
    if delivered != collector.total:
        raise BenchError(f"not every processed event was delivered: {dict(collector.by_status)}")
    if set(collector.by_tls) - TLS_VERSIONS:
        raise BenchError(f"messages delivered without TLS: {dict(collector.by_tls)}")
    if collector.total != committed:
        raise BenchError(f"{committed} offsets committed but {collector.total} statuses read")
    if sink_accepted < collector.total:
        raise BenchError(f"smtp-sink accepted {sink_accepted} for {collector.total} statuses")

    working = samples[first:]
    # Samples after the warm-up (allocator arenas, caches and connections fill up in the
    # first minute or so); the second half if the run was too short to have any.
    settled = [s for s in working if s.seconds - working[0].seconds >= args.warmup]
    if len(settled) < 2:
        settled = working[len(working) // 2 :]
    window = working[-1].seconds - working[0].seconds
    processed_in_window = working[-1].processed - working[0].processed
    rss = [s.worker_rss_kib / 1024 for s in working]
    result = {
        "name": "memory.worker",
        "backlog_requested": args.events,
        "backlog_published": backlog.produced,
        "backlog_truncated": backlog.truncated,
        "mean_event_bytes": round(backlog.value_bytes / max(1, backlog.produced)),
        "distinct_events": len(backlog.templates),
        "publish_seconds": round(publish_seconds, 1),
        "publish_per_s": round(backlog.produced / publish_seconds),
        "partitions": args.partitions,
        "in_flight": args.in_flight,
        "connections": args.connections,
        "first_status_s": round(first_status_s, 2),
        "sampled_seconds": round(window, 1),
        "samples": len(working),
        "processed": collector.total,
        "processed_in_window_per_s": round(processed_in_window / window, 1) if window else 0.0,
        "delivered": delivered,
        "sink_accepted": sink_accepted,
        "committed": committed,
        "backlog_remaining": backlog.produced - committed,
        "rss_start_mb": round(rss[0], 1),
        "rss_end_mb": round(rss[-1], 1),
        "rss_max_mb": round(max(rss), 1),
        "rss_peak_vmhwm_mb": round(peak / 1024, 1),
        "slope_mb_per_min": round(slope_mb_per_min(working), 3),
        "warmup_s": args.warmup,
        "rss_settled_min_mb": round(min(s.worker_rss_kib for s in settled) / 1024, 1),
        "rss_settled_max_mb": round(max(s.worker_rss_kib for s in settled) / 1024, 1),
        "slope_settled_mb_per_min": round(slope_mb_per_min(settled), 3),
        "broker_rss_mb_loaded": round(broker_rss_loaded / 1024),
        "broker_rss_mb_end": round(samples[-1].broker_rss_kib / 1024),
    }
    return result, working


# ---------------------------------------------------------------------------- report


def print_report(result: dict[str, Any], samples: list[Sample]) -> None:
    """A small table, the RSS sparkline and a sample every ten seconds."""
    r = result
    table = Table(title="one eobblast worker's memory under a Kafka backlog (Tansu, smtp-sink)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("backlog published", f"{r['backlog_published']:,} events"),
        ("publish time", f"{r['publish_seconds']:.1f} s ({r['publish_per_s']:,}/s)"),
        (
            "broker RSS loaded / end",
            f"{r['broker_rss_mb_loaded']:,} / {r['broker_rss_mb_end']:,} MB",
        ),
        ("first status after", f"{r['first_status_s']:.1f} s"),
        ("sampled", f"{r['sampled_seconds']:.0f} s, {r['samples']} samples"),
        ("processed (final statuses)", f"{r['processed']:,} ({r['processed_in_window_per_s']}/s)"),
        ("backlog remaining", f"{r['backlog_remaining']:,}"),
        ("worker RSS at first status", f"{r['rss_start_mb']:.1f} MB"),
        ("worker RSS max / end", f"{r['rss_max_mb']:.1f} / {r['rss_end_mb']:.1f} MB"),
        ("worker peak (VmHWM)", f"{r['rss_peak_vmhwm_mb']:.1f} MB"),
        ("RSS slope, whole run", f"{r['slope_mb_per_min']:+.3f} MB/min"),
        (
            f"worker RSS after {r['warmup_s']:.0f} s warm-up",
            f"{r['rss_settled_min_mb']:.1f}..{r['rss_settled_max_mb']:.1f} MB",
        ),
        ("RSS slope after warm-up", f"{r['slope_settled_mb_per_min']:+.3f} MB/min"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    rss = [s.worker_rss_kib / 1024 for s in samples]
    console.print(f"worker RSS {min(rss):.1f}..{max(rss):.1f} MB  {sparkline(rss)}")
    for s in samples[:: max(1, len(samples) // 12)]:
        console.print(
            f"  t={s.seconds:6.1f} s  rss={s.worker_rss_kib / 1024:7.1f} MB  "
            f"processed={s.processed:>8,}  broker={s.broker_rss_kib / 1024:8.0f} MB"
        )


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="backlog size")
    parser.add_argument("--distinct", type=int, default=3000, help="distinct events to repeat")
    # Five minutes: the RSS climbs in steps for a minute or two (allocator arenas, caches,
    # connections) before it settles; a shorter run mistakes that for a trend.
    parser.add_argument("--seconds", type=float, default=300.0, help="sampling after 1st status")
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds left out of the settled slope"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--partitions", type=int, default=8, help="eob.events partitions")
    parser.add_argument(
        "--in-flight",
        type=int,
        # The bound under test: what `eobblast run` holds unless told otherwise.
        default=PipelineConfig().max_in_flight,
        help="pipeline.max_in_flight (default: eobblast's own, %(default)s)",
    )
    parser.add_argument(
        "--connections", type=int, default=16, help="max_connections_per_destination"
    )
    parser.add_argument(
        "--min-available-gb",
        type=float,
        default=8.0,
        help="below this much available memory, the backlog is scaled down",
    )
    parser.add_argument(
        "--start-timeout", type=float, default=60.0, help="seconds to wait for a first status"
    )
    parser.add_argument("--log-level", default="WARNING", help="the worker's log level")
    parser.add_argument("--json-only", action="store_true", help="no table, no progress")
    args = parser.parse_args(argv)
    for name in ("events", "distinct", "partitions", "in_flight", "connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seconds <= 0 or args.interval <= 0 or args.warmup < 0:
        parser.error("--seconds and --interval must be positive, --warmup not negative")
    return args


def run(args: argparse.Namespace) -> None:
    """Set up, load, run, report."""
    quiet = args.json_only

    def progress(text: str) -> None:
        if not quiet:
            print(f"... {text}", file=sys.stderr, flush=True)

    args.events, why = plan_backlog(args.events, args.min_available_gb)
    if why is not None:
        # Said even with --json-only: a smaller backlog changes what the figures mean.
        print(f"bench_memory: {why}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="eobblast-bench-memory-") as tmp:
        workdir = Path(tmp)
        distinct = min(args.distinct, args.events)
        progress(f"generating keys, test PKI and {distinct} distinct synthetic events")
        setup = prepare(workdir, distinct)
        with counting_receiver(setup.pki, workdir) as rx:
            result, samples = uvloop.run(run_memory(setup, rx, args, progress))
            # The loop is closed and its SIGTERM handler gone: back to ours.
            signal.signal(signal.SIGTERM, _on_sigterm)
    print(orjson.dumps(result).decode())
    print(
        orjson.dumps(
            {
                "name": "memory.samples",
                "seconds": [round(s.seconds, 2) for s in samples],
                "worker_rss_mb": [round(s.worker_rss_kib / 1024, 2) for s in samples],
                "processed": [s.processed for s in samples],
                "broker_rss_mb": [round(s.broker_rss_kib / 1024) for s in samples],
            }
        ).decode(),
        flush=True,
    )
    if not quiet:
        print_report(result, samples)


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 1 when the benchmark could not run or was invalid."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run(args)
    except BenchError as exc:
        print(f"bench_memory: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        # Ctrl-C, or SIGTERM (which cancels the run): the finally blocks have stopped
        # everything this script started by the time we get here.
        print("bench_memory: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
