"""`salora train`: fine-tune a SaLoRA adapter, or a plain LoRA baseline."""

import argparse

from salora_cli.calibrate import add_device_flags, csv_list


def add_parser(sub: argparse._SubParsersAction) -> None:
    from salora.presets import DEFAULTS
    from salora.screen import DEFAULT_THRESHOLD

    d = DEFAULTS["train"]
    p = sub.add_parser("train", help="fine-tune an adapter (SaLoRA or plain LoRA) on chat data",
                       description="Fine-tune on chat data. Data parallel: `torchrun --nproc-per-node=N --no-python salora train ...` "
                                   "(global batch = --batch-size x --grad-accum x N; rank 0 writes the output).")
    p.add_argument("--model", required=True, help="model directory or `embedded`")
    p.add_argument("--data", required=True, help="chat `messages` records (loss on assistant turns only): JSONL, a parquet file, or a local HF datasets directory (save_to_disk)")
    p.add_argument("--safety", help="safety directory from `salora calibrate` (needed for --method salora)")
    p.add_argument("--out", required=True, help="new checkpoint directory")
    p.add_argument("--method", choices=["salora", "lora"], default="salora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank, so scale 1)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default="constant",
                   help="after --warmup-steps of linear warmup: constant (default), linear decay to 0, or cosine decay to 0")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per micro-batch and process (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step and process (default 1)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-modules", type=csv_list, default=None,
                   help="default: the safety basis's modules (all seven linear projections for --method lora without --safety)")
    p.add_argument("--init", choices=["task", "task-scaled", "zero"], default=None,
                   help=f"SaLoRA start: standard LoRA, zero B (default {d['init']}), task-aware (the paper's), or task-aware at LoRA's magnitude")
    p.add_argument("--preset", choices=["paper"], default=None,
                   help="paper: task-aware init, d_s 32, alpha = rank, output projection, the basis's modules (calibrate with --preset paper); "
                        "a flag that contradicts it is an error")
    p.add_argument("--projection", choices=["output", "input", "both", "none"], default=None,
                   help=f"input (default {d['projection']}): the input-side guard (needs the basis's --input-energy); output: the paper's C "
                        "on every update; both; none: ablation")
    p.add_argument("--task-rank", type=int, default=None, help=f"d_s, task directions for the task-aware init (default {d['task_rank']})")
    p.add_argument("--max-length", type=int, default=512, help="tokens per conversation")
    p.add_argument("--save-every", type=int, default=None,
                   help="keep a resumable checkpoint (checkpoints/step-N: adapter, optimizer, schedule, RNG) every N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue the run a kill left in .<out>.partial/ from its last checkpoint (same options and data)")
    p.add_argument("--no-screen", dest="screen", action="store_false",
                   help="skip screening the data (the checkpoint records that it was skipped)")
    p.add_argument("--screen-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="refuse to train when more than this share of conversations answer with compliance a request the base model refuses "
                        f"(default {DEFAULT_THRESHOLD:g}; 0 tolerates none); the list goes to <out>.screening.json")
    p.add_argument("--judge", default="keyword", help="the refusal judge of the screening: keyword (default) or "
                   "openai:<base-url>#<model>, as for `salora eval`")
    add_device_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from salora.checks import at_least
    from salora.presets import resolve
    from salora.train import TrainOptions, train

    at_least("--max-steps", args.max_steps, 1)  # the library's 0 (write the untrained start) is no use here
    method = resolve("train", args.preset, {"init": args.init, "task_rank": args.task_rank, "alpha": args.alpha, "projection": args.projection},
                     context={"rank": args.rank})
    summary = train(
        TrainOptions(
            model=args.model, data=args.data, out=args.out, safety=args.safety, method=args.method, rank=args.rank,
            alpha=method["alpha"], lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
            seed=args.seed, target_modules=args.target_modules, init=method["init"], projection=method["projection"],
            task_rank=method["task_rank"], max_length=args.max_length, save_every=args.save_every, device=args.device,
            dtype=args.dtype, grad_accum=args.grad_accum, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
            gradient_checkpointing=args.gradient_checkpointing, resume=args.resume, screen=args.screen,
            screen_threshold=args.screen_threshold, judge=args.judge,
        )
    )
    if summary.get("processes", 1) > 1 and not _is_rank_zero():
        return
    screening = summary["screening"]
    screened = (f"screening: {screening['flagged_conversations']} of {screening['conversations']} conversations flagged"
                if screening["ran"] else "screening skipped (--no-screen)")
    print(f"{summary['method']}: {summary['steps']} steps in {summary['train_seconds']:.1f}s, final loss {summary['final_loss']:.4f}, "
          f"{screened} -> {args.out}")


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
