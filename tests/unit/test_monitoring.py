"""deploy/: the alert rules and the Grafana dashboard ops run on eobblast's metrics.

Prometheus's own `promtool` (Debian `prometheus`) checks the rules, runs their unit tests
(deploy/alerts.test.yml) and parses every dashboard query. Beside it, every metric, label
and label value the rules, their tests and the dashboard name must be one eobblast
exports: a renamed metric would otherwise leave an alert that can never fire.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

import eobblast.worker  # noqa: F401 - registers the workers' metrics
from eobblast.bounces.category import BounceCategory
from eobblast.bounces.listener import RESULTS
from eobblast.bounces.service import Provider
from eobblast.bounces.state import EobStatus
from eobblast.errors import INPUT_REASONS, Outcome, ReasonCode
from eobblast.events.schema import _TYPE_TO_REASON
from eobblast.observe.metrics import REGISTRY, SupervisorMetrics
from eobblast.portal.app import PICKUP_OUTCOMES, RATE_LIMITS, UNAVAILABLE
from eobblast.shaping.engine import DeferReason

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana/dashboards/eobblast.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian prometheus; make system-deps)"
)
# Labels Prometheus adds at scrape (and `le`, a histogram bucket's bound).
SCRAPE_LABELS = {"job", "instance"}
# Label values with a fixed vocabulary, by metric and label.
VOCABULARY: dict[tuple[str, str], set[str]] = {
    ("eobblast_events_total", "outcome"): {str(o) for o in Outcome},
    ("eobblast_events_total", "reason"): {str(r) for r in ReasonCode},
    ("eobblast_bounces_total", "category"): {str(c) for c in BounceCategory},
    ("eobblast_bounces_total", "provider"): {str(p) for p in Provider},
    ("eobblast_bounces_total", "source"): {"sync", "dsn"},
    # The gauge covers notices not yet settled.
    ("eobblast_bounce_notices", "status"): {
        str(s) for s in EobStatus if s not in (EobStatus.DELIVERED, EobStatus.PAPER_FALLBACK)
    },
    ("eobblast_bounce_messages_total", "result"): set(RESULTS),
    ("eobblast_shaping_deferred_total", "reason"): {str(r) for r in DeferReason},
    ("eobblast_verification_results_total", "result"): {
        "verified", "unverified_channel", "failed", "timeout", "stale",
    },
    ("eobblast_verification_results_refused_total", "reason"): {str(r) for r in INPUT_REASONS},
    ("eobblast_portal_pickups_total", "outcome"): set(PICKUP_OUTCOMES),
    ("eobblast_portal_rate_limited_total", "limit"): set(RATE_LIMITS),
}  # fmt: skip


@dataclass(frozen=True)
class Exported:
    kind: str
    labels: frozenset[str]


def _registries() -> Iterator[CollectorRegistry]:
    yield REGISTRY
    yield SupervisorMetrics().registry


def exported() -> dict[str, Exported]:
    """eobblast's metrics by the names their series carry, with their label names."""
    found: dict[str, Exported] = {}
    for registry in _registries():
        for collector in list(registry._collector_to_names):
            name = getattr(collector, "_name", None)
            kind = getattr(collector, "_type", None)
            if not isinstance(name, str) or not name.startswith("eobblast_"):
                continue
            labels = frozenset(getattr(collector, "_labelnames", ()))
            if getattr(collector, "_multiprocess_mode", None) in ("all", "liveall"):
                labels |= {"pid"}  # one series per process, as the supervisor serves it
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_sum", "_count"),
            }.get(str(kind), ("",))
            for suffix in suffixes:
                extra = {"le"} if suffix == "_bucket" else set()
                found[name + suffix] = Exported(str(kind), labels | extra)
    return found


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return [panel for panel in panels if panel["type"] != "row"]


def dashboard_queries() -> list[str]:
    # Grafana fills $__rate_interval in; Prometheus sees a plain range.
    return [
        target["expr"].replace("$__rate_interval", "5m")
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]


_SELECTOR = re.compile(r"\b(eobblast_[a-z_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"""([a-z_]+)\s*(=~|!~|!=|=)\s*(?:"([^"]*)"|'([^']*)')""")
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
# A regular expression's alternatives can be checked as words only when they are words.
_WORDS = re.compile(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*")


def _labels_of(expr: str, metrics: dict[str, Exported]) -> set[str]:
    labels = set(SCRAPE_LABELS)
    for name, _ in _SELECTOR.findall(expr):
        if name in metrics:
            labels |= metrics[name].labels
    return labels


def _labels_of_every(expr: str, metrics: dict[str, Exported]) -> set[str]:
    """Labels every metric of `expr` has (what on()/ignoring() may match both sides by)."""
    sets = [metrics[name].labels for name, _ in _SELECTOR.findall(expr) if name in metrics]
    return set(SCRAPE_LABELS) | (set.intersection(*map(set, sets)) if sets else set())


def _argument(expr: str, start: int) -> str:
    """The parenthesised argument that begins at or after `start` (what `by (...)` groups)."""
    opening = expr.index("(", start)
    depth = 0
    for index in range(opening, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[index], 0)
        if depth == 0:
            return expr[opening : index + 1]
    raise ValueError(f"unbalanced parentheses in {expr!r}")


def _problems(expr: str, metrics: dict[str, Exported]) -> list[str]:
    """What in one PromQL expression names something eobblast does not export."""
    problems = []
    for name, matchers in _SELECTOR.findall(expr):
        metric = metrics.get(name)
        if metric is None:
            problems.append(f"{name}: not a metric eobblast exports")
            continue
        for label, op, double, single in _MATCHER.findall(matchers or ""):
            value = double or single
            if label not in metric.labels | SCRAPE_LABELS:
                problems.append(f"{name}: no label {label!r}")
            known = VOCABULARY.get((name, label))
            if known is None or (op in ("=~", "!~") and not _WORDS.fullmatch(value)):
                continue
            values = set(value.split("|")) if op in ("=~", "!~") else {value}
            if not values <= known:
                problems.append(f"{name}: {label} has no value among {sorted(values - known)}")
        pairs = dict((label, double or single) for label, op, double, single in
                     _MATCHER.findall(matchers or "") if op == "=")  # fmt: skip
        if pairs.get("outcome") == "rejected" and "reason" in pairs:
            if pairs["reason"] not in INPUT_REASONS:
                problems.append(f"{name}: no event is rejected for {pairs['reason']!r}")
    if re.search(r"\)\s*(by|without)\s*\(", expr):
        problems.append("write `sum by (...) (...)`: the checker reads the prefix form only")
    for clause in _CLAUSE.finditer(expr):
        kind, listed = clause.groups()
        # by/without group what follows (sum by (x) (...)); on/ignoring match both sides,
        # so every metric must have the label.
        if kind in ("by", "without"):
            try:
                available = _labels_of(_argument(expr, clause.end()), metrics)
            except ValueError:
                continue  # the suffix form, reported above
        elif kind in ("on", "ignoring"):
            available = _labels_of_every(expr, metrics)
        else:
            available = _labels_of(expr, metrics)
        for label in filter(None, (part.strip() for part in listed.split(","))):
            if label not in available:
                problems.append(f"{kind} ({label}): no metric it applies to has that label")
    return problems


_AGGREGATION = re.compile(r"(sum|max|min|avg|count)\s*(?:(by)\s*\(([^)]*)\))?\s*\(")


def _output_labels(expr: str, metrics: dict[str, Exported]) -> set[str]:
    """Labels the result of a query or rule keeps, for the shapes used here: an
    aggregation (its `by` labels), histogram_quantile over one (less `le`), a selector
    with functions and comparisons (its metric's labels), a series recorded here, or a
    parenthesised left operand of one of these. Any other shape fails."""
    stripped = expr.strip()
    if stripped.startswith("("):
        # A binary operation keeps its left operand's labels (no on()/group_* here).
        return _output_labels(_argument(stripped, 0)[1:-1], metrics)
    quantile = re.match(r"histogram_quantile\s*\([^,]+,\s*", stripped)
    if quantile:
        return _output_labels(stripped[quantile.end() :], metrics) - {"le"}
    aggregation = _AGGREGATION.match(stripped)
    if aggregation:
        return {part.strip() for part in (aggregation.group(3) or "").split(",") if part.strip()}
    if re.match(r"(rate|increase|eobblast_|up\b)", stripped):
        return _labels_of(stripped, metrics)
    recorded = re.match(r"eobblast:[a-z0-9_:]+", stripped)
    if recorded:
        # A series this file records: what its own expression keeps.
        (source,) = [rule["expr"] for rule in rules() if rule.get("record") == recorded.group()]
        return _output_labels(source, metrics)
    raise AssertionError(f"shape not understood, say what it keeps: {expr!r}")


def _promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_prometheus_config_and_alert_rules_pass_promtool() -> None:
    checked = _promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "alerts.yml" in checked.stdout  # the rules are loaded, not just present


@needs_promtool
def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say() -> None:
    tested = _promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_in_which_it_fires() -> None:
    tests = yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    firing = {
        check["alertname"]
        for test in tests["tests"]
        for check in test.get("alert_rule_test", ())
        if check.get("exp_alerts")
    }
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    assert set(names) <= firing, f"no test fires {sorted(set(names) - firing)}"


def test_every_recorded_series_is_used_by_an_alert() -> None:
    records = {rule["record"] for rule in rules() if "record" in rule}
    used = " ".join(rule["expr"] for rule in alert_rules())
    assert records and all(record in used for record in records)


def test_every_reason_an_event_is_rejected_for_is_an_input_reason() -> None:
    # The worker exports these from 0 so a dead-letter alert sees the first one: a
    # rejection reason missing from the list would miss its first alert.
    rejected = {
        *_TYPE_TO_REASON.values(),
        ReasonCode.UNSUPPORTED_SCHEMA,  # the schema literal
        ReasonCode.WRONG_TYPE,  # any *_type or *_parsing error
        ReasonCode.INVALID_VALUE,  # any other validation error
        ReasonCode.NOT_AN_OBJECT,
        ReasonCode.EVENT_TOO_LARGE,
        ReasonCode.INVALID_UTF8,
        ReasonCode.EMPTY_VALUE,  # the worker's own: no value, no key
        ReasonCode.MISSING_KEY,
    }
    assert rejected <= set(INPUT_REASONS)
    # ...and every code declared in ReasonCode's input block, before the gate's.
    codes = list(ReasonCode)
    assert tuple(codes[: codes.index(ReasonCode.NO_CONSENT)]) == INPUT_REASONS


def test_alerts_carry_a_severity_and_say_what_to_do() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_pickups_the_portal_cannot_serve_page() -> None:
    # Members who answered and got the error page instead of their EOB: the portal's
    # endpoint is up meanwhile, so EobblastDown does not see it.
    [rule] = [rule for rule in alert_rules() if rule["alert"] == "EobblastPortalUnavailable"]
    assert f'eobblast_portal_pickups_total{{outcome="{UNAVAILABLE}"}}' in rule["expr"]
    assert rule["labels"]["severity"] == "critical"


def test_rules_their_tests_and_the_dashboard_name_only_what_eobblast_exports() -> None:
    metrics = exported()
    assert "eobblast_events_total" in metrics and "eobblast_stage_seconds_bucket" in metrics
    expressions = [rule["expr"] for rule in rules()] + dashboard_queries()
    tests = yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())
    expressions += [series["series"] for test in tests["tests"] for series in test["input_series"]]
    problems = [problem for expr in expressions for problem in _problems(expr, metrics)]
    assert problems == []


def test_the_name_check_catches_what_would_never_match() -> None:
    # The checker itself: a renamed metric, a label it lacks, a value outside its
    # vocabulary, a grouping or matching by a label the metrics concerned do not have.
    metrics = exported()
    fine = [
        'sum(rate(eobblast_events_total{outcome="delivered"}[5m]))',
        "sum(rate(eobblast_events_total{outcome='delivered', reason=~\"no_route|timeout\"}[5m]))",
        'eobblast_verification_results_total{result="timeout"}',
        'eobblast_smtp_connects_total{result="refused"}',
        'rate(eobblast_events_total{reason=~"tls_.*"}[5m])',
        "sum by (le, stage) (rate(eobblast_stage_seconds_bucket[5m]))",
        "sum(rate(eobblast_bounces_total[1h])) / on() sum(rate(eobblast_events_total[1h]))",
        'eobblast_portal_pickups_total{outcome=~"wrong_answer|locked"}',
        'sum by (limit) (increase(eobblast_portal_rate_limited_total{limit="link"}[15m]))',
    ]
    assert [p for expr in fine for p in _problems(expr, metrics)] == []
    wrong = [
        "rate(eobblast_event_total[5m])",
        'rate(eobblast_events_total{provider="gmail"}[5m])',
        'rate(eobblast_events_total{outcome=~"delivered|bounced"}[5m])',
        "rate(eobblast_events_total{outcome='bounced'}[5m])",
        'rate(eobblast_events_total{reason="no_such_reason"}[5m])',
        'eobblast_shaping_deferred_total{reason="whatever"}',
        'eobblast_bounce_notices{status="paper_fallback"}',
        'eobblast_bounce_messages_total{result="timeout"}',
        "sum by (pool) (rate(eobblast_events_total[5m]))",
        "sum by (reason) (rate(eobblast_bounces_total[5m])) / sum(rate(eobblast_events_total[5m]))",
        "sum(rate(eobblast_bounces_total[1h])) / on(bogus) sum(rate(eobblast_events_total[1h]))",
        "rate(eobblast_events_total[5m]) / on(reason) rate(eobblast_bounces_total[5m])",
        "sum(rate(eobblast_events_total[5m])) by (reason)",
        'eobblast_events_total{outcome="rejected", reason="delivered"}',
        'eobblast_portal_pickups_total{outcome="guessed"}',
        'eobblast_portal_rate_limited_total{limit="ip"}',
        "sum by (outcome) (eobblast_portal_lockouts_total)",
    ]
    for expr in wrong:
        assert _problems(expr, metrics), expr


def test_legends_and_annotations_name_labels_their_queries_keep() -> None:
    metrics = exported()
    for panel in dashboard_panels():
        for target in panel["targets"]:
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
            kept = _output_labels(target["expr"], metrics)
            assert legend <= kept, (panel["title"], sorted(legend - kept))
    for rule in alert_rules():
        text = " ".join(rule["annotations"].values())
        named = set(re.findall(r"\$labels\.(\w+)", text))
        kept = _output_labels(rule["expr"], metrics)
        assert named <= kept, (rule["alert"], sorted(named - kept))


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # Each query as a recording rule: promtool parses it with Prometheus's own parser.
    rules = [
        {"record": f"eobblast_dashboard:query_{i}", "expr": expr}
        for i, expr in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = _promtool("check", "rules", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(rules)} rules found" in checked.stdout


def test_dashboard_covers_what_ops_watch_on_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    uids = {source["uid"] for source in provisioned}
    panels = dashboard_panels()
    for panel in panels:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
    queries = " ".join(dashboard_queries())
    # Throughput, deferrals, bounce rates, warm-up per IP, held notices, paper fallbacks.
    for metric in (
        "eobblast_events_total",
        "eobblast_shaping_deferred_total",
        "eobblast_bounces_total",
        "eobblast_shaping_warmup_day",
        "eobblast_bounce_notices",
        "eobblast_paper_fallbacks_total",
        "eobblast_worker_restarts_total",
    ):
        assert metric in queries, metric
    ids = [panel["id"] for panel in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/eobblast.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_bounce_rate_panel_divides_as_the_hard_bounce_alert_does() -> None:
    # Sends a receiver answered (delivered, or refused at once): the panel once divided by
    # delivered, failed and held notices, and showed another rate than the one that fires.
    [alert] = [rule for rule in alert_rules() if rule["alert"] == "EobblastHardBounceRateHigh"]
    expr = re.sub(r"\s+", "", alert["expr"])
    denominator = _argument(expr, expr.index("/"))
    [panel] = [
        panel for panel in dashboard_panels() if panel["title"] == "Bounce rate, by category"
    ]
    [target] = panel["targets"]
    assert re.sub(r"\s+", "", target["expr"]) == (
        f"sumby(category)(rate(eobblast_bounces_total[1h]))/on()group_left()({denominator}>0)"
    )
    assert "EobblastHardBounceRateHigh's denominator" in panel["description"]


def test_compose_mounts_the_rules_and_the_dashboard() -> None:
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert "./alerts.yml:/etc/prometheus/alerts.yml:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    # Prometheus has no sign-in and Grafana only its default admin: this host only.
    for name in ("prometheus", "grafana"):
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"]), name
