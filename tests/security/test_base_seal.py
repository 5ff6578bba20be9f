"""The shared base weights after adapter loads, compared bit for bit.

Each initialisation PEFT offers that reads or rewrites the base (`pissa`, `olora`, `corda`, `eva`,
`loftq`, ...) is written into an adapter's config as an attacker would, and loaded straight into the
local engine, past the upload's validation. Whatever PEFT does with it, the base the engine serves
from afterwards is the one it loaded, or the engine has stopped serving: never a changed base that
answers every tenant. Then the same adapter through validation: refused, or loaded from the
canonical config with the base unchanged."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from gateway.adapters.errors import AdapterRejected
from gateway.adapters.validation import inspect_base, validate
from gateway.engines.base import EngineError, GenerationRequest
from gateway.engines.local import LocalEngine
from tests.lifecycle.conftest import make_lora

INITS = ["pissa", "pissa_niter_2", "olora", "corda", "eva", "loftq", "orthogonal", "lora_ga", "mica", "gaussian",
         True, False]


def base_weights(engine: LocalEngine) -> dict[str, torch.Tensor]:
    """The base's weights by their unwrapped names, copied."""
    model = engine._model
    return {name.removeprefix("base_model.model.").replace(".base_layer.", "."): tensor.detach().clone()
            for name, tensor in model.state_dict().items() if "lora_" not in name}


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


@pytest.fixture(scope="module")
def lora(gateway_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(gateway_model_dir, tmp_path_factory.mktemp("seal-lora"), std=0.2, rank=4,
                     targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def crafted(lora: Path, out: Path, init: object) -> Path:
    shutil.copytree(lora, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("init", INITS, ids=str)
def test_a_load_never_leaves_a_changed_base_serving(gateway_model_dir, lora, tmp_path, init):
    async def scenario() -> tuple[dict, dict, bool, str | None]:
        engine = LocalEngine(str(gateway_model_dir), "tiny")
        await engine.start()
        try:
            before = base_weights(engine)
            error = None
            try:
                await engine.load_adapter("crafted", crafted(lora, tmp_path / "crafted", init))
            except Exception as e:  # PEFT refusing the config, or the seal stopping the engine
                error = f"{type(e).__name__}: {e}"
            ready = engine.ready
            if ready:  # still serving: it must serve from the same base, and answer
                request = GenerationRequest([{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
                assert [c async for c in engine.generate(request)][-1].finish_reason
            return before, base_weights(engine), ready, error
        finally:
            await engine.close()

    before, after, ready, error = asyncio.run(scenario())
    if ready:
        assert bitwise_equal(before, after), f"init {init!r}: the engine serves a changed base ({error})"
    else:
        assert error is not None and "changed" in error and "base weights" in error, error
    if init in ("pissa", "pissa_niter_2", "olora"):  # these always rewrite the base: the seal must see it
        assert not ready


@pytest.mark.parametrize("init", INITS, ids=str)
def test_through_validation_the_base_is_unchanged(gateway_model_dir, lora, tmp_path, init):
    work = tmp_path / "work"
    work.mkdir()
    try:
        _, staged = validate(crafted(lora, tmp_path / "upload", init), work, inspect_base("tiny", gateway_model_dir), 64)
    except AdapterRejected as e:
        assert init not in (True, False, "gaussian") and e.status == 422 and e.param == "init_lora_weights"
        return
    assert init in (True, False, "gaussian")
    assert json.loads((staged / "adapter_config.json").read_text())["init_lora_weights"] is True

    async def scenario() -> tuple[dict, dict, bool]:
        engine = LocalEngine(str(gateway_model_dir), "tiny")
        await engine.start()
        try:
            before = base_weights(engine)
            await engine.load_adapter("canonical", staged)
            after = base_weights(engine)
            return before, after, engine.ready
        finally:
            await engine.close()

    before, after, ready = asyncio.run(scenario())
    assert ready and bitwise_equal(before, after)


def test_the_seal_stops_the_engine_and_fails_its_rows(gateway_model_dir, lora, tmp_path):
    """A request after a load that changed the base gets an error, not an answer from that base."""
    async def scenario() -> Exception:
        engine = LocalEngine(str(gateway_model_dir), "tiny")
        await engine.start()
        try:
            with pytest.raises(EngineError) as e:
                await engine.load_adapter("crafted", crafted(lora, tmp_path / "pissa", "pissa"))
            assert e.value.kind == "base_changed" and not engine.ready and "restart" in (engine.error or "")
            with pytest.raises(EngineError) as after:
                request = GenerationRequest([{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
                [c async for c in engine.generate(request)]
            return after.value
        finally:
            await engine.close()

    assert "changed" in str(asyncio.run(scenario()))
