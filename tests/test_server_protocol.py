"""OpenAI/vLLM wire-protocol details, against the real servers: lone surrogates, the legacy function-calling
round trip, vLLM's request extras, forced tool calls cut by max_tokens, nullable response fields, streamed
n > 1, and strict request types."""
from __future__ import annotations

import json

import httpx
import pytest

from server_harness import create_key, fleet

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def key(srv):
    return create_key(srv.data_dir, "protocol")


@pytest.fixture(scope="module")
def main(srv, key):
    """An HTTP client of the main server (guard and auth on, embeddings)."""
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as h:
        yield h


@pytest.fixture(scope="module")
def raw():
    """An HTTP client of the server without guardrails (its chunks are the engine's, unbatched)."""
    small = fleet().get("small")
    with httpx.Client(base_url=small.url, headers={"Authorization": f"Bearer {small.keys['user']}"},
                      timeout=120) as h:
        yield h


def _events(r: httpx.Response) -> list[dict]:
    """Returns the JSON events of an SSE response (checks it ends with [DONE])."""
    lines = [line for line in r.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]", r.text
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def _error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# ------------------------------------------------------------------ 1. lone surrogates
def test_a_lone_surrogate_in_any_text_field_is_read_as_the_replacement_character(main):
    cut = 'a\\ud83d'  # JSON's escape of half an emoji, as JavaScript's s.slice() leaves it
    bodies = {"/v1/chat/completions": '{"messages":[{"role":"user","content":"%s"}],"max_tokens":1}',
              "/v1/completions": '{"prompt":"%s","max_tokens":1}',
              "/v1/embeddings": '{"input":"%s"}',
              "/generate": '{"prompt":"%s","max_tokens":1}'}
    for path, body in bodies.items():  # one keep-alive connection: none of them may reset it
        r = main.post(path, content=body % cut, headers={"content-type": "application/json"})
        assert r.status_code == 200, (path, r.text)
    r = main.post("/v1/prompts/render", content=b'{"messages":[{"role":"user","content":"a\xed\xa0\xbd\xed\xb8\x80'
                  b' b\xed\xa0\xbd"}]}', headers={"content-type": "application/json"})  # raw surrogate bytes
    assert r.status_code == 200 and r.json()["messages"][0]["content"] == "a\U0001F600 b\ufffd", r.text


# ------------------------------------------------------------------ 2. legacy functions, names, refusals
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_the_legacy_function_round_trip_reaches_the_model(raw):
    r = raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Weather in Paris?"}],
                                               "functions": [WEATHER], "function_call": {"name": "get_weather"},
                                               "max_tokens": 30, "temperature": 0})
    call = r.json()["choices"][0]["message"]["function_call"]
    history = [{"role": "user", "content": "Weather in Paris?", "name": "bob"},
               {"role": "assistant", "content": None, "function_call": call},
               {"role": "function", "name": "get_weather", "content": "sunny"},
               {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't say more."}]},
               {"role": "user", "content": "ok"}]
    r = raw.post("/v1/chat/completions", json={"messages": history, "functions": [WEATHER], "max_tokens": 3})
    assert r.status_code == 200, r.text
    shown = raw.post("/v1/prompts/render", json={"messages": history}).json()
    msgs = shown["messages"]
    assert msgs[0]["name"] == "bob"  # kept for the chat template
    assert msgs[1]["tool_calls"][0]["function"] == call and msgs[2]["role"] == "tool"
    assert msgs[2]["tool_call_id"] == msgs[1]["tool_calls"][0]["id"]
    # the model sees its earlier call, the result and the refusal (SmolLM2's template has no tools: as text)
    assert '"get_weather"' in shown["prompt"] and "sunny" in shown["prompt"] and "I can't say more." in shown["prompt"]


# ------------------------------------------------------------------ 3. vLLM request fields
def test_vllm_stop_fields_are_honoured(raw):
    base = {"prompt": "1, 2, 3, 4,", "max_tokens": 10, "temperature": 0}
    plain = raw.post("/v1/completions", json={**base, "stop": ["6"]}).json()["choices"][0]["text"]
    kept = raw.post("/v1/completions", json={**base, "stop": ["6"], "include_stop_str_in_output": True}).json()
    assert kept["choices"][0]["text"] == plain + "6"
    r = raw.post("/v1/completions", json={**base, "stop_token_ids": [28]}).json()["choices"][0]  # 28 is ","
    assert r["finish_reason"] == "stop" and "," not in r["text"] and r["text"].strip() == "5"


def test_continue_final_message_continues_the_assistant_text(raw):
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello, my friend"}]
    body = {"messages": msgs, "max_tokens": 8, "temperature": 0}
    cont = raw.post("/v1/chat/completions", json={**body, "add_generation_prompt": False,
                                                  "continue_final_message": True}).json()
    new_turn = raw.post("/v1/chat/completions", json=body).json()
    assert cont["usage"]["prompt_tokens"] < new_turn["usage"]["prompt_tokens"]  # no <|im_end|> + new turn header
    opened = raw.post("/v1/prompts/render", json={"messages": msgs[:1]}).json()["prompt"]  # ends "assistant\n"
    render = raw.post("/v1/completions", json={"prompt": opened + "Hello, my friend", "max_tokens": 8,
                                               "temperature": 0}).json()
    assert cont["choices"][0]["message"]["content"] == render["choices"][0]["text"]
    err = _error(raw.post("/v1/chat/completions", json={**body, "continue_final_message": True}))
    assert err["param"] == "continue_final_message"  # add_generation_prompt is still true


def test_prompt_logprobs_have_vllms_shape(raw, tokenizer):
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    r = raw.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2, "n": 2}).json()
    for choice in r["choices"]:
        lps = choice["prompt_logprobs"]
        assert len(lps) == len(ids) and lps[0] is None
        for tid, entry in zip(ids[1:], lps[1:]):
            assert str(tid) in entry and 2 <= len(entry) <= 3  # the prompt's token and the 2 most likely
            ranks = sorted(e["rank"] for e in entry.values() if e["rank"] is not None)
            assert ranks[:2] == [1, 2] and all(e["logprob"] <= 0 for e in entry.values())
    chat = raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                                                  "prompt_logprobs": 0}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert "prompt_logprobs" not in raw.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()["choices"][0]
    err = _error(raw.post("/v1/completions", json={"prompt": prompt, "prompt_logprobs": 1, "stream": True}))
    assert err["param"] == "prompt_logprobs"


def test_vllm_token_controls_take_effect(raw, tokenizer):
    """allowed_token_ids, bad_words and skip_special_tokens reach the engine (vLLM's sampling fields)."""
    base = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    plain = raw.post("/v1/completions", json=base).json()["choices"][0]["text"]
    only = tokenizer.encode(" banana", add_special_tokens=False)
    r = raw.post("/v1/completions", json={**base, "allowed_token_ids": only}).json()["choices"][0]["text"]
    assert r == " banana" * 4
    first = plain.split()[0]
    banned = raw.post("/v1/completions", json={**base, "bad_words": [first]}).json()["choices"][0]["text"]
    assert first not in banned.split() and banned != plain
    end = raw.post("/v1/completions", json={**base, "max_tokens": 3, "allowed_token_ids": tokenizer.encode(
        "<|im_end|>", add_special_tokens=False), "ignore_eos": True, "skip_special_tokens": False}).json()
    assert end["choices"][0]["text"] == "<|im_end|>" * 3


@pytest.mark.parametrize("field,value", [("use_beam_search", True), ("truncate_prompt_tokens", 5),
                                         ("chat_template", "{{ messages }}"), ("echo", True)])
def test_vllm_fields_the_server_does_not_implement_are_refused(raw, field, value):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, field: value}
    err = _error(raw.post("/v1/chat/completions", json=body))
    assert err["code"] == "unsupported_parameter" and err["param"] == field, err
    ok = raw.post("/v1/chat/completions", json={**body, field: {"use_beam_search": False, "echo": False,
                                                                 "skip_special_tokens": True}.get(field)})
    assert ok.status_code == 200, ok.text  # the value that asks for nothing (or null) is fine


# ------------------------------------------------------------------ 4. tool_choice required cut by max_tokens
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_calls_cut_by_max_tokens_return_the_complete_calls(raw, stream):
    body = {"messages": [{"role": "user", "content": "2+3?"}], "tools": [ADD], "tool_choice": "required",
            "max_tokens": 60, "temperature": 0, "stream": stream}
    r = raw.post("/v1/chat/completions", json=body)
    if stream:
        choices = [c for e in _events(r) for c in e["choices"]]
        calls = [t for c in choices for t in c["delta"].get("tool_calls") or []]
        reason = choices[-1]["finish_reason"]
    else:
        c = r.json()["choices"][0]
        calls, reason = c["message"]["tool_calls"], c["finish_reason"]
        assert c["message"]["content"] is None
    assert reason == "tool_calls" and r.status_code == 200
    assert [json.loads(t["function"]["arguments"]) for t in calls] == [{"a": 2, "b": 3}]  # repeats dropped


# ------------------------------------------------------------------ 5. response shapes
def test_nullable_fields_are_null_and_servelm_extras_absent(raw):
    chat = raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 2}).json()
    c = chat["choices"][0]
    assert c["logprobs"] is None and c["message"]["refusal"] is None and "content" in c["message"]
    assert not {"servelm", "tool_calls", "function_call", "reasoning_content"} & (set(c) | set(c["message"]))
    assert not {"servelm", "sources", "prompt_logprobs"} & set(chat)
    comp = raw.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).json()
    assert comp["choices"][0]["logprobs"] is None and "servelm" not in comp["choices"][0]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}), ("/v1/completions", {"prompt": "Hi"})])
def test_streamed_n_sends_one_choice_per_chunk_with_nullable_fields(raw, path, body):
    r = raw.post(path, json={**body, "max_tokens": 3, "n": 3, "stream": True, "temperature": 1, "seed": 1,
                             "stream_options": {"include_usage": True}})
    events = _events(r)
    *chunks, last = events
    assert all(len(e["choices"]) == 1 for e in chunks) and last["choices"] == [] and last["usage"]["total_tokens"]
    assert all(e["usage"] is None for e in chunks)
    for e in chunks:
        assert "finish_reason" in e["choices"][0] and "logprobs" in e["choices"][0]
    if path == "/v1/chat/completions":  # every choice gets its own first chunk with the role
        assert [e["choices"][0]["delta"].get("role") for e in chunks[:3]] == ["assistant"] * 3
        assert [e["choices"][0]["index"] for e in chunks[:3]] == [0, 1, 2]
    assert {e["choices"][0]["index"] for e in chunks if e["choices"][0]["finish_reason"]} == {0, 1, 2}
    plain = raw.post(path, json={**body, "max_tokens": 3, "stream": True})
    assert all("usage" not in e for e in _events(plain))  # without include_usage, no usage key at all


# ------------------------------------------------------------------ 6. validation messages, types, codes
@pytest.mark.parametrize("body,param,code,words", [
    ({"prompt": "Hi", "stream": "yes"}, "stream", "invalid_type", "expected a boolean"),
    ({"prompt": "Hi", "echo": "false"}, "echo", "invalid_type", "expected a boolean"),
    ({"prompt": "Hi", "logprobs": True}, "logprobs", "invalid_type", "expected an integer"),
    ({"prompt": "Hi", "max_tokens": True}, "max_tokens", "invalid_type", "expected an integer"),
    ({"prompt": "Hi", "max_tokens": 1.0}, "max_tokens", "invalid_type", "expected an integer"),
    ({"prompt": "Hi", "n": "2"}, "n", "invalid_type", "expected an integer"),
    ({"prompt": None}, "prompt", "missing_required_parameter", "Missing required parameter: 'prompt'"),
    ({"prompt": [[1, 10**9]]}, "prompt", "invalid_value", "Token ids"),
    ({"prompt": "Hi", "min_tokens": 5, "max_tokens": 2}, "min_tokens", "invalid_value", "cannot exceed"),
])
def test_wrong_types_and_values_get_a_400_with_code_and_param(raw, body, param, code, words):
    err = _error(raw.post("/v1/completions", json=body))
    assert (err["param"], err["code"]) == (param, code) and words in err["message"], err


def test_messages_say_what_is_wrong_without_framework_internals(raw):
    chat = lambda **kw: raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], **kw})
    err = _error(chat(tool_choice="bogus"))
    assert err["param"] == "tool_choice" and "literal" not in err["message"] and err["code"] == "invalid_value"
    err = _error(chat(top_logprobs=2))
    assert err["param"] == "top_logprobs" and err["code"] == "invalid_value"
    err = _error(raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "text"}]}]}))
    assert err["param"] == "messages.0.content.0.text" and "Missing" in err["message"]
    err = _error(raw.post("/v1/completions", content=b"", headers={"content-type": "application/json"}))
    assert "empty" in err["message"]
    err = _error(raw.post("/v1/completions", content=b"[" * 100000, headers={"content-type": "application/json"}))
    assert err["message"] == "The request body is not valid JSON."


def test_top_p_zero_keeps_only_the_most_likely_token(raw):
    body = {"prompt": "The capital of France is", "max_tokens": 6, "seed": 3}
    greedy = raw.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    r = raw.post("/v1/completions", json={**body, "temperature": 1.5, "top_p": 0, "n": 2}).json()
    assert [c["text"] for c in r["choices"]] == [greedy, greedy]
