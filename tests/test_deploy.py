"""deploy/: alert rules and example config pass promtool, alerts fire as meant, and the dashboard
and rules query only metrics and labels that proxyd.observability.metrics really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.test_metrics import exercised_metrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "proxyd-dashboard.json"
README = DEPLOY / "README.md"

# Labels Prometheus adds or defines itself, and the one metric it synthesises per target.
TARGET_LABELS = frozenset(("job", "instance", "le", "__name__"))
PROMETHEUS_METRICS = frozenset(("up",))
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$job": ".*", "$model": ".*"}
KEYWORDS = frozenset(("by", "without", "on", "ignoring", "group_left", "group_right", "bool"))
KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool; its absence is a failure that says which Debian package to install."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool not found: install Debian's package `prometheus` (apt-get install prometheus)"
        )
    # promtool is found on PATH by name and every argument is a path or word this module chose.
    return subprocess.run(  # noqa: S603
        [exe, *args], capture_output=True, text=True, timeout=30, check=False
    )


def exported() -> tuple[set[str], dict[str, set[str]]]:
    """Sample names proxyd exports after every method ran, and the label names of each."""
    body, _ = exercised_metrics().render()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return set(labels), labels


def substitute(expr: str) -> str:
    """A Grafana query with its template variables replaced by plain PromQL."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def parse(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """Metric names in a PromQL expression with the labels matched on each, and clause labels."""
    expr = substitute(expr)
    strip = _STRING.sub('""', expr)
    metrics: dict[str, set[str]] = {}
    for name, body in _MATCHERS.findall(strip):
        metrics.setdefault(name or "", set()).update(_MATCHER_LABEL.findall(body))
    clause_labels = {
        label.strip() for group in _CLAUSE.findall(strip) for label in group.split(",")
    } - {""}
    bare = _CLAUSE.sub(" ", _MATCHERS.sub(r"\1 ", strip))
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    for name in _IDENT.findall(bare):
        if name.lower() not in KEYWORDS:
            metrics.setdefault(name, set())
    metrics.pop("", None)
    return metrics, clause_labels


def dashboard() -> dict[str, Any]:
    """The committed Grafana dashboard."""
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and templating query of the dashboard."""
    out = [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert m, f"templating query of ${var['name']} is not label_values(metric, label)"
            out.append((f"variable ${var['name']}", f"sum by ({m[2]}) ({m[1]})"))
    return out


def alert_rules() -> list[dict[str, Any]]:
    """The rules of deploy/prometheus/alerts.yml."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def check_names(where: str, expr: str, names: set[str], labels: dict[str, set[str]]) -> None:
    """Fail when a query names a metric, or filters on a label, that proxyd does not export."""
    all_labels = set().union(*labels.values()) | TARGET_LABELS
    metrics, clause_labels = parse(expr)
    assert metrics, f"{where}: no metric found in {expr!r}"
    for metric, matched in metrics.items():
        if metric in PROMETHEUS_METRICS:
            continue
        assert metric in names, (
            f"{where}: {metric!r} is not exported by proxyd.observability.metrics"
        )
        unknown = matched - labels[metric] - TARGET_LABELS
        assert not unknown, f"{where}: {metric} has no label {sorted(unknown)}"
    assert clause_labels <= all_labels, f"{where}: unknown labels {clause_labels - all_labels}"


def test_alert_rules_pass_promtool() -> None:
    """`promtool check rules` accepts deploy/prometheus/alerts.yml, templates included."""
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_example_prometheus_config_passes_promtool() -> None:
    """`promtool check config` accepts the example scrape config and the rules it loads."""
    result = promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_the_operational_risks() -> None:
    """Spool growth, channel down, error ratio, Redis fallback and not-ready all have alerts."""
    names = {rule.get("alert") for rule in alert_rules()}
    required = {"ProxydBillingSpooling", "ProxydBillingSpoolGrowing", "ProxydChannelDown"}
    required |= {"ProxydHighErrorRatio", "ProxydRedisFallback", "ProxydNotReady", "ProxydDown"}
    assert required <= names
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]


def test_alert_rules_use_only_exported_metrics() -> None:
    """Every metric and label in the alert expressions exists in proxyd's exposition."""
    names, labels = exported()
    for rule in alert_rules():
        check_names(f"alert {rule['alert']}", rule["expr"], names, labels)


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    """One promtool input series with job="proxyd" and instance="a:8080" unless overridden."""
    all_labels = {"job": "proxyd", "instance": "a:8080"} | labels
    text = ", ".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def expect(alert: str, at: str, *fired: dict[str, str]) -> dict[str, Any]:
    """An alert_rule_test: `alert` at `at` fires exactly with the `fired` label sets."""
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": f} for f in fired]}


def test_alerts_fire_when_and_only_when_they_should(tmp_path: Path) -> None:
    """promtool unit tests: each alert fires on its symptom after its `for`, not on healthy data."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:  # promtool compares annotations exactly; test logic only
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    inst = {"job": "proxyd", "instance": "a:8080"}
    crit, warn = {"severity": "critical"}, {"severity": "warning"}
    tests = [
        (
            [series("up", "1 0x10")],
            [expect("ProxydDown", "1m"), expect("ProxydDown", "4m", inst | crit)],
        ),
        (
            [series("proxyd_ready", "1 0x10")],
            [expect("ProxydNotReady", "3m"), expect("ProxydNotReady", "8m", inst | crit)],
        ),
        ([series("proxyd_ready", "1x10")], [expect("ProxydNotReady", "8m")]),
        (
            [series("proxyd_billing_rows_spooled_total", "0+10x30")],
            [
                expect("ProxydBillingSpooling", "5m"),
                expect("ProxydBillingSpooling", "20m", inst | warn),
            ],
        ),
        (
            [series("proxyd_billing_rows_spooled_total", "50x30")],
            [expect("ProxydBillingSpooling", "20m")],
        ),
        (
            [series("proxyd_billing_spool_pending_rows", "0+5x40")],
            [expect("ProxydBillingSpoolGrowing", "35m", inst | crit)],
        ),
        (
            [series("proxyd_billing_spool_pending_rows", "100x40")],
            [expect("ProxydBillingSpoolGrowing", "35m")],
        ),
        (
            [
                series("proxyd_channel_healthy", "1 0x10", channel="a", instance="i1"),
                series("proxyd_channel_healthy", "1 0x10", channel="a", instance="i2"),
                series("proxyd_channel_healthy", "1x10", channel="b", instance="i1"),
            ],
            [
                expect("ProxydChannelDown", "3m"),
                expect("ProxydChannelDown", "8m", {"job": "proxyd", "channel": "a"} | warn),
                expect("ProxydNoHealthyChannel", "8m", {"job": "proxyd", "instance": "i2"} | crit),
            ],
        ),
        (
            [
                series("proxyd_requests_total", "0+90x30", status_class="2xx", error_type="none"),
                series(
                    "proxyd_requests_total",
                    "0+10x30",
                    status_class="5xx",
                    error_type="upstream_error",
                ),
            ],
            [expect("ProxydHighErrorRatio", "20m", {"job": "proxyd"} | crit)],
        ),
        (
            [
                series("proxyd_requests_total", "0+99x30", status_class="2xx", error_type="none"),
                series(
                    "proxyd_requests_total",
                    "0+1x30",
                    status_class="5xx",
                    error_type="upstream_error",
                ),
            ],
            [expect("ProxydHighErrorRatio", "20m")],
        ),
        (
            [series("proxyd_redis_fallback", "0 1x10")],
            [expect("ProxydRedisFallback", "2m"), expect("ProxydRedisFallback", "4m", inst | warn)],
        ),
        (
            [series("proxyd_metric_source_errors_total", "0 0 1 1 1", metric="proxyd_ready")],
            [
                expect(
                    "ProxydMetricSourceFailing",
                    "3m",
                    inst | {"metric": "proxyd_ready", "severity": "info"},
                )
            ],
        ),
    ]
    unit = {
        "rule_files": [str(tmp_path / "rules.yml")],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": s, "alert_rule_test": a} for s, a in tests],
    }
    (tmp_path / "unit.yml").write_text(yaml.safe_dump(unit))
    result = promtool("test", "rules", str(tmp_path / "unit.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_dashboard_queries_use_only_exported_metrics() -> None:
    """Every metric and label a dashboard query or variable uses is one proxyd exports."""
    names, labels = exported()
    for where, expr in dashboard_queries():
        check_names(where, expr, names, labels)


def test_dashboard_legends_use_existing_labels() -> None:
    """A legend's {{label}} is a label proxyd or Prometheus really attaches."""
    _, labels = exported()
    known = set().union(*labels.values()) | TARGET_LABELS
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert used <= known, f"panel {panel['title']!r} legend uses {used - known}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query, variables substituted, parses: promtool checks it as a rule."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_covers_the_operational_views() -> None:
    """Traffic, latency percentiles, TTFT, tokens, spend, refusals, channels and billing appear."""
    used: set[str] = set()
    for _, expr in dashboard_queries():
        used |= set(parse(expr)[0])
    required = {
        "proxyd_requests_total",
        "proxyd_request_duration_seconds_bucket",
        "proxyd_time_to_first_byte_seconds_bucket",
        "proxyd_upstream_duration_seconds_bucket",
        "proxyd_tokens_total",
        "proxyd_cost_nanos_total",
        "proxyd_refusals_total",
        "proxyd_channel_healthy",
        "proxyd_failovers_total",
        "proxyd_billing_queue_depth",
        "proxyd_billing_rows_spooled_total",
        "proxyd_billing_rows_replayed_total",
        "proxyd_billing_flush_duration_seconds_bucket",
        "proxyd_redis_fallback",
    }
    assert required <= used, required - used
    exprs = " ".join(expr for _, expr in dashboard_queries())
    assert exprs.count("histogram_quantile(0.99") >= 2


def test_dashboard_layout_is_well_formed() -> None:
    """Unique panel ids, unique refIds per panel, the datasource variable, no overlapping panels."""
    board = dashboard()
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert "datasource" in {v["name"] for v in board["templating"]["list"]}
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        area = {(x, y) for x in xs for y in ys}
        assert not cells & area, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs, p["title"]
        assert len(refs) == len(set(refs)), p["title"]


def test_readme_documents_exactly_the_exported_metrics() -> None:
    """deploy/README.md's metric reference lists every exported metric and no other."""
    body, _ = exercised_metrics().render()
    families = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in text_string_to_metric_families(body.decode())
        if not f.name.endswith("_created")
    }
    documented = set(re.findall(r"\bproxyd_[a-z0-9_]*[a-z0-9]\b", README.read_text()))
    assert families - documented == set(), "exported but not documented"
    assert documented - families == set(), "documented but not exported"
