"""Server-sent events framing in OpenAI's streaming format."""
from __future__ import annotations

import json
from typing import AsyncIterator

import anyio

from pydantic import BaseModel
from starlette.responses import StreamingResponse

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # stop proxies from buffering the stream


def event(payload: BaseModel | dict) -> bytes:
    """Returns one ``data: {...}`` event for a chunk model (which decides what its None fields send) or dict."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


def error_event(body: dict) -> bytes:
    """Returns the event carrying an OpenAI error body mid-stream (the HTTP status is already sent)."""
    return event(body)


class EventStream(StreamingResponse):
    """An SSE response that notices a client disconnect at once, even while no token is being sent.

    Starlette only notices a gone client on the next write under ASGI 2.4; a request waiting in the
    engine queue writes nothing, so we always listen for ``http.disconnect`` and then close the body
    iterator, which closes the engine stream and aborts the request.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        super().__init__(content, headers={**HEADERS, **(headers or {})})

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-write
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
