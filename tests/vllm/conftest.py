"""Fixtures for the vLLM engine: fake replicas (fake_vllm.py) for placement and failure cases, and
real vLLM servers from `.venv-vllm` (built by `make vllm-venv`) on the embedded model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.settings import Settings
from tests.gateway.conftest import ADMIN_KEY, gateway_model_dir, serve_app  # noqa: F401  (fixtures)
from tests.vllm.fake_vllm import FakeServer, FakeVLLM

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("SALORA_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
UPSTREAM_DIR = "/vllm/adapters"  # where the fake replicas "mount" the adapter volume


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeServer]]:
    """Starts fake vLLM replicas; all stop when the test ends."""
    started: list[FakeServer] = []

    def start(fake: FakeVLLM | None = None) -> FakeServer:
        server = FakeServer(fake or FakeVLLM()).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def vllm_settings(state: Path, model: Path, urls: list[str], **overrides: object) -> Settings:
    """A gateway on the vLLM engine: the adapter volume is `state/shared`, which the fake replicas
    see as UPSTREAM_DIR; health checks every 0.2 s."""
    shared = state / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    vllm = {"urls": urls, "adapter_dir": shared, "upstream_adapter_dir": UPSTREAM_DIR, "health_interval_s": 0.2,
            **overrides.pop("vllm", {})}  # type: ignore[dict-item]
    fields: dict = {"engine": "vllm", "vllm": vllm, "model": str(model), "model_name": "base", "admin_key": ADMIN_KEY,
                    "state_dir": state, **overrides}
    return Settings(**fields)


# --- real vLLM ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMServer:
    """A real `vllm.entrypoints.openai.api_server` process (and its engine children, in their own
    process group) on a free port."""

    process: subprocess.Popen
    url: str
    log: Path

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"vLLM exited; log tail:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"vLLM not ready in {timeout} s; log tail:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL the server's process group at once (a crashed replica)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def vllm_python() -> Path:
    """The vLLM venv's interpreter; missing, the test fails (never skips) and names the make target."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `make vllm-venv` (`make test` does) to build the vLLM venv")
    return VLLM_PYTHON


def start_vllm(model_dir: Path, served_name: str, log: Path, *, max_loras: int = 4, lora: bool = True) -> VLLMServer:
    """Start (not wait for) a CPU vLLM server in float32, so its greedy output equals transformers'."""
    port = free_port()
    argv = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", served_name, "--dtype", "float32", "--max-model-len", "2048",
            "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats"]
    if lora:
        argv += ["--enable-lora", "--max-lora-rank", "64", "--max-loras", str(max_loras)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return VLLMServer(process, f"http://127.0.0.1:{port}", log)
