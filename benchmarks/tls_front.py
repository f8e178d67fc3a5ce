"""A STARTTLS-terminating front for Postfix's `smtp-sink`, run as its own process.

eobblast never sends PHI without verified TLS, and `smtp-sink` (the only receiver fast
enough to benchmark a sender against) speaks no TLS. This front answers the greeting, EHLO
and STARTTLS itself, upgrades the client's connection with a certificate from the test CA,
then opens a plaintext connection to the sink, swallows the sink's greeting and relays raw
bytes both ways: the client's post-TLS EHLO and every later command go to the sink, whose
replies come back. After the upgrade nothing is parsed, so the front adds TLS and one
loopback hop per read and nothing else.

Usage: tls_front.py --cert server.pem --key server.key --sink 127.0.0.1:PORT
It prints the port it listens on as one line on stdout, then serves until SIGTERM, SIGINT
or the end of its stdin (the parent closes the pipe or dies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
from collections.abc import Coroutine
from typing import Any, cast

import uvloop

HOSTNAME = b"sink.bench.test"
GREETING = b"220 " + HOSTNAME + b" ESMTP tls-front\r\n"
EHLO_REPLY = b"250-" + HOSTNAME + b"\r\n250-STARTTLS\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
HELO_REPLY = b"250 " + HOSTNAME + b"\r\n"
# RFC 5321 4.5.3.1.4: a command line is at most 512 octets; be lenient, but bounded.
MAX_LINE = 2048
HANDSHAKE_TIMEOUT = 10.0


class _SinkSide(asyncio.Protocol):
    """The plaintext connection to smtp-sink on behalf of one client."""

    def __init__(self, client: _ClientSide) -> None:
        self._client = client
        self._transport: asyncio.Transport | None = None
        self._greeting = b""
        self._greeted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._greeted:
            self._client.write(data)
            return
        # The client already had our greeting: the sink's own 220 (possibly multi-line)
        # must not reach it. Its last line is the one with a space after the code.
        self._greeting += data
        end = 0
        while True:
            newline = self._greeting.find(b"\n", end)
            if newline < 0:
                if len(self._greeting) > MAX_LINE:
                    self._client.abort()
                return
            line, end = self._greeting[end:newline], newline + 1
            if line[3:4] != b"-":
                break
        if not line.startswith(b"220"):
            self._client.fail(b"421 4.3.0 sink refused the session\r\n")
            return
        rest, self._greeting, self._greeted = self._greeting[end:], b"", True
        if rest:
            self._client.write(rest)
        assert self._transport is not None
        self._client.sink_ready(self._transport)

    # Flow control: when the client is slow to read, stop reading the sink, and back.
    def pause_writing(self) -> None:
        self._client.pause_reading()

    def resume_writing(self) -> None:
        self._client.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.close()


class _ClientSide(asyncio.Protocol):
    """One client session: plaintext until STARTTLS, then a TLS-to-plaintext byte relay."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._sink: asyncio.Transport | None = None
        self._buffer = b""
        # Plaintext commands before STARTTLS; bytes held while the sink connection opens.
        self._upgrading = False
        self._pending: list[bytes] = []
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.write(data)
        elif self._upgrading:
            self._pending.append(data)
        else:
            self._plaintext(data)

    def _plaintext(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        while not self._upgrading:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > MAX_LINE:
                    self.fail(b"500 5.5.2 line too long\r\n")
                return
            line, self._buffer = self._buffer[:newline].rstrip(b"\r"), self._buffer[newline + 1 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                self._transport.write(EHLO_REPLY)
            elif verb == b"HELO":
                self._transport.write(HELO_REPLY)
            elif line.upper() == b"STARTTLS":
                self._transport.write(b"220 2.0.0 Ready to start TLS\r\n")
                # Whatever followed STARTTLS in the same read was sent before the handshake:
                # RFC 3207 says discard it (it is the classic STARTTLS injection).
                self._buffer = b""
                self._upgrading = True
                self._transport.pause_reading()
                self._front.spawn(self._upgrade())
            elif verb in (b"NOOP", b"RSET"):
                self._transport.write(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                self._transport.write(b"221 2.0.0 Bye\r\n")
                self._transport.close()
                return
            else:
                self._transport.write(b"530 5.7.0 Must issue a STARTTLS command first\r\n")

    async def _upgrade(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._transport is not None
        try:
            tls = await loop.start_tls(
                self._transport,
                self,
                self._front.tls,
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            self.abort()
            return
        if tls is None:  # the client went away during the handshake
            self.abort()
            return
        self._transport = tls
        if self._closed:
            tls.abort()
            return
        host, port = self._front.sink
        try:
            await loop.create_connection(lambda: _SinkSide(self), host, port)
        except OSError:
            self.fail(b"421 4.3.0 sink unavailable\r\n")

    def sink_ready(self, sink: asyncio.Transport) -> None:
        """The sink has greeted: send it what the client said meanwhile, then just relay."""
        if self._closed:
            sink.close()
            return
        self._sink = sink
        for chunk in self._pending:
            sink.write(chunk)
        self._pending.clear()

    def write(self, data: bytes) -> None:
        """Bytes from the sink to the client."""
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    def fail(self, reply: bytes) -> None:
        """Send a final reply and close the session."""
        if self._transport is not None and not self._closed:
            self._transport.write(reply)
        self.close()

    def close(self) -> None:
        """Close both sides, flushing what was written."""
        if self._closed:
            return
        self._closed = True
        if self._transport is not None:
            self._transport.close()
        if self._sink is not None:
            self._sink.close()

    def abort(self) -> None:
        """Drop both sides without flushing."""
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        if self._sink is not None:
            self._sink.abort()

    def pause_writing(self) -> None:
        if self._sink is not None:
            self._sink.pause_reading()

    def resume_writing(self) -> None:
        if self._sink is not None:
            self._sink.resume_reading()

    def pause_reading(self) -> None:
        """Stop reading the client (the sink's buffer is full)."""
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the client again."""
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._upgrading and self._sink is None and not self._closed:
            # start_tls is still running or the sink is connecting: let _upgrade see it.
            self._closed = True
            return
        self.close()


class Front:
    """The listening side: owns the TLS context, the sink address and the upgrade tasks."""

    def __init__(self, tls: ssl.SSLContext, sink: tuple[str, int]) -> None:
        self.tls = tls
        self.sink = sink
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a connection's upgrade; the front keeps a reference and cancels it at exit."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Cancel upgrades still in progress."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context with the test CA's certificate; TLS 1.2 at least, as eobblast wants."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


async def _stdin_closed() -> None:
    # The parent holds our stdin open: EOF means it exited (even if it was SIGKILLed).
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


async def serve(cert: str, key: str, sink: tuple[str, int], listen: tuple[str, int]) -> None:
    """Listen, print the port, relay until told to stop."""
    loop = asyncio.get_running_loop()
    front = Front(server_tls_context(cert, key), sink)
    server = await loop.create_server(
        lambda: _ClientSide(front), listen[0], listen[1], backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    watcher = loop.create_task(_stdin_closed())
    watcher.add_done_callback(lambda _: stop.set())
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        server.close()
        await front.aclose()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cert", required=True, help="server certificate (PEM)")
    parser.add_argument("--key", required=True, help="server private key (PEM)")
    parser.add_argument("--sink", required=True, type=_address, help="smtp-sink host:port")
    parser.add_argument("--listen", default="127.0.0.1:0", type=_address, help="host:port")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.cert, args.key, args.sink, args.listen))


if __name__ == "__main__":
    main()
