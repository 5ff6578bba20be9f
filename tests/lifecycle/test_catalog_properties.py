"""The serving catalog (gateway/catalog.py) under random sequences of admin actions on a live
gateway: uploads that pass or fail their canary, canaries caught mid-run (then finished or
cancelled), retirements, tenants created with grants and deleted, and the engine dropping an
adapter behind the lifecycle's back (as a crashed or restarted engine would). After every step, and
while a canary is held mid-run, each tenant's `/v1/models` and chat calls are checked against a
model of what must be routable: nothing probing, rejected or retired is ever listed or callable, a
live adapter the engine holds is listed and callable for exactly the tenants granted it, and a
deleted tenant's key opens nothing."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tests.gateway.conftest import LiveGateway
from tests.lifecycle.conftest import adapter_files, make_lora, upload, wait_state

MAX_TENANTS = 3
MAX_ADAPTERS = 5
fresh = itertools.count()  # names are never reused across examples: one gateway serves them all


class CatalogMachine(RuleBasedStateMachine):
    gw: LiveGateway
    files: dict[str, dict[str, bytes]]  # "pass" and "fail" adapter files

    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[str, str] = {}  # tenant -> key
        self.deleted_keys: list[str] = []
        self.grants: dict[str, set[str]] = {}  # tenant -> adapter names it was granted
        self.states: dict[str, str] = {}  # adapter -> the state the registry must show
        self.dropped: set[str] = set()  # live adapters the engine no longer holds

    # --- the model ------------------------------------------------------------------------------

    def routable(self, tenant: str) -> set[str]:
        return {n for n in self.grants[tenant] if self.states.get(n) == "live" and n not in self.dropped}

    def check(self, probing: str | None = None) -> None:
        base = self.gw.ctx.engine.model_id
        for tenant, key in self.keys.items():
            expected = self.routable(tenant)
            assert probing not in expected
            listed = httpx.get(f"{self.gw.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert listed.status_code == 200, listed.text
            assert [m["id"] for m in listed.json()["data"]] == [base, *sorted(expected)], (tenant, self.states)
            for name in self.states:
                status = self.call(key, name)
                assert status == (200 if name in expected else 404), (tenant, name, status, self.states, self.dropped)
        for key in self.deleted_keys[-2:]:
            assert self.call(key, base) == 401
        for name, state in self.states.items():
            detail = self.gw.admin("GET", f"/admin/adapters/{name}").json()
            assert detail["state"] == state, detail
            assert detail["serving"] == (state == "live" and name not in self.dropped), detail

    def call(self, key: str, model: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
        return httpx.post(f"{self.gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                          timeout=60).status_code

    def adapter(self, outcome: str, tenants: list[str], hold: bool = False) -> str:
        name = f"cat{next(fresh)}"
        if hold:
            self.gw.judge.hold.clear()
        response = upload(self.gw, name, self.files[outcome], tuple(tenants))
        assert response.status_code == 202, response.text
        return name

    def finished(self, name: str, outcome: str, tenants: list[str]) -> None:
        state = wait_state(self.gw, name)["state"]
        assert state == ("live" if outcome == "pass" else "rejected")
        self.states[name] = state
        if state == "live":
            for tenant in tenants:
                self.grants[tenant].add(name)

    # --- the actions ----------------------------------------------------------------------------

    @precondition(lambda self: len(self.keys) < MAX_TENANTS)
    @rule(data=st.data())
    def create_tenant(self, data: st.DataObject) -> None:
        granted = data.draw(st.lists(st.sampled_from(sorted(self.states)), unique=True) if self.states else st.just([]))
        name = f"t{next(fresh)}"
        response = self.gw.admin("POST", "/admin/tenants", json={"name": name, "adapters": granted})
        assert response.status_code == 201, response.text
        self.keys[name], self.grants[name] = response.json()["key"], set(granted)

    @precondition(lambda self: self.keys)
    @rule(data=st.data())
    def delete_tenant(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.keys)))
        assert self.gw.admin("DELETE", f"/admin/tenants/{name}").status_code == 200
        self.deleted_keys.append(self.keys.pop(name))
        del self.grants[name]

    @precondition(lambda self: len(self.states) < MAX_ADAPTERS)
    @rule(outcome=st.sampled_from(["pass", "fail"]), data=st.data())
    def upload_adapter(self, outcome: str, data: st.DataObject) -> None:
        tenants = data.draw(st.lists(st.sampled_from(sorted(self.keys)), unique=True) if self.keys else st.just([]))
        self.finished(self.adapter(outcome, tenants), outcome, tenants)

    @precondition(lambda self: len(self.states) < MAX_ADAPTERS)
    @rule(cancel=st.booleans(), data=st.data())
    def catch_a_canary_mid_run(self, cancel: bool, data: st.DataObject) -> None:
        """A passing adapter whose verdict is held: while it probes, nobody reaches it, not even the
        tenants it is meant for; then it is either let finish (live) or retired mid-run."""
        tenants = data.draw(st.lists(st.sampled_from(sorted(self.keys)), unique=True) if self.keys else st.just([]))
        try:
            name = self.adapter("pass", tenants, hold=True)
            self.states[name] = "probing"
            self.check(probing=name)
            if cancel:
                response = self.gw.admin("DELETE", f"/admin/adapters/{name}", timeout=120)
                assert response.status_code == 200, response.text
        finally:
            self.gw.judge.hold.set()
        if cancel:
            self.states[name] = wait_state(self.gw, name, states=("retired",))["state"]
        else:
            self.finished(name, "pass", tenants)

    @precondition(lambda self: any(s == "live" for s in self.states.values()))
    @rule(data=st.data())
    def retire(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, s in self.states.items() if s == "live")))
        response = self.gw.admin("DELETE", f"/admin/adapters/{name}", timeout=120)
        assert response.status_code == 200, response.text
        self.states[name] = "retired"
        self.dropped.discard(name)
        for granted in self.grants.values():
            granted.discard(name)

    @precondition(lambda self: any(s == "live" and n not in self.dropped for n, s in self.states.items()))
    @rule(data=st.data())
    def engine_drops_an_adapter(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, s in self.states.items() if s == "live" and n not in self.dropped)))
        asyncio.run(self.gw.ctx.engine.unload_adapter(name))
        self.dropped.add(name)

    @invariant()
    def routable_is_exactly_live_held_and_granted(self) -> None:
        self.check()


def test_the_catalog_routes_exactly_live_held_granted_adapters(tiny_gateway: LiveGateway, gateway_model_dir: Path,
                                                               tmp_path: Path) -> None:
    CatalogMachine.gw = tiny_gateway
    CatalogMachine.files = {"pass": adapter_files(make_lora(gateway_model_dir, tmp_path / "pass")),
                            "fail": adapter_files(make_lora(gateway_model_dir, tmp_path / "fail", std=0.3, seed=3))}
    run_state_machine_as_test(CatalogMachine, settings=settings(
        max_examples=6, stateful_step_count=8, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]))
