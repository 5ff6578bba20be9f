"""Counters and histograms that only the event loop's thread updates and reads.

Why: prometheus_client takes a lock and checks its arguments on every update; an answer updates six
series, 3.2 µs in process (docs/performance.md). The answer series are updated by the chat route and
read by `/metrics`, both on the event loop, so they need no lock: here an update is an addition to a
plain number. A series may be created (at 0) from any thread: `setdefault` makes one cell per label
values. They are exposed through the registry as a collector, in Prometheus's usual form."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class CounterCell:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount  # callers add counts and token numbers, never a negative amount


class HistogramCell:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bucket whose bound is >= amount
        self.sum += amount


class _Family:
    """Series by label values, registered with `registry` as a collector."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._cells: dict[tuple[str, ...], CounterCell | HistogramCell] = {}
        registry.register(self)

    def _new(self, values: tuple[str, ...], cell: CounterCell | HistogramCell) -> CounterCell | HistogramCell:
        """A series' first use: its label values checked (as prometheus_client does on every call),
        so a bad one fails its caller, not every later scrape."""
        if len(values) != len(self.labelnames) or not all(type(v) is str for v in values):
            raise ValueError(f"{self.name} takes {len(self.labelnames)} string label values, got {values!r}")
        return self._cells.setdefault(values, cell)

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class LoopCounter(_Family):
    def labels(self, *values: str) -> CounterCell:
        return self._cells.get(values) or self._new(values, CounterCell())  # type: ignore[return-value]

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, cell in list(self._cells.items()):
            family.add_metric(values, cell.value)  # type: ignore[union-attr]
        yield family


class LoopHistogram(_Family):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry,
                 buckets: Sequence[float]) -> None:
        super().__init__(name, documentation, labelnames, registry)
        self.bounds = tuple(float(b) for b in buckets)
        self._names = [floatToGoString(b) for b in self.bounds] + ["+Inf"]

    def labels(self, *values: str) -> HistogramCell:
        return self._cells.get(values) or self._new(values, HistogramCell(self.bounds))  # type: ignore[return-value]

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, cell in list(self._cells.items()):
            total, buckets = 0, []
            for name, count in zip(self._names, cell.counts):  # type: ignore[union-attr]
                total += count
                buckets.append((name, total))
            family.add_metric(values, buckets, cell.sum)  # type: ignore[union-attr]
        yield family
