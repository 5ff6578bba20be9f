"""The lifecycle over HTTP on the tiny model: upload, canary, promotion, rejection with its failing
probes, forced promotion (audited), re-probes, retirement, checkpoints exported on arrival, errors,
restarts, and the metrics each step leaves."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.engines.base import Chunk, EngineError, GenerationRequest
from salora.calibrate import calibrate
from salora.train import TrainOptions, train
from tests.lifecycle.conftest import (CANARY, SameAsBaseJudge, adapter_files, harmful_probe_count, lifecycle_settings,
                                      make_lora, running, tar_gz, upload, wait_state)

STATES = ("uploaded", "validating", "probing", "live", "rejected", "retired")


def samples(gw, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(gw.metrics())
            for s in f.samples if s.name == family}


def models(gw, key: str) -> list[str]:
    return [m.id for m in gw.client(key).models.list().data]


def test_passing_adapter_goes_live_for_its_tenants(tiny_gateway, gateway_model_dir, tmp_path):
    gw = tiny_gateway
    response = upload(gw, "support", adapter_files(make_lora(gateway_model_dir, tmp_path / "a")), ("acme",))
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["state"] == "probing" and accepted["rank"] == 4 and accepted["source"] == "upload"
    assert accepted["target_modules"] == ["q_proj", "v_proj"] and len(accepted["sha256"]) == 64

    detail = wait_state(gw, "support")
    assert detail["state"] == "live" and detail["serving"] and detail["reason"] is None
    report = detail["report"]
    n_harmful = harmful_probe_count(gw.ctx.settings)
    assert report["result"] == "pass" and report["reasons"] == []
    assert len(report["probes"]) == n_harmful + 4 and report["judges"] == {"harmful": "same-as-base",
                                                                            "benign": "same-as-base"}
    for probe in report["probes"]:
        assert probe["prompt"] and probe["candidate"]["answer"] == probe["base"]["answer"]
        assert probe["candidate"]["refused"] == (probe["set"] == "harmful") and not probe["failing"]
    assert report["rates"]["harmful"]["candidate"]["refusal_rate"] == 1.0
    assert [(e["action"], e["to_state"]) for e in detail["audit"]] == [
        ("upload", "uploaded"), ("validate", "validating"), ("probe", "probing"), ("promote", "live")]
    assert detail["audit"][-1]["actor"] == "canary"

    assert "support" in models(gw, gw.keys["acme"]) and "support" not in models(gw, gw.keys["globex"])
    assert gw.chat(gw.keys["acme"], "support", "hello", max_tokens=3).usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError):
        gw.chat(gw.keys["globex"], "support", "hello", max_tokens=3)

    rates = samples(gw, "salora_canary_refusal_rate")
    assert rates[(("adapter", "support"), ("probe", "harmful"))] == 1.0
    assert rates[(("adapter", "tiny"), ("probe", "harmful"))] == 1.0  # the base, under the served model id
    assert rates[(("adapter", "support"), ("probe", "benign"))] == 0.0
    runs = samples(gw, "salora_canary_runs_total")
    assert runs == {(("result", "pass"),): 1.0, (("result", "fail"),): 0.0, (("result", "error"),): 0.0}
    states = samples(gw, "salora_adapters")
    assert states == {(("state", s),): (1.0 if s == "live" else 0.0) for s in STATES}
    # The new adapter's series exist at 0 before its first request counts.
    responses = samples(gw, "salora_responses_total")
    assert responses[(("adapter", "support"), ("refused", "true"), ("tenant", "acme"))] == 0.0
    assert (("adapter", "support"), ("refused", "true"), ("tenant", "globex")) not in responses


def test_candidate_is_held_back_while_probing(tiny_gateway, gateway_model_dir, tmp_path):
    gw = tiny_gateway
    gw.judge.hold.clear()  # every verdict waits: the canary cannot finish
    try:
        assert upload(gw, "pending", adapter_files(make_lora(gateway_model_dir, tmp_path / "a")), ("acme",)).status_code == 202
        assert "pending" in gw.ctx.engine.adapters()  # hot-loaded for its probes...
        assert "pending" not in models(gw, gw.keys["acme"])  # ...but nobody can call it
        with pytest.raises(openai.NotFoundError):
            gw.chat(gw.keys["acme"], "pending", "hello", max_tokens=2)
        assert gw.admin("POST", "/admin/adapters/pending/probe").status_code == 409
        assert upload(gw, "pending", adapter_files(tmp_path / "a")).json()["error"]["code"] == "name_in_use"
    finally:
        gw.judge.hold.set()
    assert wait_state(gw, "pending")["state"] == "live"
    assert "pending" in models(gw, gw.keys["acme"])


def test_failing_adapter_is_rejected_with_its_failing_probes(tiny_gateway, gateway_model_dir, tmp_path):
    gw = tiny_gateway
    assert upload(gw, "risky", adapter_files(make_lora(gateway_model_dir, tmp_path / "r", std=0.3, seed=3)),
                  ("acme",)).status_code == 202
    detail = wait_state(gw, "risky")
    assert detail["state"] == "rejected" and not detail["serving"]
    report = detail["report"]
    assert report["result"] == "fail" and len(report["reasons"]) == 1
    assert "harmful probes: refused 0.0% against the base's 100.0%" in detail["reason"]
    failing = [p for p in report["probes"] if p["failing"]]
    assert len(failing) == harmful_probe_count(gw.ctx.settings)
    assert all(p["set"] == "harmful" and p["regression"] and p["candidate"]["answer"] != p["base"]["answer"]
               for p in failing)
    assert "risky" not in gw.ctx.engine.adapters()  # unloaded
    with pytest.raises(openai.NotFoundError):
        gw.chat(gw.keys["acme"], "risky", "hello", max_tokens=2)
    assert samples(gw, "salora_canary_runs_total")[(("result", "fail"),)] == 1.0
    assert not any(labels[0] == ("adapter", "risky") for labels in samples(gw, "salora_canary_refusal_rate"))

    # An admin override needs who and why, and is audited.
    assert gw.admin("POST", "/admin/adapters/risky/force", json={"actor": "alice"}).status_code == 400
    forced = gw.admin("POST", "/admin/adapters/risky/force",
                      json={"actor": "alice@example.com", "reason": "red team accepted the risk, ticket 42"})
    assert forced.status_code == 200 and forced.json()["state"] == "live" and forced.json()["serving"]
    assert gw.chat(gw.keys["acme"], "risky", "hello", max_tokens=2).usage.completion_tokens == 2
    audit = gw.admin("GET", "/admin/adapters/risky").json()["audit"][-1]
    assert audit == {**audit, "action": "force_live", "actor": "alice@example.com", "from_state": "rejected",
                     "to_state": "live", "reason": "red team accepted the risk, ticket 42"}
    assert samples(gw, "salora_canary_refusal_rate")[(("adapter", "risky"), ("probe", "harmful"))] == 0.0

    # Probing it again: it still fails, so the live adapter is flagged (and kept: pull_failing is off).
    assert gw.admin("POST", "/admin/adapters/risky/probe").status_code == 202
    detail = wait_state(gw, "risky")
    assert detail["state"] == "live" and "harmful probes" in detail["flagged"]
    assert [r["trigger"] for r in detail["runs"]] == ["upload", "manual"]
    assert detail["report"]["base_cached"] is True
    assert detail["audit"][-1]["action"] == "flag"


def test_retire_unloads_and_keeps_the_record(tiny_gateway, gateway_model_dir, tmp_path):
    gw = tiny_gateway
    files = adapter_files(make_lora(gateway_model_dir, tmp_path / "a"))
    upload(gw, "old", files, ("acme",))
    assert wait_state(gw, "old")["state"] == "live"
    retired = gw.admin("DELETE", "/admin/adapters/old", json={"actor": "bob", "reason": "replaced by v2"})
    assert retired.status_code == 200 and retired.json()["state"] == "retired"
    assert "old" not in gw.ctx.engine.adapters() and "old" not in models(gw, gw.keys["acme"])
    assert "old" not in gw.ctx.tenants.get("acme").adapters  # the grant is revoked with it
    detail = gw.admin("GET", "/admin/adapters/old").json()
    assert detail["state"] == "retired" and detail["reason"] == "replaced by v2"
    assert detail["audit"][-1] == {**detail["audit"][-1], "actor": "bob", "action": "retire"}
    assert gw.admin("DELETE", "/admin/adapters/old").status_code == 409
    assert gw.admin("POST", "/admin/adapters/old/probe").status_code == 409
    assert gw.admin("GET", "/admin/adapters/nothing").status_code == 404

    # The name is free again; the same files are stored once.
    assert upload(gw, "old", files).status_code == 202
    assert wait_state(gw, "old")["state"] == "live"
    listed = gw.admin("GET", "/admin/adapters").json()["data"]
    assert sorted(a["state"] for a in listed if a["name"] == "old") == ["live", "retired"]
    assert len({a["sha256"] for a in listed if a["name"] == "old"}) == 1
    assert samples(gw, "salora_adapters")[(("state", "retired"),)] == 1.0


def test_checkpoints_are_exported_on_arrival(tiny_gateway, gateway_model_dir, chat_files, tmp_path):
    """`salora train` checkpoints, LoRA and SaLoRA, uploaded as they are. SaLoRA exports at rank r from
    its default standard start (input guard) and at rank 2r from the paper's task-aware one."""
    gw = tiny_gateway
    lora = tmp_path / "lora-ckpt"
    train(TrainOptions(model=str(gateway_model_dir), data=str(chat_files["task"]), out=str(lora), method="lora",
                       rank=4, max_steps=1, lr=1e-9))
    safety = tmp_path / "safety"
    calibrate(str(gateway_model_dir), chat_files["safety"], safety, ["q_proj", "v_proj"], rank_safety=4, input_energy=0.9)
    salora, paper = tmp_path / "salora-ckpt", tmp_path / "paper-ckpt"
    train(TrainOptions(model=str(gateway_model_dir), data=str(chat_files["task"]), out=str(salora), method="salora",
                       safety=str(safety), rank=4, max_steps=1, lr=1e-9))
    train(TrainOptions(model=str(gateway_model_dir), data=str(chat_files["task"]), out=str(paper), method="salora",
                       safety=str(safety), rank=4, max_steps=1, lr=1e-9, init="task", projection="output", task_rank=4))
    for name, checkpoint, rank in (("from-lora", lora, 4), ("from-salora", salora, 4), ("from-paper", paper, 8)):
        files = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
        response = upload(gw, name, {"ckpt.tar.gz": tar_gz(files, prefix="ckpt/")})
        assert response.status_code == 202, response.text
        assert (response.json()["source"], response.json()["rank"]) == ("checkpoint", rank)
        assert wait_state(gw, name)["state"] == "live"


def test_canary_error_keeps_the_adapter_waiting(tiny_gateway, gateway_model_dir, tmp_path):
    """An engine failure during the probes is an `error` run: no verdict, the adapter stays probing
    (not callable) until a later run completes."""
    gw = tiny_gateway
    engine = gw.ctx.engine
    generate = engine.generate
    failing = {"flaky"}

    async def faulty(request: GenerationRequest) -> AsyncIterator[Chunk]:
        if request.adapter in failing:
            raise EngineError("injected fault", kind="generation")
        async for chunk in generate(request):
            yield chunk

    engine.generate = faulty
    try:
        upload(gw, "flaky", adapter_files(make_lora(gateway_model_dir, tmp_path / "a")), ("acme",))
        detail = wait_state(gw, "flaky", states=("probing",))
        assert detail["canary"]["result"] == "error" and "injected fault" in detail["canary"]["error"]
        assert "flaky" not in models(gw, gw.keys["acme"])
        assert samples(gw, "salora_canary_runs_total")[(("result", "error"),)] == 1.0
        failing.clear()
        assert gw.admin("POST", "/admin/adapters/flaky/probe").status_code == 202
        assert wait_state(gw, "flaky")["state"] == "live"
    finally:
        engine.generate = generate


def test_restart_restores_live_adapters(tmp_path, gateway_model_dir):
    settings = lifecycle_settings(tmp_path / "state", gateway_model_dir)
    with running(settings, SameAsBaseJudge()) as first:
        key = first.admin("POST", "/admin/tenants", json={"name": "acme", "adapters": []}).json()["key"]
        upload(first, "kept", adapter_files(make_lora(gateway_model_dir, tmp_path / "a")), ("acme",))
        upload(first, "refused", adapter_files(make_lora(gateway_model_dir, tmp_path / "b", std=0.3, seed=5)))
        assert wait_state(first, "kept")["state"] == "live" and wait_state(first, "refused")["state"] == "rejected"
        before = first.chat(key, "kept", "hello", max_tokens=4).choices[0].message.content
    with running(settings, SameAsBaseJudge()) as second:
        assert second.ctx.engine.adapters() == {"kept"}
        assert second.chat(key, "kept", "hello", max_tokens=4).choices[0].message.content == before
        detail = second.admin("GET", "/admin/adapters/kept").json()
        assert detail["state"] == "live" and len(detail["runs"]) == 1  # restored, not probed again
        assert samples(second, "salora_adapters")[(("state", "rejected"),)] == 1.0


def test_scheduled_reprobe_pulls_a_failing_adapter(tmp_path, gateway_model_dir):
    settings = lifecycle_settings(tmp_path / "state", gateway_model_dir,
                                  lifecycle={"reprobe_interval_s": 1, "retry_interval_s": 1, "pull_failing": True})
    with running(settings, SameAsBaseJudge()) as gw:
        upload(gw, "drifty", adapter_files(make_lora(gateway_model_dir, tmp_path / "a", std=0.3, seed=7)))
        assert wait_state(gw, "drifty")["state"] == "rejected"
        gw.admin("POST", "/admin/adapters/drifty/force", json={"actor": "carol", "reason": "demo"})
        detail = wait_state(gw, "drifty", states=("retired",), timeout=60)
        assert [r["trigger"] for r in detail["runs"]] == ["upload", "schedule"]
        assert detail["audit"][-1] == {**detail["audit"][-1], "actor": "canary", "action": "retire"}
        assert "failed a canary re-probe" in detail["reason"] and "drifty" not in gw.ctx.engine.adapters()


def test_config_adapters_are_registered_live(tmp_path, gateway_model_dir, adapter_dirs):
    """Adapters from the settings are live by the operator's word: listed, probe-able, not retirable here."""
    settings = lifecycle_settings(tmp_path / "state", gateway_model_dir, adapters=adapter_dirs)
    with running(settings, SameAsBaseJudge()) as gw:
        listed = {a["name"]: a for a in gw.admin("GET", "/admin/adapters").json()["data"]}
        assert {n: (a["state"], a["source"], a["serving"]) for n, a in listed.items()} == {
            "alpha": ("live", "config", True), "beta": ("live", "config", True)}
        assert gw.admin("DELETE", "/admin/adapters/alpha").status_code == 409
        assert gw.admin("POST", "/admin/adapters/alpha/probe").status_code == 202
        detail = wait_state(gw, "alpha")
        assert detail["state"] == "live" and detail["runs"][0]["result"] in ("pass", "fail")
        assert (("adapter", "alpha"), ("probe", "harmful")) in samples(gw, "salora_canary_refusal_rate")
        assert upload(gw, "beta", {"x.json": b"{}"}).status_code == 409
    with running(lifecycle_settings(tmp_path / "state", gateway_model_dir, adapters={"alpha": adapter_dirs["alpha"]}),
                 SameAsBaseJudge()) as gw:
        states = {a["name"]: a["state"] for a in gw.admin("GET", "/admin/adapters").json()["data"]}
        assert states == {"alpha": "live", "beta": "retired"}  # gone from the config: retired


def test_llm_judge_behind_an_openai_compatible_endpoint(tmp_path, gateway_model_dir):
    """`canary.judge` sends every verdict to a chat endpoint; here another gateway serves it. The tiny
    model answers gibberish, which is no verdict: the run ends as an error, never as a pass."""
    judge_settings = lifecycle_settings(tmp_path / "judge-state", gateway_model_dir, admin_key=None)
    with running(judge_settings) as judge_gw:
        settings = lifecycle_settings(tmp_path / "state", gateway_model_dir,
                                      canary={**CANARY, "judge": {"url": f"{judge_gw.url}/v1", "model": "tiny"}})
        with running(settings) as gw:
            upload(gw, "judged", adapter_files(make_lora(gateway_model_dir, tmp_path / "a")))
            detail = wait_state(gw, "judged", states=("probing",))
            assert detail["canary"]["result"] == "error"
            assert "the classify:tiny judge answered" in detail["canary"]["error"]
            assert not detail["serving"]
        served = samples(judge_gw, "salora_requests_total")
        assert served[(("adapter", "tiny"), ("status", "200"), ("tenant", "anonymous"))] >= 1


def test_an_unreachable_llm_judge_fails_closed(tmp_path, gateway_model_dir):
    """Nothing listens at the judge's address: the run is an error and the adapter is not served."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends
    settings = lifecycle_settings(tmp_path / "state", gateway_model_dir,
                                  canary={**CANARY, "judge": {"url": f"http://127.0.0.1:{port}/v1", "model": "m",
                                                              "timeout_s": 5}})
    with running(settings) as gw:
        upload(gw, "unjudged", adapter_files(make_lora(gateway_model_dir, tmp_path / "a")))
        detail = wait_state(gw, "unjudged", states=("probing",))
        assert detail["canary"]["result"] == "error" and "ConnectError" in detail["canary"]["error"]
        assert not detail["serving"] and detail["state"] == "probing"
