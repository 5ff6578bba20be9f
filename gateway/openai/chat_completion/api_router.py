from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from gateway.context import Context, context
from gateway.openai.chat_completion.serving import ChatServing

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request, ctx: Context = Depends(context)) -> Response:
    """OpenAI's chat completion. The body is read and checked by the handler itself (not by FastAPI)
    so that size limits, errors and metrics are handled in one place."""
    return await ChatServing(ctx).create(request)
