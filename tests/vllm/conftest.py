"""Fixtures for the vLLM engine: fake replicas (fake_vllm.py) for placement and failure cases, and
real vLLM servers from `.venv-vllm` (built by `make vllm-venv`) on the embedded model."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.engines.base import GenerationRequest
from gateway.engines.local import LocalEngine
from gateway.settings import Settings
from salora.calibrate import calibrate
from salora.datasets import safety_messages, write_jsonl
from salora.export import export
from salora.models import resolve_model_dir
from salora.tasks.arithmetic import splits, to_messages
from salora.train import TrainOptions, train
from tests.gateway.conftest import ADMIN_KEY, gateway_model_dir, serve_app  # noqa: F401  (fixtures)
from tests.vllm.fake_vllm import FakeServer, FakeVLLM
from loadtests.servers import VLLMServer

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


def vllm_settings(state: Path, model: Path, replicas: list[FakeServer], **overrides: object) -> Settings:
    """A gateway on the vLLM engine with fake `replicas`: the adapter volume is `state/shared`, which
    they see as UPSTREAM_DIR; health checks every 0.2 s."""
    shared = state / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    for replica in replicas:
        replica.fake.mount = (UPSTREAM_DIR, shared)
    vllm = {"urls": [r.url for r in replicas], "adapter_dir": shared, "upstream_adapter_dir": UPSTREAM_DIR, "health_interval_s": 0.2,
            **overrides.pop("vllm", {})}  # type: ignore[dict-item]
    fields: dict = {"engine": "vllm", "vllm": vllm, "model": str(model), "model_name": "base", "admin_key": ADMIN_KEY,
                    "state_dir": state, **overrides}
    return Settings(**fields)


# --- real vLLM ----------------------------------------------------------------------------------


def vllm_python() -> Path:
    """The vLLM venv's interpreter; missing, the test fails (never skips) and names the make target."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `make vllm-venv` (`make test` does) to build the vLLM venv")
    return VLLM_PYTHON


def start_vllm(model_dir: Path, served_name: str, log: Path, *, max_loras: int = 4, lora: bool = True) -> VLLMServer:
    """Start (not wait for) a CPU vLLM server in float32, so its greedy output equals transformers'."""
    return VLLMServer.start(vllm_python(), model_dir, served_name, log, max_loras=max_loras, lora=lora, dtype="float32")


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded model as safetensors (vLLM cannot read its GGUF file)."""
    return resolve_model_dir("embedded")


@pytest.fixture(scope="session")
def vllm_primary(embedded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """A real vLLM server on the embedded model, started here and waited for by `vllm_up`, so that it
    boots while the SaLoRA adapter trains. Its served name differs from the gateway's model id, as it
    may in production."""
    server = start_vllm(embedded_dir, "smollm2-vllm", tmp_path_factory.mktemp("vllm-primary") / "vllm.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def salora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SaLoRA adapter for the embedded model, exported as a standard PEFT LoRA of rank 2r = 16: a
    small safety basis, three steps at a high learning rate on the arithmetic task, enough for its
    greedy answers to differ from the base model's (checked where it matters)."""
    root = tmp_path_factory.mktemp("salora-adapter")
    write_jsonl([{"messages": m} for m in safety_messages("train")[:16]], root / "safety.jsonl")
    write_jsonl([{"messages": to_messages(p)} for p in splits()["train"][:16]], root / "task.jsonl")
    calibrate("embedded", root / "safety.jsonl", root / "safety", ["q_proj", "v_proj"], 8, max_samples=16)
    train(TrainOptions(model="embedded", data=str(root / "task.jsonl"), out=str(root / "checkpoint"),
                       safety=str(root / "safety"), method="salora", rank=8, max_steps=3, batch_size=4, lr=5e-3,
                       init="task", projection="output", task_rank=8, task_samples=16, max_length=192))
    export(root / "checkpoint", root / "peft", "peft")
    return root / "peft"


@pytest.fixture(scope="session")
def vllm_up(vllm_primary: VLLMServer, salora_adapter: Path) -> VLLMServer:
    """The primary server, ready (after the adapter was trained beside its start)."""
    vllm_primary.wait_ready()
    return vllm_primary


def vllm_metric(server: VLLMServer, name: str) -> float:
    """The sum of a counter's samples in a vLLM server's /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def vllm_models(server: VLLMServer) -> set[str]:
    return {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]}


def greedy_answers(model: str, adapter_dir: Path, prompts: list[str], max_tokens: int) -> dict[str | None, list[str]]:
    """The in-process engine's greedy answers to `prompts`, with the adapter (key `adapter`) and without (None)."""

    async def run() -> dict[str | None, list[str]]:
        engine = LocalEngine(model, "local", {"adapter": adapter_dir})
        await engine.start()
        try:
            answers: dict[str | None, list[str]] = {}
            for adapter in ("adapter", None):
                answers[adapter] = []
                for prompt in prompts:
                    request = GenerationRequest([{"role": "user", "content": prompt}], adapter=adapter,
                                                max_tokens=max_tokens, temperature=0)
                    answers[adapter].append("".join([c.text async for c in engine.generate(request)]))
            return answers
        finally:
            await engine.close()

    return asyncio.run(run())
