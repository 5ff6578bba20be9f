"""/openapi.json: FastAPI's schema of its own routes, completed with what it cannot see.

- `POST /v1/chat/completions` is a raw ASGI route on the hot path (chat_completion/api_router.py),
  invisible to FastAPI. Its operation is built here from the same pydantic models that parse its
  requests and describe its answers, and merged in once; the hot path is unchanged.
- Errors: every route answers in OpenAI's error body (gateway/errors.py), a validation failure as a
  400, never FastAPI's 422. Each operation lists the statuses it can answer with: its own (declared
  on its route with `gateway.errors.documented(...)`), 401 where it needs a key, 400 and 413 where it takes a body.
- Authentication: the bearer key, on every operation whose route depends on a key check.
A client generator or a fuzzer (tests/reliability/test_fuzz_api.py) can then rely on the schema."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.auth import require_admin, require_metrics_reader, require_tenant
from gateway.errors import STATUS_DESCRIPTIONS, ErrorResponse
from gateway.openai.chat_completion.api_router import COMPLETIONS_PATH
from gateway.openai.chat_completion.api_router import PATH as CHAT_PATH
from gateway.openai.chat_completion.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from gateway.openai.completion.protocol import Completion, CompletionRequest

REF = "#/components/schemas/{model}"
SECURITY = "bearer"
def _error_responses(statuses: list[int]) -> dict[str, Any]:
    schema = {"$ref": REF.format(model="ErrorResponse")}
    return {str(s): {"description": STATUS_DESCRIPTIONS[s], "content": {"application/json": {"schema": schema}}}
            for s in statuses}


def _event_schema(chunk: dict[str, str]) -> dict[str, Any]:
    """One server-sent event of a streamed answer (OpenAPI 3.1: `schema` describes each event): a chunk,
    an error (the engine failed mid-stream), or the closing `[DONE]`."""
    error = {"$ref": REF.format(model="ErrorResponse")}
    payload = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [chunk, error]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}}}


def _generation_operation(request: type[BaseModel], answer: type[BaseModel], chunk: type[BaseModel], summary: str,
                          operation_id: str) -> dict[str, Any]:
    ref = {model: {"$ref": REF.format(model=model.__name__)} for model in (request, answer, chunk)}
    return {
        "summary": summary,
        "description": "`model` is the base model's id or an adapter the key may call. With `stream` the answer "
                       f"is server-sent events, each `data:` a {chunk.__name__}, ending with `data: [DONE]`.",
        "operationId": operation_id,
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref[request]}}},
        "responses": {
            "200": {"description": "The answer", "content": {
                "application/json": {"schema": ref[answer]},
                "text/event-stream": {"schema": _event_schema(ref[chunk])},
            }},
            **_error_responses([400, 401, 404, 413, 429, 503]),
        },
        "security": [{SECURITY: []}],
    }


def _add_schemas(schema: dict[str, Any], models: list[tuple[type[BaseModel], str]]) -> None:
    _, top = models_json_schema([(m, mode) for m, mode in models], ref_template=REF)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in top.get("$defs", {}).items():
        if components.setdefault(name, definition) != definition:
            raise RuntimeError(f"two different OpenAPI schemas are named {name}")


def _authenticated(dependant: Dependant) -> bool:
    """Whether the route (or a dependency of it, at any depth) checks a key."""
    return dependant.call in (require_admin, require_tenant, require_metrics_reader) or any(map(_authenticated, dependant.dependencies))


def _complete_operations(app: FastAPI, schema: dict[str, Any]) -> None:
    """422 becomes 400; 401 and the bearer scheme on authenticated routes; 400 and 413 with a body."""
    operations = {(method.upper(), path): op for path, item in schema["paths"].items() for method, op in item.items()}
    for route in iter_route_contexts(app.routes):
        dependant = getattr(route, "dependant", None)
        for method in route.methods or ():
            op = operations.get((method, route.path_format))
            if op is None or dependant is None:
                continue
            responses = op["responses"]
            statuses = [400] if responses.pop("422", None) else []
            if _authenticated(dependant):
                op["security"] = [{SECURITY: []}]
                statuses.append(401)
            if "requestBody" in op:
                statuses += [400, 413]
            responses.update({k: v for k, v in _error_responses(sorted(set(statuses))).items() if k not in responses})
    schemas = schema["components"]["schemas"]
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _add_schemas(schema, [(ErrorResponse, "serialization"), (ChatCompletionRequest, "validation"),
                          (ChatCompletion, "serialization"), (ChatCompletionChunk, "serialization"),
                          (CompletionRequest, "validation"), (Completion, "serialization")])
    _complete_operations(app, schema)
    chat = _generation_operation(ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, "Create a chat completion",
                                 "create_chat_completion")
    legacy = _generation_operation(CompletionRequest, Completion, Completion, "Create a completion (legacy prompt API)",
                                   "create_completion")
    schema["paths"] = {CHAT_PATH: {"post": chat}, COMPLETIONS_PATH: {"post": legacy}, **schema["paths"]}
    schema["components"]["securitySchemes"] = {SECURITY: {"type": "http", "scheme": "bearer"}}
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi(app)` at /openapi.json, built on first use."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
