"""`salora eval`: refusal rate of a model (optionally with an adapter) on a prompt file."""

import argparse

from salora_cli.calibrate import add_device_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="greedy answers to prompts, refusal rate by the keyword judge")
    p.add_argument("--model", required=True, help="model directory or `embedded`")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory (from `salora export`)")
    p.add_argument("--prompts", required=True, help=".txt (one a line), .jsonl (prompt or messages) or .csv (goal or prompt)")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--label", default=None, help="name of this run in comparisons")
    add_device_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from salora.evaluate import evaluate

    result = evaluate(args.model, args.prompts, args.out, args.adapter, args.max_new_tokens, args.batch_size, label=args.label,
                      device=args.device, dtype=args.dtype)
    print(f"refusal rate {100 * result['refusal_rate']:.1f}% of {result['n']} prompts -> {args.out}")
