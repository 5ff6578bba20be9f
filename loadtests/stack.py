"""The processes a load test runs against: the fake upstream, the gateway in front of it (`salora
serve` with a YAML config), and LiteLLM's proxy in front of the same upstream. Each is a child
process in its own session, stopped by its own id; each binds 127.0.0.1 on a free port."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml

from loadtests.upstream import MODEL

ROOT = Path(__file__).resolve().parents[1]
TENANT_KEY = "sk-salora-loadtest"  # the bench tenant's key; only its SHA-256 goes into the config
LITELLM_KEY = "sk-litellm-loadtest"
HIGH_LIMIT = 1_000_000_000  # rpm and tpm: the limiter runs on every request but never refuses
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "True",
               "NO_DOCS": "True"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def litellm_command() -> str | None:
    """LiteLLM's `litellm` command: $LITELLM_BIN, else the repo's `.venv-litellm`, else PATH."""
    for candidate in (os.environ.get("LITELLM_BIN"), str(ROOT / ".venv-litellm" / "bin" / "litellm")):
        if candidate and Path(candidate).is_file():
            return candidate
    return shutil.which("litellm")


@dataclass
class Service:
    """A running child process serving HTTP at `url`; `model` and `key` are what clients send."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    model: str
    key: str | None
    log: Path

    def process(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its children so far."""
        try:
            proc = self.process()
            procs = [proc, *proc.children(recursive=True)]
            return sum(sum(p.cpu_times()[:2]) for p in procs)
        except psutil.NoSuchProcess:
            return 0.0

    def rss_bytes(self) -> int:
        proc = self.process()
        return sum(p.memory_info().rss for p in (proc, *proc.children(recursive=True)))

    def wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {timeout_s:.0f} s; see {self.log}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to the child's own process group (its id), then SIGKILL after 15 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    return proc, log


def start_upstream(stack: ExitStack, workdir: Path, tokens: int = 16) -> Service:
    port = free_port()
    proc, log = _spawn("upstream", [sys.executable, "-m", "loadtests.upstream", "--port", str(port),
                                    "--tokens", str(tokens)], workdir, {"PYTHONPATH": str(ROOT)})
    service = Service("upstream", proc, f"http://127.0.0.1:{port}", MODEL, None, log)
    stack.callback(service.stop)
    service.wait_ready("/health", 30)
    return service


def gateway_config(upstream: Service, workdir: Path, port: int, max_streams: int | None = None) -> dict[str, object]:
    """`salora serve` on the OpenAI-compatible (vLLM) engine pointed at the fake upstream, with one
    tenant whose limits are high enough never to refuse: auth, limiter, metrics and judge all run.
    `max_streams`: the tenant's cap on open streams (`limits.max_concurrent_streams`), so that a
    run holding N streams is not refused by the default cap (16); None keeps the default."""
    config: dict[str, object] = {
        "host": "127.0.0.1", "port": port, "engine": "vllm", "model_name": upstream.model,
        "vllm": {"urls": [upstream.url]},
        "state_dir": str(workdir / "gateway-state"),
        "tenants": [{"name": "loadtest", "key_sha256": hashlib.sha256(TENANT_KEY.encode()).hexdigest(),
                     "adapters": ["*"], "rpm": HIGH_LIMIT, "tpm": HIGH_LIMIT}],
    }
    if max_streams is not None:
        config["limits"] = {"max_concurrent_streams": max_streams}
    return config


def start_gateway(stack: ExitStack, workdir: Path, upstream: Service, max_streams: int | None = None,
                  source: Path = ROOT, name: str = "gateway") -> Service:
    """`salora serve` from the code in `source` (default: this checkout; an A/B run passes another)."""
    port = free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(gateway_config(upstream, workdir, port, max_streams)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALORA_") or k == "SALORA_HOME"}
    proc, log = _spawn(name, [sys.executable, "-m", "salora_cli", "serve", "--config", str(config)], workdir,
                       {**env, "PYTHONPATH": str(source)})
    service = Service(name, proc, f"http://127.0.0.1:{port}", upstream.model, TENANT_KEY, log)
    stack.callback(service.stop)
    service.wait_ready("/readyz", 120)
    return service


def start_litellm(stack: ExitStack, workdir: Path, upstream: Service, command: str) -> Service:
    """LiteLLM's proxy, one worker like the gateway, no database, the same upstream as `openai/<model>`."""
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(yaml.safe_dump({
        "model_list": [{"model_name": upstream.model, "litellm_params": {
            "model": f"openai/{upstream.model}", "api_base": f"{upstream.url}/v1", "api_key": "unused"}}],
        "general_settings": {"master_key": LITELLM_KEY},
    }))
    proc, log = _spawn("litellm", [command, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                                   "--num_workers", "1"], workdir, LITELLM_ENV)
    service = Service("litellm", proc, f"http://127.0.0.1:{port}", upstream.model, LITELLM_KEY, log)
    stack.callback(service.stop)
    service.wait_ready("/health/liveliness", 180)
    return service
