"""In-process engine: transformers + PEFT, several adapters resident, one shared base.

One worker thread owns the model (concurrent forwards on one module are not safe) and runs a
continuous batch: new requests are prefilled as a group, their KV cache is left-padded and joined to
the running batch between decode steps, and finished or cancelled rows leave it between steps. PEFT's
`adapter_names` gives every row its own adapter (`__base__` for the base model), so requests on
different adapters share each forward pass. The decoding itself (chat template, forward, token pick,
stops, detokenization) is `salora.decoding`, the decoder `salora eval` uses too; this module keeps
what is about serving: the worker, admission, adapters, the base seal, errors and timeouts.
Streaming and non-streaming callers consume the same chunks, so their greedy answers are identical
by construction. A generation that fails ends every row
of its batch with an EngineError; one that hangs ends its caller's wait at `timeouts` (the worker drops
the row when it gets going again).

Tenants share one process, so nothing one request or adapter does may reach another: a row whose
scores go non-finite ends alone (its batch mates go on), and every adapter load is followed by a
check that the shared base weights are bit for bit what they were (`_BaseSeal`); an adapter whose
load touched them fails closed instead of serving changed answers to every tenant.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from gateway.engines.base import Chunk, EngineError, GenerationRequest, RequestRejected
from gateway.settings import Timeouts
from salora.decoding import BASE, NONFINITE, Batch, ContextFull, Decoder, Generation
from salora.models import load_model

log = logging.getLogger(__name__)


def _peft_name(name: str) -> str:
    """The name an adapter gets inside PEFT. PEFT makes each adapter name a submodule attribute, so a
    gateway name with a dot (`support.v2`) or one a torch module already has (`half`, `train`) cannot
    be used there as it is."""
    return "adapter_" + hashlib.sha256(name.encode()).hexdigest()[:16]


@dataclass(eq=False, kw_only=True)
class _Row(Generation):
    """One request inside the worker: its decoding state, and `emit`, which hands a chunk (or an
    error) to the asyncio side. A row has had its last message once `finish` is set ("error" when
the engine ended it with an EngineError)."""

    request: GenerationRequest
    emit: Callable[[Chunk | Exception], object]
    cancelled: bool = False  # set by the asyncio side when the client is gone

    @property
    def active(self) -> bool:
        return self.finish is None and not self.cancelled

    def send(self, item: Chunk | Exception) -> None:
        try:
            self.emit(item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class _BaseChanged(Exception):
    """An adapter load changed the shared base weights: the worker fails every row and stops."""


@dataclass(eq=False)
class _Op:
    """Work on the model itself (adapter load/unload), run by the worker between steps."""

    fn: Callable[[], None]
    future: concurrent.futures.Future


class _BaseSeal:
    """A checksum of every base weight, by its name without PEFT's wrapping, to prove after each
    adapter load that the shared base is unchanged. The integer sum of each tensor's bit pattern and
    its storage address catch a rewrite in place, a swapped tensor and a replaced layer alike, at
    about one memory pass over the weights (an admin action, never the request path)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._seal = self._read(model)

    @staticmethod
    def _read(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
        seal = {}
        for name, tensor in model.state_dict().items():
            if "lora_" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            flat = tensor.detach().reshape(-1)
            bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()]
            seal[name] = (flat.data_ptr(), int(flat.view(bits).sum(dtype=torch.int64)))
        return seal

    def broken(self, model: torch.nn.Module) -> list[str]:
        """The base weights that differ from the seal (none: the base is intact)."""
        now = self._read(model)
        return sorted(n for n in self._seal.keys() | now.keys() if self._seal.get(n) != now.get(n))


class LocalEngine:
    """transformers + PEFT in this process; `model` is a model directory or `embedded`."""

    name = "local"

    def __init__(
        self,
        model: str,
        model_id: str,
        adapters: dict[str, Path] | None = None,
        *,
        max_batch_size: int = 8,
        max_model_len: int = 2048,
        on_batch: Callable[[int], None] | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.model_id = model_id
        self._timeouts = timeouts or Timeouts()
        self.error: str | None = None
        self._spec = model
        self._initial_adapters = dict(adapters or {})
        self._max_batch = max_batch_size
        self._max_model_len = max_model_len
        self._on_batch = on_batch
        self._adapters: frozenset[str] = frozenset()
        self._inbox: queue.SimpleQueue[_Row | _Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._model: PreTrainedModel | PeftModel
        self._decoder: Decoder
        self._seal: _BaseSeal | None = None

    @property
    def ready(self) -> bool:
        """The worker runs and nothing has stopped it (a failed start, or a load that changed the base)."""
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def adapters(self) -> frozenset[str]:
        return self._adapters

    async def start(self) -> None:
        """Start the worker, which loads the base and the initial adapters and then serves. The load
        runs on the worker thread too: torch work on a second thread (an OpenMP team of its own) made
        every later decoding step on the worker up to twice as slow (docs/performance.md)."""
        loaded: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._work, args=(loaded,), name="salora-local-engine", daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(loaded)
        except Exception as e:
            self.error = f"cannot load the model: {e}"
            raise EngineError(self.error, kind="load") from e

    async def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            await asyncio.to_thread(self._thread.join)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if not self.ready:
            raise EngineError(self.error or "the engine is still loading")
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Chunk | Exception] = asyncio.Queue()
        row = _Row(request=request, emit=partial(loop.call_soon_threadsafe, chunks.put_nowait))
        self._inbox.put(row)
        total = self._timeouts.total_s
        expiry = loop.call_later(total, chunks.put_nowait, EngineError(
            f"no complete answer within timeouts.total_s ({total:g} s)", kind="timeout"))
        try:
            try:
                async with asyncio.timeout(self._timeouts.first_token_s):
                    item = await chunks.get()
            except TimeoutError:
                raise EngineError(f"no first token within timeouts.first_token_s ({self._timeouts.first_token_s:g} s)",
                                  kind="timeout") from None
            while True:
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
                item = await chunks.get()
        finally:
            expiry.cancel()
            row.cancelled = True  # a no-op when finished; otherwise the worker drops the row

    async def load_adapter(self, name: str, path: Path) -> None:
        await self._call(partial(self._load_adapter, name, Path(path)))

    async def unload_adapter(self, name: str) -> None:
        await self._call(partial(self._unload_adapter, name))

    async def _call(self, fn: Callable[[], None]) -> None:
        if not self.ready:
            raise EngineError(self.error or "the engine is still loading")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Op(fn, future))
        await asyncio.wrap_future(future)

    # --- worker thread -------------------------------------------------------------------------

    def _load(self) -> None:
        self._model, tokenizer = load_model(self._spec)
        self._decoder = Decoder(self._model, tokenizer, self._max_model_len)
        self._seal = _BaseSeal(self._model)
        for name, path in self._initial_adapters.items():
            self._load_adapter(name, Path(path))

    def _load_adapter(self, name: str, path: Path) -> None:
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} is already loaded")
        peft_name = _peft_name(name)
        self._decoder.adapters_changed()
        try:
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(path), adapter_name=peft_name)
            else:
                self._model = PeftModel.from_pretrained(self._model, str(path), adapter_name=peft_name)
        except Exception as e:
            # PEFT injects layers into the base in place as it goes: a load that failed half-way may
            # have left some behind, or changed weights, in the model every tenant is served from.
            self._check_base(name, peft_name, failed=e)
            raise
        self._model.eval()
        self._adapters = self._adapters | {name}
        self._check_base(name, peft_name)

    def _check_base(self, name: str, peft_name: str, failed: Exception | None = None) -> None:
        """Stop serving (fail closed) if the base weights differ from the seal, or if a failed load
        left layers of its adapter in the model."""
        assert self._seal is not None
        changed = self._seal.broken(self._model)
        residue = failed is not None and any(peft_name in getattr(m, "lora_A", {}) for m in self._model.modules())
        if changed or residue:  # the base every tenant shares is no longer the one served
            what = f"changed {len(changed)} base weights (e.g. {changed[0]})" if changed else "left layers in the base"
            self.error = f"loading adapter {name!r} {what}; the engine stopped serving: restart the gateway"
            raise _BaseChanged(self.error) from failed

    def _unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise KeyError(f"adapter {name!r} is not loaded")
        assert isinstance(self._model, PeftModel)
        self._decoder.adapters_changed()
        if self._adapters == {name}:  # PEFT cannot run with no adapter: back to the plain base
            self._model = self._model.unload()
        else:
            self._model.delete_adapter(_peft_name(name))
        self._adapters = self._adapters - {name}

    def _work(self, loaded: concurrent.futures.Future) -> None:
        try:
            self._load()
        except Exception as e:
            loaded.set_exception(e)
            return
        loaded.set_result(None)
        batch: Batch[_Row] | None = None
        while True:
            items = [self._inbox.get()] if batch is None else []
            room = self._max_batch - (len(batch.rows) if batch else 0)
            while len(items) < room and not self._inbox.empty():
                items.append(self._inbox.get_nowait())
            rows: list[_Row] = []
            for item in items:
                if item is None:
                    self._fail([*(batch.rows if batch else []), *rows, *self._drain()], EngineError("the engine shut down"))
                    return
                if isinstance(item, _Op):
                    if not self._run_op(item, batch):
                        error = EngineError(self.error or "the engine stopped", kind="base_changed")
                        self._fail([*(batch.rows if batch else []), *rows, *self._drain()], error)
                        return
                else:
                    rows.append(item)
            try:
                with torch.inference_mode():
                    if rows:
                        batch = self._admit(batch, rows)
                    if batch is not None:
                        batch = self._step(batch)
            except Exception as e:
                log.exception("generation failed")
                self._fail([*(batch.rows if batch else []), *rows], EngineError(f"generation failed: {e}", kind="generation"))
                batch = None

    def _drain(self) -> list[_Row]:
        rows = []
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, _Row):
                rows.append(item)
            elif isinstance(item, _Op):
                item.future.set_exception(EngineError("the engine shut down"))
        return rows

    @staticmethod
    def _fail(rows: list[_Row], error: Exception) -> None:
        for row in rows:
            if row.finish is None:
                row.finish = "error"
                row.send(error)

    def _run_op(self, op: _Op, batch: Batch[_Row] | None) -> bool:
        """Run an adapter operation between steps; False when the engine must stop (the base changed)."""
        try:
            op.fn()
        except _BaseChanged as e:
            op.future.set_exception(EngineError(str(e), kind="base_changed"))
            return False
        except Exception as e:
            op.future.set_exception(e)
            return True
        op.future.set_result(None)
        if batch is not None:  # rows on an adapter that was just unloaded cannot continue
            orphans = [r for r in batch.rows if r.request.adapter not in (None, *self._adapters)]
            self._fail(orphans, EngineError("the adapter was unloaded during generation"))
        return True

    def _prepare(self, row: _Row) -> bool:
        """Tokenise and check a new row; a row that cannot run gets its error here."""
        request = row.request
        if row.cancelled:
            return False
        if request.adapter is not None and request.adapter not in self._adapters:
            row.send(EngineError(f"adapter {request.adapter!r} is not loaded"))
            return False
        row.adapter = BASE if request.adapter is None else _peft_name(request.adapter)
        try:
            if request.prompt is not None:  # the legacy completions API: the text as it is, as vLLM takes it
                row.prompt = self._decoder.text_prompt(request.prompt)
            else:
                row.prompt = self._decoder.chat_prompt(request.messages)
        except Exception as e:  # a template that rejects this conversation (e.g. role order)
            row.send(RequestRejected(f"cannot apply the chat template: {e}", param="messages"))
            return False
        try:
            row.limit = self._decoder.limit(row.prompt, request.max_tokens)
        except ContextFull as e:
            row.send(RequestRejected(str(e), code="context_length_exceeded", param="messages"))
            return False
        row.stops = request.stop
        row.sample(request.temperature, request.top_p, request.seed)
        return True

    def _admit(self, batch: Batch[_Row] | None, rows: list[_Row]) -> Batch[_Row] | None:
        """Prefill new rows as one left-padded group and join them to the running batch."""
        rows = [r for r in rows if self._prepare(r)]
        if not rows:
            return batch
        new, released = self._decoder.prefill(self._model, rows)
        self._emit(released)
        return new if batch is None else batch.merge(new)

    def _step(self, batch: Batch[_Row]) -> Batch[_Row] | None:
        """Drop the rows that are done or cancelled, then one decode step for the rest."""
        pruned = batch.pruned()
        if pruned is None:
            return None
        if self._on_batch is not None:
            self._on_batch(len(pruned.rows))
        self._emit(self._decoder.step(self._model, pruned))
        return pruned

    @staticmethod
    def _emit(released: list[tuple[_Row, str]]) -> None:
        """Send each row the text its last token released; a finished row its last chunk, with usage,
        and a row whose scores were not finite its error (its batch mates go on)."""
        for row, text in released:
            if row.finish == NONFINITE:
                row.send(EngineError("the model's scores for this request were not finite numbers; nothing was "
                                     "generated past that point", kind="numerical"))
            elif row.finish is not None:
                row.send(Chunk(text, row.finish, len(row.prompt), len(row.tokens)))
            elif text:
                row.send(Chunk(text))
