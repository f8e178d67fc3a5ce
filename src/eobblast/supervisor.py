"""`eobblast run`: one worker process per core, restarted when it dies, drained on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.process import BaseProcess
from pathlib import Path

from eobblast.config import Config
from eobblast.observe.metrics import SupervisorMetrics

log = logging.getLogger("eobblast.supervisor")
# A worker that dies sooner than this after starting counts as crash-looping.
_HEALTHY_AFTER = 10.0
# So does one restarted this many times within _LOOP_WINDOW seconds, however long each ran.
_LOOP_RESTARTS = 3
_LOOP_WINDOW = 300.0
# The supervisor's loop renews its health every 0.2 s; older than this, it is not news.
_HEALTH_STALE = 5.0
_MAX_RESTART_DELAY = 30.0
_MIN_BACKOFF = 0.5


def _forget_gauges(pid: int | None) -> None:
    """Drop a dead worker's live gauges (in flight, oldest in flight) from the sums: they
    would otherwise report its last values until the supervisor itself restarts."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if pid is None or not directory:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _worker_main(config: Config, index: int, log_level: str) -> None:
    """Entry point of a worker process."""
    from eobblast.observe.logs import configure_logging
    from eobblast.worker import run_worker

    configure_logging(log_level)
    # Ctrl-C reaches the whole process group; only the supervisor decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        parent = multiprocessing.parent_process()
        if parent is not None:
            # The supervisor died without stopping us (SIGKILL, OOM): drain and exit rather
            # than run on as an orphan nobody supervises.
            def orphaned() -> None:
                loop.remove_reader(parent.sentinel)
                log.warning("supervisor gone; stopping")
                stop.set()

            loop.add_reader(parent.sentinel, orphaned)
        await run_worker(config, index, stop)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
    else:
        uvloop.run(main())


def worker_count(config: Config) -> int:
    """Configured worker processes; 0 means one per CPU core."""
    return config.workers.count if config.workers.count > 0 else (os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class Health:
    """What `/healthz` reports of the workers, as the supervisor last saw them."""

    status: str  # starting, ok, degraded (a worker dead or crash-looping), stopping
    workers: int
    alive: int
    restarting: tuple[int, ...] = ()  # dead, waiting for their restart
    # Died within _HEALTHY_AFTER of a start and not alive that long since, or restarted
    # _LOOP_RESTARTS times within _LOOP_WINDOW.
    crash_looping: tuple[int, ...] = ()
    restarts: int = 0
    seen_at: float = field(default_factory=time.monotonic, compare=False)

    @property
    def ok(self) -> bool:
        """Whether every worker runs and none is crash-looping."""
        return self.status == "ok"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "status": self.status,
            "workers": self.workers,
            "alive": self.alive,
            "restarting": list(self.restarting),
            "crash_looping": list(self.crash_looping),
            "restarts": self.restarts,
        }


class Supervisor:
    """Starts N worker processes, restarts any that die, stops them all gracefully."""

    def __init__(
        self,
        config: Config,
        *,
        workers: int | None = None,
        log_level: str = "INFO",
        on_restart: Callable[[int, int | None], None] | None = None,
    ) -> None:
        self._config = config
        self._count = workers if workers is not None else worker_count(config)
        self._log_level = log_level
        self._on_restart = on_restart
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[int, BaseProcess] = {}
        self._started_at: dict[int, float] = {}
        self._restart_at: dict[int, float] = {}
        self._delay: dict[int, float] = {}
        self._looping: set[int] = set()  # died within _HEALTHY_AFTER of their start
        self._restarted: dict[int, deque[float]] = {}  # restart times, within _LOOP_WINDOW
        self._restarts = 0
        self.metrics = SupervisorMetrics()
        # Replaced whole by the supervisor's loop; read by the metrics server's threads.
        self.health = Health("starting", self._count, 0)

    def health_report(self) -> tuple[bool, dict[str, object]]:
        """What /healthz answers: whether all is well, and the JSON body. A snapshot the
        loop has not renewed for _HEALTH_STALE seconds is reported as `stale`."""
        seen = self.health  # one read: the loop replaces it whole
        body = seen.as_dict()
        if seen.status == "ok" and time.monotonic() - seen.seen_at > _HEALTH_STALE:
            return False, body | {"status": "stale"}
        return seen.ok, body

    @property
    def pids(self) -> dict[int, int | None]:
        """Worker index -> pid of its current process."""
        return {index: proc.pid for index, proc in self._processes.items()}

    def _spawn(self, index: int) -> None:
        process = self._context.Process(
            target=_worker_main,
            args=(self._config, index, self._log_level),
            name=f"eobblast-worker-{index}",
        )
        process.start()
        self._processes[index] = process
        self._started_at[index] = time.monotonic()
        log.info("worker started", extra={"index": index, "pid": process.pid})

    def _check(self) -> None:
        now = time.monotonic()
        for index, process in list(self._processes.items()):
            if process.is_alive():
                if now - self._started_at[index] >= _HEALTHY_AFTER:
                    self._looping.discard(index)
                continue
            if index not in self._restart_at:
                _forget_gauges(process.pid)
                lived = now - self._started_at[index]
                delay = self._config.workers.restart_delay
                if lived >= _HEALTHY_AFTER:
                    self._looping.discard(index)  # it ran long enough before it died
                else:
                    self._looping.add(index)
                    # Doubling from at least _MIN_BACKOFF: restart_delay = 0 must not make a
                    # worker that dies at once respawn in a tight loop.
                    previous = max(self._delay.get(index, 0), _MIN_BACKOFF / 2)
                    delay = min(_MAX_RESTART_DELAY, max(delay, previous * 2))
                self._delay[index] = delay
                self._restart_at[index] = now + delay
                log.warning(
                    "worker died; restarting",
                    extra={"index": index, "exitcode": process.exitcode, "delay": delay},
                )
            if now >= self._restart_at[index]:
                del self._restart_at[index]
                self._restarts += 1
                self._restarted.setdefault(index, deque()).append(now)
                self.metrics.worker_restarts.inc()
                if self._on_restart is not None:
                    self._on_restart(index, process.exitcode)
                process.close()
                self._spawn(index)
        self._see_health()

    def _see_health(self) -> None:
        now = time.monotonic()
        for times in self._restarted.values():
            while times and times[0] <= now - _LOOP_WINDOW:
                times.popleft()
        often = {index for index, times in self._restarted.items() if len(times) >= _LOOP_RESTARTS}
        restarting = tuple(sorted(self._restart_at))
        looping = tuple(sorted(self._looping | often))
        alive = len(self._processes) - len(restarting)
        status = "ok" if alive == self._count and not looping else "degraded"
        self.health = Health(status, self._count, alive, restarting, looping, self._restarts)

    async def run(self, stop: asyncio.Event) -> None:
        """Run the workers until `stop` is set, then stop them within the grace period."""
        for index in range(self._count):
            self._spawn(index)
        self._see_health()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await stop.wait()
                if not stop.is_set():
                    self._check()
        finally:
            self.health = replace(self.health, status="stopping")
            await self._stop_all()

    async def _stop_all(self) -> None:
        processes = list(self._processes.values())
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker drains and commits
        # As long as a worker's drain may last: killed sooner, its last commit is lost.
        # Imported here: the worker's modules (Kafka client, pipeline) load in the workers,
        # not in the supervisor or in `eobblast check`, which asks it for a worker count.
        from eobblast.worker import stop_budget

        deadline = time.monotonic() + stop_budget(self._config.workers.grace_period)
        for process in processes:
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.to_thread(process.join, remaining)
            if process.is_alive():
                log.warning("worker did not stop in time; killing", extra={"pid": process.pid})
                process.kill()
                await asyncio.to_thread(process.join, 5.0)
            _forget_gauges(process.pid)
        log.info("workers stopped", extra={"count": len(processes)})


def prepare_multiprocess_metrics() -> Path:
    """A fresh directory for worker metrics; must be set before workers import the client."""
    directory = Path(tempfile.mkdtemp(prefix="eobblast-metrics-"))
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory
