"""Hosts sharing stores must share secrets: a store records the fingerprints of the keys
used with it, and a host whose keys differ (or that would make new ones) is refused.

Each "host" is a directory of its own for its key files; the hosts share one SQLite file
or one PostgreSQL schema for the escrow, the audit trail and the bounce store.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import secrets
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import tomli_w

from eobblast.config import Config, load_config
from eobblast.errors import ConfigError
from eobblast.preflight import Verdict, secret_files
from eobblast.protect.escrow import KeyRing
from eobblast.protect.services import ProtectionServices
from eobblast.state.fingerprints import agree_fingerprints, fingerprint, recorded_fingerprints
from eobblast.worker import open_bounces
from tests.conftest import throwaway_pg_schema


class _NoKafka:
    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        raise AssertionError("nothing is published here")


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One store every host uses: a SQLite file, or a PostgreSQL schema of this test's own
    (what one test records must not meet the next test's keys)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    with throwaway_pg_schema("shared_secrets") as url:
        yield url


def _settings(directory: Path, url: str) -> dict[str, Any]:
    keys = directory / "portal-keys"
    return {
        "portal": {
            "key_dir": str(keys),
            "audit_key_file": str(keys / "audit.key"),
            "escrow_url": url,
            "audit_url": url,
        },
        "bounces": {"verp_key_file": str(directory / "verp.key"), "store_url": url},
    }


def host(directory: Path, url: str) -> Config:
    """A host whose key files are in `directory`, using the stores at `url`."""
    return load_config(environ={}, overrides=_settings(directory, url))


async def start(config: Config) -> None:
    """Open what a worker opens at its start (making missing keys), then close it."""
    protection = await ProtectionServices.open(config)
    try:
        bounces = await open_bounces(config, protection, _NoKafka(), actor="worker-0")
        await bounces.store.close()
    finally:
        await protection.close()


def copy_keys(source: Path, target: Path) -> None:
    """What an operator does: the key files of the first host onto another."""
    shutil.copytree(source, target, dirs_exist_ok=True)


async def first_and_copy(tmp_path: Path, url: str) -> tuple[Path, Path]:
    """The key directories of a first host, started, and of a second one with its copies."""
    first, second = tmp_path / "host-a", tmp_path / "host-b"
    await start(host(first, url))
    copy_keys(first, second)
    return first, second


def write_key(path: Path) -> bytes:
    key = secrets.token_bytes(32)
    path.write_bytes(base64.b64encode(key) + b"\n")
    return key


def _key_texts(directory: Path) -> set[str]:
    return {p.read_text().strip() for p in directory.rglob("*.key")}


async def test_a_second_host_without_the_key_files_is_refused_and_makes_none(
    tmp_path: Path, shared_url: str
) -> None:
    first = tmp_path / "host-a"
    await start(host(first, shared_url))
    second = tmp_path / "host-b"
    with pytest.raises(ConfigError) as refused:
        await start(host(second, shared_url))
    message = str(refused.value)
    assert "[portal] key_dir" in message and str(second / "portal-keys") in message
    assert "one made here would differ" in message
    assert "copy" in message
    assert "from the host that first used the portal.escrow_url store" in message
    # Refused before any key was made: nothing to clean up, nothing that could be used.
    assert not second.exists()
    # With the first host's keys copied, it starts and uses the same keys.
    copy_keys(first, second)
    await start(host(second, shared_url))
    assert _key_texts(second) == _key_texts(first)


async def test_a_missing_verp_key_is_not_made_where_the_store_records_one(
    tmp_path: Path, shared_url: str
) -> None:
    _, second = await first_and_copy(tmp_path, shared_url)
    (second / "verp.key").unlink()
    with pytest.raises(ConfigError, match=r"\[bounces\] verp_key_file .* does not exist, but"):
        await start(host(second, shared_url))
    assert not (second / "verp.key").exists()


@pytest.mark.parametrize(
    ("secret", "named"),
    [
        ("verp.key", r"VERP key 1 in \[bounces\] verp_key_file"),
        ("portal-keys/audit.key", r"member-reference key in \[portal\] audit_key_file"),
        ("escrow", r"escrow key k\S+ in \[portal\] key_dir"),
    ],
)
async def test_a_host_with_a_different_key_is_refused_naming_it(
    tmp_path: Path, shared_url: str, secret: str, named: str
) -> None:
    first, second = await first_and_copy(tmp_path, shared_url)
    if secret == "escrow":
        # The same key id, other key material.
        ring = KeyRing.from_directory(second / "portal-keys", not_keys=[])
        changed = second / "portal-keys" / f"{ring.active_id}.key"
    else:
        changed = second / secret
    theirs = changed.read_text().strip()
    ours = write_key(changed)
    with pytest.raises(ConfigError, match=named) as refused:
        await start(host(second, shared_url))
    message = str(refused.value)
    assert str(changed.parent if secret == "escrow" else changed) in message
    assert "is not the key the" in message and "then start again" in message
    # Neither key, nor its fingerprint, is in what is said.
    for text in (theirs, base64.b64encode(ours).decode(), fingerprint(ours)):
        assert text not in message
    # The first host is not disturbed by the attempt.
    await start(host(first, shared_url))


async def test_a_key_ring_made_on_another_host_is_refused_a_rotated_one_is_not(
    tmp_path: Path, shared_url: str
) -> None:
    # Every file copied but the escrow key ring, which the second host made itself: its
    # key has an id of its own, so no recorded key differs, yet it shares none of them.
    first, second = await first_and_copy(tmp_path, shared_url)
    for path in (second / "portal-keys").glob("k*.key"):
        path.unlink()
    KeyRing.generate(second / "portal-keys", not_keys=[second / "portal-keys" / "audit.key"])
    with pytest.raises(ConfigError, match=r"holds none of the keys the portal\.escrow_url"):
        await start(host(second, shared_url))
    # A rotation: the first host's ring with a new active key, kept beside the old one.
    ring = KeyRing.generate(first / "portal-keys", not_keys=[first / "portal-keys" / "audit.key"])
    await start(host(first, shared_url))
    recorded = await recorded_fingerprints(shared_url, "escrow")
    assert recorded[f"escrow key {ring.active_id}"] == ring.fingerprints[ring.active_id]
    assert len([name for name in recorded if name.startswith("escrow key ")]) == 2
    # Copied, the rotated ring starts on the second host too.
    shutil.rmtree(second)
    copy_keys(first, second)
    await start(host(second, shared_url))


async def test_the_store_records_fingerprints_never_keys(tmp_path: Path, shared_url: str) -> None:
    first = tmp_path / "host-a"
    await start(host(first, shared_url))
    recorded = await recorded_fingerprints(shared_url, "bounce store")
    texts = _key_texts(first)
    assert len(recorded) == len(texts) == 3  # VERP key 1, one escrow key, member-reference key
    assert {"VERP key 1", "member-reference key"} < recorded.keys()
    keys = {base64.b64decode(text) for text in texts}
    assert set(recorded.values()) == {fingerprint(key) for key in keys}
    for key in keys:
        for text in (key.hex(), base64.b64encode(key).decode()):
            assert text not in str(recorded)


def test_hosts_starting_at_once_do_not_both_win(tmp_path: Path, shared_url: str) -> None:
    # Two hosts, neither with keys, start at the same moment on an empty store: each makes
    # its own keys, and only one host's may be recorded. Threads, each with its own event
    # loop and connections, as two machines would be.
    for round_ in range(4):
        url = shared_url
        if url.startswith("sqlite"):
            url = f"sqlite:///{tmp_path / f'shared-{round_}.db'}"
        else:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS secret_fingerprints")
        directories = [tmp_path / str(round_) / name for name in ("a", "b")]
        starts = [functools.partial(_start_in_thread, host(d, url)) for d in directories]
        outcomes = _at_once(starts)
        won = [d for d, outcome in zip(directories, outcomes, strict=True) if outcome is None]
        assert len(won) == 1, outcomes
        assert any(isinstance(outcome, ConfigError) for outcome in outcomes)
        # What the store records is the winner's keys, all of them.
        recorded = asyncio.run(recorded_fingerprints(url, "bounce store"))
        winner = {base64.b64decode(text) for text in _key_texts(won[0])}
        assert set(recorded.values()) == {fingerprint(key) for key in winner}


def test_the_look_and_the_record_are_one_step_for_each_host(shared_url: str) -> None:
    # Two key rings never conflict row by row (their keys have ids of their own): what
    # keeps a second ring out is the look at what is recorded. Host B looks while host A,
    # having looked, has not recorded yet: B must wait and see A's key, not an empty store.
    seen: dict[str, dict[str, str]] = {}
    a_looked = threading.Event()

    def a_agrees(recorded: Mapping[str, str]) -> None:
        seen["a"] = dict(recorded)
        a_looked.set()
        time.sleep(0.5)  # host B looks meanwhile

    def b_agrees(recorded: Mapping[str, str]) -> None:
        seen["b"] = dict(recorded)

    def host_a() -> None:
        asyncio.run(agree_fingerprints(shared_url, "escrow", {"escrow key ka": "a"}, a_agrees))

    def host_b() -> None:
        assert a_looked.wait(30)
        asyncio.run(agree_fingerprints(shared_url, "escrow", {"escrow key kb": "b"}, b_agrees))

    assert _at_once([host_a, host_b]) == [None, None]
    assert seen == {"a": {}, "b": {"escrow key ka": "a"}}


def _start_in_thread(config: Config) -> None:
    asyncio.run(start(config))


def _at_once(starts: Sequence[Callable[[], object]]) -> list[BaseException | None]:
    """Run each in a thread of its own, all let go at once; what each raised (None: nothing)."""
    barrier = threading.Barrier(len(starts))
    outcomes: list[BaseException | None] = [None] * len(starts)

    def run(index: int) -> None:
        barrier.wait()
        try:
            starts[index]()
        except BaseException as exc:  # handed to the test to look at
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(starts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    # A host still waiting has neither won nor been refused: its None says nothing.
    assert not any(thread.is_alive() for thread in threads), "a host hangs"
    return outcomes


async def test_check_fails_on_a_different_key_and_on_one_that_would_be_made(
    tmp_path: Path, shared_url: str
) -> None:
    first, second = await first_and_copy(tmp_path, shared_url)
    write_key(second / "verp.key")
    (second / "portal-keys" / "audit.key").unlink()
    before = _store_contents(shared_url, tmp_path)
    findings = {f.check: f for f in await secret_files(host(second, shared_url))}
    verp, reference = findings["bounces verp_key_file"], findings["portal audit_key_file"]
    assert verp.verdict is Verdict.FAIL
    assert verp.detail.startswith("VERP key 1 in [bounces] verp_key_file")
    assert "is not the key the bounces.store_url store records" in verp.detail
    assert reference.verdict is Verdict.FAIL
    assert "does not exist, but the portal.audit_url store records" in reference.detail
    assert "one made here would differ" in reference.detail
    assert findings["portal key_dir"].verdict is Verdict.OK
    # Read only: no key made, nothing written to the store or beside it.
    assert not (second / "portal-keys" / "audit.key").exists()
    assert _store_contents(shared_url, tmp_path) == before
    # The first host's keys pass; a host on a store that records nothing yet passes too,
    # its keys "created at the first start".
    assert all(f.verdict is Verdict.OK for f in await secret_files(host(first, shared_url)))
    fresh = await secret_files(host(tmp_path / "host-c", f"sqlite:///{tmp_path / 'new.db'}"))
    assert all(f.verdict is Verdict.OK for f in fresh)
    assert not (tmp_path / "new.db").exists() and not (tmp_path / "host-c").exists()


def _store_contents(url: str, tmp_path: Path) -> object:
    """The files beside a SQLite store and its rows, or a PostgreSQL schema's tables and
    recorded fingerprints."""
    if url.startswith("sqlite"):
        files = sorted(p.name for p in tmp_path.iterdir())
        with contextlib.closing(sqlite3.connect(tmp_path / "shared.db")) as db:
            rows = db.execute("SELECT * FROM secret_fingerprints ORDER BY name").fetchall()
        return files, rows
    with psycopg.connect(url) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
        ).fetchall()
        rows = conn.execute("SELECT * FROM secret_fingerprints ORDER BY name").fetchall()
    return tables, rows


def _eobblast(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eobblast", *args], capture_output=True, text=True, timeout=60
    )


def test_keys_secrets_refuses_to_make_keys_a_store_records_others_of(
    tmp_path: Path, shared_url: str
) -> None:
    asyncio.run(start(host(tmp_path / "host-a", shared_url)))
    config_file = tmp_path / "host-b.toml"
    config_file.write_text(tomli_w.dumps(_settings(tmp_path / "host-b", shared_url)))
    made = _eobblast("keys", "secrets", "--config", str(config_file))
    assert made.returncode == 1, made.stderr
    assert "does not exist, but the" in made.stderr and "Traceback" not in made.stderr
    assert not (tmp_path / "host-b").exists()


def test_eobblast_check_reports_a_host_that_would_make_other_keys(
    tmp_path: Path, shared_url: str
) -> None:
    asyncio.run(start(host(tmp_path / "host-a", shared_url)))
    config_file = tmp_path / "host-b.toml"
    settings = _settings(tmp_path / "host-b", shared_url)
    settings["kafka"] = {"bootstrap": "127.0.0.1:9"}  # refused at once: not what is checked here
    config_file.write_text(tomli_w.dumps(settings))
    checked = _eobblast("check", "--config", str(config_file), "--json")
    assert checked.returncode == 1, checked.stderr
    findings = {f["check"]: f for f in map(orjson.loads, checked.stdout.splitlines())}
    for check, store in (
        ("portal key_dir", "portal.escrow_url"),
        ("portal audit_key_file", "portal.audit_url"),
        ("bounces verp_key_file", "bounces.store_url"),
    ):
        assert findings[check]["verdict"] == "fail"
        assert f"but the {store} store records another host's" in findings[check]["detail"]
    assert not (tmp_path / "host-b").exists()
