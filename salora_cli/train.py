"""`salora train`: fine-tune a SaLoRA adapter, or a plain LoRA baseline."""

import argparse

from salora_cli.calibrate import csv_list


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune an adapter (SaLoRA or plain LoRA) on chat data")
    p.add_argument("--model", required=True, help="model directory or `embedded`")
    p.add_argument("--data", required=True, help="JSONL of chat `messages`; loss on assistant turns only")
    p.add_argument("--safety", help="safety directory from `salora calibrate` (needed for --method salora)")
    p.add_argument("--out", required=True, help="new checkpoint directory")
    p.add_argument("--method", choices=["salora", "lora"], default="salora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank, so scale 1)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-modules", type=csv_list, default=None,
                   help="default: the safety basis's modules (all seven linear projections for --method lora without --safety)")
    p.add_argument("--init", choices=["task", "task-scaled", "zero"], default="zero",
                   help="SaLoRA start: standard LoRA, zero B (default), task-aware (the paper's), or task-aware at LoRA's magnitude")
    p.add_argument("--preset", choices=["paper"], default=None,
                   help="paper: task-aware init, d_s 32, alpha = rank, output projection, the basis's modules (calibrate with --preset paper)")
    p.add_argument("--projection", choices=["output", "input", "both", "none"], default="input",
                   help="input (default): the input-side guard (needs the basis's --input-energy); output: the paper's C on every update; "
                        "both; none: ablation")
    p.add_argument("--task-rank", type=int, default=32, help="d_s, task directions for the task-aware init")
    p.add_argument("--max-length", type=int, default=512, help="tokens per conversation")
    p.add_argument("--save-every", type=int, default=None, help="also keep checkpoints/step-N every N steps")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from salora.train import TrainOptions, train

    if args.preset == "paper":
        args.init, args.task_rank, args.alpha, args.projection = "task", 32, None, "output"

    summary = train(
        TrainOptions(
            model=args.model, data=args.data, out=args.out, safety=args.safety, method=args.method, rank=args.rank,
            alpha=args.alpha, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
            seed=args.seed, target_modules=args.target_modules, init=args.init, projection=args.projection, task_rank=args.task_rank,
            max_length=args.max_length, save_every=args.save_every,
        )
    )
    print(f"{summary['method']}: {summary['steps']} steps in {summary['train_seconds']:.1f}s, final loss {summary['final_loss']:.4f} -> {args.out}")
