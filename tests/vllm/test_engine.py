"""The vLLM engine against fake replicas (fake_vllm.py): adapter placement and eviction, failover,
retries, the shared-volume check and staging. Each test drives the engine directly in one event loop."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.engines.base import Chunk, EngineError, GenerationRequest, RequestRejected
from gateway.engines.vllm import PROBE, VLLMEngine
from gateway.settings import VLLMConfig
from tests.gateway.conftest import adapter_dirs  # noqa: F401  (fixture)
from tests.vllm.conftest import UPSTREAM_DIR
from tests.vllm.fake_vllm import FakeServer, FakeVLLM

Fakes = Callable[..., FakeServer]


def make_engine(tmp: Path, model: Path, servers: list[FakeServer], errors: list[str] | None = None,
                **config: object) -> VLLMEngine:
    shared = tmp / "shared"
    shared.mkdir(exist_ok=True)
    for server in servers:
        server.fake.mount = server.fake.mount or (UPSTREAM_DIR, shared)
    config = {"health_interval_s": 0.1, **config}
    cfg = VLLMConfig(urls=[s.url for s in servers], adapter_dir=shared, upstream_adapter_dir=UPSTREAM_DIR,
                     **config)  # type: ignore[arg-type]
    return VLLMEngine("vllm", cfg, "base", probe_model=str(model),
                      on_error=errors.append if errors is not None else None)


def ops(names: list[str]) -> list[str]:
    """Adapter loads or unloads on a fake replica, less the engine's volume probe."""
    return [n for n in names if n != PROBE]


def run(engine: VLLMEngine, body: Callable[[VLLMEngine], Awaitable[None]]) -> None:
    """Start the engine, run `body` with it, close it, all in one event loop."""

    async def main() -> None:
        await asyncio.wait_for(engine.start(), 20)
        try:
            await body(engine)
        finally:
            await engine.close()

    asyncio.run(main())


async def ask(engine: VLLMEngine, prompt: str, adapter: str | None = None, stream: bool = False,
              max_tokens: int = 32) -> tuple[str, Chunk]:
    chunks = [c async for c in engine.generate(GenerationRequest([{"role": "user", "content": prompt}], adapter=adapter,
                                                                 max_tokens=max_tokens, stream=stream))]
    return "".join(c.text for c in chunks), chunks[-1]


def test_streamed_and_whole_answers_carry_usage(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path) -> None:
    replica = fakes()

    async def body(engine: VLLMEngine) -> None:
        for stream in (False, True):
            text, last = await ask(engine, "hello there", stream=stream)
            assert (text, last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("[base] hello there", "stop", 2, 3)
        text, last = await ask(engine, "hello there", stream=True, max_tokens=2)
        assert (text, last.finish_reason) == ("[base] hello", "length")
        with pytest.raises(RequestRejected) as e:
            await ask(engine, "too long", max_tokens=1000)
        assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"

    run(make_engine(tmp_path, gateway_model_dir, [replica]), body)
    assert replica.fake.served["base"] == 3


def test_requests_go_to_the_replica_holding_their_adapter(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path,
                                                          adapter_dirs: dict[str, Path]) -> None:
    one, two = fakes(), fakes()

    async def body(engine: VLLMEngine) -> None:
        await engine.load_adapter("alpha", adapter_dirs["alpha"])
        await engine.load_adapter("beta", adapter_dirs["beta"])  # one slot each: beta goes to the other replica
        assert engine.adapters() == {"alpha", "beta"}
        for _ in range(3):
            assert (await ask(engine, "hi", "alpha"))[0] == "[alpha] hi"
            assert (await ask(engine, "hi", "beta", stream=True))[0] == "[beta] hi"

    run(make_engine(tmp_path, gateway_model_dir, [one, two], max_loras=1), body)
    holder_alpha, holder_beta = (one, two) if "alpha" in one.fake.adapters else (two, one)
    assert set(holder_alpha.fake.adapters) == {"alpha"} and set(holder_beta.fake.adapters) == {"beta"}
    assert holder_alpha.fake.served == {"alpha": 3} and holder_beta.fake.served == {"beta": 3}


def test_least_recently_used_idle_adapter_is_evicted_at_max_loras(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path,
                                                                  adapter_dirs: dict[str, Path]) -> None:
    replica = fakes()

    async def body(engine: VLLMEngine) -> None:
        await engine.load_adapter("alpha", adapter_dirs["alpha"])
        await engine.load_adapter("beta", adapter_dirs["beta"])
        await ask(engine, "hi", "alpha")  # beta is now the least recently used
        await engine.load_adapter("gamma", adapter_dirs["alpha"])
        assert set(replica.fake.adapters) == {"alpha", "gamma"} and ops(replica.fake.unloads) == ["beta"]
        assert (await ask(engine, "hi", "beta"))[0] == "[beta] hi"  # loaded again, evicting alpha
        assert set(replica.fake.adapters) == {"gamma", "beta"} and ops(replica.fake.unloads) == ["beta", "alpha"]

    run(make_engine(tmp_path, gateway_model_dir, [replica], max_loras=2), body)


def test_an_adapter_in_use_is_never_evicted(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path,
                                            adapter_dirs: dict[str, Path]) -> None:
    replica = fakes()
    replica.fake.hold.clear()

    async def body(engine: VLLMEngine) -> None:
        await engine.load_adapter("alpha", adapter_dirs["alpha"])
        held = asyncio.create_task(ask(engine, "wait [hold]", "alpha", stream=True))
        while not replica.fake.started["alpha"]:
            await asyncio.sleep(0.01)
        await engine.load_adapter("beta", adapter_dirs["beta"])  # full, and alpha is busy: both stay (vLLM queues)
        assert set(replica.fake.adapters) == {"alpha", "beta"} and ops(replica.fake.unloads) == []
        replica.fake.hold.set()
        assert (await held)[0] == "[alpha] wait [hold]"

    run(make_engine(tmp_path, gateway_model_dir, [replica], max_loras=1), body)


def test_a_dead_replica_is_skipped_and_its_adapters_reloaded_elsewhere(fakes: Fakes, tmp_path: Path,
                                                                     gateway_model_dir: Path,
                                                                     adapter_dirs: dict[str, Path]) -> None:
    one, two = fakes(), fakes()
    errors: list[str] = []

    async def body(engine: VLLMEngine) -> None:
        await engine.load_adapter("alpha", adapter_dirs["alpha"])
        holder, other = (one, two) if "alpha" in one.fake.adapters else (two, one)
        await asyncio.to_thread(holder.stop)
        # no health check runs in this test: the first request finds the replica gone and fails over
        for stream in (False, True, False):
            assert (await ask(engine, "hi", "alpha", stream=stream))[0] == "[alpha] hi"
            assert (await ask(engine, "hi", stream=stream))[0] == "[base] hi"
        assert other.fake.served == {"alpha": 3, "base": 3} and set(other.fake.adapters) == {"alpha"}
        assert errors == ["replica_down", "retry"]

    run(make_engine(tmp_path, gateway_model_dir, [one, two], errors=errors, health_interval_s=3600), body)


def test_a_replica_that_comes_back_is_used_again(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path) -> None:
    one, two = fakes(), fakes()

    async def body(engine: VLLMEngine) -> None:
        await asyncio.to_thread(one.stop)
        while engine._replicas[0].up:
            await asyncio.sleep(0.02)
        assert (await ask(engine, "hi"))[0] == "[base] hi"
        await asyncio.to_thread(one.start)  # the same port, like a restarted vLLM
        while not engine._replicas[0].up:
            await asyncio.sleep(0.02)
        assert (await ask(engine, "hi"))[0] == "[base] hi"  # both idle: the first replica

    run(make_engine(tmp_path, gateway_model_dir, [one, two]), body)
    assert one.fake.served == {"base": 1} and two.fake.served == {"base": 1}


def test_server_errors_are_retried_on_another_replica(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path) -> None:
    one, two = fakes(), fakes()
    one.fake.fail_chat = [500]
    errors: list[str] = []

    async def body(engine: VLLMEngine) -> None:
        assert (await ask(engine, "hi"))[0] == "[base] hi"
        two.fake.fail_chat = [503]
        one.fake.fail_chat = [502]
        with pytest.raises(EngineError) as e:
            await ask(engine, "hi")
        assert "502 injected failure" in str(e.value) and "503 injected failure" in str(e.value)

    run(make_engine(tmp_path, gateway_model_dir, [one, two], errors=errors), body)
    assert one.fake.served == {} and two.fake.served == {"base": 1} and errors.count("retry") == 3


def test_an_adapter_lost_by_a_restarted_replica_is_loaded_again(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path,
                                                                adapter_dirs: dict[str, Path]) -> None:
    replica = fakes()

    async def body(engine: VLLMEngine) -> None:
        await engine.load_adapter("alpha", adapter_dirs["alpha"])
        replica.fake.adapters.clear()  # restarted between two health checks
        assert (await ask(engine, "hi", "alpha", stream=True))[0] == "[alpha] hi"

    run(make_engine(tmp_path, gateway_model_dir, [replica]), body)
    assert ops(replica.fake.loads) == ["alpha", "alpha"]


def test_unload_waits_for_requests_in_flight_then_unloads(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path,
                                                          adapter_dirs: dict[str, Path]) -> None:
    replica = fakes()
    replica.fake.hold.clear()

    async def body(engine: VLLMEngine) -> None:
        await engine.load_adapter("alpha", adapter_dirs["alpha"])
        held = asyncio.create_task(ask(engine, "wait [hold]", "alpha"))
        while not replica.fake.started["alpha"]:
            await asyncio.sleep(0.01)
        unloading = asyncio.create_task(engine.unload_adapter("alpha"))
        await asyncio.sleep(0.3)
        assert "alpha" not in engine.adapters() and not unloading.done() and ops(replica.fake.unloads) == []
        with pytest.raises(EngineError, match="not loaded"):
            await ask(engine, "hi", "alpha")
        replica.fake.hold.set()
        assert (await held)[0] == "[alpha] wait [hold]"
        await unloading
        assert ops(replica.fake.unloads) == ["alpha"] and replica.fake.adapters == {}

    run(make_engine(tmp_path, gateway_model_dir, [replica]), body)


def test_no_replica_up_names_each_one(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path) -> None:
    one, two = fakes(), fakes()

    async def body(engine: VLLMEngine) -> None:
        await asyncio.to_thread(one.stop)
        await asyncio.to_thread(two.stop)
        with pytest.raises(EngineError) as e:
            await ask(engine, "hi")
        assert one.url in str(e.value) and two.url in str(e.value)
        while engine.ready:
            await asyncio.sleep(0.05)

    run(make_engine(tmp_path, gateway_model_dir, [one, two]), body)


def test_adapters_are_staged_on_the_shared_volume(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path,
                                                  adapter_dirs: dict[str, Path]) -> None:
    replica = fakes()
    shared = tmp_path / "shared"
    shared.mkdir()
    inside = shutil.copytree(adapter_dirs["beta"], shared / "uploads" / "beta")

    async def body(engine: VLLMEngine) -> None:
        await engine.load_adapter("alpha", adapter_dirs["alpha"])  # elsewhere: copied onto the volume
        await engine.load_adapter("beta", inside)  # on the volume already: used where it is
        with pytest.raises(ValueError, match="already loaded"):
            await engine.load_adapter("beta", inside)

    run(make_engine(tmp_path, gateway_model_dir, [replica]), body)
    alpha = replica.fake.adapters["alpha"]
    assert alpha.startswith(f"{UPSTREAM_DIR}/alpha-") and replica.fake.adapters["beta"] == f"{UPSTREAM_DIR}/uploads/beta"
    staged = shared / alpha.removeprefix(UPSTREAM_DIR + "/")
    for f in adapter_dirs["alpha"].iterdir():
        assert (staged / f.name).read_bytes() == f.read_bytes()


def test_a_replica_that_cannot_read_the_volume_is_named(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path,
                                                        adapter_dirs: dict[str, Path]) -> None:
    blind = fakes(FakeVLLM(mount=("/elsewhere", tmp_path)))

    async def body(engine: VLLMEngine) -> None:
        assert (await ask(engine, "hi"))[0] == "[base] hi"  # the base model still serves
        with pytest.raises(EngineError) as e:
            await engine.load_adapter("alpha", adapter_dirs["alpha"])
        message = str(e.value)
        assert "cannot read /vllm/adapters/salora-volume-probe-" in message and "docs/vllm.md" in message
        assert engine.adapters() == frozenset()

    run(make_engine(tmp_path, gateway_model_dir, [blind]), body)
    assert ops(blind.fake.loads) == []


def test_a_replica_without_runtime_lora_loading_is_named(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path,
                                                         adapter_dirs: dict[str, Path]) -> None:
    plain = fakes(FakeVLLM(lora=False))

    async def body(engine: VLLMEngine) -> None:
        with pytest.raises(EngineError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            await engine.load_adapter("alpha", adapter_dirs["alpha"])

    run(make_engine(tmp_path, gateway_model_dir, [plain]), body)


def test_the_probe_proves_the_volume_and_leaves_nothing_loaded(fakes: Fakes, tmp_path: Path,
                                                               gateway_model_dir: Path) -> None:
    replica = fakes()

    async def body(engine: VLLMEngine) -> None:
        assert replica.fake.loads == [PROBE] and replica.fake.unloads == [PROBE]

    run(make_engine(tmp_path, gateway_model_dir, [replica]), body)
    (probe,) = (tmp_path / "shared").glob("salora-volume-probe-*")
    config = json.loads((probe / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["target_modules"] == ["q_proj"]


def test_a_missing_adapter_dir_stops_the_start(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path) -> None:
    cfg = VLLMConfig(urls=[fakes().url], adapter_dir=tmp_path / "not-mounted")
    engine = VLLMEngine("vllm", cfg, "base", probe_model=str(gateway_model_dir))
    with pytest.raises(EngineError, match="mount the adapter volume"):
        asyncio.run(engine.start())
    assert "not-mounted" in (engine.error or "")


def test_an_adapter_vllm_rejects_is_not_registered(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path,
                                                   adapter_dirs: dict[str, Path]) -> None:
    replica = fakes(FakeVLLM(max_lora_rank=2))  # the adapters have rank 4

    async def body(engine: VLLMEngine) -> None:
        with pytest.raises(RequestRejected, match="over the limit 2") as e:
            await engine.load_adapter("alpha", adapter_dirs["alpha"])
        assert e.value.code == "invalid_adapter" and engine.adapters() == frozenset()

    run(make_engine(tmp_path, gateway_model_dir, [replica]), body)


def test_an_adapter_a_replica_already_holds_is_loaded_again_from_our_files(
        fakes: Fakes, tmp_path: Path, gateway_model_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    replica = fakes()
    replica.fake.adapters["alpha"] = "/elsewhere/old-alpha"  # loaded before this gateway started

    async def body(engine: VLLMEngine) -> None:
        await engine.load_adapter("alpha", adapter_dirs["alpha"])
        assert replica.fake.adapters["alpha"].startswith(f"{UPSTREAM_DIR}/alpha-")
        assert (await ask(engine, "hi", "alpha"))[0] == "[alpha] hi"

    run(make_engine(tmp_path, gateway_model_dir, [replica]), body)
    assert ops(replica.fake.loads) == ["alpha"]


def test_two_gateways_agree_on_placement_and_do_not_evict_each_others_adapters(
        fakes: Fakes, tmp_path: Path, gateway_model_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    """Two gateways (two engines, as two replicas of the gateway have) on the same three vLLM
    replicas with two slots each: every adapter goes live on both (as promotion and the replicas'
    sync do), then both serve all of them. Each adapter is loaded once in the whole system, on the
    replica rendezvous hashing gives it, and nothing is evicted."""
    servers = [fakes(), fakes(), fakes()]
    names = [f"{base}-{i}" for i in range(2) for base in adapter_dirs]  # 6 adapters for 6 slots
    first = make_engine(tmp_path, gateway_model_dir, servers, max_loras=2)
    second = make_engine(tmp_path, gateway_model_dir, servers, max_loras=2)
    sources = {name: adapter_dirs[name.rsplit("-", 1)[0]] for name in names}

    async def main() -> None:
        for engine in (first, second):
            await asyncio.wait_for(engine.start(), 20)
        try:
            for engine in (first, second):
                for name in names:
                    await engine.load_adapter(name, sources[name])
            for _ in range(2):
                for engine in (first, second):
                    for name in names:
                        assert (await ask(engine, "hi", name))[0] == f"[{name}] hi"
        finally:
            for engine in (first, second):
                await engine.close()

    asyncio.run(main())
    loads = [n for s in servers for n in ops(s.fake.loads)]
    unloads = [n for s in servers for n in ops(s.fake.unloads)]
    assert sorted(loads) == sorted(names) and unloads == []
    assert sum(len(s.fake.adapters) for s in servers) == len(names)


def special_ids(model_dir: Path) -> dict[str, int]:
    return {t["content"]: t["id"] for t in json.loads((model_dir / "tokenizer.json").read_text())["added_tokens"]
            if t["special"]}


def test_a_replica_serving_the_configured_base_is_used(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path) -> None:
    replica = fakes(FakeVLLM(specials=special_ids(gateway_model_dir)))

    async def body(engine: VLLMEngine) -> None:
        assert engine.ready and (await ask(engine, "hi"))[0] == "[base] hi"

    run(make_engine(tmp_path, gateway_model_dir, [replica]), body)


@pytest.mark.parametrize("served, why", [
    (dict(max_model_len=4096), "with a context of 4096 tokens, more than the 1024 of the configured base"),
    (dict(specials={"<|im_start|>": 7, "<|im_end|>": 8}), "whose tokenizer is not the configured base's"),
])
def test_a_replica_serving_another_model_is_refused_at_start(fakes: Fakes, tmp_path: Path, gateway_model_dir: Path,
                                                             served: dict, why: str) -> None:
    replica = fakes(FakeVLLM(**served))
    engine = make_engine(tmp_path, gateway_model_dir, [replica])

    async def start() -> None:
        try:
            await asyncio.wait_for(engine.start(), 20)
        finally:
            await engine.close()

    with pytest.raises(EngineError, match="refuses to start") as e:
        asyncio.run(start())
    assert why in str(e.value) and "\n" not in str(e.value) and engine.error == str(e.value)
    assert replica.fake.started == {}  # nothing was sent to it
