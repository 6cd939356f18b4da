"""Tools for a model whose chat template does not render them (the embedded SmolLM2's does not).

A template with tool support gets the OpenAI ``tools`` list itself (``server/routes/chat.py``). For one
without, the tools and the call format go into the system message, and earlier tool turns are written out
in the same format, so a multi-turn tool conversation renders with any template. The format is the Hermes
one (Qwen2.5, Hermes, SmolLM's function-calling data): a call is ``<tool_call>{"name": ..., "arguments":
{...}}</tool_call>``, a result ``<tool_response>...</tool_response>``; ``server/tool_parser.py`` reads it
back (with the other common formats).
"""
from __future__ import annotations

import json

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


def tool_system_prompt(tools: list[dict], forced: bool = False) -> str:
    """The tools (OpenAI ``{"type": "function", "function": {...}}`` entries) and how to call them. With
    ``forced`` the answer's form is fixed by constrained decoding, so only the functions are described."""
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    if forced:
        return f"You can call these functions:\n{listing}"
    return ("You can call functions. These are their signatures, one JSON object per line:\n"
            f"{listing}\n"
            "To call a function, answer with only a JSON object of its name and arguments between "
            f"{TOOL_CALL_OPEN} and {TOOL_CALL_CLOSE} tags, one pair of tags per call:\n"
            f'{TOOL_CALL_OPEN}{{"name": "<function name>", "arguments": {{<arguments>}}}}{TOOL_CALL_CLOSE}\n'
            "If no function helps, answer in plain text.")


def with_tools(messages: list[dict], tools: list[dict], forced: bool = False) -> list[dict]:
    """``messages`` with the tool description in the system message (appended to one that is there, else a
    new first message) and earlier tool calls and results written as text (:func:`tool_turns_as_text`)."""
    out = tool_turns_as_text(messages)
    note = tool_system_prompt(tools, forced)
    if out and out[0]["role"] == "system":
        return [{**out[0], "content": f"{out[0]['content']}\n\n{note}"}] + out[1:]
    return [{"role": "system", "content": note}] + out


def tool_turns_as_text(messages: list[dict]) -> list[dict]:
    """Assistant ``tool_calls`` become ``<tool_call>`` text after the message's content; ``tool`` messages
    become user messages holding ``<tool_response>`` text (templates without tools know no "tool" role)."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [_call_text(c) for c in m["tool_calls"]]
            text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"{TOOL_RESPONSE_OPEN}\n{m.get('content') or ''}\n{TOOL_RESPONSE_CLOSE}"})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    return out


def _call_text(call: dict) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass  # not JSON: kept as the string the client sent
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': fn.get('name'), 'arguments': args}, ensure_ascii=False)}{TOOL_CALL_CLOSE}"
