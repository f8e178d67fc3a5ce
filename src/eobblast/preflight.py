"""`eobblast check`: what `eobblast run` needs, checked before it runs, without changing
anything.

Each check gives a `Finding`: the DKIM keys the workers sign with; the files the workers
read at start (the transport's CA bundle, the shaping pools and warm-up files, the bounce
rules); settings that work but were likely not meant (a reserved name in portal links or
return paths, an EHLO name that is reserved or no FQDN, shaping off); the brokers (reached
with the configured TLS and SASL settings); the topics the workers read and write; every
store (where a SQLite file would be, a PostgreSQL server and its schema); each static SMTP
route (its greeting and a STARTTLS verified as delivery verifies it, from `[transport]
source_address`); the secrets the workers read, and whether each is the key its store
records (every host must hold the same). Nothing is created: no topic, no table, no key, no
file. Details name settings, files, hosts and topics, never a store URL (it may carry a
password), nothing of an event and nothing of a key. `eobblast run` calls the same checks of
the stores (waiting while a failure `may_heal`, refusing to start on any other), of the
secrets (refusing to start on a failure) and of the placeholder settings (warning). Not
checked: the brokers' ACLs (whether this client may read, write and join the group, beyond
seeing the topics); routes found by MX lookups; routes from the shaping pools' own addresses
and EHLO names; whether the metrics port can be bound.
"""

from __future__ import annotations

import asyncio
import enum
import os
import sqlite3
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from email_validator import SPECIAL_USE_DOMAIN_NAMES

from eobblast.bounces.rules import load_rules
from eobblast.config import Config, store_urls
from eobblast.errors import ConfigError
from eobblast.protect.dkim import load_signer, signing_domains
from eobblast.protect.services import (
    SharedSecret,
    secret_trouble,
    shared_secrets,
)
from eobblast.shaping.engine import checked_overrides
from eobblast.shaping.pools import is_fqdn, load_pools
from eobblast.shaping.settings import load_shaping
from eobblast.state.fingerprints import recorded_fingerprints
from eobblast.state.postgres import libpq_reason
from eobblast.state.sqlite import store_location
from eobblast.streams.kafka import (
    CONNECT_ERRORS,
    BrokerUnavailable,
    connect_error_text,
    kafka_security,
    probe_broker,
    topic_partitions,
)
from eobblast.transport import Route, make_tls_context, parse_static_routes
from eobblast.transport.probe import RouteTrouble, probe_route, where

# How long the brokers' metadata and a PostgreSQL server may take to answer. SMTP routes get
# the transport's own timeouts.
ANSWER_TIMEOUT = 10.0


class Verdict(enum.StrEnum):
    """How a check came out."""

    OK = "ok"
    WARN = "warn"  # works, but not as the operator likely meant
    FAIL = "fail"  # `eobblast run` would not work
    SKIPPED = "skipped"  # not checked: what it needs failed first


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's outcome."""

    check: str
    verdict: Verdict
    detail: str
    # A failure that may end by itself: a server that does not answer yet (`eobblast run`
    # waits for it). Not one that waiting cannot end: a URL, a right, a file.
    may_heal: bool = False


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """The domains with a usable DKIM key, and why the others' keys are not usable."""

    usable: list[str]
    unusable: dict[str, str]


def signing_keys(config: Config) -> SigningKeys:
    """The DKIM keys the workers would sign with; ConfigError if the directory cannot be
    read."""
    dkim = config.dkim
    usable: list[str] = []
    unusable: dict[str, str] = {}
    for domain in signing_domains(dkim.key_dir, dkim.selector):
        try:
            load_signer(dkim.key_dir, domain, dkim.selector, ed25519=dkim.ed25519)
        except ConfigError as exc:
            unusable[domain] = exc.detail
        else:
            usable.append(domain)
    return SigningKeys(usable, unusable)


def no_signing_key_text(config: Config) -> str:
    """What to do when no domain has a usable key."""
    dkim = config.dkim
    keys = "an RSA key" + (" and an Ed25519 key ([dkim] ed25519 is on)" if dkim.ed25519 else "")
    return (
        f"no usable DKIM key for selector {dkim.selector!r} in {dkim.key_dir} (each sending"
        f" domain needs {keys}): every notice would fail (no_signing_key). Create them"
        f" with `eobblast keys generate -d DOMAIN --key-dir {dkim.key_dir} --selector"
        f" {dkim.selector}`, or point [dkim] key_dir at the keys"
    )


async def preflight(config: Config, *, workers: int) -> list[Finding]:
    """Every check, in order, for `eobblast run` with `workers` worker processes."""
    trusted, context = _trust(config)
    findings = [_dkim(config), trusted, *_files(config), *await secret_files(config)]
    findings += placeholder_settings(config)
    findings += await _kafka(config, workers)
    findings += await stores(config)
    findings += await _routes(config, context)
    return findings


async def stores(config: Config) -> list[Finding]:
    """Every store `eobblast run` opens: a PostgreSQL server reached and its schema, a
    SQLite file's place looked at; nothing created."""
    return list(
        await asyncio.gather(*(_store(setting, url) for setting, url in store_urls(config).items()))
    )


# Names no member's mail client or browser, and no receiver on the Internet, can reach, and
# every name below them: what placeholders, documentation and tests are made of (RFC 2606),
# the special-use names (RFC 6761: .test, .invalid, .localhost, .local, .onion, .arpa with
# home.arpa; email_validator's list of them) and .internal, which ICANN keeps for private
# networks.
RESERVED_NAMES = tuple(
    dict.fromkeys(
        (
            "example.com",
            "example.net",
            "example.org",
            "example",
            *SPECIAL_USE_DOMAIN_NAMES,
            "internal",
        )
    )
)


def reserved_name(host: str) -> bool:
    """Whether `host` is a reserved or special-use name (`RESERVED_NAMES`) or a name below
    one."""
    name = host.strip().lower().rstrip(".")
    return any(name == reserved or name.endswith("." + reserved) for reserved in RESERVED_NAMES)


def placeholder_settings(config: Config) -> list[Finding]:
    """Settings that work but that the operator likely did not mean: a reserved name in what
    members and receivers see (portal links, return paths, the EHLO names mail is sent
    with; the defaults are such names), an EHLO name that is no FQDN, and shaping off."""
    base_url = config.portal.base_url
    try:
        host = urlsplit(base_url).hostname
    except ValueError:  # an unclosed [IPv6] bracket
        host = None
    found = [
        _seen_name(
            "portal base_url",
            base_url,
            host,
            lost="members' portal links would lead nowhere",
            fix="Set [portal] base_url to the portal's public address",
        )
    ]
    if config.bounces.enabled:
        domain = config.bounces.bounce_domain
        found.append(
            _seen_name(
                "bounces bounce_domain",
                domain,
                domain,
                lost="return paths there reach no bounce listener (bounces are lost, receivers"
                " may refuse the mail)",
                fix="Set [bounces] bounce_domain to a domain whose MX is `eobblast bounces`",
            )
        )
    found.append(_transport_ehlo(config))
    if config.shaping.enabled:
        found.append(_pool_ehlo_names(config))
    else:
        why = (
            "not set: shaping is off (no IP warm-up, no per-provider caps), every connection"
            " goes from [transport] source_address as fast as receivers take it"
        )
        found.append(Finding("shaping pools_file", Verdict.WARN, why))
    return found


def _seen_name(check: str, value: str, host: str | None, *, lost: str, fix: str) -> Finding:
    """A setting whose host members or receivers see: FAIL when it has none or a reserved one."""
    if not host:
        return Finding(check, Verdict.FAIL, f"{value} has no host name: {lost}")
    if reserved_name(host):
        named = host if value == host else f"{value}: {host}"
        return Finding(check, Verdict.FAIL, f"{named} is a reserved name: {lost}. {fix}")
    return Finding(check, Verdict.OK, value)


# Why an EHLO name must be the sending host's own.
_EHLO_LOST = (
    "receivers compare the EHLO name with the sending IP's PTR record, so a placeholder"
    " gets mail scored as spam or refused"
)


def _ehlo_problem(name: str) -> str | None:
    """What is wrong with an EHLO name receivers would see, or None."""
    if not is_fqdn(name):
        return f"{name!r} is not a fully qualified host name"
    if reserved_name(name):
        return f"{name} is a reserved name"
    return None


def _transport_ehlo(config: Config) -> Finding:
    """`[transport] ehlo_name`: what every connection greets with, unless shaping's IPs
    greet with their own."""
    check, name = "transport ehlo_name", config.transport.ehlo_name
    problem = _ehlo_problem(name)
    if problem is None:
        return Finding(check, Verdict.OK, name)
    if config.shaping.enabled:
        # Each shaped connection greets with its IP's name from the pools file: this one
        # is sent only once shaping is turned off.
        why = "unused while shaping is on (each IP greets with its pools_file ehlo)"
        return Finding(check, Verdict.WARN, f"{problem}: {why}")
    fix = "Set [transport] ehlo_name to this host's name (the PTR record of its sending IP)"
    return Finding(check, Verdict.FAIL, f"{problem}: {_EHLO_LOST}. {fix}")


def _pool_ehlo_names(config: Config) -> Finding:
    """The EHLO names of the shaping pools' IPs (the pools file checks that each is an
    FQDN): a reserved one fails."""
    check, pools_file = "shaping pools_file ehlo", config.shaping.pools_file
    assert pools_file is not None
    try:
        sources = load_pools(pools_file).all_ips()
    except ConfigError:  # the "shaping pools_file" check says why
        return Finding(check, Verdict.SKIPPED, f"{pools_file} does not load")
    placeholders = [f"{ip.address} {ip.ehlo_name}" for ip in sources if reserved_name(ip.ehlo_name)]
    if placeholders:
        fix = "Give each IP its own name (its PTR record) in the pools file's ehlo"
        named = ", ".join(placeholders)
        return Finding(check, Verdict.FAIL, f"reserved names: {named}: {_EHLO_LOST}. {fix}")
    return Finding(check, Verdict.OK, f"{len(sources)} IP(s), each with its own name")


def _dkim(config: Config) -> Finding:
    try:
        keys = signing_keys(config)
    except ConfigError as exc:
        return Finding("dkim keys", Verdict.FAIL, exc.detail)
    if not keys.usable:
        return Finding("dkim keys", Verdict.FAIL, no_signing_key_text(config))
    detail = f"{len(keys.usable)} sending domain(s): {', '.join(keys.usable)}"
    if keys.unusable:
        broken = "; ".join(f"{domain}: {cause}" for domain, cause in keys.unusable.items())
        return Finding("dkim keys", Verdict.WARN, f"{detail}; unusable: {broken}")
    return Finding("dkim keys", Verdict.OK, detail)


def _trust(config: Config) -> tuple[Finding, ssl.SSLContext | None]:
    """The TLS context delivery verifies receivers with (None if the CA bundle does not
    load), and the finding about it."""
    ca = config.transport.ca_bundle
    try:
        context = make_tls_context(str(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        return Finding("transport ca_bundle", Verdict.FAIL, f"{ca}: {reason}"), None
    trust = str(ca) if ca else "the system's CA certificates"
    return Finding("transport ca_bundle", Verdict.OK, trust), context


def _files(config: Config) -> list[Finding]:
    """The files the workers read at start, read the way they read them."""
    found = []
    loads: list[tuple[str, Path | None, Callable[[], object]]] = []
    shaping = config.shaping
    if shaping.enabled:
        assert shaping.pools_file is not None
        pools = shaping.pools_file
        loads.append(("shaping pools_file", pools, lambda: load_pools(pools)))
        loads.append(
            (
                "shaping warmup_file",
                shaping.warmup_file,
                lambda: checked_overrides(
                    load_shaping(shaping.warmup_file), shaping.provider_overrides
                ),
            )
        )
    if config.bounces.enabled:
        rules = config.bounces.rules_file
        loads.append(("bounces rules_file", rules, lambda: load_rules(rules)))
    for check, path, load in loads:
        try:
            load()
        except ConfigError as exc:
            found.append(Finding(check, Verdict.FAIL, exc.detail))
        else:
            found.append(Finding(check, Verdict.OK, str(path or "the packaged default")))
    return found


async def secret_files(config: Config) -> list[Finding]:
    """The secrets the workers read, each compared with what its store records (read, as
    every check is): one that is missing is made at the first start, unless its store
    records one already (another host's, which a new key would not be); the previous VERP
    keys must be there; one that is there must load, and be the key its store records."""
    try:
        wanted = shared_secrets(config)
    except ConfigError as exc:
        return [Finding("bounces verp_previous_keys", Verdict.FAIL, exc.detail)]
    urls = {secret.url: secret.store for secret in wanted}
    read = await asyncio.gather(*(_recorded(url, store) for url, store in urls.items()))
    recorded = dict(zip(urls, read, strict=True))
    return [_secret_file(secret, recorded[secret.url]) for secret in wanted]


async def _recorded(url: str, store: str) -> dict[str, str] | str:
    """The fingerprints a store records, or why they could not be read."""
    import psycopg

    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            return await recorded_fingerprints(url, store)
    except ConfigError as exc:
        return exc.detail
    except TimeoutError:
        return f"no answer in {ANSWER_TIMEOUT:.0f} s"
    except (psycopg.Error, sqlite3.Error, OSError) as exc:
        return type(exc).__name__


def _secret_file(secret: SharedSecret, recorded: dict[str, str] | str) -> Finding:
    ours: dict[str, str] | None = None
    if not secret.exists():
        if not secret.made:
            return Finding(secret.check, Verdict.FAIL, secret.missing_previous())
        detail = f"{secret.path} (created at the first start)"
    else:
        try:
            ours = secret.fingerprints(secret.load(create=False))
        except (ConfigError, ValueError) as exc:
            why = exc.detail if isinstance(exc, ConfigError) else "an escrow key does not load"
            # A key file's errors name it; a key ring's name a key, or nothing.
            where = "" if secret.key_id is not None else f"{secret.path}: "
            return Finding(secret.check, Verdict.FAIL, where + why)
        detail = f"{secret.path} ({'escrow key ring' if secret.key_id is None else 'exists'})"
    if isinstance(recorded, str):
        why = f"not compared with the keys the {secret.store} store records: {recorded}"
        return Finding(secret.check, Verdict.OK, f"{detail}; {why}")
    trouble = secret_trouble(secret, ours, recorded)
    if trouble is not None:
        return Finding(secret.check, Verdict.FAIL, trouble)
    return Finding(secret.check, Verdict.OK, detail)


async def _kafka(config: Config, workers: int) -> list[Finding]:
    kafka = config.kafka
    topics = {
        "events": kafka.events_topic,
        "delivery": kafka.delivery_topic,
        "dlq": kafka.dlq_topic,
    }
    if config.bounces.enabled:
        bounces = config.bounces
        topics["verification"] = bounces.verification_topic
        topics["verification results"] = bounces.results_topic
        topics["paper fallback"] = bounces.paper_topic
    try:
        security = kafka_security(kafka)
        await probe_broker(kafka.bootstrap, security)  # bounded, and says why it failed
        async with asyncio.timeout(ANSWER_TIMEOUT):
            known = await topic_partitions(kafka.bootstrap, security)
    except ConfigError as exc:
        failed = exc.detail
    except BrokerUnavailable as exc:
        failed = exc.detail
    except TimeoutError:
        failed = f"Kafka at {kafka.bootstrap}: no answer within {ANSWER_TIMEOUT:.0f} s"
    except CONNECT_ERRORS as exc:
        failed = f"Kafka at {kafka.bootstrap}: {connect_error_text(exc, security)}"
    else:
        answered = f"{kafka.bootstrap} answered ({security.protocol})"
        return [
            Finding("kafka", Verdict.OK, answered),
            *(
                _topic(f"topic {name}", topic, known.get(topic), workers, events=name == "events")
                for name, topic in topics.items()
            ),
        ]
    skipped = (Finding(f"topic {name}", Verdict.SKIPPED, "Kafka not reached") for name in topics)
    return [Finding("kafka", Verdict.FAIL, failed), *skipped]


def _topic(
    check: str, topic: str, partitions: int | None, workers: int, *, events: bool
) -> Finding:
    if partitions is None:
        why = "is not on the brokers, or this client may not see it (Describe ACL)"
        return Finding(check, Verdict.FAIL, f"{topic} {why}")
    detail = f"{topic}: {partitions} partition(s)"
    if events and partitions < workers:
        idle = f"{workers - partitions} would have nothing to read"
        return Finding(check, Verdict.WARN, f"{detail} for {workers} workers: {idle}")
    return Finding(check, Verdict.OK, detail)


async def _store(setting: str, url: str) -> Finding:
    check = f"store {setting}"
    try:
        location = store_location(url, setting)
    except ConfigError as exc:
        return Finding(check, Verdict.FAIL, exc.detail)
    if isinstance(location, str):
        return await _postgres(check, location)
    try:
        return _sqlite_file(check, location)
    except OSError as exc:
        return Finding(check, Verdict.FAIL, f"{location}: {exc.strerror or type(exc).__name__}")


async def _postgres(check: str, url: str) -> Finding:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except (psycopg.ProgrammingError, ValueError):
        # Its message may quote the URL, password included.
        return Finding(check, Verdict.FAIL, "the PostgreSQL URL cannot be parsed")
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            conn = await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=int(ANSWER_TIMEOUT)
            )
            try:
                cursor = await conn.execute(
                    "SELECT current_schema(), has_schema_privilege(current_schema(), 'CREATE')"
                )
                schema, can_create = await cursor.fetchone() or (None, False)
            finally:
                await conn.close()
    except TimeoutError:
        said = f"PostgreSQL did not answer in {ANSWER_TIMEOUT:.0f} s"
        return Finding(check, Verdict.FAIL, said, may_heal=True)
    except (psycopg.Error, OSError, ValueError) as exc:
        said = libpq_reason(exc, url)
        # libpq's connection-level errors (refused, reset, the server starting up or
        # shutting down, a database or role an init script has yet to make) may pass.
        healing = isinstance(exc, psycopg.OperationalError | OSError)
        return Finding(check, Verdict.FAIL, f"PostgreSQL: {said}", may_heal=healing)
    if schema is None:
        return Finding(check, Verdict.FAIL, "PostgreSQL answered; its search_path names no schema")
    if not can_create:
        # The workers create their tables IF NOT EXISTS at every start: that needs CREATE.
        why = f"PostgreSQL answered; this role may not CREATE in schema {schema}"
        return Finding(check, Verdict.FAIL, why)
    return Finding(check, Verdict.OK, f"PostgreSQL answered (schema {schema})")


def _sqlite_file(check: str, path: Path) -> Finding:
    # The first start creates the file and any missing directories (`open_sqlite`); SQLite
    # writes its WAL beside the file.
    existing = path if path.exists() else next(p for p in path.parents if p.exists())
    directory = existing.parent if existing == path else existing
    if existing == path and not (path.is_file() and os.access(path, os.R_OK | os.W_OK)):
        return Finding(check, Verdict.FAIL, f"{path} cannot be read and written")
    if not (directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)):
        return Finding(check, Verdict.FAIL, f"{path}: {directory} is not a writable directory")
    detail = f"{path} (exists)" if existing == path else f"{path} (created at the first start)"
    if not path.is_absolute():
        # Started from another directory, `eobblast run` would find another, empty store.
        return Finding(check, Verdict.WARN, f"{detail}, relative to {Path.cwd()}")
    return Finding(check, Verdict.OK, detail)


async def _routes(config: Config, context: ssl.SSLContext | None) -> list[Finding]:
    transport = config.transport
    try:
        routes = sorted(parse_static_routes(transport.routes).items())
    except ConfigError as exc:
        return [Finding("routes", Verdict.FAIL, exc.detail)]
    if context is None:
        return [Finding(f"route {d}", Verdict.SKIPPED, "no CA bundle") for d, _ in routes]
    wait = max(transport.connect_timeout, transport.command_timeout)
    # Connection, greeting, EHLO, STARTTLS, EHLO: as long as delivery would wait.
    whole = transport.connect_timeout + 4 * transport.command_timeout

    async def probe(domain: str, route: Route) -> Finding:
        check = f"route {domain}"
        try:
            async with asyncio.timeout(whole):
                version = await probe_route(
                    route,
                    context,
                    ehlo_name=transport.ehlo_name,
                    source_address=transport.source_address,
                    wait=wait,
                )
        except RouteTrouble as trouble:
            return Finding(check, Verdict.FAIL, str(trouble))
        except TimeoutError:
            return Finding(check, Verdict.FAIL, f"{where(route)}: no end within {whole:.0f} s")
        return Finding(check, Verdict.OK, f"{where(route)} greets, {version} verified")

    return list(await asyncio.gather(*(probe(domain, route) for domain, route in routes)))
