"""deploy/: the compose stack agrees with the example configuration it mounts.

No container runs here (no registry for images); these checks hold the files to what the
code needs: every topic it reads or writes exists, DKIM keys exist where it looks for them,
and the configuration is actually passed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from eobblast.config import Config, load_config
from eobblast.preflight import Verdict, placeholder_settings

ROOT = Path(__file__).parents[2]
CONFIG_IN_CONTAINER = "/etc/eobblast/eobblast.toml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())[
        "services"
    ]
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


def test_prometheus_scrapes_the_workers_and_the_bounce_listener(compose: dict[str, Any]) -> None:
    workers = compose["eobblast"]["environment"]["EOBBLAST_METRICS__PORT"]
    bounces = compose["bounces"]["environment"]["EOBBLAST_BOUNCES__METRICS_PORT"]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {
        t for job in prometheus["scrape_configs"] for t in job["static_configs"][0]["targets"]
    }
    assert targets == {f"eobblast:{workers}", f"bounces:{bounces}"}


@pytest.mark.parametrize("service", ["eobblast", "bounces", "portal"])
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
    if example.bounces.enabled and service != "portal":
        needed.append(example.bounces.verp_key_file)
    for path in needed:
        made_in = _volume_of(secrets["volumes"], path)
        assert made_in.startswith("eobblast-") and made_in == _volume_of(
            compose[service]["volumes"], path
        ), path


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
}
# The settings compose sets from them, in every service that loads the configuration and
# checks, sends, serves or receives under these names.
NAMED = {
    "EOB_PORTAL_URL": "EOBBLAST_PORTAL__BASE_URL",
    "EOB_BOUNCE_DOMAIN": "EOBBLAST_BOUNCES__BOUNCE_DOMAIN",
}


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
    # the stack starts only with the deployment's own portal address and bounce domain.
    config = load_config(
        ROOT / "config/eobblast.example.toml",
        environ=_environment(compose[service], DEPLOYMENT),
    )
    assert config.portal.base_url == DEPLOYMENT["EOB_PORTAL_URL"]
    assert config.bounces.bounce_domain == DEPLOYMENT["EOB_BOUNCE_DOMAIN"]
    found = {f.check: f.verdict for f in placeholder_settings(config)}
    assert found["portal base_url"] is found["bounces bounce_domain"] is Verdict.OK
    for variable, setting in NAMED.items():
        assert setting in compose[service]["environment"]
        without = {name: value for name, value in DEPLOYMENT.items() if name != variable}
        for environ in (without, without | {variable: ""}):  # unset or empty: compose stops
            with pytest.raises(MissingVariable, match=f"{variable} is missing a value: set "):
                _environment(compose[service], environ)


def test_the_examples_own_names_are_placeholders(example: Config) -> None:
    # Why the compose file requires the names: what the example holds fails check.
    found = {f.check: f.verdict for f in placeholder_settings(example)}
    assert found["portal base_url"] is found["bounces bounce_domain"] is Verdict.FAIL


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
