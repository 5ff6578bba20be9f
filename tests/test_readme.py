"""The README's commands run as written, so they cannot rot: every ```bash block and the Python
snippet is executed here, shortened by environment (a tiny random model in place of the embedded
one, one training step). Each shortening is a literal substitution that must match, so a change to
the README that these tests do not know about fails here instead of going untested. Also: nothing
a fresh clone runs needs data from outside the repository."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

QUICK_START = ["make serve", "make test"]
# (README text, what runs instead, why)
SHORTENINGS = [
    ("--model embedded", "--model {tiny}", "a tiny random Llama instead of the 135M embedded model"),
    (" --generate-responses", "", "a random model refuses nothing, so it would keep no refusals; the example data has them"),
    ("--epochs 1", "--epochs 1 --max-steps 1", "one training step"),
]


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's command lines: comments and blank lines dropped, trailing comments cut."""
    lines = [line.split(" #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def shorten(block: str, tiny: Path) -> str:
    for text, replacement, why in SHORTENINGS:
        assert text in block, f"README no longer has {text!r} ({why}): update SHORTENINGS in tests/test_readme.py"
        block = block.replace(text, replacement.format(tiny=tiny))
    return block


def test_every_bash_block_is_known():
    """The quick start (not run here: `make test` is what runs this) and the train pipeline; a new
    block needs a test here."""
    found = blocks("bash")
    assert len(found) == 2, f"README has {len(found)} bash blocks; each needs a test in tests/test_readme.py"
    assert commands(found[0]) == QUICK_START
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert commands(found[1])[0] == ". .venv/bin/activate"


def test_readme_files_exist():
    """Every repository path a README command names exists in a fresh clone."""
    pipeline = blocks("bash")[1]
    named = set(re.findall(r"\bexamples/[\w./-]+", pipeline))
    assert named == {"examples/harmful.jsonl", "examples/task.jsonl", "examples/prompts.csv"}, named
    for path in named:
        assert (REPO / path).is_file(), path


def test_train_pipeline_runs_as_written(tiny_model_dir: Path, tmp_path: Path):
    """The calibrate -> train -> export -> eval -> compare block, run by bash from a directory laid
    out like the repository root (its `.venv` and `examples/`), on the tiny model."""
    activate = Path(sys.prefix) / "bin" / "activate"
    if not activate.is_file():
        pytest.skip("not running inside a venv (make test always does)")
    (tmp_path / ".venv").symlink_to(sys.prefix)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    script = shorten(blocks("bash")[1], tiny_model_dir)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "SALORA_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in ("safety/safety.json", "ckpt/salora_config.json", "adapter/adapter_config.json", "eval.json",
                 "base.json"):
        assert (tmp_path / path).is_file(), path
    assert (tmp_path / "refusals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_snippet_runs_against_a_local_gateway(tiny_model_dir: Path, tmp_path: Path):
    """The quick start's `openai` snippet, run by the venv's python against `salora serve` on the
    tiny model (on a free port instead of 8000)."""
    (snippet,) = blocks("python")
    assert "http://127.0.0.1:8000/v1" in snippet
    port = free_port()
    env = {**os.environ, "SALORA_MODEL": str(tiny_model_dir), "SALORA_PORT": str(port),
           "SALORA_STATE_DIR": str(tmp_path / "state"), "SALORA_HOME": str(tmp_path / "home")}
    for key in ("SALORA_ADMIN_KEY", "SALORA_CONFIG", "SALORA_HOST"):
        env.pop(key, None)
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "salora_cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not get ready"
            time.sleep(0.2)
        code = snippet.replace("http://127.0.0.1:8000/v1", f"http://127.0.0.1:{port}/v1")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.endswith("\n") and proc.stdout != "None\n", proc.stdout  # the random model's words may be blank
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# What a fresh clone lacks: the maintainers' `../shared` folder (public evaluation data) and, for a
# user of the package, the benchmarks.
OUTSIDE = re.compile(r"""\.\./shared|["']shared["']\s*/\s*["']data["']|advbench_dev|^\s*(from|import)\s+benchmarks\b""", re.M)


def test_nothing_a_fresh_clone_runs_reads_shared_data_or_imports_benchmarks():
    hits = []
    for folder in ("salora", "salora_cli", "gateway", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == Path(__file__):
                continue
            for match in OUTSIDE.finditer(path.read_text(encoding="utf-8")):
                hits.append(f"{path.relative_to(REPO)}: {match.group(0).strip()}")
    assert not hits, hits
