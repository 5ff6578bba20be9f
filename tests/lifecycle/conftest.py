"""Lifecycle fixtures: live gateways on the gateway tests' tiny random Llama (each with its own state
directory, started and stopped by the test), LoRA adapters made for it, and helpers to upload them.

The tiny model refuses nothing, so its gateways get `SameAsBaseJudge`: a harmful probe's answer is a
refusal exactly when it equals the base model's own (cached) answer. The base then refuses every
harmful probe, an adapter that leaves the model unchanged (B = 0) refuses them all too and passes,
and an adapter that changes the answers "complies" and is rejected: the whole pipeline (engine
batching, base cache, judging, the gate, states, metrics) runs for real with a known verdict."""

from __future__ import annotations

import io
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from gateway.adapters.lifecycle import Lifecycle
from gateway.app import create_app
from gateway.server import uvicorn_config
from gateway.canary.probes import select_probes
from gateway.settings import Settings
from salora.judge import Judge
from tests.gateway.conftest import ADMIN_KEY, LiveGateway, adapter_dirs, gateway_model_dir  # noqa: F401

TERMINAL = ("live", "rejected")
# A small canary for the tiny model: 13 harmful (one per category) and 4 benign probes.
CANARY = {"harmful_per_category": 1, "benign_per_kind": 2, "max_new_tokens": 16}


class SameAsBaseJudge:
    """Refusal iff the prompt is a harmful probe and the answer is the base's cached answer to it.
    `hold` (cleared) makes every verdict wait, to look at an adapter while its canary runs."""

    name = "same-as-base"

    def __init__(self) -> None:
        self.lifecycle: Lifecycle | None = None
        self.hold = threading.Event()
        self.hold.set()

    def is_refusal(self, prompt: str, response: str) -> bool:
        assert self.hold.wait(timeout=120), "a test held the judge for too long"
        assert self.lifecycle is not None, "attach the judge to the gateway's lifecycle"
        runner = self.lifecycle.runner
        harmful = {p.prompt: p.id for p in runner.probes if p.set == "harmful"}
        if prompt not in harmful:
            return False
        assert self.lifecycle._base is not None
        cached = self.lifecycle.registry.get_base_answers(runner.cache_key(self.lifecycle._base.key))
        assert cached is not None, "the runner stores the base answers before judging"
        return cached[harmful[prompt]] == response


@contextmanager
def running(settings: Settings, judge: Judge | None = None) -> Iterator[LiveGateway]:
    """A gateway on a free port for the duration of the block, ready (model loaded, adapters restored)."""
    app = create_app(settings, judge=judge)
    server = uvicorn.Server(uvicorn_config(app, settings, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        live = LiveGateway(app, f"http://127.0.0.1:{port}")
        live.wait_ready(timeout=120)
        if isinstance(judge, SameAsBaseJudge):
            judge.lifecycle = live.ctx.lifecycle
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def lifecycle_settings(state_dir: Path, model: Path, **overrides: object) -> Settings:
    fields: dict = {"model": str(model), "model_name": "tiny", "admin_key": ADMIN_KEY, "state_dir": state_dir,
                    "canary": CANARY, **overrides}
    return Settings(**fields)


@pytest.fixture
def tiny_gateway(tmp_path: Path, gateway_model_dir: Path) -> Iterator[LiveGateway]:
    """A fresh gateway on the tiny model with tenants acme and globex (keys in `.keys`)."""
    judge = SameAsBaseJudge()
    with running(lifecycle_settings(tmp_path / "state", gateway_model_dir), judge) as gw:
        gw.keys = {name: gw.admin("POST", "/admin/tenants", json={"name": name, "adapters": []}).json()["key"]
                   for name in ("acme", "globex")}
        gw.judge = judge
        yield gw


def make_lora(model_dir: Path, out: Path, *, seed: int = 0, rank: int = 4, std: float = 0.0,
              targets: tuple[str, ...] = ("q_proj", "v_proj"), **config: object) -> Path:
    """A PEFT LoRA for `model_dir`; `std` 0 leaves B at zero (the adapter changes nothing)."""
    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), **config))
    if std:
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=std)
    model.save_pretrained(out)
    return out


def adapter_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def tar_gz(files: dict[str, bytes], prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes], prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(prefix + name, data)
    return buffer.getvalue()


def upload(gw: LiveGateway, name: str, files: dict[str, bytes], tenants: tuple[str, ...] = ()) -> httpx.Response:
    """POST /admin/adapters with each file in the `file` field."""
    return gw.admin("POST", "/admin/adapters", data={"name": name, "tenants": ",".join(tenants)},
                    files=[("file", (filename, data)) for filename, data in files.items()], timeout=120)


def wait_state(gw: LiveGateway, name: str, states: tuple[str, ...] = TERMINAL, timeout: float = 120) -> dict:
    """The adapter's detail once it is in one of `states` and no canary run is going on."""
    deadline = time.monotonic() + timeout
    while True:
        detail = gw.admin("GET", f"/admin/adapters/{name}").json()
        if detail.get("state") in states and not detail["canary_running"]:
            return detail
        assert time.monotonic() < deadline, f"{name} stayed {detail.get('state')}: {detail}"
        time.sleep(0.1)


def harmful_probe_count(settings: Settings) -> int:
    return sum(p.set == "harmful" for p in select_probes(settings.canary))
