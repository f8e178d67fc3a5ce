"""Worker processes that start together agree on one escrow key ring and one secret."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from eobblast.protect.services import load_or_create_keyring, load_or_create_secret


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
