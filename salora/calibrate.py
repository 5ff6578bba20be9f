"""Safety (and task) bases: top output directions of each target module on response tokens.

The second moment X^T X (d_in x d_in) of each module's input is accumulated over the data: each
batch's product in float32, summed in float64; the decompositions run in float32 and finish with a
float64 re-orthonormalisation of the bases (float32 halves the time of the GEMMs and of eigh on a
CPU, and the bases are stored in float32). The right singular vectors of Y = X W^T are the eigenvectors of Y^T Y = W (X^T X) W^T, so V
is exact, not a randomised estimate, and memory does not grow with the number of tokens.
`stream_bases` does it in one pass, layer by layer: only one decoder layer's accumulators exist at
a time, and modules reading the same input (q/k/v, gate/up) share one, so peak memory grows with
the weights, not with layers x d_in^2 (`record_input_moments` is the simple all-modules-at-once
form, kept for small models and tests).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from salora.atomic import atomic_dir, check_output_dir, write_json_atomic
from salora.chat import IGNORE, Messages, collate, read_chat_data, tokenize_chat
from salora.errors import SaLoRAError
from salora.generate import generate_greedy
from salora.judge import Judge, KeywordJudge
from salora.messages import prompt_text
from salora.models import linear_modules, load_model, model_id, resolve_model_dir, weight_hash

SAFETY_TENSORS = "safety.safetensors"
SAFETY_META = "safety.json"


@dataclass
class Moments:
    """Accumulated X^T X over response tokens at one module's input."""

    xtx: torch.Tensor
    tokens: int = 0


@torch.inference_mode()
def record_input_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Messages],
    modules: dict[str, nn.Linear],
    max_length: int = 512,
    batch_size: int = 8,
    progress: str | None = None,
    all_tokens: bool = False,
) -> dict[str, Moments]:
    """One forward pass per batch, hooks on every module; only assistant (label != -100) tokens
    count, or with `all_tokens` every real token (what an input-side guard must cover)."""
    moments = {name: Moments(torch.zeros(m.in_features, m.in_features, dtype=torch.float64)) for name, m in modules.items()}
    mask: torch.Tensor | None = None

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0][mask].double()
            moments[name].xtx += x.T @ x
            moments[name].tokens += x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    try:
        examples = [tokenize_chat(tokenizer, c, max_length) for c in conversations]
        for i in tqdm(range(0, len(examples), batch_size), desc=progress, disable=progress is None, unit="batch"):
            batch = collate(examples[i : i + batch_size], tokenizer.pad_token_id)
            mask = batch["attention_mask"].bool() if all_tokens else batch["labels"] != IGNORE
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return moments


def output_second_moment(W: torch.Tensor, moments: Moments) -> torch.Tensor:
    """Y^T Y / n for Y = X W^T (d_out x d_out, float64)."""
    W64 = W.detach().double()
    return W64 @ moments.xtx @ W64.T / max(moments.tokens, 1)


def _eigh32(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of a symmetric float64 matrix, decomposed in float32 (half the time of float64 on a CPU,
    and the bases are stored in float32 anyway): eigenvalues ascending (float64), eigenvectors."""
    symmetric = M + M.T  # one float64 copy (then float32): these are the calibration's largest transients
    eigvals, eigvecs = torch.linalg.eigh(symmetric.mul_(0.5).to(torch.float32))
    return eigvals.double(), eigvecs


def orthonormal(Q: torch.Tensor) -> torch.Tensor:
    """The float64 finish: columns re-orthonormalised (QR, signs kept), so a projection I - Q Q^T
    built from the float32 result is a projection to float32 precision."""
    q, r = torch.linalg.qr(Q.double())
    return (q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1)).to(torch.float32).contiguous()


def top_directions(M: torch.Tensor, rank: int | None = None, energy: float | None = None) -> tuple[torch.Tensor, float]:
    """Leading eigenvectors of a symmetric matrix (d x r, orthonormal), `rank` of them or as many as
    it takes to capture `energy` of its positive spectrum; returns them and the share captured."""
    eigvals, eigvecs = _eigh32(M)
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
    total = eigvals.sum().item()
    if energy is not None:
        cumulative = eigvals.cumsum(0) / total if total > 0 else torch.ones_like(eigvals)
        rank = int((cumulative < energy).sum().item()) + 1
    rank = min(rank or 1, M.shape[0])
    captured = eigvals[:rank].sum().item() / total if total > 0 else 0.0
    return orthonormal(eigvecs[:, :rank]), captured


def input_eigh(moments: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the input's second moment E[x x^T]."""
    return _eigh32(moments.xtx / max(moments.tokens, 1))


def wide_output_directions(
    W: torch.Tensor, moments: Moments, rank: int | None, energy: float | None, eig: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, float]:
    """`top_directions(W M W^T / n)` for a module wider out than in (gate/up: d_out 11008 > d_in 4096
    in Llama-7B) without the d_out x d_out eigenproblem: with M = Q diag(l) Q^T, the eigenvectors of
    W M W^T are the left singular vectors of K = W Q diag(sqrt l) (d_out x d_in), its eigenvalues
    their squared singular values. About (d_out / d_in)^3 times cheaper, and exact. `eig`: the
    input's `input_eigh`, when modules sharing the input (gate/up) have computed it already."""
    lam, Q = eig if eig is not None else input_eigh(moments)
    K = W.detach().float() @ (Q * lam.clamp_min(0).sqrt().float())
    U, S, _ = torch.linalg.svd(K, full_matrices=False)
    eigvals = S.double() ** 2  # descending
    total = eigvals.sum().item()
    if energy is not None:
        cumulative = eigvals.cumsum(0) / total if total > 0 else torch.ones_like(eigvals)
        rank = int((cumulative < energy).sum().item()) + 1
    rank = min(rank or 1, U.shape[1])
    captured = eigvals[:rank].sum().item() / total if total > 0 else 0.0
    return orthonormal(U[:, :rank]), captured


def module_bases(
    modules: dict[str, nn.Linear],
    moments: dict[str, Moments],
    rank: int | None,
    energy: float | None = None,
    contrast: dict[str, Moments] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per module: top-variance output directions (paper), or with `contrast` the directions whose
    energy on the safety data most exceeds that on contrast (benign) data: eigenvectors of
    E[y y^T | refusal] - E[y y^T | benign] with positive eigenvalues."""
    bases, captured = {}, {}
    for name, module in modules.items():
        M = output_second_moment(module.weight, moments[name])
        if contrast is not None:
            M = M - output_second_moment(module.weight, contrast[name])
        bases[name], captured[name] = top_directions(M, rank, energy)
    return bases, captured


class _Captured(Exception):
    """Raised by the pre-hook on the first decoder layer once it has seen its inputs."""


def decoder_layers(model: nn.Module, modules: dict[str, nn.Linear]) -> tuple[str, nn.ModuleList] | None:
    """The model's list of decoder layers (`model.layers` in Llama) if every target module lies in
    one of its layers, else None."""
    for name, candidate in model.named_modules():
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            prefix = f"{name}." if name else ""
            inside = [m for m in modules if m.startswith(prefix) and m[len(prefix):].split(".", 1)[0].isdigit()]
            if len(inside) == len(modules):
                return name, candidate
    return None


def _layer_of(name: str, list_name: str) -> int:
    prefix = f"{list_name}." if list_name else ""
    return int(name[len(prefix):].split(".", 1)[0])


class _Accumulators:
    """Second moments of module inputs over the tokens each mask selects ("resp": response tokens,
    "all": every real token), summed in float64, one per distinct input: modules that read the
    same tensor (q/k/v after one norm, gate/up after another) share one, found by identity in the
    hooks. "all" is kept as "resp" + "rest" (the other real tokens): one product per token, not two.
    Each batch's product is formed in `product_dtype` (float32: the float64 GEMM is about twice as
    slow on CPUs, and a batch's thousands of terms lose nothing that matters to the bases) and
    added to the float64 sum."""

    def __init__(self, kinds: tuple[str, ...], product_dtype: torch.dtype) -> None:
        self.kinds = kinds
        self.product_dtype = product_dtype
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.owner: dict[str, str] = {}  # module -> the module whose accumulator holds its input
        self.masks: dict[str, torch.Tensor] = {}  # kind -> (batch, seq) bool, set per batch
        self._seen: list[tuple[torch.Tensor, str]] = []

    def new_call(self) -> None:
        self._seen.clear()

    def hook_for(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            # References keep the tensors alive until new_call, so identity cannot be reused.
            owner = next((key for t, key in self._seen if t is x), None)
            if owner is not None:
                if self.owner.setdefault(name, owner) != owner:
                    raise RuntimeError(f"{name}: input shared inconsistently between batches")
                return
            self._seen.append((x, name))
            self.owner.setdefault(name, name)
            sums = self.sums.setdefault(name, {})
            counts = self.counts.setdefault(name, {})
            for kind in self.kinds:
                rows = x[self.masks[kind]].to(self.product_dtype)
                product = (rows.T @ rows).double()
                if kind in sums:
                    sums[kind] += product
                else:
                    sums[kind] = product
                counts[kind] = counts.get(kind, 0) + rows.shape[0]

        return hook

    def moment(self, name: str, kind: str) -> Moments:
        owner = self.owner[name]
        sums, count = self.sums[owner], self.counts[owner]
        if kind == "all":
            if "all" not in sums:  # formed once, in place: once V is decomposed the rest is not needed alone
                sums["all"] = sums.pop("rest").add_(sums["resp"])
            return Moments(sums["all"], count["resp"] + count["rest"])
        return Moments(sums[kind], count[kind])

    def drop(self, names: list[str]) -> None:
        for name in names:
            self.sums.pop(self.owner.get(name, name), None)


@dataclass
class StreamedBases:
    """What `stream_bases` computed: per module the output-side basis V and its captured share, the
    input-side basis U (when asked), and the token counts."""

    V: dict[str, torch.Tensor]
    captured: dict[str, float]
    U: dict[str, torch.Tensor]
    response_tokens: int
    tokens: int
    shared_inputs: dict[str, str]
    seconds: dict[str, float]  # per phase: input capture, layer forwards with the moments, decomposition


def _batches(tokenizer: PreTrainedTokenizerBase, conversations: list[Messages], max_length: int, batch_size: int, device) -> list[dict]:
    examples = [tokenize_chat(tokenizer, c, max_length) for c in conversations]
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], tokenizer.pad_token_id)
        resp = batch["labels"] != IGNORE
        out.append({
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
            "masks": {"resp": resp.to(device), "rest": (batch["attention_mask"].bool() & ~resp).to(device)},
        })
    return out


def _mixed_layer_types(model: nn.Module) -> bool:
    return len(set(getattr(model.config, "layer_types", None) or [])) > 1


@torch.inference_mode()
def stream_bases(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Messages],
    modules: dict[str, nn.Linear],
    rank: int | None,
    energy: float | None = None,
    contrast: list[Messages] | None = None,
    input_energy: float | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    progress: str | None = "calibrate",
) -> StreamedBases:
    """All bases in one pass over the model, layer by layer, with bounded memory.

    The inputs of the first decoder layer are captured for every batch (an embedding lookup), then
    each decoder layer runs on all batches in turn, its hooks accumulating the second moments of its
    target modules' inputs (response tokens for V; every token for U; the contrast set too), its
    bases are decomposed, its accumulators freed, and its outputs become the next layer's inputs.
    Peak memory is the weights, the hidden states of the calibration tokens and one layer's moments,
    whatever the depth. Each layer's forward runs once. A model whose target modules do not sit in
    one list of decoder layers falls back to one full forward per batch with hooks on every module.
    """
    device = next(model.parameters()).device
    kinds = ("resp",) + (("rest",) if input_energy is not None else ())
    sets = {"safety": _batches(tokenizer, conversations, max_length, batch_size, device)}
    if contrast is not None:
        sets["contrast"] = _batches(tokenizer, contrast, max_length, batch_size, device)
    accumulators = {which: _Accumulators(kinds, torch.float32) for which in sets}
    V, captured, U = {}, {}, {}
    seconds = {"inputs": 0.0, "forwards": 0.0, "decomposition": 0.0}

    def finish(names: list[str]) -> None:
        started = time.perf_counter()
        acc, con = accumulators["safety"], accumulators.get("contrast")
        eigs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per shared input
        for name in names:
            W = modules[name].weight
            if con is None and W.shape[0] > W.shape[1]:
                moments = acc.moment(name, "resp")
                if acc.owner[name] not in eigs:
                    eigs[acc.owner[name]] = input_eigh(moments)
                basis, captured[name] = wide_output_directions(W, moments, None if energy else rank, energy, eigs[acc.owner[name]])
            else:
                M = output_second_moment(W, acc.moment(name, "resp"))
                if con is not None:
                    M = M - output_second_moment(W, con.moment(name, "resp"))
                basis, captured[name] = top_directions(M, None if energy else rank, energy)
            V[name] = basis.cpu()
        if input_energy is not None:
            by_owner: dict[str, torch.Tensor] = {}
            for name in names:
                owner = acc.owner[name]
                if owner not in by_owner:
                    m = acc.moment(name, "all")
                    M = m.xtx / max(m.tokens, 1)
                    if con is not None:
                        c = con.moment(name, "all")
                        M = M - c.xtx / max(c.tokens, 1)
                    by_owner[owner], _ = top_directions(M, energy=input_energy)
                U[name] = by_owner[owner].cpu().clone()  # one tensor per module: safetensors stores no shared memory
        for a in accumulators.values():
            a.drop(names)
        seconds["decomposition"] += time.perf_counter() - started

    found = decoder_layers(model, modules)
    started = time.perf_counter()
    if found is None:
        for which, batches in sets.items():
            acc = accumulators[which]
            handles = [m.register_forward_pre_hook(acc.hook_for(name)) for name, m in modules.items()]
            try:
                for batch in tqdm(batches, desc=f"{progress}: {which} forwards", disable=progress is None, unit="batch"):
                    acc.masks = batch["masks"]
                    acc.new_call()
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                    acc.new_call()
            finally:
                for h in handles:
                    h.remove()
        names = sorted(modules)
        seconds["forwards"] = time.perf_counter() - started
        for _ in tqdm(range(1), desc=f"{progress}: decomposition", disable=progress is None, unit="step"):
            finish(names)
    else:
        list_name, layers = found
        abort = not _mixed_layer_types(model)  # one mask for all layers: stop after the embeddings
        states: dict[str, list[torch.Tensor]] = {}
        layer_kwargs: dict[str, list[list[dict]]] = {}
        for which, batches in sets.items():
            states[which], layer_kwargs[which] = [], []
            for batch in tqdm(batches, desc=f"{progress}: {which} inputs", disable=progress is None, unit="batch"):
                seen: list[dict] = []

                def capture(index: int):
                    def hook(_module, args, kwargs):
                        if index == 0:
                            hidden = args[0] if args else kwargs["hidden_states"]
                            states[which].append(hidden.clone())
                        seen.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
                        if abort:
                            raise _Captured

                    return hook

                targets = [layers[0]] if abort else list(layers)
                handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(targets)]
                try:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                except _Captured:
                    pass
                finally:
                    for h in handles:
                        h.remove()
                layer_kwargs[which].append(seen * len(layers) if abort else seen)
        seconds["inputs"] = time.perf_counter() - started
        by_layer: dict[int, list[str]] = {}
        for name in modules:
            by_layer.setdefault(_layer_of(name, list_name), []).append(name)
        last = max(by_layer)  # the layers after the last target change nothing we record
        bar = tqdm(range(last + 1), desc=f"{progress}: layers (forward + decomposition)", disable=progress is None, unit="layer")
        for index in bar:
            names = sorted(by_layer.get(index, []))
            for which, batches in sets.items():
                acc = accumulators[which]
                handles = [modules[name].register_forward_pre_hook(acc.hook_for(name)) for name in names]
                try:
                    for b, batch in enumerate(batches):
                        acc.masks = batch["masks"]
                        acc.new_call()
                        out = layers[index](states[which][b], **layer_kwargs[which][b][index])
                        acc.new_call()
                        states[which][b] = out[0] if isinstance(out, tuple) else out
                finally:
                    for h in handles:
                        h.remove()
            if names:
                finish(names)
        bar.close()
        seconds["forwards"] = time.perf_counter() - started - seconds["inputs"] - seconds["decomposition"]
    acc = accumulators["safety"]
    first = sorted(modules)[0]
    return StreamedBases(
        V=V, captured=captured, U=U,
        response_tokens=acc.counts[acc.owner[first]]["resp"],
        tokens=sum(acc.counts[acc.owner[first]].get(kind, 0) for kind in ("resp", "rest")) if input_energy is not None else 0,
        shared_inputs={name: acc.owner[name] for name in sorted(modules) if acc.owner[name] != name},
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )


def check_rank(modules: dict[str, nn.Linear], rank: int, what: str) -> None:
    if rank < 1:
        raise SaLoRAError(f"{what} must be at least 1")
    smallest = min(min(m.out_features, m.in_features) for m in modules.values())
    if rank > smallest:
        raise SaLoRAError(f"{what} {rank} exceeds the smallest target layer dimension ({smallest})")


def answers_by_base(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[Messages], max_new_tokens: int, progress: str
) -> list[Messages]:
    """The prompts (any given answer dropped) with the base model's own greedy answers."""
    prompts = [c[:-1] if c[-1]["role"] == "assistant" else c for c in conversations]
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens, progress=progress)
    return [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]


def refusals_by_base(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[Messages], judge: Judge, max_new_tokens: int
) -> tuple[list[Messages], int]:
    """The base model's own answers, keeping only those the judge calls refusals."""
    answered = answers_by_base(model, tokenizer, conversations, max_new_tokens, "base answers")
    return [c for c in answered if judge.is_refusal(prompt_text(c), c[-1]["content"])], len(answered)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class MemoryEstimate:
    weights: int
    hidden_states: int
    layer_moments: int
    decomposition: int
    forward: int
    tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.hidden_states + self.layer_moments + self.decomposition + self.forward

    def describe(self, device: torch.device, available: int) -> str:
        return (
            f"needs about {_gib(self.total)} on {device}: weights {_gib(self.weights)}, hidden states of {self.tokens} tokens "
            f"{_gib(self.hidden_states)}, one layer's moments at most {_gib(self.layer_moments)}, decomposition "
            f"{_gib(self.decomposition)}, one batch's forward {_gib(self.forward)}; {_gib(available)} available"
        )


def estimate_memory(
    config, meta_modules: dict[str, nn.Linear], n_params: int, dtype: torch.dtype, batch_lengths: list[list[int]],
    kinds: int, sets: int, list_name: str | None,
) -> MemoryEstimate:
    """Peak memory of `stream_bases` from the model's shapes and the data's token counts (before
    anything is loaded). `batch_lengths`: token counts per batch, over every data set."""
    size = torch.tensor([], dtype=dtype).element_size()
    hidden = getattr(config, "hidden_size", max(m.in_features for m in meta_modules.values()))
    padded = sum(len(b) * max(b) for b in batch_lengths if b)
    per_layer: dict[int, int] = {}
    for name, m in meta_modules.items():
        layer = _layer_of(name, list_name) if list_name is not None else 0
        per_layer[layer] = per_layer.get(layer, 0) + m.in_features**2 * 8 * kinds * sets
    widest = max(max(m.in_features, m.out_features) for m in meta_modules.values())
    longest = max((len(b) * max(b) for b in batch_lengths if b), default=0)
    inner = max(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden, hidden)
    vocab = getattr(config, "vocab_size", 0) or 0
    return MemoryEstimate(
        weights=n_params * size,
        hidden_states=padded * hidden * size,
        layer_moments=max(per_layer.values()) if list_name is not None else sum(per_layer.values()),
        decomposition=3 * widest**2 * 8,
        forward=longest * (6 * inner * size + vocab * 4) if list_name is None else longest * 6 * inner * size,
        tokens=sum(sum(b) for b in batch_lengths),
    )


def calibrate(
    model_spec: str,
    data: str | Path,
    out: str | Path,
    target_modules: list[str],
    rank_safety: int = 32,
    max_samples: int = 128,
    generate_responses: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    judge: Judge | None = None,
    energy: float | None = None,
    contrast_data: str | Path | None = None,
    input_energy: float | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_length: int = 512,
    log=None,
) -> dict:
    """Compute and save the safety basis V_s for every target module (docs/design.md section 1).

    `energy` picks r_s per module as the fewest directions capturing that share of the spectrum
    (instead of a fixed `rank_safety`). `contrast_data` (benign conversations; with
    `generate_responses`, benign prompts the model answers itself) makes the basis contrastive.
    `input_energy` also computes the input-side basis U (this project's guard, not the paper's):
    input directions holding that share of the safety conversations' energy over all their tokens
    (contrastive too when `contrast_data` is given). `device`/`dtype` default to CUDA with bfloat16
    when present, else the CPU in float32. Before loading the model it prints the memory it will need
    (`log`, default stderr) and refuses if that is more than the device has free.
    """
    from salora.checks import at_least, fraction
    from salora.distributed import refuse_distributed
    from salora.precision import resolve_device, resolve_dtype, weight_hashes

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out)
    for flag, value in (("--rank-safety", rank_safety), ("--max-samples", max_samples), ("--batch-size", batch_size),
                        ("--max-new-tokens", max_new_tokens), ("--max-length", max_length)):
        at_least(flag, value)
    for flag, value in (("--energy", energy), ("--input-energy", input_energy)):
        fraction(flag, value)
    refuse_distributed("calibrate")
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    dtype = resolve_dtype(dtype, device)
    check_output_dir(out)
    conversations = read_chat_data(data, need_assistant=not generate_responses)[:max_samples]
    contrast = read_chat_data(contrast_data, need_assistant=not generate_responses)[:max_samples] if contrast_data else None

    # The memory check, from the config and the token counts alone (nothing loaded yet).
    path = resolve_model_dir(model_spec)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SaLoRAError(f"model {model_spec}: cannot load ({str(e).splitlines()[0]})") from e
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    meta_modules = linear_modules(meta_model, target_modules)
    check_rank(meta_modules, rank_safety, "--rank-safety")
    found = decoder_layers(meta_model, meta_modules)
    lengths = []
    for convs in (conversations, contrast or []):
        extra = max_new_tokens if generate_responses else 0
        sizes = [min(len(tokenize_chat(tokenizer, c, max_length).input_ids) + extra, max_length) for c in convs]
        lengths += [sizes[i : i + batch_size] for i in range(0, len(sizes), batch_size)]
    estimate = estimate_memory(
        config, meta_modules, sum(p.numel() for p in meta_model.parameters()), dtype, lengths,
        kinds=1 + (input_energy is not None), sets=1 + (contrast is not None), list_name=found[0] if found else None,
    )
    del meta_model, meta_modules
    available = _available_bytes(device)
    if estimate.total > available:
        raise SaLoRAError(f"calibration {estimate.describe(device, available)}; use fewer --max-samples, a smaller --max-length or --dtype bfloat16")
    log(f"calibrate: {estimate.describe(device, available)}")

    model, tokenizer = load_model(model_spec, device, dtype)
    modules = linear_modules(model, target_modules)
    judge = judge or KeywordJudge()
    generated = None
    started = time.perf_counter()
    if generate_responses:
        conversations, asked = refusals_by_base(model, tokenizer, conversations, judge, max_new_tokens)
        generated = {"prompts": asked, "refusals_kept": len(conversations)}
        if not conversations:
            raise SaLoRAError(f"the base model refused none of the {asked} prompts; give refusals in the data instead")
        if contrast is not None:
            contrast = answers_by_base(model, tokenizer, contrast, max_new_tokens, "contrast answers")
    if not any(label != IGNORE for c in conversations for label in tokenize_chat(tokenizer, c, max_length).labels):
        raise SaLoRAError(f"{data}: no assistant tokens to calibrate on")
    answers_seconds = time.perf_counter() - started
    started = time.perf_counter()
    streamed = stream_bases(
        model, tokenizer, conversations, modules, None if energy else rank_safety, energy, contrast, input_energy,
        max_length=max_length, batch_size=batch_size,
    )
    tensors = {f"{name}.V": V for name, V in streamed.V.items()}
    tensors.update({f"{name}.U": U for name, U in streamed.U.items()})
    hashes = weight_hashes(modules)
    meta = {
        "base_model": model_id(model_spec),
        "base_weight_hash": weight_hash(modules),
        "module_hashes": {name: weight_hash({name: m}) for name, m in sorted(modules.items())},
        "weight_hashes": hashes,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "target_modules": sorted(target_modules),
        "modules": sorted(modules),
        "basis": "contrastive" if contrast is not None else "variance",
        "rank_safety": rank_safety if energy is None else None,
        "energy": energy,
        "ranks": {name: V.shape[1] for name, V in sorted(streamed.V.items())},
        "contrast_sequences": len(contrast) if contrast is not None else 0,
        "sequences": len(conversations),
        "response_tokens": streamed.response_tokens,
        "energy_captured": {name: round(e, 6) for name, e in sorted(streamed.captured.items())},
        "input_energy": input_energy,
        "input_ranks": {name: U.shape[1] for name, U in sorted(streamed.U.items())},
        "shared_inputs": streamed.shared_inputs,
        "generated_responses": generated,
        "memory_estimate_bytes": estimate.total,
        "basis_seconds": round(time.perf_counter() - started, 3),
        "seconds": {"answers": round(answers_seconds, 3), **streamed.seconds},
        "data": str(data),
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / SAFETY_TENSORS))
        write_json_atomic(tmp / SAFETY_META, meta)
    return meta


def check_base(path: Path, meta: dict, modules: dict[str, nn.Linear]) -> None:
    """Stop unless `meta` (of a safety directory) was made on these exact modules of this base, at
    a precision both share (a float32 basis checks against a bfloat16 load of the same base)."""
    from salora.precision import same_weights, weight_hashes

    if "weight_hashes" in meta:
        verdict = same_weights(meta["weight_hashes"], weight_hashes(modules), sorted(modules))
        if verdict is None:
            raise SaLoRAError(
                f"{path}: calibrated in {meta.get('dtype')}, which cannot be checked against a "
                f"{str(next(iter(modules.values())).weight.dtype).removeprefix('torch.')} base; use the same --dtype"
            )
        ok = verdict
    else:  # made before precisions were recorded: float32 hashes
        ok = all(meta.get("module_hashes", {}).get(name) == weight_hash({name: m}) for name, m in modules.items())
    if not ok:
        raise SaLoRAError(f"{path}: made for another base model ({meta.get('base_model')}); calibrate on this model")


def load_safety(path: str | Path, modules: dict[str, nn.Linear]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Read a safety directory and check it was made for these exact modules of this exact base.
    Returns the output-side bases V and, when calibrated with an input energy, the input-side U."""
    path = Path(path)
    if not (path / SAFETY_TENSORS).is_file() or not (path / SAFETY_META).is_file():
        raise SaLoRAError(f"{path}: not a safety directory (needs {SAFETY_TENSORS} and {SAFETY_META})")
    try:
        meta = json.loads((path / SAFETY_META).read_text())
        tensors = load_file(str(path / SAFETY_TENSORS))
    except (ValueError, OSError) as e:
        raise SaLoRAError(f"{path}: unreadable safety files ({e})") from e
    hashes = meta.get("module_hashes", {})
    missing = sorted(name for name in modules if f"{name}.V" not in tensors or name not in hashes)
    if missing:
        raise SaLoRAError(
            f"{path}: no safety basis for {len(missing)} target modules (e.g. {missing[0]}); calibrate with the same --target-modules"
        )
    check_base(path, meta, modules)
    inputs = {name: tensors[f"{name}.U"] for name in modules} if all(f"{name}.U" in tensors for name in modules) else None
    return {name: tensors[f"{name}.V"] for name in modules}, inputs
