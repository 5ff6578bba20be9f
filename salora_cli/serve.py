"""`salora serve`: the OpenAI-compatible gateway (written by the gateway work; placeholder shape)."""

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible gateway")
    p.add_argument("--config", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from gateway.server import serve  # noqa: F401  (provided by the gateway package)

    serve(args.config, args.host, args.port)
