"""Reading the shipped Grafana dashboards the way Grafana does: every panel target's PromQL, with the
dashboard's template variables and Grafana's built-in interval variables substituted."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))

# docs/design.md section 4: the only metric names the gateway exports (with a histogram's series suffixes).
DESIGN_METRICS = frozenset({
    "salora_requests_total", "salora_request_duration_seconds", "salora_time_to_first_token_seconds",
    "salora_tokens_total", "salora_responses_total", "salora_canary_refusal_rate", "salora_canary_runs_total",
    "salora_adapters", "salora_engine_errors_total", "salora_shared_limits_up", "salora_limit_fallbacks_total",
    "salora_change_feed_up", "salora_change_propagation_seconds",
})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

METRIC_NAME = re.compile(r"\b(salora_[a-z0-9_]+)")
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


@dataclass(frozen=True)
class Target:
    dashboard: str  # file name
    panel: str  # panel title
    ref_id: str
    expr: str

    @property
    def id(self) -> str:
        return f"{self.dashboard}:{self.panel}:{self.ref_id}"

    @property
    def metrics(self) -> frozenset[str]:
        """The docs/design.md metric names this expression reads (histogram suffixes removed)."""
        return frozenset(base_metric(m) for m in METRIC_NAME.findall(self.expr))


def base_metric(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in DESIGN_METRICS:
            return name[: -len(suffix)]
    return name


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel that is not a row, including those nested in collapsed rows."""
    out = []
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def targets(path: Path) -> list[Target]:
    return [
        Target(path.name, p["title"], t["refId"], t["expr"])
        for p in panels(load(path))
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def all_targets() -> list[Target]:
    return [t for path in DASHBOARDS for t in targets(path)]


def variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace `$name` and `${name}` (also `${name:format}`) as Grafana does; an unknown variable is
    an error, so a typo in a dashboard cannot reach Prometheus as literal text."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"variable ${name} in {expr!r} has no value")
        return values[name]

    return VARIABLE.sub(one, expr)
