"""Whole-file writes and the cross-process lock used for keys, secrets and certificates."""

from __future__ import annotations

import multiprocessing
import os
import stat
import time
from pathlib import Path
from typing import Any

from eobblast._files import file_lock, write_whole
from eobblast.protect.services import load_or_create_secret


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_whole_sets_the_mode_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    old = os.umask(0o000)  # the most permissive umask: the mode must not come from it
    try:
        target = tmp_path / "secret.key"
        assert write_whole(target, b"one\n")
        assert target.read_bytes() == b"one\n" and _mode(target) == 0o600
        assert write_whole(target, b"two\n", mode=0o644)
        assert target.read_bytes() == b"two\n" and _mode(target) == 0o644
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]


def test_write_whole_without_replace_keeps_the_first_file(tmp_path: Path) -> None:
    target = tmp_path / "dkim.pem"
    assert write_whole(target, b"first", replace=False)
    assert not write_whole(target, b"second", replace=False)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["dkim.pem"]


def test_a_created_secret_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        secret = load_or_create_secret(tmp_path / "keys" / "verp.key")
    finally:
        os.umask(old)
    path = tmp_path / "keys" / "verp.key"
    assert len(secret) == 32 and _mode(path) == 0o600
    assert load_or_create_secret(path) == secret  # read back, not made again


def _count_under_lock(lock: str, counter: str, rounds: int, start: Any) -> None:
    start.wait()  # all at once
    for _ in range(rounds):
        with file_lock(Path(lock)):
            path = Path(counter)
            value = int(path.read_text()) if path.exists() else 0
            time.sleep(0.0005)  # a wide window for another process's update to be lost
            path.write_text(str(value + 1))


def test_the_lock_serialises_processes(tmp_path: Path) -> None:
    # Unlocked, read-increment-write from four processes loses updates; locked, none.
    context = multiprocessing.get_context("spawn")
    lock, counter = str(tmp_path / ".lock"), str(tmp_path / "counter")
    start = context.Barrier(4)
    processes = [
        context.Process(target=_count_under_lock, args=(lock, counter, 200, start))
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(timeout=60)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    assert all(process.exitcode == 0 for process in processes)
    assert Path(counter).read_text() == "800"
