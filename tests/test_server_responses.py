"""POST /v1/responses (OpenAI's Responses API) on the real server, driven with the OpenAI SDK: the same
answers as chat completions, its stream events, structured output, function calls, and clear 400s."""
from __future__ import annotations

import json

import openai
import pytest

from server_harness import create_key, fleet, openai_client

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is 2 + 2?"  # the embedded model answers it in a few tokens and stops
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


@pytest.fixture(scope="module")
def key(srv):
    k = create_key(srv.data_dir, "responses-user")
    srv.keys["responses-user"] = k
    return k


def test_a_response_says_what_chat_completions_says(client):
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=24, temperature=0)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=24, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.status == "completed" and r.incomplete_details is None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    # instructions are the system message; message items with content parts are the conversation
    r = client.responses.create(model=MODEL, instructions="Answer in one word.", temperature=0, max_output_tokens=16,
                                input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}])
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16, messages=[
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": QUESTION}])
    assert r.output_text == chat.choices[0].message.content


def test_stream_events_build_the_same_answer(client):
    whole = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=24, temperature=0).output_text
    events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=24, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole
    assert events[-1].response.output_text == whole and events[-1].response.usage.output_tokens > 0
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=24, temperature=0) as stream:
        final = stream.get_final_response()  # the SDK's accumulator checks the items' identities
    assert final.output_text == whole


def test_max_output_tokens_makes_an_incomplete_response(client):
    r = client.responses.create(model=MODEL, input="Write a long story.", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    events = list(client.responses.create(model=MODEL, input="Write a long story.", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"


def test_text_format_json_schema_is_enforced(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]},
                                               "sunny": {"type": "boolean"}}, "required": ["city", "sunny"]}
    r = client.responses.create(model=MODEL, input="Describe the weather.", max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_schema", "name": "weather", "schema": schema}})
    answer = json.loads(r.output_text)
    assert answer["city"] in ("Paris", "London") and isinstance(answer["sunny"], bool)


def test_function_calls_and_their_outputs(client):
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                max_output_tokens=60, temperature=0)
    call = r.output[-1]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert "city" in json.loads(call.arguments)
    with client.responses.stream(model=MODEL, input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                 max_output_tokens=60, temperature=0) as stream:
        streamed = stream.get_final_response().output[-1]
    assert (streamed.type, streamed.name, streamed.arguments) == ("function_call", call.name, call.arguments)
    # a named function streams its arguments in pieces (on a server without an output guard, which would
    # batch them): one item, its deltas adding up to the whole
    small = fleet().get("small")
    raw = openai_client(small, small.keys["user"])
    named = {"type": "function", "name": "get_weather"}
    events = list(raw.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS, tool_choice=named,
                                       max_output_tokens=60, temperature=0, stream=True))
    added = [e for e in events if e.type == "response.output_item.added"]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(added) == 1 and added[0].item.type == "function_call" and len(deltas) > 1
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert "".join(deltas) == done.arguments == events[-1].response.output[0].arguments
    assert "city" in json.loads(done.arguments)
    # the call and its result go back in the input, as the SDK's agents send them
    follow = client.responses.create(model=MODEL, tools=TOOLS, max_output_tokens=24, temperature=0, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "22 C and sunny"}])
    assert follow.status in ("completed", "incomplete") and follow.output


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0]"),
    ({"input": []}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 100_000}, "max_output_tokens"),  # past the context window: the chat route's 400, renamed
    ({"input": "word " * 9000}, "input"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
])
def test_what_cannot_be_served_gets_a_400_naming_it(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**({"model": MODEL, "input": "hi"} | extra))
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_langchain_chat_model_on_the_responses_api(srv, key):
    """LangChain's ChatOpenAI(use_responses_api=True): messages, streaming, bound tools and structured output."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    llm = ChatOpenAI(base_url=srv.url + "/v1", api_key=key, model=MODEL, use_responses_api=True, temperature=0,
                     max_tokens=24, max_retries=0)
    answer = llm.invoke([("system", "Be brief."), ("human", QUESTION)])
    assert answer.text and answer.usage_metadata["output_tokens"] > 0
    assert "".join(c.text for c in llm.stream([("system", "Be brief."), ("human", QUESTION)])) == answer.text

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    call = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?").tool_calls[0]
    assert call["name"] == "get_weather" and set(call["args"]) == {"city"}

    class City(BaseModel):
        name: str

    assert isinstance(llm.with_structured_output(City).invoke("Name a city in France.").name, str)
