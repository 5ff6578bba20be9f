"""`salora serve`: the OpenAI-compatible gateway. With no config it serves the embedded model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the OpenAI-compatible gateway",
        description="Serve the base model and its LoRA adapters over an OpenAI-compatible API. Settings come from "
        "--config (YAML), then SALORA_* environment variables (e.g. SALORA_ADMIN_KEY), then these flags, each "
        "overriding the one before. See docs/gateway.md.",
    )
    p.add_argument("--config", type=Path, help="YAML settings file (default: $SALORA_CONFIG, else built-in defaults)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default 8000)")
    p.add_argument("--allow-open", action="store_true", default=None,
                   help="allow serving without any key (no admin key, no tenants) on a non-loopback host")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from gateway.engines.routing import missing_local_extra
    from gateway.server import serve  # imported here so `salora --help` stays fast
    from gateway.settings import load_settings
    from salora.errors import SaLoRAError

    flags = {k: v for k, v in (("host", args.host), ("port", args.port), ("allow_open", args.allow_open))
             if v is not None}
    settings = load_settings(args.config, **flags)
    missing = missing_local_extra(settings)
    if missing:
        raise SaLoRAError(missing)
    serve(settings)
