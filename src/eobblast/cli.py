"""The `eobblast` command line."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import getpass
import logging
import os
import signal
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from eobblast._cli import command_config, config_option
from eobblast.config import Config, warn_relative_stores
from eobblast.errors import INPUT_REASONS, ConfigError, EobblastError

if TYPE_CHECKING:
    from eobblast.preflight import Finding
    from eobblast.streams import KafkaSecurity

console = Console(stderr=True)


def _run(coro: Any) -> Any:
    async def main() -> Any:
        # SIGTERM (systemd, docker stop, timeout, a CI runner) cancels the command, so its
        # finally blocks stop what it started: the demo's broker and workers, the portal's
        # stores. A command with its own SIGTERM handling (run) replaces this one.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro

    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            return asyncio.run(main())
        return uvloop.run(main())
    except asyncio.CancelledError:
        raise SystemExit(128 + signal.SIGTERM) from None
    except ConfigError as exc:  # a missing key, an unreadable store URL: say so, exit 1
        raise click.ClickException(str(exc)) from None


def _os_cause(exc: OSError) -> str:
    """An OSError's cause in words, without the path or address it may repeat."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return exc.strerror or type(exc).__name__
    # asyncio rewords a bind's error ("error while attempting to bind on address ...").
    return os.strerror(exc.errno)


def _listen_error(
    settings: tuple[str, str], host: str, port: int, exc: OSError
) -> click.ClickException:
    """A listener that could not be had, as an error naming the setting at fault (of
    `settings`, the address's and the port's: a name that does not resolve or an address
    not of this host, else a port in use or not permitted), the address and the cause."""
    wrong_address = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
    setting = settings[0] if wrong_address else settings[1]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return click.ClickException(f"{setting}: cannot listen on {address}: {_os_cause(exc)}")


@click.group()
@click.version_option(package_name="eobblast")
def main() -> None:
    """eobblast: signed, protected, accounted-for EOB email from Kafka events."""
    from eobblast.observe.logs import configure_logging

    configure_logging("WARNING")


@main.command()
@click.option(
    "--name",
    type=click.Choice(
        [
            "eob.issued/v1",
            "eob.delivery/v1",
            "eob.events.dlq/v1",
            "eob.address-verification/v1",
            "eob.address-verification.results/v1",
            "eob.paper-fallback/v1",
        ]
    ),
    default="eob.issued/v1",
    show_default=True,
    help=(
        "Which record type: the input event, a status, a dead letter, an address"
        " verification request or result, or a paper fallback."
    ),
)
def schema(name: str) -> None:
    """Print the JSON Schema of an event eobblast reads or writes."""
    from eobblast.events import json_schema
    from eobblast.events.status import dlq_json_schema, status_json_schema
    from eobblast.events.verification import (
        paper_fallback_json_schema,
        verification_request_json_schema,
        verification_result_json_schema,
    )

    exported = {
        "eob.issued/v1": json_schema,
        "eob.delivery/v1": status_json_schema,
        "eob.events.dlq/v1": dlq_json_schema,
        "eob.address-verification/v1": verification_request_json_schema,
        "eob.address-verification.results/v1": verification_result_json_schema,
        "eob.paper-fallback/v1": paper_fallback_json_schema,
    }[name]()
    click.echo(orjson.dumps(exported, option=orjson.OPT_INDENT_2).decode())


@main.command()
@click.option("--count", "-n", type=click.IntRange(min=0), required=True, help="Events to write.")
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed.")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File to write (JSON Lines); standard output when omitted.",
)
def generate(count: int, seed: int, out: Path | None) -> None:
    """Write realistic fake eob.issued/v1 events, including ones that must be rejected."""
    from eobblast.events.synthetic import generate_events

    try:
        with out.open("wb") if out else contextlib.nullcontext(sys.stdout.buffer) as sink:
            for raw in generate_events(count, seed=seed):
                sink.write(raw + b"\n")
    except OSError as exc:
        if out is None:  # standard output: not a file of the user's to name
            raise
        raise click.ClickException(f"--out {out}: cannot be written: {_os_cause(exc)}") from None


@main.group()
def keys() -> None:
    """DKIM signing keys and the service's secrets."""


@keys.command("generate")
@click.option(
    "--domain", "-d", "domains", multiple=True, required=True, help="Sending domain (repeatable)."
)
@click.option("--selector", "-s", default="eob1", show_default=True)
@click.option(
    "--key-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("keys"),
    show_default=True,
)
@click.option(
    "--ed25519/--no-ed25519",
    default=True,
    show_default=True,
    help="Also create an Ed25519 key for a second signature (RFC 8463).",
)
def keys_generate(domains: tuple[str, ...], selector: str, key_dir: Path, ed25519: bool) -> None:
    """Create signing keys (existing ones are kept) and print their DNS TXT records."""
    from eobblast.protect.dkim import generate_keys

    for domain in domains:
        try:
            records = generate_keys(key_dir, domain, selector, ed25519=ed25519)
        except ConfigError as exc:  # a name that is no DNS name, a key that does not load
            raise click.ClickException(exc.detail) from None
        except OSError as exc:
            raise click.ClickException(
                f"--key-dir {key_dir}: the keys cannot be made there: {_os_cause(exc)}"
            ) from None
        for record in records:
            click.echo(record.zone_line())


@keys.command("secrets")
@config_option()
def keys_secrets(config_path: Path | None) -> None:
    """Create the secrets the configuration names (existing ones are kept).

    The VERP key, the escrow key ring and the member-reference key. Run it once before
    starting `eobblast bounces` or `eobblast portal`, which only read them. The stores
    record them, as a first start would: it exits 1, making nothing, where a store
    records another host's.
    """
    from eobblast.protect.services import hold_secrets, shared_secrets

    config = command_config(config_path)
    try:
        wanted = shared_secrets(config)
        existed = {secret: secret.exists() for secret in wanted}
        _run(hold_secrets(wanted, create=True))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    # The VERP key first, as this command has always listed them.
    for secret in sorted(wanted, key=lambda secret: secret.argument != "verp"):
        if secret.made:
            what = "escrow key ring" if secret.key_id is None else secret.what
            said = "kept" if existed[secret] else "created"
            click.echo(f"{said} {what}: {secret.path}")


@keys.command("record")
@config_option()
@click.argument(
    "secrets", nargs=-1, required=True, type=click.Choice(["verp", "escrow", "member-reference"])
)
@click.option("--yes", is_flag=True, help="Change the stores (without it: say what would change).")
def keys_record(config_path: Path | None, secrets: tuple[str, ...], yes: bool) -> None:
    """Make the stores record this host's keys of SECRETS, replacing the ones recorded.

    After a rotation that the stores refuse (a VERP key id used again with a new key, a
    new member-reference key, an escrow key ring whose recorded keys are all retired):
    the stores then record exactly this host's keys of each SECRET (verp: the VERP key
    and the previous ones), and a host with other keys is refused from then on. Copy
    these keys to every other host. Prints what changed, by name (never a key).
    """
    from eobblast.protect.services import record_secrets, shared_secrets

    config = command_config(config_path)
    if "verp" in secrets and not config.bounces.enabled:
        raise click.ClickException("[bounces] enabled is false: there is no VERP key to record")
    try:
        wanted = [s for s in shared_secrets(config) if s.argument in secrets]
        said = _run(record_secrets(wanted, write=yes))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if not said:
        click.echo("the stores record these keys already: nothing to change")
        return
    for line in said:
        click.echo(line if yes else f"would have {line}")
    if not yes:
        raise click.ClickException("nothing changed: run again with --yes to make these changes")


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("sandbox"),
    show_default=True,
    help="Directory for the test CA and the Maildirs.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=2525,
    show_default=True,
    help="Port every sandbox domain listens on (each has its own 127.x address).",
)
def sandbox(out: Path, port: int) -> None:
    """Run the sandbox receivers until interrupted."""
    from eobblast.sandbox import Sandbox, default_sandbox_domains, make_test_pki

    async def serve() -> None:
        domains = default_sandbox_domains(port=port)
        pki = make_test_pki(out / "pki", [d.name for d in domains])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with Sandbox(domains, out / "maildir", pki) as running:
            table = Table(title="eobblast sandbox")
            for column in ("domain", "listens on", "behaviour"):
                table.add_column(column)
            for domain in domains:
                host, bound = running.routes[domain.name]
                table.add_row(domain.name, f"{host}:{bound}", domain.behaviour)
            console.print(table)
            console.print(f"trust this CA: {pki.ca}   Maildirs: {out / 'maildir'}   Ctrl-C stops")
            await stop.wait()

    _run(serve())


# What `run` starts, and what `check` checks the events topic's partitions against.
_workers_option = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes (default: [workers] count, or one per core).",
)


@main.command()
@config_option()
@_workers_option
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
)
def run(config_path: Path | None, workers: int | None, log_level: str) -> None:
    """Consume eob.events from Kafka with one worker per core until SIGTERM or Ctrl-C.

    Starts no worker while a PostgreSQL store does not answer (it waits, and says why), or
    when any store fails `eobblast check`'s checks otherwise or a secret is not the one its
    store records (it exits 1)."""
    from eobblast.observe.logs import configure_logging
    from eobblast.supervisor import Supervisor, prepare_multiprocess_metrics

    configure_logging(log_level)
    config = command_config(config_path)
    warn_relative_stores(config)
    _warn_of_placeholders(config)
    _kafka_security(config)  # checked here, once: each worker builds its own
    _check_signing_keys(config)
    if not _run(_stores_answered(config)):
        return  # SIGTERM or Ctrl-C while waiting: nothing started, nothing to stop
    _check_secrets(config)  # against what the stores, answering now, record
    metrics_dir = prepare_multiprocess_metrics()

    async def supervise() -> None:
        supervisor = Supervisor(config, workers=workers, log_level=log_level)
        if config.metrics.port:
            from eobblast.observe.metrics import serve_multiprocess_metrics

            try:  # before any worker starts
                port = serve_multiprocess_metrics(
                    config.metrics.port,
                    config.metrics.address,
                    str(metrics_dir),
                    supervisor.metrics,
                    supervisor.health_report,
                )
            except OSError as exc:
                metrics = config.metrics
                raise _listen_error(
                    ("metrics.address", "metrics.port"), metrics.address, metrics.port, exc
                ) from None
            console.print(
                f"metrics on http://{config.metrics.address}:{port}/metrics, health on /healthz"
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await supervisor.run(stop)

    _run(supervise())


def _check_signing_keys(config: Config) -> None:
    """Refuse to start workers that could sign nothing: every notice would fail."""
    from eobblast.preflight import no_signing_key_text, signing_keys

    log = logging.getLogger("eobblast.cli")
    try:
        keys = signing_keys(config)
    except ConfigError as exc:
        raise click.ClickException(exc.detail) from None
    for domain, cause in keys.unusable.items():
        log.error("DKIM key unusable", extra={"domain": domain, "cause": cause})
    if not keys.usable:
        raise click.ClickException(no_signing_key_text(config))
    log.info("DKIM keys found", extra={"key_dir": str(config.dkim.key_dir), "domains": keys.usable})


def _warn_of_placeholders(config: Config) -> None:
    """Warn of what `eobblast check` finds likely not meant (a reserved name in portal links,
    return paths or EHLO names, shaping off) without refusing: the tests and the demo mean
    them."""
    from eobblast.preflight import Verdict, placeholder_settings

    log = logging.getLogger("eobblast.cli")
    for finding in placeholder_settings(config):
        if finding.verdict is not Verdict.OK:
            log.warning("%s: %s", finding.check, finding.detail, extra={"check": finding.check})


def _check_secrets(config: Config) -> None:
    """Refuse to start workers whose secrets are not the ones the stores record (another
    host's): each would die at its start, and be restarted, forever. The cause is
    `eobblast check`'s."""
    from eobblast.preflight import Verdict, secret_files

    failed = [f for f in _run(secret_files(config)) if f.verdict is Verdict.FAIL]
    if failed:
        raise _refused_start(failed)


def _refused_start(failed: list[Finding]) -> click.ClickException:
    """`run`'s error for failed checks: each check and its cause, as `check` says them."""
    causes = "; ".join(f"{finding.check}: {finding.detail}" for finding in failed)
    return click.ClickException(f"{causes} (no worker started)")


# The longest `run` waits between two looks at a store that does not answer yet.
STORE_RETRY_CAP = 30.0


async def _stores_answered(config: Config) -> bool:
    """Wait until every store passes `eobblast check`'s store checks (True), or SIGTERM or
    Ctrl-C comes first (False). A PostgreSQL server that does not answer may be starting
    with eobblast: waited for, as the workers wait for brokers. Any other failure (a URL,
    a right, a SQLite place) stops run at once, with the cause `check` gives and never the
    URL: each worker would die at its start, and be restarted, forever."""
    from eobblast.preflight import Verdict, stores
    from eobblast.streams.kafka import backoff_delay

    log = logging.getLogger("eobblast.cli")
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    attempt = 0
    try:
        while failed := [f for f in await stores(config) if f.verdict is Verdict.FAIL]:
            attempt += 1
            if not all(finding.may_heal for finding in failed):
                raise _refused_start(failed)
            delay = backoff_delay(attempt, base=1.0, cap=STORE_RETRY_CAP)
            for finding in failed:
                log.error(
                    "%s: %s; waiting for it, no worker started",
                    finding.check,
                    finding.detail,
                    extra={"check": finding.check, "attempt": attempt, "retry_in": round(delay, 1)},
                )
            await asyncio.sleep(delay)
    except asyncio.CancelledError:
        # Ours (the signal handlers above): a stop asked for, not an error.
        task.uncancel()
        log.info("stopped while waiting for the stores; no worker started")
        return False
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if attempt:
        log.info("stores answer", extra={"attempts": attempt + 1})
    return True


@main.command()
@config_option()
@_workers_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per check.")
def check(config_path: Path | None, workers: int | None, as_json: bool) -> None:
    """Check what `eobblast run` needs, changing nothing: DKIM keys, the files read at
    start, the brokers and the topics, the stores, the static SMTP routes (STARTTLS
    verified), and the names members and receivers see: a reserved name (example.com,
    .example, .test, .local, ...) in [portal] base_url or [bounces] bounce_domain fails, and
    so does an EHLO name ([transport] ehlo_name, or with shaping on the pools file's) that
    is reserved or no fully qualified host name; no [shaping] pools_file (shaping off) is a
    warning. Exits 1 if any check fails."""
    from rich.markup import escape

    from eobblast.preflight import Verdict, preflight
    from eobblast.supervisor import worker_count

    config = command_config(config_path)
    findings = _run(preflight(config, workers=workers or worker_count(config)))
    if as_json:
        for finding in findings:
            # The documented fields: whether a failure may heal is `run`'s concern.
            said = {"check": finding.check, "verdict": finding.verdict, "detail": finding.detail}
            click.echo(orjson.dumps(said))
    else:
        table = Table(title=escape(f"eobblast check: {config_path or 'defaults'}"))
        for column in ("check", "result", "detail"):
            table.add_column(column)
        styles = {Verdict.OK: "green", Verdict.WARN: "yellow", Verdict.FAIL: "bold red"}
        for finding in findings:
            result = f"[{styles.get(finding.verdict, 'dim')}]{finding.verdict}[/]"
            table.add_row(escape(finding.check), result, escape(finding.detail))
        # The report itself: standard output, a line per check in a log or a pipe too.
        Console(width=None if sys.stdout.isatty() else 240).print(table)
    failed = [finding.check for finding in findings if finding.verdict is Verdict.FAIL]
    if failed:
        raise click.ClickException(f"{len(failed)} check(s) failed: {', '.join(failed)}")


@main.command()
@config_option()
@click.option("--host", default=None, help="Listen address (default: [portal] listen_address).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Listen port (default: [portal] listen_port; 0 picks a free one).",
)
def portal(config_path: Path | None, host: str | None, port: int | None) -> None:
    """Serve the secure-portal pickup page until interrupted."""
    from eobblast.observe.logs import configure_logging
    from eobblast.portal import create_app, csrf_secret_from, serve_portal
    from eobblast.protect.services import ProtectionServices

    configure_logging("INFO")
    config = command_config(config_path)
    warn_relative_stores(config, {"portal.escrow_url", "portal.audit_url"})
    https = config.portal.base_url.startswith("https://")
    if https and not config.portal.trusted_proxies:
        # HTTPS ends at a proxy in front: without trusting it, every member seems to come
        # from the proxy's address and shares one rate limit.
        logging.getLogger("eobblast.portal").warning(
            "portal links are https but [portal] trusted_proxies is empty: "
            "rate limits count every client of the TLS proxy as one"
        )

    listen_host = host or config.portal.listen_address
    listen_port = config.portal.listen_port if port is None else port
    settings = (
        "--host" if host else "portal.listen_address",
        "--port" if port is not None else "portal.listen_port",
    )

    async def serve() -> None:
        # Only the workers' keys open their envelopes: a missing key ring is an error.
        services = await ProtectionServices.open(config, create_keys=False)
        assert services.escrow is not None and services.audit is not None
        try:
            if config.portal.metrics_port:
                from eobblast.observe.metrics import serve_metrics

                # Its own port, never the portal's: /metrics must not face members. Bound
                # first: the portal is then not serving when it fails.
                address, metrics_port = config.metrics.address, config.portal.metrics_port
                try:
                    bound = serve_metrics(metrics_port, address)
                except OSError as exc:
                    raise _listen_error(
                        ("metrics.address", "portal.metrics_port"), address, metrics_port, exc
                    ) from None
                console.print(f"metrics on http://{address}:{bound}/metrics")
            try:
                server = await serve_portal(
                    create_app(
                        services.escrow,
                        services.audit,
                        lockout_after=config.portal.lockout_after,
                        # Shared by every portal process and kept across restarts.
                        csrf_secret=csrf_secret_from(services.audit_key),
                        https=https,
                        access_days=config.portal.access_days,
                    ),
                    listen_host,
                    listen_port,
                    forwarded_allow_ips=config.portal.forwarded_allow_ips,
                )
            except OSError as exc:
                raise _listen_error(settings, listen_host, listen_port, exc) from None
            console.print(f"portal on {server.url}/p/<token>   Ctrl-C stops")
            await server.wait()
        finally:
            await services.close()

    _run(serve())


@main.command()
@config_option()
@click.option("--host", default=None, help="Listen address (default: [bounces] listen_address).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Listen port (default: [bounces] listen_port; 0 picks a free one).",
)
def bounces(config_path: Path | None, host: str | None, port: int | None) -> None:
    """Receive asynchronous bounces (DSNs) for VERP return paths until interrupted."""
    from eobblast.bounces.listener import BounceListener, load_tls_context
    from eobblast.observe.logs import configure_logging
    from eobblast.protect.services import ProtectionServices
    from eobblast.streams import make_producer, wait_for_broker
    from eobblast.streams.kafka import BrokerUnavailable, start_or_unavailable
    from eobblast.worker import ProducerPublisher, dsn_handler, open_bounces, stop_in_time

    configure_logging("INFO")
    config = command_config(config_path)
    security = _kafka_security(config)
    warn_relative_stores(config, {"bounces.store_url", "portal.escrow_url", "portal.audit_url"})
    settings = config.bounces
    context = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        try:  # before keys, stores and the broker: a wrong path is said at once
            context = load_tls_context(settings.tls_cert, settings.tls_key)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None

    listen_host = host or settings.listen_address
    listen_port = settings.listen_port if port is None else port
    named = (
        "--host" if host else "bounces.listen_address",
        "--port" if port is not None else "bounces.listen_port",
    )

    async def serve() -> None:
        async with contextlib.AsyncExitStack() as opened:
            # Keys and stores first: a missing VERP key is said at once, not after the
            # broker has been waited for. Only the workers' VERP key opens their return
            # paths, so a missing one is an error, never a fresh key.
            protection = await ProtectionServices.open(config, create_keys=False)
            opened.push_async_callback(protection.close)
            producer = make_producer(
                config.kafka.bootstrap, client_id="eobblast-bounces", security=security
            )
            # Safe before start, too. Bounded: with the broker away, a status not yet taken
            # would keep the stop waiting for the producer's request timeout (40 s).
            opened.push_async_callback(stop_in_time, "producer", producer.stop)
            service = await open_bounces(
                config,
                protection,
                ProducerPublisher(producer),
                actor="bounce-listener",
                create_key=False,
            )
            opened.push_async_callback(service.store.close)
            listener = BounceListener(
                dsn_handler(service, producer),
                host=listen_host,
                port=listen_port,
                bounce_domain=settings.bounce_domain,
                review_dir=settings.review_dir,
                prefix=settings.verp_prefix,
                tls_context=context,
                review_days=settings.review_days,
                review_max_messages=settings.review_max_messages,
                data_size_limit=settings.max_message_bytes,
            )
            # The port taken before the broker is waited for (a port in use is said at
            # once), served once the producer can publish what the handler finds.
            try:
                await listener.bind()
            except OSError as exc:
                raise _listen_error(named, listen_host, listen_port, exc) from None
            opened.push_async_callback(listener.stop)
            await wait_for_broker(config.kafka.bootstrap, security=security)
            try:
                await start_or_unavailable(producer, config.kafka.bootstrap, security)
            except BrokerUnavailable as exc:  # gone again since the probe: said, no traceback
                raise click.ClickException(exc.detail) from None
            await listener.start()
            if settings.metrics_port:
                from eobblast.observe.metrics import serve_metrics

                # Served once the listener is: until then EobblastDown says it is not.
                address = config.metrics.address
                try:
                    bound = serve_metrics(settings.metrics_port, address)
                except OSError as exc:
                    raise _listen_error(
                        ("metrics.address", "bounces.metrics_port"),
                        address,
                        settings.metrics_port,
                        exc,
                    ) from None
                console.print(f"metrics on http://{address}:{bound}/metrics")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            console.print(
                f"bounces for *@{settings.bounce_domain} on "
                f"{listen_host}:{listener.port}   Ctrl-C stops"
            )
            await stop.wait()

    _run(serve())


_REASONS = click.Choice([*(str(reason) for reason in INPUT_REASONS), "unreadable"])


def _dlq_selection(
    reasons: tuple[str, ...], event_ids: tuple[str, ...], positions: tuple[str, ...]
) -> Any:
    from eobblast.dlq import Selection

    wanted_positions = set()
    for position in positions:
        partition, _, offset = position.partition(":")
        try:
            if not position.isascii():
                raise ValueError(position)
            wanted_positions.add(f"{int(partition)}:{int(offset)}")
        except ValueError:
            raise click.BadParameter(
                f"{position!r} is not PARTITION:OFFSET", param_hint="--at"
            ) from None
    return Selection(frozenset(reasons), frozenset(event_ids), frozenset(wanted_positions))


def _dlq_filters(command: Any) -> Any:
    for option in reversed(
        [
            click.option("--reason", "reasons", multiple=True, type=_REASONS,
                         help="Only dead letters with this reason code (repeatable)."),
            click.option("--event-id", "event_ids", multiple=True,
                         help="Only dead letters of this event id (repeatable)."),
            click.option("--at", "positions", multiple=True, metavar="PARTITION:OFFSET",
                         help="Only the dead letter at this position of the DLQ (repeatable)."),
        ]
    ):  # fmt: skip
        command = option(command)
    return command


@main.group()
def dlq() -> None:
    """Rejected input parked on the dead-letter topic: list it, send it back.

    Neither command prints an original's bytes or key (PHI, a member id)."""


@dlq.command("list")
@config_option()
@_dlq_filters
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
def dlq_list(
    config_path: Path | None,
    reasons: tuple[str, ...],
    event_ids: tuple[str, ...],
    positions: tuple[str, ...],
    as_json: bool,
) -> None:
    """List the dead letters: position, time, reason code, field, event id, where each was
    read, its size and SHA-256, whether it can be replayed.

    An original that this eobblast, with this configuration, would still refuse is not
    replayable: `still_refused`, with the reason code it gets now (`refused_now`). One read
    from another topic than the input topic (an address-verification result the workers
    could not read) is not replayable either: `other_topic`."""
    from eobblast.dlq import dead_letters, refusal_check

    config = command_config(config_path)
    kafka = config.kafka
    security = _kafka_security(config)
    check = refusal_check(allow_test_domains=config.pipeline.allow_test_domains)
    selection = _dlq_selection(reasons, event_ids, positions)
    out = Console(width=None if sys.stdout.isatty() else 200)

    async def listing() -> tuple[Counter[str], int]:
        by_reason: Counter[str] = Counter()
        replayable = 0
        table = Table(
            "position",
            "rejected at",
            "reason",
            "field",
            "event id",
            "read at",
            "bytes",
            "replayable",
            title=f"dead letters on {kafka.dlq_topic}",
        )
        async for parked in dead_letters(
            kafka.bootstrap,
            kafka.dlq_topic,
            selection,
            check,
            events_topic=kafka.events_topic,
            security=security,
        ):
            by_reason[parked.reason] += 1
            row = parked.summary()
            replayable += row["replayable"]
            if as_json:
                click.echo(orjson.dumps(row))
                continue
            table.add_row(
                row["position"],
                row["rejected_at"] or "",
                row["reason"],
                row["field"] or "",
                row["event_id"] or "",
                row["source"] or "",
                "" if row["original_size"] is None else str(row["original_size"]),
                _replayable_cell(row),
            )
        if not as_json:
            out.print(table)
        return by_reason, replayable

    by_reason, replayable = _dlq_run(listing(), kafka.bootstrap)
    total = sum(by_reason.values())
    counts = ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items()))
    click.echo(
        f"{total} dead letters" + (f": {counts}" if counts else "") + f"; {replayable} replayable",
        err=True,
    )


def _replayable_cell(row: dict[str, Any]) -> str:
    if row["replayable"]:
        return "yes"
    now = f" ({row['refused_now']})" if row["refused_now"] else ""
    return f"no: {row['not_replayable']}{now}"


@dlq.command("replay")
@config_option()
@_dlq_filters
@click.option("--all", "everything", is_flag=True, help="Every dead letter (no filter needed).")
@click.option("--dry-run", is_flag=True, help="Count what would be sent; send nothing.")
@click.option(
    "--actor",
    metavar="NAME",
    help="Who runs the replay, as the audit trail records it (default: the OS user).",
)
def dlq_replay(
    config_path: Path | None,
    reasons: tuple[str, ...],
    event_ids: tuple[str, ...],
    positions: tuple[str, ...],
    everything: bool,
    dry_run: bool,
    actor: str | None,
) -> None:
    """Publish the selected dead letters' originals to the input topic again.

    For records that eobblast rejected and would now accept (after an upgrade or a
    configuration change): each goes back under its original key (the member id), after
    the member's later notices. An event delivered meanwhile under the same event id is not
    sent again (the send ledger, within its retention). Each original is checked first as
    the workers would check it, by this eobblast with this configuration: one still refused
    is skipped (`still_refused`; `still_refused_by_reason` gives the reason codes it gets
    now), so run it where the fix (upgrade, setting) is in place. Dead letters read from
    another topic (address-verification results: `other_topic`) are never sent to the
    input topic. Unreadable records, originals kept only in part (over 256 KiB) or not at
    all (the DLQ topic refused the whole letter), empty ones, and records whose key is
    missing or was cut (over 1 KiB) are skipped too, and so is a record the broker refuses
    for itself (too large for the topic, a policy; its DLQ position is printed), the others
    going on. Running it twice publishes the records twice; the ledger still sends one email
    per event id. If the broker fails part way, the counts printed say how many records it
    acknowledged (`replayed`) and how many it did not (`not_acknowledged`: some may have
    reached the topic all the same), and the command exits 1.

    Each record sent back is written to the audit trail (`[portal] audit_url`:
    `dlq_replayed`, with who ran it, `--actor` or the OS user, its event id and the opaque
    member reference), so the command needs the trail and the member-reference key
    (`[portal] audit_key_file`) the workers use; without them it sends nothing.
    """
    from eobblast.dlq import ReplayInterrupted, ReplayNotAudited, refusal_check, replay

    config = command_config(config_path)
    kafka = config.kafka
    security = _kafka_security(config)
    selection = _dlq_selection(reasons, event_ids, positions)
    if selection.empty and not everything:
        raise click.UsageError("name what to replay (--reason, --event-id, --at), or say --all")
    if everything and not selection.empty:
        raise click.UsageError(
            "--all replays every dead letter: give it alone, or name what to replay"
            " (--reason, --event-id, --at) without it"
        )
    replayer = None if dry_run else _replay_actor(actor)
    if replayer is not None:
        warn_relative_stores(config, {"portal.audit_url"})
    check = refusal_check(allow_test_domains=config.pipeline.allow_test_domains)
    stopped: ReplayInterrupted | None = None

    async def replayed() -> Any:
        audit = None if replayer is None else await _replay_audit(config, replayer)
        try:
            return await replay(
                kafka.bootstrap,
                kafka.dlq_topic,
                kafka.events_topic,
                selection,
                check=check,
                dry_run=dry_run,
                security=security,
                audit=audit,
            )
        finally:
            if audit is not None:
                await audit.trail.close()

    try:
        report = _dlq_run(replayed(), kafka.bootstrap)
    except ReplayInterrupted as exc:  # a dry run sends nothing, so is never interrupted
        report, stopped = exc.report, exc
    except ReplayNotAudited as exc:
        click.echo(orjson.dumps({"dry_run": dry_run, "interrupted": False, **exc.report.as_dict()}))
        raise click.ClickException(
            f"{sum(exc.report.replayed.values())} records were sent back to"
            f" {kafka.events_topic}, but the audit trail did not record them ({exc}):"
            " record the replay by hand from the counts above"
        ) from None
    counts = report.as_dict()
    click.echo(orjson.dumps({"dry_run": dry_run, "interrupted": stopped is not None, **counts}))
    if counts["refused_by_broker_at"]:
        click.echo(
            "refused by the broker (too large for the topic, or a policy), at "
            + ", ".join(counts["refused_by_broker_at"]),
            err=True,
        )
    if stopped is not None:
        raise click.ClickException(
            f"Kafka at {kafka.bootstrap}: {stopped}; {counts['replayed']} records were sent"
            f" back to {kafka.events_topic} and acknowledged, {counts['not_acknowledged']}"
            " were not (some of those may have reached it); running the command again is"
            " safe (one email per event id)"
        )
    verb = "would be sent" if dry_run else f"sent back to {kafka.events_topic}"
    still = sum(counts["still_refused_by_reason"].values())
    click.echo(
        f"{counts['replayed']} {verb}; {counts['skipped']} skipped"
        + (f" ({still} still refused)" if still else ""),
        err=True,
    )


def _replay_actor(actor: str | None) -> str:
    """Who the audit trail says replayed: `--actor`, else the OS user."""
    from eobblast.observe.audit import is_token

    if actor is None:
        try:
            actor = getpass.getuser()
        except (OSError, KeyError):  # no name in the environment or the password database
            raise click.UsageError("say who replays with --actor (no OS user name)") from None
    if not is_token(actor):
        raise click.BadParameter(
            "a short name: letters, digits and . _ : - (at most 64)", param_hint="--actor"
        )
    return actor


async def _replay_audit(config: Config, actor: str) -> Any:
    """The audit trail and member-reference key a replay is recorded with (ConfigError if
    this host lacks the key: a new one would name members differently)."""
    from eobblast.dlq import ReplayAudit
    from eobblast.observe.audit import open_audit
    from eobblast.protect.services import hold_secrets, portal_secrets

    _, reference = portal_secrets(config)
    if not reference.exists():
        # Not the generic advice to make the secrets: a key made here would name the
        # replayed members differently from every other record of theirs.
        raise ConfigError(
            f"[portal] audit_key_file {reference.path} does not exist: a replay is recorded"
            " in the audit trail with the workers' member-reference key; copy it from a"
            " worker host (never make a new one for this), or see what would be replayed"
            " with --dry-run, which needs none"
        )
    held = await hold_secrets([reference], create=False)
    return ReplayAudit(await open_audit(config.portal.audit_url), held.key(reference), actor)


def _kafka_security(config: Config) -> KafkaSecurity:
    """The Kafka clients' TLS and SASL settings, loaded (a file that cannot be read is a
    ConfigError now, not a worker that dies); a warning if events would cross a network to
    the brokers unencrypted."""
    from eobblast.streams import kafka_security, unprotected_brokers

    try:
        security = kafka_security(config.kafka)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if unprotected_brokers(config.kafka.bootstrap, security):
        logging.getLogger("eobblast.cli").warning(
            "Kafka traffic is not encrypted: events carry PHI (and a SASL PLAIN login its"
            " password); set kafka.security_protocol to SSL or SASL_SSL for brokers on"
            " another machine",
            extra={"bootstrap": config.kafka.bootstrap},
        )
    return security


def _dlq_run(coro: Any, bootstrap: str) -> Any:
    from eobblast.streams.kafka import BrokerUnavailable, KafkaError

    try:
        return _run(coro)
    except BrokerUnavailable as exc:
        raise click.ClickException(exc.detail) from None
    except KafkaError as exc:
        raise click.ClickException(f"Kafka at {bootstrap}: {type(exc).__name__}") from None


def _register_pools() -> None:
    from eobblast.shaping.cli import pools

    main.add_command(pools)


_register_pools()


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="eobblast demo")
    table.add_column("status")
    table.add_column("reason")
    table.add_column("events", justify="right")
    for status, reasons in summary["by_reason"].items():
        for reason, count in reasons.items():
            table.add_row(status, reason, str(count))
    table.add_section()
    table.add_row("total", "", str(summary["final_statuses"]))
    return table


@main.command()
@click.option("--events", "-n", type=click.IntRange(min=1), default=500, show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Worker processes consuming eob.events.",
)
@config_option()
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
)
def demo(
    events: int,
    out: Path,
    seed: int,
    workers: int,
    config_path: Path | None,
    progress: bool,
    log_level: str,
) -> None:
    """Generate events, publish them to an embedded Kafka, deliver everything, summarise."""
    from eobblast.demo import run_demo
    from eobblast.events.status import DeliveryStatus
    from eobblast.observe.logs import configure_logging

    configure_logging(log_level)
    config = command_config(config_path)
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    )
    task = bar.add_task("final statuses", total=events)

    def advance(_: DeliveryStatus) -> None:
        bar.advance(task)

    try:
        with bar:
            summary = _run(
                run_demo(
                    events,
                    out,
                    seed=seed,
                    workers=workers,
                    config=config,
                    log_level=log_level,
                    on_status=advance,
                )
            )
    except EobblastError as exc:
        raise click.ClickException(str(exc)) from None
    console.print(_summary_table(summary))
    protection = Table(title="delivered, by protection")
    for column in ("level", "reason", "events"):
        protection.add_column(column)
    for level, reasons in summary["delivered_by_protection"].items():
        for reason, count in reasons.items():
            protection.add_row(level, reason, str(count))
    console.print(protection)
    answers = summary.get("verification_answers", {})
    console.print(
        f"address verification: {answers.get('verified', 0)} confirmed by phone (held EOBs "
        f"released), {answers.get('failed', 0)} not reached (paper fallback); "
        f"{summary.get('dsns_sent_by_receivers', 0)} DSNs received"
    )
    console.print(
        f"{summary['messages_per_second']} messages/s, latency p50 "
        f"{summary['latency_seconds']['p50'] * 1000:.1f} ms, p99 "
        f"{summary['latency_seconds']['p99'] * 1000:.1f} ms; results in {out}/"
    )
    if summary["final_statuses"] != events:
        raise click.ClickException(
            f"{events - summary['final_statuses']} events have no final status"
        )
