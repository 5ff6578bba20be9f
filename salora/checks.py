"""Checks of numeric options, made before any work so a degenerate value (`--max-steps 0`, a
negative or non-finite lr, rank 0, batch 0) ends in a one-line error and leaves nothing behind."""

from __future__ import annotations

import math

from salora.errors import SaLoRAError


def _number(flag: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SaLoRAError(f"{flag} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise SaLoRAError(f"{flag} must be finite, not {value}")
    return value


def at_least(flag: str, value: int | None, minimum: int = 1) -> None:
    """An integer option (None = not given) of at least `minimum`."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise SaLoRAError(f"{flag} must be an integer, not {value!r}")
    if value < minimum:
        raise SaLoRAError(f"{flag} must be at least {minimum}, not {value}")


def positive(flag: str, value: float | None) -> None:
    """A finite number above 0 (None = not given)."""
    if value is not None and _number(flag, value) <= 0:
        raise SaLoRAError(f"{flag} must be positive, not {value}")


def fraction(flag: str, value: float | None) -> None:
    """A share in (0, 1] (None = not given)."""
    if value is not None and not 0 < _number(flag, value) <= 1:
        raise SaLoRAError(f"{flag} must be in (0, 1], not {value}")


def share(flag: str, value: float | None) -> None:
    """A share in [0, 1] (None = not given), 0 included: a threshold that tolerates nothing."""
    if value is not None and not 0 <= _number(flag, value) <= 1:
        raise SaLoRAError(f"{flag} must be in [0, 1], not {value}")
