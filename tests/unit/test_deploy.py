"""deploy/: the compose stack agrees with the example configuration it mounts.

No container runs here (no registry for images); these checks hold the files to what the
code needs: every topic it reads or writes exists, DKIM keys exist where it looks for them,
and the configuration is actually passed.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from eobblast.config import Config, load_config, store_files
from eobblast.preflight import Verdict, placeholder_settings
from eobblast.worker import stop_budget

ROOT = Path(__file__).parents[2]
CONFIG_IN_CONTAINER = "/etc/eobblast/eobblast.toml"


def compose_file() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    return loaded


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    services: dict[str, Any] = compose_file()["services"]
    return services


@pytest.fixture(scope="module")
def example() -> Config:
    return load_config(ROOT / "config/eobblast.example.toml")


def test_every_topic_eobblast_uses_is_created(compose: dict[str, Any], example: Config) -> None:
    script = "\n".join(compose["topics"]["command"])
    created = set(re.findall(r"--create --if-not-exists --topic (\S+)", script))
    used = {example.kafka.events_topic, example.kafka.delivery_topic, example.kafka.dlq_topic}
    if example.bounces.enabled:
        bounces = example.bounces
        used |= {bounces.verification_topic, bounces.results_topic, bounces.paper_topic}
    assert used <= created, f"not created: {sorted(used - created)}"


def test_workers_get_the_mounted_configuration_and_keys(
    compose: dict[str, Any], example: Config
) -> None:
    workers = compose["eobblast"]
    command = workers["command"]
    assert command[command.index("--config") + 1] == CONFIG_IN_CONTAINER
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in workers["volumes"]}
    assert mounts[CONFIG_IN_CONTAINER] == "../config/eobblast.example.toml"
    # Keys are generated before the workers start, into the directory they read.
    assert _waits_for(compose, "eobblast", "keys")
    keys = compose["keys"]["command"]
    assert keys[:3] == ["eobblast", "keys", "generate"]
    key_dir = keys[keys.index("--key-dir") + 1]
    assert key_dir == str(example.dkim.key_dir)
    assert any(volume.endswith(":" + key_dir) for volume in compose["keys"]["volumes"])
    assert key_dir in mounts


def test_the_workers_container_waits_for_their_drain_before_killing_them(
    compose: dict[str, Any], example: Config
) -> None:
    # Docker kills the whole container at stop_grace_period: sooner than the supervisor's
    # own deadline, the workers' last commits are cut short all the same.
    grace = compose["eobblast"]["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace)
    assert int(grace[:-1]) > stop_budget(example.workers.grace_period) + 5


@pytest.mark.parametrize("service", ["bounces", "portal"])
def test_listeners_share_the_workers_configuration_and_stores(
    compose: dict[str, Any], service: str
) -> None:
    # The bounce store, escrow, audit trail and VERP key are the workers' own files.
    command = compose[service]["command"]
    assert command[:2] == ["eobblast", service]
    assert command[command.index("--config") + 1] == CONFIG_IN_CONTAINER
    workers = set(compose["eobblast"]["volumes"])
    needed = {v for v in workers if not v.endswith("/keys")} if service == "portal" else workers
    assert needed <= set(compose[service]["volumes"])


def test_the_image_runs_with_the_configuration_and_owns_its_state() -> None:
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert f'"--config", "{CONFIG_IN_CONTAINER}"' in dockerfile.split("CMD", 1)[1]
    assert "/var/lib/eobblast/keys" in dockerfile and "chown -R eobblast" in dockerfile


def test_prometheus_scrapes_the_workers_the_bounce_listener_and_the_portal(
    compose: dict[str, Any],
) -> None:
    workers = compose["eobblast"]["environment"]["EOBBLAST_METRICS__PORT"]
    bounces = compose["bounces"]["environment"]["EOBBLAST_BOUNCES__METRICS_PORT"]
    portal = load_config(
        ROOT / "config/eobblast.example.toml",
        environ=_environment(compose["portal"], DEPLOYMENT),
    )
    assert portal.portal.metrics_port and portal.metrics.address == "0.0.0.0"
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {
        job["job_name"]: t
        for job in prometheus["scrape_configs"]
        for t in job["static_configs"][0]["targets"]
    }
    assert targets == {
        "eobblast": f"eobblast:{workers}",
        "eobblast-bounces": f"bounces:{bounces}",
        "eobblast-portal": f"portal:{portal.portal.metrics_port}",
    }
    # Members reach the pickup port only: the metrics port is for Prometheus.
    published = [port.rsplit(":", 1)[1] for port in compose["portal"]["ports"]]
    assert published == [str(portal.portal.listen_port)]


@pytest.mark.parametrize("service", ["check", "eobblast", "bounces", "portal"])
def test_the_services_secrets_are_made_before_anyone_reads_them(
    compose: dict[str, Any], example: Config, service: str
) -> None:
    # The bounce listener and the portal refuse a missing VERP key or escrow key ring:
    # the secrets service makes them, in the volumes the services read them from.
    secrets = compose["secrets"]
    command = secrets["command"]
    assert command[:3] == ["eobblast", "keys", "secrets"]
    assert command[command.index("--config") + 1] == CONFIG_IN_CONTAINER
    assert _waits_for(compose, service, "secrets")
    needed = [example.portal.key_dir / "active", example.portal.audit_key_file]
    if example.bounces.enabled and service not in ("portal", "check"):
        needed.append(example.bounces.verp_key_file)
    for path in needed:
        made_in = _volume_of(secrets["volumes"], path)
        assert made_in.startswith("eobblast-") and made_in == _volume_of(
            compose[service]["volumes"], path
        ), path


def _one_shot(compose: dict[str, Any], name: str) -> bool:
    """Whether a service runs once, to completion: another waits for it to complete."""
    return any(
        waits.get(name) == {"condition": "service_completed_successfully"}
        for service in compose.values()
        if isinstance(waits := service.get("depends_on") or {}, dict)
    )


def test_long_running_services_come_back_after_a_reboot(compose: dict[str, Any]) -> None:
    # Without a restart policy nothing starts again after a reboot: no worker, no listener,
    # and no Prometheus to page anyone about it. A one-shot service must not restart: it
    # would run again and again.
    one_shot = {name for name in compose if _one_shot(compose, name)}
    assert one_shot == {"topics", "keys", "secrets", "check"}
    for name, service in compose.items():
        wanted = None if name in one_shot else "unless-stopped"
        assert service.get("restart") == wanted, name


@pytest.mark.parametrize(
    ("service", "data"),
    [
        ("kafka", "/var/lib/kafka/data"),
        ("prometheus", "/prometheus"),
        ("grafana", "/var/lib/grafana"),
    ],
)
def test_kafka_prometheus_and_grafana_keep_their_data_in_named_volumes(
    compose: dict[str, Any], service: str, data: str
) -> None:
    # In the container's own layer, a `docker compose down` (or a recreated container) would
    # lose unprocessed events, committed offsets, statuses and dead letters, the metrics the
    # alerts look back on, and Grafana's passwords (back to admin/admin).
    mounts = compose[service]["volumes"]
    [volume] = [m.split(":")[0] for m in mounts if m.split(":")[1] == data]
    assert volume in compose_file()["volumes"], volume
    if service == "kafka":
        # The image's default log directory is under /tmp, outside any volume.
        assert compose[service]["environment"]["KAFKA_LOG_DIRS"] == data


def test_dead_letters_are_kept_longer_than_the_broker_default(
    compose: dict[str, Any], example: Config
) -> None:
    # The broker's default (7 days) expires dead letters before a long weekend and a
    # holiday are over; past the ledger's retention, a replay could send a notice twice.
    script = "\n".join(compose["topics"]["command"])
    [line] = [
        line
        for line in script.splitlines()
        if re.search(rf"--topic {re.escape(example.kafka.dlq_topic)}(\s|$)", line)
    ]
    [retention_ms] = re.findall(r"--config retention\.ms=(\d+)", line)
    days = int(retention_ms) / 86_400_000
    assert 30 <= days < example.ledger.retention_days


def _loads_the_configuration(service: dict[str, Any]) -> bool:
    command = service.get("command") or [None]
    return command[0] == "eobblast" and "--config" in command


@pytest.mark.parametrize("service", ["secrets", "check", "eobblast", "bounces", "portal"])
def test_keys_are_on_volumes_of_their_own_never_beside_the_stores(
    compose: dict[str, Any], example: Config, service: str
) -> None:
    # One backup of the data volume (escrow.db, audit.db...) must not also hold the escrow
    # key ring and the member-reference key that open and pseudonymise it.
    mounts = compose[service]["volumes"]
    keys = [example.portal.key_dir / "active", example.portal.audit_key_file]
    if service != "portal":  # the portal gets neither the DKIM nor the VERP key
        keys += [example.dkim.key_dir / "example.eob1.rsa.pem", example.bounces.verp_key_file]
    key_volumes = {_volume_of(mounts, path).split(":")[0] for path in keys}
    store_volumes = {
        _volume_of(mounts, path).split(":")[0] for path in store_files(example).values()
    }
    assert store_volumes == {"eobblast-state"}
    assert not key_volumes & store_volumes, key_volumes
    assert {_volume_of(mounts, path) for path in keys[:2]} == {
        f"eobblast-portal-keys:{example.portal.key_dir}"
    }


def test_every_service_that_reads_the_portal_keys_mounts_them(
    compose: dict[str, Any], example: Config
) -> None:
    # Any eobblast service that loads the configuration and opens the escrow or the audit
    # trail: without the volume, it would find (or make) keys on the data volume.
    mount = f"eobblast-portal-keys:{example.portal.key_dir}"
    readers = {name for name, service in compose.items() if mount in service.get("volumes", [])}
    assert readers == {
        name for name, service in compose.items() if _loads_the_configuration(service)
    }
    assert readers == {"secrets", "check", "eobblast", "bounces", "portal"}


def test_the_image_makes_every_key_volume_private_to_the_service_user(
    compose: dict[str, Any],
) -> None:
    # A new named volume starts with the ownership and mode of the image's directory: one
    # the image lacks would be root's, and `eobblast keys secrets` could not write there.
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    made = dockerfile.split("mkdir -p", 1)[1].split("&&", 1)[0].split()
    private = dockerfile.split("chmod 0700", 1)[1].split("\n", 1)[0].split()
    key_mounts = {
        volume.split(":")[1]
        for service in compose.values()
        for volume in service.get("volumes", [])
        if volume.split(":")[0].endswith("-keys")
    }
    assert key_mounts == {"/var/lib/eobblast/keys", "/var/lib/eobblast/portal-keys"}
    assert key_mounts <= set(made) and key_mounts <= set(private)


def test_the_portal_trusts_the_proxy_on_this_host_and_no_one_else(
    compose: dict[str, Any],
) -> None:
    # A TLS proxy on the host reaches the portal through its published port: the portal
    # sees it at the compose network's gateway. Trusting it gives each member their own
    # rate limit; trusting more would let any container choose its own.
    [network] = compose_file()["networks"]["default"]["ipam"]["config"]
    config = load_config(
        ROOT / "config/eobblast.example.toml",
        environ=_environment(compose["portal"], DEPLOYMENT),
    )
    assert config.portal.trusted_proxies == (network["gateway"],)
    assert ipaddress.ip_address(network["gateway"]) in ipaddress.ip_network(network["subnet"])
    elsewhere = _environment(compose["portal"], DEPLOYMENT | {"EOB_PORTAL_PROXIES": "192.0.2.8"})
    config = load_config(ROOT / "config/eobblast.example.toml", environ=elsewhere)
    assert config.portal.forwarded_allow_ips == "192.0.2.8"


def _waits_for(compose: dict[str, Any], service: str, first: str) -> bool:
    """Whether `service` starts only after `first` completed successfully, directly or
    through services that themselves must complete first."""
    waits = compose[service].get("depends_on") or {}
    return any(
        condition == {"condition": "service_completed_successfully"}
        and (name == first or _waits_for(compose, name, first))
        for name, condition in waits.items()
    )


def _volume_of(mounts: list[str], path: Path) -> str:
    """The volume (`name:/where`) that holds `path`: the deepest mount above it."""
    above = [m for m in mounts if str(path).startswith(m.split(":")[1].rstrip("/") + "/")]
    assert above, f"{path} is in no volume of {mounts}"
    return max(above, key=lambda m: len(m.split(":")[1]))


# What `docker compose up` is run with (README, "Deploying").
DEPLOYMENT = {
    "EOB_PORTAL_URL": "https://eob.acme-health.com/p/",
    "EOB_BOUNCE_DOMAIN": "bounces.acme-health.com",
    "EOB_EHLO_NAME": "mta1.acme-health.com",
}
# The settings compose sets from them, in every service that loads the configuration and
# checks, sends, serves or receives under these names.
NAMED = {
    "EOB_PORTAL_URL": "EOBBLAST_PORTAL__BASE_URL",
    "EOB_BOUNCE_DOMAIN": "EOBBLAST_BOUNCES__BOUNCE_DOMAIN",
    "EOB_EHLO_NAME": "EOBBLAST_TRANSPORT__EHLO_NAME",
}


# The checks that fail on the example's placeholders and pass on the deployment's names.
PLACEHOLDER_CHECKS = ("portal base_url", "bounces bounce_domain", "transport ehlo_name")


class MissingVariable(Exception):
    """A `${NAME:?message}` whose NAME is unset or empty: compose refuses the file."""


def _interpolated(value: object, environ: dict[str, str]) -> str:
    """`value` as compose passes it: `$$` is `$`; `${NAME}`, `${NAME:-default}`,
    `${NAME-default}`, `${NAME:?message}` and `${NAME?message}` are resolved in `environ`."""

    def resolve(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["name"], match["op"] or "", match["arg"] or ""
        found = environ.get(name)
        unset = found is None or (op.startswith(":") and not found)
        if op.endswith("?") and unset:
            raise MissingVariable(f"required variable {name} is missing a value: {arg}")
        if op.endswith("-") and unset:
            return arg
        return found or ""

    pattern = r"(?P<escaped>\$\$)|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    return re.sub(pattern, resolve, str(value))


def _environment(service: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    """What the service's container gets as its environment."""
    return {k: _interpolated(v, environ) for k, v in (service.get("environment") or {}).items()}


def test_every_eobblast_service_loads_the_example_with_its_environment(
    compose: dict[str, Any],
) -> None:
    # What each container runs with: the mounted file, then its EOBBLAST_* variables (a
    # setting there that does not fit the file, such as a Kafka protocol the file's TLS
    # settings contradict, would stop the service at start).
    services = {
        name: service
        for name, service in compose.items()
        if service.get("command", [None])[0] == "eobblast" and "--config" in service["command"]
    }
    assert {"eobblast", "bounces", "check", "portal"} <= set(services)
    for name, service in services.items():
        environ = _environment(service, DEPLOYMENT)
        config = load_config(ROOT / "config/eobblast.example.toml", environ=environ)
        if "EOBBLAST_KAFKA__BOOTSTRAP" in environ:
            assert config.kafka.bootstrap == environ["EOBBLAST_KAFKA__BOOTSTRAP"], name
    workers = load_config(
        ROOT / "config/eobblast.example.toml",
        environ=_environment(compose["eobblast"], DEPLOYMENT),
    )
    assert workers.kafka.hole_settle == 0  # Apache Kafka's holes are all real


@pytest.mark.parametrize("service", ["check", "eobblast", "bounces", "portal"])
def test_the_deployments_own_names_are_required_and_pass_check(
    compose: dict[str, Any], service: str
) -> None:
    # The example's payer.example names fail `eobblast check`, which the workers wait for:
    # the stack starts only with the deployment's own portal address, bounce domain and
    # EHLO name.
    config = load_config(
        ROOT / "config/eobblast.example.toml",
        environ=_environment(compose[service], DEPLOYMENT),
    )
    assert config.portal.base_url == DEPLOYMENT["EOB_PORTAL_URL"]
    assert config.bounces.bounce_domain == DEPLOYMENT["EOB_BOUNCE_DOMAIN"]
    assert config.transport.ehlo_name == DEPLOYMENT["EOB_EHLO_NAME"]
    found = {f.check: f.verdict for f in placeholder_settings(config)}
    assert {found[check] for check in PLACEHOLDER_CHECKS} == {Verdict.OK}
    for variable, setting in NAMED.items():
        assert setting in compose[service]["environment"]
        without = {name: value for name, value in DEPLOYMENT.items() if name != variable}
        for environ in (without, without | {variable: ""}):  # unset or empty: compose stops
            with pytest.raises(MissingVariable, match=f"{variable} is missing a value: set "):
                _environment(compose[service], environ)


def test_the_examples_own_names_are_placeholders(example: Config) -> None:
    # Why the compose file requires the names: what the example holds fails check.
    found = {f.check: f.verdict for f in placeholder_settings(example)}
    assert {found[check] for check in PLACEHOLDER_CHECKS} == {Verdict.FAIL}


def test_the_workers_start_only_once_check_passed_on_what_they_will_see(
    compose: dict[str, Any],
) -> None:
    check, workers = compose["check"], compose["eobblast"]
    assert check["command"] == ["eobblast", "check", "--config", CONFIG_IN_CONTAINER]
    assert workers["depends_on"] == {"check": {"condition": "service_completed_successfully"}}
    # It runs after what the workers waited for before, on the same files and broker.
    assert set(check["depends_on"]) == {"topics", "keys", "secrets"}
    assert {c["condition"] for c in check["depends_on"].values()} == {
        "service_completed_successfully"
    }
    assert check["volumes"] == workers["volumes"]
    bootstrap = "EOBBLAST_KAFKA__BOOTSTRAP"
    assert check["environment"][bootstrap] == workers["environment"][bootstrap]
