"""One line per chat request (`request_log: text` or `json`): when, which request, who, what model,
how it ended, how many tokens, how long. Off by default: on this 2-core machine a formatted line
costs a measurable share of the gateway's CPU per request (docs/performance.md)."""

from __future__ import annotations

import logging

from gateway.compact_json import dumps, string

log = logging.getLogger("gateway.requests")


def log_request(style: str, request_id: str, tenant: str, model: str, status: str, prompt_tokens: int,
                completion_tokens: int, latency_s: float, user: str | None) -> None:
    """Write the request's line; the logging formatter adds the timestamp."""
    fields = {"request_id": request_id, "tenant": tenant, "model": model, "status": status,
              "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
              "latency_ms": round(latency_s * 1000, 1), "user": user}
    if style == "json":
        log.info("%s", dumps(fields))
    else:
        log.info("%s", " ".join(f"{k}={string(v) if isinstance(v, str) else v}"
                                for k, v in fields.items() if v is not None))
