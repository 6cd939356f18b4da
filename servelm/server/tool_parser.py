"""``tool_choice: "auto"``: tool calls read back out of a free answer, as vLLM's tool parsers do.

Models write calls in a few formats; they differ in their first characters, so one parser reads them all
and no per-model flag is needed:
- Hermes / Qwen2.5 / SmolLM (and what ``prompts/tools.py`` asks a template without tools for):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call, text around them kept
  as ``content``; a last block cut before its closing tag still counts when its JSON is complete;
- Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``;
- Llama 3.1/3.2 JSON calls (``<|python_tag|>`` is a special token, gone from the text): the whole answer is
  ``{"name": ..., "parameters": {...}}`` or a list of them.
A call counts only when its JSON parses and it names one of the request's tools; otherwise the answer is
plain text, as it would be without tools. Arguments are returned as a JSON string (OpenAI's form).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from servelm.engine.detokenizer import stop_string_holdback
from servelm.prompts.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

MISTRAL = "[TOOL_CALLS]"
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.S)


@dataclass(slots=True)
class ToolCallParser:
    """The request's tool names; ``legacy`` (functions/function_call) answers with ``function_call``;
    ``single`` (``parallel_tool_calls: false``) keeps the first call only."""

    names: frozenset[str]
    legacy: bool = False
    single: bool = False

    def parse(self, text: str) -> tuple[str | None, list[dict] | None]:
        """Returns (content, calls): calls None when ``text`` holds none (content is then ``text``)."""
        content, calls = self._parse(text)
        if calls and (self.single or self.legacy):
            calls = calls[:1]
        return content, calls

    def _parse(self, text: str) -> tuple[str | None, list[dict] | None]:
        if TOOL_CALL_OPEN in text:
            calls, rest, end = [], [], 0
            for m in _BLOCK.finditer(text):
                found = self._calls(m.group(1))
                if found is None:
                    return text, None
                calls += found
                rest.append(text[end:m.start()])
                end = m.end()
            content = ("".join(rest) + text[end:]).strip()
            return content or None, calls
        body = text.strip()
        if body.startswith(MISTRAL):
            body = body[len(MISTRAL):].strip()
        if body[:1] in ("{", "["):
            found = self._calls(body)
            if found:
                return None, found
        return text, None

    def _calls(self, blob: str) -> list[dict] | None:
        try:
            value = json.loads(blob)
        except ValueError:
            return None
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if not isinstance(item, dict) or item.get("name") not in self.names:
                return None
            args = item.get("arguments", item.get("parameters", {}))
            if isinstance(args, str):
                try:
                    json.loads(args)
                except ValueError:
                    return None
            elif isinstance(args, dict):
                args = json.dumps(args, ensure_ascii=False)
            else:
                return None
            out.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                        "function": {"name": item["name"], "arguments": args}})
        return out or None


def for_request(body, tools: list[dict] | None) -> ToolCallParser | None:
    """The parser when the request gives tools (or legacy functions) and leaves the choice to the model."""
    if not tools:
        return None
    names = frozenset(t["function"]["name"] for t in tools)
    if body.tools:
        single = getattr(body, "parallel_tool_calls", None) is False
        return ToolCallParser(names, single=single) if body.tool_choice in (None, "auto") else None
    return ToolCallParser(names, legacy=True) if body.function_call in (None, "auto") else None


def message_fields(parser: ToolCallParser, calls: list[dict]) -> dict:
    """The message (or delta) fields for parsed calls: ``tool_calls``, or legacy ``function_call``."""
    if parser.legacy:
        return {"function_call": calls[0]["function"]}
    return {"tool_calls": calls}


class AutoToolStream:
    """One streamed choice under ``tool_choice: "auto"``. Text streams as ``content`` until a call may begin:
    from ``<tool_call>`` on (and while the text ends with a prefix of it) it is held; an answer that begins
    with ``{`` or ``[`` is held whole, since only its end shows whether it is a call. Held text is parsed when
    the choice finishes and sent as ``tool_calls`` (each call whole, in one delta, as vLLM's parsers send a
    call they could not stream) or, when it holds no call, as ``content``."""

    def __init__(self, parser: ToolCallParser):
        self.parser = parser
        self.held, self.mode, self.sent = "", "text", False

    def feed(self, delta: str, finished: bool) -> tuple[dict, bool]:
        """Returns (the DeltaMessage fields to send, whether tool calls were sent)."""
        self.held += delta
        out = ""
        if self.mode == "text":
            start = self.held.lstrip()
            if not self.sent and start[:1] in ("{", "["):
                self.mode = "whole"
            elif (i := self.held.find(TOOL_CALL_OPEN)) >= 0:
                out, self.held, self.mode = self.held[:i], self.held[i:], "calls"
            elif not self.sent and not start and not finished:
                return {}, False  # only whitespace so far: it may still open a JSON call
            else:
                keep = 0 if finished else stop_string_holdback(self.held, [TOOL_CALL_OPEN])
                out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        fields, complete = {}, False
        if self.mode != "text" and finished:
            content, calls = self.parser.parse(self.held)
            self.held = ""
            if calls:
                fields, complete = message_fields(self.parser, [{"index": i, **c} for i, c in enumerate(calls)]), True
            out += content or ""
        if out:
            fields["content"] = out
            self.sent = True
        return fields, complete

