"""The supervisor's restart backoff and its bookkeeping of dead workers' metrics."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, multiprocess

from eobblast.config import load_config
from eobblast.supervisor import Supervisor, _forget_gauges


class DeadAtOnce:
    """A worker process that has already exited."""

    pid = None
    exitcode = 1

    def is_alive(self) -> bool:
        return False

    def close(self) -> None:
        pass


class NoSpawn(Supervisor):
    """A supervisor whose workers die as soon as they are started."""

    def _spawn(self, index: int) -> None:
        self._processes[index] = DeadAtOnce()  # type: ignore[assignment]
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
