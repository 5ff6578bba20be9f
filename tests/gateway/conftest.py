"""Gateway fixtures: a tiny random Llama with SmolLM2's tokenizer, two LoRA adapters on it, and live
gateways on free ports driven over real HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from openai import OpenAI
from openai.types.chat import ChatCompletion
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from gateway.app import create_app
from gateway.server import uvicorn_config
from gateway.context import Context
from gateway.settings import Settings
from salora.judge import Judge

ADMIN_KEY = "admin-test-key"
ADAPTERS = ("alpha", "beta")


@pytest.fixture(scope="session")
def gateway_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer: PreTrainedTokenizerBase) -> Path:
    """A 2-layer random Llama. Wider initial weights than the shared tiny model give peaked,
    prompt-dependent logits: varied greedy text whose argmax is far above float reordering noise."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        initializer_range=0.2, bos_token_id=smollm_tokenizer.bos_token_id, eos_token_id=smollm_tokenizer.eos_token_id,
        pad_token_id=smollm_tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("gateway-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    smollm_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, gateway_model_dir: Path) -> dict[str, Path]:
    """LoRA adapters with random non-zero B, so each changes the model's answers."""
    dirs = {}
    for seed, name in enumerate(ADAPTERS, start=1):
        torch.manual_seed(seed)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(gateway_model_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                torch.nn.init.normal_(param, std=0.3)
        dirs[name] = tmp_path_factory.mktemp(f"adapter-{name}")
        model.save_pretrained(dirs[name])
    return dirs


@dataclass
class LiveGateway:
    """A gateway served by uvicorn on a free port in a background thread."""

    app: FastAPI
    url: str

    @property
    def ctx(self) -> Context:
        return self.app.state.context

    def client(self, key: str, **kwargs: object) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)

    def admin(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """httpx's 5 s default timed out a first tenant write on a loaded 2-core machine: 30 s here."""
        kwargs.setdefault("timeout", 30)
        return httpx.request(method, f"{self.url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)

    def chat(self, key: str, model: str, prompt: str, **kwargs: object) -> ChatCompletion:
        """One chat call through the official client; greedy unless kwargs say otherwise."""
        kwargs.setdefault("temperature", 0)
        return self.client(key).chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], **kwargs)

    def metrics(self) -> str:
        return self.admin("GET", "/metrics").text

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll /readyz until it is 200; a poll that times out (a loaded machine, a start-up that holds
        the event loop for a moment) counts as not ready yet, not as a failure."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=10)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.TimeoutException as e:
                last = f"/readyz did not answer: {e!r}"
            assert time.monotonic() < deadline, last
            time.sleep(0.05)


@pytest.fixture(scope="session")
def serve_app() -> Iterator:
    """A function that serves a Settings (and optional judge) live; everything stops at session end."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(settings: Settings, judge: Judge | None = None) -> LiveGateway:
        app = create_app(settings, judge=judge)
        server = uvicorn.Server(uvicorn_config(app, settings, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)
        servers.append((server, thread))
        port = server.servers[0].sockets[0].getsockname()[1]
        return LiveGateway(app, f"http://127.0.0.1:{port}")

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=30)


def gateway_settings(tmp: Path, model: Path, adapters: dict[str, Path], **overrides: object) -> Settings:
    fields: dict = {"model": str(model), "model_name": "tiny", "adapters": adapters, "admin_key": ADMIN_KEY,
                    "state_dir": tmp, **overrides}
    return Settings(**fields)


class RecordingJudge:
    """The keyword judge's contract, deciding by a marker in the prompt so tests know the verdict in
    advance; it records what it was shown and when, to check that it sees each full answer after
    the response has been sent."""

    name = "recording"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, float]] = []

    def is_refusal(self, prompt: str, response: str) -> bool:
        if "[slow judge]" in prompt:
            time.sleep(1.0)
        self.seen.append((prompt, response, time.monotonic()))
        return "[refuse]" in prompt


@pytest.fixture(scope="session")
def judge() -> RecordingJudge:
    return RecordingJudge()


@pytest.fixture(scope="session")
def gw(serve_app, tmp_path_factory, gateway_model_dir, adapter_dirs, judge) -> LiveGateway:
    """The main gateway: admin key, two adapters, small limits and a 2-second rate window."""
    settings = gateway_settings(
        tmp_path_factory.mktemp("gateway-state"), gateway_model_dir, adapter_dirs,
        limits={"max_body_bytes": 20_000, "max_tokens": 512, "default_max_tokens": 16}, rate_window_s=2.0,
    )
    live = serve_app(settings, judge)
    live.wait_ready()
    return live


@pytest.fixture(scope="session")
def keys(gw: LiveGateway) -> dict[str, str]:
    """Tenants created through the admin API: acme may call alpha, globex beta, root everything,
    metered anything but at 2 requests per (2-second) minute."""
    specs = {
        "acme": {"adapters": ["alpha"]},
        "globex": {"adapters": ["beta"]},
        "root": {"adapters": ["*"]},
        "metered": {"adapters": ["*"], "rpm": 2},
    }
    keys = {}
    for name, spec in specs.items():
        response = gw.admin("POST", "/admin/tenants", json={"name": name, **spec})
        assert response.status_code == 201, response.text
        keys[name] = response.json()["key"]
    return keys
