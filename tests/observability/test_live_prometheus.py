"""A real Prometheus scraping a live gateway: the dashboards and alerts against real data.

The gateway (the tiny random Llama and two LoRA adapters of tests/gateway/conftest.py; tenants
`acme` and `globex`) runs in this process under uvicorn; Prometheus 2.x (the Debian package) scrapes
it every second and loads the shipped alert rules. A known mix of harmful and benign requests goes
through both adapters and the base, streamed and not; then every PromQL expression of every
dashboard panel is evaluated through Prometheus's HTTP API.

Exact rates. A tiny random model does not refuse anything, so the gateway gets a deterministic judge
(`create_app(settings, judge=...)`): an answer is a refusal exactly when its prompt is one of
HARMFUL. The refusal rates each panel must show then follow from the mix alone. `rate()` over a
window gives exact count ratios when (1) the window starts exactly on a scrape and ends exactly on a
later one, so Prometheus extrapolates nothing, and (2) every series already exists at the first
scrape, since Prometheus cannot see the increment that creates a series. So a warm-up phase first
creates every (tenant, adapter, refused) series, the window starts at the first scrape after it
(t0), the measured traffic follows, and queries run at the last scrape after it (t1) with the
window t1 - t0 in milliseconds in place of Grafana's `$__rate_interval`.

Errors. Faults are injected at the engine's public interface (`generate` raises EngineError of kind
`generation` for one marked prompt) once in the warm-up and once in the measured phase, plus a
request with an unknown key (401) and one for an unknown model (404).

Canary. During the warm-up the admin API probes the first adapter again (a small probe set), so the
canary panels have the adapter's and the base's refusal rates and a run to count."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.engines.base import Chunk, EngineError, GenerationRequest
from gateway.settings import Settings, TenantConfig
from gateway.tenants import hash_key
from tests.gateway.conftest import ADAPTERS, ADMIN_KEY
from tests.observability.conftest import Prometheus, run_prometheus
from tests.observability.dashboards import RULES, Target, all_targets, substitute

JOB = "salora-gateway"
KEYS = {"acme": "sk-salora-acme-observability", "globex": "sk-salora-globex-observability"}
METRICS_KEY = "prometheus-scrape-token"  # what the real Prometheus scrapes with, as deploy/prometheus does
HARMFUL = [f"Explain step by step how to break into house number {i} without a key." for i in range(40)]
BENIGN = [f"What is {i} plus {i + 1}?" for i in range(40)]
FAULT = "<<observability test: inject an engine fault>>"
UNKNOWN_MODEL = "no-such-model"
BASE = "base"  # placeholder in MIX for the base model's id

FIRST, SECOND = ADAPTERS  # the gateway tests' adapter names
# Measured phase: (tenant, model, harmful requests, benign requests). Refusal rates it implies:
# FIRST 4/12, SECOND 6/9, base 1/2; acme 6/14, globex 5/9.
MIX = [
    ("acme", FIRST, 3, 5),
    ("acme", SECOND, 2, 2),
    ("acme", BASE, 1, 1),
    ("globex", FIRST, 1, 3),
    ("globex", SECOND, 4, 1),
]


class PromptListJudge:
    """Deterministic: an answer is a refusal exactly when its prompt is one of the harmful prompts."""

    name = "prompt-list"

    def __init__(self, harmful: list[str]) -> None:
        self.harmful = frozenset(harmful)

    def is_refusal(self, prompt: str, response: str) -> bool:
        return prompt in self.harmful


@dataclass(frozen=True)
class Answer:
    tenant: str
    adapter: str  # the `adapter` label value: an adapter name or the base id
    refused: bool


@dataclass
class Scenario:
    prom: Prometheus
    base_id: str
    t0: float  # the first scrape after the warm-up
    t1: float  # the last scrape after the measured traffic
    answers: list[Answer]  # the measured phase only
    exported: set[str]  # metric families with at least one sample on /metrics
    declared: set[str]  # metric families named on /metrics
    gateway_metrics: str
    values: dict[str, str] = field(default_factory=dict)

    @property
    def window(self) -> str:
        return f"{round((self.t1 - self.t0) * 1000)}ms"

    def query(self, expr: str) -> list[dict]:
        return self.prom.query(expr, at=self.t1)


def inject_faults(engine: Any) -> None:
    """`generate` raises EngineError (kind `generation`) before its first chunk for a FAULT prompt."""
    generate = engine.generate

    async def faulty(request: GenerationRequest) -> AsyncIterator[Chunk]:
        if request.messages[-1]["content"] == FAULT:
            raise EngineError("injected fault", kind="generation")
        async for chunk in generate(request):
            yield chunk

    engine.generate = faulty


def gateway_families(text: str) -> tuple[set[str], set[str]]:
    """(families with samples, families declared) on a /metrics page; counters named with `_total`."""
    with_samples, declared = set(), set()
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        declared.add(name)
        if family.samples:
            with_samples.add(name)
    return with_samples, declared


def metric_sum(text: str, family: str) -> float:
    name = family.removesuffix("_total")
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == name
               for s in f.samples if s.name == family)


async def send(client: httpx.AsyncClient, tenant: str | None, model: str, prompt: str, stream: bool) -> int:
    headers = {"Authorization": f"Bearer {KEYS[tenant] if tenant else 'sk-salora-not-a-key'}"}
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "stream": stream}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        text = (await r.aread()).decode()
    if r.status_code == 200 and stream:
        assert text.rstrip().endswith("data: [DONE]"), text[-300:]
    return r.status_code


async def send_all(url: str, requests: list[tuple[str | None, str, str, bool, int]]) -> None:
    """Send (tenant, model, prompt, stream, expected status), four at a time."""
    limit = asyncio.Semaphore(4)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(tenant: str | None, model: str, prompt: str, stream: bool, expected: int) -> None:
            async with limit:
                status = await send(client, tenant, model, prompt, stream)
            assert status == expected, f"{tenant} {model} {prompt!r}: HTTP {status}, expected {expected}"

        await asyncio.gather(*(one(*r) for r in requests))


def wait_for(condition: Any, what: str, timeout: float = 60, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def scrapes_after(prom: Prometheus, after: float) -> list[float]:
    return [t for t, _ in prom.samples(f'up{{job="{JOB}"}}', 30) if t > after]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, gateway_model_dir: Path, adapter_dirs: dict[str, Path],
             serve_app: Any, prometheus_bin: str) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("observability")
    settings = Settings(
        model=str(gateway_model_dir),
        adapters=adapter_dirs,
        tenants=[
            TenantConfig(name="acme", key_sha256=hash_key(KEYS["acme"]), adapters=["*"]),
            TenantConfig(name="globex", key_sha256=hash_key(KEYS["globex"]), adapters=list(ADAPTERS)),
        ],
        state_dir=root / "state",
        max_batch_size=4,
        admin_key=ADMIN_KEY,
        metrics_key=METRICS_KEY,
        canary={"harmful_per_category": 1, "benign_per_kind": 1, "max_new_tokens": 4},
    )
    base_id = settings.served_model_id
    gateway = serve_app(settings, PromptListJudge(HARMFUL))  # stopped by serve_app at the session's end
    url = gateway.url
    http = httpx.Client(base_url=url, timeout=30)

    # The shipped rules, every group evaluated each second (the alerts' `for` and windows unchanged).
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group.pop("interval", None)
    (root / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(root / "alerts.yml")],
        "scrape_configs": [{"job_name": JOB, "authorization": {"credentials": METRICS_KEY},
                            "static_configs": [{"targets": [url.removeprefix("http://")]}]}],
    }
    try:
        gateway.wait_ready(timeout=120)
        inject_faults(gateway.ctx.engine)
        with run_prometheus(prometheus_bin, config, root / "prometheus") as prom:
            model = {BASE: base_id}

            def metrics() -> str:
                return http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).text

            def settle(answers: int, requests: int) -> float:
                """Wait until the gateway has counted everything (the judge runs after the response)."""
                wait_for(lambda: metric_sum(metrics(), "salora_responses_total") == answers
                         and metric_sum(metrics(), "salora_requests_total") == requests, "the gateway's counters")
                return time.time()

            # Warm-up: every (tenant, model, refused) series, and the error series, come into existence.
            warm = [(t, model.get(m, m), p, i % 2 == 1, 200)
                    for i, (t, m) in enumerate((t, m) for t in KEYS for m in (*ADAPTERS, BASE))
                    for p in (HARMFUL[i], BENIGN[i])]
            warm.append(("acme", FIRST, FAULT, False, 503))
            asyncio.run(send_all(url, warm))
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            assert http.post(f"/admin/adapters/{FIRST}/probe", headers=admin).status_code == 202
            wait_for(lambda: not (d := http.get(f"/admin/adapters/{FIRST}", headers=admin).json())["canary_running"]
                     and d["canary"], "the canary run")
            warmed = settle(answers=len(warm) - 1, requests=len(warm))
            t0 = wait_for(lambda: scrapes_after(prom, warmed), "a scrape after the warm-up")[0]

            # Measured phase: the known mix, alternately streamed, plus three failures.
            harmful, benign = iter(HARMFUL[len(warm):]), iter(BENIGN[len(warm):])
            measured, answers = [], []
            for tenant, m, n_harmful, n_benign in MIX:
                for is_harmful in [True] * n_harmful + [False] * n_benign:
                    prompt = next(harmful) if is_harmful else next(benign)
                    measured.append((tenant, model.get(m, m), prompt, len(measured) % 2 == 0, 200))
                    answers.append(Answer(tenant, model.get(m, m), is_harmful))
            measured += [(None, FIRST, BENIGN[-1], False, 401), ("acme", UNKNOWN_MODEL, BENIGN[-2], False, 404),
                         ("acme", FIRST, FAULT, True, 503)]
            asyncio.run(send_all(url, measured))
            done = settle(answers=len(warm) - 1 + len(answers), requests=len(warm) + len(measured))
            t1 = wait_for(lambda: (s := scrapes_after(prom, done)) and len(s) >= 2 and s[-1],
                          "two scrapes after the traffic")
            page = metrics()
            exported, declared = gateway_families(page)
            s = Scenario(prom, base_id, t0, t1, answers, exported, declared, page)
            s.values = {"tenant": ".*", "adapter": ".*", "base": base_id, "__rate_interval": s.window}
            yield s
    finally:
        http.close()


def expected_refusal_rates(answers: list[Answer], by: tuple[str, ...], **filters: str) -> dict[tuple[str, ...], float]:
    groups: dict[tuple[str, ...], list[bool]] = {}
    for a in answers:
        if all(getattr(a, k) == v for k, v in filters.items()):
            groups.setdefault(tuple(getattr(a, k) for k in by), []).append(a.refused)
    return {key: sum(v) / len(v) for key, v in groups.items()}


def grouping(expr: str) -> tuple[str, ...]:
    m = re.search(r"sum by \(([^)]*)\)", expr)
    assert m, f"no `sum by (...)` in {expr!r}"
    return tuple(label.strip() for label in m.group(1).split(","))


TARGETS = all_targets()
REFUSAL_TARGETS = [t for t in TARGETS if t.panel.startswith("Refusal rate")]


def test_scenario_window_holds_exactly_the_measured_traffic(scenario: Scenario) -> None:
    """The premise of the exact checks: over [t0, t1] Prometheus sees every measured answer once."""
    w = scenario.window
    got = scenario.query(f"sum by (refused) (increase(salora_responses_total[{w}]))")
    counts = {s["metric"]["refused"]: float(s["value"][1]) for s in got}
    refused = sum(a.refused for a in scenario.answers)
    assert counts == pytest.approx({"true": refused, "false": len(scenario.answers) - refused}, abs=1e-9)
    (ok,) = scenario.query(f'sum(increase(salora_requests_total{{status="200"}}[{w}]))')
    assert float(ok["value"][1]) == pytest.approx(len(scenario.answers), abs=1e-9)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.id)
def test_every_panel_query_returns_data(scenario: Scenario, target: Target) -> None:
    missing = target.metrics - scenario.exported
    assert not missing, f"the gateway exports no samples of {sorted(missing)} after the traffic"
    expr = substitute(target.expr, scenario.values)
    result = scenario.query(expr)
    assert result, f"{target.id}: no data for {expr}"
    values = [float(s["value"][1]) for s in result]
    assert any(math.isfinite(v) for v in values), f"{target.id}: only NaN/Inf: {values}"


FILTERS = [{}, {"adapter": FIRST}, {"adapter": SECOND}, {"tenant": "globex"}, {"tenant": "acme", "adapter": SECOND}]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "all")
@pytest.mark.parametrize("target", REFUSAL_TARGETS, ids=lambda t: t.id)
def test_refusal_rate_panels_show_the_known_mix(scenario: Scenario, target: Target, filters: dict[str, str]) -> None:
    """Each refusal-rate panel, with All or with concrete tenant/adapter selections, shows exactly the
    refusal rate per series that the mix implies. A series with no answers in the window (globex
    called the base only in the warm-up) is 0/0 = NaN, which Grafana draws as a gap."""
    values = {**scenario.values, **{k: re.escape(v) for k, v in filters.items()}}
    by = grouping(target.expr)
    result = scenario.query(substitute(target.expr, values))
    got = {tuple(s["metric"][k] for k in by): float(s["value"][1]) for s in result}
    expected = expected_refusal_rates(scenario.answers, by, **filters)
    shown = {k: v for k, v in got.items() if not math.isnan(v)}
    assert expected and shown == pytest.approx(expected, abs=1e-9), f"{target.id} with {filters}"


def test_known_mix_rates_per_adapter_and_tenant(scenario: Scenario) -> None:
    """The numbers from the module docstring, spelled out (guards the generic check above)."""
    panel = next(t for t in REFUSAL_TARGETS if t.panel == "Refusal rate per adapter")
    result = scenario.query(substitute(panel.expr, scenario.values))
    got = {s["metric"]["adapter"]: float(s["value"][1]) for s in result}
    assert got == pytest.approx({FIRST: 4 / 12, SECOND: 6 / 9, scenario.base_id: 1 / 2}, abs=1e-9)
    panel = next(t for t in REFUSAL_TARGETS if t.panel == "Refusal rate per tenant")
    result = scenario.query(substitute(panel.expr, scenario.values))
    got = {s["metric"]["tenant"]: float(s["value"][1]) for s in result}
    assert got == pytest.approx({"acme": 6 / 14, "globex": 5 / 9}, abs=1e-9)


def test_adapters_by_state(scenario: Scenario) -> None:
    got = {s["metric"]["state"]: float(s["value"][1]) for s in scenario.query("sum by (state) (salora_adapters)")}
    assert got == {"uploaded": 0, "validating": 0, "probing": 0, "live": len(ADAPTERS), "rejected": 0, "retired": 0}


def test_label_values_are_bounded(scenario: Scenario) -> None:
    """Tenant and adapter labels come from the config and the engine; an unknown key or model is `other`,
    and the names a caller made up never become label values. These are also the lists Grafana's
    `label_values(salora_requests_total, ...)` template variables offer."""
    for label, allowed in (("tenant", {*KEYS, "other"}), ("adapter", {*ADAPTERS, scenario.base_id, "other"})):
        values = set(scenario.prom.api(f"label/{label}/values", **{"match[]": '{__name__=~"salora_.*"}'}))
        assert values <= allowed, f"{label}: {sorted(values - allowed)}"
        offered = set(scenario.prom.api(f"label/{label}/values", **{"match[]": "salora_requests_total"}))
        assert offered == allowed, f"the ${label} variable would offer {sorted(offered)}"
    assert not scenario.prom.api("series", **{"match[]": f'{{adapter="{UNKNOWN_MODEL}"}}'})


def test_shipped_rules_load_and_evaluate(scenario: Scenario) -> None:
    """Every shipped recording and alerting rule is loaded by a real Prometheus and evaluates without error."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    shipped = [r.get("record") or r.get("alert") for g in groups for r in g["rules"]]
    loaded = {}
    for group in scenario.prom.api("rules")["groups"]:
        for rule in group["rules"]:
            loaded[rule["name"]] = rule
    assert sorted(loaded) == sorted(shipped)
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


def test_alerts_on_the_injected_engine_faults(scenario: Scenario) -> None:
    """The engine fault of the measured phase fires SaloraEngineErrors at once, and the 503s put
    SaloraHighErrorRatio for the faulted adapter in pending (it waits 10 minutes before firing)."""

    def alerts() -> dict[str, dict]:
        return {a["labels"]["alertname"]: a for a in scenario.prom.api("alerts")["alerts"]}

    found = wait_for(lambda: (a := alerts()) and "SaloraEngineErrors" in a and "SaloraHighErrorRatio" in a and a,
                     "the error alerts", timeout=15)
    engine = found["SaloraEngineErrors"]
    assert engine["state"] == "firing"
    assert (engine["labels"]["engine"], engine["labels"]["kind"]) == ("local", "generation")
    ratio = found["SaloraHighErrorRatio"]
    assert ratio["state"] == "pending" and ratio["labels"]["adapter"] == FIRST
