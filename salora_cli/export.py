"""`salora export`: a standard PEFT adapter for the unmodified base, or a merged model."""

import argparse

from salora_cli.calibrate import add_device_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint as a PEFT adapter (rank 2r, projection folded in) or a merged model")
    p.add_argument("--checkpoint", required=True, help="directory written by `salora train`")
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--format", choices=["peft", "merged"], default="peft")
    p.add_argument("--model", default=None, help="base model for --format merged (default: the one recorded at training)")
    add_device_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from salora.export import export

    record = export(args.checkpoint, args.out, args.format, args.model, args.device, args.dtype)
    detail = f" rank {record['rank']}" if "rank" in record else ""
    print(f"{record['method']} checkpoint exported as {record['format']}{detail} -> {args.out}")
