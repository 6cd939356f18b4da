"""OpenAI's Responses API as a translation of chat completions (vLLM serves ``/v1/responses`` too).

A request becomes a ``ChatCompletionRequest`` (``input`` items -> messages, ``instructions`` -> the system
message, ``text.format`` -> ``response_format``, flat function tools -> chat tools), so the chat route's
pipeline (guardrails, prompt strategies, constrained decoding, tool parsing, limits) answers it; the chat
answer, or its stream of chunks, is then written back as a Response object or Responses stream events.
Nothing is stored: ``previous_response_id`` is refused, and the conversation travels in ``input``.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import Field

from servelm.server.errors import invalid
from servelm.server.schemas import Bool, Float, Int, _Request

# sampling fields a client may add through extra_body, passed to the chat request as they are
_PASSED = ("seed", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop",
           "ignore_eos", "min_tokens", "logit_bias", "user")
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class ResponsesRequest(_Request):
    model: str | None = Field(None, description="Model id from /v1/models; default: the served model.")
    input: str | list[dict] = Field(..., description="A text, or message / function_call / "
                                    "function_call_output items.")
    instructions: str | None = Field(None, description="The system message.")
    max_output_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0.0, le=2.0)
    top_p: Float | None = Field(None, ge=0.0, le=1.0)
    stream: Bool = False
    tools: list[dict] | None = Field(None, max_length=128, description="Function tools (flat form).")
    tool_choice: str | dict | None = None
    parallel_tool_calls: Bool | None = None
    text: dict | None = Field(None, description='{"format": {"type": "text" | "json_object" | "json_schema", ...}}')
    previous_response_id: str | None = None
    store: Bool | None = None
    background: Bool | None = None
    metadata: dict[str, str] | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    model_config = {**_Request.model_config, "extra": "allow"}  # extra_body sampling fields (see _PASSED)


def chat_body(r: ResponsesRequest) -> dict:
    """The chat completions request answering ``r``; raises APIError(400) naming what cannot be served."""
    if r.previous_response_id:
        raise invalid("previous_response_id is not supported: this server stores no responses; send the whole "
                      "conversation in input.", "previous_response_id", "unsupported_parameter")
    if r.background:
        raise invalid("background responses are not supported.", "background", "unsupported_parameter")
    if r.top_logprobs:
        raise invalid("top_logprobs is not supported on /v1/responses; use /v1/chat/completions.", "top_logprobs",
                      "unsupported_parameter")
    messages = [{"role": "system", "content": r.instructions}] if r.instructions else []
    items = [{"role": "user", "content": r.input}] if isinstance(r.input, str) else r.input
    if not items:
        raise invalid("input must not be empty.", "input")
    for i, item in enumerate(items):
        _add_item(messages, item, f"input[{i}]")
    body: dict[str, Any] = {"model": r.model, "messages": messages, "stream": r.stream,
                            "max_tokens": r.max_output_tokens}
    if r.stream:
        body["stream_options"] = {"include_usage": True}
    for name in ("temperature", "top_p"):
        if getattr(r, name) is not None:
            body[name] = getattr(r, name)
    extra = r.model_extra or {}
    body |= {k: extra[k] for k in _PASSED if k in extra}
    if r.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = r.parallel_tool_calls
    if r.tools:
        body["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(r.tools)]
    if r.tool_choice is not None:
        body["tool_choice"] = _tool_choice(r.tool_choice)
    fmt = (r.text or {}).get("format")
    if fmt and fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt and fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise invalid("text.format.schema must be a JSON schema object.", "text.format.schema")
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "response"), "schema": fmt["schema"], "strict": fmt.get("strict")}}
    elif fmt and fmt.get("type") != "text":
        raise invalid("text.format.type must be text, json_object or json_schema.", "text.format.type")
    return body


def _add_item(messages: list[dict], item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise invalid(f"{where} must be an object.", where, "invalid_type")
    kind = item.get("type", "message")
    if kind == "message" and "role" in item:
        role = item["role"]
        if role not in ("user", "assistant", "system", "developer"):
            raise invalid(f"{where}.role must be user, assistant, system or developer.", f"{where}.role")
        messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
    elif kind == "function_call":
        call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
            last["tool_calls"].append(call)  # parallel calls of one turn
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": _text(item.get("output"), f"{where}.output")})
    elif kind == "reasoning":
        return  # an earlier turn's reasoning summary: this model writes none to continue from
    else:
        raise invalid(f"{where} has type {kind!r}; this server takes message, function_call and "
                      "function_call_output items (nothing is stored to reference).", f"{where}.type")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts.", where, "invalid_type")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise invalid(f"{where}[{j}] is a {kind!r} part; this model reads text parts only.", f"{where}[{j}]")
        texts.append(part.get("text") or part.get("refusal") or "")
    return "".join(texts)


def _tool(t: dict, where: str) -> dict:
    if t.get("type") != "function" or not t.get("name"):
        raise invalid(f"{where}: only function tools (with a name) are served, not {t.get('type')!r}.", where)
    fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
    return {"type": "function", "function": fn}


def _tool_choice(choice: str | dict) -> str | dict:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise invalid("tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ...}.", "tool_choice")


# ---------------------------------------------------------------- the answer, as a Response object
def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def status_of(finish_reason: str | None) -> tuple[str, dict | None]:
    """A chat finish reason as a Response ``status`` and ``incomplete_details``."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def usage_of(chat_usage: dict | None) -> dict | None:
    if not chat_usage:
        return None
    return {"input_tokens": chat_usage.get("prompt_tokens", 0), "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": chat_usage.get("completion_tokens", 0),
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": chat_usage.get("total_tokens", 0)}


def message_item(item_id: str, text: str | None, status: str = "completed") -> dict:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(call: dict, status: str = "completed", arguments: str | None = None) -> dict:
    fn = call.get("function") or {}
    return {"type": "function_call", "id": new_id("fc"), "call_id": call.get("id") or new_id("call"),
            "name": fn.get("name"), "status": status,
            "arguments": fn.get("arguments", "") if arguments is None else arguments}


def envelope(r: ResponsesRequest, rid: str, created: int, model: str, status: str, output: list[dict],
             usage: dict | None = None, incomplete: dict | None = None, extra: dict | None = None) -> dict:
    """A Response object: what was asked echoed back, as OpenAI does, around ``output``."""
    out = {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
           "output": output, "error": None, "incomplete_details": incomplete, "instructions": r.instructions,
           "max_output_tokens": r.max_output_tokens, "metadata": r.metadata or {},
           "parallel_tool_calls": True if r.parallel_tool_calls is None else r.parallel_tool_calls,
           "previous_response_id": None, "reasoning": None, "store": False,
           "temperature": 1.0 if r.temperature is None else r.temperature,
           "top_p": 1.0 if r.top_p is None else r.top_p, "text": r.text or {"format": {"type": "text"}},
           "tool_choice": r.tool_choice or "auto", "tools": r.tools or [], "truncation": "disabled",
           "usage": usage, "user": (r.model_extra or {}).get("user")}
    return out | {k: v for k, v in (extra or {}).items() if v is not None}


def response_object(r: ResponsesRequest, chat: dict) -> dict:
    """The Response answering ``r`` from the chat completion ``chat`` (its first choice)."""
    choice = chat["choices"][0]
    msg = choice.get("message") or {}
    calls = msg.get("tool_calls") or []
    output = [call_item(c) for c in calls]
    if msg.get("content") or not calls:
        output.insert(0, message_item(new_id("msg"), msg.get("content") or ""))
    status, incomplete = status_of(choice.get("finish_reason"))
    extra = {"servelm": chat.get("servelm") or choice.get("servelm"), "sources": chat.get("sources")}
    return envelope(r, new_id("resp"), int(time.time()), chat.get("model"), status, output,
                    usage_of(chat.get("usage")), incomplete, extra)
