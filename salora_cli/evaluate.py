"""`salora eval`: refusal rate of a model (optionally with an adapter) on a prompt file."""

import argparse

from salora_cli.calibrate import add_device_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="greedy answers to prompts, refusal rate by a judge (keyword by default)")
    p.add_argument("--model", required=True, help="model directory or `embedded`")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory (from `salora export`)")
    p.add_argument("--prompts", required=True, help=".txt (one a line), .jsonl (prompt or messages) or .csv (goal or prompt)")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--label", default=None, help="name of this run in comparisons")
    p.add_argument("--judge", default="keyword",
                   help="`keyword`, or `openai:<base-url>#<model>`: an LLM judge behind an OpenAI-compatible API "
                        "(key from $SALORA_JUDGE_API_KEY); the keyword judge then runs too and their agreement is reported")
    p.add_argument("--judge-style", choices=("classify", "guard"), default=None,
                   help="classify (default): the judge says REFUSAL or ANSWER; guard: a Llama Guard model says safe (counted as refused) or unsafe")
    p.add_argument("--judge-constrain", action="store_true",
                   help="ask the judge's server to decode only the verdict words (vLLM's structured outputs)")
    add_device_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from salora.chat_judge import parse_judge
    from salora.evaluate import evaluate

    judge = parse_judge(args.judge, args.judge_style, args.judge_constrain)
    result = evaluate(args.model, args.prompts, args.out, args.adapter, args.max_new_tokens, args.batch_size, judge=judge,
                      label=args.label, device=args.device, dtype=args.dtype)
    line = f"refusal rate {100 * result['refusal_rate']:.1f}% of {result['n']} prompts ({result['judge']})"
    if "agreement" in result:
        agree, kappa = result["agreement"]["fraction"], result["agreement"]["cohen_kappa"]
        line += (f"; keyword judge {100 * result['judges']['keyword']['refusal_rate']:.1f}%, agreement {100 * agree:.1f}%, "
                 f"Cohen's kappa {'undefined' if kappa is None else f'{kappa:.2f}'}")
    print(f"{line} -> {args.out}")
