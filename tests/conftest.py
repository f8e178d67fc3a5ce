"""Shared fixtures: a valid event and helpers to spoil it."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from eobblast.events.synthetic import Mix, generate_events
from eobblast.observe.logs import configure_logging

# Kafka fixtures (a session broker, topic factory) for every test module that names them.
pytest_plugins = ["tests.kafka_fixtures"]

PG_BASE = "postgresql://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def throwaway_pg_schema(prefix: str) -> Iterator[str]:
    """A new schema on the machine's PostgreSQL (its DSN), dropped afterwards; skips without one.

    Tests get a schema of their own so runs, and tests of shared timers, never see each
    other's rows.
    """
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_BASE, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 unavailable: {type(exc).__name__}")
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_BASE, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def drop_store_connection(store: Any) -> None:
    """End a PostgreSQL store's connection from the server's side (a restart, a network
    break): that one only, never another test's that runs alongside under the same
    application name."""
    pid = store._conn._conn.info.backend_pid
    with psycopg.connect(PG_BASE, autocommit=True, connect_timeout=5) as admin:
        row = admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    assert row is not None and row[0], "the store's backend was not there to end"


@pytest.fixture(scope="module")
def pg_schema(request: pytest.FixtureRequest) -> Iterator[str]:
    """A throwaway PostgreSQL schema for one test module, named after it."""
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    with throwaway_pg_schema(name) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL, once a SQLite file and once PostgreSQL: the same tests run on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("pg_schema"))


CLEAN = Mix(no_consent=0, invalid_address=0, malformed=0, unknown_user=0, busy_mailbox=0, gone=0)


@pytest.fixture
def event_doc() -> dict[str, Any]:
    """One valid eob.issued/v1 event as a mapping."""
    raw = next(
        generate_events(1, seed=7, mix=CLEAN, now=dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC))
    )
    doc: dict[str, Any] = orjson.loads(raw)
    return doc


def spoiled(doc: dict[str, Any], path: str, value: Any) -> bytes:
    """The event with `path` (dotted, list indices allowed) set to value, or deleted if ...."""
    out = copy.deepcopy(doc)
    node: Any = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if value is Ellipsis:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return orjson.dumps(out)


@contextlib.contextmanager
def service_logging() -> Iterator[None]:
    """The logging `eobblast portal` sets up (onto stderr as it is now), undone afterwards."""
    names = ("eobblast", "uvicorn", "uvicorn.error", "mail", "mail.log", "aiokafka")
    saved = [(logging.getLogger(n), logging.getLogger(n).handlers[:]) for n in names]
    states = [(lg.propagate, lg.level) for lg, _ in saved]
    configure_logging("INFO")
    try:
        yield
    finally:
        for (logger, handlers), (propagate, level) in zip(saved, states, strict=True):
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.setLevel(level)


async def splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Copy bytes both ways between two connections until both ends close (test relays)."""

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


# The simple-protocol query psycopg commits a transaction with (what PgRelay watches for).
PG_COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"


class PgRelay:
    """A TCP relay to the machine's PostgreSQL, for what a store does when the path fails.

    Frozen (`freeze()`, or once a client sends `freeze_at`), its open connections pass
    nothing more either way while TCP stays up: a hung connection pooler, a server process
    stopped. `thaw()` lets new connections through again. Once a client sends `cut_at`, the
    server's answer to it never reaches that client, whose connection is closed instead: a
    network break just as a COMMIT went through. Hang-ups are passed on.
    """

    def __init__(self, *, freeze_at: bytes | None = None, cut_at: bytes | None = None) -> None:
        self.freeze_at = freeze_at
        self.cut_at = cut_at
        self.frozen = False
        self.cuts = 0
        self.upstream_ports: list[int] = []  # the server's view of the relay's sessions
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[tuple[asyncio.Task[Any], asyncio.StreamWriter]] = []

    async def __aenter__(self) -> PgRelay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task, to_client in self._links:
            to_client.transport.abort()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await task
        # Sessions a frozen relay left behind are ended (they would idle until the server's
        # timeout) so they hold no locks on the test's schema.
        with psycopg.connect(PG_BASE, autocommit=True, connect_timeout=5) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE client_port = ANY(%s)",
                (self.upstream_ports,),
            )

    def url(self, url: str) -> str:
        """`url` (the machine's PostgreSQL) through the relay."""
        assert "@127.0.0.1:5432/" in url
        return url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{self.port}/")

    def freeze(self) -> None:
        """Stop passing anything, on every connection open now or made until `thaw()`."""
        self.frozen = True

    def thaw(self) -> None:
        """Let new connections through (those frozen stay so: their client gave up on them)."""
        self.frozen = False

    async def _handle(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.append((task, to_client))
        server, to_server = await asyncio.open_connection("127.0.0.1", 5432)
        self.upstream_ports.append(to_server.get_extra_info("sockname")[1])
        link = _Link()
        await asyncio.gather(
            self._pipe(link, client, to_server, to_client), self._pipe(link, server, to_client)
        )

    async def _pipe(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: asyncio.StreamWriter | None = None,
    ) -> None:
        """One direction; `client` is given for the client's (the way markers come)."""
        try:
            while data := await reader.read(65536):
                if client is not None and self.freeze_at is not None and self.freeze_at in data:
                    self.frozen = True
                link.frozen = link.frozen or self.frozen
                if link.frozen:
                    continue
                if client is None and link.cutting:
                    self.cuts += 1
                    break  # the answer is dropped, the client's connection closed
                if client is not None and self.cut_at is not None and self.cut_at in data:
                    link.cutting = True
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


class _Link:
    """What became of one relayed connection."""

    def __init__(self) -> None:
        self.frozen = False
        self.cutting = False
