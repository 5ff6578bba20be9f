"""Schemathesis against the gateway's own /openapi.json, over real HTTP: every operation (the raw ASGI
chat route included) with generated valid and invalid requests. No answer may be a 5xx, break its
documented schema, status or content type, or be an error in any shape but OpenAI's error body.

Seeded and deterministic (`generation.deterministic`), at most MAX_EXAMPLES cases per operation and
phase, so a failure reproduces and the run stays within a few minutes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gateway.app import create_app
from gateway.settings import Settings
from tests.gateway.conftest import (  # noqa: F401  (fixtures)
    ADMIN_KEY,
    LiveGateway,
    adapter_dirs,
    gateway_model_dir,
    gateway_settings,
    serve_app,
)
from tests.lifecycle.conftest import CANARY

MAX_EXAMPLES = 50
# A generated `model` is mapped onto one of these, so chat requests reach the engine (the base and an
# allowed adapter), a forbidden adapter, and an unknown name.
MODELS = ("tiny", "alpha", "beta", "no-such-model")
ERROR_KEYS = {"message", "type", "param", "code"}

# The schema is built from an app that is never started (any Settings give the same routes); the test
# below checks that the live gateway serves exactly this schema.
CONFIG = SchemathesisConfig.from_dict({
    "seed": 20261128,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "mode": "all", "database": "none"},
    "phases": {"coverage": {"enabled": True}, "stateful": {"enabled": False}},
})
OPENAPI = create_app(Settings(model="embedded", state_dir=Path("/nonexistent"))).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)


@pytest.fixture(scope="module")
def fuzz_gateway(serve_app, tmp_path_factory: pytest.TempPathFactory, gateway_model_dir: Path,
                 adapter_dirs: dict[str, Path]) -> LiveGateway:
    """A gateway of its own (fuzzed tenants and uploads stay here): small answers, small limits."""
    settings = gateway_settings(tmp_path_factory.mktemp("fuzz-state"), gateway_model_dir, adapter_dirs,
                                limits={"max_body_bytes": 64_000, "max_tokens": 16, "default_max_tokens": 4},
                                canary=CANARY)
    live = serve_app(settings)
    live.wait_ready()
    created = live.admin("POST", "/admin/tenants", json={"name": "fuzz-tenant-7f3a", "adapters": ["alpha"]})
    assert created.status_code == 201, created.text
    live.tenant_key = created.json()["key"]
    return live


def test_live_gateway_serves_this_schema(fuzz_gateway: LiveGateway) -> None:
    served = httpx.get(f"{fuzz_gateway.url}/openapi.json").json()
    assert served == OPENAPI
    assert "/v1/chat/completions" in served["paths"]


@schemathesis.check
def openai_error_body(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """Every 4xx/5xx answer (bar a bodiless HEAD) is `{"error": {"message", "type", "param", "code"}}`."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return None
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an OpenAI error body: {response.text[:300]}"
    assert set(body["error"]) == ERROR_KEYS and isinstance(body["error"]["message"], str), response.text[:300]
    return True


def _aim(case: schemathesis.Case) -> None:
    """Point generated chat requests at real models (the fuzzer cannot guess "tiny")."""
    body = case.body
    if case.path == "/v1/chat/completions" and isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = MODELS[len(body["model"]) % len(MODELS)]


@schema.parametrize()
def test_api_conforms_to_its_schema(case: schemathesis.Case, fuzz_gateway: LiveGateway) -> None:
    _aim(case)
    key = ADMIN_KEY if case.path.startswith("/admin") else fuzz_gateway.tenant_key
    case.call_and_validate(
        base_url=fuzz_gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
        # A well-formed request may still be refused for the state it meets (an unknown tenant or
        # adapter name, a limit): what is checked is that such refusals are documented 4xx answers.
        excluded_checks=[positive_data_acceptance],
        additional_checks=[openai_error_body],
    )
