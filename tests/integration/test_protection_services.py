"""Worker processes that start together agree on one escrow key ring and one secret."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest

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
