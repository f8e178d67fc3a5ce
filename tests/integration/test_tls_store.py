"""Workers share what they learn of receivers' TLS: SQLite and PostgreSQL, two caches, restarts."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Sequence

import pytest

from eobblast.protect.policy import (
    DomainTls,
    OrgPolicy,
    RecipientFacts,
    TlsCache,
    TlsRecord,
    choose_protection,
)
from eobblast.protect.policy import PolicyReason as R
from eobblast.protect.tls_store import TlsStore, TlsSync, open_tls_store

NOW = dt.datetime.now(dt.UTC)
HOUR = dt.timedelta(hours=1)
MINUTE = dt.timedelta(minutes=1)
ORG = OrgPolicy(tls_cache_ttl=7 * 24 * HOUR, failure_ttl=6 * HOUR)


@pytest.fixture
def ledger_url(store_url: str) -> str:
    return store_url


def _cache() -> TlsCache:
    return TlsCache(verified_ttl=7 * 24 * HOUR, failure_ttl=6 * HOUR)


def _domain() -> str:
    # The PostgreSQL schema is shared by the module's tests: names of their own.
    return f"d{uuid.uuid4().hex[:10]}.example"


def _reason(cache: TlsCache, domain: str) -> R:
    facts = cache.facts(domain, NOW)
    return choose_protection(RecipientFacts(f"m@{domain}", domain), facts, ORG, NOW).reason


async def _worker(url: str, clock: Callable[[], float] = time.time) -> TlsSync:
    sync = TlsSync(_cache(), await open_tls_store(url), clock=clock)
    await sync.sync()  # as a worker starts
    return sync


async def test_what_one_worker_learns_the_others_use_and_a_restart_keeps(ledger_url: str) -> None:
    learned, failing = _domain(), _domain()
    a, b = await _worker(ledger_url), await _worker(ledger_url)
    a.cache.record_verified(learned, NOW - HOUR)
    a.cache.record_failure(failing, NOW - HOUR)
    assert _reason(b.cache, learned) is R.TLS_UNKNOWN  # not shared yet
    await a.sync()
    await b.sync()
    assert _reason(b.cache, learned) is R.TLS_VERIFIED_RECENTLY
    assert _reason(b.cache, failing) is R.TLS_FAILED_RECENTLY
    await a.close()
    await b.close()
    restarted = await _worker(ledger_url)
    assert _reason(restarted.cache, learned) is R.TLS_VERIFIED_RECENTLY
    assert _reason(restarted.cache, failing) is R.TLS_FAILED_RECENTLY
    await restarted.close()


async def test_the_latest_observation_wins_whoever_writes_last(ledger_url: str) -> None:
    domain = _domain()
    a, b = await _worker(ledger_url), await _worker(ledger_url)
    a.cache.record_failure(domain, NOW - HOUR)
    b.cache.record_failure(domain, NOW - 5 * HOUR)  # older, written after
    b.cache.record_verified(domain, NOW - 2 * HOUR)
    await a.sync()
    await b.sync()
    await a.sync()
    for cache in (a.cache, b.cache):
        facts = cache.facts(domain, NOW)
        assert facts == DomainTls(last_verified_at=NOW - 2 * HOUR, last_failed_at=NOW - HOUR)
    # A failure alone (no verified time) leaves the stored verified time as it is.
    a.cache.record_failure(domain, NOW - 30 * MINUTE)
    await a.sync()
    restarted = await _worker(ledger_url)
    facts = restarted.cache.facts(domain, NOW)
    assert facts == DomainTls(last_verified_at=NOW - 2 * HOUR, last_failed_at=NOW - 30 * MINUTE)
    for sync in (a, b, restarted):
        await sync.close()


async def test_a_writer_whose_clock_is_behind_is_still_read(ledger_url: str) -> None:
    # Rows are versioned by the database, not by the writers' clocks.
    early, late = _domain(), _domain()
    reader = await _worker(ledger_url)
    ahead = await _worker(ledger_url)
    ahead.cache.record_verified(early, NOW - HOUR)
    await ahead.sync()
    await reader.sync()  # the reader has now seen a recent row
    behind = await _worker(ledger_url, clock=lambda: time.time() - 3600)
    behind.cache.record_failure(late, NOW - HOUR)
    await behind.sync()
    await reader.sync()
    assert _reason(reader.cache, late) is R.TLS_FAILED_RECENTLY
    for sync in (reader, ahead, behind):
        await sync.close()


async def test_expired_observations_are_not_brought_back(ledger_url: str) -> None:
    domain = _domain()
    a = await _worker(ledger_url)
    a.cache.record_failure(domain, NOW - 7 * HOUR)  # past the 6 h failure TTL
    await a.close()
    b = await _worker(ledger_url)  # a full round at start: the expired row is deleted
    assert domain not in {record.domain for record in b.cache.records()}
    assert b.cache.facts(domain, NOW).last_failed_at is None
    rows, _ = await b.store.changed(None)
    assert domain not in {record.domain for record in rows}
    await b.close()


class _Down(TlsStore):
    """A store whose database is unreachable (what a worker sees when it goes away)."""

    def __init__(self) -> None:
        self.merged: list[TlsRecord] = []
        self.down = True

    async def merge(self, records: Sequence[TlsRecord]) -> None:
        if self.down:
            raise ConnectionError("database unreachable")
        self.merged += records

    async def changed(self, position: float | None) -> tuple[list[TlsRecord], float | None]:
        return [], position

    async def purge(self, verified_before: float, failed_before: float) -> int:
        return 0

    async def close(self) -> None:
        return None


async def test_an_unreachable_store_loses_nothing_and_logs_no_domain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    domain = _domain()
    store = _Down()
    sync = TlsSync(_cache(), store)
    sync.cache.record_failure(domain, NOW)
    await sync.sync()  # fails: kept for the next round, the worker goes on
    assert store.merged == [] and _reason(sync.cache, domain) is R.TLS_FAILED_RECENTLY
    assert "not synced" in caplog.text and domain not in caplog.text
    store.down = False
    await sync.sync()
    assert [r.domain for r in store.merged] == [domain]
