"""Structured outputs and forced tool calls over HTTP: request fields → the engine's StructuredOutputParams,
and a forced tool call's constrained text → OpenAI ``tool_calls``.

Accepted: OpenAI's ``response_format`` (``json_object``, ``json_schema``; ``strict`` is accepted, the
schema is always enforced), vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` and its newer ``structured_outputs`` object, and ``tool_choice: "required"`` or a
named function (legacy ``function_call: {"name": ...}`` too). A forced call of one named function
constrains the output to that function's ``parameters`` schema (the text *is* the arguments); "required"
constrains it to a JSON array of ``{"name", "parameters"}`` calls of the given tools, as vLLM does.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

from servelm.engine import InvalidRequestError, StructuredOutputParams
from servelm.server.errors import invalid

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(slots=True)
class ForcedTools:
    """A forced tool call: ``name`` when one named function is forced, else one call of any of ``names``."""

    names: list[str]
    name: str | None
    legacy: bool  # functions/function_call: answer with message.function_call

    def calls(self, text: str) -> list[dict] | None:
        """Returns OpenAI tool calls parsed from the constrained ``text``, or None when it holds no complete
        call (a named call's arguments cut by max_tokens or a stop string). "required" returns the complete
        calls of an array cut after one or more of them, each distinct call once."""
        if self.name is not None:
            try:
                json.loads(text)
            except ValueError:
                return None
            return [_call(self.name, text)]
        # A small model at temperature 0 tends to repeat its call until max_tokens cuts the array: the calls
        # it finished are still its answer. The grammar sets no maxItems (one tool may rightly be called for
        # several cities), so the same call written again is dropped instead: it would only run twice.
        seen, out = set(), []
        for c in _complete_items(text):
            if not isinstance(c, dict) or "name" not in c:
                continue  # not a call the grammar wrote (the output guard rewrote the text)
            key = (c["name"], json.dumps(c.get("parameters"), sort_keys=True))
            if key not in seen:
                seen.add(key)
                out.append(_call(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False)))
        return out or None


def _complete_items(text: str) -> list:
    """Returns the complete elements at the start of the JSON array ``text`` (all of them when it is whole)."""
    decoder, items = json.JSONDecoder(), []
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        return items
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return items
        items.append(item)


def _call(name: str, arguments: str) -> dict:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": arguments}}


def from_request(body, tools: list[dict] | None = None) -> tuple[StructuredOutputParams | None, str | None,
                                                                 ForcedTools | None]:
    """Returns (the engine's structured-output spec or None, the request field it came from, the forced tool
    call or None). Raises APIError(400) naming the field for several constraints at once, a tool_choice
    naming no given tool, or a malformed response_format."""
    found: list[tuple[str, StructuredOutputParams]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", StructuredOutputParams(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, (dict, str)):
            raise invalid("response_format.json_schema.schema is required: the JSON schema the answer must follow.",
                          "response_format.json_schema.schema")
        found.append(("response_format", StructuredOutputParams(json=schema)))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if getattr(body, name, None) is not None:
            found.append((name, StructuredOutputParams(**{key: getattr(body, name)})))
    so = getattr(body, "structured_outputs", None)
    if so:
        kinds = {k: v for k, v in so.items() if k in ("json", "regex", "choice", "grammar", "json_object")}
        found.append(("structured_outputs", StructuredOutputParams(**kinds)))
    forced = _forced_tools(body, tools)
    if forced is not None:
        found.append((forced[0], forced[1]))
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise invalid(f"Only one output constraint per request; this one sets {names}.", found[1][0])
    if not found:
        return None, None, None
    param, spec = found[0]
    try:
        spec.validate()
    except InvalidRequestError as e:
        raise invalid(e.message.replace("structured_output", param, 1), param, "invalid_value") from None
    return spec, param, forced[2] if forced is not None else None


def _forced_tools(body, tools: list[dict] | None):
    """Returns (field, spec, ForcedTools) for a forced tool call, else None."""
    choice, field, legacy = getattr(body, "tool_choice", None), "tool_choice", False
    if choice is None and getattr(body, "function_call", None) is not None:
        choice, field, legacy = body.function_call, "function_call", True
    if choice != "required" and not isinstance(choice, dict):
        return None
    if not tools:
        raise invalid(f"{field} forces a call, but the request gives no {'functions' if legacy else 'tools'}.", field)
    fns = {t["function"]["name"]: t["function"].get("parameters") or _EMPTY_PARAMETERS for t in tools}
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": n}, "parameters": p},
                  "required": ["name", "parameters"]} for n, p in fns.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if getattr(body, "parallel_tool_calls", None) is False:
            schema["maxItems"] = 1
        return field, StructuredOutputParams(json=schema), ForcedTools(list(fns), None, legacy)
    name = (choice.get("function") or {}).get("name") if not legacy else choice.get("name")
    if name not in fns:
        raise invalid(f"{field} names the function {name!r}, which is not among the request's "
                      f"{'functions' if legacy else 'tools'} ({', '.join(fns)}).", field)
    return field, StructuredOutputParams(json=fns[name]), ForcedTools(list(fns), name, legacy)


async def check(engine, spec: StructuredOutputParams | None, param: str | None) -> None:
    """Compiles ``spec`` now (off the event loop; the engine then finds it cached) so that a bad schema,
    regex or grammar is a 400 naming the request field ``param``."""
    if spec is None:
        return
    try:
        await asyncio.to_thread(engine.engine.grammars.compile, spec)
    except InvalidRequestError as e:
        raise invalid(e.message.replace(f"structured_output.{spec.kind}", param, 1), param, "invalid_value") from None


def is_json(spec: StructuredOutputParams | None) -> bool:
    """True when the answer is promised to be JSON (a schema or JSON mode, forced tool calls included)."""
    return spec is not None and spec.kind in ("json", "json_object")


def still_json(raw: str, shown: str) -> bool:
    """True unless the output guard changed a complete JSON answer into text that no longer parses (PII
    redacted where JSON allows no string, e.g. inside a number)."""
    if shown == raw:
        return True
    try:
        json.loads(raw)
    except ValueError:
        return True  # it was not complete JSON before (max_tokens): nothing was promised
    try:
        json.loads(shown)
    except ValueError:
        return False
    return True


class ToolCallStream:
    """One streamed choice of a forced tool call: turns its text deltas into ``tool_calls`` deltas as OpenAI
    sends them (the first names the call, the rest add to ``arguments``). One named function streams its
    arguments as they come; "required" (which call is which shows only in the whole JSON) is sent at the end."""

    def __init__(self, forced: ForcedTools):
        self.forced = forced
        self.text = ""
        self.id = "call_" + uuid.uuid4().hex[:24]
        self.started = False

    def feed(self, delta: str, finished: bool) -> tuple[dict, bool]:
        """Returns (the DeltaMessage fields for ``delta``, whether the call is complete). With ``finished`` and
        no complete call (cut by max_tokens), "required" gives its text back as ``content``."""
        self.text += delta
        f = self.forced
        if f.name is None:  # "required": the array is parsed when it is complete
            if not finished:
                return {}, False
            calls = f.calls(self.text)
            if calls is None:
                return ({"content": self.text} if self.text else {}), False
            return {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}, True
        done = finished and f.calls(self.text) is not None
        if not delta and self.started:
            return {}, done
        first = not self.started
        self.started = True
        if f.legacy:
            return {"function_call": {"name": f.name, "arguments": delta} if first else {"arguments": delta}}, done
        head = {"id": self.id, "type": "function", "function": {"name": f.name, "arguments": delta}}
        return {"tool_calls": [{"index": 0, **head} if first else {"index": 0, "function": {"arguments": delta}}]}, done
