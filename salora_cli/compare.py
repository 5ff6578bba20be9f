"""`salora compare`: a PNG bar chart of several `salora eval` results."""

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="plot refusal rates of several `salora eval` results")
    p.add_argument("results", nargs="+", help="JSON files written by `salora eval`")
    p.add_argument("--out", required=True, help="PNG file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from salora.plot import plot_refusal_rates

    for label, rate, n in plot_refusal_rates(args.results, args.out):
        print(f"{label:30s} {100 * rate:6.1f}%  (n={n})")
    print(f"-> {args.out}")
