"""Test-only crash points. With SALORA_CRASH_AT=<point> in its environment the gateway kills itself
(SIGKILL: no cleanup runs, as with an OOM kill or a lost node) when it reaches that point, so the
durability tests (tests/reliability/test_durability.py) can cut a multi-step change at an exact step
and check what a restart makes of it. Unset, a crash point is one environment lookup."""

from __future__ import annotations

import os
import signal

ENV = "SALORA_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
