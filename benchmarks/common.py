"""Helpers shared by the Kafka benchmarks (bench_kafka.py, bench_memory.py).

They build on bench_core's receiver and set-up: the same smtp-sink behind the same
STARTTLS front, except that the sink here also counts the messages it accepted (`-c`), so
a run can be checked against the receiver and not only against eobblast's own statuses.
Nothing here prints or keeps message content: keys, counts, outcomes and times only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench_core import (
    BenchError,
    Receiver,
    _die_with_parent,
    _log_tail,
    _start_front,
    _start_sink,
    _stop,
    find_smtp_sink,
)
from eobblast.config import Config, KafkaConfig, LedgerConfig, WorkersConfig, load_config
from eobblast.sandbox import TestPki
from eobblast.streams import EmbeddedBroker
from eobblast.streams.kafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

# Tansu completes a group join about session_timeout/2 after it starts: a short session
# keeps the join (and the rebalance when a second worker arrives) near 1.5 s.
BENCH_SESSION_TIMEOUT_MS = 3000
BENCH_HEARTBEAT_INTERVAL_MS = 500
DELIVERY_PARTITIONS = 4
# Statuses eobblast counts as final for a deliverable event.
TLS_VERSIONS = frozenset({"TLSv1.2", "TLSv1.3"})


# ---------------------------------------------------------------------------- processes


@dataclass(frozen=True, slots=True)
class CountingReceiver:
    """bench_core's Receiver, plus the file where smtp-sink writes its running counters."""

    rx: Receiver
    counters: Path

    def messages(self) -> int:
        """Messages smtp-sink has accepted so far (its `mesg=` counter)."""
        # With -c and stdout not a tty, smtp-sink writes one flushed line per event:
        # `sess=N quit=N mesg=N`. Only the last line matters.
        try:
            with self.counters.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 256))
                tail = handle.read().splitlines()
        except OSError:
            return 0
        for line in reversed(tail):
            for item in line.split():
                if item.startswith(b"mesg="):
                    return int(item[5:])
        return 0


@contextlib.contextmanager
def counting_receiver(pki: TestPki, workdir: Path) -> Iterator[CountingReceiver]:
    """smtp-sink (counting) plus the STARTTLS front, both stopped on exit whatever happens."""
    binary = find_smtp_sink()
    with contextlib.ExitStack() as stack:
        counters = workdir / "smtp-sink.counters"
        sink, sink_port = _start_sink(binary, workdir, counters=counters)
        stack.callback(_stop, sink)
        front, port = _start_front(pki, sink_port, workdir)
        stack.callback(_stop, front)
        yield CountingReceiver(Receiver(port, front.pid, sink.pid), counters)


def proc_status_kib(pid: int, field_name: str = "VmRSS") -> int | None:
    """A memory field of /proc/<pid>/status in KiB (VmRSS, VmHWM, ...), None if unavailable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, None where there is no such file."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


# ---------------------------------------------------------------------------- kafka


@dataclass(frozen=True, slots=True)
class RunTopics:
    """One run's topics and group: fresh names, so no run sees another's offsets."""

    prefix: str

    @property
    def events(self) -> str:
        """Input topic."""
        return f"{self.prefix}.events"

    @property
    def delivery(self) -> str:
        """Status topic."""
        return f"{self.prefix}.delivery"

    @property
    def dlq(self) -> str:
        """Dead-letter topic."""
        return f"{self.prefix}.dlq"

    @property
    def group(self) -> str:
        """The workers' consumer group."""
        return f"{self.prefix}-workers"

    async def create(self, broker: EmbeddedBroker, event_partitions: int) -> None:
        """Create the three topics on the broker."""
        await broker.create_topics(
            {self.events: event_partitions, self.delivery: DELIVERY_PARTITIONS, self.dlq: 1}
        )


def kafka_config(
    base: Config,
    bootstrap: str,
    topics: RunTopics,
    ledger: Path,
    workers: int,
    *,
    postgres: str | None = None,
) -> Config:
    """`base` (DKIM, transport, pipeline) pointed at this run's broker, topics and ledger;
    given `postgres` (a URL naming a schema of this run's own), every shared store is there:
    the ledger, the bounce store, the audit trail, the escrow and the shaping budgets, as
    when workers span machines."""
    if postgres is not None:
        return dataclasses.replace(
            kafka_config(base, bootstrap, topics, ledger, workers),
            ledger=LedgerConfig(url=postgres),
            bounces=dataclasses.replace(base.bounces, store_url=postgres),
            portal=dataclasses.replace(base.portal, escrow_url=postgres, audit_url=postgres),
            shaping=dataclasses.replace(base.shaping, budgets_url=postgres),
        )
    return dataclasses.replace(
        base,
        kafka=KafkaConfig(
            bootstrap=bootstrap,
            group_id=topics.group,
            events_topic=topics.events,
            delivery_topic=topics.delivery,
            dlq_topic=topics.dlq,
            session_timeout_ms=BENCH_SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=BENCH_HEARTBEAT_INTERVAL_MS,
        ),
        ledger=LedgerConfig(url=f"sqlite:///{ledger}"),
        # The bounce store is per run too: the same events of an earlier run are settled there.
        bounces=dataclasses.replace(
            base.bounces, store_url=f"sqlite:///{ledger.with_name(ledger.stem + '-bounces.db')}"
        ),
        workers=WorkersConfig(count=workers, grace_period=10.0, restart_delay=0.5),
    )


@contextlib.contextmanager
def postgres_schema(base_url: str, name: str) -> Iterator[str]:
    """A new schema on the PostgreSQL at `base_url` for one run, dropped afterwards: the URL
    of a connection whose tables go there."""
    import psycopg  # only runs on PostgreSQL need the driver

    with psycopg.connect(base_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        query = "&" if "?" in base_url else "?"  # the URL may have its own (sslmode=...)
        yield f"{base_url}{query}options=-csearch_path%3D{name}"
    finally:
        with psycopg.connect(base_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


def claims_producer(bootstrap: str) -> AIOKafkaProducer:
    """A producer tuned for bulk loading (the claims system's side, not eobblast's)."""
    # Big batches and a longer linger: publishing the backlog is set-up, not the measure,
    # and per-record overhead dominates in aiokafka. acks=all as eobblast's own producer.
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="bench-claims",
        acks="all",
        enable_idempotence=False,
        linger_ms=20,
        max_batch_size=512 * 1024,
        max_request_size=16 * 1024 * 1024,
    )


async def publish(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes, bytes]],
    *,
    window: int = 5000,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Publish (key, value) records; at most `window` unacknowledged at once. Returns count."""
    producer = claims_producer(bootstrap)
    await producer.start()
    count = 0
    try:
        pending: list[asyncio.Future[Any]] = []
        for key, value in records:
            pending.append(await producer.send(topic, value, key=key))
            count += 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
                if on_progress is not None:
                    on_progress(count)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return count


async def assigned_reader(bootstrap: str, topic: str, client_id: str) -> AIOKafkaConsumer:
    """A started consumer on every partition of `topic`, from the start, with no group."""
    # No group, no join: on Tansu a join costs ~session_timeout/2, which the benchmark's
    # own reader must not add to what it measures.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = None
        deadline = time.monotonic() + 10.0
        while not partitions and time.monotonic() < deadline:
            await consumer.topics()  # refreshes the metadata
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                await asyncio.sleep(0.1)
        if not partitions:
            raise BenchError(f"topic {topic} has no partitions")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
    except BaseException:
        await consumer.stop()
        raise
    return consumer


@dataclass(slots=True)
class StatusCollector:
    """Reads eob.delivery and keeps, per event key, the first status's outcome and times."""

    bootstrap: str
    topic: str
    by_status: Counter[str] = field(default_factory=Counter)
    by_tls: Counter[str] = field(default_factory=Counter)
    by_worker: Counter[str] = field(default_factory=Counter)
    # Worker clock (occurred_at) of each first status, in arrival order.
    occurred: list[float] = field(default_factory=list)
    republished: int = 0
    _seen: set[bytes] = field(default_factory=set)
    _consumer: AIOKafkaConsumer | None = None

    @property
    def total(self) -> int:
        """Events with a final status."""
        return len(self._seen)

    async def start(self) -> None:
        """Open the reader (before the workers start, so it is ready when they are)."""
        self._consumer = await assigned_reader(self.bootstrap, self.topic, "bench-statuses")

    async def stop(self) -> None:
        """Close the reader."""
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def poll(self, timeout_ms: int = 100) -> int:
        """Read what is there (waiting up to `timeout_ms`); return how many records were read."""
        assert self._consumer is not None
        batch = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=5000)
        read = 0
        for records in batch.values():
            read += len(records)
            for record in records:
                if record.key in self._seen:
                    self.republished += 1
                    continue
                self._seen.add(record.key)
                # orjson and three fields: pydantic on every status would make the reader,
                # which shares the machine with the workers, a measurable CPU load.
                doc = orjson.loads(record.value)
                self.by_status[doc["status"]] += 1
                self.by_tls[str(doc.get("tls_version"))] += 1
                self.by_worker[str(doc.get("worker"))] += 1
                self.occurred.append(_epoch(doc["occurred_at"]))
        return read

    async def drain(self, quiet_ms: int = 500) -> None:
        """Read until nothing new arrives for `quiet_ms` (statuses of a stopping worker)."""
        # One poll returns what is fetched already, possibly from some partitions only.
        while await self.poll(timeout_ms=quiet_ms):
            pass


def _epoch(iso: str) -> float:
    # The status's occurred_at: ISO 8601 with an offset (pydantic writes "Z" for UTC, which
    # fromisoformat accepts from Python 3.11).
    return dt.datetime.fromisoformat(iso).timestamp()


async def committed_total(bootstrap: str, group: str, topic: str) -> int:
    """Sum of the group's committed offsets over `topic`'s partitions."""
    # A consumer that names the group but never subscribes only asks for its offsets:
    # it does not join, so it disturbs nothing. (End offsets are not asked for: Tansu
    # 0.6 answers ListOffsets "latest" with the base offset of the partition's last batch,
    # not the high watermark; the caller knows how many records it published.)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="bench-offsets",
        group_id=group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        committed = 0
        for partition in sorted(partitions):
            committed += await consumer.committed(TopicPartition(topic, partition)) or 0
        return committed
    finally:
        await consumer.stop()


# ---------------------------------------------------------------------------- eobblast run


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON strings of printable text are valid TOML basic strings.
    return orjson.dumps(str(value)).decode()


def config_toml(config: Config) -> str:
    """The settings that differ from the defaults, as the TOML `eobblast run --config` reads."""
    # Only what differs: the file stays short, and sections other people add to Config
    # (with types this writer may not know) keep their defaults untouched.
    defaults = dataclasses.asdict(Config())
    lines: list[str] = []
    for section, values in dataclasses.asdict(config).items():
        changed = {k: v for k, v in values.items() if v != defaults[section].get(k)}
        if not changed:
            continue
        lines.append(f"[{section}]")
        tables = {k: v for k, v in changed.items() if isinstance(v, dict)}
        lines += [
            f"{k} = {_toml_value(v)}"
            for k, v in changed.items()
            if k not in tables and v is not None
        ]
        for name, table in tables.items():
            lines.append(f"[{section}.{name}]")
            lines += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, ... (None if it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot): a pid plus this names one process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _children(parent: int) -> list[int]:
    """Pids whose parent is `parent` (a scan of /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def _is_worker(pid: int) -> bool:
    # The supervisor's children are its workers plus multiprocessing's resource tracker.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in cmdline


@dataclass(slots=True)
class EobblastRun:
    """`eobblast run` as a subprocess: the supervisor's pid and its workers' pids."""

    process: subprocess.Popen[bytes]
    log: Path
    # pid -> start time, so a leftover is only ever killed if it is still that process.
    seen_workers: dict[int, int | None] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The supervisor's pid."""
        return self.process.pid

    def workers(self) -> list[int]:
        """Pids of the live worker processes (remembered, so they can be reaped later)."""
        pids = sorted(p for p in _children(self.pid) if _is_worker(p))
        for pid in pids:
            self.seen_workers.setdefault(pid, _start_ticks(pid))
        return pids

    async def wait_for_workers(self, count: int, seconds: float = 15.0) -> list[int]:
        """The workers' pids once `count` of them run."""
        deadline = time.monotonic() + seconds
        while True:
            if self.process.poll() is not None:
                raise BenchError(f"eobblast run exited: {_log_tail(self.log)}")
            pids = self.workers()
            if len(pids) >= count:
                return pids
            if time.monotonic() > deadline:
                raise BenchError(f"{len(pids)} of {count} workers after {seconds:.0f} s")
            await asyncio.sleep(0.02)

    def exited(self) -> bool:
        """Whether the supervisor has exited (it never should on its own)."""
        return self.process.poll() is not None


def write_run_config(config: Config, path: Path) -> Path:
    """Write `config` as TOML and check that eobblast reads it back unchanged."""
    path.write_text(config_toml(config), encoding="utf-8")
    if load_config(path, environ={}) != config:
        raise BenchError("the TOML written for eobblast run does not read back as the config")
    return path


@contextlib.asynccontextmanager
async def eobblast_run(
    config_file: Path, workers: int, workdir: Path, log_level: str = "WARNING"
) -> AsyncIterator[EobblastRun]:
    """`eobblast run` with N workers, stopped on exit (SIGTERM: drain, commit, exit)."""
    # The console script, as an operator runs it: its workers import what it imports.
    script = Path(sys.executable).with_name("eobblast")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "eobblast"]
    command += ["run", "--config", str(config_file), "--workers", str(workers)]
    command += ["--log-level", log_level]
    log = workdir / "eobblast-run.log"
    # TMPDIR: the supervisor's Prometheus multiprocess directory goes with our temp dir.
    env = {**os.environ, "TMPDIR": str(workdir)}
    env = {k: v for k, v in env.items() if not k.startswith("EOBBLAST_")}
    with log.open("ab") as out:
        # A plain Popen, as EmbeddedBroker does: fork+exec takes microseconds, and
        # preexec_fn lets the supervisor die with us (PDEATHSIG).
        process = subprocess.Popen(  # noqa: ASYNC220
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            preexec_fn=_die_with_parent,
        )
    run = EobblastRun(process, log)
    try:
        yield run
    finally:
        await _stop_run(run, grace=20.0)


async def _stop_run(run: EobblastRun, grace: float) -> None:
    run.workers()  # remember the latest pids before the supervisor goes
    if run.process.poll() is None:
        run.process.terminate()
        try:
            await asyncio.to_thread(run.process.wait, grace)
        except subprocess.TimeoutExpired:
            run.process.kill()
            await asyncio.to_thread(run.process.wait)
    _kill_leftovers(run.seen_workers)


def _kill_leftovers(workers: dict[int, int | None]) -> None:
    # A supervisor that had to be killed leaves its workers behind: stop them by pid, after
    # checking that the pid still names the same process (pids are recycled).
    for pid, started in workers.items():
        if started is not None and _start_ticks(pid) == started and _is_worker(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def system_cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    # Other work on the machine skews a benchmark: the busy share not explained by our own
    # processes shows how much.
    try:
        first = Path("/proc/stat").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in first.split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz
