"""tool_choice "auto": calls read back out of free answers (server/tool_parser.py) and tools described to a
chat template without tool support (prompts/tools.py). Server round trips: tests/test_server_structured.py."""
from __future__ import annotations

import json

import pytest

from servelm.prompts.tools import tool_turns_as_text, with_tools
from servelm.server.tool_parser import AutoToolStream, ToolCallParser

P = ToolCallParser(frozenset({"get_weather", "get_time"}))
PARIS = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'


def _args(call):
    return json.loads(call["function"]["arguments"])


@pytest.mark.parametrize(("text", "content", "names"), [
    (f"<tool_call>{PARIS}</tool_call>", None, ["get_weather"]),  # Hermes / Qwen / SmolLM
    (f"Let me check.\n<tool_call>\n{PARIS}\n</tool_call>", "Let me check.", ["get_weather"]),
    (f'<tool_call>{PARIS}</tool_call><tool_call>{{"name": "get_time", "arguments": {{}}}}</tool_call>', None,
     ["get_weather", "get_time"]),
    (f"<tool_call>{PARIS}", None, ["get_weather"]),  # ended before its closing tag, JSON complete
    (f"<tool_call>[{PARIS}]</tool_call>", None, ["get_weather"]),  # a list inside the tags
    (f"[TOOL_CALLS] [{PARIS}]", None, ["get_weather"]),  # Mistral
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}', None, ["get_weather"]),  # Llama 3
])
def test_calls_in_the_formats_models_write(text, content, names):
    got_content, calls = P.parse(text)
    assert got_content == content and [c["function"]["name"] for c in calls] == names
    assert _args(calls[0]) in ({"city": "Paris", "unit": "C"}, {})
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.parametrize("text", [
    "The weather in Paris is mild.",
    '{"name": "send_email", "arguments": {}}',  # not one of the request's tools
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Par',  # cut inside the JSON
    '{"city": "Paris"}',  # JSON, but no call
    '[1, 2, 3]',
    '<tool_call>{"name": "get_weather", "arguments": "not json"}</tool_call>',
])
def test_text_that_is_no_call_stays_content(text):
    assert P.parse(text) == (text, None)


def _stream(pieces: list[str], parser=P) -> tuple[str, list[dict], bool]:
    s, content, calls, complete = AutoToolStream(parser), "", [], False
    for i, piece in enumerate(pieces):
        fields, done = s.feed(piece, i == len(pieces) - 1)
        content += fields.get("content", "")
        calls += fields.get("tool_calls", [])
        complete |= done
    return content, calls, complete


def test_stream_sends_text_at_once_and_holds_a_call_until_it_ends():
    s = AutoToolStream(P)
    assert s.feed("Sure", False) == ({"content": "Sure"}, False)
    assert s.feed(", <tool", False) == ({"content": ", "}, False)  # "<tool" may open a call: held
    assert s.feed("_call>" + PARIS[:20], False) == ({}, False)
    fields, done = s.feed(PARIS[20:] + "</tool_call>", True)
    assert done and list(fields) == ["tool_calls"] and fields["tool_calls"][0]["index"] == 0
    assert _args(fields["tool_calls"][0]) == {"city": "Paris", "unit": "C"}


def test_stream_of_plain_text_loses_nothing():
    text = "I think <b>bold</b> [not a call] and {braces} and <tool no"
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    assert _stream(pieces) == (text, [], False)
    assert _stream(["  ", "\n", "Hi"]) == ("  \nHi", [], False)


def test_stream_of_a_json_answer_is_held_whole():
    content, calls, complete = _stream(["[TOOL", "_CALLS] [", PARIS, "]"])
    assert content == "" and complete and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert calls[0]["index"] == 0 and _args(calls[0]) == {"city": "Paris", "unit": "C"}
    assert _stream(["  {", '"a": 1}']) == ('  {"a": 1}', [], False)  # JSON but no call: sent as text at the end


def test_parallel_tool_calls_false_keeps_the_first_call():
    two = f'<tool_call>{PARIS}</tool_call><tool_call>{{"name": "get_time", "arguments": {{}}}}</tool_call>'
    content, calls = ToolCallParser(P.names, single=True).parse(two)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather"]


def test_legacy_functions_get_function_call():
    content, calls = ToolCallParser(frozenset({"get_weather"}), legacy=True).parse(f"<tool_call>{PARIS}</tool_call>")
    assert calls and content is None
    s = AutoToolStream(ToolCallParser(frozenset({"get_weather"}), legacy=True))
    fields, done = s.feed(f"<tool_call>{PARIS}</tool_call>", True)
    assert done and fields["function_call"]["name"] == "get_weather"


def test_tools_and_tool_turns_for_a_template_without_tools():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object"}}}]
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}]
    out = with_tools(history, tools)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2] == {"role": "assistant",
                      "content": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny, 21 C\n</tool_response>"}
    # the model's own format reads back as the call it was
    assert P.parse(out[2]["content"])[1][0]["function"]["name"] == "get_weather"
    merged = with_tools([{"role": "system", "content": "Be brief."}] + history[:1], tools, forced=True)
    assert merged[0]["content"].startswith("Be brief.\n\n") and "<tool_call>" not in merged[0]["content"]
    assert tool_turns_as_text(history[:1]) == history[:1]
