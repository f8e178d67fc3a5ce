"""Fetching MTA-STS policies (RFC 8461): the I/O shell around `eobblast.protect.mta_sts`.

A policy is looked for only when a message to a domain routed by MX lookup is about to
be sent, and never for long: every lookup is bounded by `wait` seconds, and a failure of
any kind (no record, DNS, HTTPS, a malformed policy) means "no policy known", never an
error for the notice. Failures and absent records are remembered for `recheck` seconds,
so a domain without MTA-STS (most of them) costs one TXT query per interval, not one
per message.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import httpx

from eobblast.observe import metrics
from eobblast.protect.mta_sts import (
    PolicyCache,
    StoredPolicy,
    StsPolicy,
    StsProblem,
    StsRecord,
    parse_policy,
    parse_txt,
)
from eobblast.protect.mta_sts_store import StsStore
from eobblast.protect.policy import normalise_domain

__all__ = ["MAX_POLICY_BYTES", "MtaStsFetcher", "MtaStsPolicies", "stored_name"]

log = logging.getLogger("eobblast.mta_sts")

_T = TypeVar("_T")

#: Policies are a few lines; RFC 8461 section 3.3 suggests a limit of 64 KiB.
MAX_POLICY_BYTES = 64 * 1024
_PATH = "/.well-known/mta-sts.txt"
# The result label of a lookup whose TXT id matched the cached policy's.
_UNCHANGED = "unchanged"
_FETCHED = "fetched"
#: After the policy table failed, it is left alone this long (monotonic seconds): an outage
#: costs lookups no more than one wait for it.
STORE_RETRY = 30.0
#: How often a worker that writes to the policy table deletes its expired rows.
PURGE_EVERY = 3600.0


def stored_name(domain: str) -> str | None:
    """The name a domain is kept under in the policy table: its A-label form (IDNA, as
    the fetch asks for it), lower-case, no final dot; None for a name DNS cannot carry."""
    if not domain:
        return None
    try:
        return dns.name.from_text(domain).to_text(omit_final_dot=True).lower()
    except dns.exception.DNSException:
        return None


def _caused_by_tls(exc: BaseException) -> bool:
    # httpx reports a refused certificate as a ConnectError whose cause is the ssl error.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class MtaStsFetcher:
    """Looks up a domain's `_mta-sts` TXT record and fetches its policy over verified HTTPS.

    `resolver` answers the TXT and the policy host's A/AAAA queries; `https_port` is where
    the policy host is asked. Both are for tests: in production the system's resolver and
    port 443. The certificate must be valid for `mta-sts.<domain>` under `ssl_context`.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        resolver: dns.asyncresolver.Resolver | None = None,
        https_port: int = 443,
        timeout: float = 5.0,
    ) -> None:
        # None: dnspython's default resolver, made when first used (it reads the system's
        # configuration, which a machine that sends only by static routes may lack).
        self._resolver = resolver
        self._port = https_port
        self._timeout = timeout
        self._client = httpx.AsyncClient(
            verify=ssl_context,
            timeout=timeout,
            # RFC 8461 section 3.3: a redirect is a failure, never followed.
            follow_redirects=False,
            # The client connects to an address and checks the certificate against the
            # name sent as SNI: a kept-alive connection, keyed by address alone, could
            # carry another domain's request past that check. One connection per fetch.
            limits=httpx.Limits(max_keepalive_connections=0),
            # No proxies from the environment: the policy host is reached directly.
            trust_env=False,
            # No cookies kept: filed under the address connected to, one policy host's
            # would be sent to every other domain hosted there.
            cookies=http.cookiejar.CookieJar(
                policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
            ),
        )

    async def record(self, domain: str) -> StsRecord | StsProblem:
        """The domain's STSv1 TXT record, or why there is none."""
        try:
            answer = await self._resolve(f"_mta-sts.{domain}", dns.rdatatype.TXT)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return StsProblem.NO_RECORD
        except dns.exception.DNSException:
            return StsProblem.DNS_ERROR
        texts: list[str] = []
        for rdata in answer:
            try:
                texts.append(b"".join(rdata.strings).decode("ascii"))
            except UnicodeDecodeError:
                texts.append("")  # not ASCII: not an STSv1 record (its ABNF is ASCII)
        return parse_txt(texts)

    async def policy(self, domain: str) -> StsPolicy | StsProblem:
        """The policy served at https://mta-sts.<domain>/.well-known/mta-sts.txt, or why not."""
        try:
            # The A-label form (IDNA 2008): the Host header and SNI carry ASCII only.
            host = dns.name.from_text(f"mta-sts.{domain}").to_text(omit_final_dot=True)
        except dns.exception.DNSException:
            return StsProblem.DNS_ERROR  # not a name DNS can carry
        addresses = await self._addresses(host)
        if isinstance(addresses, StsProblem):
            return addresses
        for address in addresses:
            url = httpx.URL(scheme="https", host=address, port=self._port, path=_PATH)
            try:
                async with self._client.stream(
                    "GET",
                    url,
                    # identity: a compressed body could expand far beyond the size cap
                    # within a single chunk, before it is counted.
                    headers={"Host": host, "Accept": "text/plain", "Accept-Encoding": "identity"},
                    extensions={"sni_hostname": host},
                ) as response:
                    return await _read_policy(response)
            except httpx.TimeoutException:
                return StsProblem.TIMEOUT
            except httpx.TransportError as exc:
                if _caused_by_tls(exc):
                    # The next address would present the same certificate.
                    return StsProblem.TLS_ERROR
                continue  # connecting failed: try the host's next address
        return StsProblem.CONNECT_FAILED

    async def _resolve(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.resolver.Answer:
        resolver = self._resolver or dns.asyncresolver.get_default_resolver()
        return await resolver.resolve(name, rdtype, lifetime=self._timeout)

    async def _addresses(self, host: str) -> list[str] | StsProblem:
        # Both at once, and either enough: servers that fail AAAA queries are common, and
        # one query left unanswered must not use up the whole wait.
        answers = await asyncio.gather(
            self._resolve(host, dns.rdatatype.A),
            self._resolve(host, dns.rdatatype.AAAA),
            return_exceptions=True,
        )
        found: list[str] = []
        failed = False
        for answer in answers:
            if isinstance(answer, dns.resolver.NXDOMAIN | dns.resolver.NoAnswer):
                continue
            if isinstance(answer, dns.exception.DNSException):
                failed = True
            elif isinstance(answer, BaseException):
                raise answer
            else:
                found += [rdata.address for rdata in answer]
        if found:
            return found
        return StsProblem.DNS_ERROR if failed else StsProblem.NO_ADDRESS

    async def aclose(self) -> None:
        """Close the HTTPS client."""
        await self._client.aclose()


async def _read_policy(response: httpx.Response) -> StsPolicy | StsProblem:
    if 300 <= response.status_code < 400:
        return StsProblem.HTTP_REDIRECT
    if response.status_code != 200:
        return StsProblem.HTTP_STATUS
    media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "text/plain":
        return StsProblem.CONTENT_TYPE
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_POLICY_BYTES:
        return StsProblem.TOO_LARGE
    body = bytearray()
    # The bytes as they came (never decompressed), counted as they arrive: a server that
    # lies about (or omits) its length is cut off.
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > MAX_POLICY_BYTES:
            return StsProblem.TOO_LARGE
    return parse_policy(bytes(body))


class MtaStsPolicies:
    """The MTA-STS policy in force for each domain, cached (RFC 8461 section 5).

    The TXT record is looked at again after `recheck` seconds; the policy is fetched
    again when its id changed or the cached one expired (max_age). A failed refresh keeps
    a policy that is still valid. Concurrent messages to one domain share one lookup.

    With a `store` (the table beside the ledger, which it owns and closes), every fetched
    policy is written there, and a domain with no valid policy in memory is read from it
    before its lookup: what another worker, or this one before a restart, fetched is the
    cached policy (its TXT id unchanged, it needs no fetch) and holds when the refresh
    fails; a new id another worker fetched already is taken from there too. The store is
    best effort: when it fails, lookups go on without it.
    """

    def __init__(
        self,
        fetcher: MtaStsFetcher,
        *,
        wait: float = 5.0,
        recheck: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        max_domains: int = 10_000,
        store: StsStore | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetcher = fetcher
        self._store = store
        self._wall = wall_clock
        self._store_after = -math.inf  # `clock` time from which the store is used again
        self._store_lock = asyncio.Lock()  # one store call at a time (as the store runs them)
        self._purge_after = -math.inf
        self._wait = wait
        self._clock = clock
        self._cache = PolicyCache(recheck, max_domains)
        # The refresh under way per domain: awaited (shielded) by every message waiting for
        # it, so one of them cancelled (its record revoked, say) cancels it for no other.
        self._refreshing: dict[str, asyncio.Future[None]] = {}

    async def policy(self, domain: str) -> StsPolicy | None:
        """The domain's policy in force now, or None if none is known (within `wait`)."""
        domain = normalise_domain(domain)
        if self._cache.due(domain, self._clock()):
            refreshing = self._refreshing.get(domain)
            if refreshing is None:
                refreshing = asyncio.ensure_future(self._refresh(domain))
                self._refreshing[domain] = refreshing
                refreshing.add_done_callback(lambda _: self._refreshing.pop(domain, None))
            # Bounded by `wait` (`_refresh`), which also catches what it raises.
            await asyncio.shield(refreshing)
        return self._cache.current(domain, self._clock())

    async def _refresh(self, domain: str) -> None:
        result: str
        fetched: StoredPolicy | None = None
        try:
            result, fetched = await self._lookup(domain)
        except Exception as exc:
            # A bug here must not fail the notice: it goes on with no policy known. By type
            # only: a message could name the recipient's domain.
            log.error("MTA-STS lookup failed: %s", type(exc).__name__)
            result = StsProblem.INTERNAL_ERROR
        if result != _FETCHED:
            self._cache.checked(domain, self._clock())
        metrics.MTA_STS_LOOKUPS.labels(result).inc()
        if result not in (_FETCHED, _UNCHANGED, StsProblem.NO_RECORD):
            # The domain is not named: recipients' domains stay out of the logs.
            log.info("MTA-STS policy not fetched", extra={"reason": result})
        if fetched is not None:
            await self._save(fetched)

    async def _lookup(self, domain: str) -> tuple[str, StoredPolicy | None]:
        # The DNS and HTTPS steps share `wait`; the store's calls stay outside it: they
        # bound themselves, and one cancelled midway could wait for its cancel request.
        name = stored_name(domain)  # its row in the store, if there is one
        await self._restore(domain, name)
        deadline = asyncio.get_running_loop().time() + self._wait
        try:
            async with asyncio.timeout_at(deadline):
                record = await self._fetcher.record(domain)
            if isinstance(record, StsProblem):
                return record, None
            if self._cache.needs_fetch(domain, record, self._clock()):
                # Another worker may have fetched the policy of this id already.
                await self._restore(domain, name, record)
            if not self._cache.needs_fetch(domain, record, self._clock()):
                return _UNCHANGED, None
            async with asyncio.timeout_at(deadline):
                policy = await self._fetcher.policy(domain)
        except TimeoutError:
            return StsProblem.TIMEOUT, None
        if isinstance(policy, StsProblem):
            return policy, None
        self._cache.store(domain, policy, record, self._clock())
        if name is None:
            return _FETCHED, None
        return _FETCHED, StoredPolicy(name, record.id, policy, self._wall() + policy.max_age)

    def _store_failed(self, operation: str, exc: Exception) -> None:
        # By type only: a message could name the domain. Left alone a while, so that an
        # outage does not add its wait to every domain's lookup.
        log.warning("MTA-STS policy table not used: %s", type(exc).__name__)
        metrics.MTA_STS_STORE_ERRORS.labels(operation).inc()
        self._store_after = self._clock() + STORE_RETRY

    async def _restore(
        self, domain: str, name: str | None, record: StsRecord | None = None
    ) -> None:
        """The domain's unexpired policy in the store (its row `name`) as the cached one:
        when there is no valid one in memory, or (with `record`) when it was fetched under
        the record's id and the one in memory was not."""
        store = self._store
        if store is None or name is None:
            return
        if record is None and self._cache.current(domain, self._clock()) is not None:
            return
        found, stored = await self._store_call("load", lambda: store.load(name))
        if not found or stored is None or (record is not None and stored.id != record.id):
            return
        cached = stored.cached(self._clock(), self._wall())
        if cached is not None:
            self._cache.restore(domain, cached, self._clock())

    async def _save(self, fetched: StoredPolicy) -> None:
        """Keep a fetched policy in the store; purge expired ones now and then."""
        store = self._store
        if store is None:
            return
        saved, _ = await self._store_call("save", lambda: store.save(fetched))
        if saved and self._clock() >= self._purge_after:
            self._purge_after = self._clock() + PURGE_EVERY
            await self._store_call("purge", lambda: store.purge(self._wall()))

    async def _store_call(
        self, operation: str, call: Callable[[], Awaitable[_T]]
    ) -> tuple[bool, _T | None]:
        """(True, its result) of a call on the store, or (False, None) when the store is
        left alone (it failed lately) or fails now."""
        async with self._store_lock:
            # Looked at once the lock is ours: calls queued behind a failing one give up.
            if self._clock() < self._store_after:
                return False, None
            try:
                return True, await call()
            except Exception as exc:
                self._store_failed(operation, exc)
                return False, None

    async def aclose(self) -> None:
        """End the refreshes under way, close the fetcher's connections and the store."""
        for refreshing in list(self._refreshing.values()):
            refreshing.cancel()
        await asyncio.gather(*self._refreshing.values(), return_exceptions=True)
        try:
            await self._fetcher.aclose()
        finally:
            if self._store is not None:
                await self._store.close()
