"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its status
codes, so the official clients raise their usual exception classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from gateway.ratelimit import Limited


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error's body (the OpenAPI schema of every 4xx and 5xx answer)."""

    error: ErrorDetail


STATUS_DESCRIPTIONS = {
    400: "Invalid request", 401: "Missing or wrong key (or the admin API is off)", 404: "Not found, or not yours",
    409: "Conflicts with the current state", 413: "Body too large", 429: "Over a limit (see Retry-After)",
    422: "The adapter's config is not plain, servable LoRA (`param` names the field)", 503: "Not ready, or the engine failed",
    507: "The gateway cannot store the upload (its disk is full)",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: the error statuses it can answer with, for /openapi.json (gateway/openapi.py
    adds 400, 401 and 413 where they follow from the route's body and key check)."""
    return {status: {"model": ErrorResponse, "description": STATUS_DESCRIPTIONS[status]} for status in statuses}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def server_error() -> APIError:
    """What a bug is answered with (the OpenAI shape, not Starlette's plain text)."""
    return APIError(500, "The server had an error while processing your request.", type="server_error",
                    code="internal_error")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def invalid_api_key() -> APIError:
    return APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")


def rate_limited(limited: Limited) -> APIError:
    kind = limited.kind
    if limited.unavailable:
        return APIError(503, "The gateway cannot check its rate limits right now; retry shortly.",
                        type="server_error", code="limits_unavailable", headers={"Retry-After": str(limited.retry_after)})
    if limited.too_large:
        message = (f"Request too large for {kind} per minute: limit {limited.limit}, requested {limited.requested} "
                   "(the prompt's upper bound plus max_tokens). Lower max_tokens or shorten the prompt.")
        return APIError(429, message, type=kind, code="rate_limit_exceeded")
    return APIError(429, f"Rate limit reached for {kind} per minute. Try again in {limited.retry_after}s.", type=kind,
                    code="rate_limit_exceeded", headers={"Retry-After": str(limited.retry_after)})


def too_many_streams(limit: int) -> APIError:
    return APIError(429, f"This key already has {limit} streamed answers open; finish one first.", type="streams",
                    code="concurrent_streams_exceeded", headers={"Retry-After": "1"})


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="engine_unavailable")


def invalid_body(errors: Sequence[Any]) -> APIError:
    """A 400 naming the first problem pydantic found in a request body."""
    err = errors[0]
    loc = [str(p) for p in err["loc"] if p != "body"]
    if err["type"] == "extra_forbidden":  # OpenAI's words for an argument it does not have
        return bad_request(f"Unrecognized request argument supplied: {'.'.join(loc)}", param=loc[0],
                           code="unsupported_parameter")
    if err["type"] == "unsupported":
        return bad_request(err["msg"], param=err["ctx"]["field"], code="unsupported_parameter")
    return bad_request(err["msg"] + (f" (at {'.'.join(loc)})" if loc else ""), param=loc[0] if loc else None)


def _allowed_methods(request: Request) -> str:
    """Every method some route answers on the request's path."""
    path = request.scope["path"]
    return ", ".join(sorted({method for route in iter_route_contexts(request.app.routes)
                             if (regex := getattr(route, "path_regex", None)) and regex.match(path)
                             for method in route.methods or ()}))


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return invalid_body(exc.errors()).response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        headers = exc.headers
        if exc.status_code == 405:  # Starlette names only the first route's methods; a path may have several
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return APIError(exc.status_code, str(exc.detail), code=None, headers=headers).response()

    async def on_bug(_: Request, exc: Exception) -> JSONResponse:
        """A bug, answered in the same shape as every other error (Starlette's own answer is plain text
        the OpenAI clients cannot read); Starlette then re-raises it, so the server logs the traceback."""
        return server_error().response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, on_bug)
