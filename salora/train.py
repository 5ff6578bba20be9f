"""Chat SFT of a SaLoRA adapter (or a plain PEFT LoRA baseline) with the loss on assistant tokens.

A checkpoint directory holds `salora_config.json` (what was trained, on which base) and either
`salora_adapter.safetensors` (SaLoRA: A, B, A0, B0, V per module) or a PEFT adapter (LoRA).
`salora export` turns either into a standard PEFT adapter or a merged model.

The loop: a global batch of `batch_size x grad_accum x processes` conversations per optimizer step,
drawn from one shuffled order that does not depend on the number of processes, so N processes with
`grad_accum K` train the same adapter as one process with `grad_accum N*K`. The loss is the mean over
the global batch's target tokens (each micro-batch's summed loss divided by that count), gradients
are summed across processes, clipped to norm 1, and AdamW steps under a warmup + schedule. The base
runs in `dtype` on `device`; the adapter, its gradients and the optimizer state are float32.

While it runs, the output is built in `.<out>.partial/` next to `out` and renamed into place at the
end. With `save_every N` a resumable checkpoint (adapter, optimizer, scheduler, RNG, step) is kept
every N steps in `checkpoints/step-N/`; after a kill, the same command with `resume=True` continues
from the last one and ends with the same adapter an uninterrupted run writes.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from salora.atomic import check_output_dir, write_json_atomic
from salora.calibrate import SAFETY_META, check_rank, load_safety, stream_bases
from salora.chat import IGNORE, collate, read_chat_data, tokenize_chat
from salora.checks import at_least, positive, share
from salora.distributed import World, init_world
from salora.errors import SaLoRAError
from salora.files import CHECKPOINT_CONFIG, SALORA_WEIGHTS
from salora.hf_data import fingerprint
from salora.models import linear_modules, load_model, model_id, weight_hash
from salora.precision import resolve_device, resolve_dtype, weight_hashes
from salora.chat_judge import parse_judge
from salora.screen import DEFAULT_THRESHOLD, screen, summary
from salora.tuner.config import ALL_LINEAR, SaLoRAConfig
from salora.tuner.model import inject_salora, salora_layers, salora_state

TRAIN_LOG = "train_log.jsonl"
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
SCREENING_REPORT = "screening.json"
SCHEDULES = ("constant", "linear", "cosine")
# Options that may differ between a killed run and its resumption (the rest must match exactly).
RESUME_MAY_DIFFER = ("out", "resume", "save_every", "extra", "device", "batch_size", "grad_accum")


@dataclass
class TrainOptions:
    model: str
    data: str
    out: str
    safety: str | None = None
    method: str = "salora"
    rank: int = 16
    alpha: float | None = None
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None  # 0 writes the untrained start (the CLI asks for at least 1)
    batch_size: int = 8  # per process and micro-batch
    seed: int = 0
    target_modules: list[str] | None = None
    init: str = "zero"
    projection: str = "input"
    task_rank: int = 32
    task_samples: int = 128
    max_length: int = 512
    save_every: int | None = None
    device: str | None = None  # None: CUDA when present, else the CPU
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on the CPU
    grad_accum: int = 1
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    gradient_checkpointing: bool = False
    resume: bool = False
    screen: bool = True  # judge the data first; refuse above screen_threshold (salora/screen.py)
    screen_threshold: float = DEFAULT_THRESHOLD
    judge: str = "keyword"
    extra: dict = field(default_factory=dict)


def _targets(opts: TrainOptions) -> list[str]:
    if opts.target_modules:
        return opts.target_modules
    if opts.safety and (Path(opts.safety) / SAFETY_META).is_file():
        return json.loads((Path(opts.safety) / SAFETY_META).read_text())["target_modules"]
    return list(ALL_LINEAR)


def _validate(opts: TrainOptions) -> None:
    if opts.method not in ("salora", "lora"):
        raise SaLoRAError(f"--method must be salora or lora, not {opts.method}")
    for name, value in (("--rank", opts.rank), ("--batch-size", opts.batch_size), ("--epochs", opts.epochs),
                        ("--grad-accum", opts.grad_accum), ("--task-rank", opts.task_rank), ("--task-samples", opts.task_samples),
                        ("--max-length", opts.max_length), ("--save-every", opts.save_every)):
        at_least(name, value, 1)
    at_least("--max-steps", opts.max_steps, 0)
    at_least("--warmup-steps", opts.warmup_steps, 0)
    positive("--lr", opts.lr)
    positive("--alpha", opts.alpha)
    share("--screen-threshold", opts.screen_threshold)
    parse_judge(opts.judge)
    if opts.lr_schedule not in SCHEDULES:
        raise SaLoRAError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, not {opts.lr_schedule}")
    if opts.method == "salora" and opts.projection != "none" and not opts.safety:
        raise SaLoRAError("--method salora needs --safety DIR (from `salora calibrate`)")


def target_count(example) -> int:
    """Tokens the causal LM loss counts in one example (labels are shifted by one)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


class DataOrder:
    """The conversations of each optimizer step: epoch e's order is the (e+1)-th shuffle of one
    `random.Random(seed)` (what the one-process loop always did), cut into global batches. A pure
    function of the step, so a resumed run draws what the killed one would have."""

    def __init__(self, n: int, global_batch: int, seed: int) -> None:
        self.n, self.global_batch = n, global_batch
        self.steps_per_epoch = math.ceil(n / global_batch)
        self._rng = random.Random(seed)
        self._orders: list[list[int]] = []

    def _order(self, epoch: int) -> list[int]:
        while len(self._orders) <= epoch:
            order = list(range(self.n))
            self._rng.shuffle(order)
            self._orders.append(order)
        return self._orders[epoch]

    def batch(self, step: int) -> list[int]:
        """Conversation ids of optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[k * self.global_batch : (k + 1) * self.global_batch]


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on a directory (released when the process dies, so it never goes stale)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise SaLoRAError(f"{directory}: another `salora train` is writing it") from e
        yield
    finally:
        os.close(fd)


def _checkpoints(work: Path) -> list[tuple[int, Path]]:
    """Complete resumable checkpoints in a work directory, by step."""
    root = work / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("step-") and p.name[5:].isdigit() and (p / TRAINER_STATE).is_file():
                found.append((int(p.name[5:]), p))
    return sorted(found)


class _Run:
    """One training run: the model with its adapter, the optimizer and schedule, the data."""

    def __init__(self, opts: TrainOptions, world: World, device: torch.device, dtype: torch.dtype, conversations: list) -> None:
        self.opts, self.world, self.device, self.dtype = opts, world, device, dtype
        torch.manual_seed(opts.seed)
        model, tokenizer = load_model(opts.model, device, dtype)
        targets = _targets(opts)
        modules = linear_modules(model, targets)
        check_rank(modules, opts.rank, "--rank")
        self.base_hash, self.base_hashes = weight_hash(modules), weight_hashes(modules)
        self.config = SaLoRAConfig(
            rank=opts.rank, alpha=opts.alpha, target_modules=targets, init=opts.init, task_rank=opts.task_rank, projection=opts.projection
        )
        safety, input_bases = load_safety(opts.safety, modules) if opts.safety and opts.method == "salora" else (None, None)
        if opts.method == "salora" and opts.projection in ("input", "both") and input_bases is None:
            raise SaLoRAError(
                f"--projection {opts.projection} needs an input guard in the safety basis, and {opts.safety} has none: calibrate "
                "with --input-energy (on by default; --preset paper turns it off), or train with --preset paper or --projection output"
            )
        # Screened on the untouched base after the cheap checks, by rank 0 alone; _train refuses on every process.
        self.screening: dict = {"ran": False}
        if opts.screen and world.main:
            self.screening = screen(model, tokenizer, conversations, parse_judge(opts.judge), opts.screen_threshold)
        if opts.method == "salora":
            task_bases = None
            if self.config.init in ("task", "task-scaled"):
                check_rank(modules, self.config.task_rank, "--task-rank")
                task_bases = stream_bases(
                    model, tokenizer, conversations[: opts.task_samples], modules, self.config.task_rank, max_length=opts.max_length,
                    progress="task basis" if world.main else None,
                ).V
            inject_salora(model, modules, self.config, safety, task_bases, seed=opts.seed, input_bases=input_bases)
        else:
            model = get_peft_model(model, LoraConfig(r=opts.rank, lora_alpha=opts.alpha or opts.rank, target_modules=targets, lora_dropout=0.0))
        if opts.gradient_checkpointing:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.config.use_cache = False
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model, self.tokenizer = model, tokenizer
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.examples = [tokenize_chat(tokenizer, c, opts.max_length) for c in conversations]
        self.global_batch = opts.batch_size * opts.grad_accum * world.size
        self.order = DataOrder(len(self.examples), self.global_batch, opts.seed)
        self.total_steps = opts.max_steps if opts.max_steps is not None else opts.epochs * self.order.steps_per_epoch
        if opts.warmup_steps and opts.warmup_steps >= max(self.total_steps, 1):
            raise SaLoRAError(f"--warmup-steps {opts.warmup_steps} must be below the run's {self.total_steps} steps")
        from transformers import get_scheduler

        self.optimizer = torch.optim.AdamW(self.params, lr=opts.lr, weight_decay=0.0)
        name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[opts.lr_schedule]
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=opts.warmup_steps, num_training_steps=max(self.total_steps, 1))
        self.meta = {
            "method": opts.method,
            "base_model": opts.model,
            "base_model_id": model_id(opts.model),
            "base_weight_hash": self.base_hash,
            "weight_hashes": self.base_hashes,
            "salora": self.config.to_dict(),
            "safety": str(opts.safety) if opts.safety else None,
            "options": asdict(opts),
            "data_sha256": fingerprint(opts.data),
            "dtype": str(dtype).removeprefix("torch."),
            "processes": world.size,
            "global_batch": self.global_batch,
            "screening": {k: v for k, v in self.screening.items() if k != "flagged"} | ({"report": SCREENING_REPORT} if self.screening["ran"] else {}),
        }

    # -- one optimizer step -------------------------------------------------------------------
    def step(self, step: int) -> tuple[float, float]:
        """Optimizer step `step` (0-based) on this process's share of the global batch; returns the
        global batch's mean loss and the learning rate it used."""
        opts, world = self.opts, self.world
        ids = self.order.batch(step)
        chunks = [ids[j * opts.batch_size : (j + 1) * opts.batch_size] for j in range(opts.grad_accum * world.size)]
        items = max(1, sum(target_count(self.examples[i]) for i in ids))
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), dtype=torch.float64)
        for j in range(world.rank, len(chunks), world.size):
            if not chunks[j]:
                continue
            batch = {k: v.to(self.device) for k, v in collate([self.examples[i] for i in chunks[j]], self.tokenizer.pad_token_id).items()}
            loss = self.model(**batch, num_items_in_batch=items).loss
            loss.backward()
            loss_sum += loss.detach().double().cpu()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if world.size > 1:
            flat = world.all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
            offset = 0
            for p, g in zip(self.params, grads):
                p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
                offset += g.numel()
            loss_sum = world.all_reduce_(loss_sum.to(world.device)).cpu()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum.item(), lr

    # -- saving and resuming ------------------------------------------------------------------
    def save_adapter(self, directory: Path, step: int, log: list[dict]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if self.opts.method == "salora":
            save_file(salora_state(salora_layers(self.model)), str(directory / SALORA_WEIGHTS))
        else:
            self.model.save_pretrained(directory)
        if self.screening["ran"]:
            write_json_atomic(directory / SCREENING_REPORT, self.screening)
        write_json_atomic(directory / CHECKPOINT_CONFIG, {**self.meta, "step": step, "final_loss": log[-1]["loss"] if log else None})

    def save_resumable(self, root: Path, step: int, log: list[dict]) -> None:
        """checkpoints/step-N: the adapter (exportable as is) plus what resuming needs, written
        under a temporary name and renamed, so a kill mid-write leaves the previous one intact."""
        tmp = root / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_adapter(tmp, step, log)
        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in self.named_params}
        state = self.optimizer.state_dict()
        for index, entries in state["state"].items():
            for key, value in entries.items():
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        save_file(tensors, str(tmp / TRAINER_TENSORS))
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        write_json_atomic(tmp / TRAINER_STATE, {"step": step, "param_groups": state["param_groups"], "scheduler": scheduler,
                                                "options": asdict(self.opts), "data_sha256": self.meta["data_sha256"],
                                                "global_batch": self.global_batch, "log": log})
        final = root / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def restore(self, checkpoint: Path) -> tuple[int, list[dict]]:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        then, now = state["options"], asdict(self.opts)
        for key in sorted(set(then) | set(now)):
            if key not in RESUME_MAY_DIFFER and then.get(key) != now.get(key):
                raise SaLoRAError(f"cannot resume {checkpoint}: it was trained with {key}={then.get(key)!r}, this run has {now.get(key)!r}")
        if state["data_sha256"] != self.meta["data_sha256"]:
            raise SaLoRAError(f"cannot resume {checkpoint}: {self.opts.data} changed since it was trained")
        if state["global_batch"] != self.global_batch:
            raise SaLoRAError(
                f"cannot resume {checkpoint}: its global batch (batch size x grad accum x processes) was {state['global_batch']}, "
                f"this run's is {self.global_batch}"
            )
        tensors = load_file(str(checkpoint / TRAINER_TENSORS))
        with torch.no_grad():
            for n, p in self.named_params:
                p.copy_(tensors[f"param.{n}"])
        optim_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": state["param_groups"]})
        scheduler = self.scheduler.state_dict()
        scheduler.update(state["scheduler"])
        self.scheduler.load_state_dict(scheduler)
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        return state["step"], state["log"]


def _prepare_work(out: Path, opts: TrainOptions) -> tuple[Path, Path | None]:
    """The partial directory of this output and the checkpoint to resume from (rank 0 only)."""
    work = out.parent / f".{out.name}.partial"
    out.parent.mkdir(parents=True, exist_ok=True)
    if work.exists():
        with _locked(work):
            found = _checkpoints(work)
            if found and not opts.resume:
                raise SaLoRAError(
                    f"{work} holds an unfinished run's checkpoints (last: step {found[-1][0]}); add --resume to continue it, or remove it"
                )
            if not found:
                shutil.rmtree(work)  # a run killed before its first checkpoint: nothing to keep
                return work, None
            return work, found[-1][1]
    return work, None


def refusal_report_path(out: Path) -> Path:
    """Where a refused run's screening report goes: beside the output it did not write."""
    return out.parent / f"{out.name}.{SCREENING_REPORT}"


def _check_screening(report: dict, out: Path) -> None:
    if not report["ran"] or report["passed"]:
        return
    path = refusal_report_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    raise SaLoRAError(f"screening: {summary(report)}; training refused, the list is in {path} "
                      "(--screen-threshold sets the limit, --no-screen skips screening)")


def _log_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def train(opts: TrainOptions) -> dict:
    """Train and write the checkpoint directory atomically; returns the run summary."""
    _validate(opts)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    out = Path(opts.out)
    check_output_dir(out)
    conversations = read_chat_data(opts.data)
    world = init_world(device)
    try:
        return _train(opts, world, device, dtype, out, conversations)
    finally:
        world.close()


def _train(opts: TrainOptions, world: World, device: torch.device, dtype: torch.dtype, out: Path, conversations: list) -> dict:
    run = _Run(opts, world, device, dtype, conversations)
    work, resume_from, problem = None, None, None
    if world.main:
        try:
            _check_screening(run.screening, out)
            work, resume_from = _prepare_work(out, opts)
        except SaLoRAError as e:
            problem = e
    if not world.agree(problem is None):
        raise problem or SaLoRAError("the first process could not prepare the output directory (see its error)")
    work = out.parent / f".{out.name}.partial"
    # Every process resumes from the same checkpoint: rank 0's choice, broadcast as a step number.
    chosen = torch.tensor([-1 if resume_from is None else int(resume_from.name[5:])], device=world.device)
    if world.size > 1:
        torch.distributed.broadcast(chosen, 0)
    start, log = 0, []
    if chosen.item() >= 0:
        start, log = run.restore(work / "checkpoints" / f"step-{int(chosen.item())}")
        if world.main:
            _log_line(f"train: resuming {work} from step {start} of {run.total_steps}")
    elif opts.resume and world.main:
        _log_line(f"train: nothing to resume in {work}; starting from step 0")

    def body() -> dict:
        run.model.train()
        started = time.perf_counter() - (log[-1]["seconds"] if log else 0.0)
        bar = tqdm(total=run.total_steps, initial=start, desc=f"train {opts.method}", unit="step", disable=not world.main)
        log_file = (work / TRAIN_LOG).open("w") if world.main else None
        try:
            for entry in log:
                log_file and log_file.write(json.dumps(entry) + "\n")
            for step in range(start, run.total_steps):
                loss, lr = run.step(step)
                entry = {"step": step + 1, "epoch": step // run.order.steps_per_epoch + 1, "loss": loss, "lr": lr,
                         "seconds": round(time.perf_counter() - started, 3)}
                log.append(entry)
                if log_file:
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if opts.save_every and (step + 1) % opts.save_every == 0 and step + 1 < run.total_steps and world.main:
                    (work / "checkpoints").mkdir(exist_ok=True)
                    run.save_resumable(work / "checkpoints", step + 1, log)
        finally:
            bar.close()
            if log_file:
                log_file.close()
        run.model.eval()
        run.meta["train_seconds"] = round(time.perf_counter() - started, 3)
        run.meta["steps"] = run.total_steps
        if world.main:
            run.save_adapter(work, run.total_steps, log)
        return {**run.meta, "final_loss": log[-1]["loss"] if log else None}

    if not world.main:
        summary = body()
        world.barrier()
        return summary
    work.mkdir(exist_ok=True)
    with _locked(work):
        try:
            summary = body()
        except BaseException:
            if _checkpoints(work):
                _log_line(f"train: checkpoints kept in {work}; rerun with --resume to continue")
            else:
                shutil.rmtree(work, ignore_errors=True)
            raise
        check_output_dir(out)
        if out.exists():
            out.rmdir()
        os.replace(work, out)
    world.barrier()
    return summary
