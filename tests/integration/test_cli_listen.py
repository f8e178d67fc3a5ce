"""The long-running commands on a port another process holds: a line naming the setting,
the address and the cause, exit 1, no traceback, nothing started."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from eobblast.protect.dkim import generate_keys
from eobblast.streams import EmbeddedBroker

IN_USE = "Address already in use"


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A loopback port this test listens on, for its duration: nobody else can have it."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def _settings(tmp_path: Path, bootstrap: str = "127.0.0.1:9") -> dict[str, Any]:
    """Stores and keys in `tmp_path`; brokers at `bootstrap` (by default, refused at once)."""
    return {
        "dkim": {"key_dir": str(tmp_path / "keys")},
        "kafka": {"bootstrap": bootstrap},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "portal": {
            "escrow_url": f"sqlite:///{tmp_path / 'escrow.db'}",
            "audit_url": f"sqlite:///{tmp_path / 'audit.db'}",
            "key_dir": str(tmp_path / "portal-keys"),
            "audit_key_file": str(tmp_path / "portal-keys" / "audit.key"),
        },
        "bounces": {
            "store_url": f"sqlite:///{tmp_path / 'bounces.db'}",
            "verp_key_file": str(tmp_path / "keys" / "verp.key"),
            "review_dir": str(tmp_path / "review"),
        },
    }


def eobblast(
    tmp_path: Path, settings: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[str]:
    """`eobblast COMMAND --config FILE ARGS...` on `settings`, the secrets made first (the
    portal and the bounce listener only read them)."""
    config_file = tmp_path / "eobblast.toml"
    config_file.write_text(tomli_w.dumps(settings))
    command = [sys.executable, "-m", "eobblast"]
    made = subprocess.run(
        [*command, "keys", "secrets", "--config", str(config_file)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return subprocess.run(
        [*command, args[0], "--config", str(config_file), *args[1:]],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip


def assert_refused(done: subprocess.CompletedProcess[str], said: str) -> None:
    assert done.returncode == 1, done.stderr
    assert f"Error: {said}\n" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_run_says_its_metrics_port_is_taken_and_starts_no_worker(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    generate_keys(tmp_path / "keys", "acme-health.com", "eob1")
    with held_port() as port:
        settings["metrics"] = {"port": port}
        done = eobblast(tmp_path, settings, "run")
    assert_refused(done, f"metrics.port: cannot listen on 127.0.0.1:{port}: {IN_USE}")
    assert '"msg":"worker started"' not in done.stderr


@pytest.mark.parametrize("given", ["setting", "option"])
def test_portal_says_its_port_is_taken(tmp_path: Path, given: str) -> None:
    settings = _settings(tmp_path)
    with held_port() as port:
        if given == "option":
            done = eobblast(tmp_path, settings, "portal", "--port", str(port))
        else:
            settings["portal"]["listen_port"] = port
            done = eobblast(tmp_path, settings, "portal")
    setting = "--port" if given == "option" else "portal.listen_port"
    assert_refused(done, f"{setting}: cannot listen on 127.0.0.1:{port}: {IN_USE}")


def test_portal_says_its_metrics_port_is_taken(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    settings["portal"]["listen_port"] = 0
    with held_port() as port:
        settings["portal"]["metrics_port"] = port
        done = eobblast(tmp_path, settings, "portal")
    assert_refused(done, f"portal.metrics_port: cannot listen on 127.0.0.1:{port}: {IN_USE}")
    assert "portal on http" not in done.stderr  # it did not serve members meanwhile


@pytest.mark.parametrize("given", ["setting", "option"])
def test_bounces_says_its_port_is_taken_before_waiting_for_the_broker(
    tmp_path: Path, given: str
) -> None:
    # The broker is refused: the command would wait for it (backing off) before listening.
    settings = _settings(tmp_path)
    with held_port() as port:
        if given == "option":
            done = eobblast(tmp_path, settings, "bounces", "--port", str(port))
        else:
            settings["bounces"]["listen_port"] = port
            done = eobblast(tmp_path, settings, "bounces")
    setting = "--port" if given == "option" else "bounces.listen_port"
    assert_refused(done, f"{setting}: cannot listen on 127.0.0.1:{port}: {IN_USE}")
    assert "Kafka" not in done.stderr  # said before the broker was tried


def test_bounces_says_its_metrics_port_is_taken(broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = _settings(tmp_path, broker.bootstrap)
    settings["bounces"]["listen_port"] = 0
    with held_port() as port:
        settings["bounces"]["metrics_port"] = port
        done = eobblast(tmp_path, settings, "bounces")
    assert_refused(done, f"bounces.metrics_port: cannot listen on 127.0.0.1:{port}: {IN_USE}")


@pytest.mark.parametrize(
    ("address", "cause"),
    [
        ("192.0.2.1", "Cannot assign requested address"),  # TEST-NET-1: not this host's
        ("no-such-host.invalid", None),  # the resolver's words vary
    ],
)
def test_an_address_that_is_not_this_hosts_is_said_too(
    tmp_path: Path, address: str, cause: str | None
) -> None:
    settings = _settings(tmp_path)
    settings["bounces"] |= {"listen_address": address, "listen_port": 0}
    done = eobblast(tmp_path, settings, "bounces")
    said = f"bounces.listen_address: cannot listen on {address}:0: "
    assert_refused(done, said + (cause or done.stderr.partition(said)[2].splitlines()[0]))
