"""`salora <command>`: one console script; each command lives in its own module with
`add_parser(subparsers)` registering its arguments and a `run(args)` default."""

from __future__ import annotations

import argparse
import sys

from salora.errors import SaLoRAError
from salora_cli import align, calibrate, compare, db, evaluate, export, serve, train

COMMANDS = (calibrate, train, export, evaluate, compare, align, serve, db)
LOCAL_EXTRA = {"torch", "transformers", "peft", "accelerate", "safetensors", "gguf", "matplotlib"}  # the `local` extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salora", description="Safety-preserving LoRA: train, export, evaluate and serve adapters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SaLoRAError as e:
        print(f"salora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in LOCAL_EXTRA:
            raise
        print(f"salora {args.command}: error: needs {e.name}, which the plain install leaves out: "
              "pip install 'salora-gateway[local]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"salora {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
