"""The chat route's lock-free series (gateway/loop_metrics.py) expose exactly what prometheus_client's
own Counter and Histogram expose for the same updates (less the `_created` timestamps)."""

from __future__ import annotations

import random
import threading

import pytest

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.loop_metrics import LoopCounter, LoopHistogram
from gateway.metrics import LATENCY_BUCKETS


def _samples(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_loop_series_render_as_prometheus_clients_own() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    count = LoopCounter("c", "a counter", ["tenant", "adapter"], ours)
    their_count = Counter("c", "a counter", ["tenant", "adapter"], registry=theirs)
    hist = LoopHistogram("h_seconds", "a histogram", ["adapter"], ours, LATENCY_BUCKETS)
    their_hist = Histogram("h_seconds", "a histogram", ["adapter"], buckets=LATENCY_BUCKETS, registry=theirs)
    r = random.Random(0)
    values = [*LATENCY_BUCKETS, 0.0, 1e-9, 500.0] + [r.expovariate(2) for _ in range(300)]  # bounds exactly, too
    for i, v in enumerate(values):
        labels = (f"t{i % 3}", f"m{i % 2}")
        count.labels(*labels).inc(i % 5)
        their_count.labels(*labels).inc(i % 5)
        hist.labels(labels[1]).observe(v)
        their_hist.labels(labels[1]).observe(v)
    count.labels("t9", "m9")  # a series created at 0
    their_count.labels("t9", "m9")
    assert _samples(ours) == _samples(theirs)


def test_one_series_per_label_values_when_threads_create_them() -> None:
    registry = CollectorRegistry()
    count = LoopCounter("c", "a counter", ["tenant"], registry)
    cells: list[object] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        cells.append(count.labels("t"))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in cells}) == 1


def test_a_bad_label_value_fails_its_caller_not_the_scrape() -> None:
    registry = CollectorRegistry()
    count = LoopCounter("c", "a counter", ["tenant", "status"], registry)
    for bad in (("t", 200), ("t",), ("t", "200", "x")):
        with pytest.raises(ValueError, match="string label values"):
            count.labels(*bad)  # type: ignore[arg-type]
    count.labels("t", "200").inc()
    assert 'c_total{status="200",tenant="t"} 1.0' in generate_latest(registry).decode()
