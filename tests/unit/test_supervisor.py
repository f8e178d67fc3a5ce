"""The supervisor's restart backoff and its bookkeeping of dead workers' metrics."""

from __future__ import annotations

import multiprocessing
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from prometheus_client import CollectorRegistry, multiprocess

from eobblast import worker
from eobblast.config import load_config
from eobblast.observe.metrics import SupervisorMetrics, serve_multiprocess_metrics
from eobblast.supervisor import (
    _HEALTHY_AFTER,
    _LOOP_RESTARTS,
    _LOOP_WINDOW,
    Health,
    Supervisor,
    _forget_gauges,
)


class DeadAtOnce:
    """A worker process that has already exited."""

    pid = None
    exitcode = 1

    def is_alive(self) -> bool:
        return False

    def close(self) -> None:
        pass


class NoSpawn(Supervisor):
    """A supervisor whose worker processes are `process()`, not real ones: by default,
    ones that die as soon as they are started."""

    process: Callable[[], Any] = DeadAtOnce

    def _spawn(self, index: int) -> None:
        self._processes[index] = self.process()
        self._started_at[index] = time.monotonic()


def test_a_worker_that_keeps_dying_is_restarted_with_backoff_even_at_delay_zero() -> None:
    config = load_config(environ={}, overrides={"workers": {"restart_delay": 0}})
    supervisor = NoSpawn(config, workers=1)
    supervisor._spawn(0)
    delays = []
    for _ in range(4):
        supervisor._check()  # finds it dead: schedules the restart
        delays.append(supervisor._delay[0])
        supervisor._restart_at[0] = 0.0  # due now
        supervisor._check()  # restarts it (it dies again)
    assert delays == [0.5, 1.0, 2.0, 4.0]


def _set_gauge() -> None:
    # A worker process: PROMETHEUS_MULTIPROC_DIR came with its environment.
    from eobblast.observe import metrics

    metrics.IN_FLIGHT.set(256)


def _in_flight(directory: str) -> float | None:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry.get_sample_value("eobblast_events_in_flight")


def test_a_dead_workers_gauges_leave_the_sums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = str(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", directory)
    worker = multiprocessing.get_context("spawn").Process(target=_set_gauge)
    worker.start()
    worker.join(60)
    assert _in_flight(directory) == 256  # a crashed worker's last value, still summed
    _forget_gauges(worker.pid)
    assert not _in_flight(directory)


def test_negative_worker_timings_are_refused() -> None:
    from eobblast.errors import ConfigError

    for name in ("restart_delay", "grace_period", "stuck_after"):
        with pytest.raises(ConfigError, match=f"workers.{name}"):
            load_config(environ={}, overrides={"workers": {name: -1}})


class Running:
    """A worker process that is running, until `die` is called."""

    pid = None
    exitcode: int | None = None

    def __init__(self) -> None:
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive

    def die(self) -> None:
        self.alive, self.exitcode = False, -9

    def close(self) -> None:
        pass


class Healthy(NoSpawn):
    """A supervisor of `Running` processes."""

    process = Running


def test_health_says_which_workers_are_down_or_crash_looping() -> None:
    config = load_config(environ={}, overrides={"workers": {"restart_delay": 5}})
    supervisor = Healthy(config, workers=2)
    assert supervisor.health.status == "starting"
    for index in (0, 1):
        supervisor._spawn(index)
    supervisor._check()
    assert supervisor.health == Health("ok", 2, 2)
    assert supervisor.health.ok

    # Worker 1 dies within seconds of its start: down, then back but crash-looping.
    cast(Running, supervisor._processes[1]).die()
    supervisor._check()
    assert supervisor.health == Health("degraded", 2, 1, (1,), (1,))
    supervisor._restart_at[1] = 0.0  # its restart is due
    supervisor._check()
    assert supervisor.health == Health("degraded", 2, 2, (), (1,), restarts=1)
    assert not supervisor.health.ok
    # Alive long enough since: healthy again.
    supervisor._started_at[1] -= _HEALTHY_AFTER
    supervisor._check()
    assert supervisor.health == Health("ok", 2, 2, restarts=1)

    # A worker that had run a long while dies: down until restarted, not crash-looping.
    supervisor._started_at[0] -= _HEALTHY_AFTER
    cast(Running, supervisor._processes[0]).die()
    supervisor._check()
    assert supervisor.health == Health("degraded", 2, 1, (0,), (), restarts=1)
    assert supervisor.health.as_dict() == {
        "status": "degraded",
        "workers": 2,
        "alive": 1,
        "restarting": [0],
        "crash_looping": [],
        "restarts": 1,
    }
    supervisor._restart_at[0] = 0.0
    supervisor._check()
    assert supervisor.health.ok


def test_a_worker_restarted_again_and_again_is_crash_looping_however_long_it_ran() -> None:
    config = load_config(environ={}, overrides={"workers": {"restart_delay": 0}})
    supervisor = Healthy(config, workers=1)
    supervisor._spawn(0)
    statuses = []
    for _ in range(_LOOP_RESTARTS):
        supervisor._started_at[0] -= _HEALTHY_AFTER  # it ran long enough each time
        cast(Running, supervisor._processes[0]).die()
        supervisor._check()  # restarted at once (restart_delay 0, not a short life)
        statuses.append((supervisor.health.status, supervisor.health.crash_looping))
    assert statuses[:-1] == [("ok", ())] * (_LOOP_RESTARTS - 1)
    assert statuses[-1] == ("degraded", (0,))
    # The restarts age out of the window: healthy again.
    supervisor._restarted[0] = deque(t - _LOOP_WINDOW for t in supervisor._restarted[0])
    supervisor._check()
    assert supervisor.health.ok


def test_a_health_the_loop_stopped_renewing_is_not_reported_as_ok() -> None:
    supervisor = Healthy(load_config(environ={}, overrides={}), workers=1)
    supervisor._spawn(0)
    supervisor._check()
    assert supervisor.health_report() == (True, supervisor.health.as_dict())
    supervisor.health = replace(supervisor.health, seen_at=time.monotonic() - 60)
    ok, body = supervisor.health_report()
    assert not ok and body["status"] == "stale"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_healthz_answers_beside_the_metrics(tmp_path: Path) -> None:
    seen: list[tuple[bool, dict[str, object]]] = [(True, {"status": "ok"})]
    supervisor = SupervisorMetrics()
    supervisor.worker_restarts.inc()
    port = serve_multiprocess_metrics(
        0, "127.0.0.1", str(tmp_path), supervisor, health=lambda: seen[-1]
    )
    base = f"http://127.0.0.1:{port}"
    assert _get(f"{base}/healthz") == (200, b'{"status":"ok"}\n')
    seen.append((False, {"status": "degraded", "alive": 1}))
    code, body = _get(f"{base}/healthz")
    assert (code, orjson.loads(body)) == (503, {"status": "degraded", "alive": 1})
    for path in ("/metrics", "/"):
        code, body = _get(f"{base}{path}")
        assert code == 200 and b"eobblast_worker_restarts_total 1.0" in body
    assert _get(f"{base}/healthz/")[0] == 503
    # A probe at a wrong path is told so, not given the metrics as a 200.
    for wrong in ("/health", "/readyz", "/healthz/x"):
        assert _get(f"{base}{wrong}")[0] == 404, wrong
    head = urllib.request.Request(f"{base}/healthz", method="HEAD")
    seen.append((True, {"status": "ok"}))
    with urllib.request.urlopen(head, timeout=10) as reply:
        assert (reply.status, reply.read()) == (200, b"")
    request = urllib.request.Request(f"{base}/healthz", data=b"", method="POST")
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as error:
        assert error.code == 405
    else:
        raise AssertionError("POST /healthz was answered")


class Draining(Running):
    """A worker process told to stop, that drains until its supervisor stops waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.waited: list[float] = []
        self.killed = False

    def terminate(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        self.waited.append(timeout or 0.0)
        self.alive = False  # done draining, just in time

    def kill(self) -> None:
        self.killed = True


async def test_workers_told_to_stop_are_given_their_whole_drain_before_a_kill() -> None:
    # The supervisor killed a worker grace + 5 s after SIGTERM, while its drain may go on
    # past the grace period: cancelling what outlived it, the status marks, the offset
    # commit and the Kafka clients' stop each have a timeout of their own.
    grace = 20.0
    config = load_config(environ={}, overrides={"workers": {"grace_period": grace}})
    supervisor = NoSpawn(config, workers=2)
    supervisor.process = Draining
    for index in range(2):
        supervisor._spawn(index)
    processes = [cast(Draining, p) for p in supervisor._processes.values()]
    await supervisor._stop_all()
    waited = processes[0].waited[0]
    assert waited >= worker.stop_budget(grace) - 1.0
    drain = (
        grace
        + worker.CANCEL_ROUNDS * worker.CANCEL_ROUND
        + 2 * worker.COMMIT_TIMEOUT  # the status marks, then the offsets
        + worker.CLOSE_TIMEOUT
    )
    assert waited > drain
    assert not any(p.killed for p in processes)
