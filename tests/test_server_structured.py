"""Structured outputs and forced tool calls through the real server (embedded SmolLM2, guard on), driven by the
OpenAI SDK and LangChain as real clients do: JSON schema / JSON mode / choice / regex answers, tool_calls
(streamed and not), n=2, unconstrained batch mates unchanged, and bad specs answered with a 400."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server_harness import create_key, openai_client

MODEL = "SmolLM2-135M-Instruct"
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                         "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
        "required": ["city", "population"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def key(srv):
    return create_key(srv.data_dir, "structured")


def _chat(client, content: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=kw.pop("temperature", 0), max_tokens=kw.pop("max_tokens", 24),
                                          **kw)


def test_json_schema_answers_validate_for_both_of_n(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    # bounded fields, so 40 tokens always fit the answer (SmolLM2 spells numbers digit by digit)
    r = _chat(client, "Name a city and its population, as JSON.", response_format=fmt, n=2, temperature=0.8,
              seed=2, max_tokens=40)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), CITY)


def test_json_mode_choice_and_regex_answers(client):
    r = _chat(client, "Describe Paris in JSON.", response_format={"type": "json_object"}, max_tokens=40)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    r = _chat(client, "Is Paris in France?", extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = client.completions.create(model=MODEL, prompt="My phone number is", max_tokens=12, temperature=0,
                                  extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    r = _chat(client, "Pick a colour.", extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert r.choices[0].message.content in ("red", "blue")


def _check_call(call, name="get_weather", params=WEATHER):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), params["function"]["parameters"])


def test_a_named_tool_choice_returns_a_valid_call(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                       temperature=0, max_tokens=24)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    _check_call(c.message.tool_calls[0])


def test_a_streamed_tool_call_arrives_as_openai_sends_it(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=choice,
                                            temperature=0, max_tokens=24, stream=True)
    parts, reasons, ids, names = [], [], set(), []
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                assert tc.index == 0
                ids.add(tc.id) if tc.id else None
                names.append(tc.function.name) if tc.function.name else None
                parts.append(tc.function.arguments or "")
            assert not c.delta.content
            reasons.append(c.finish_reason)
    assert names == ["get_weather"] and len(ids) == 1 and reasons[-1] == "tool_calls"
    jsonschema.validate(json.loads("".join(parts)), WEATHER["function"]["parameters"])
    unstreamed = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=choice,
                                                temperature=0, max_tokens=24)
    assert unstreamed.choices[0].message.tool_calls[0].function.arguments == "".join(parts)


def test_tool_choice_required_calls_one_of_the_tools(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=40)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    _check_call(call, call.function.name, WEATHER if call.function.name == "get_weather" else TIME)


def test_a_streamed_required_call_comes_whole_at_the_end(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                            parallel_tool_calls=False, temperature=0, max_tokens=40, stream=True)
    calls, reasons = [], []
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            reasons.append(c.finish_reason)
    assert len(calls) == 1 and reasons[-1] == "tool_calls"
    params = WEATHER if calls[0].function.name == "get_weather" else TIME
    _check_call(calls[0], calls[0].function.name, params)


def test_legacy_function_call_names_the_function(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, functions=[WEATHER["function"]],
                                       function_call={"name": "get_weather"}, temperature=0, max_tokens=24)
    c = r.choices[0]
    assert c.finish_reason == "function_call" and c.message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(c.message.function_call.arguments), WEATHER["function"]["parameters"])


# tool_choice "auto": what a model that writes Hermes calls answers, made certain by a regex (the 135M model
# rarely calls a tool by itself); the server must read the call back out of the free text
HERMES_CALL = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris", "unit": "C"\}\}</tool_call>'


def test_auto_tool_choice_reads_a_call_out_of_the_answer(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                       max_tokens=60, extra_body={"guided_regex": HERMES_CALL})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    _check_call(c.message.tool_calls[0])
    assert json.loads(c.message.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "C"}
    # the SDK's streaming helper assembles the same call from the chunks
    with client.beta.chat.completions.stream(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                             max_tokens=60, extra_body={"guided_regex": HERMES_CALL}) as stream:
        final = stream.get_final_completion()
    fc = final.choices[0]
    assert fc.finish_reason == "tool_calls" and not fc.message.content
    assert fc.message.tool_calls[0].function.name == "get_weather"
    assert fc.message.tool_calls[0].function.arguments == c.message.tool_calls[0].function.arguments


def test_auto_tool_choice_leaves_prose_and_unknown_tools_as_content(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[TIME], temperature=0, max_tokens=60,
                                       extra_body={"guided_regex": HERMES_CALL})  # get_weather is not offered
    c = r.choices[0]
    assert c.finish_reason == "stop" and not c.message.tool_calls and c.message.content.startswith("<tool_call>")
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=60, extra_body={"guided_regex": HERMES_CALL})
    assert not r.choices[0].message.tool_calls  # "none": nothing is parsed


def test_a_tool_result_conversation_renders_and_answers(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "C"}'}}
    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=24)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


def test_unconstrained_batch_mates_keep_their_greedy_answer(srv, key, client):
    plain = dict(messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                 max_tokens=10)
    alone = client.chat.completions.create(model=MODEL, **plain).choices[0].message.content
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}

    async def together():
        aclient = openai_client(srv, key, asynchronous=True)
        jobs = [aclient.chat.completions.create(model=MODEL, **plain)]
        jobs += [aclient.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=10,
                                                 response_format=fmt) for _ in range(2)]
        return await asyncio.gather(*jobs)

    mixed = asyncio.run(together())
    assert mixed[0].choices[0].message.content == alone
    assert all(m.choices[0].message.content.startswith('{"city": ') for m in mixed[1:])


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_a_bad_constraint_gets_a_400_naming_the_param(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param
    assert "/project/" not in e.value.body["message"]


def test_langchain_structured_output_returns_the_model_instance(srv, key):
    from langchain_openai import ChatOpenAI

    class City(BaseModel):
        city: str = Field(max_length=16)
        population: int = Field(ge=0, le=99999999)

    llm = ChatOpenAI(base_url=srv.url + "/v1", api_key=key, model=MODEL, temperature=0, max_tokens=40, max_retries=0)
    out = llm.with_structured_output(City, method="json_schema").invoke("Name a city and its population, as JSON.")
    assert isinstance(out, City) and out.city


def test_langchain_bind_tools_gets_the_call_back(srv, key):
    """An agent's step: LangChain binds tools (tool_choice left to the model) and reads AIMessage.tool_calls."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=srv.url + "/v1", api_key=key, model=MODEL, temperature=0, max_tokens=60,
                     max_retries=0, extra_body={"guided_regex": HERMES_CALL})
    msg = llm.bind_tools([WEATHER, TIME]).invoke("What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris", "unit": "C"})]


def test_redaction_inside_a_json_answer_keeps_it_json_or_withholds_it(client):
    def answer(schema):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        return _chat(client, "Fill in the form.", response_format=fmt, max_tokens=40).choices[0]

    c = answer({"type": "object", "properties": {"email": {"const": "ann.lee@example.com"}}, "required": ["email"]})
    assert json.loads(c.message.content) == {"email": "<EMAIL_ADDRESS>"}  # redacted inside the string: still JSON
    c = answer({"type": "object", "properties": {"card": {"const": 4111111111111111}}, "required": ["card"]})
    assert c.finish_reason == "content_filter" and not c.message.content  # a redacted number is no JSON: withheld
