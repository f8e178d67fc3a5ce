"""Kafka fixtures for tests that need a real broker.

Import the fixtures you use into a test module (pytest finds them there):

    from tests.kafka_fixtures import broker, topic_factory  # noqa: F401

`broker` is one in-memory Tansu broker for the whole session; it is a plain subprocess, so
tests use it from their own event loops. Tests that stop or restart a broker start their own
`EmbeddedBroker` instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypedDict, TypeVar

import pytest

from eobblast.streams import BrokerUnavailable, EmbeddedBroker, resolve_tansu_binary

T = TypeVar("T")
TopicFactory = Callable[..., Awaitable[str]]

# Tansu completes a group join about session_timeout/2 after it starts: short sessions keep
# group tests quick. Heartbeats stay at a sixth of the session so a busy machine does not
# evict a member.
TEST_SESSION_TIMEOUT_MS = 3_000
TEST_HEARTBEAT_INTERVAL_MS = 500


class GroupTiming(TypedDict):
    """Keyword arguments of `make_consumer` that set group timing."""

    session_timeout_ms: int
    heartbeat_interval_ms: int


FAST_GROUP = GroupTiming(
    session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
    heartbeat_interval_ms=TEST_HEARTBEAT_INTERVAL_MS,
)


def run_in_fresh_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine in a new event loop on a worker thread, never touching the caller's."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kafka-fixture") as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A Tansu broker for the whole session; the tests skip if the binary is not installed."""
    try:
        resolve_tansu_binary()
    except BrokerUnavailable as error:
        pytest.skip(f"no Kafka broker for integration tests: {error.detail}")
    running = EmbeddedBroker(log_dir=tmp_path_factory.mktemp("tansu"))
    run_in_fresh_loop(running.start())
    try:
        yield running
    finally:
        run_in_fresh_loop(running.stop())


@pytest.fixture
def topic_factory(broker: EmbeddedBroker) -> TopicFactory:
    """`await topic_factory(partitions=N)` creates a uniquely named topic and returns its name."""

    async def make(partitions: int = 1, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        async with asyncio.timeout(10):
            await broker.create_topics({name: partitions})
        return name

    return make


def unique_group() -> str:
    """A consumer group id no other test uses."""
    return f"group-{uuid.uuid4().hex[:12]}"


# --- kcat against Tansu -------------------------------------------------------------------
API_VERSIONS = 18
JOIN_GROUP = 11


def _read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _skip_tagged_fields(data: bytes, pos: int) -> int:
    count, pos = _read_uvarint(data, pos)
    for _ in range(count):
        _, pos = _read_uvarint(data, pos)
        size, pos = _read_uvarint(data, pos)
        pos += size
    return pos


def strip_api_versions_tags(frame: bytes) -> bytes:
    """An ApiVersions v3+ response (after the length prefix) without its top-level tagged fields.

    Layout: correlation id, error code, compact array of (key, min, max, tags), throttle
    time, tagged fields. A frame that does not parse is returned unchanged.
    """
    try:
        pos = 4 + 2
        entries, pos = _read_uvarint(frame, pos)
        for _ in range(max(entries - 1, 0)):
            pos = _skip_tagged_fields(frame, pos + 6)
        pos += 4
        end = _skip_tagged_fields(frame, pos)
    except IndexError:
        return frame
    if end != len(frame):
        return frame
    return frame[:pos] + b"\x00"


class ApiVersionsShim:
    """A loopback relay in front of Tansu that lets librdkafka (kcat) talk to it.

    kcat 1.7.1 / librdkafka 2.0.2 (Debian bookworm) rejects Tansu 0.6's ApiVersions v3
    response ("Protocol read buffer underflow ... ApiVersion v3"): Tansu appends four
    tagged fields (SupportedFeatures, FinalizedFeaturesEpoch, FinalizedFeatures,
    ZkMigrationReady) that Apache Kafka omits at their default values, and that librdkafka
    version mis-parses. The relay removes them from ApiVersions v3+ responses and passes
    every other byte through unchanged. The broker must advertise the relay's port, so that
    the connections kcat opens after bootstrapping also go through it.

    While `holding_joins` is set, it also holds back the answers to JoinGroup requests (and
    everything after them on their connections) until `release_joins()`: as Apache Kafka
    does while a rebalance waits for a member that has not joined again, which Tansu does
    not.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1"):
        self._upstream = (upstream_host, upstream_port)
        self._host = host
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.rewritten = 0
        self.holding_joins = False
        self.held = 0  # JoinGroup answers held back so far
        self._released = asyncio.Event()

    @property
    def bootstrap(self) -> str:
        """`host:port` of the relay."""
        return f"{self._host}:{self.port}"

    async def start(self, port: int = 0) -> None:
        """Listen on `port` (0: any free one)."""
        self._server = await asyncio.start_server(self._accept, self._host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    def release_joins(self) -> None:
        """Pass the JoinGroup answers held back, and hold no more."""
        self.holding_joins = False
        self._released.set()

    async def stop(self) -> None:
        """Stop listening and drop every relayed connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(5):
                upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
            rewrite: set[int] = set()
            hold: set[int] = set()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._requests(reader, upstream_writer, rewrite, hold))
                group.create_task(self._responses(upstream_reader, writer, rewrite, hold))
        except* (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            for stream in (writer, upstream_writer):
                if stream is not None:
                    stream.close()
            self._tasks.discard(task)

    @staticmethod
    async def _frames(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            try:
                header = await reader.readexactly(4)
            except asyncio.IncompleteReadError:
                return
            (size,) = struct.unpack(">i", header)
            yield await reader.readexactly(size)

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rewrite: set[int],
        hold: set[int],
    ) -> None:
        async for frame in self._frames(reader):
            api_key, api_version, correlation = struct.unpack(">hhi", frame[:8])
            if api_key == API_VERSIONS and api_version >= 3:
                rewrite.add(correlation)
            if api_key == JOIN_GROUP and self.holding_joins:
                hold.add(correlation)
            writer.write(struct.pack(">i", len(frame)) + frame)
            await writer.drain()
        writer.close()

    async def _responses(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rewrite: set[int],
        hold: set[int],
    ) -> None:
        async for frame in self._frames(reader):
            (correlation,) = struct.unpack(">i", frame[:4])
            if correlation in hold:
                hold.discard(correlation)
                self.held += 1
                await self._released.wait()
            if correlation in rewrite:
                rewrite.discard(correlation)
                stripped = strip_api_versions_tags(frame)
                self.rewritten += stripped != frame
                frame = stripped
            writer.write(struct.pack(">i", len(frame)) + frame)
            await writer.drain()
        writer.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def kcat_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[EmbeddedBroker, ApiVersionsShim]]:
    """A broker of its own behind an ApiVersionsShim; kcat and aiokafka use `shim.bootstrap`."""
    try:
        resolve_tansu_binary()
    except BrokerUnavailable as error:
        pytest.skip(f"no Kafka broker for integration tests: {error.detail}")
    broker_port = free_port()
    shim = ApiVersionsShim("127.0.0.1", broker_port)
    await shim.start()
    running = EmbeddedBroker(
        port=broker_port,
        advertised_port=shim.port,
        log_dir=tmp_path_factory.mktemp("tansu-kcat"),
    )
    try:
        await running.start()
        yield running, shim
    finally:
        await running.stop()
        await shim.stop()
