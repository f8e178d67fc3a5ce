"""deploy/alerts.yml on a real Prometheus (Debian `prometheus`) scraping a real `eobblast run`.

The promtool unit tests (tests/unit/test_monitoring.py) feed series written by hand; here
the series are the ones a running eobblast serves over HTTP, summed over its worker
processes, and the rules are evaluated by the server ops run.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from eobblast.streams import EmbeddedBroker
from tests.integration.worker_stack import (
    DIE_WITH_PARENT,
    Stack,
    accept_domains,
    sandbox_stack,
    start_eobblast_run,
    until,
)
from tests.kafka_fixtures import free_port

ROOT = Path(__file__).parents[2]
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian prometheus; make system-deps)"
)


@pytest.fixture
async def stack(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stack]:
    async with sandbox_stack(broker, tmp_path, accept_domains(23)) as built:
        yield built


async def _stopped(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def eobblast_run(stack: Stack, tmp_path: Path) -> AsyncIterator[int]:
    """`eobblast run` with one worker; yields its metrics port."""
    port = free_port()
    settings = stack.settings(count=1)
    settings["metrics"] = {"port": port, "address": "127.0.0.1"}
    process = await start_eobblast_run(settings, tmp_path / "eobblast.toml")
    try:
        yield port
    finally:
        await _stopped(process)
    assert process.returncode == 0


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target: str) -> AsyncIterator[httpx.AsyncClient]:
    """A Prometheus server with eobblast's alert rules, scraping `target` every second."""
    assert PROMETHEUS is not None
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy/alerts.yml")],
        "scrape_configs": [{"job_name": "eobblast", "static_configs": [{"targets": [target]}]}],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *DIE_WITH_PARENT,
            PROMETHEUS,
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=log,
            stderr=log,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/-/ready")).status_code == 200:
                        break
                if time.monotonic() > deadline or process.returncode is not None:
                    log_text = (tmp_path / "prometheus.log").read_text(errors="replace")
                    raise AssertionError(f"Prometheus did not start:\n{log_text[-3000:]}")
                await asyncio.sleep(0.2)
            yield client
    finally:
        await _stopped(process)


async def _query(client: httpx.AsyncClient, promql: str) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/query", params={"query": promql})
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


async def _alerts(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/alerts")
    response.raise_for_status()
    alerts: list[dict[str, Any]] = response.json()["data"]["alerts"]
    return alerts


async def test_the_first_dead_letter_after_start_fires_its_alert(
    stack: Stack, tmp_path: Path
) -> None:
    rejected = 'eobblast_events_total{outcome="rejected", reason="invalid_json"}'
    async with (
        eobblast_run(stack, tmp_path) as metrics_port,
        prometheus(tmp_path, f"127.0.0.1:{metrics_port}") as client,
    ):
        # Before any bad input, the reason's count is there at 0: the sample that lets
        # increase() see the first rejection.
        async def zero() -> bool:
            return [float(s["value"][1]) for s in await _query(client, rejected)] == [0.0]

        await until("the worker exports rejections at 0", zero, 60, every=0.5)
        await stack.publish([b"this is not json"] * 3, keys=[b"m-1"] * 3)

        async def firing() -> list[dict[str, Any]]:
            return [
                alert
                for alert in await _alerts(client)
                if alert["labels"]["alertname"] == "EobblastDeadLetters"
                and alert["state"] == "firing"
            ]

        alerts = await until("EobblastDeadLetters fires", firing, 60, every=0.5)
        assert [alert["labels"] for alert in alerts] == [
            {"alertname": "EobblastDeadLetters", "reason": "invalid_json", "severity": "warning"}
        ]
        # increase() extrapolates a little past the samples: "3", perhaps "4".
        counted, text = alerts[0]["annotations"]["summary"].split(" ", 1)
        assert int(counted) >= 3 and text == "events rejected to the DLQ (invalid_json)"
        others = {alert["labels"]["alertname"] for alert in await _alerts(client)}
        assert others == {"EobblastDeadLetters"}  # nothing else fires on a healthy run
        # Every rule of the file is loaded and evaluates cleanly on the real series, and
        # the recorded series have values (0 on a run with nothing deferred or delivered).
        response = await client.get("/api/v1/rules")
        rules = [rule for group in response.json()["data"]["groups"] for rule in group["rules"]]
        groups = yaml.safe_load((ROOT / "deploy/alerts.yml").read_text())["groups"]
        assert len(rules) == sum(len(group["rules"]) for group in groups)
        assert {rule["health"] for rule in rules} == {"ok"}, [
            (rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"
        ]
        for record in ("eobblast:temporary_failures:rate15m", "eobblast:delivered:rate15m"):
            assert [float(s["value"][1]) for s in await _query(client, record)] == [0.0]
        assert [s["value"][1] for s in await _query(client, 'up{job="eobblast"}')] == ["1"]
