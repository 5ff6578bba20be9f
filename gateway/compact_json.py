"""Compact JSON for the hot path: byte for byte `json.dumps(obj, ensure_ascii=False, separators=(",",
":"))`, without what that call costs per use. `json.dumps` with any argument builds a new
`JSONEncoder` on every call (a fifth of its time for a short string); the hot path serialises three to
five values per request (docs/performance.md)."""

from __future__ import annotations

from json.encoder import JSONEncoder, encode_basestring  # type: ignore[attr-defined]

dumps = JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def string(text: str | None) -> str:
    """A string (or None) as `dumps` writes it, straight through the encoder's C string function."""
    return "null" if text is None else encode_basestring(text)
