"""`salora serve` as users run it: a subprocess configured by a YAML file, the environment and flags;
bad settings end in one line and exit code 2; and with no config at all, the embedded model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import yaml
from openai import OpenAI

from gateway.settings import load_settings
from salora.errors import SaLoRAError
from salora.models import EMBEDDED_ID
from tests.gateway.conftest import ADMIN_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any SALORA_* setting of the developer's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALORA_") or k == "SALORA_HOME"}
    return {**env, **extra}


@contextmanager
def salora_serve(*args: str, env: dict[str, str], ready_within: float) -> Iterator[tuple[str, float]]:
    """Run `salora serve ARGS`; yield its base URL and the seconds it took to be ready."""
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "salora_cli", "serve", *args, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() - started < ready_within, "not ready in time"
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_with_config_file_env_and_flags(tmp_path, gateway_model_dir, adapter_dirs):
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(gateway_model_dir),
        "model_name": "from-yaml",
        "adapters": {"alpha": str(adapter_dirs["alpha"])},
        "admin_key": ADMIN_KEY,
        "state_dir": str(tmp_path / "state"),
        "port": 1,  # overridden by --port
    }))
    env = clean_env(SALORA_MODEL_NAME="from-env")  # the environment overrides the file
    with salora_serve("--config", str(config), env=env, ready_within=120) as (url, _):
        created = httpx.post(f"{url}/admin/tenants", json={"name": "cli"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        client = OpenAI(base_url=f"{url}/v1", api_key=created.json()["key"], max_retries=0)
        assert [m.id for m in client.models.list().data] == ["from-env", "alpha"]
        answer = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert answer.usage.completion_tokens == 3


@pytest.mark.parametrize("content, message", [
    ({"model": "/no/such/dir"}, "not a model directory"),
    ({"adapters": {"a": "/no/such/adapter"}}, "not a PEFT adapter directory"),
    ({"portt": 9000}, "portt"),
    ({"limits": {"max_tokens": 0}}, "limits.max_tokens"),
])
def test_bad_settings_are_one_line_errors(tmp_path, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(content))
    with pytest.raises(SaLoRAError, match=message):
        load_settings(config)


def test_serve_with_bad_settings_exits_2_with_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: /no/such/dir\n")
    proc = subprocess.run([sys.executable, "-m", "salora_cli", "serve", "--config", str(config)], env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("salora serve: error: invalid settings: model:") and "not a model directory" in proc.stderr


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(SaLoRAError, match="no such file"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.slow
def test_embedded_default_serves_an_openai_chat(tmp_path):
    """The README's first command: `salora serve` with no config, the embedded model, open locally."""
    env = clean_env(SALORA_STATE_DIR=str(tmp_path))  # the model cache stays shared in SALORA_HOME
    with salora_serve(env=env, ready_within=300) as (url, seconds):
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(
            model=EMBEDDED_ID, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
            temperature=0)
        assert "Paris" in answer.choices[0].message.content
        print(f"embedded gateway ready in {seconds:.1f} s")


def test_precedence_file_then_environment_then_flags(tmp_path, monkeypatch, gateway_model_dir):
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"model": str(gateway_model_dir), "port": 1000,
                                      "limits": {"max_tokens": 100, "default_max_tokens": 10}}))
    monkeypatch.setenv("SALORA_PORT", "2000")
    monkeypatch.setenv("SALORA_LIMITS__MAX_TOKENS", "50")
    settings = load_settings(config)
    assert settings.model == str(gateway_model_dir) and settings.port == 2000
    assert (settings.limits.max_tokens, settings.limits.default_max_tokens) == (50, 10)
    assert load_settings(config, port=3000).port == 3000
    monkeypatch.setenv("SALORA_CONFIG", str(config))
    assert load_settings().model == str(gateway_model_dir)
