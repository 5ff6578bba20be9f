"""Real PostgreSQL, Redis and vLLM servers on free loopback ports in temporary folders, for the tests
and benchmarks that need them: PostgreSQL and Redis from Debian's packages (installed by `make
test-deps`), vLLM from its own venv (`make vllm-venv`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import redis

from loadtests.stack import free_port


def _pg_bin(name: str) -> str:
    """Debian keeps the server binaries out of PATH, under /usr/lib/postgresql/<version>/bin."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for folder in versions:
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    assert found, f"{name} not found: `make test-deps` installs PostgreSQL (Debian package postgresql)"
    return found


def _as_postgres(argv: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class Postgres:
    root: Path
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    @classmethod
    def start(cls, root: Path) -> Postgres:
        data, sockets = root / "data", root / "sockets"
        sockets.mkdir()
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
            shutil.chown(sockets, "postgres")
        subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]),
                       check=True, capture_output=True)
        port = free_port()
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"),
                                     "-w", "-t", "60", "start"]), check=True, capture_output=True)
        return cls(root, port)

    def stop(self) -> None:
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop"]),
                       capture_output=True)


class Redis:
    """`redis-server` in the foreground, nothing on disk; `kill` and `start` again to test an outage."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        server = shutil.which("redis-server")
        assert server, "redis-server not found: `make test-deps` installs it (Debian package redis-server)"
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen([server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", str(self.root)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        client = redis.Redis.from_url(self.url)
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class VLLMServer:
    """A real `vllm.entrypoints.openai.api_server` process (and its engine children, in their own
    process group) on a free port."""

    process: subprocess.Popen
    url: str
    log: Path

    @classmethod
    def start(cls, python: Path, model_dir: Path, served_name: str, log: Path, *, max_loras: int = 4,
              lora: bool = True, dtype: str = "float32", max_model_len: int = 2048) -> VLLMServer:
        """Start (not wait for) a CPU vLLM server; runtime adapter loading is allowed."""
        port = free_port()
        argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", served_name, "--dtype", dtype, "--max-model-len", str(max_model_len),
                "--host", "127.0.0.1", "--port", str(port)]
        if lora:
            argv += ["--enable-lora", "--max-lora-rank", "64", "--max-loras", str(max_loras)]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return cls(process, f"http://127.0.0.1:{port}", log)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"vLLM exited; log tail:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"vLLM not ready in {timeout} s; log tail:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)

    def freeze(self) -> None:
        """SIGSTOP the server's process group: it keeps its sockets but answers nothing (a hung replica)."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL the server's process group at once (a crashed replica)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
