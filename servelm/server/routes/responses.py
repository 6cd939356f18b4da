"""POST /v1/responses: OpenAI's Responses API, answered by the chat route (see server/responses.py)."""
from __future__ import annotations

import json
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import StreamingResponse

from servelm.server import sse
from servelm.server.auth import Principal, require
from servelm.server.context import get_context
from servelm.server.errors import APIError
from servelm.server.responses import ResponsesRequest, chat_body, response_object
from servelm.server.responses_stream import stream_events
from servelm.server.routes.chat import create_chat_completion
from servelm.server.schemas import ChatCompletionRequest

router = APIRouter(tags=["openai"])

_SKIP_HEADERS = {"content-type", "content-length"}
# chat request fields -> the Responses fields they came from
_FIELDS = {"max_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}


def _renamed(e: APIError) -> APIError:
    head = (e.param or "").split(".")[0]
    if head in _FIELDS:
        e.param = _FIELDS[head]
        e.message = e.message.replace("max_tokens", "max_output_tokens")
    return e


@router.post("/v1/responses", summary="Create a model response (OpenAI Responses API; nothing is stored)")
async def create_response(body: ResponsesRequest, request: Request, response: Response,
                          principal: Principal = Depends(require("chat"))):
    """Returns a Response object, or with ``stream: true`` Responses stream events (server-sent)."""
    try:
        chat = ChatCompletionRequest.model_validate(chat_body(body))
    except ValidationError as e:  # a value the chat request refuses: the same 400 as on /v1/chat/completions
        raise RequestValidationError(e.errors()) from None
    try:
        result = await create_chat_completion(chat, request, response, principal)
    except APIError as e:  # name the Responses field, not the chat one it was translated to
        raise _renamed(e) from None
    if isinstance(result, StreamingResponse):  # stream=true: the chat stream (or a held / fallback answer as one)
        headers = {k: v for k, v in result.headers.items() if k not in _SKIP_HEADERS}
        return sse.EventStream(_events(body, get_context(request).model_name, result), headers=headers)
    if isinstance(result, Response):  # a JSON answer the engine did not write (held for review, a fallback)
        response.headers.update({k: v for k, v in result.headers.items() if k not in _SKIP_HEADERS})
        chat_json = json.loads(result.body)
    else:
        chat_json = result.model_dump(mode="json")
    return response_object(body, chat_json)


async def _events(body: ResponsesRequest, model: str, chat_stream: StreamingResponse):
    async with aclosing(chat_stream.body_iterator) as chunks:  # closing ours aborts the engine request
        async for event in stream_events(body, model, chunks):
            yield event
