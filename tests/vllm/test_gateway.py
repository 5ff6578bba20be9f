"""The gateway on the vLLM engine, over real HTTP with the official client, in front of fake replicas:
OpenAI semantics passed through, accounting, readiness, engine settings and model routes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import Settings, load_settings
from salora.errors import SaLoRAError
from tests.gateway.conftest import LiveGateway, adapter_dirs  # noqa: F401  (fixture)
from tests.vllm.conftest import vllm_settings
from tests.vllm.fake_vllm import FakeServer, FakeVLLM

Fakes = Callable[..., FakeServer]


def sample(gw: LiveGateway, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(gw.metrics()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def tenant(gw: LiveGateway, name: str, adapters: list[str], **limits: int) -> str:
    response = gw.admin("POST", "/admin/tenants", json={"name": name, "adapters": adapters, **limits})
    assert response.status_code == 201, response.text
    return response.json()["key"]


def test_chat_passes_through_with_openai_semantics(fakes: Fakes, serve_app, tmp_path: Path, gateway_model_dir: Path,
                                                   adapter_dirs: dict[str, Path]) -> None:
    replica = fakes()
    gw = serve_app(vllm_settings(tmp_path, gateway_model_dir, [replica], adapters={"alpha": adapter_dirs["alpha"]}))
    gw.wait_ready()
    key = tenant(gw, "acme", ["alpha"])
    client = gw.client(key)

    plain = gw.chat(key, "alpha", "one two three", max_tokens=3)
    assert plain.model == "alpha" and plain.choices[0].message.content == "[alpha] one two"
    assert plain.choices[0].finish_reason == "length"
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (3, 3)

    chunks = list(client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "one two three"}],
                                                 max_tokens=3, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == ["[alpha]", " one", " two"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage == plain.usage

    with pytest.raises(openai.BadRequestError) as e:  # vLLM's 400 reaches the client as OpenAI's 400
        gw.chat(key, "base", "hi", max_tokens=1000)
    assert e.value.code == "context_length_exceeded" and "do not fit in 512" in e.value.message  # vLLM's own message, passed on

    assert sample(gw, "salora_tokens_total", tenant="acme", adapter="alpha", kind="completion") == 6
    assert sample(gw, "salora_requests_total", tenant="acme", adapter="alpha", status="200") == 2
    deadline = time.monotonic() + 5  # the judge classifies each answer after it was sent
    while sample(gw, "salora_responses_total", tenant="acme", adapter="alpha", refused="false") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert replica.fake.served == {"alpha": 2}


def test_readiness_follows_the_replicas(fakes: Fakes, serve_app, tmp_path: Path, gateway_model_dir: Path) -> None:
    replica = FakeServer(FakeVLLM())
    replica.start()
    url = replica.url
    replica.stop()  # nothing listens on its port yet
    gw = serve_app(vllm_settings(tmp_path, gateway_model_dir, [replica], admin_key=None))  # open: anonymous
    time.sleep(0.5)
    assert httpx.get(f"{gw.url}/readyz").json()["status"] == "loading"
    with pytest.raises(openai.APIStatusError) as e:
        gw.chat("any", "base", "hi")
    assert e.value.status_code == 503
    replica.start()
    try:
        gw.wait_ready()
        assert gw.chat("any", "base", "hi").choices[0].message.content == "[base] hi"
        replica.stop()
        deadline = time.monotonic() + 5
        while (ready := httpx.get(f"{gw.url}/readyz")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ready.json()["status"] == "failed" and url in ready.json()["error"]
        assert sample(gw, "salora_engine_errors_total", engine="vllm", kind="replica_down") == 1
    finally:
        replica.stop()


def test_a_route_serves_a_model_name_from_another_deployment(fakes: Fakes, serve_app, tmp_path: Path,
                                                             gateway_model_dir: Path) -> None:
    shared, merged = fakes(), fakes(FakeVLLM(model="acme-merged"))
    settings = vllm_settings(tmp_path, gateway_model_dir, [shared],
                             engines={"acme-dedicated": {"urls": [merged.url], "health_interval_s": 0.2}},
                             routes={"acme-support": "acme-dedicated"})
    gw = serve_app(settings)
    gw.wait_ready()
    acme, other = tenant(gw, "acme", ["acme-support"], rpm=2), tenant(gw, "globex", [])
    assert [m.id for m in gw.client(acme).models.list().data] == ["base", "acme-support"]
    reply = gw.chat(acme, "acme-support", "hello")
    assert reply.model == "acme-support" and reply.choices[0].message.content == "[acme-merged] hello"
    streamed = gw.client(acme).chat.completions.create(model="acme-support", messages=[{"role": "user", "content": "hi"}],
                                                       stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "[acme-merged] hi"
    with pytest.raises(openai.NotFoundError):  # grants apply to routes as to adapters
        gw.chat(other, "acme-support", "hello")
    assert gw.chat(other, "base", "hello").choices[0].message.content == "[base] hello"
    assert merged.fake.served == {"acme-merged": 2} and shared.fake.served == {"base": 1}
    with pytest.raises(openai.RateLimitError):  # limits apply: acme may make 2 requests a minute
        gw.chat(acme, "acme-support", "hello")
    assert sample(gw, "salora_requests_total", tenant="acme", adapter="acme-support", status="200") == 2
    assert sample(gw, "salora_requests_total", tenant="acme", adapter="acme-support", status="429") == 1
    assert sample(gw, "salora_requests_total", tenant="globex", adapter="other", status="404") == 1
    assert sample(gw, "salora_tokens_total", tenant="acme", adapter="acme-support", kind="completion") == 4
    deadline = time.monotonic() + 5  # each answer is judged after it was sent
    while sample(gw, "salora_responses_total", tenant="acme", adapter="acme-support", refused="false") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_engine_settings(tmp_path: Path, gateway_model_dir: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"""
model: {gateway_model_dir}
engine: vllm
vllm:
  urls: [http://vllm-0:8000/, http://vllm-1:8000]
  adapter_dir: {tmp_path}
  upstream_adapter_dir: /adapters
  max_loras: 8
engines:
  acme-dedicated: {{urls: ["http://vllm-acme:8000"]}}
routes:
  acme-support: acme-dedicated
""")
    settings = load_settings(config)
    assert settings.vllm is not None and settings.vllm.urls == ["http://vllm-0:8000", "http://vllm-1:8000"]
    assert settings.engine_names == ["local", "vllm", "acme-dedicated"] and settings.vllm.max_loras == 8
    for bad, message in [
        ({"engine": "vllm"}, "engine 'vllm' is not one of local"),
        ({"engine": "gpu"}, "engine 'gpu' is not one of local"),
        ({"engines": {"local": {"urls": ["http://x"]}}}, "not be `local` or `vllm`"),
        ({"routes": {"r": "nowhere"}}, "route 'r': engine 'nowhere'"),
        ({"routes": {"x": "local"}, "model_name": "x"}, "route 'x' is also the name"),
        ({"vllm": {"urls": ["vllm-0:8000"]}}, "is not an http(s) URL"),
        ({"vllm": {"urls": ["http://x"], "max_lora": 4}}, "Extra inputs are not permitted"),
    ]:
        with pytest.raises(SaLoRAError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_settings(None, model=str(gateway_model_dir), **bad)
    assert Settings(model=str(gateway_model_dir)).engine == "local"


def test_an_engine_error_on_a_route_is_counted_for_the_engine_that_failed(fakes: Fakes, serve_app, tmp_path: Path,
                                                                          gateway_model_dir: Path) -> None:
    shared, merged = fakes(), fakes(FakeVLLM(model="acme-merged"))
    settings = vllm_settings(tmp_path, gateway_model_dir, [shared],
                             engines={"acme-dedicated": {"urls": [merged.url], "health_interval_s": 0.2}},
                             routes={"acme-support": "acme-dedicated"})
    gw = serve_app(settings)
    gw.wait_ready()
    acme = tenant(gw, "acme", ["acme-support"])
    assert gw.chat(acme, "acme-support", "hello").choices[0].message.content == "[acme-merged] hello"
    merged.fake.fail_chat = [503, 503, 503]  # the dedicated deployment fails; the shared one is fine
    with pytest.raises(openai.InternalServerError):
        gw.chat(acme, "acme-support", "hello")
    failed = {k: sample(gw, "salora_engine_errors_total", engine="acme-dedicated", kind=k) for k in ("upstream", "unavailable")}
    assert sum(failed.values()) == 1, failed
    assert sum(sample(gw, "salora_engine_errors_total", engine="vllm", kind=k) for k in ("upstream", "unavailable")) == 0
    assert gw.chat(acme, "base", "hi").choices[0].message.content == "[base] hi"
