"""The admin API: tenants created, listed, rotated and deleted with the admin key; keys stored only
as hashes; and the open mode of a gateway started with no admin key and no tenants."""

from __future__ import annotations

import hashlib
import sqlite3

import httpx
import openai
import pytest

from tests.gateway.conftest import gateway_settings


def test_admin_endpoints_need_the_admin_key(gw, keys):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {keys['root']}"}):
        r = httpx.get(f"{gw.url}/admin/tenants", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_tenant_lifecycle(gw):
    created = gw.admin("POST", "/admin/tenants", json={"name": "initech", "adapters": ["alpha"], "rpm": 100, "tpm": 10_000})
    assert created.status_code == 201
    body = created.json()
    key = body["key"]
    assert key.startswith("sk-salora-") and len(key) > 40
    assert {k: body[k] for k in ("name", "adapters", "rpm", "tpm")} == {"name": "initech", "adapters": ["alpha"], "rpm": 100, "tpm": 10_000}
    assert [m.id for m in gw.client(key).models.list().data] == ["tiny", "alpha"]

    listed = gw.admin("GET", "/admin/tenants").json()["data"]
    entry = next(t for t in listed if t["name"] == "initech")
    assert "key" not in entry and entry["adapters"] == ["alpha"]

    db = sqlite3.connect(gw.ctx.settings.state_dir / "gateway.db")
    (stored,) = db.execute("select key_sha256 from tenants where name = 'initech'").fetchone()
    assert stored == hashlib.sha256(key.encode()).hexdigest()  # the key itself is nowhere stored

    assert gw.admin("POST", "/admin/tenants", json={"name": "initech"}).status_code == 409

    rotated = gw.admin("POST", "/admin/tenants/initech/rotate")
    new_key = rotated.json()["key"]
    assert rotated.status_code == 200 and new_key != key
    with pytest.raises(openai.AuthenticationError):
        gw.client(key).models.list()
    assert gw.chat(new_key, "alpha", "hi", max_tokens=2).choices[0].message.content is not None

    assert gw.admin("DELETE", "/admin/tenants/initech").json() == {"name": "initech", "deleted": True}
    with pytest.raises(openai.AuthenticationError):
        gw.client(new_key).models.list()
    assert "initech" not in [t["name"] for t in gw.admin("GET", "/admin/tenants").json()["data"]]
    assert gw.admin("DELETE", "/admin/tenants/initech").status_code == 404
    assert gw.admin("POST", "/admin/tenants/initech/rotate").status_code == 404


@pytest.mark.parametrize("body", [
    {"name": "bad name!"},
    {"name": "x", "rpm": 0},
    {"name": "x", "adapters": ["not ok/"]},
    {"name": "x", "surprise": 1},
])
def test_invalid_tenant_is_400(gw, body):
    r = gw.admin("POST", "/admin/tenants", json=body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_tenants_persist_across_restarts(serve_app, tmp_path, gateway_model_dir):
    settings = gateway_settings(tmp_path, gateway_model_dir, {})
    first = serve_app(settings)
    key = first.admin("POST", "/admin/tenants", json={"name": "durable"}).json()["key"]
    second = serve_app(settings)  # a second replica on the same database
    second.wait_ready()
    assert second.chat(key, "tiny", "hi", max_tokens=2).choices[0].message.content is not None


def test_open_mode_without_admin_key_or_tenants(serve_app, tmp_path, gateway_model_dir):
    live = serve_app(gateway_settings(tmp_path, gateway_model_dir, {}, admin_key=None))
    live.wait_ready()
    assert live.chat("anything", "tiny", "hi", max_tokens=3).usage.completion_tokens == 3
    r = httpx.get(f"{live.url}/admin/tenants", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "admin_disabled"
