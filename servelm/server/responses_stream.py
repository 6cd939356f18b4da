"""Responses stream events written from a chat completion's SSE chunks (see server/responses.py)."""
from __future__ import annotations

import json
import time
from typing import AsyncIterator

from servelm.server.responses import (ResponsesRequest, call_item, envelope, message_item, new_id, status_of,
                                      usage_of)


def chat_chunks_as_json(raw: bytes) -> list[dict | None]:
    """The JSON payloads of the SSE events in ``raw`` (None for ``[DONE]``)."""
    out = []
    for event in raw.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data: "):
                data = line[6:].strip()
                out.append(None if data == b"[DONE]" else json.loads(data))
    return out


async def stream_events(r: ResponsesRequest, model: str, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Responses stream events (created, output items and parts with their deltas, then completed or
    incomplete) from a chat completion's SSE ``chunks``."""
    rid, created, seq = new_id("resp"), int(time.time()), iter(range(1 << 62))

    def ev(kind: str, **fields) -> bytes:
        data = json.dumps({"type": kind, "sequence_number": next(seq), **fields}, separators=(",", ":"))
        return f"event: {kind}\ndata: {data}\n\n".encode()

    output: list[dict] = []
    msg = None  # index of the open message item
    calls: dict[int, int] = {}  # the chat stream's tool-call index -> its item's index in output
    usage = reason = note = sources = None
    head = envelope(r, rid, created, model, "in_progress", [])
    yield ev("response.created", response=head)
    yield ev("response.in_progress", response=head)

    def open_message():  # appends the message item at output[msg] with its empty text part
        item = message_item(new_id("msg"), None, "in_progress")
        output.append(item)
        added = ev("response.output_item.added", output_index=msg, item=item)  # sent with no parts yet
        item["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        return [added, ev("response.content_part.added", item_id=item["id"], output_index=msg, content_index=0,
                          part=item["content"][0])]

    def close_message():
        item = output[msg]
        part = item["content"][0]
        ids = {"item_id": item["id"], "output_index": msg, "content_index": 0}
        item["status"] = "completed"
        return [ev("response.output_text.done", **ids, text=part["text"], logprobs=[]),
                ev("response.content_part.done", **ids, part=part),
                ev("response.output_item.done", output_index=msg, item=item)]

    buffer = b""
    async for raw in chunks:
        buffer += raw
        complete, _, buffer = buffer.rpartition(b"\n\n")
        for data in chat_chunks_as_json(complete):
            if data is None:
                continue
            if "error" in data:  # the chat stream failed after the headers went out
                e = data["error"]
                yield ev("error", code=e.get("code"), message=e.get("message"), param=e.get("param"))
                return
            usage = usage_of(data.get("usage")) or usage
            note, sources = data.get("servelm") or note, data.get("sources") or sources
            for choice in data.get("choices") or []:
                delta = choice.get("delta") or {}
                note = choice.get("servelm") or note
                if delta.get("content"):
                    if msg is None:
                        msg = len(output)
                        for e in open_message():
                            yield e
                    output[msg]["content"][0]["text"] += delta["content"]
                    yield ev("response.output_text.delta", item_id=output[msg]["id"], output_index=msg,
                             content_index=0, delta=delta["content"], logprobs=[])
                # a call's first delta names it, later ones (same index) add to its arguments
                for call in delta.get("tool_calls") or []:
                    if msg is not None:
                        for e in close_message():
                            yield e
                        msg = None
                    k = call.get("index", 0)
                    if k not in calls:
                        calls[k] = len(output)
                        output.append(call_item(call, "in_progress", ""))
                        yield ev("response.output_item.added", output_index=calls[k], item=output[calls[k]])
                    item, args = output[calls[k]], (call.get("function") or {}).get("arguments") or ""
                    if args:
                        item["arguments"] += args
                        yield ev("response.function_call_arguments.delta", item_id=item["id"],
                                 output_index=calls[k], delta=args)
                reason = choice.get("finish_reason") or reason
    for i in calls.values():
        item = output[i]
        item["status"] = "completed"
        yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                 arguments=item["arguments"])
        yield ev("response.output_item.done", output_index=i, item=item)
    if msg is None and not output:  # nothing was written (or a guard withheld it all): an empty message
        msg = 0
        for e in open_message():
            yield e
    if msg is not None:
        for e in close_message():
            yield e
    status, incomplete = status_of(reason)
    final = envelope(r, rid, created, model, status, output, usage, incomplete, {"servelm": note, "sources": sources})
    yield ev("response.completed" if status == "completed" else "response.incomplete", response=final)
