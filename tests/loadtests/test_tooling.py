"""The load-test tooling end to end at a low rate, so CI exercises it: the fake upstream, the load
generator, the gateway in front of the upstream (vLLM engine, a tenant key, limits, metrics, judge),
the benchmark's result files and the soak's. It checks shapes and zero errors, never timings: the
machine running it may be shared."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests import bench, floor, soak
from loadtests.profile import summarize


def test_bench_writes_results_for_direct_and_gateway(tmp_path: Path) -> None:
    bench.main(["--rates", "20", "--duration", "2", "--targets", "gateway", "--streams", "5", "--stream-tokens", "3",
                "--token-delay-ms", "5", "--stream-duration", "2", "--out", str(tmp_path)])
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".md", ".png"]
    results = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {"direct", "gateway", "machine", "date", "command", "max_sustained_rps", "streams"} <= results.keys()
    assert "litellm" not in results  # not asked for
    for name in ("direct", "gateway"):
        entry = results[name]["20"]
        assert {"added_p50_ms", "added_p99_ms", "errors"} <= entry.keys()
        assert entry["errors"] == 0 and entry["run"]["ok"] == 40
        assert entry["cpu_ms_per_request"][name if name == "gateway" else "upstream"] > 0
        streams = results["streams"][name]
        assert streams["errors"] == 0 and streams["held"] and streams["ttft_ms"]["p50"] > 0
    assert results["direct"]["20"]["added_p50_ms"] == 0
    assert results["command"].startswith("python -m loadtests.bench --rates 20")
    assert "| gateway | 20 |" in next(tmp_path.glob("*.md")).read_text()


def test_soak_samples_memory_and_errors(tmp_path: Path, capsys) -> None:
    out = tmp_path / "soak.json"
    soak.main(["--minutes", "0.1", "--rate", "10", "--tokens", "3", "--token-delay-ms", "5", "--interval", "2",
               "--warmup", "0", "--out", str(out)])
    record = json.loads(out.read_text())
    assert len(record["samples"]) >= 2 and record["errors"] == 0
    assert all(s["gateway_rss_mib"] > 0 and s["ok"] > 0 for s in record["samples"])
    assert {"baseline_mib", "peak_growth", "flat"} <= record["memory"].keys()
    assert json.loads(capsys.readouterr().out)["errors"] == 0


def test_profile_summary_counts_own_and_inclusive_time() -> None:
    collapsed = ("main (app.py:1);handle (gateway/x.py:5);dumps (json/__init__.py:9) 3\n"
                 "main (app.py:1);handle (gateway/x.py:7) 1\n")
    text = summarize(collapsed)
    assert "samples: 4" in text
    assert "75.0%  dumps (json/__init__.py)" in text  # own time, line numbers merged
    assert "100.0%  gateway/x.py" in text  # by gateway file


def test_floor_runs_direct_bare_and_gateway(capsys) -> None:
    floor.main(["--rate", "20", "--duration", "1", "--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| direct", "| bare", "| gateway"]
    assert all(row.endswith(" | 0 |") for row in rows)  # no errors through either proxy
