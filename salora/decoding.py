"""The one decoder: every answer the project generates goes through it, so the answers the gateway
serves (tenants, the canary) are the answers `salora eval`, calibration's `--generate-responses`,
screening and the benchmarks report, token for token.

It owns the per-step work: prompt ids from the chat template, a left-padded batched forward with a KV
cache (PEFT's `adapter_names` gives every row its own adapter), the token pick (greedy at temperature
0, else temperature + nucleus sampling from the row's own seeded generator), stops (EOS tokens and
stop strings) and incremental detokenization. Who drives it decides the rest: `salora.generate` runs
fixed batches to completion; the gateway's local engine runs a continuous batch on a worker thread,
joining new rows between steps (`Batch.merge`) and streaming each row's released text.
"""

from __future__ import annotations

import sys
from os.path import commonprefix  # any sequences: here token lists
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from salora.detokenize import Detokenized
from salora.errors import SaLoRAError
from salora.messages import Messages

BASE = "__base__"  # PEFT's name for "no adapter" in `adapter_names`
MIN_SHARED_HEAD = 8  # tokens: a shorter shared head is not worth a forward of its own
NONFINITE = "nonfinite"  # the finish of a row whose scores were not finite numbers: an error, not an answer


class ContextFull(SaLoRAError):
    """The prompt leaves no room in the model's context for a single answer token."""


@dataclass(eq=False)
class Generation:
    """One prompt's decoding state. `finish` is None while it runs, then "stop" (EOS or a stop
    string), "length" (`limit` tokens) or NONFINITE; `sent` counts the characters of the answer
    already released, which never include text that a later token could still change."""

    prompt: list[int] = field(default_factory=list)
    limit: int = 0  # completion tokens allowed (the caller's maximum, capped by the context)
    stops: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    adapter: str | None = None  # the PEFT adapter of this row (BASE: none); None: the model's active one
    answer: Detokenized = field(default_factory=Detokenized)  # its tokens and their text, decoded incrementally
    sent: int = 0
    finish: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.answer.tokens

    @property
    def text(self) -> str:
        """The answer released so far (the whole answer once finished, cut before a stop string)."""
        return self.answer.text[: self.sent]

    @property
    def active(self) -> bool:
        """Still in the batch; a driver may end a row for its own reasons (a client gone)."""
        return self.finish is None

    def sample(self, temperature: float, top_p: float, seed: int | None) -> None:
        """Sample at `temperature` (0: greedy) from a generator of this row's own, so a seed
        reproduces an answer whoever shares the batch."""
        self.temperature, self.top_p = temperature, top_p
        if temperature > 0:
            self.generator = torch.Generator()
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)


G = TypeVar("G", bound=Generation)


def _left_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pad the sequence dimension (-2 of a KV tensor) on the left with n zeros."""
    return F.pad(x, (0, 0, n, 0)) if n else x


@dataclass(eq=False)
class Batch(Generic[G]):
    """Rows decoding together, their KV cache aligned at the right (the newest position is last)."""

    rows: list[G]
    cache: DynamicCache
    mask: torch.Tensor  # (rows, cached positions): 1 for real tokens, 0 for left padding

    def merge(self, other: Batch[G]) -> Batch[G]:
        """Both batches as one, left-padding the shorter KV cache so positions line up at the right."""
        ta, tb = self.mask.shape[1], other.mask.shape[1]
        width = max(ta, tb)
        for la, lb in zip(self.cache.layers, other.cache.layers, strict=True):
            la.keys = torch.cat([_left_pad(la.keys, width - ta), _left_pad(lb.keys, width - tb)])
            la.values = torch.cat([_left_pad(la.values, width - ta), _left_pad(lb.values, width - tb)])
        mask = torch.cat([F.pad(self.mask, (width - ta, 0)), F.pad(other.mask, (width - tb, 0))])
        return Batch(self.rows + other.rows, self.cache, mask)

    def pruned(self) -> Batch[G] | None:
        """Without the rows no longer active and the padding columns no remaining row needs (None:
        no row is left), so finished rows cost nothing in later steps."""
        keep = [i for i, r in enumerate(self.rows) if r.active]
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        mask = self.mask[index]
        first = int(mask.any(0).int().argmax())
        if first:
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]
            mask = mask[:, first:]
        return Batch([self.rows[i] for i in keep], self.cache, mask)


def held_back(text: str, sent: int, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of text[sent:] that could still grow into a stop string."""
    longest = max(map(len, stops), default=0)
    for k in range(min(longest - 1, len(text) - sent), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


def pick(logits: torch.Tensor, rows: list[G], finite: list[bool]) -> list[int]:
    """Next token per row: greedy at temperature 0, else temperature + nucleus sampling. Rows with
    non-finite scores get a placeholder the caller discards."""
    greedy = logits.argmax(-1).tolist()
    picks = []
    for i, row in enumerate(rows):
        if row.temperature == 0 or not finite[i]:
            picks.append(greedy[i])
            continue
        probs = torch.softmax(logits[i] / row.temperature, dim=-1)
        if row.top_p < 1:
            probs, order = probs.sort(descending=True)
            probs[probs.cumsum(0) - probs > row.top_p] = 0
            picks.append(int(order[torch.multinomial(probs, 1, generator=row.generator)]))
        else:
            picks.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return picks


def _inject_names(_module: nn.Module, args: tuple, kwargs: dict, names: list[str]) -> tuple[tuple, dict]:
    kwargs["adapter_names"] = names
    return args, kwargs


class Decoder:
    """What stays fixed while a model serves: its tokenizer, its EOS tokens and its context length.
    The model itself is passed to each step, since a driver may swap it (the gateway loads and
    unloads adapters between steps)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_len: int | None = None) -> None:
        self.tokenizer = tokenizer
        self._lora_layers: tuple[int, list[nn.Module]] | None = None  # (id of the model, its LoRA layers)
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos = frozenset(i for i in [*eos_ids, tokenizer.eos_token_id] if i is not None)
        limits = [n for n in (max_len, getattr(model.config, "max_position_embeddings", None)) if n is not None]
        self.max_len = min(limits, default=sys.maxsize)  # prompt and answer tokens together

    def adapters_changed(self) -> None:
        """Say that adapters were loaded or unloaded: the LoRA layers are looked up again."""
        self._lora_layers = None

    @contextmanager
    def _row_adapters(self, model: PreTrainedModel | PeftModel, rows: list[G]) -> Iterator[None]:
        """Give every row its own adapter (PEFT's mixed batches) for one forward. PEFT's own
        `adapter_names=` walks every module of the model twice per call (to check the names, then
        to hook each LoRA layer): with LoRA on all seven projections of SmolLM2 that was 38% of a
        decoding step. Here the layers are found once per model and set of adapters."""
        names = [r.adapter for r in rows]
        if not isinstance(model, PeftModel) or all(n is None for n in names):
            yield
            return
        if None in names:
            raise ValueError("either every row of a batch names its adapter or none does")
        unknown = set(names) - set(model.peft_config) - {BASE}
        if unknown:
            raise ValueError(f"no such adapters loaded: {sorted(unknown)}")
        if self._lora_layers is None or self._lora_layers[0] != id(model):
            self._lora_layers = (id(model), [m for m in model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))])
        hook = partial(_inject_names, names=names)
        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in self._lora_layers[1]]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def chat_prompt(self, messages: Messages) -> list[int]:
        """The prompt ids of a conversation, as the chat template renders it for the next answer."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    def text_prompt(self, text: str) -> list[int]:
        """Raw text continued as it is, with no chat template (the legacy completions API)."""
        return self.tokenizer.encode(text)

    def limit(self, prompt: list[int], max_tokens: int) -> int:
        """Completion tokens this prompt may have: `max_tokens`, capped by the room left in the context."""
        room = self.max_len - len(prompt)
        if room < 1:
            raise ContextFull(f"the prompt has {len(prompt)} tokens; this model's context is {self.max_len} tokens")
        return min(max_tokens, room)

    def prefill(self, model: PreTrainedModel | PeftModel, rows: list[G]) -> tuple[Batch[G], list[tuple[G, str]]]:
        """Run the new rows' prompts as one group and pick each row's first token. The head that every
        prompt shares (the chat template's system prompt: 24 of the canary probes' 37-57 tokens on
        SmolLM2) is computed once per adapter and its KV copied to every row; each row's own tail
        follows it, left-padded, so the cache's mask is 0 between the head and a shorter tail."""
        device = model.device
        shared = self._shared_head(rows)
        cache = DynamicCache()
        if shared:
            adapters = list(dict.fromkeys(r.adapter for r in rows))
            firsts = [next(r for r in rows if r.adapter == a) for a in adapters]
            head = torch.tensor([rows[0].prompt[:shared]] * len(firsts), device=device)
            self._forward(model, head, torch.ones_like(head), torch.arange(shared, device=device).expand_as(head), cache,
                          firsts)
            cache.batch_select_indices(torch.tensor([adapters.index(r.adapter) for r in rows], device=device))
        width = max(len(r.prompt) for r in rows) - shared
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt) + shared:] = torch.tensor(r.prompt[shared:])
            mask[i, width - len(r.prompt) + shared:] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones((len(rows), shared), dtype=torch.long, device=device), mask], dim=1)
        logits = self._forward(model, ids, mask, positions, cache, rows)
        return Batch(rows, cache, mask), self._advance_all(rows, logits)

    @staticmethod
    def _shared_head(rows: list[Generation]) -> int:
        """Length of the prompt head all rows share, when computing it apart saves work: at least
        MIN_SHARED_HEAD tokens, more rows than adapters, and one token of every prompt left to run."""
        if len(rows) <= len({r.adapter for r in rows}):
            return 0
        n = min(len(commonprefix([r.prompt for r in rows])), min(len(r.prompt) for r in rows) - 1)
        return n if n >= MIN_SHARED_HEAD else 0

    def step(self, model: PreTrainedModel | PeftModel, batch: Batch[G]) -> list[tuple[G, str]]:
        """Feed every row of a pruned batch its last token and pick the next. Returns each row with
        the text it releases now; a row whose `finish` is set has given its last."""
        rows = batch.rows
        device = batch.mask.device
        batch.mask = torch.cat([batch.mask, torch.ones((len(rows), 1), dtype=torch.long, device=device)], dim=1)
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=device)
        positions = torch.tensor([[len(r.prompt) + len(r.tokens) - 1] for r in rows], device=device)
        logits = self._forward(model, ids, batch.mask, positions, batch.cache, rows)
        return self._advance_all(rows, logits)

    def _forward(self, model: PreTrainedModel | PeftModel, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache, rows: list[G]) -> torch.Tensor:
        with self._row_adapters(model, rows):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                        logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def _advance_all(self, rows: list[G], logits: torch.Tensor) -> list[tuple[G, str]]:
        """Pick and append each row's next token. A row whose scores are not finite (an adapter's
        weights overflowing, say) ends alone as NONFINITE; the other rows of the batch go on."""
        finite = torch.isfinite(logits).all(-1).tolist()
        released = []
        for row, ok, token in zip(rows, finite, pick(logits, rows, finite)):
            if ok:
                released.append((row, self._advance(row, token)))
            else:
                row.finish = NONFINITE
                released.append((row, ""))
        return released

    def _advance(self, row: Generation, token: int) -> str:
        """Append a token, decide whether the row is done, and return the text that is now final.
        Text that may still change is held back: an incomplete UTF-8 character (the detokenizer keeps
        it until the last token) and a tail that could be the start of a stop string."""
        stops = row.stops
        eos = token in self.eos
        row.answer.add(self.tokenizer, token, final=eos or len(row.tokens) + 1 >= row.limit)
        text = row.answer.text
        end = len(text)
        finish = "stop" if eos else None
        hits = [i for i in (text.find(s, row.sent) for s in stops) if i >= 0]
        if hits:
            finish, end = "stop", min(hits)
        elif finish is None and len(row.tokens) >= row.limit:
            finish = "length"
        if finish is None:
            end -= held_back(text, row.sent, stops)
        start, row.sent = row.sent, end
        row.finish = finish
        return text[start:end]
