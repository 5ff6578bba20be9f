"""`make bench-check`'s pass/fail logic (loadtests/check.py) on recorded numbers: no timing here."""

from __future__ import annotations

from pathlib import Path

from loadtests.check import BOUND_FILE, load_bound, verdict


def entry(gateway_ms: float, upstream_ms: float, errors: int = 0) -> dict[str, object]:
    return {"cpu_ms_per_request": {"gateway": gateway_ms, "upstream": upstream_ms, "loadgen": 0.1},
            "errors": errors, "load_avg_1m": [6.9, 7.1]}


# Recorded on 2026-12-03 (loadtests.ab, 150 req/s): before issue 22's changes and after them.
BEFORE = {"gateway": {"200": entry(1.973, 0.400), "500": entry(2.193, 0.387)}}
AFTER = {"gateway": {"200": entry(1.287, 0.380), "500": entry(0.962, 0.322)}}


def test_within_the_bound_passes_and_over_it_fails() -> None:
    ok, lines = verdict(AFTER, 4.0)
    assert ok and len(lines) == 2 and all(line.startswith("ok") for line in lines)
    ok, lines = verdict(BEFORE, 4.0)
    assert not ok and "ratio 4.93" in lines[0] and lines[0].startswith("FAIL")


def test_one_rate_over_the_bound_or_with_errors_fails_the_check() -> None:
    assert not verdict({"gateway": {**AFTER["gateway"], "500": entry(2.0, 0.4)}}, 4.0)[0]  # 5.0x
    assert not verdict({"gateway": {**AFTER["gateway"], "500": entry(0.9, 0.4, errors=3)}}, 4.0)[0]


def test_no_gateway_runs_fail() -> None:
    assert verdict({"direct": {}}, 4.0) == (False, ["no gateway runs in the results"])


def test_the_bound_is_read_from_the_repo(tmp_path: Path) -> None:
    assert 1.0 < load_bound(BOUND_FILE) < 10.0
    other = tmp_path / "bound.json"
    other.write_text('{"max_gateway_upstream_cpu_ratio": 2.5}')
    assert load_bound(other) == 2.5
