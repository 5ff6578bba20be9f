"""Who may call what: every endpoint of the app (enumerated from its routes, so a new one fails the
test until it is classified here) x every kind of caller, with the exact status and error body of each
cell, and no side effect from a refused call. API keys never reach the gateway's logs or /metrics."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from gateway.openai.chat_completion.api_router import COMPLETIONS_PATH
from gateway.openai.chat_completion.api_router import PATH as CHAT_PATH
from tests.gateway.conftest import (  # noqa: F401  (fixtures)
    ADMIN_KEY,
    LiveGateway,
    adapter_dirs,
    gateway_model_dir,
    gateway_settings,
    serve_app,
)
from tests.lifecycle.conftest import CANARY, adapter_files, make_lora, upload, wait_state

BAD_KEY = "sk-salora-not-a-real-key-" + uuid.uuid4().hex
CALLERS = ("none", "bad", "tenant", "other", "admin")
CLIENT_LOGGERS = ("httpx", "httpcore", "openai", "urllib3")  # the test's own clients, not the gateway


@dataclass
class Call:
    """One request; `check` (optional) runs after it with the caller's name and the response, to see
    that the call did what it should, or, when refused, nothing at all."""

    method: str
    path: str
    json: object = None
    files: dict[str, bytes] | None = None
    check: Callable[[str, httpx.Response], None] | None = None


@dataclass
class Endpoint:
    kind: str  # public | tenant | tenant-model | admin
    call: Callable[[LiveGateway], Call]
    admin_status: int = 200  # what the admin gets (admin endpoints)
    admin_code: str | None = None  # and its error code, if that is an error


def _expected(endpoint: Endpoint, caller: str) -> tuple[int, str | None]:
    """(status, error code) of a cell."""
    if endpoint.kind == "public":
        return 200, None
    if endpoint.kind == "admin":
        return (endpoint.admin_status, endpoint.admin_code) if caller == "admin" else (401, "invalid_api_key")
    if caller in ("none", "bad", "admin"):  # the admin key is not a tenant key
        return 401, "invalid_api_key"
    if endpoint.kind == "tenant-model" and caller == "other":
        return 404, "model_not_found"
    return 200, None


def _new_tenant(gw: LiveGateway) -> str:
    name = f"victim-{uuid.uuid4().hex[:8]}"
    assert gw.admin("POST", "/admin/tenants", json={"name": name}).status_code == 201
    return name


def _tenant_exists(name: str, should: bool) -> Callable[[LiveGateway], Callable[[str, httpx.Response], None]]:
    def check_for(gw: LiveGateway) -> Callable[[str, httpx.Response], None]:
        def check(caller: str, _: httpx.Response) -> None:
            names = {t["name"] for t in gw.admin("GET", "/admin/tenants").json()["data"]}
            assert (name in names) == (should if caller == "admin" else not should), (caller, name)
        return check
    return check_for


def _create_tenant(gw: LiveGateway) -> Call:
    name = f"new-{uuid.uuid4().hex[:8]}"
    return Call("POST", "/admin/tenants", json={"name": name}, check=_tenant_exists(name, True)(gw))


def _delete_tenant(gw: LiveGateway) -> Call:
    name = _new_tenant(gw)
    return Call("DELETE", f"/admin/tenants/{name}", check=_tenant_exists(name, False)(gw))


def _rotate_key(gw: LiveGateway) -> Call:
    name = _new_tenant(gw)

    def check(caller: str, response: httpx.Response) -> None:
        assert ("key" in response.json()) == (caller == "admin")
    return Call("POST", f"/admin/tenants/{name}/rotate", check=check)


def _upload(gw: LiveGateway) -> Call:
    name = f"up-{uuid.uuid4().hex[:8]}"

    def check(caller: str, _: httpx.Response) -> None:
        assert gw.admin("GET", f"/admin/adapters/{name}").status_code == (200 if caller == "admin" else 404)
    return Call("POST", "/admin/adapters", json={"name": name}, files=gw.upload_files, check=check)


def _retire(gw: LiveGateway) -> Call:
    def check(caller: str, _: httpx.Response) -> None:
        assert gw.admin("GET", "/admin/adapters/gamma").json()["state"] == ("retired" if caller == "admin" else "live")
    return Call("DELETE", "/admin/adapters/gamma", check=check)


def _chat(gw: LiveGateway) -> Call:
    return Call("POST", CHAT_PATH, json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 2})


def _names_nothing(caller: str, response: httpx.Response) -> None:
    """A probe anyone may call names no tenant and no adapter."""
    assert not {"alpha", "beta", "gamma", "acme", "globex"} & set(response.text.replace('"', " ").split()), response.text


def _models(gw: LiveGateway) -> Call:
    def check(caller: str, response: httpx.Response) -> None:
        if response.status_code == 200:
            ids = {m["id"] for m in response.json()["data"]}
            assert ids == {"tiny", "alpha"} if caller == "tenant" else ids == {"tiny", "beta"}
    return Call("GET", "/v1/models", check=check)


ENDPOINTS: dict[tuple[str, str], Endpoint] = {
    ("GET", "/healthz"): Endpoint("public", lambda gw: Call("GET", "/healthz")),
    ("GET", "/readyz"): Endpoint("public", lambda gw: Call("GET", "/readyz", check=_names_nothing)),
    ("GET", "/metrics"): Endpoint("admin", lambda gw: Call("GET", "/metrics")),  # the admin key, or metrics_key
    ("GET", "/openapi.json"): Endpoint("public", lambda gw: Call("GET", "/openapi.json")),
    ("GET", "/docs"): Endpoint("public", lambda gw: Call("GET", "/docs")),
    ("GET", "/docs/oauth2-redirect"): Endpoint("public", lambda gw: Call("GET", "/docs/oauth2-redirect")),
    ("GET", "/redoc"): Endpoint("public", lambda gw: Call("GET", "/redoc")),
    ("POST", CHAT_PATH): Endpoint("tenant-model", _chat),
    ("POST", COMPLETIONS_PATH): Endpoint("tenant-model", lambda gw: Call("POST", COMPLETIONS_PATH, json={
        "model": "alpha", "prompt": "hi", "max_tokens": 2})),
    ("GET", "/v1/models"): Endpoint("tenant", _models),
    ("GET", "/v1/models/{model}"): Endpoint("tenant-model", lambda gw: Call("GET", "/v1/models/alpha")),
    ("GET", "/admin/tenants"): Endpoint("admin", lambda gw: Call("GET", "/admin/tenants")),
    ("POST", "/admin/tenants"): Endpoint("admin", _create_tenant, 201),
    ("DELETE", "/admin/tenants/{name}"): Endpoint("admin", _delete_tenant),
    ("POST", "/admin/tenants/{name}/rotate"): Endpoint("admin", _rotate_key),
    ("GET", "/admin/adapters"): Endpoint("admin", lambda gw: Call("GET", "/admin/adapters")),
    ("POST", "/admin/adapters"): Endpoint("admin", _upload, 202),
    ("GET", "/admin/adapters/{name}"): Endpoint("admin", lambda gw: Call("GET", "/admin/adapters/alpha")),
    ("POST", "/admin/adapters/{name}/probe"): Endpoint("admin", lambda gw: Call("POST", "/admin/adapters/alpha/probe"), 202),
    # only a rejected adapter can be forced live: the admin gets past the key check to the state's 409
    ("POST", "/admin/adapters/{name}/force"): Endpoint(
        "admin", lambda gw: Call("POST", "/admin/adapters/alpha/force", json={"actor": "a", "reason": "r"}), 409,
        "invalid_state"),
    ("DELETE", "/admin/adapters/{name}"): Endpoint("admin", _retire),
}


class KeyLeak(logging.Handler):
    """Every log record the gateway side writes, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(CLIENT_LOGGERS):
            self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def logs() -> Iterator[KeyLeak]:
    handler, root = KeyLeak(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture(scope="module")
def gw(logs: KeyLeak, serve_app, tmp_path_factory: pytest.TempPathFactory, gateway_model_dir: Path,
       adapter_dirs: dict[str, Path]) -> LiveGateway:
    """Tenant `acme` may call alpha, `globex` beta; `gamma`, uploaded and live, is there to be retired."""
    live = serve_app(gateway_settings(tmp_path_factory.mktemp("authz-state"), gateway_model_dir, adapter_dirs,
                                      canary=CANARY))
    live.wait_ready()
    live.keys = {"tenant": live.admin("POST", "/admin/tenants", json={"name": "acme", "adapters": ["alpha"]}).json()["key"],
                 "other": live.admin("POST", "/admin/tenants", json={"name": "globex", "adapters": ["beta"]}).json()["key"],
                 "bad": BAD_KEY, "admin": ADMIN_KEY}
    lora = make_lora(gateway_model_dir, tmp_path_factory.mktemp("authz-lora"))  # B = 0: passes the canary
    live.upload_files = adapter_files(lora)
    assert upload(live, "gamma", live.upload_files).status_code == 202
    assert wait_state(live, "gamma")["state"] == "live"
    return live


def app_endpoints(gw: LiveGateway) -> set[tuple[str, str]]:
    """Every (method, path) the app answers: FastAPI's routes, and the raw ASGI chat route."""
    found = {(method, route.path_format) for route in iter_route_contexts(gw.app.routes)
             for method in route.methods or () if method != "HEAD"}
    return found | {("POST", CHAT_PATH), ("POST", COMPLETIONS_PATH)}


def test_every_endpoint_is_classified(gw: LiveGateway):
    assert app_endpoints(gw) == set(ENDPOINTS)
    assert {(m.upper(), p) for p, ops in gw.app.openapi()["paths"].items() for m in ops} <= set(ENDPOINTS)


def send(gw: LiveGateway, call: Call, caller: str) -> httpx.Response:
    key = gw.keys.get(caller)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if call.files is not None:  # multipart: the upload's form fields and files
        return httpx.request(call.method, f"{gw.url}{call.path}", headers=headers, data=call.json, timeout=120,
                             files=[("file", (name, data)) for name, data in call.files.items()])
    return httpx.request(call.method, f"{gw.url}{call.path}", headers=headers, json=call.json, timeout=60)


@pytest.mark.parametrize("route", list(ENDPOINTS), ids=lambda r: f"{r[0]} {r[1]}")
def test_authorization_matrix(gw: LiveGateway, route: tuple[str, str]):
    endpoint = ENDPOINTS[route]
    for caller in CALLERS:  # the admin last: its call may change the state the others must not
        call = endpoint.call(gw)
        response = send(gw, call, caller)
        status, code = _expected(endpoint, caller)
        assert response.status_code == status, (caller, response.text[:300])
        if status >= 400:
            body = response.json()
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["code"] == code, (caller, body)
        if call.check is not None:
            call.check(caller, response)


def test_keys_never_reach_logs_or_metrics(gw: LiveGateway, logs: KeyLeak):
    """Runs after the matrix (same module): every key was sent, good and bad, many times."""
    for caller in CALLERS:  # once more each, on the paths that log the most (refusals)
        send(gw, _chat(gw), caller)
        send(gw, Call("GET", "/admin/tenants"), caller)
    secrets = [gw.keys[c] for c in ("tenant", "other", "bad", "admin")]
    assert logs.lines, "the handler saw no gateway log at all: the capture is broken"
    text = "\n".join(logs.lines) + gw.metrics()
    for secret in secrets:
        assert secret not in text and secret[-24:] not in text
