"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its status
codes, so the official clients raise their usual exception classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


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


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def invalid_api_key() -> APIError:
    return APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")


def rate_limited(kind: str, retry_after: int) -> APIError:
    return APIError(429, f"Rate limit reached for {kind} per minute. Try again in {retry_after}s.", type=kind,
                    code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="engine_unavailable")


def invalid_body(errors: Sequence[Any]) -> APIError:
    """A 400 naming the first problem pydantic found in a request body."""
    err = errors[0]
    loc = [str(p) for p in err["loc"] if p != "body"]
    return bad_request(err["msg"] + (f" (at {'.'.join(loc)})" if loc else ""), param=loc[0] if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return invalid_body(exc.errors()).response()

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return APIError(exc.status_code, str(exc.detail), code=None).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
