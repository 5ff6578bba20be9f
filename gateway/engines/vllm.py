"""The vLLM engine: one or more vLLM OpenAI servers (replicas of one model) behind the gateway.

- **Chat.** Each request goes to one replica: streamed requests are streamed from vLLM over a pooled
  `aiohttp.ClientSession`, the others fetched in one response over `http1.PostPool`, a lean
  httptools client with aiohttp's error types (`upstream.py` speaks the protocol). Usage comes
  from vLLM, so token metrics and limits count what vLLM counted. Not httpx on this path: httpx
  cost 5x aiohttp's CPU per request, and its pool checks every idle connection on every request;
  aiohttp in turn cost 3-5x the lean client's (docs/performance.md). Health checks and adapter
  operations, a few a second, use httpx.
- **Adapters.** Loaded at run time with vLLM's `POST /v1/load_lora_adapter` (the server needs
  `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`) and unloaded with
  `/v1/unload_lora_adapter`. vLLM reads the files itself, so they must lie on a volume both see:
  `adapter_dir` here, `upstream_adapter_dir` there. An adapter from elsewhere is copied onto it.
- **Affinity.** A request on an adapter goes to the least busy healthy replica that holds it. When
  none does, the adapter is loaded on a replica with a free slot (`max_loras`, vLLM's --max-loras),
  else on one whose least recently used idle adapter is unloaded first, else on the least busy one
  (vLLM then queues it for a slot rather than the gateway refusing it).
- **Failure.** A request is retried on another replica as long as nothing of its answer has been
  passed on: any non-streamed request, and a stream before its first token. A replica that drops a
  connection is health-checked at once and, if down, skipped; one that times out (no first token
  within `timeouts.first_token_s`, no byte within `request_timeout_s`) is not tried again for that
  request. `timeouts.total_s` bounds the whole request, retries included. A health loop (`GET /health`) brings
  replicas back; on its way back a replica's adapters are re-read from `/v1/models` and the shared
  volume is checked again by loading a tiny zero probe adapter from it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from gateway.adapters import tensors as st
from gateway.engines.base import Chunk, EngineError, GenerationRequest, RequestRejected
from gateway.engines.http1 import PostPool
from gateway.engines.upstream import (
    JSON_HEADERS,
    UpstreamError,
    error_message,
    parse_completion,
    rejected,
    request_body,
    stream_chunks,
    upstream_error,
    upstream_path,
)
from gateway.settings import Timeouts, VLLMConfig
from salora.errors import SaLoRAError
from salora.modeldir import resolve_model_dir

log = logging.getLogger(__name__)

PROBE = "salora-volume-probe"  # the probe adapter's name in vLLM and its directory under adapter_dir


@dataclass(eq=False)
class Replica:
    url: str
    up: bool = False
    reason: str = "not checked yet"  # why it is down
    lora_error: str | None = None  # why it cannot load adapters (None: it can)
    held: dict[str, float] = field(default_factory=dict)  # adapter -> last use (monotonic), for LRU eviction
    loading: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    active: Counter[str | None] = field(default_factory=Counter)  # requests in flight by adapter (None: base)
    inflight: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one load or unload at a time on this replica


class _ReplicaFailed(Exception):
    """The replica did not answer an adapter operation (it has been marked down): try another."""


class _WrongModel(Exception):
    """The replica serves another model than the configured base: it is never used."""


@dataclass(frozen=True)
class BaseFacts:
    """What a vLLM server shows of its model that the configured base can be checked against."""

    max_positions: int | None  # config.json's max_position_embeddings
    specials: tuple[tuple[int, str], ...]  # (id, spelling) of tokenizer.json's special tokens, at most 16


def base_facts(model_dir: Path) -> BaseFacts:
    """Read from the base directory's config.json and tokenizer.json (no model, no tokenizer library)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    positions = config.get("max_position_embeddings")
    tokenizer = model_dir / "tokenizer.json"
    specials: list[tuple[int, str]] = []
    if tokenizer.is_file():
        added = json.loads(tokenizer.read_text(encoding="utf-8")).get("added_tokens", [])
        specials = sorted((t["id"], t["content"]) for t in added if t.get("special") and t.get("content"))
    return BaseFacts(positions if isinstance(positions, int) else None, tuple(specials[:16]))


class VLLMEngine:
    """vLLM servers for `model_id` (the name clients use for the base model); `probe_model` is the
    base model's spec (a directory or `embedded`), used to build the shared-volume probe adapter."""

    def __init__(
        self,
        name: str,
        config: VLLMConfig,
        model_id: str,
        adapters: dict[str, Path] | None = None,
        *,
        probe_model: str | None = None,
        on_error: Callable[[str], None] | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        # httpx logs every request at INFO: one line per chat request and health check is noise, and
        # formatting it costs the hot path.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.name = name
        self.model_id = model_id
        self._error: str | None = None  # why the start failed
        self._config = config
        self._timeouts = timeouts or Timeouts()
        self._replicas = [Replica(url) for url in config.urls]
        self._initial = dict(adapters or {})
        self._probe_model = probe_model
        self._on_error = on_error or (lambda kind: None)
        self._paths: dict[str, str] = {}  # registered adapter -> its directory as vLLM sees it
        self._names: frozenset[str] = frozenset()  # the registered adapters that requests may use
        self._model = config.model  # the base model's name upstream; read from the first replica if None
        headers = {"authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else {}
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None  # streamed chat requests (see _chat_session)
        # Non-streamed chat requests: a fifth of aiohttp's client CPU per request (gateway/engines/http1.py).
        self._posts = PostPool(limit=config.max_connections, keepalive_s=4, connect_timeout_s=config.connect_timeout_s,
                               read_timeout_s=config.request_timeout_s, headers=headers)
        # Health checks and adapter operations. Idle connections expire after 4 s, before vLLM's
        # keep-alive (5 s) closes them: with httpx's default, also 5 s, a health check every 5 s
        # sometimes reused a connection the server was closing, and one such check took the replica
        # out for a whole interval (a 10-minute soak saw 250 requests answered 503).
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(config.request_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=config.max_connections,
                                keepalive_expiry=4),
        )
        self._watcher: asyncio.Task[None] | None = None
        self._some_up = asyncio.Event()
        self._wrong_model = asyncio.Event()  # a replica serves another model than the configured base
        self._base: BaseFacts | None = None  # what the replicas' model must show of the configured base
        self._started = False
        upstream_dir = config.upstream_adapter_dir or (str(config.adapter_dir) if config.adapter_dir else "")
        self._upstream_dir = upstream_dir.rstrip("/")
        self._probe_path = ""  # the probe adapter as vLLM sees it, once written

    @property
    def ready(self) -> bool:
        return self._started and any(r.up for r in self._replicas)

    @property
    def error(self) -> str | None:
        """Why the engine cannot serve: its start failed, or every replica is down after the start
        (None while it starts: the gateway reports loading)."""
        if self._error is None and self._started and not self.ready:
            return f"no replica of the {self.name} engine is up ({self._reasons()})"
        return self._error

    def _reasons(self) -> str:
        return "; ".join(f"{r.url}: {r.reason}" for r in self._replicas if not r.up)

    def adapters(self) -> frozenset[str]:
        return self._names

    async def start(self) -> None:
        """Check the shared adapter volume on this side, start health checks, wait for a replica,
        then load the configured adapters. Until a replica answers, the gateway reports loading."""
        adapter_dir = self._config.adapter_dir
        if adapter_dir is not None:
            try:
                self._probe_path = await asyncio.to_thread(self._write_probe, adapter_dir)
            except Exception as e:
                self._error = f"the {self.name} engine's adapter_dir {adapter_dir}: {e}"
                raise EngineError(self._error, kind="load") from e
        if self._probe_model is not None:
            try:
                self._base = await asyncio.to_thread(base_facts, resolve_model_dir(self._probe_model))
            except (SaLoRAError, OSError, ValueError) as e:
                self._error = f"the {self.name} engine cannot read its base {self._probe_model}: {e}"
                raise EngineError(self._error, kind="load") from e
        await self._check_all()  # every replica that is up now is known before the first request
        self._watcher = asyncio.create_task(self._watch())
        waits = [asyncio.ensure_future(event.wait()) for event in (self._some_up, self._wrong_model)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not self._some_up.is_set():
            self._error = f"the {self.name} engine refuses to start: {self._reasons()}"
            raise EngineError(self._error, kind="load")
        for name, path in self._initial.items():
            try:
                await self.load_adapter(name, path)
            except (EngineError, RequestRejected, ValueError, OSError) as e:
                self._error = f"cannot load adapter {name}: {e}"
                raise EngineError(self._error, kind="load") from e
        self._started = True

    async def close(self) -> None:
        """Stop health checks and close connections. Adapters stay loaded on the replicas: another
        gateway may be using them, and a restarted gateway finds them again."""
        if self._watcher is not None:
            self._watcher.cancel()
        await self._client.aclose()
        self._posts.close()
        if self._session is not None:
            await self._session.close()

    def _chat_session(self) -> aiohttp.ClientSession:
        """The chat path's connection pool, made on first use (aiohttp needs the running loop).
        Idle connections are dropped after 4 s, before vLLM's own keep-alive (5 s) closes them
        under a request."""
        if self._session is None:
            config = self._config
            self._session = aiohttp.ClientSession(
                headers=self._headers, read_bufsize=1 << 20,  # lines (events) up to 2 MiB
                connector=aiohttp.TCPConnector(limit=config.max_connections, keepalive_timeout=4),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s,
                                              sock_read=config.request_timeout_s))
        return self._session

    # --- chat ----------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        adapter = request.adapter
        if not self.ready:
            raise EngineError(self.error or f"no replica of the {self.name} engine is up yet")
        if adapter is not None and adapter not in self._names:
            raise EngineError(f"adapter {adapter!r} is not loaded")
        body, path = request_body(request, adapter or self._model or ""), upstream_path(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeouts.total_s
        tried: set[Replica] = set()
        failures: dict[str, str] = {}  # replica URL -> why it did not answer this request
        attempts = 0
        while True:
            replica = await self._place(adapter, tried, failures)
            attempts += 1
            sent = False
            try:
                if not request.stream:
                    status, content = await self._posts.post(replica.url + path, body, max(deadline - loop.time(), 0.001))
                    if status != 200:
                        retry = self._refused(replica, adapter, status, content, failures)
                        if retry is not None:
                            self._retrying(replica, retry, tried, attempts)
                            continue
                    chunk = parse_completion(content)
                    sent = True
                    yield chunk
                    return
                async with self._chat_session().post(replica.url + path, data=body, headers=JSON_HEADERS,
                                                     timeout=self._attempt_timeout(deadline - loop.time())) as response:
                    if response.status != 200:
                        retry = self._refused(replica, adapter, response.status, await response.read(), failures)
                        if retry is not None:
                            self._retrying(replica, retry, tried, attempts)
                            continue
                    chunks = stream_chunks(_lines(response.content))
                    async with asyncio.timeout(self._timeouts.first_token_s):  # per replica tried
                        chunk = await anext(chunks)
                    sent = True
                    yield chunk
                    async for chunk in chunks:
                        yield chunk
                    return
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as e:
                # Timeouts (connect, read, first token, total) are TimeoutErrors, aiohttp's included.
                if loop.time() >= deadline:
                    raise EngineError(f"the {self.name} engine gave no complete answer within timeouts.total_s "
                                      f"({self._timeouts.total_s:g} s)", kind="timeout") from e
                why = self._failure(e)
                if sent:
                    raise EngineError(f"vLLM at {replica.url} failed mid-answer: {why}",
                                      kind="timeout" if isinstance(e, TimeoutError) else "upstream") from e
                failures[replica.url] = why
                await self._check(replica, refused=isinstance(e, aiohttp.ClientConnectorError))
                if not replica.up or isinstance(e, TimeoutError) or attempts > len(self._replicas):
                    tried.add(replica)  # a replica that timed out would most likely time out again
                self._on_error("retry")
            finally:
                self._release(replica, adapter)

    def _retrying(self, replica: Replica, retry: set[Replica], tried: set[Replica], attempts: int) -> None:
        """Before trying again after a refusal: the replicas not to try again."""
        tried.update(retry)
        if attempts > len(self._replicas):
            tried.add(replica)
        self._on_error("retry")

    def _attempt_timeout(self, remaining: float) -> aiohttp.ClientTimeout:
        """aiohttp's limits for one try: connect, the longest pause between two bytes, and what is
        left of the request's total."""
        config = self._config
        return aiohttp.ClientTimeout(total=max(remaining, 0.001), sock_connect=config.connect_timeout_s,
                                     sock_read=config.request_timeout_s)

    def _failure(self, error: Exception) -> str:
        """Why one try failed, in words (aiohttp's timeouts have empty messages)."""
        if isinstance(error, aiohttp.ConnectionTimeoutError):
            return f"no connection within connect_timeout_s ({self._config.connect_timeout_s:g} s)"
        if isinstance(error, aiohttp.SocketTimeoutError):
            return f"no byte within request_timeout_s ({self._config.request_timeout_s:g} s)"
        if isinstance(error, TimeoutError):
            return f"no first token within timeouts.first_token_s ({self._timeouts.first_token_s:g} s)"
        return repr(error)

    def _refused(self, replica: Replica, adapter: str | None, status: int, content: bytes,
                 failures: dict[str, str]) -> set[Replica] | None:
        """What a non-200 answer means: raise when no replica would do better; else return the
        replicas not to try again (empty: this one may be tried again)."""
        message = error_message(content)
        if status in (400, 422):
            raise rejected(content)
        failures[replica.url] = f"{status} {message}"
        if status == 404 and adapter is not None and adapter in replica.held:
            replica.held.pop(adapter)  # it restarted or another gateway unloaded it: load it again
            return set()
        if status == 429 or status >= 500:
            return {replica}
        raise EngineError(f"vLLM at {replica.url} answered {status}: {message}", kind="upstream")

    # --- placement -----------------------------------------------------------------------------

    async def _place(self, adapter: str | None, tried: set[Replica], failures: dict[str, str]) -> Replica:
        """A replica for one request on `adapter` (None: the base model), claimed for it: the
        caller releases it with `_release`. Loads the adapter there if needed."""
        while True:
            up = [r for r in self._replicas if r.up and r not in tried]
            if not up:
                reasons = {**{r.url: r.reason for r in self._replicas if not r.up}, **failures}
                detail = "; ".join(f"{url}: {reason}" for url, reason in reasons.items())
                raise EngineError(f"no replica of the {self.name} engine can serve this request ({detail})")
            if adapter is None:
                return self._claim(min(up, key=_busy), None)
            capable = [r for r in up if r.lora_error is None]
            if not capable:
                reasons = "; ".join(f"{r.url}: {r.lora_error}" for r in up)
                raise EngineError(f"no replica of the {self.name} engine can load adapters ({reasons})", kind="adapter")
            holders = [r for r in capable if adapter in r.held]
            if holders:
                return self._claim(min(holders, key=_busy), adapter)
            replica = next((r for r in capable if adapter in r.loading), None) or self._target(capable, adapter)
            self._claim(replica, adapter)  # before loading, so that nothing evicts it in between
            try:
                await self._ensure_loaded(replica, adapter)
            except _ReplicaFailed as e:
                self._release(replica, adapter)
                failures[replica.url] = str(e)
                tried.add(replica)
                continue
            except BaseException:
                self._release(replica, adapter)
                raise
            return replica

    def _target(self, capable: list[Replica], adapter: str) -> Replica:
        """Where to load an adapter no replica holds (as far as this gateway knows). Replicas are
        ranked by rendezvous hashing of (adapter, replica), so every gateway ranks them alike and,
        seeing the same replicas, picks the same one: gateways agree on an adapter's home without
        talking to each other. The load is bounded: the first in rank with a free slot, else the
        first with an idle adapter to evict, else the first."""
        ranked = sorted(capable, key=lambda r: _rank(adapter, r.url))
        limit = self._config.max_loras
        free = [r for r in ranked if len(r.held) + len(r.loading) < limit]
        if free:
            return free[0]
        return next((r for r in ranked if _victim(r, adapter) is not None), ranked[0])

    @staticmethod
    def _claim(replica: Replica, adapter: str | None) -> Replica:
        replica.inflight += 1
        replica.active[adapter] += 1
        if adapter in replica.held:
            replica.held[adapter] = time.monotonic()  # type: ignore[index]
        return replica

    @staticmethod
    def _release(replica: Replica, adapter: str | None) -> None:
        replica.inflight -= 1
        replica.active[adapter] -= 1

    # --- adapters ------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: Path) -> None:
        """Make `name` servable: stage its files on the shared volume and load it on one replica
        (so a bad adapter fails here, at promotion, not on a tenant's first request)."""
        if name in self._paths:
            raise ValueError(f"adapter {name!r} is already loaded")
        if self._config.adapter_dir is None:
            raise EngineError(f"the {self.name} engine has no adapter_dir, so it cannot load adapters", kind="adapter")
        if not any(r.up for r in self._replicas):
            raise EngineError(f"no replica of the {self.name} engine is up to load adapter {name!r}")
        self._paths[name] = await asyncio.to_thread(self._stage, name, Path(path))
        try:
            # A replica that already holds this name got it before this gateway knew it, perhaps from
            # other files: load it there again, from these files. Else load it on one replica.
            reloaded = False
            for replica in [r for r in self._replicas if r.up and r.lora_error is None and name in r.held]:
                try:
                    await self._ensure_loaded(replica, name)
                    reloaded = True
                except _ReplicaFailed:
                    pass
            if not reloaded:
                self._release(await self._place(name, set(), {}), name)
        except BaseException:
            self._paths.pop(name, None)
            raise
        self._names = self._names | {name}

    async def unload_adapter(self, name: str) -> None:
        """Stop new requests on `name` at once, let those in flight finish (up to drain_timeout_s),
        then unload it from every replica that holds it."""
        if name not in self._paths:
            raise KeyError(f"adapter {name!r} is not loaded")
        self._names = self._names - {name}
        del self._paths[name]
        for replica in self._replicas:
            loading = replica.loading.get(name)
            if loading is not None:
                await asyncio.wait([loading])
            deadline = time.monotonic() + self._config.drain_timeout_s
            while replica.active[name] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            async with replica.lock:
                if name in replica.held and replica.up:
                    try:
                        await self._unload_on(replica, name)
                    except _ReplicaFailed:
                        pass  # down: it lost the adapter, or forgets it when it comes back (not re-adopted)

    async def _ensure_loaded(self, replica: Replica, adapter: str) -> None:
        """Load `adapter` on `replica`, or wait for the load already under way there."""
        future = replica.loading.get(adapter)
        if future is None:
            future = asyncio.ensure_future(self._load_on(replica, adapter))
            replica.loading[adapter] = future

            def done(f: asyncio.Future[None]) -> None:
                if replica.loading.get(adapter) is f:
                    del replica.loading[adapter]
                if not f.cancelled():
                    f.exception()  # retrieved here: every waiter may have gone

            future.add_done_callback(done)
        await asyncio.shield(future)

    async def _load_on(self, replica: Replica, adapter: str) -> None:
        """Load (in place: whatever the replica held under this name is replaced by our files)."""
        async with replica.lock:
            path = self._paths.get(adapter)
            if path is None:
                raise EngineError(f"adapter {adapter!r} was unloaded")
            if await self._held_by_others(replica, adapter, path):
                return
            if adapter not in replica.held and len(replica.held) >= self._config.max_loras:
                victim = _victim(replica, adapter)
                if victim is not None:
                    await self._unload_on(replica, victim)
            started = time.perf_counter()
            response = await self._post(replica, "/v1/load_lora_adapter",
                                        {"lora_name": adapter, "lora_path": path, "load_inplace": True})
            error = upstream_error(response.content)
            message = error.message
            if response.status_code == 200:
                replica.held[adapter] = time.monotonic()
                log.info("loaded adapter %s on %s in %.0f ms", adapter, replica.url, 1000 * (time.perf_counter() - started))
                return
        if _unreadable_path(response.status_code, error):
            replica.lora_error = self._unreadable(path, message)
            log.error("%s: %s", replica.url, replica.lora_error)
            raise _ReplicaFailed(replica.lora_error)
        if response.status_code in (400, 422):
            raise RequestRejected(f"vLLM rejected adapter {adapter!r}: {message}", code="invalid_adapter")
        raise EngineError(f"vLLM at {replica.url} could not load adapter {adapter!r}: {response.status_code} {message}",
                          kind="adapter")

    async def _held_by_others(self, replica: Replica, adapter: str, path: str) -> bool:
        """Before loading: what the replica holds now, as other gateways may have loaded adapters
        there. Adapters this gateway serves, loaded from the same (content-addressed) files, are
        taken as held, counted as just used so that this gateway's own idle ones are evicted first;
        whether `adapter` itself is among them (nothing to load) is the answer."""
        try:
            response = await self._client.get(replica.url + "/v1/models", timeout=self._config.connect_timeout_s)
            response.raise_for_status()
            roots = {m["id"]: m.get("root") for m in response.json()["data"] if m.get("parent")}
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return False  # the load itself will tell what is wrong
        now = time.monotonic()
        for name, root in roots.items():
            if name not in replica.held and self._paths.get(name) == root:
                replica.held[name] = now
        for name in [n for n in replica.held if n not in roots and not replica.active[n]]:
            del replica.held[name]  # evicted by another gateway: no request of ours may go there
        if roots.get(adapter) == path:
            log.info("adapter %s is on %s already (another gateway loaded it)", adapter, replica.url)
            replica.held[adapter] = now
            return True
        return False

    async def _unload_on(self, replica: Replica, adapter: str) -> None:
        """Unload (the caller holds replica.lock). Forgotten first, so no new request picks it here."""
        replica.held.pop(adapter, None)
        started = time.perf_counter()
        response = await self._post(replica, "/v1/unload_lora_adapter", {"lora_name": adapter})
        if response.status_code not in (200, 404):  # 404: it was gone already
            log.warning("unloading %s from %s: %s %s", adapter, replica.url, response.status_code,
                        error_message(response.content))
            return
        log.info("unloaded adapter %s from %s in %.0f ms", adapter, replica.url, 1000 * (time.perf_counter() - started))

    async def _post(self, replica: Replica, path: str, payload: dict[str, str | bool]) -> httpx.Response:
        try:
            return await self._client.post(replica.url + path, json=payload)
        except httpx.TransportError as e:
            self._down(replica, f"{path}: {e!r}")
            raise _ReplicaFailed(f"{path}: {e!r}") from e

    def _stage(self, name: str, path: Path) -> str:
        """The adapter's directory as vLLM sees it; copied onto the shared volume (under a name
        with its content hash, written atomically) unless it already lies there."""
        root = self._config.adapter_dir
        assert root is not None
        src, root = path.expanduser().resolve(), root.resolve()
        if not (src / "adapter_config.json").is_file():
            raise ValueError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
        if src.is_relative_to(root):
            return f"{self._upstream_dir}/{src.relative_to(root).as_posix()}"
        files = sorted(f for f in src.iterdir() if f.is_file())
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        staged = f"{name}-{digest.hexdigest()[:16]}"
        dest = root / staged
        if not dest.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{staged}.", dir=root))
            try:
                for f in files:
                    shutil.copyfile(f, tmp / f.name)
                os.replace(tmp, dest)
            except OSError:
                if not dest.is_dir():  # else another gateway staged the same files first
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return f"{self._upstream_dir}/{staged}"

    # --- health --------------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._config.health_interval_s)
            await self._check_all()

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(r) for r in self._replicas))

    async def _check(self, replica: Replica, refused: bool = False) -> None:
        """Health-check one replica; on its way up, read what it holds and check the volume."""
        if refused:
            self._down(replica, "connection refused")
            return
        try:
            response = await self._client.get(replica.url + self._config.health_path,
                                               timeout=self._config.connect_timeout_s)
            if response.status_code != 200:
                self._down(replica, f"{self._config.health_path} answered {response.status_code}")
                return
            if not replica.up:
                await self._adopt(replica)
        except _WrongModel as e:
            self._down(replica, str(e))
            log.error("%s engine: replica %s: %s", self.name, replica.url, e)
            self._wrong_model.set()
            return
        except (httpx.HTTPError, ValueError, KeyError, TypeError, _ReplicaFailed) as e:
            self._down(replica, repr(e))
            return
        if not replica.up:
            replica.up = True
            log.info("%s engine: replica %s is up (model %s, adapters %s, %s)", self.name, replica.url, self._model,
                     sorted(replica.held) or "none", replica.lora_error or "adapters ok")
            self._some_up.set()

    async def _adopt(self, replica: Replica) -> None:
        """Read the replica's model and loaded adapters, and check that it reads the shared volume."""
        response = await self._client.get(replica.url + "/v1/models", timeout=self._config.connect_timeout_s)
        response.raise_for_status()
        models = response.json()["data"]
        ids = [m["id"] for m in models]
        base = self._model or next((m["id"] for m in models if not m.get("parent")), ids[0])
        if base not in ids:
            raise _WrongModel(f"it serves {ids}, not the configured model {base!r}")
        if self._base is not None:
            await self._check_base(replica, base, next(m for m in models if m["id"] == base))
        self._model = base
        replica.held = {i: 0.0 for i in ids if i not in (base, PROBE)}
        replica.lora_error = await self._probe(replica) if self._config.adapter_dir is not None else None

    async def _check_base(self, replica: Replica, model: str, card: dict[str, object]) -> None:
        """That `model` on the replica is the configured base, as far as vLLM shows it: a context no
        longer than the base's, and the base's special tokens at the base's ids (its vocabulary)."""
        base = self._base
        assert base is not None
        length = card.get("max_model_len")
        if isinstance(length, int) and base.max_positions is not None and length > base.max_positions:
            raise _WrongModel(f"it serves {model!r} with a context of {length} tokens, more than the "
                              f"{base.max_positions} of the configured base {self._probe_model}: another model")
        if not base.specials:
            return
        text = "".join(content for _, content in base.specials)
        response = await self._client.post(replica.url + "/tokenize", timeout=self._config.connect_timeout_s,
                                           json={"model": model, "prompt": text, "add_special_tokens": False})
        if response.status_code in (404, 405) and upstream_error(response.content).type is None:
            log.warning("%s engine: replica %s has no /tokenize: its vocabulary is not checked", self.name, replica.url)
            return
        response.raise_for_status()
        got, expected = response.json()["tokens"], [i for i, _ in base.specials]
        if got != expected:
            raise _WrongModel(f"it serves {model!r}, whose tokenizer is not the configured base's "
                              f"({self._probe_model}): its special tokens {text!r} are {got}, not {expected}")

    async def _probe(self, replica: Replica) -> str | None:
        """Load and unload the probe adapter: None when the replica reads the shared volume, else why not."""
        path = self._probe_path
        response = await self._post(replica, "/v1/load_lora_adapter",
                                    {"lora_name": PROBE, "lora_path": path, "load_inplace": True})
        error = upstream_error(response.content)
        message = error.message
        if response.status_code == 200:
            await self._post(replica, "/v1/unload_lora_adapter", {"lora_name": PROBE})
            return None
        if _unreadable_path(response.status_code, error):
            reason = self._unreadable(path, message)
        elif response.status_code in (404, 405):  # no such route: not vLLM's error body
            reason = "runtime adapter loading is off: start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
        else:
            reason = f"the probe adapter did not load: {response.status_code} {message}"
        log.error("%s engine: replica %s cannot serve adapters: %s", self.name, replica.url, reason)
        return reason

    def _unreadable(self, path: str, message: str) -> str:
        return (f"vLLM cannot read {path} ({message}): adapter_dir ({self._config.adapter_dir}) must be a volume that "
                f"vLLM mounts too, at upstream_adapter_dir ({self._upstream_dir}); see docs/vllm.md")

    def _down(self, replica: Replica, reason: str) -> None:
        replica.reason = reason
        if replica.up:
            replica.up = False
            replica.held.clear()  # re-read when it comes back
            self._on_error("replica_down")
            log.warning("%s engine: replica %s is down: %s", self.name, replica.url, reason)

    def _write_probe(self, root: Path) -> str:
        """A rank-1, all-zero LoRA on one q_proj of the base model (it changes nothing), written on
        the shared volume under a name of its shape; loading it proves that vLLM reads the volume
        where this gateway writes. Returns its path as vLLM sees it."""
        if not root.is_dir():
            raise ValueError("no such directory: mount the adapter volume shared with vLLM there")
        if self._probe_model is None:
            raise ValueError("no base model to build the probe adapter for")
        q_proj = {n.removesuffix(".weight"): s for n, s in st.shapes(resolve_model_dir(self._probe_model)).items()
                  if n.endswith(".q_proj.weight") and len(s) == 2}
        if not q_proj:
            raise ValueError(f"the base {self._probe_model} has no q_proj layer to build the probe adapter on")
        module, (out_features, in_features) = min(q_proj.items())
        shape = f"{module}:{in_features}x{out_features}"
        name = f"{PROBE}-{hashlib.sha256(shape.encode()).hexdigest()[:12]}"
        if not (root / name / "adapter_config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
            try:
                st.write(tmp / "adapter_model.safetensors",
                         {f"base_model.model.{module}.lora_A.weight": st.Tensor("F32", (1, in_features), bytes(4 * in_features)),
                          f"base_model.model.{module}.lora_B.weight": st.Tensor("F32", (out_features, 1), bytes(4 * out_features))})
                (tmp / "adapter_config.json").write_text(
                    '{"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"]}\n')
                os.replace(tmp, root / name)
            except OSError:
                if not (root / name).is_dir():  # else another gateway wrote the same probe first
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return f"{self._upstream_dir}/{name}"


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """A response body's lines (server-sent events), as text."""
    async for line in content:
        yield line.decode(errors="replace")  # bad bytes become a malformed event, not a crash


def _rank(adapter: str, url: str) -> bytes:
    """Rendezvous (highest random weight) hashing; sorted ascending, the first is the adapter's home."""
    return hashlib.sha256(f"{adapter}\0{url}".encode()).digest()


def _unreadable_path(status: int, error: UpstreamError) -> bool:
    """vLLM's answer to loading an adapter whose directory it cannot read: a 404 with its own error
    body (`NotFoundError`, its LoRAAdapterNotFoundError), where a server without runtime loading has
    no such route (a 404 or 405 without vLLM's body)."""
    return status == 404 and error.type == "NotFoundError"


def _busy(replica: Replica) -> int:
    return replica.inflight


def _victim(replica: Replica, keep: str) -> str | None:
    """The replica's least recently used adapter with no request in flight (never `keep`)."""
    idle = [a for a in replica.held if a != keep and not replica.active[a]]
    return min(idle, key=replica.held.__getitem__, default=None)
