"""aiokafka behind a few typed helpers: the only module in eobblast that imports aiokafka.

Settings chosen here hold for both Apache Kafka (production) and Tansu (tests, demo); where
the two differ, the docstrings say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import (  # type: ignore[import-untyped]
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.client import AIOKafkaClient  # type: ignore[import-untyped]
from aiokafka.errors import (  # type: ignore[import-untyped]
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.helpers import create_ssl_context  # type: ignore[import-untyped]

from eobblast._bootstrap import parse_bootstrap
from eobblast._holes import HOLE_SETTLE
from eobblast._net import is_loopback
from eobblast.errors import ConfigError, EobblastError, ReasonCode
from eobblast.observe import metrics
from eobblast.streams.offsets import OffsetGaps

if TYPE_CHECKING:
    from eobblast.config import KafkaConfig

__all__ = [
    "ADMIN_TIMEOUT",
    "CONNECT_ERRORS",
    "DEFAULT_HEARTBEAT_INTERVAL_MS",
    "DEFAULT_MAX_POLL_INTERVAL_MS",
    "DEFAULT_REBALANCE_TIMEOUT_MS",
    "DEFAULT_SESSION_TIMEOUT_MS",
    "MAX_PARTITION_FETCH_BYTES",
    "MAX_REQUEST_SIZE",
    "PLAINTEXT",
    "PROBE_TIMEOUT",
    "RECORD_ERRORS",
    "TOPIC_ERRORS",
    "AIOKafkaConsumer",
    "AIOKafkaProducer",
    "BrokerUnavailable",
    "CommitFailedError",
    "ConsumerStoppedError",
    "IllegalStateError",
    "KafkaError",
    "KafkaSecurity",
    "MessageSizeTooLargeError",
    "ReadAgain",
    "ReadAgainListener",
    "RebalanceListener",
    "TopicCreationFailed",
    "TopicPartition",
    "TopicRecord",
    "backoff_delay",
    "connect_error_text",
    "create_topics",
    "error_text",
    "kafka_security",
    "make_consumer",
    "make_producer",
    "metadata_heard_since",
    "parse_bootstrap",
    "probe_broker",
    "read_to_end",
    "retrieved",
    "start_or_unavailable",
    "topic_partitions",
    "unprotected_brokers",
    "wait_for_broker",
]

log = logging.getLogger(__name__)

# What a produce fails with when the trouble is one topic (an ACL, a topic that does not
# exist), not the broker: records for other topics still go. RECORD_ERRORS: the trouble is
# that one record (its size, a broker policy), not the topic's other records.
TOPIC_ERRORS: tuple[type[BaseException], ...] = (
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    InvalidTopicError,
)
RECORD_ERRORS: tuple[type[BaseException], ...] = (
    PolicyViolationError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
)

# A record larger than this is refused by the producer before it reaches the network
# (MessageSizeTooLargeError). eobblast's own records are far smaller (a dead letter keeps at
# most 256 KiB of the original); `eobblast dlq replay` republishes originals of any size the
# input topic took. Tansu accepts records of any size (120 MB tested); Apache Kafka refuses
# records over the topic's max.message.bytes (1 MiB by default), and a dead letter the DLQ
# topic refuses so is parked without the original (`Worker._send`).
MAX_REQUEST_SIZE = 16 * 1024 * 1024
# Per-partition fetch size. Both Kafka and Tansu return the first record batch of a partition
# even when it is larger than this, so an oversized record is still delivered (and rejected
# by the app) instead of wedging the partition; the limit only bounds memory per fetch.
MAX_PARTITION_FETCH_BYTES = 1024 * 1024
# Tansu completes a join roughly session_timeout/2 after it starts (so 5 s at 10 s), which
# is the floor of every startup and rebalance there; the integration tests pass 3_000.
DEFAULT_SESSION_TIMEOUT_MS = 10_000
# Members learn of a rebalance only at their next heartbeat: keep it well under a third of
# the session timeout so rebalances start promptly.
DEFAULT_HEARTBEAT_INTERVAL_MS = 1_000
# How long on_partitions_revoked may take to finish in-flight sends and commit (Kafka);
# below the 40 s request timeout, which a JoinGroup must also fit in.
DEFAULT_REBALANCE_TIMEOUT_MS = 30_000
# aiokafka's own default for a request to the broker.
DEFAULT_REQUEST_TIMEOUT_MS = 40_000
# Not calling getmany for this long evicts the member: pause partitions, keep polling.
DEFAULT_MAX_POLL_INTERVAL_MS = 300_000
# One reachability probe, and one topic creation, never wait longer than this.
PROBE_TIMEOUT = 5.0
ADMIN_TIMEOUT = 10.0
# Batches a burst of status events without holding a lone one back noticeably.
PRODUCER_LINGER_MS = 5
# How long the broker may hold a fetch that finds nothing new. An idle worker sees a new
# event at most this late (the client's default, 500 ms, showed as ~60 ms more before the
# first status of a burst); a busy one gets its records at once either way.
FETCH_MAX_WAIT_MS = 100
# Every reader takes only committed records. A claims system that publishes in a
# transaction and aborts it has taken those events back: sending one would email a notice
# that was never issued. A partition is read up to its last stable offset: a transaction
# still open holds back its records and every later one of that partition until it ends.
ISOLATION_LEVEL = "read_committed"


class BrokerUnavailable(EobblastError):
    """No Kafka broker could be started or reached, or it could not give what was asked (a
    topic it does not have, a read that stalled); the detail says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(ReasonCode.INTERNAL_ERROR, detail)


class TopicCreationFailed(EobblastError):
    """The broker refused to create a topic."""

    def __init__(self, detail: str) -> None:
        super().__init__(ReasonCode.INTERNAL_ERROR, detail)


# What starting a client (or probing a broker) fails with when the broker is away or will
# not let it in. aiokafka's SCRAM login raises KeyError (the server's last message has no
# verifier: it refused the password) or ValueError (a wrong server signature) rather than
# a KafkaError; a TLS handshake that fails verification raises ssl.SSLError, an OSError.
# (A worker retries these for ever, logging each tenth: a bug raising KeyError at start
# would show there. aiokafka's reconnects while running catch only OSError and KafkaError,
# so a login refused then, by a broker that answers as Tansu does, surfaces from the
# client's own calls; Apache Kafka refuses logins with a KafkaError.)
CONNECT_ERRORS: tuple[type[BaseException], ...] = (KafkaError, OSError, KeyError, ValueError)


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """How a client reaches the brokers: TLS and a SASL login, or neither (`PLAINTEXT`).
    Build it from the settings with `kafka_security`; the password never shows in repr."""

    protocol: str
    ssl_context: ssl.SSLContext | None = None
    sasl_mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's clients."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.ssl_context is not None:
            options["ssl_context"] = self.ssl_context
        if self.sasl_mechanism is not None:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.username
            options["sasl_plain_password"] = self.password
        return options


PLAINTEXT = KafkaSecurity("PLAINTEXT")


def kafka_security(settings: KafkaConfig) -> KafkaSecurity:
    """The clients' security from `[kafka]`: its TLS context built (the brokers' certificates
    and host names verified, TLS 1.2 at least) and its SASL password read. ConfigError,
    naming the setting, when a file cannot be read or a key or certificate not loaded."""
    context = None
    if settings.uses_tls:
        try:
            context = create_ssl_context(cafile=settings.ssl_ca_file)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"kafka.ssl_ca_file: cannot be loaded ({error_text(error)})"
            ) from None
        if settings.ssl_cert_file is not None:
            try:
                # Never OpenSSL's prompt on a terminal: an encrypted key fails to load.
                context.load_cert_chain(settings.ssl_cert_file, settings.ssl_key_file, b"")
            except (OSError, ValueError) as error:
                raise ConfigError(
                    f"kafka.ssl_cert_file/ssl_key_file: cannot be loaded ({error_text(error)})"
                ) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not settings.uses_sasl:
        return KafkaSecurity(settings.security_protocol, context)
    assert settings.sasl_password_file is not None  # KafkaConfig checks it
    try:
        if settings.sasl_password_file.stat().st_mode & 0o077:
            log.warning(
                "kafka.sasl_password_file may be read by others than its owner: chmod 600",
                extra={"file": str(settings.sasl_password_file)},
            )
        text = settings.sasl_password_file.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as error:
        raise ConfigError(
            f"kafka.sasl_password_file: cannot be read ({type(error).__name__})"
        ) from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ConfigError("kafka.sasl_password_file: is empty")
    return KafkaSecurity(
        settings.security_protocol,
        context,
        settings.sasl_mechanism,
        settings.sasl_username,
        password,
    )


def unprotected_brokers(bootstrap: str, security: KafkaSecurity) -> bool:
    """Whether events would cross a network to the brokers in the clear: no TLS, and a
    bootstrap host that is not a loopback address."""
    if security.ssl_context is not None:
        return False
    return not all(is_loopback(host) for host, _ in parse_bootstrap(bootstrap))


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Typed base for rebalance listeners (aiokafka requires a ConsumerRebalanceListener).

    aiokafka awaits both hooks; revocation must finish within the rebalance timeout, its
    exceptions are swallowed, and it is not called on `stop()`: commit before stopping.
    """

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Partitions are about to be taken away: finish or abandon their work, commit."""

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Partitions were assigned; fetching starts at their committed offsets."""


def metadata_heard_since(producer: AIOKafkaProducer, since: float) -> bool:
    """Whether `producer` has had cluster metadata from the broker since `since` (a
    `time.time()`): when it waits for a topic's partitions, whether the broker answers and
    does not know the topic, or does not answer at all."""
    # aiokafka keeps the time of the last metadata response on its cluster view; a release
    # without it counts as answering, which blames the topic.
    heard = getattr(producer.client.cluster, "_last_successful_refresh_ms", None)
    return heard is None or heard / 1000 >= since


def _reader_options(security: KafkaSecurity) -> dict[str, Any]:
    """What every consumer eobblast makes is given: fetch bounds, committed records only
    (`ISOLATION_LEVEL`), and the brokers' security."""
    return {
        "max_partition_fetch_bytes": MAX_PARTITION_FETCH_BYTES,
        "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
        "isolation_level": ISOLATION_LEVEL,
        **security.options(),
    }


def make_consumer(
    bootstrap: str,
    group_id: str,
    topics: Sequence[str],
    *,
    client_id: str,
    max_poll_records: int,
    rebalance_listener: RebalanceListener | None = None,
    session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS,
    rebalance_timeout_ms: int = DEFAULT_REBALANCE_TIMEOUT_MS,
    max_poll_interval_ms: int = DEFAULT_MAX_POLL_INTERVAL_MS,
    security: KafkaSecurity,
) -> AIOKafkaConsumer:
    """A group consumer subscribed to `topics`, not started, that never commits on its own.

    Call it inside a running event loop, then `await consumer.start()` (which returns once
    the member has joined and has its partitions). Commit explicit offsets
    (`OffsetTracker.committable()`): a bare `commit()` commits everything `getmany` returned,
    in flight or not. New groups start at the earliest offset: nothing is skipped.

    On Tansu every join takes about session_timeout/2. Tansu numbers a group's first
    generation 0 and aiokafka sends LeaveGroup on `stop()` only for generation > 0, so the
    first member of a group leaves silently: its partitions move only once its session
    expires (a replacement member needed about 7 s at a 3 s session).
    """
    if not topics:
        raise ValueError("a consumer needs at least one topic")
    if heartbeat_interval_ms * 3 > session_timeout_ms:
        raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=max_poll_records,
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=heartbeat_interval_ms,
        rebalance_timeout_ms=rebalance_timeout_ms,
        # A JoinGroup waits up to the rebalance timeout for the other members: its request
        # must not time out first (the client would drop the coordinator and join again).
        request_timeout_ms=max(DEFAULT_REQUEST_TIMEOUT_MS, rebalance_timeout_ms + 5_000),
        max_poll_interval_ms=max_poll_interval_ms,
        **_reader_options(security),
    )
    consumer.subscribe(topics=list(topics), listener=rebalance_listener)
    if isinstance(rebalance_listener, ReadAgainListener):
        rebalance_listener.consumer = consumer  # it learns where assigned partitions start
    return consumer


def make_producer(
    bootstrap: str,
    *,
    client_id: str,
    security: KafkaSecurity,
    max_request_size: int | None = None,
) -> AIOKafkaProducer:
    """A producer, not started, that waits for all in-sync replicas to acknowledge.

    Records up to `max_request_size` bytes (serialized; default `MAX_REQUEST_SIZE`, read at
    each call) are accepted; a larger one fails at
    `send` with `MessageSizeTooLargeError` without touching the network. No idempotence
    (Tansu refuses InitProducerId): a retried send may write a record twice, so whoever
    reads what this producer writes must tolerate duplicates.
    """
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=False,
        linger_ms=PRODUCER_LINGER_MS,
        max_request_size=MAX_REQUEST_SIZE if max_request_size is None else max_request_size,
        **security.options(),
    )


async def probe_broker(bootstrap: str, security: KafkaSecurity) -> None:
    """Return once a broker of `bootstrap` answers a metadata request; raise OSError if not.

    Bounded by `PROBE_TIMEOUT` (TimeoutError); wrap it in `asyncio.timeout` for less. A
    connection of its own comes first (with its TLS handshake, under TLS), so an absent
    broker costs no aiokafka error log line, and a certificate that fails verification
    raises its own `ssl.SSLCertVerificationError` rather than aiokafka's "unable to
    bootstrap".
    """
    async with asyncio.timeout(PROBE_TIMEOUT):
        last_error: OSError | None = None
        for host, port in parse_bootstrap(bootstrap):
            try:
                _, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=security.ssl_context,
                    server_hostname=host if security.ssl_context is not None else None,
                )
            except OSError as error:
                last_error = error
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            break
        else:
            raise last_error or OSError(f"no broker in {bootstrap!r}")
        client = AIOKafkaClient(
            bootstrap_servers=bootstrap,
            client_id="eobblast-probe",
            request_timeout_ms=int(PROBE_TIMEOUT * 1000),
            **security.options(),
        )
        try:
            await client.bootstrap()
        except (KafkaError, KeyError, ValueError) as error:  # CONNECT_ERRORS, less OSError
            raise OSError(connect_error_text(error, security)) from error
        finally:
            await client.close()


def backoff_delay(
    attempt: int,
    *,
    base: float = 0.1,
    cap: float = 5.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): doubling, capped, jittered.

    The jitter keeps half the delay ("equal jitter"), so retries never hammer the broker yet
    a fleet of workers that lost it together does not come back in lockstep.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 62))
    return ceiling / 2 + ceiling / 2 * rand()


async def wait_for_broker(
    bootstrap: str,
    *,
    security: KafkaSecurity,
    deadline: float | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    log_every: float = 30.0,
    base: float = 0.1,
    cap: float = 5.0,
) -> int:
    """Retry `probe_broker` with backoff until it succeeds; return the number of attempts.

    `deadline` is an event-loop time (`loop.time()`, as for `asyncio.timeout_at`); once it
    passes, BrokerUnavailable is raised. None: keep trying. `on_retry(attempt, error, delay)`
    is called after each failed attempt. A warning naming only the bootstrap address, the
    attempt count and the error (a refused connection, a certificate that failed
    verification, a refused login) is logged at the first failure and then at most once per
    `log_every` s.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    last_logged: float | None = None
    # The reason of the last attempt that ran to completion: the deadline cutting the final
    # attempt short says nothing about the broker.
    reason = "no attempt completed"
    attempt = 0
    while True:
        attempt += 1
        try:
            async with asyncio.timeout_at(deadline):
                await probe_broker(bootstrap, security)
        except (OSError, TimeoutError) as error:
            now = loop.time()
            if deadline is None or now < deadline:
                reason = type(error).__name__
            else:
                raise BrokerUnavailable(
                    f"Kafka at {bootstrap} unreachable after {attempt} attempts in "
                    f"{now - started:.1f} s: {reason}"
                ) from error
            delay = backoff_delay(attempt, base=base, cap=cap)
            if deadline is not None:
                delay = min(delay, deadline - now)
            if last_logged is None or now - last_logged >= log_every:
                last_logged = now
                log.warning(
                    "Kafka unreachable, retrying",
                    extra={"bootstrap": bootstrap, "attempt": attempt, "error": error_text(error)},
                )
            if on_retry is not None:
                on_retry(attempt, error, delay)
            await asyncio.sleep(delay)
        else:
            if attempt > 1:
                log.info(
                    "Kafka reachable again", extra={"bootstrap": bootstrap, "attempt": attempt}
                )
            return attempt


def error_text(error: BaseException) -> str:
    """An error's kind and message, for a log line (broker addresses, TLS and login
    failures: nothing of an event)."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text[:300]


def connect_error_text(error: BaseException, security: KafkaSecurity) -> str:
    """`error_text` of what connecting or starting a client raised: aiokafka's SCRAM login
    raises KeyError or ValueError when it is refused (see CONNECT_ERRORS), said so."""
    if security.sasl_mechanism is not None and isinstance(error, KeyError | ValueError):
        return f"{type(error).__name__}: SASL login refused"
    return error_text(error)


async def topic_partitions(bootstrap: str, security: KafkaSecurity) -> dict[str, int]:
    """Every topic the brokers know, with its number of partitions. The cluster's metadata
    is asked for whole, so no topic is created by asking (as asking for one by name may,
    where the brokers create topics on first use). Raises what connecting raises."""
    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
        client_id="eobblast-check",
        request_timeout_ms=int(PROBE_TIMEOUT * 1000),
        **security.options(),
    )
    try:
        await client.bootstrap()
        cluster = await client.fetch_all_metadata()
    finally:
        await client.close()
    return {topic: len(cluster.partitions_for_topic(topic) or ()) for topic in cluster.topics()}


async def create_topics(
    bootstrap: str,
    partitions_by_topic: Mapping[str, int],
    *,
    replication_factor: int = 1,
    exist_ok: bool = True,
    security: KafkaSecurity,
) -> None:
    """Create topics with the given partition counts through the admin API (works on Tansu).

    An existing topic is accepted when `exist_ok`, whatever its partition count. Bounded by
    `ADMIN_TIMEOUT`.
    """
    if not partitions_by_topic:
        return
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="eobblast-admin",
        request_timeout_ms=int(ADMIN_TIMEOUT * 1000),
        **security.options(),
    )
    try:
        async with asyncio.timeout(ADMIN_TIMEOUT):
            await admin.start()
            response = await admin.create_topics(
                [
                    NewTopic(name, partitions, replication_factor)
                    for name, partitions in partitions_by_topic.items()
                ]
            )
    except (KafkaError, OSError, TimeoutError) as error:
        raise BrokerUnavailable(
            f"creating topics at {bootstrap} failed: {type(error).__name__}"
        ) from error
    finally:
        await admin.close()
    for topic, code, message in _topic_errors(response):
        if code == 0 or (exist_ok and code == TopicAlreadyExistsError.errno):
            continue
        raise TopicCreationFailed(f"topic {topic!r}: error {code} {message or ''}".rstrip())


def _topic_errors(response: object) -> list[tuple[str, int, str | None]]:
    """(topic, error code, message) from any CreateTopicsResponse version."""
    errors: list[tuple[str, int, str | None]] = []
    for entry in getattr(response, "topic_errors", []):
        topic, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        errors.append((str(topic), int(code), None if message is None else str(message)))
    return errors


async def start_or_unavailable(
    client: AIOKafkaConsumer | AIOKafkaProducer, bootstrap: str, security: KafkaSecurity
) -> None:
    """Start a consumer or producer; if it cannot, stop it and raise BrokerUnavailable."""
    try:
        await client.start()
    except CONNECT_ERRORS as exc:
        await client.stop()
        raise BrokerUnavailable(
            f"Kafka at {bootstrap}: {connect_error_text(exc, security)}"
        ) from None


@dataclass(frozen=True, slots=True)
class TopicRecord:
    """One record read back from a topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()


# How long a rebalance's assignment waits to learn where its partitions start (ReadAgain):
# the member sends no heartbeats meanwhile, and tests run 3 s sessions.
START_TIMEOUT = 1.0
# A reader's pause after a fetch refused whole, while its listener takes up the partitions.
REFUSED_PAUSE = 0.01


class ReadAgain:
    """A consumer's fetched records without the holes a broker did not mean (`OffsetGaps`):
    at a hole, the records before it are taken and the consumer is sent back to read the
    partition again from the hole, until a read asked for `settle` seconds after the hole
    was first seen still shows it. With `settle` 0 every hole is believed at once and
    nothing is read again: right for Apache Kafka, whose holes are all real.

    A partition's first fetch is checked against where it starts: given by `expect`, or
    learnt by `assigned` (asked of the broker) when a rebalance assigns it.

    A group consumer's reader takes only records of partitions its listener (one per
    consumer) has taken up, once the listener has been told of a revocation (aiokafka
    tells it before every join, the first included): aiokafka can hand out a fetch before
    the listener has run, and a reader can take a fetch handed out before a revocation
    after it. Such records are fetched again once the partition is held."""

    def __init__(self, settle: float = HOLE_SETTLE) -> None:
        if not settle >= 0:  # NaN too
            raise ValueError("settle must be a number of seconds, 0 or more")
        self._gaps: OffsetGaps[TopicPartition] | None = (
            OffsetGaps(settle=settle) if settle > 0 else None
        )
        # Partitions the listener has taken up and not let go of; None: no listener (yet).
        self._held: set[TopicPartition] | None = None

    def expect(self, tp: TopicPartition, offset: int) -> None:
        """`tp`'s next fetch starts at `offset`."""
        if self._gaps is not None:
            self._gaps.expect(tp, offset)

    def holds(self, tp: TopicPartition) -> bool:
        """Whether records of `tp` are taken (always, without a listener)."""
        return self._held is None or tp in self._held

    async def assigned(
        self, consumer: AIOKafkaConsumer | None, tps: Iterable[TopicPartition]
    ) -> None:
        """Learn where newly assigned partitions start, then take them up (from a rebalance
        listener's `on_partitions_assigned`).

        The start is the group's committed offset or, with none (or one retention has
        passed), the partition's first (`make_consumer`'s consumers start at the earliest),
        asked of the broker: not the consumer's position, which a fetch handed out before
        the listener ran has moved. A partition not learnt within START_TIMEOUT (the
        listener holds the member's heartbeats) has its first fetch taken as it comes, as
        has every one without a consumer to ask."""
        tps = list(tps)
        try:
            if self._gaps is not None and consumer is not None:
                await self._learn_starts(self._gaps, consumer, tps)
        finally:
            if self._held is not None:
                self._held.update(tps)  # whatever happened: their records are taken

    def revoked(self, tps: Iterable[TopicPartition]) -> None:
        """Let go of these partitions (from `on_partitions_revoked`, before anything else):
        no more of their records are taken, and they are forgotten. The first call turns
        the gate on: from then on only partitions `assigned` has taken up are taken."""
        tps = list(tps)
        if self._held is None:
            self._held = set()
        self._held.difference_update(tps)
        if self._gaps is not None:
            self._gaps.forget(tps)

    async def _learn_starts(
        self,
        gaps: OffsetGaps[TopicPartition],
        consumer: AIOKafkaConsumer,
        tps: list[TopicPartition],
    ) -> None:
        if not tps:
            return  # a member left without partitions
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        # All at once (aiokafka asks for one partition's commit at a time; the requests
        # are pipelined on one connection), the first offsets beside them: a partition
        # starts at its commit, or at its first offset if it has none or retention has
        # passed it.
        lookups = {asyncio.ensure_future(consumer.committed(tp)): tp for tp in tps}
        firsts = asyncio.ensure_future(consumer.beginning_offsets(tps))
        everything = (*lookups, firsts)
        for lookup in everything:
            lookup.add_done_callback(retrieved)
        try:
            await asyncio.wait(lookups, timeout=START_TIMEOUT)
            if any(_outcome(lookup) == (None, None) for lookup in lookups):  # no commit
                await asyncio.wait((firsts,), timeout=max(0.0, deadline - loop.time()))
        finally:
            for lookup in everything:
                lookup.cancel()  # those not done
        first_offsets, first_error = _outcome(firsts)
        unknown = 0
        errors: set[str] = set()
        for lookup, tp in lookups.items():
            start, error = _outcome(lookup)
            first = None if first_offsets is None else first_offsets.get(tp)
            if start is None and error is None:
                start, error = first, first_error
            elif start is not None and first is not None:
                start = max(start, first)
            if error is not None:
                errors.add(error)
            if start is None or start < 0:
                unknown += 1
            elif not gaps.knows(tp):  # (a reader without a gate may have taken records)
                gaps.expect(tp, start)
        if unknown:
            log.info(
                "start offsets unknown: a first fetch is taken as it comes",
                extra={"partitions": unknown, "errors": sorted(errors)},
            )

    def records(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, records: Sequence[Any]
    ) -> Sequence[Any]:
        """The records of `tp` from `consumer`'s fetch to take."""
        if not records:
            return records
        if not self.holds(tp):
            with contextlib.suppress(IllegalStateError):  # revoked: its new owner reads it
                consumer.seek(tp, records[0].offset)
            return ()
        if self._gaps is None:
            return records
        count, again = self._gaps.take(tp, [record.offset for record in records])
        if again is not None:
            metrics.OFFSET_REREADS.inc()
            log.debug(
                "offsets skip; reading again",
                extra={"topic": tp.topic, "partition": tp.partition, "offset": again},
            )
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile: not ours
                consumer.seek(tp, again)
        return records[:count]

    async def take(
        self, consumer: AIOKafkaConsumer, batch: Mapping[TopicPartition, Sequence[Any]]
    ) -> dict[TopicPartition, Sequence[Any]]:
        """The records of a fetch (`getmany`'s answer) to take, by partition (`records`).
        A fetch only of partitions the listener does not hold yet (it is on its way) is
        refused whole after a pause of REFUSED_PAUSE: each refusal sends the consumer back,
        which drops what it had fetched, and the reader would fetch again at once."""
        taken = {
            tp: kept
            for tp, records in batch.items()
            if (kept := self.records(consumer, tp, records))
        }
        if batch and not any(self.holds(tp) for tp in batch):
            await asyncio.sleep(REFUSED_PAUSE)
        return taken

    def listener(self) -> ReadAgainListener:
        """A rebalance listener that keeps this up to date (`make_consumer` gives it its
        consumer)."""
        return ReadAgainListener(self)


def _outcome(future: asyncio.Future[Any]) -> tuple[Any, str | None]:
    """A lookup's answer, or None and why not (the kind of its error)."""
    if not future.done() or future.cancelled():  # cancelled just now: it takes a turn
        return None, "TimeoutError"
    if (exc := future.exception()) is not None:
        return None, type(exc).__name__
    return future.result(), None


def retrieved(future: asyncio.Future[Any]) -> None:
    """A done callback for a future nobody awaits any more: its error is not news."""
    if not future.cancelled():
        future.exception()


class ReadAgainListener(RebalanceListener):
    """Lets go of revoked partitions, and learns where assigned ones start before taking
    them up (`ReadAgain`). Its `ReadAgain` then takes only records of partitions it holds."""

    def __init__(self, holes: ReadAgain) -> None:
        self.holes = holes
        self.consumer: AIOKafkaConsumer | None = None

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.holes.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.holes.assigned(self.consumer, assigned)


async def read_to_end(
    bootstrap: str,
    topic: str,
    *,
    client_id: str,
    stall_timeout: float = 30.0,
    security: KafkaSecurity,
) -> AsyncGenerator[TopicRecord, None]:
    """Every record of `topic` that was there when the read began: each partition from its
    start until the position reaches the end offset the broker gave then. No consumer
    group, nothing committed; records are yielded as fetched, so memory does not grow with
    the topic, and records appended meanwhile do not keep the read going. Close the
    iterator (`contextlib.aclosing`) to stop early.

    Tansu gives as a partition's end the offset after the first record of its last batch,
    not after the last record: the position moves a whole batch at a time, so it passes
    that offset only once the batch is read, and all of it is yielded (the records past
    the offset included).

    Raises BrokerUnavailable if the broker is unreachable, does not know the topic, or
    yields nothing for `stall_timeout` seconds while records are still due.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **_reader_options(security),
    )
    await start_or_unavailable(consumer, bootstrap, security)
    try:
        await consumer.topics()  # metadata for every topic, this one included
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        if not partitions:
            raise BrokerUnavailable(f"Kafka at {bootstrap} has no topic {topic}")
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = {tp: int(end) for tp, end in (await consumer.end_offsets(tps)).items()}
        holes = ReadAgain()
        due = set()
        for tp in tps:
            start = await consumer.position(tp)
            holes.expect(tp, start)
            if start < ends[tp]:
                due.add(tp)
        last_progress = time.monotonic()
        while due:
            batch = await consumer.getmany(*due, timeout_ms=500)
            for tp, records in batch.items():
                for record in holes.records(consumer, tp, records):
                    yield TopicRecord(
                        tp.partition,
                        record.offset,
                        record.key,
                        record.value,
                        record.timestamp,
                        tuple(record.headers or ()),
                    )
            if batch:
                last_progress = time.monotonic()
            read = {tp for tp in due if await consumer.position(tp) >= ends[tp]}
            if read:
                consumer.pause(*read)  # no more fetching for those
                due -= read
            if due and not batch and time.monotonic() - last_progress > stall_timeout:
                raise BrokerUnavailable(
                    f"Kafka at {bootstrap} sent nothing of {topic} for {stall_timeout:.0f} s"
                )
    finally:
        await consumer.stop()
