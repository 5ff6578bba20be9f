"""The plain install is the gateway for vLLM mode, without torch, transformers or peft (the `local`
extra): declared so in pyproject.toml, imported so, and installed so in a fresh venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "accelerate", "safetensors", "gguf", "matplotlib", "tokenizers")
# Imports the vLLM-mode gateway with the heavy libraries made unimportable, then reports what it took.
IMPORT_CHECK = f"""
import json, sys, time
HEAVY = {HEAVY!r}

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Absent())
started = time.perf_counter()
import gateway.app, gateway.engines.vllm, gateway.server
took = time.perf_counter() - started
import salora_cli.main
salora_cli.main.build_parser()  # every command's flags: `salora serve --help` works too
print(json.dumps({{"seconds": took, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}}))
"""


def requirement_names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in requirements}


def test_the_plain_install_declares_none_of_the_heavy_libraries() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not requirement_names(project["dependencies"]) & set(HEAVY)
    assert {"torch", "transformers", "peft"} <= requirement_names(project["optional-dependencies"]["local"])


def import_check(python: str, cwd: Path, env: dict[str, str]) -> dict:
    done = subprocess.run([python, "-c", IMPORT_CHECK], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_vllm_mode_gateway_imports_nothing_heavy() -> None:
    """In the project's venv (where torch is installed, but blocked): the import succeeds and pulls
    none of them. The time is printed, not bounded (a loaded machine; docs/vllm.md has the figures)."""
    report = import_check(sys.executable, ROOT, {**os.environ, "PYTHONPATH": str(ROOT)})
    assert report["loaded"] == []
    print(f"import gateway.app, gateway.engines.vllm, gateway.server: {report['seconds']:.2f} s")


def test_a_fresh_venv_gets_no_torch_from_the_plain_install(tmp_path: Path) -> None:
    """`pip install .` in a plain venv (no system site packages), from the configured package index:
    no heavy library is installed, the gateway imports, and `salora serve` on the in-process engine
    refuses in one line naming the extra."""
    source = tmp_path / "src"  # what the Docker build copies: a clean tree, no build output in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("salora", "gateway", "salora_cli"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([python, "-m", "pip", "install", "-q", str(source)], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, env=env,
                            check=True).stdout
    installed = {p["name"].lower() for p in json.loads(listed)}
    assert "salora-gateway" in installed and "fastapi" in installed
    assert not installed & set(HEAVY), installed & set(HEAVY)
    report = import_check(python, tmp_path, env)
    assert report["loaded"] == []
    print(f"fresh venv: import took {report['seconds']:.2f} s")
    home = {**env, "SALORA_HOME": str(tmp_path / "home")}
    serve = subprocess.run([str(venv / "bin" / "salora"), "serve"], capture_output=True, text=True, env=home,
                           cwd=tmp_path, timeout=300)
    lines = serve.stderr.strip().splitlines()
    assert serve.returncode == 2 and len(lines) == 1, serve.stderr
    assert "salora-gateway[local]" in lines[0] and "torch" in lines[0]
