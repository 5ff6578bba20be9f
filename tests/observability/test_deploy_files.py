"""The shipped Prometheus and Grafana files, checked without a running server: promtool's config and
rule checks, the alert rules' unit tests, and the dashboards' structure and PromQL syntax."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from salora.models import EMBEDDED_ID
from tests.observability.dashboards import (
    DASHBOARDS,
    DEPLOY,
    DESIGN_METRICS,
    METRIC_NAME,
    PROMETHEUS_CONFIG,
    RULE_TESTS,
    RULES,
    VARIABLE,
    all_targets,
    base_metric,
    load,
    panels,
    substitute,
    variables,
)

GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "6h"}
# The panels the issue asks for, by title.
REQUIRED_PANELS = {
    "Refusal rate per adapter", "Refusal rate per tenant", "Canary refusal rate per adapter, beside the base",
    "Request rate per adapter and status", "Request latency p50 / p95 / p99", "Time to first token p50 / p95 / p99",
    "Tokens per second", "Error ratio (5xx)", "Errors by status", "Engine errors", "Adapters by state",
}
REQUIRED_ALERTS = {
    "SaloraAdapterRefusalRateBelowCanaryBaseline", "SaloraAdapterRefusalRateJump", "SaloraCanaryFailed",
    "SaloraCanaryErrors", "SaloraHighErrorRatio", "SaloraEngineErrors", "SaloraHighLatency",
    "SaloraSlowTimeToFirstToken", "SaloraGatewayDown", "SaloraSharedLimitsDown", "SaloraChangeFeedDown",
}


def promtool_run(promtool: str, *args: str | Path) -> str:
    done = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output


def test_promtool_check_config(promtool: str, tmp_path: Path) -> None:
    """The shipped config as it is, but for the scrape token's file, which only a deployment has."""
    text = PROMETHEUS_CONFIG.read_text()
    assert "credentials_file: /run/secrets/metrics_key" in text
    (tmp_path / "metrics_key").write_text("token\n")
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/run/secrets/metrics_key", str(tmp_path / "metrics_key")))
    shutil.copy(PROMETHEUS_CONFIG.parent / "alerts.yml", tmp_path / "alerts.yml")
    out = promtool_run(promtool, "check", "config", config)
    assert "is valid prometheus config file syntax" in out
    assert "1 rule files found" in out


def test_promtool_check_rules(promtool: str) -> None:
    out = promtool_run(promtool, "check", "rules", RULES)
    assert "SUCCESS" in out


@pytest.mark.parametrize("tests_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests(promtool: str, tests_file: Path) -> None:
    """Each alert fires on the synthetic series it is meant for, with the expected labels and text,
    and stays silent on the healthy ones (deploy/prometheus/tests/)."""
    out = promtool_run(promtool, "test", "rules", tests_file)
    assert "SUCCESS" in out


def test_every_alert_is_unit_tested() -> None:
    tested = {t["alertname"] for f in RULE_TESTS for group in yaml.safe_load(f.read_text())["tests"]
              for t in group.get("alert_rule_test", [])}
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == REQUIRED_ALERTS
    assert alerts <= tested, f"alerts without a unit test: {sorted(alerts - tested)}"


def test_alerts_have_severity_and_summary() -> None:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
                assert rule["annotations"]["summary"], rule["alert"]


def test_prometheus_config_matches_rules() -> None:
    """The shipped scrape job is the one the rules watch, and every rule file it names exists."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    watched = set(re.findall(r'job="([^"]+)"', RULES.read_text()))
    assert watched and watched <= jobs
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file(), rule_file


def test_only_design_metric_names() -> None:
    """A typo in a metric name would make a panel or an alert silently empty."""
    texts = [RULES.read_text(), *(p.read_text() for p in DASHBOARDS)]
    used = {base_metric(m) for text in texts for m in METRIC_NAME.findall(text)}
    assert used <= DESIGN_METRICS, f"not in docs/design.md section 4: {sorted(used - DESIGN_METRICS)}"


def test_dashboard_panels_and_variables() -> None:
    assert DASHBOARDS, "no dashboard under deploy/grafana/dashboards"
    titles: set[str] = set()
    for path in DASHBOARDS:
        dashboard = load(path)
        assert dashboard["uid"] and dashboard["title"]
        defined = variables(dashboard)
        assert {"datasource", "tenant", "adapter"} <= set(defined), path.name
        assert defined["datasource"]["type"] == "datasource" and defined["datasource"]["query"] == "prometheus"
        for name in ("tenant", "adapter"):
            var = defined[name]
            assert var["type"] == "query" and var["includeAll"] and var["multi"] and var["allValue"] == ".*"
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels(dashboard):
            titles.add(panel["title"])
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], f"{panel['title']}: no query"
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24 and g["h"] > 0, panel["title"]
            for target in panel["targets"]:
                used = {a or b for a, b in VARIABLE.findall(target["expr"])}
                unknown = used - set(defined) - set(GRAFANA_BUILTINS)
                assert not unknown, f"{panel['title']}: undefined variables {unknown}"
            if panel["title"].startswith("Refusal rate"):
                assert all("$tenant" in t["expr"] and "$adapter" in t["expr"] for t in panel["targets"])
        # The base model's id defaults to the embedded model's, the gateway's default.
        assert defined["base"]["query"] == defined["base"]["current"]["value"] == EMBEDDED_ID
    missing = REQUIRED_PANELS - titles
    assert not missing, f"panels missing: {sorted(missing)}"


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    """Every panel query, its variables substituted, passes Prometheus's own PromQL parser (each is
    checked as the expression of a recording rule)."""
    values = {"tenant": ".*", "adapter": ".*", "base": "base", **GRAFANA_BUILTINS}
    rules = [{"record": f"dashboard:expr_{i}", "expr": substitute(t.expr, values)} for i, t in enumerate(all_targets())]
    assert len(rules) >= len(REQUIRED_PANELS)
    path = tmp_path / "dashboard_exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = promtool_run(promtool, "check", "rules", path)
    assert f"SUCCESS: {len(rules)} rules found" in out


def test_grafana_provisioning() -> None:
    root = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((root / "datasources" / "prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http") and ds["isDefault"]
    providers = yaml.safe_load((root / "dashboards" / "salora.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
