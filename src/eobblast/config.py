"""One typed configuration object, loaded from TOML and overridable by EOBBLAST_* variables."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from eobblast._bootstrap import parse_bootstrap
from eobblast._holes import HOLE_SETTLE, MAX_HOLE_SETTLE
from eobblast._net import is_loopback
from eobblast._toml import parse_toml, read_text
from eobblast.errors import ConfigError
from eobblast.shaping.engine import ShapingConfig
from eobblast.state.sqlite import sqlite_path

_log = logging.getLogger("eobblast.config")

KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_SSL", "SASL_PLAINTEXT")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


# `[bounces] max_message_bytes`'s default (the listener's too): reports are small, and a
# stranger's large message costs the listener a parse (and a cut, for the review pile).
BOUNCE_MESSAGE_BYTES = 2 * 1024 * 1024


def _check_ranges(
    section: str,
    config: object,
    *,
    whole: tuple[str, ...] = (),
    positive: tuple[str, ...] = (),
    not_negative: tuple[str, ...] = (),
    ports: tuple[str, ...] = (),
) -> None:
    """ConfigError naming the first setting of `section` out of its range: `whole` counts
    from 1, `positive` numbers above 0, `not_negative` from 0, `ports` from 0 to 65535.
    Said at load, as `eobblast check` and every command load it: not as each worker dying
    in its client library and being restarted, forever."""
    for name in whole:
        if getattr(config, name) < 1:
            raise ConfigError(f"{section}.{name}: expected a whole number >= 1")
    for name in positive:
        if not getattr(config, name) > 0:  # NaN too
            raise ConfigError(f"{section}.{name}: expected a number > 0")
    for name in not_negative:
        if not getattr(config, name) >= 0:
            raise ConfigError(f"{section}.{name}: expected a number >= 0")
    for name in ports:
        if not 0 <= getattr(config, name) <= 65535:
            raise ConfigError(f"{section}.{name}: expected a port from 0 to 65535")


@dataclass(frozen=True, slots=True)
class DkimConfig:
    """Where the signing keys live and how messages are signed."""

    key_dir: Path = Path("keys")
    selector: str = "eob1"
    ed25519: bool = True


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """SMTP delivery limits, timeouts and TLS trust."""

    ca_bundle: Path | None = None
    ehlo_name: str = "eobblast.localhost"
    source_address: str | None = None
    connect_timeout: float = 10.0
    command_timeout: float = 30.0
    max_messages_per_connection: int = 100
    idle_expiry: float = 30.0
    max_connections_per_destination: int = 8
    mx_cache_ttl: float = 300.0
    # domain -> "host:port"; a domain listed here is never looked up in DNS.
    routes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_ranges(
            "transport",
            self,
            whole=("max_messages_per_connection", "max_connections_per_destination"),
            positive=("connect_timeout", "command_timeout"),
            not_negative=("idle_expiry", "mx_cache_ttl"),
        )


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """How many events one process works on at once."""

    max_in_flight: int = 256
    allow_test_domains: bool = False
    from_local_part: str = "eob-notices"


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    """The broker, the consumer group and the topic names."""

    bootstrap: str = "127.0.0.1:9092"
    group_id: str = "eobblast"
    events_topic: str = "eob.events"
    delivery_topic: str = "eob.delivery"
    dlq_topic: str = "eob.events.dlq"
    max_poll_records: int = 500
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    # A member that does not poll this long leaves the group (its partitions move). A worker
    # full of slow sends still polls, its partitions paused, a quarter of this apart.
    max_poll_interval_ms: int = 300_000
    # How often finished offsets are committed (seconds).
    commit_interval: float = 0.2
    # Where a partition's offsets skip, the workers read it again from the hole until a read
    # asked for this long (seconds) after it was first seen still shows it: Tansu can hand
    # out a later batch before an earlier one is stored. Each real hole (a transaction's
    # marker, compaction) holds its partition this long, fetched again meanwhile. 0:
    # believe every hole at once, right for Apache Kafka, whose holes are all real.
    hole_settle: float = HOLE_SETTLE
    # How every client (workers, `eobblast bounces`, `eobblast dlq`) reaches the brokers:
    # PLAINTEXT, SSL (TLS, the brokers' certificates verified, host names included),
    # SASL_SSL (TLS and a SASL login) or SASL_PLAINTEXT. Events carry PHI: use SSL or
    # SASL_SSL to brokers on another machine.
    security_protocol: str = "PLAINTEXT"
    # The CA bundle the brokers' certificates are verified against (None: the system's).
    ssl_ca_file: Path | None = None
    # A client certificate and its key (unencrypted PEM), for brokers that ask for one.
    ssl_cert_file: Path | None = None
    ssl_key_file: Path | None = None
    # SASL_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, the user, and a file holding the
    # password (its first line; readable by the service account only).
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password_file: Path | None = None

    def __post_init__(self) -> None:
        try:
            parse_bootstrap(self.bootstrap)
        except ValueError as error:
            raise ConfigError(f"kafka.bootstrap: {error}") from None
        _check_ranges(
            "kafka",
            self,
            whole=("max_poll_records", "session_timeout_ms", "heartbeat_interval_ms"),
            positive=("commit_interval",),
        )
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            # The consumer refuses more: a member must be able to miss a heartbeat or two
            # before its session ends and its partitions move.
            raise ConfigError(
                "kafka.heartbeat_interval_ms: expected at most a third of"
                f" kafka.session_timeout_ms ({self.session_timeout_ms})"
            )
        if self.max_poll_interval_ms < 1000:
            raise ConfigError("kafka.max_poll_interval_ms: expected at least 1000")
        if not 0 <= self.hole_settle <= MAX_HOLE_SETTLE:
            raise ConfigError(f"kafka.hole_settle: expected seconds from 0 to {MAX_HOLE_SETTLE:g}")
        # Spelt as Kafka's clients accept them, in either case.
        object.__setattr__(self, "security_protocol", self.security_protocol.upper())
        object.__setattr__(self, "sasl_mechanism", self.sasl_mechanism.upper())
        if self.security_protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ConfigError(
                "kafka.security_protocol: expected one of " + ", ".join(KAFKA_SECURITY_PROTOCOLS)
            )
        if self.ssl_key_file is not None and self.ssl_cert_file is None:
            raise ConfigError("kafka.ssl_key_file: needs kafka.ssl_cert_file")
        if not self.uses_tls and (self.ssl_ca_file or self.ssl_cert_file):
            raise ConfigError(
                f"kafka.ssl_*: set, but kafka.security_protocol is {self.security_protocol}"
            )
        if self.uses_sasl:
            if self.sasl_mechanism not in KAFKA_SASL_MECHANISMS:
                raise ConfigError(
                    "kafka.sasl_mechanism: expected one of " + ", ".join(KAFKA_SASL_MECHANISMS)
                )
            if not self.sasl_username or self.sasl_password_file is None:
                raise ConfigError(
                    f"kafka.security_protocol {self.security_protocol}: needs "
                    "kafka.sasl_username and kafka.sasl_password_file"
                )
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password_file:
            raise ConfigError(
                f"kafka.sasl_*: set, but kafka.security_protocol is {self.security_protocol}"
            )

    @property
    def uses_tls(self) -> bool:
        """Whether the clients speak TLS to the brokers."""
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        """Whether the clients log in with SASL."""
        return self.security_protocol.startswith("SASL_")


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """Where the send ledger lives: sqlite:///file on one machine, postgresql://... across."""

    url: str = "sqlite:///eobblast-ledger.db"
    # How long an event is remembered once settled (and its status published; twice that
    # if its status mark was lost): the window in which a duplicate (a claims system
    # publishing it again, Kafka redelivering it) is not sent again. Keep it longer than
    # eob.events' retention. 0: forever.
    retention_days: float = 90.0

    def __post_init__(self) -> None:
        _check_ranges("ledger", self, not_negative=("retention_days",))


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """The supervisor's worker processes."""

    # 0 means one per CPU core.
    count: int = 0
    # After SIGTERM, how long in-flight events may take to finish before workers exit.
    grace_period: float = 20.0
    # A worker that dies is restarted after this delay (doubling while it keeps dying).
    restart_delay: float = 0.5
    # An attempt at an event that takes longer than this is reported (a warning naming its
    # partition, offset, event id and stage; eobblast_events_stuck_total) and run again:
    # every step has its own timeout, so it means something hung. 0: never.
    stuck_after: float = 300.0

    def __post_init__(self) -> None:
        _check_ranges(
            "workers",
            self,
            not_negative=("count", "grace_period", "restart_delay", "stuck_after"),
        )


@dataclass(frozen=True, slots=True)
class ProtectionConfig:
    """The organisation's protection policy (see eobblast.protect.policy)."""

    # Consumer-webmail and other domains whose mail always goes to the portal.
    portal_domains: tuple[str, ...] = ()
    # Domains known to accept verified TLS (a TLS policy list, like Zix's).
    tls_policy_domains: tuple[str, ...] = ()
    # Domains with an MTA-STS policy in `enforce` mode.
    mta_sts_enforce_domains: tuple[str, ...] = ()
    # Fetch the MTA-STS policies (RFC 8461) of domains routed by MX lookup: `enforce`
    # makes a domain TLS-required and limits its PHI to the MX hosts the policy lists.
    mta_sts_fetch: bool = True
    smime_enabled: bool = True
    # How long a verified handshake makes a domain TLS-required, and a failure portal-only.
    tls_cache_hours: float = 168.0
    failure_hours: float = 6.0
    learn_from_handshakes: bool = True
    # Workers share what they learn of receivers' TLS (in a table beside the send ledger)
    # this often, and keep it across restarts.
    tls_sync_seconds: float = 5.0

    def __post_init__(self) -> None:
        _check_ranges("protection", self, positive=("tls_sync_seconds",))


# [portal] bounds: (least, most).
PORTAL_ITEM_DAYS = (1, 90)
PORTAL_LOCKOUT_AFTER = (1, 10)
# Six years, the retention HIPAA asks of required documentation.
PORTAL_ACCESS_DAYS = (1, 2192)


@dataclass(frozen=True, slots=True)
class PortalConfig:
    """The secure portal: where escrowed EOBs live and how members reach them."""

    # The pickup link is base_url + token: https, or http on localhost or a loopback
    # address only (the demo, tests); its path ends in "/".
    base_url: str = "https://eob.example.com/p/"
    escrow_url: str = "sqlite:///eobblast-escrow.db"
    key_dir: Path = Path("portal-keys")
    # Days an escrowed EOB waits for its member (the link's life), 1 to 90.
    item_days: int = 30
    # Wrong answers that lock a link for good, 1 to 10.
    lockout_after: int = 5
    audit_url: str = "sqlite:///eobblast-audit.db"
    # HMAC key (file) for the opaque member references in the audit trail.
    audit_key_file: Path = Path("portal-keys/audit.key")
    listen_address: str = "127.0.0.1"
    listen_port: int = 8443
    # Addresses (or networks) of the reverse proxies in front of the portal: their
    # X-Forwarded-For is believed, so rate limits count each member's client, not the
    # proxy, and access records name it. Empty: ignored.
    trusted_proxies: tuple[str, ...] = ()
    # Days the portal's access records (each pickup attempt's client address and
    # User-Agent, in the escrow store) are kept, 1 to 2192.
    access_days: int = 365
    # `eobblast portal` serves its metrics here, on [metrics] address (0: none).
    metrics_port: int = 0

    def __post_init__(self) -> None:
        problem = _pickup_url_problem(self.base_url)
        if problem is not None:
            raise ConfigError(f"portal.base_url: {problem}")
        for name, (least, most) in (
            ("item_days", PORTAL_ITEM_DAYS),
            ("lockout_after", PORTAL_LOCKOUT_AFTER),
            ("access_days", PORTAL_ACCESS_DAYS),
        ):
            if not least <= getattr(self, name) <= most:
                raise ConfigError(f"portal.{name}: expected a whole number from {least} to {most}")
        _check_ranges("portal", self, ports=("listen_port", "metrics_port"))
        if self.metrics_port and self.metrics_port == self.listen_port:
            raise ConfigError("portal.metrics_port: expected another port than listen_port")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy)
            except ValueError as exc:
                if "host bits set" in str(exc):
                    raise ConfigError(
                        f"portal.trusted_proxies: {proxy!r} has host bits set: write the"
                        " network's own address (10.0.0.0/24, not 10.0.0.1/24)"
                    ) from None
                # uvicorn would take any other text as a name no client ever has, or, "*",
                # believe every client's X-Forwarded-For: each would pick its own limit.
                raise ConfigError(
                    f"portal.trusted_proxies: expected IP addresses or networks, not {proxy!r}"
                ) from None

    @property
    def forwarded_allow_ips(self) -> str | None:
        """`trusted_proxies` as the portal server takes them (None: no forwarding headers)."""
        return ",".join(self.trusted_proxies) or None


def _pickup_url_problem(url: str) -> str | None:
    """What is wrong with a pickup-link prefix, or None."""
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port
    except ValueError:  # an unclosed [IPv6] bracket, a port that is no number
        return f"{url!r} is not a URL"
    if parts.scheme not in ("https", "http") or not host:
        return f"expected https://HOST/PATH/, not {url!r}"
    if parts.scheme == "http" and not is_loopback(host):
        # Members would get their EOB without TLS, HSTS or a Secure cookie.
        return "expected https:// (http only on localhost or a loopback address)"
    if not parts.path.endswith("/") or parts.query or parts.fragment:
        return "expected a path ending in / and no query (the link is base_url + token)"
    return None


@dataclass(frozen=True, slots=True)
class BouncesConfig:
    """Verify-before-resend: the bounce store, VERP return paths, the bounce listener."""

    enabled: bool = True
    # sqlite:///file on one machine, postgresql://... across machines (like the ledger).
    store_url: str = "sqlite:///eobblast-bounces.db"
    # Return paths are prefix+token@bounce_domain; its MX must point at the listener.
    bounce_domain: str = "bounces.eobblast.test"
    verp_prefix: str = "bounces"
    verp_key_file: Path = Path("keys/verp.key")
    verp_key_id: int = 1
    # Keys rotated out, as "ID:FILE": they sign nothing new but still open the return paths
    # of mail sent with them, whose bounces come for days (MTAs retry for up to 5).
    verp_previous_keys: tuple[str, ...] = ()
    # Bounce rules TOML (classification, handling, retry, verification); packaged default.
    rules_file: Path | None = None
    listen_address: str = "127.0.0.1"
    listen_port: int = 2526
    review_dir: Path = Path("bounce-review")
    # Reports kept for review are deleted this many days after they arrived.
    review_days: float = 30.0
    # At most this many reports wait for review (a flood of junk must not fill the disk);
    # past it the listener answers 452 and the sender keeps the report and retries.
    review_max_messages: int = 10_000
    # The listener refuses larger messages (552). Reports are a few KiB, one returning a
    # whole notice (a receiver that ignores RET=HDRS) tens; junk this size costs a parse.
    max_message_bytes: int = BOUNCE_MESSAGE_BYTES
    # `eobblast bounces` serves its metrics here, on [metrics] address (0: none).
    metrics_port: int = 0
    # STARTTLS for the listener: a certificate chain and its key (unencrypted PEM), both or
    # neither. Reports from receivers that ignore RET=HDRS can carry a whole notice back.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    verification_topic: str = "eob.address-verification"
    results_topic: str = "eob.address-verification.results"
    paper_topic: str = "eob.paper-fallback"
    results_group_id: str = "eobblast-verification"
    tick_interval: float = 1.0
    send_lease_seconds: float = 600.0
    payload_retention_hours: float = 120.0

    def __post_init__(self) -> None:
        _check_ranges(
            "bounces",
            self,
            whole=("max_message_bytes",),
            positive=("review_days", "tick_interval", "send_lease_seconds"),
            ports=("listen_port", "metrics_port"),
        )
        if not self.review_max_messages > 0:
            raise ConfigError("bounces.review_max_messages: expected a whole number > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            # One alone used to run the listener without TLS, and nobody was told.
            raise ConfigError(
                "bounces.tls_cert and bounces.tls_key: set both (STARTTLS) or neither"
            )
        ids = [self.verp_key_id, *(key_id for key_id, _ in self.previous_verp_keys())]
        if len(set(ids)) != len(ids):
            raise ConfigError("bounces.verp_previous_keys: each key needs an id of its own")

    def previous_verp_keys(self) -> list[tuple[int, Path]]:
        """`verp_previous_keys` as (key id, file)."""
        keys = []
        for entry in self.verp_previous_keys:
            key_id, colon, path = entry.partition(":")
            if not colon or not key_id.strip().isdigit() or not path.strip():
                raise ConfigError('bounces.verp_previous_keys: expected entries "ID:FILE"')
            if int(key_id) > 63:
                raise ConfigError("bounces.verp_previous_keys: key ids are 0..63")
            keys.append((int(key_id), Path(path.strip())))
        return keys


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint."""

    port: int = 0
    address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        _check_ranges("metrics", self, ports=("port",))


@dataclass(frozen=True, slots=True)
class Config:
    """Everything eobblast needs to run, passed explicitly."""

    dkim: DkimConfig = field(default_factory=DkimConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    protection: ProtectionConfig = field(default_factory=ProtectionConfig)
    portal: PortalConfig = field(default_factory=PortalConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)


def store_urls(config: Config) -> dict[str, str]:
    """The URL of every store `eobblast run` opens with this configuration, by setting."""
    urls = {
        "ledger.url": config.ledger.url,
        "portal.escrow_url": config.portal.escrow_url,
        "portal.audit_url": config.portal.audit_url,
    }
    if config.bounces.enabled:
        urls["bounces.store_url"] = config.bounces.store_url
    if config.shaping.enabled:
        urls["shaping.budgets_url"] = config.shaping.budgets_url
    return urls


def store_files(config: Config) -> dict[str, Path]:
    """The SQLite file of every store `eobblast run` opens with this configuration and a
    `sqlite:///` URL, by setting."""
    files = {name: sqlite_path(url, name) for name, url in store_urls(config).items()}
    return {name: path for name, path in files.items() if path is not None}


def warn_relative_stores(config: Config, only: typing.Collection[str] | None = None) -> None:
    """Log a warning for every store file (of the settings in `only`, default all) whose
    path is relative: started from another directory, a command would find an empty
    ledger, bounce store or escrow (notices sent again, suppressions forgotten, portal
    links dead)."""
    for setting, path in store_files(config).items():
        if (only is None or setting in only) and not path.is_absolute():
            _log.warning(
                "store file is relative to the working directory",
                extra={"setting": setting, "path": str(path.absolute())},
            )


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if hint is Path:
        # An empty string would become Path("."): a directory nobody meant.
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: expected a path string")
        return Path(value)
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer")  # not silently truncated
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = _list_from_text(value, where)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    return value


def _list_from_text(text: str, where: str) -> list[Any]:
    """A list given as text (an EOBBLAST_* variable): a TOML array (`["a", "b"]`) or
    comma-separated items (`a, b`). Quotes or brackets in the comma form are an error, not
    part of an item: `'["gmail.com"]'` is never a domain."""
    if text.lstrip().startswith("["):
        parsed = parse_toml(f"v = {text}", where)["v"]
        if not isinstance(parsed, list):  # pragma: no cover - a "[" value parses as an array
            raise ConfigError(f"{where}: expected a list")
        return parsed
    items = [part.strip() for part in text.split(",") if part.strip()]
    if any(mark in item for item in items for mark in "\"'[]"):
        raise ConfigError(
            f"{where}: write a list as comma-separated items (a, b) or a TOML array "
            '(["a", "b"]); quotes and brackets cannot be part of an item'
        )
    return items


def _build(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a table")
            kwargs[name] = _build(hint, value, f"{where}{name}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


def _setting_named(name: str) -> str | None:
    """`SECTION__SETTING` for a `section_setting` that names a real setting, else None."""
    for section in dataclasses.fields(Config):
        setting = name.removeprefix(section.name + "_")
        if setting != name and isinstance(section.default_factory, type):
            known = {f.name for f in dataclasses.fields(section.default_factory)}
            if setting in known:
                return f"{section.name.upper()}__{setting.upper()}"
    return None


def _env_overrides(environ: typing.Mapping[str, str]) -> dict[str, Any]:
    # EOBBLAST_TRANSPORT__CA_BUNDLE=/x -> {"transport": {"ca_bundle": "/x"}}
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith("EOBBLAST_"):
            continue
        path = key.removeprefix("EOBBLAST_").lower().split("__")
        if len(path) < 2:
            # Not an override. Kubernetes service links (EOBBLAST_SERVICE_HOST,
            # EOBBLAST_PORT_9464_TCP...) look like this and must not stop a start; one
            # that names a real setting with one underscore (EOBBLAST_KAFKA_BOOTSTRAP)
            # is likely a typo that leaves the default in force: said, by name only (the
            # value may be a secret's path or a host).
            meant = _setting_named(path[0])
            # (a service link's value is an address, tcp://10.0.0.7:9464: no typo of ours)
            if meant is not None and "://" not in value:
                _log.warning(
                    "environment variable %s is not read: an override is EOBBLAST_%s, with"
                    " two underscores",
                    key,
                    meant,
                )
            continue
        if not all(path):
            raise ConfigError(
                f"environment variable {key}: expected EOBBLAST_<SECTION>__<SETTING>, "
                "two underscores between them (e.g. EOBBLAST_KAFKA__BOOTSTRAP)"
            )
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def settings_of(config: Any) -> dict[str, Any]:
    """A configuration as the settings a TOML file would hold (paths as strings, lists
    for tuples): `load_config(overrides=settings_of(c))` builds `c` again."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple | list):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {str(key): plain(item) for key, item in value.items()}
        return value

    settings: dict[str, Any] = plain(config)
    return settings


def with_settings(config: Config, overrides: dict[str, Any]) -> Config:
    """`config` with some settings replaced (by section, as in a TOML file), checked as
    any configuration is."""
    built: Config = _build(Config, _merge(settings_of(config), overrides), "")
    return built


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: Path | None = None,
    *,
    environ: typing.Mapping[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Load the TOML file (if any), apply EOBBLAST_* variables, then explicit overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = parse_toml(read_text(path, "config file"), f"config file {path}")
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    config: Config = _build(Config, data, "")
    return config
