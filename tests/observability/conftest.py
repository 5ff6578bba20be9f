"""Prometheus for the observability tests: the Debian package's `prometheus` and `promtool` (CI installs
them in .ci/run). A missing binary fails the test with the command that installs it; nothing is skipped.
Each Prometheus runs on a free local port with its own data directory, so a system instance on 9090
(if the package started one) is never touched."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

# The gateway tests' tiny model, LoRA adapters and live-server starter, reused as they are.
from tests.gateway.conftest import adapter_dirs, gateway_model_dir, serve_app  # noqa: F401

INSTALL = "apt-get update && apt-get install -y prometheus"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: install the Debian package `prometheus` ({INSTALL}); .ci/run does")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _binary("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _binary("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A running Prometheus and a small client for its HTTP API."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log
        self.http = httpx.Client(base_url=url, timeout=10)

    def api(self, path: str, **params: Any) -> Any:
        r = self.http.get(f"/api/v1/{path}", params=params)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        """An instant query evaluated at `at` (Unix seconds, millisecond precision)."""
        data = self.api("query", query=expr, time=f"{at:.3f}")
        assert data["resultType"] == "vector", f"{expr}: result type {data['resultType']}"
        return data["result"]

    def samples(self, selector: str, window_s: int = 60) -> list[tuple[float, float]]:
        """Raw samples of one series over the last `window_s` seconds: [(timestamp, value)]."""
        data = self.api("query", query=f"{selector}[{window_s}s]", time=f"{time.time():.3f}")
        series = data["result"]
        assert len(series) <= 1, f"{selector} selects {len(series)} series"
        return [(float(t), float(v)) for t, v in series[0]["values"]] if series else []

    def tail_log(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


@contextmanager
def run_prometheus(binary: str, config: dict, workdir: Path) -> Iterator[Prometheus]:
    """Start Prometheus with `config` (a dict written as YAML) and wait until it is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited with {process.returncode}:\n{prom.tail_log()}")
            try:
                if prom.http.get("/-/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready after 60 s:\n{prom.tail_log()}")
            time.sleep(0.2)
        yield prom
    finally:
        prom.http.close()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
