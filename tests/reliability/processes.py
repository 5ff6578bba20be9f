"""Real processes for the reliability tests: the fake OpenAI upstream (loadtests/upstream.py) standing in
for a vLLM replica that can be killed (SIGKILL), hung (SIGSTOP) and brought back, and the gateway
itself run as `salora serve` so that it can be killed or sent SIGTERM. Each child runs in its own
session and is signalled by its own id only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A child process serving HTTP on `port`, its output in `log`."""

    def __init__(self, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.port, self.log, self.env = argv, port, log, env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Child:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SALORA_") or k == "SALORA_HOME"}
        env = {**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **self.env}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def wait_ready(self, path: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, f"exited; log:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in {timeout} s; log:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a crash would, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a hung (stopped) child cannot handle SIGTERM
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def upstream(log_dir: Path, token_delay_ms: float = 0, tokens: int = 16, port: int | None = None) -> Child:
    """A fake vLLM replica: `tokens` tokens (" hello" each), one every `token_delay_ms`."""
    port = port or free_port()
    argv = [sys.executable, "-m", "loadtests.upstream", "--port", str(port), "--tokens", str(tokens),
            "--token-delay-ms", str(token_delay_ms)]
    return Child(argv, port, log_dir / f"upstream-{port}.log")


@contextmanager
def children(*started: Child) -> Iterator[None]:
    """Stops the children when the block ends, however it ends."""
    try:
        yield
    finally:
        for child in started:
            child.stop()


def gateway(workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> Child:
    """`salora serve` with `config` (YAML) on a free port; `env` adds to its environment (SALORA_CRASH_AT)."""
    port = free_port()
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump({**config, "host": "127.0.0.1", "port": port}))
    return Child([sys.executable, "-m", "salora_cli", "serve", "--config", str(path)], port,
                 workdir / "gateway.log", env)


def sse_lines(response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a streamed answer, as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[6:]
