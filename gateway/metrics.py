"""Prometheus metrics (names fixed in docs/design.md section 4), one registry per app so tests can run
several apps in one process. Label values come from the tenant store and the engine's adapters;
anything else is `other`, so a caller cannot grow the series count by sending made-up names."""

from __future__ import annotations

from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.loop_metrics import CounterCell, HistogramCell, LoopCounter, LoopHistogram

OTHER = "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ENGINE_ERROR_KINDS = ("load", "generation", "unavailable")  # docs/observability.md
CANARY_RESULTS = ("pass", "fail", "error")


class AnswerSeries(NamedTuple):
    """The series one finished answer of a (tenant, model) updates (on the event loop only)."""

    ok: CounterCell
    duration: HistogramCell
    ttft: HistogramCell
    prompt_tokens: CounterCell
    completion_tokens: CounterCell
    refused: CounterCell
    not_refused: CounterCell


class Metrics:
    def __init__(self) -> None:
        # (tenant, model) -> its answer series: `labels()` costs 3-4 µs a call, five or six per request
        # (docs/performance.md). Bounded like the series themselves: label values are tenant and model
        # names (or `other`), and these series are never removed.
        self._answers: dict[tuple[str, str], AnswerSeries] = {}
        self.registry = r = CollectorRegistry()
        # The chat route's series, updated on the event loop only (gateway/loop_metrics.py says why).
        self.requests = LoopCounter("salora_requests", "Chat completion requests by outcome (HTTP status)",
                                    ["tenant", "adapter", "status"], r)
        self.duration = LoopHistogram("salora_request_duration_seconds", "Chat completion time to the last byte",
                                      ["adapter"], r, LATENCY_BUCKETS)
        self.ttft = LoopHistogram("salora_time_to_first_token_seconds", "Time to the first generated text",
                                  ["adapter"], r, LATENCY_BUCKETS)
        self.tokens = LoopCounter("salora_tokens", "Tokens processed, kind = prompt or completion",
                                  ["tenant", "adapter", "kind"], r)
        self.responses = LoopCounter("salora_responses", "Completed answers, classified by the refusal judge",
                                     ["tenant", "adapter", "refused"], r)
        self.adapters = Gauge("salora_adapters", "Adapters by lifecycle state", ["state"], registry=r)
        self.engine_errors = Counter("salora_engine_errors_total", "Engine failures by engine and kind",
                                     ["engine", "kind"], registry=r)
        self.batch_size = Histogram("salora_engine_batch_size", "Rows in each decode step of the local engine",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.canary_refusal_rate = Gauge("salora_canary_refusal_rate",
                                         "Latest canary refusal rate per live adapter and for the base model's id",
                                         ["adapter", "probe"], registry=r)
        self.canary_runs = Counter("salora_canary_runs_total", "Canary runs by result", ["result"], registry=r)
        for result in CANARY_RESULTS:
            self.canary_runs.labels(result)
        # Replicas (docs/replicas.md): the change feed from the other replicas, and the shared limits.
        self.change_feed_up = Gauge("salora_change_feed_up", "1 while this replica listens for other replicas' "
                                    "changes (PostgreSQL); 0 while it reconnects", registry=r)
        self.change_lag = Histogram("salora_change_propagation_seconds", "From another replica's committed change "
                                    "to this replica hearing of it", buckets=(.005, .01, .025, .05, .1, .25, .5, 1,
                                                                               2, 5), registry=r)
        self.shared_limits_up = Gauge("salora_shared_limits_up", "1 while the rate limits shared through Redis "
                                      "answer; 0 while the fallback (limits.redis_down) applies", registry=r)
        self.limit_fallbacks = Counter("salora_limit_fallbacks_total", "Requests admitted or refused by the "
                                       "fallback while Redis was unreachable", ["mode"], registry=r)

    def create_series(self, callers: list[tuple[str, str]], engine: str) -> None:
        """Create the series of each (tenant, model) a tenant may call, and of each engine error kind, at
        0: Prometheus cannot see the increment that creates a series, so the first refusal or error
        after a start would otherwise never show in a rate or fire an alert."""
        for tenant, model in callers:
            self.requests.labels(tenant, model, "200")
            for refused in ("true", "false"):
                self.responses.labels(tenant, model, refused)
        for kind in ENGINE_ERROR_KINDS:
            self.engine_errors.labels(engine, kind)

    def answer(self, tenant: str, model: str) -> AnswerSeries:
        """The series of a 200 answer of `tenant` on `model`, looked up once per pair."""
        series = self._answers.get((tenant, model))
        if series is None:
            series = self._answers[tenant, model] = AnswerSeries(
                self.requests.labels(tenant, model, "200"), self.duration.labels(model), self.ttft.labels(model),
                self.tokens.labels(tenant, model, "prompt"), self.tokens.labels(tenant, model, "completion"),
                self.responses.labels(tenant, model, "true"), self.responses.labels(tenant, model, "false"))
        return series

    def render(self) -> bytes:
        return generate_latest(self.registry)
