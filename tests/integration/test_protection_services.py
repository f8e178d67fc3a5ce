"""Worker processes that start together agree on one escrow key ring and one secret."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from eobblast.config import load_config
from eobblast.protect.escrow import EscrowIntegrityError, KeyRing
from eobblast.protect.services import (
    ProtectionServices,
    load_or_create_keyring,
    load_or_create_secret,
)


def _open(directory: str, results: multiprocessing.Queue[tuple[str, bytes]], start: Any) -> None:
    start.wait()  # all at once, as the supervisor's workers do
    ring = load_or_create_keyring(Path(directory) / "keys")
    secret = load_or_create_secret(Path(directory) / "keys" / "audit.key")
    results.put((ring.active_id, secret))


def test_processes_starting_together_share_one_key_ring_and_secret(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    for attempt in range(10):
        directory = tmp_path / str(attempt)
        results: multiprocessing.Queue[tuple[str, bytes]] = context.Queue()
        start = context.Barrier(4)
        processes = [
            context.Process(target=_open, args=(str(directory), results, start)) for _ in range(4)
        ]
        for process in processes:
            process.start()
        seen = [results.get(timeout=30) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        assert all(process.exitcode == 0 for process in processes)
        assert len(set(seen)) == 1  # one active key and one secret, not one per process
        assert len(list((directory / "keys").glob("*.key"))) == 2  # the ring's key + audit.key


async def test_the_member_reference_key_beside_the_escrow_keys_never_opens_an_envelope(
    tmp_path: Path,
) -> None:
    # The default layout keeps audit.key in the escrow key directory. Loaded as an escrow
    # key, whoever holds that secret could plant an "EOB" the portal would show.
    keys = tmp_path / "portal-keys"
    config = load_config(
        environ={},
        overrides={
            "portal": {
                "key_dir": str(keys),
                "audit_key_file": str(keys / "audit.key"),
                "escrow_url": f"sqlite:///{tmp_path / 'escrow.db'}",
                "audit_url": f"sqlite:///{tmp_path / 'audit.db'}",
            }
        },
    )
    for _ in range(2):  # the second start finds audit.key there
        services = await ProtectionServices.open(config)
        try:
            assert (keys / "audit.key").exists()
            assert services.escrow is not None
            ring = services.escrow.keys
            assert ring.key_ids == {ring.active_id}
            planted = KeyRing({"audit": services.audit_key}, "audit").seal("evt-1", b"<p>x</p>")
            with pytest.raises(EscrowIntegrityError):
                ring.open("evt-1", planted)
        finally:
            await services.close()


def _config(tmp_path: Path) -> dict[str, Any]:
    keys = tmp_path / "portal-keys"
    return {
        "portal": {
            "key_dir": str(keys),
            "audit_key_file": str(keys / "audit.key"),
            "escrow_url": f"sqlite:///{tmp_path / 'escrow.db'}",
            "audit_url": f"sqlite:///{tmp_path / 'audit.db'}",
            "listen_port": 0,
        },
        "bounces": {
            "verp_key_file": str(tmp_path / "keys" / "verp.key"),
            "store_url": f"sqlite:///{tmp_path / 'bounces.db'}",
            "listen_port": 0,
        },
        # Nothing listens here: the listener must fail on its key before it needs Kafka.
        "kafka": {"bootstrap": "127.0.0.1:9"},
    }


def _key_files(directory: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in directory.rglob("*.key")}


def _eobblast(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eobblast", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("command", ["portal", "bounces"])
def test_listeners_refuse_to_make_keys_of_their_own(tmp_path: Path, command: str) -> None:
    # Started on a host without the workers' keys, the bounce listener used to make a VERP
    # key of its own (every DSN then failed the VERP check) and the portal a key ring
    # that opens no envelope. They read the keys now, and a missing one is an error.
    config_file = tmp_path / "eobblast.toml"
    config_file.write_text(tomli_w.dumps(_config(tmp_path)))
    refused = _eobblast(command, "--config", str(config_file))
    assert refused.returncode == 1, refused.stderr
    assert "eobblast keys secrets" in refused.stderr and "Traceback" not in refused.stderr
    assert str(tmp_path / "portal-keys") in refused.stderr
    assert not list(tmp_path.rglob("*.key")) and not list(tmp_path.rglob("active"))
    if command == "bounces":
        # With the escrow keys in place, the missing VERP key is what it names.
        ring = KeyRing.generate(tmp_path / "portal-keys")
        load_or_create_secret(tmp_path / "portal-keys" / "audit.key")
        refused = _eobblast(command, "--config", str(config_file))
        assert refused.returncode == 1 and "VERP key" in refused.stderr, refused.stderr
        assert "Unclosed" not in refused.stderr  # nothing it opened is left behind
        assert str(tmp_path / "keys" / "verp.key") in refused.stderr
        assert not (tmp_path / "keys" / "verp.key").exists()
        assert len(list((tmp_path / "portal-keys").glob("k*.key"))) == 1  # none added
        assert (tmp_path / "portal-keys" / "active").read_text().strip() == ring.active_id


async def test_keys_secrets_creates_what_the_workers_would_and_keeps_it(tmp_path: Path) -> None:
    settings = _config(tmp_path)
    config_file = tmp_path / "eobblast.toml"
    config_file.write_text(tomli_w.dumps(settings))
    first = _eobblast("keys", "secrets", "--config", str(config_file))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"created VERP key: {tmp_path / 'keys' / 'verp.key'}",
        f"created escrow key ring: {tmp_path / 'portal-keys'}",
        f"created member-reference key: {tmp_path / 'portal-keys' / 'audit.key'}",
    ]
    made = _key_files(tmp_path)
    assert len(made) == 3 and all(p.stat().st_mode & 0o077 == 0 for p in made)
    again = _eobblast("keys", "secrets", "--config", str(config_file))
    assert again.returncode == 0 and again.stdout.count("kept ") == 3
    assert _key_files(tmp_path) == made
    # What a worker opens (creating nothing) is what a reading listener opens.
    config = load_config(config_file, environ={})
    worker = await ProtectionServices.open(config)
    reader = await ProtectionServices.open(config, create_keys=False)
    try:
        assert worker.audit_key == reader.audit_key
        assert worker.escrow is not None and reader.escrow is not None
        sealed = worker.escrow.keys.seal("evt-1", b"<p>EOB</p>")
        assert reader.escrow.keys.open("evt-1", sealed) == b"<p>EOB</p>"
    finally:
        await worker.close()
        await reader.close()
    assert _key_files(tmp_path) == made
