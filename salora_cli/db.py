"""`salora db upgrade` / `salora db current`: the gateway database's schema migrations, by hand (a
gateway also runs them at start, under a lock, so this is for operators who upgrade ahead of a roll-out)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "db", help="migrate the gateway's database",
        description="Bring the gateway's database (db_url: SQLite or PostgreSQL) to the newest schema, or show its "
        "revision. Settings as for `salora serve` (--config, then SALORA_* variables, e.g. SALORA_DB_URL).")
    p.add_argument("action", choices=("upgrade", "current"))
    p.add_argument("--config", type=Path, help="YAML settings file (default: $SALORA_CONFIG)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.db import connect, upgrade
    from gateway.migrations import current, head
    from gateway.settings import load_settings
    from salora.errors import SaLoRAError

    url = load_settings(args.config).database_url
    engine = connect(url)
    try:
        if args.action == "upgrade":
            print(f"database at revision {upgrade(engine)} (newest: {head()})")
        else:
            with engine.connect() as connection:
                print(f"database at revision {current(connection) or 'none'} (newest: {head()})")
    except SQLAlchemyError as e:
        raise SaLoRAError(f"database {engine.url.render_as_string(hide_password=True)}: "
                          f"{' '.join(str(e.orig or e).split())[:300]}") from e
    finally:
        engine.dispose()
