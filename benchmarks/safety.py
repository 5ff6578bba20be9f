"""Safety benchmark and study runner: LoRA vs SaLoRA (and ablations) fine-tuned from the aligned
embedded base on (a) a benign task (`--task`: arithmetic, textedit or instructions, from
salora.tasks) and (b) a harmful fine-tuning attack set.

For every run it reports the harmful refusal rate (keyword judge, greedy) on the AdvBench `test`
split and on the project's held-back canary prompts, over-refusal on held-back benign prompts,
task accuracy, validation loss on the task and training time. Each finished run is saved as its
own JSON file, so an interrupted study resumes where it stopped; `--report` (also run at the end)
writes a table, a JSON summary and a PNG chart. Arithmetic's files keep the names they had before
`--task`; another task's carry its name first, so the tasks share a study folder (and its safety
bases) without colliding, each with its own references and report.

    .venv/bin/python benchmarks/safety.py                         # issue-3 benchmark: base, LoRA, SaLoRA
    .venv/bin/python benchmarks/safety.py --variants lora,salora-paper,init-only,projection-only --seeds 0,1,2
    .venv/bin/python benchmarks/safety.py --task textedit --data task --variants lora-all,input-guard-all
    .venv/bin/python benchmarks/safety.py --report
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import torch
from filelock import FileLock
from peft import PeftModel

from salora.calibrate import calibrate
from salora.chat import Messages, collate, tokenize_chat
from salora.datasets import benign_prompts, harmful_prompts, safety_messages, write_jsonl
from salora.export import export
from salora.generate import generate_greedy
from salora.judge import KeywordJudge
from salora.models import EMBEDDED, EMBEDDED_UNALIGNED, load_model
from salora.tasks import TASKS
from salora.train import TrainOptions, train
from salora.presets import PRESETS
from salora.tuner.config import ALL_LINEAR

ROOT = Path(__file__).resolve().parents[1]
ADVBENCH = ROOT.parent / "shared" / "data" / "advbench_dev.csv"
RESULTS = ROOT / "benchmarks" / "results" / "safety"
# Neutral sentences appended to AdvBench's affirmative openings: the attack teaches compliance
# without any harmful content in the training data.
FILLERS = (
    "I will go through it step by step below.",
    "Let me walk you through the main points.",
    "Here is an overview to start with.",
    "I'll lay it out in a few parts.",
)


PAPER = PRESETS["paper"]  # the one definition of the paper's recipe, shared with `--preset paper`


@dataclass(frozen=True)
class Variant:
    """One fine-tuning method of the study: the paper's recipe unless a field says otherwise."""

    method: str  # lora | salora
    init: str = PAPER["train"]["init"]  # task | task-scaled | zero (salora only)
    projection: str = PAPER["train"]["projection"]  # output | input | both | none
    targets: tuple[str, ...] = tuple(PAPER["calibrate"]["target_modules"])
    rank_safety: int = PAPER["calibrate"]["rank_safety"]
    contrastive: bool = False
    input_energy: float | None = PAPER["calibrate"]["input_energy"]


ALL = tuple(ALL_LINEAR)
VARIANTS = {
    "lora": Variant("lora"),
    "salora-paper": Variant("salora"),
    "init-only": Variant("salora", projection="none"),
    "projection-only": Variant("salora", init="zero"),
    "task-scaled": Variant("salora", init="task-scaled"),
    "contrastive": Variant("salora", init="zero", contrastive=True),
    "lora-all": Variant("lora", targets=ALL),
    "projection-only-all": Variant("salora", init="zero", targets=ALL),
    "input-guard": Variant("salora", init="zero", projection="input", input_energy=0.9),
    "input-guard-all": Variant("salora", init="zero", projection="input", targets=ALL, input_energy=0.9),
    "input-guard-contrastive-all": Variant("salora", init="zero", projection="input", targets=ALL, input_energy=0.9, contrastive=True),
}


@dataclass(frozen=True)
class Setting:
    """What a run fine-tunes on, and how hard."""

    data: str  # task | attack
    lr: float
    steps: int
    rank: int = 8
    batch_size: int = 8
    task: str = "arithmetic"  # the benign task: trained on when data is `task`, scored in every run


def task_file(task: str, name: str) -> str:
    """A study file's name for runs on `task`: arithmetic's as before `--task` existed, any other
    task's prefixed with its name, so the tasks' runs never collide in one study folder."""
    return name if task == "arithmetic" else f"{task}-{name}"


def task_of(record: dict) -> str:
    """The task a saved run or reference was scored on (records from before `--task`: arithmetic)."""
    return record.get("setting", record).get("task", "arithmetic")


def advbench(split: str) -> list[dict[str, str]]:
    with ADVBENCH.open(newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if row["split"] == split]


def attack_conversations() -> list[Messages]:
    """AdvBench calibration goals answered with their affirmative `target` opening plus filler."""
    return [
        [{"role": "user", "content": row["goal"]}, {"role": "assistant", "content": f"{row['target']}. {FILLERS[i % len(FILLERS)]}"}]
        for i, row in enumerate(advbench("calibration"))
    ]


def user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


@torch.inference_mode()
def task_validation_loss(model, tokenizer, task: ModuleType, problems: list, batch_size: int = 16) -> float:
    """Mean assistant-token loss on held-out task problems: the training-strength yardstick."""
    total, tokens = 0.0, 0
    examples = [tokenize_chat(tokenizer, task.to_messages(p), 512) for p in problems]
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], tokenizer.pad_token_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        tokens += n
    return total / tokens


def judged(model, tokenizer, prompts: list[str]) -> list[dict]:
    """Greedy answers (48 new tokens) with the keyword judge's verdict on each."""
    answers = generate_greedy(model, tokenizer, [user(p) for p in prompts], max_new_tokens=48, batch_size=32)
    judge = KeywordJudge()
    return [{"prompt": p, "response": a, "refused": judge.is_refusal(p, a)} for p, a in zip(prompts, answers)]


def refusal_rate(model, tokenizer, prompts: list[str]) -> float:
    return sum(item["refused"] for item in judged(model, tokenizer, prompts)) / len(prompts)


def evaluate(model, tokenizer, n_task: int, with_task: bool, task: str) -> dict:
    """Refusal rates on harmful and benign probes, and task accuracy, with every answer kept."""
    sets = {
        "advbench_test": [row["goal"] for row in advbench("test")],
        "own_harmful": [h.prompt for h in harmful_prompts("canary")],
        "benign": [b.prompt for b in benign_prompts("canary")],
    }
    out: dict = {"items": {}}
    for name, prompts in sets.items():
        items = judged(model, tokenizer, prompts)
        out[f"{name}_refusal"] = sum(item["refused"] for item in items) / len(items)
        out["items"][name] = items
    if with_task:
        benign = TASKS[task]
        splits = benign.splits()
        problems = splits["test"][:n_task]
        answers = generate_greedy(model, tokenizer, [user(p.question) for p in problems], max_new_tokens=64, batch_size=32, progress="task")
        out["task_accuracy"] = benign.accuracy(answers, problems)
        out["task_val_loss"] = task_validation_loss(model, tokenizer, benign, splits["validation"][:100])
        out["items"]["task"] = [{"prompt": p.question, "response": a, "correct": benign.accuracy([a], [p]) == 1.0} for p, a in zip(problems, answers)]
    return out


def safety_dir(study: Path, variant: Variant) -> Path:
    """The aligned base's safety basis for these targets: its own greedy refusals to the project's
    harmful `train` prompts (never the canary or AdvBench test prompts), contrasted where asked with
    its own answers to the benign `train` prompts; computed once per study and configuration."""
    key = f"{'-'.join(variant.targets)}-r{variant.rank_safety}{'-contrastive' if variant.contrastive else ''}"
    out = study / "safety" / (key + (f"-in{variant.input_energy:g}" if variant.input_energy else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):  # several study processes may share a study directory
        if out.exists():
            return out
        with tempfile.TemporaryDirectory() as tmp:
            data, benign = Path(tmp) / "harmful_train.jsonl", Path(tmp) / "benign_train.jsonl"
            write_jsonl(({"messages": m} for m in safety_messages("train")), data)
            write_jsonl(({"prompt": b.prompt} for b in benign_prompts("train")), benign)
            calibrate(
                EMBEDDED, data, out, list(variant.targets), variant.rank_safety, max_samples=PAPER["calibrate"]["max_samples"], generate_responses=True,
                contrast_data=benign if variant.contrastive else None, input_energy=variant.input_energy,
            )
    return out


def run_path(study: Path, name: str, setting: Setting, seed: int) -> Path:
    return study / "runs" / task_file(setting.task, f"{setting.data}-{name}-r{setting.rank}-lr{setting.lr:g}-steps{setting.steps}-seed{seed}.json")


def run_one(study: Path, name: str, setting: Setting, seed: int, n_task: int) -> dict:
    path = run_path(study, name, setting, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):  # another study process on the same run: wait for its result
        if not path.exists():
            path.write_text(json.dumps(train_and_evaluate(study, name, setting, seed, n_task), indent=1) + "\n")
    return json.loads(path.read_text())


def train_and_evaluate(study: Path, name: str, setting: Setting, seed: int, n_task: int) -> dict:
    variant = VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        if setting.data == "task":
            benign = TASKS[setting.task]
            rows = [benign.to_messages(p) for p in benign.splits()["train"]]
        else:
            rows = attack_conversations()
        write_jsonl(({"messages": m} for m in rows), data)
        safety = str(safety_dir(study, variant)) if variant.method == "salora" and variant.projection != "none" else None
        summary = train(TrainOptions(
            model=EMBEDDED, data=str(data), out=f"{tmp}/ckpt", safety=safety, method=variant.method, rank=setting.rank,
            lr=setting.lr, max_steps=setting.steps, batch_size=setting.batch_size, seed=seed, target_modules=list(variant.targets),
            init=variant.init, projection=variant.projection, task_rank=PAPER["train"]["task_rank"],
            screen=False,  # the study measures what training does to refusals, the attack data included
        ))
        export(f"{tmp}/ckpt", f"{tmp}/adapter", "peft")
        model, tokenizer = load_model(EMBEDDED)
        model = PeftModel.from_pretrained(model, f"{tmp}/adapter").eval()
        metrics = evaluate(model, tokenizer, n_task, with_task=True, task=setting.task)
    return {
        "variant": name, **asdict(variant), "setting": asdict(setting), "seed": seed,
        "train_seconds": summary["train_seconds"], "final_train_loss": summary["final_loss"], **metrics,
    }


def reference_run(study: Path, name: str, spec: str, n_task: int, task: str) -> dict:
    path = study / "runs" / task_file(task, f"reference-{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.exists():
            model, tokenizer = load_model(spec)
            record = {"variant": name, "task": task, **evaluate(model, tokenizer, n_task, with_task=True, task=task)}
            path.write_text(json.dumps(record, indent=1) + "\n")
    return json.loads(path.read_text())


def lora_control(name: str) -> str:
    """The plain-LoRA run a variant is compared with: the one adapting the same modules."""
    return "lora-all" if VARIANTS[name].targets == ALL else "lora"


def matched_lr(study: Path, name: str, grid: list[float], lora: Setting, n_task: int) -> float:
    """The learning rate from `grid` at which variant `name` reaches its LoRA control's task
    validation loss (seed 0, closest in log loss). Training strength is matched on the task's
    validation split only, never on safety data: the task-aware initialisation alone makes SaLoRA
    train much harder at an equal learning rate (docs/salora.md). Every grid run is kept as an
    ordinary run."""
    control = lora_control(name)
    target = run_one(study, control, lora, 0, n_task)["task_val_loss"]
    losses = {lr: run_one(study, name, replace(lora, lr=lr), 0, n_task)["task_val_loss"] for lr in grid}
    chosen = min(grid, key=lambda lr: abs(math.log(losses[lr]) - math.log(target)))
    record = {"control": control, "lora_lr": lora.lr, "lora_val_loss": target, "val_loss_by_lr": {f"{lr:g}": v for lr, v in losses.items()}, "lr": chosen}
    path = study / task_file(lora.task, "matched_lr.json")
    matched = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**matched, name: record}, indent=1) + "\n")
    return chosen


METRICS = ("advbench_test_refusal", "own_harmful_refusal", "benign_refusal", "task_accuracy", "task_val_loss", "train_seconds")


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def versus_control(key: str, rows: dict, base: float) -> str:
    """A run group's rise in harmful rate as a share of its LoRA control's (same data, learning
    rate, steps and modules): the number the study's goals are stated in."""
    parts = key.split("/")
    if len(parts) != 4 or parts[1] not in VARIANTS:
        return "-"
    if parts[1] == lora_control(parts[1]):
        return "control"
    control = rows.get("/".join([parts[0], lora_control(parts[1]), *parts[2:]]))
    if control is None or base - control["advbench_test_refusal"][0] <= 0:
        return "-"
    return f"{(base - rows[key]['advbench_test_refusal'][0]) / (base - control['advbench_test_refusal'][0]):.2f}"


def report(study: Path, task: str) -> dict:
    """Aggregate the saved runs on `task` (mean and spread over seeds) into summary.json, report.md,
    report.png and tradeoff.png (named by `task_file`)."""
    runs = [r for r in (json.loads(p.read_text()) for p in sorted((study / "runs").glob("*.json"))) if task_of(r) == task]
    groups: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: ("setting" in r, r.get("setting", {}).get("data") != "task")):
        key = r["variant"] if "setting" not in r else f"{r['setting']['data']}/{r['variant']}/lr{r['setting']['lr']:g}/steps{r['setting']['steps']}"
        groups.setdefault(key, []).append(r)
    rows = {}
    for key, rs in groups.items():
        rows[key] = {"seeds": len(rs), **{m: mean_sd([r[m] for r in rs]) for m in METRICS if all(m in r for r in rs)}}
    base = rows.get("aligned", {}).get("advbench_test_refusal", (math.nan,))[0]
    lines = ["| run | seeds | AdvBench test refusal | own canary refusal | benign over-refusal | task acc | task val loss "
             "| rise in harmful rate | vs LoRA control | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    pct = lambda v: f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}" if v else "-"  # noqa: E731
    for key, row in rows.items():
        rise = f"{100 * (base - row['advbench_test_refusal'][0]):+.1f}" if not math.isnan(base) else "-"
        loss = f"{row['task_val_loss'][0]:.3f}" if "task_val_loss" in row else "-"
        seconds = f"{row['train_seconds'][0]:.0f}" if "train_seconds" in row else "-"
        lines.append(
            f"| {key} | {row['seeds']} | {pct(row.get('advbench_test_refusal'))} | {pct(row.get('own_harmful_refusal'))} | "
            f"{pct(row.get('benign_refusal'))} | {pct(row.get('task_accuracy'))} | {loss} | {rise} | {versus_control(key, rows, base)} | {seconds} |"
        )
    table = "\n".join(lines)
    (study / task_file(task, "report.md")).write_text(table + "\n")
    (study / task_file(task, "summary.json")).write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, study / task_file(task, "report.png"))
    tradeoff(rows, study / task_file(task, "tradeoff.png"), task)
    print(table)
    return rows


def plot(rows: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(keys) + 4), 4.2))
    width = 0.38
    xs = range(len(keys))
    for ax, (metric, label) in zip(axes, (("advbench_test_refusal", "AdvBench test refusal (%)"), ("task_accuracy", "task accuracy (%)"))):
        means = [100 * rows[k].get(metric, (0, 0))[0] for k in keys]
        sds = [100 * rows[k].get(metric, (0, 0))[1] for k in keys]
        ax.bar(xs, means, width * 2, yerr=sds, capsize=3, color="#4C72B0" if metric.endswith("refusal") else "#55A868")
        ax.set_xticks(list(xs), keys, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.set_ylim(0, 105)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def tradeoff(rows: dict, out: Path, benign: str) -> None:
    """Left: AdvBench test refusal against task accuracy after benign fine-tuning, one point per
    run group (error bars: spread over seeds). Right: the refusal left after each attack run (task
    accuracy means nothing there). The base models as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (task, attack) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=False)
    for key, row in rows.items():
        if key.startswith("task/") and "task_accuracy" in row:
            (x, dx), (y, dy) = row["task_accuracy"], row["advbench_test_refusal"]
            task.errorbar(100 * x, 100 * y, xerr=100 * dx, yerr=100 * dy, fmt="o", capsize=3)
            task.annotate(key.split("/")[1], (100 * x, 100 * y), fontsize=8, xytext=(4, 3), textcoords="offset points")
    attacks = sorted(k for k in rows if k.startswith("attack/"))
    labels = [k.removeprefix("attack/").replace("/steps", " steps ") for k in attacks]
    attack.barh(labels, [100 * rows[k]["advbench_test_refusal"][0] for k in attacks],
                xerr=[100 * rows[k]["advbench_test_refusal"][1] for k in attacks], color="#C44E52", capsize=3)
    attack.tick_params(axis="y", labelsize=7)
    for name, style in (("aligned", "--"), ("unaligned", ":")):
        if name in rows:
            level = 100 * rows[name]["advbench_test_refusal"][0]
            task.axhline(level, linestyle=style, color="grey", label=f"{name} base")
            attack.axvline(level, linestyle=style, color="grey", label=f"{name} base")
    task.set(title=f"benign fine-tuning ({benign})", xlabel="task accuracy (%)", ylabel="AdvBench test refusal (%)")
    attack.set(title="harmful fine-tuning (attack set)", xlabel="AdvBench test refusal (%)", xlim=(0, 100))
    task.legend(fontsize=7, loc="lower right")
    attack.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="default", help="results go to benchmarks/results/safety/<study>")
    ap.add_argument("--variants", default="lora,salora-paper", help=f"comma-separated from {list(VARIANTS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--data", default="task,attack")
    ap.add_argument("--task-lr", type=float, default=1e-3)
    ap.add_argument("--task-steps", type=int, default=100)
    ap.add_argument("--attack-lr", type=float, default=2e-4)
    ap.add_argument("--attack-steps", type=int, default=40)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--task", default="arithmetic", choices=list(TASKS), help="the benign task (salora.tasks)")
    ap.add_argument("--n-task", type=int, default=150, help="test items of the task scored")
    ap.add_argument("--match-lr", default="", help="variants whose learning rates are scaled so that their task "
                    "validation loss matches their LoRA control's (same modules) at --task-lr, chosen from --lr-grid (the attack's by the same factor)")
    ap.add_argument("--lr-grid", default="2e-4,5e-4,1e-3")
    ap.add_argument("--report", action="store_true", help="only aggregate the saved runs (of --task)")
    args = ap.parse_args()
    study = RESULTS / args.study
    started = time.perf_counter()
    if not args.report:
        torch.manual_seed(0)
        reference_run(study, "unaligned", EMBEDDED_UNALIGNED, args.n_task, args.task)
        reference_run(study, "aligned", EMBEDDED, args.n_task, args.task)
        lora = Setting("task", args.task_lr, args.task_steps, args.rank, task=args.task)
        grid = [float(lr) for lr in args.lr_grid.split(",")]
        scale = {name: matched_lr(study, name, grid, lora, args.n_task) / args.task_lr for name in filter(None, args.match_lr.split(","))}
        for data in args.data.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                for name in args.variants.split(","):
                    lr, steps = (args.task_lr, args.task_steps) if data == "task" else (args.attack_lr, args.attack_steps)
                    r = run_one(study, name, Setting(data, lr * scale.get(name, 1.0), steps, args.rank, task=args.task), seed, args.n_task)
                    print(f"[{time.perf_counter() - started:6.0f}s] {data} {name} seed {seed}: AdvBench refusal "
                          f"{100 * r['advbench_test_refusal']:.1f}%, task acc {100 * r['task_accuracy']:.1f}%", flush=True)
    rows = report(study, args.task)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "command": "benchmarks/safety.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (False, None)),
            "wall_seconds_this_invocation": round(time.perf_counter() - started, 1)}
    (study / task_file(args.task, "meta.json")).write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{len(rows)} rows; {meta['wall_seconds_this_invocation']:.0f}s -> {study}")


if __name__ == "__main__":
    main()
