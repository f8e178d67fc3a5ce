"""`eobblast check`: what `eobblast run` needs, checked before it runs, without changing
anything.

Each check gives a `Finding`: the DKIM keys the workers sign with, the brokers (reached with
the configured TLS and SASL settings), the topics the workers read and write, every store
(a SQLite file's directory, a PostgreSQL server) and the static SMTP routes. Nothing is
created: no topic, no table, no key, no file. Details name settings, files, hosts and
topics, never a store URL (it may carry a password) and nothing of an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
from dataclasses import dataclass
from pathlib import Path

from eobblast.config import Config, store_urls
from eobblast.errors import ConfigError
from eobblast.protect.dkim import load_signer, signing_domains
from eobblast.state.sqlite import POSTGRES_PREFIXES, sqlite_path
from eobblast.streams.kafka import (
    CONNECT_ERRORS,
    BrokerUnavailable,
    connect_error_text,
    kafka_security,
    probe_broker,
    topic_partitions,
)
from eobblast.transport import Route, parse_static_routes

# How long one server (broker, PostgreSQL, SMTP route) may take to answer.
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
    findings = [_dkim(config)]
    findings += await _kafka(config, workers)
    findings += await asyncio.gather(
        *(_store(setting, url) for setting, url in store_urls(config).items())
    )
    findings += await asyncio.gather(
        *(_route(domain, route.host, route.port) for domain, route in _routes(config))
    )
    return findings


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


async def _kafka(config: Config, workers: int) -> list[Finding]:
    kafka = config.kafka
    topics = {"events": kafka.events_topic, "delivery": kafka.delivery_topic}
    topics["dlq"] = kafka.dlq_topic
    if config.bounces.enabled:
        bounces = config.bounces
        topics["verification"] = bounces.verification_topic
        topics["verification results"] = bounces.results_topic
        topics["paper fallback"] = bounces.paper_topic
    checks = [f"topic {name}" for name in topics]
    try:
        security = kafka_security(kafka)
    except ConfigError as exc:
        failed = Finding("kafka", Verdict.FAIL, exc.detail)
    else:
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                await probe_broker(kafka.bootstrap, security)
                known = await topic_partitions(kafka.bootstrap, security)
        except BrokerUnavailable as exc:
            failed = Finding("kafka", Verdict.FAIL, exc.detail)
        except TimeoutError:
            failed = Finding("kafka", Verdict.FAIL, f"Kafka at {kafka.bootstrap} did not answer")
        except CONNECT_ERRORS as exc:
            text = connect_error_text(exc, security)
            failed = Finding("kafka", Verdict.FAIL, f"Kafka at {kafka.bootstrap}: {text}")
        else:
            answered = f"{kafka.bootstrap} answered ({security.protocol})"
            found = [Finding("kafka", Verdict.OK, answered)]
            for check, topic in zip(checks, topics.values(), strict=True):
                events = check == checks[0]
                found.append(_topic(check, topic, known.get(topic), workers, events=events))
            return found
    return [failed, *(Finding(check, Verdict.SKIPPED, "Kafka not reached") for check in checks)]


def _topic(
    check: str, topic: str, partitions: int | None, workers: int, *, events: bool
) -> Finding:
    if partitions is None:
        return Finding(check, Verdict.FAIL, f"{topic} is not on the brokers")
    detail = f"{topic}: {partitions} partition(s)"
    if events and partitions < workers:
        idle = f"{workers - partitions} would have nothing to read"
        return Finding(check, Verdict.WARN, f"{detail} for {workers} workers: {idle}")
    return Finding(check, Verdict.OK, detail)


async def _store(setting: str, url: str) -> Finding:
    check = f"store {setting}"
    try:
        path = sqlite_path(url, setting)
    except ConfigError as exc:
        return Finding(check, Verdict.FAIL, exc.detail)
    if path is not None:
        return _sqlite_file(check, path)
    if not url.startswith(POSTGRES_PREFIXES):
        return Finding(
            check, Verdict.FAIL, f"{setting} must start with sqlite:/// or postgresql://"
        )
    import psycopg

    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            conn = await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=int(ANSWER_TIMEOUT)
            )
            try:
                await conn.execute("SELECT 1")
            finally:
                await conn.close()
    except (psycopg.Error, OSError) as exc:  # TimeoutError is an OSError
        # The message may quote the URL, password included: its kind only.
        return Finding(check, Verdict.FAIL, f"PostgreSQL not reached ({type(exc).__name__})")
    return Finding(check, Verdict.OK, "PostgreSQL answered")


def _sqlite_file(check: str, path: Path) -> Finding:
    if path.exists():
        if not (path.is_file() and os.access(path, os.R_OK | os.W_OK)):
            return Finding(check, Verdict.FAIL, f"{path} cannot be read and written")
        found = Finding(check, Verdict.OK, f"{path} (exists)")
    elif path.parent.is_dir() and os.access(path.parent, os.W_OK | os.X_OK):
        found = Finding(check, Verdict.OK, f"{path} (created at the first start)")
    else:
        return Finding(check, Verdict.FAIL, f"{path}: its directory is missing or not writable")
    if not path.is_absolute():
        # Started from another directory, `eobblast run` would find another, empty store.
        return Finding(check, Verdict.WARN, f"{found.detail}, relative to {Path.cwd()}")
    return found


def _routes(config: Config) -> list[tuple[str, Route]]:
    return sorted(parse_static_routes(config.transport.routes).items())


async def _route(domain: str, host: str, port: int) -> Finding:
    check = f"route {domain}"
    writer = None
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            greeting = await reader.readline()
    except OSError as exc:
        return Finding(check, Verdict.FAIL, f"{host}:{port} not reached ({type(exc).__name__})")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    if not greeting.startswith(b"220"):
        return Finding(check, Verdict.FAIL, f"{host}:{port} did not greet as an SMTP server")
    return Finding(check, Verdict.OK, f"{host}:{port} greets")
