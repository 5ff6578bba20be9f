"""Crash safety of the adapter lifecycle: a real `salora serve` process on the tiny model is killed
(SIGKILL) in the middle of an upload, after an upload's files are stored, after a canary judged its
probes, and right after a promotion was recorded (`SALORA_CRASH_AT`, gateway/crashpoints.py). After a
restart the registry is consistent: cut uploads are gone with their files, the canary resumes, live
adapters are loaded, granted and callable, and no scratch directory or unreferenced file is left."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import ADMIN_KEY, gateway_model_dir  # noqa: F401  (fixture)
from tests.lifecycle.conftest import CANARY, adapter_files, make_lora
from tests.reliability.processes import Child, gateway

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


class Gateway:
    """One state directory, and `salora serve` on it, started again and again."""

    def __init__(self, workdir: Path, model: Path) -> None:
        self.workdir, self.state = workdir, workdir / "state"
        self.config = {"model": str(model), "model_name": "tiny", "admin_key": ADMIN_KEY,
                       "state_dir": str(self.state), "canary": CANARY}
        self.child: Child | None = None

    def start(self, crash_at: str | None = None, wait_ready: bool = True) -> Gateway:
        """`wait_ready=False` where the crash point is reached by start-up work alone: the process
        may be ready and dead again before a readiness poll lands."""
        self.child = gateway(self.workdir, self.config, {"SALORA_CRASH_AT": crash_at} if crash_at else None).start()
        if wait_ready:
            self.child.wait_ready("/readyz", timeout=120)
        return self

    @property
    def url(self) -> str:
        assert self.child is not None
        return self.child.url

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers=ADMIN, timeout=60, **kwargs)

    def upload(self, name: str, files: dict[str, bytes], tenants: str = "acme") -> httpx.Response:
        return self.admin("POST", "/admin/adapters", data={"name": name, "tenants": tenants},
                          files=[("file", (f, data)) for f, data in files.items()])

    def wait_state(self, name: str, state: str, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            detail = self.admin("GET", f"/admin/adapters/{name}").json()
            if detail.get("state") == state and not detail["canary_running"]:
                return detail
            assert time.monotonic() < deadline, f"{name}: {detail}"
            time.sleep(0.2)

    def crashed(self, timeout: float = 90) -> None:
        """Wait for the crash point to kill the process."""
        assert self.child is not None
        assert self.child.wait_exit(timeout) == -9

    def chat(self, key: str, model: str) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})

    def rows(self) -> dict[str, str]:
        """name -> state, read from the database file itself."""
        with sqlite3.connect(self.state / "gateway.db") as db:
            return dict(db.execute("SELECT name, state FROM adapters"))

    def leftovers(self) -> list[str]:
        """Scratch directories, and stored adapters no record names."""
        stored = {p.name for p in (self.state / "adapters").iterdir() if not p.name.startswith(".")}
        with sqlite3.connect(self.state / "gateway.db") as db:
            known = {h for (h,) in db.execute("SELECT sha256 FROM adapters WHERE sha256 IS NOT NULL")}
        return sorted([p.name for p in (self.state / "adapters" / ".incoming").iterdir()] + list(stored - known))

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@pytest.fixture
def gw(tmp_path: Path, gateway_model_dir: Path) -> Iterator[Gateway]:  # noqa: F811
    gateway_ = Gateway(tmp_path, gateway_model_dir)
    yield gateway_
    gateway_.stop()


@pytest.fixture
def lora(tmp_path: Path, gateway_model_dir: Path) -> dict[str, bytes]:  # noqa: F811
    """A LoRA that changes nothing (B = 0), so it passes the canary."""
    return adapter_files(make_lora(gateway_model_dir, tmp_path / "lora"))


def slow_upload(url: str, name: str, stop: threading.Event) -> None:
    """A multipart upload whose body trickles in until `stop` (or the server dies)."""
    boundary = "salora-test-boundary"

    def body() -> Iterator[bytes]:
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.tar"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        while not stop.is_set():
            yield b"\0" * 65536
            time.sleep(0.05)

    try:
        httpx.post(f"{url}/admin/adapters", content=body(), timeout=60,
                   headers={**ADMIN, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    except httpx.TransportError:
        pass  # the server was killed under it


def test_crashes_mid_upload_leave_nothing_behind(gw: Gateway, lora: dict[str, bytes]) -> None:
    gw.start()
    key = gw.admin("POST", "/admin/tenants", json={"name": "acme", "adapters": []}).json()["key"]
    assert gw.upload("stable", lora).status_code == 202
    stable = gw.wait_state("stable", "live")

    # Killed while an upload's body streams in: its scratch directory is left behind.
    stop = threading.Event()
    uploader = threading.Thread(target=slow_upload, args=(gw.url, "cut", stop))
    uploader.start()
    incoming = gw.state / "adapters" / ".incoming"
    deadline = time.monotonic() + 30
    while not any((p / ".lock").exists() for p in incoming.iterdir()):
        assert time.monotonic() < deadline, "the upload never reached the gateway"
        time.sleep(0.05)
    time.sleep(0.5)  # some megabytes in
    assert gw.child is not None
    gw.child.kill()
    stop.set()
    uploader.join(timeout=30)
    assert gw.leftovers()

    # Killed after an upload's files were stored, before it was loaded: a `validating` record with files.
    gw.start(crash_at="upload:stored")
    with pytest.raises(httpx.TransportError):
        gw.upload("half", {"adapter_model.safetensors": lora["adapter_model.safetensors"],
                           "adapter_config.json": lora["adapter_config.json"].replace(b'"r": 4', b'"r": 4 ')})
    gw.crashed()
    assert gw.rows() == {"stable": "live", "half": "validating"}
    assert gw.leftovers()  # its scratch directory (its stored files are still named by its record)

    gw.start()
    assert gw.rows() == {"stable": "live", "half": "rejected"}  # ended, with the reason, and without files
    half = gw.admin("GET", "/admin/adapters/half").json()
    assert half["sha256"] is None and "cut short" in half["reason"]
    assert gw.leftovers() == []
    assert sorted(p.name for p in (gw.state / "adapters").iterdir()) == [".incoming", stable["sha256"]]
    assert gw.chat(key, "stable").status_code == 200
    # Nothing is stuck: the same name uploads again and goes live.
    response = gw.upload("half", lora)
    assert response.status_code == 202, response.text
    assert gw.wait_state("half", "live")["serving"]
    assert gw.chat(key, "half").status_code == 200


def test_crashes_in_the_canary_and_at_promotion_resume(gw: Gateway, lora: dict[str, bytes]) -> None:
    gw.start(crash_at="canary:judged")
    key = gw.admin("POST", "/admin/tenants", json={"name": "acme", "adapters": []}).json()["key"]
    assert gw.upload("support", lora).status_code == 202
    gw.crashed()  # the canary judged every probe, nothing of it recorded
    assert gw.rows() == {"support": "probing"}

    gw.start(crash_at="promote:recorded", wait_ready=False)  # the canary runs again at start, passes, is cut at promotion
    gw.crashed()
    assert gw.rows() == {"support": "live"}  # recorded live; the process died before granting it to acme

    gw.start()
    detail = gw.wait_state("support", "live")
    assert detail["serving"] and detail["tenants"] == ["acme"]
    assert [(r["trigger"], r["result"]) for r in detail["runs"]] == [("restart", "pass")]
    assert [(e["action"], e["to_state"]) for e in detail["audit"]] == [
        ("upload", "uploaded"), ("validate", "validating"), ("probe", "probing"), ("promote", "live")]
    models = httpx.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert "support" in [m["id"] for m in models]
    assert gw.chat(key, "support").status_code == 200
    assert gw.leftovers() == []
