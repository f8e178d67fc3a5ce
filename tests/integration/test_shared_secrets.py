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
import uuid
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
from eobblast.protect.services import (
    ProtectionServices,
    hold_secrets,
    portal_secrets,
    record_secrets,
)
from eobblast.state import fingerprints
from eobblast.state.fingerprints import (
    Change,
    Recorded,
    change_fingerprints,
    fingerprint,
    recorded_fingerprints,
)
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


def _settings(directory: Path, url: str, **bounces: Any) -> dict[str, Any]:
    keys = directory / "portal-keys"
    return {
        "portal": {
            "key_dir": str(keys),
            "audit_key_file": str(keys / "audit.key"),
            "escrow_url": url,
            "audit_url": url,
        },
        "bounces": {"verp_key_file": str(directory / "verp.key"), "store_url": url, **bounces},
    }


def host(directory: Path, url: str, **bounces: Any) -> Config:
    """A host whose key files are in `directory`, using the stores at `url` (`bounces`:
    other [bounces] settings, such as a rotated VERP key)."""
    return load_config(environ={}, overrides=_settings(directory, url, **bounces))


def config_file(path: Path, directory: Path, url: str, **bounces: Any) -> Path:
    """`host`'s settings in a file, for a command."""
    path.write_text(tomli_w.dumps(_settings(directory, url, **bounces)))
    return path


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


def rotated_verp(path: Path, key_id: int, *, previous: tuple[int, Path]) -> dict[str, Any]:
    """[bounces] settings after a VERP key rotation: `path` signs as `key_id`, the key
    before it kept as `previous` (id, file)."""
    return {
        "verp_key_file": str(path),
        "verp_key_id": key_id,
        "verp_previous_keys": [f"{previous[0]}:{previous[1]}"],
    }


def write_key(path: Path) -> bytes:
    key = secrets.token_bytes(32)
    path.write_bytes(base64.b64encode(key) + b"\n")
    return key


def _key_texts(directory: Path) -> set[str]:
    return {p.read_text().strip() for p in directory.rglob("*.key")}


def _key_of(directory: Path, key_id: str) -> bytes:
    return base64.b64decode((directory / f"{key_id}.key").read_text())


def _fingerprints_of(directory: Path) -> dict[str, str]:
    """What a store should record for the keys of a host (VERP key 1 alone, if any): each
    key's fingerprint under its own name, computed here from the files."""
    keys = directory / "portal-keys"
    named = {"member-reference key": base64.b64decode((keys / "audit.key").read_text())}
    if (directory / "verp.key").exists():
        named["VERP key 1"] = base64.b64decode((directory / "verp.key").read_text())
    for path in keys.glob("k*.key"):
        named[f"escrow key {path.stem}"] = base64.b64decode(path.read_text())
    return {name: fingerprint(name, key) for name, key in named.items()}


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
    assert "from the host whose keys the portal.escrow_url store records" in message
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
    # Neither key, nor its fingerprint (under whichever name), is in what is said.
    recorded = await recorded_fingerprints(shared_url, "escrow")
    prints = [fingerprint(name, ours) for name in recorded] + list(recorded.values())
    for text in (theirs, base64.b64encode(ours).decode(), *prints):
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
    name = f"escrow key {ring.active_id}"
    assert recorded[name] == fingerprint(name, _key_of(first / "portal-keys", ring.active_id))
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
    assert recorded == _fingerprints_of(first)
    keys = {base64.b64decode(text) for text in texts}
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
        assert recorded == _fingerprints_of(won[0])


def test_the_look_and_the_record_are_one_step_for_each_host(shared_url: str) -> None:
    # Two key rings never conflict row by row (their keys have ids of their own): what
    # keeps a second ring out is the look at what is recorded. Host B looks while host A,
    # having looked, has not recorded yet: B must wait and see A's key, not an empty store.
    seen: dict[str, dict[str, str]] = {}
    a_looked = threading.Event()

    def a_agrees(recorded: Mapping[str, Recorded]) -> Change:
        seen["a"] = {name: row.fingerprint for name, row in recorded.items()}
        a_looked.set()
        time.sleep(0.5)  # host B looks meanwhile
        return Change({"escrow key ka": "a"})

    def b_agrees(recorded: Mapping[str, Recorded]) -> Change:
        seen["b"] = {name: row.fingerprint for name, row in recorded.items()}
        return Change({"escrow key kb": "b"})

    def host_a() -> None:
        asyncio.run(change_fingerprints(shared_url, "escrow", a_agrees))

    def host_b() -> None:
        assert a_looked.wait(30)
        asyncio.run(change_fingerprints(shared_url, "escrow", b_agrees))

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

    # Daemons: a host that hangs fails the test below, and must not then hold pytest at exit.
    threads = [
        threading.Thread(target=run, args=(index,), daemon=True) for index in range(len(starts))
    ]
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


def test_keys_secrets_records_what_it_makes_so_a_second_host_is_refused(
    tmp_path: Path, shared_url: str
) -> None:
    # Two hosts of one deployment each run `keys secrets` (the compose stack's `secrets`
    # service does, on every host): the second must not make keys of its own.
    settings = config_file(tmp_path / "a.toml", tmp_path / "host-a", shared_url)
    first = _eobblast("keys", "secrets", "--config", str(settings))
    assert first.returncode == 0, first.stderr
    assert asyncio.run(recorded_fingerprints(shared_url, "escrow")) == _fingerprints_of(
        tmp_path / "host-a"
    )
    settings = config_file(tmp_path / "b.toml", tmp_path / "host-b", shared_url)
    second = _eobblast("keys", "secrets", "--config", str(settings))
    assert second.returncode == 1, second.stdout
    assert "records another host's" in second.stderr and "Traceback" not in second.stderr
    assert not (tmp_path / "host-b").exists()
    # The first host's keys pass check (and so run's preflight).
    findings = asyncio.run(secret_files(host(tmp_path / "host-a", shared_url)))
    assert all(f.verdict is Verdict.OK for f in findings), findings


def test_keys_secrets_says_a_missing_previous_verp_key_is_never_made(
    tmp_path: Path, shared_url: str
) -> None:
    first, second = tmp_path / "host-a", tmp_path / "host-b"
    first.mkdir()
    write_key(first / "verp-3.key")
    rotated = {"verp_previous_keys": [f"3:{first / 'verp-3.key'}"]}
    asyncio.run(start(host(first, shared_url, **rotated)))
    copy_keys(first, second)
    (second / "verp-3.key").unlink()
    previous = {"verp_previous_keys": [f"3:{second / 'verp-3.key'}"]}
    settings = config_file(tmp_path / "b.toml", second, shared_url, **previous)
    made = _eobblast("keys", "secrets", "--config", str(settings))
    assert made.returncode == 1, made.stdout
    assert "[bounces] verp_previous_keys" in made.stderr and "Traceback" not in made.stderr
    assert "a previous key is never made" in made.stderr
    assert "one made here would differ" not in made.stderr
    assert not (second / "verp-3.key").exists()


def test_a_verp_key_id_used_again_is_refused_until_this_hosts_key_is_recorded(
    tmp_path: Path, shared_url: str
) -> None:
    # VERP key ids are 0..63: after a rotation 1 -> 2, a later one may come back to 1 with
    # a new key. The store records the old key 1, so the host is refused until an
    # operator records the new one on purpose.
    first = tmp_path / "host-a"
    asyncio.run(start(host(first, shared_url)))
    old = tmp_path / "old"
    copy_keys(first, old)
    write_key(first / "verp-2.key")
    to_2 = rotated_verp(first / "verp-2.key", 2, previous=(1, first / "verp.key"))
    asyncio.run(start(host(first, shared_url, **to_2)))  # a new id: accepted
    write_key(first / "verp-1b.key")
    back = rotated_verp(first / "verp-1b.key", 1, previous=(2, first / "verp-2.key"))
    with pytest.raises(ConfigError, match=r"VERP key 1 in \[bounces\] verp_key_file") as refused:
        asyncio.run(start(host(first, shared_url, **back)))
    assert "`eobblast keys record --config FILE verp --yes`" in str(refused.value)
    before = asyncio.run(recorded_fingerprints(shared_url, "bounce store"))
    settings = str(config_file(tmp_path / "a.toml", first, shared_url, **back))
    asked = _eobblast("keys", "record", "--config", settings, "verp")
    assert asked.returncode == 1 and "--yes" in asked.stderr, asked.stderr
    assert asked.stdout.splitlines() == ["would have replaced VERP key 1"]
    assert asyncio.run(recorded_fingerprints(shared_url, "bounce store")) == before
    recorded = _eobblast("keys", "record", "--config", settings, "verp", "--yes")
    assert recorded.returncode == 0, recorded.stderr
    assert recorded.stdout.splitlines() == ["replaced VERP key 1"]
    after = asyncio.run(recorded_fingerprints(shared_url, "bounce store"))
    # Names only: no key and no fingerprint is printed.
    for text in [*before.values(), *after.values(), *_key_texts(first)]:
        assert text not in recorded.stdout + recorded.stderr
    asyncio.run(start(host(first, shared_url, **back)))  # accepted now
    # A host still holding the old key 1 is refused from now on.
    with pytest.raises(ConfigError, match=r"VERP key 1 in \[bounces\] verp_key_file"):
        asyncio.run(start(host(old, shared_url)))
    again = _eobblast("keys", "record", "--config", settings, "verp", "--yes")
    assert again.returncode == 0 and "nothing to change" in again.stdout, again.stderr


async def test_a_ring_rotated_offline_and_a_new_member_reference_key_can_be_recorded(
    tmp_path: Path, shared_url: str
) -> None:
    # The escrow ring got a new key and lost its old one before any start, and the
    # member-reference key was replaced: refused, as a ring made on this host would be.
    first = tmp_path / "host-a"
    await start(host(first, shared_url))
    keys = first / "portal-keys"
    (old,) = keys.glob("k*.key")
    new = KeyRing.generate(keys, not_keys=[keys / "audit.key"]).active_id
    old.unlink()
    write_key(keys / "audit.key")
    with pytest.raises(ConfigError, match="holds none of the keys"):
        await start(host(first, shared_url))
    ring, reference = portal_secrets(host(first, shared_url))
    assert await record_secrets([ring, reference], write=True) == [
        f"forgot escrow key {old.stem}",
        f"recorded escrow key {new}",
        "replaced member-reference key",
    ]
    await start(host(first, shared_url))
    recorded = await recorded_fingerprints(shared_url, "escrow")
    assert recorded == _fingerprints_of(first)


async def test_one_key_for_two_purposes_shows_two_fingerprints(
    tmp_path: Path, shared_url: str
) -> None:
    directory = tmp_path / "host-a"
    directory.mkdir()
    key = write_key(directory / "verp.key")
    # The same file as the VERP key and as the member-reference key (a mistake, but one the
    # fingerprints must not give away as "the same key").
    config = load_config(
        environ={},
        overrides=_settings(directory, shared_url)
        | {
            "portal": _settings(directory, shared_url)["portal"]
            | {"audit_key_file": str(directory / "verp.key")}
        },
    )
    await start(config)
    recorded = await recorded_fingerprints(shared_url, "escrow")
    assert recorded["VERP key 1"] != recorded["member-reference key"]
    assert recorded["VERP key 1"] == fingerprint("VERP key 1", key)


async def test_a_host_that_missed_a_rotation_is_refused(tmp_path: Path, shared_url: str) -> None:
    # It was only warned: it then signed with a key the others retire, and could not open
    # what they seal with the new escrow key (those notices went to paper).
    first, second = await first_and_copy(tmp_path, shared_url)
    _age_rows(shared_url, tmp_path, days=1)
    write_key(first / "verp-2.key")
    to_2 = rotated_verp(first / "verp-2.key", 2, previous=(1, first / "verp.key"))
    await start(host(first, shared_url, **to_2))  # the host that rotated: its key is newest
    # The second host still signs with key 1, which the first host no longer does.
    with pytest.raises(ConfigError) as refused:
        await start(host(second, shared_url))
    said = refused.value.detail
    assert said.startswith("the bounces.store_url store records VERP key 2, newer than")
    assert str(second / "verp.key") in said
    # Copied, it starts.
    copy_keys(first, second)
    await start(host(second, shared_url, **rotated_verp(
        second / "verp-2.key", 2, previous=(1, second / "verp.key")
    )))  # fmt: skip


def _age_rows(url: str, tmp_path: Path, *, days: int) -> None:
    """Make every recorded fingerprint `days` older, as if recorded then."""
    statement = "UPDATE secret_fingerprints SET recorded_at = recorded_at - {}"
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(tmp_path / "shared.db")) as db, db:
            db.execute(statement.format(days * 86400))
        return
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement.format(days * 86400).encode())


async def test_a_store_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    # Not a database: SQLite's own error, said as the store's, with no traceback.
    store = tmp_path / "shared.db"
    store.write_bytes(b"this is not a database file, " * 100)
    url = f"sqlite:///{store}"
    with pytest.raises(ConfigError, match=r"portal\.escrow_url store's secret fingerprints"):
        await start(host(tmp_path / "host-a", url))
    settings = config_file(tmp_path / "a.toml", tmp_path / "host-a", url)
    made = await asyncio.to_thread(_eobblast, "keys", "secrets", "--config", str(settings))
    assert made.returncode == 1 and "Traceback" not in made.stderr, made.stderr
    assert "secret fingerprints cannot be read or recorded" in made.stderr


@pytest.fixture
def restricted_url() -> Iterator[str]:
    """A schema whose tables the test's superuser made, and a URL for a role that may only
    read and add rows there (and create what is missing), with a role-level lock_timeout
    of 200 ms and a password in its URL."""
    role = f"eob_restricted_{uuid.uuid4().hex[:8]}"
    with throwaway_pg_schema("shared_secrets_role") as url:
        schema = url.rsplit("%3D", 1)[1]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE secret_fingerprints (name TEXT PRIMARY KEY,"
                " fingerprint TEXT NOT NULL, recorded_at BIGINT NOT NULL)"
            )
            for statement in (
                f"CREATE ROLE {role} LOGIN",
                f"ALTER ROLE {role} SET lock_timeout = '200ms'",
                f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}",
                f"GRANT SELECT, INSERT ON {schema}.secret_fingerprints TO {role}",
            ):
                conn.execute(statement.encode())
        try:
            yield url.replace("postgres@", f"{role}:{PASSWORD}@")
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f"DROP OWNED BY {role}".encode())
                conn.execute(f"DROP ROLE {role}".encode())


PASSWORD = "pw-" + secrets.token_hex(8)  # trust auth: shown nowhere, never needed


async def test_a_role_with_only_select_and_insert_records_and_is_refused_cleanly(
    tmp_path: Path, restricted_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rights a worker needs on the table are to read it and add to it; table locks
    # would need UPDATE, DELETE or TRUNCATE.
    ring, reference = portal_secrets(host(tmp_path / "host-a", restricted_url))
    await hold_secrets([ring, reference], create=True)
    recorded = await recorded_fingerprints(restricted_url, "escrow")
    assert recorded == _fingerprints_of(tmp_path / "host-a")
    # A host that would wait longer than it may for another host's record step (here:
    # one that looks and hangs) gets a ConfigError saying so, without the URL.
    monkeypatch.setattr(fingerprints, "RECORD_WAIT", 0.3)
    looking, release = threading.Event(), threading.Event()

    def hangs(recorded: Mapping[str, Recorded]) -> Change:
        looking.set()
        release.wait(30)
        return Change()

    other = threading.Thread(
        target=lambda: asyncio.run(change_fingerprints(restricted_url, "escrow", hangs)),
        daemon=True,
    )
    other.start()
    try:
        assert await asyncio.to_thread(looking.wait, 30)
        copy_keys(tmp_path / "host-a", tmp_path / "host-b")
        with pytest.raises(ConfigError) as waited:
            await start(host(tmp_path / "host-b", restricted_url))
    finally:
        release.set()
        await asyncio.to_thread(other.join, 30)
    assert not other.is_alive()
    message = str(waited.value)
    assert "another host held them for over 0.3 s" in message
    assert PASSWORD not in message and "127.0.0.1" not in message
