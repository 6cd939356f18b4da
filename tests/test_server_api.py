"""The real server (embedded SmolLM2, auth on) driven with the official OpenAI SDK and raw HTTP."""
from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time

import httpx
import openai
import pytest
from openai import OpenAI

from server_harness import bootstrap_key, create_key, key_label, openai_client

MODEL = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def admin_key(srv):
    return bootstrap_key(srv)


@pytest.fixture(scope="module")
def key(srv):
    k = create_key(srv.data_dir, "alice")
    srv.keys["alice"] = k
    return k


def post(srv, path, body=None, key=None, **kw):
    headers = kw.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=kw.pop("timeout", 120), **kw)


# ------------------------------------------------------------------ first start, health, docs
def test_first_start_prints_one_admin_key_with_url_and_examples(srv, admin_key):
    out = srv.output()
    assert out.count("created an admin API key") == 1
    assert srv.url in out and "curl " in out and "from openai import OpenAI" in out
    r = httpx.get(srv.url + "/v1/admin/keys", headers={"Authorization": f"Bearer {admin_key}"})
    assert r.status_code == 200 and [k["name"] for k in r.json()["data"]][0] == "admin"
    assert admin_key not in r.text  # listings show a hint, never the key


def test_health_ready_docs_need_no_key(srv):
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    assert httpx.get(srv.url + "/ready").json()["status"] == "ready"
    assert "swagger" in httpx.get(srv.url + "/docs").text.lower()
    paths = httpx.get(srv.url + "/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/generate"} <= set(paths)


def test_request_id_is_returned_and_echoed(srv, key):
    r = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {key}", "x-request-id": "my-id-1"})
    assert r.headers["x-request-id"] == "my-id-1"
    r = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert len(r.headers["x-request-id"]) >= 16


# ------------------------------------------------------------------ chat and completions
def test_chat_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=8, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming_and_reports_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stream_is_sse_ending_with_done(srv, key):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and len(events) >= 2


def test_completions_streaming_and_not(client):
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert full.object == "text_completion" and full.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True) if ch.choices)
    assert streamed == full.choices[0].text


def test_n_2_returns_two_choices_and_counts_both(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=6, n=2, temperature=1.0, seed=3,
                                       logprobs=True)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_stop_string_cuts_the_text(client):
    base = client.completions.create(model=MODEL, prompt="List: apples, pears, plums, figs,", max_tokens=12,
                                     temperature=0).choices[0].text
    words = [w for w in base.split() if len(w) >= 3]
    assert words, base
    stop = words[1] if len(words) > 1 else words[0]
    r = client.completions.create(model=MODEL, prompt="List: apples, pears, plums, figs,", max_tokens=12,
                                  temperature=0, stop=[stop])
    assert r.choices[0].text == base[: base.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10,
              temperature=1.0)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1  # the seed matters


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(len(d) <= 2 for d in lp.top_logprobs)


def test_usage_equals_tokenizer_counts(client, tokenizer):
    prompt = "Count the tokens of this exact sentence, please."
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 7 == len(r.choices[0].logprobs.tokens)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    c = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    expected = tokenizer.encode(tokenizer.apply_chat_template(msgs), add_special_tokens=False)
    assert c.usage.prompt_tokens == len(expected)


def test_generate_endpoint(srv, key):
    r = post(srv, "/generate", {"prompt": "Once upon a time", "max_tokens": 5}, key)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"text", "tokens_generated", "finish_reason"} and body["text"]
    assert 1 <= body["tokens_generated"] <= 5 and body["finish_reason"] in ("stop", "length")


def test_generate_honours_sampling_fields_and_streams(srv, key):
    """/generate's sampling fields reach the engine (a stop string ends the text, a seed repeats it), and
    stream=true sends the same text as deltas whose last event says why it ended."""
    base = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}
    full = post(srv, "/generate", base, key).json()
    assert full["finish_reason"] == "length" and "." in full["text"]
    cut = post(srv, "/generate", base | {"stop": "."}, key).json()
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"].split(".")[0]
    sampled = base | {"temperature": 1.0, "top_p": 0.9, "top_k": 40, "seed": 7, "repetition_penalty": 1.1}
    assert post(srv, "/generate", sampled, key).json() == post(srv, "/generate", sampled, key).json()
    r = post(srv, "/generate", base | {"stream": True}, key)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["tokens_generated"] == 24
    assert all("finish_reason" not in c for c in chunks[:-1])
    bad = post(srv, "/generate", base | {"top_p": 0}, key)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"


# ------------------------------------------------------------------ models and embeddings
def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "all-MiniLM-L6-v2"]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_dimensions_and_similarity(client):
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Quarterly revenue grew by ten percent."]
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 384 for v in vecs)
    assert _cos(vecs[0], vecs[1]) > _cos(vecs[0], vecs[2]) + 0.2
    assert r.usage.prompt_tokens > 0


def test_embeddings_base64_matches_float(srv, key):
    f = post(srv, "/v1/embeddings", {"input": "hello world"}, key).json()["data"][0]["embedding"]
    b = post(srv, "/v1/embeddings", {"input": "hello world", "encoding_format": "base64"}, key).json()
    raw = base64.b64decode(b["data"][0]["embedding"])
    assert len(raw) == 384 * 4
    assert all(abs(x - y) < 1e-6 for x, y in zip(struct.unpack("<384f", raw), f))


# ------------------------------------------------------------------ errors
def _check_error(r: httpx.Response, status: int, param=None, code=None, words=()):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["message"] and isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    for w in words:
        assert w in err["message"]
    for leak in ("pydantic", "Traceback", "loc", "errors.pydantic.dev", "ValidationError", "fastapi"):
        assert leak not in r.text
    return err


CHAT = "/v1/chat/completions"
BAD_REQUESTS = [
    ("not json", CHAT, b"{bad", None, None, ["JSON"]),
    ("wrong type", CHAT, {"messages": MSG, "max_tokens": "ten"}, "max_tokens", None, []),
    ("temperature range", CHAT, {"messages": MSG, "temperature": 5}, "temperature", None, []),
    ("n zero", CHAT, {"messages": MSG, "n": 0}, "n", None, []),
    ("empty messages", CHAT, {"messages": []}, "messages", None, []),
    ("missing messages", CHAT, {"model": MODEL}, "messages", None, ["messages"]),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", None, []),
    ("image part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content", None, ["text"]),
    ("empty stop", CHAT, {"messages": MSG, "stop": [""]}, "stop", None, []),
    ("top_logprobs alone", CHAT, {"messages": MSG, "top_logprobs": 2}, "top_logprobs", None, []),
    ("rag without retrieval", CHAT, {"messages": MSG, "rag": {"collection": "docs"}}, "rag", None, []),
    ("max_tokens too long", "/v1/completions", {"prompt": "hi", "max_tokens": 100000}, "max_tokens",
     "context_length_exceeded", ["8192", "100000"]),
    ("prompt too long", "/v1/completions", {"prompt": "hello " * 9000, "max_tokens": 1}, "prompt",
     "context_length_exceeded", ["8192", "9001"]),
    ("empty prompt", "/v1/completions", {"prompt": "", "max_tokens": 1}, "prompt", None, []),
    ("body is a list", CHAT, [1, 2], None, None, []),
    ("empty embedding input", "/v1/embeddings", {"input": [""]}, "input", None, []),
    ("embedding dimensions", "/v1/embeddings", {"input": "x", "dimensions": 12}, "dimensions", None, ["384"]),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_400_naming_the_field(srv, key, case):
    _, path, body, param, code, words = case
    if isinstance(body, bytes):
        r = httpx.post(srv.url + path, content=body, timeout=30,
                       headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    else:
        r = post(srv, path, body, key)
    _check_error(r, 400, param, code, words)


ODD_BODIES = [
    None, 1, "text", [], {"messages": None}, {"messages": [{"role": "user"}]}, {"messages": MSG, "n": 1.5},
    {"messages": MSG, "max_tokens": 10**30}, {"messages": MSG, "seed": 2**70}, {"messages": MSG, "top_k": 10**30},
    {"messages": MSG, "stop": ["x"] * 40}, {"messages": MSG, "logprobs": True, "top_logprobs": 99},
    {"messages": MSG, "stream_options": "yes"}, {"messages": MSG, "min_tokens": 50, "max_tokens": 2},
    {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
]
ODD_COMPLETIONS = [{"prompt": []}, {"prompt": ["a", ""]}, {"prompt": [10**9]}, {"prompt": [[1, 2], [-1]]},
                   {"prompt": ["a", [1]]}, {"prompt": [[]]}, {"prompt": "x", "suffix": "y"},
                   {"prompt": "x", "logprobs": -1}]


def test_odd_input_never_gets_5xx_nor_hurts_other_requests(srv, key):
    for body in ODD_BODIES:
        r = post(srv, CHAT, body, key)
        assert 400 <= r.status_code < 500, (body, r.text)
        _check_error(r, r.status_code)
    for body in ODD_COMPLETIONS:
        _check_error(post(srv, "/v1/completions", body, key), 400)
    # huge seeds and top_k that are valid ints still work
    for extra in ({"seed": 2**63 - 1}, {"seed": -5}, {"top_k": 10**6}):
        r = post(srv, CHAT, {"messages": MSG, "max_tokens": 2, **extra}, key)
        assert r.status_code == 200, (extra, r.text)
    assert httpx.get(srv.url + "/ready").status_code == 200


def test_sdk_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100000)
    assert e.value.status_code == 400 and "maximum context length" in e.value.message


def test_auth_errors(srv, key):
    _check_error(post(srv, CHAT, {"messages": MSG}), 401, code="missing_api_key")
    _check_error(post(srv, CHAT, {"messages": MSG}, "sk-servelm-wrong"), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_scope_errors(srv, key):
    emb_only = create_key(srv.data_dir, "embed-only", scopes="embeddings")
    srv.keys["embed-only"] = emb_only
    _check_error(post(srv, CHAT, {"messages": MSG, "max_tokens": 1}, emb_only), 403, code="insufficient_scope",
                 words=["chat"])
    assert post(srv, "/v1/embeddings", {"input": "ok"}, emb_only).status_code == 200
    _check_error(httpx.get(srv.url + "/v1/admin/keys", headers={"Authorization": f"Bearer {key}"}), 403,
                 code="insufficient_scope", words=["admin"])


def test_not_found_errors(srv, key):
    _check_error(post(srv, CHAT, {"model": "gpt-4", "messages": MSG}, key), 404, "model", "model_not_found")
    _check_error(post(srv, "/v1/embeddings", {"model": "ada", "input": "x"}, key), 404, "model")
    _check_error(httpx.get(srv.url + "/v2/nothing"), 404, words=["/v2/nothing"])
    _check_error(httpx.get(srv.url + CHAT), 405)


def test_body_too_large_gets_413(srv, key):
    big = {"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    _check_error(post(srv, CHAT, big, key), 413, code="request_too_large")


def test_admin_creates_and_revokes_keys(srv, admin_key):
    h = {"Authorization": f"Bearer {admin_key}"}
    r = httpx.post(srv.url + "/v1/admin/keys", json={"name": "temp", "scopes": ["models"]}, headers=h)
    assert r.status_code == 200
    temp = r.json()["key"]
    srv.keys["temp"] = temp
    assert httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {temp}"}).status_code == 200
    _check_error(httpx.post(srv.url + "/v1/admin/keys", json={"name": "temp"}, headers=h), 400, words=["exists"])
    assert httpx.delete(srv.url + "/v1/admin/keys/temp", headers=h).status_code == 200
    _check_error(httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {temp}"}), 401)


# ------------------------------------------------------------------ rate limits (in memory)
async def _parallel(srv, key, n, body, path="/v1/completions"):
    async with httpx.AsyncClient(base_url=srv.url, timeout=120,
                                 headers={"Authorization": f"Bearer {key}"}) as h:
        return await asyncio.gather(*[h.post(path, json=body) for _ in range(n)])


def test_requests_per_minute_admits_exactly_the_limit(srv):
    k = create_key(srv.data_dir, "rpm5", rpm=5)
    srv.keys["rpm5"] = k
    rs = asyncio.run(_parallel(srv, k, 40, {"model": MODEL, "prompt": "Hi", "max_tokens": 1}))
    ok = [r for r in rs if r.status_code == 200]
    limited = [r for r in rs if r.status_code == 429]
    assert len(ok) == 5 and len(limited) == 35
    for r in limited:
        err = _check_error(r, 429, code="rate_limit_requests")
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-limit-requests"] == "5" and r.headers["x-ratelimit-remaining-requests"] == "0"
        assert "rpm5" in err["message"]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "5"
    m = srv.metrics()
    assert m[f'servelm:rate_limited_requests_total{{key="{key_label(srv.data_dir, "rpm5")}",limit="rate_limit_requests"}}'] == 35


def test_tokens_per_minute_charge_real_token_counts(srv):
    tpm = 3000
    k = create_key(srv.data_dir, "tpm", tpm=tpm)
    srv.keys["tpm"] = k
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 200, "temperature": 0,
            "stop": ["."]}
    r1 = post(srv, "/v1/completions", body, k)
    u1 = r1.json()["usage"]
    assert r1.json()["choices"][0]["finish_reason"] == "stop" and u1["completion_tokens"] < 200
    reserve = u1["prompt_tokens"] + 200
    assert int(r1.headers["x-ratelimit-remaining-tokens"]) == tpm - reserve
    r2 = post(srv, "/v1/completions", body, k)
    # the first request was corrected from its reservation down to what it really used
    assert int(r2.headers["x-ratelimit-remaining-tokens"]) == tpm - u1["total_tokens"] - reserve
    big = post(srv, "/v1/completions", {**body, "max_tokens": 4000}, k)
    _check_error(big, 429, code="tokens_per_minute_exceeded", words=[str(tpm)])


# ------------------------------------------------------------------ disconnects
async def _open_streams(srv, key, n):
    client = openai_client(srv, key, asynchronous=True)
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Write a long essay about the sea."}],
                max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    streams = await asyncio.gather(*[client.chat.completions.create(**body) for _ in range(n)])

    async def read_some(s):
        it = s.__aiter__()
        for _ in range(3):
            await it.__anext__()

    await asyncio.gather(*[read_some(s) for s in streams])
    return client, streams


def test_disconnects_abort_at_once_and_free_the_kv_cache(srv, key):
    aborted = 'servelm:request_success_total{finished_reason="abort"}'
    inflight = "servelm:num_requests_server_inflight"

    def engine_count(m):
        return m["servelm:num_requests_running"] + m["servelm:num_requests_waiting"]

    async def scenario():
        client, streams = await _open_streams(srv, key, 32)
        before = await asyncio.to_thread(srv.metrics)
        assert engine_count(before) == 32 and before[inflight] == 32
        await asyncio.gather(*[s.close() for s in streams[:16]])
        # Polled from a thread: the client's event loop must keep running to really close the sockets.
        # Within one second the server has aborted the 16 (closed their engine streams) ...
        half = await asyncio.to_thread(srv.poll_metrics, lambda m: m[inflight] == 16
                                       and m.get(aborted, 0) >= before.get(aborted, 0) + 16)
        # ... and the engine drops them before its next step (one decode step of 32 sequences can take
        # most of a second on a busy 2-core box, hence the longer deadline here).
        half_engine = await asyncio.to_thread(srv.poll_metrics, lambda m: engine_count(m) == 16, 5.0)
        await asyncio.gather(*[s.close() for s in streams[16:]])
        gone = await asyncio.to_thread(srv.poll_metrics, lambda m: m[inflight] == 0)
        done = await asyncio.to_thread(srv.poll_metrics, lambda m: engine_count(m) == 0
                                       and m['servelm:kv_cache_blocks{state="used"}'] == 0, 5.0)
        await client.close()
        return before, half, half_engine, gone, done

    before, half, half_engine, gone, done = asyncio.run(scenario())
    assert half[inflight] == 16 and half[aborted] - before.get(aborted, 0) == 16
    assert engine_count(half_engine) == 16
    assert gone[inflight] == 0
    assert engine_count(done) == 0
    assert done['servelm:kv_cache_blocks{state="used"}'] == 0
    assert done['servelm:kv_cache_blocks{state="free"}'] == done['servelm:kv_cache_blocks{state="total"}']


def test_non_streaming_disconnect_aborts(srv, key):
    before = srv.metrics().get('servelm:request_success_total{finished_reason="abort"}', 0)
    with pytest.raises(httpx.ReadTimeout):
        post(srv, "/v1/completions", {"prompt": "Go on:", "max_tokens": 2000, "ignore_eos": True}, key,
             timeout=httpx.Timeout(120, read=1.0))
    m = srv.poll_metrics(lambda m: m["servelm:num_requests_running"] == 0, timeout=2.0)
    assert m["servelm:num_requests_running"] == 0
    assert m['servelm:request_success_total{finished_reason="abort"}'] == before + 1


# ------------------------------------------------------------------ metrics, logs, secrets (last)
def test_metrics_cover_latency_tokens_and_requests(srv):
    m = srv.metrics()
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert m[f"servelm:{name}_count"] > 0
    assert m["servelm:prompt_tokens_total"] > 0 and m["servelm:generation_tokens_total"] > 0
    alice = key_label(srv.data_dir, "alice")
    assert m[f'servelm:requests_total{{endpoint="/v1/chat/completions",key="{alice}",status="200"}}'] > 0
    assert m['servelm:requests_total{endpoint="/v1/chat/completions",key="none",status="401"}'] > 0
    assert 0 <= m["servelm:prefix_cache_hit_rate"] <= 1 and "servelm:kv_cache_usage_perc" in m


def test_one_json_log_line_per_request(srv, key):
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "SECRET-PROMPT-MARKER", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {key}", "x-request-id": "log-check-1"}, timeout=60)
    assert r.status_code == 200
    rec = _poll_log(srv, "log-check-1")
    assert rec["status"] == 200 and rec["key_name"] == "alice" and rec["path"] == "/v1/completions"
    assert rec["prompt_tokens"] == r.json()["usage"]["prompt_tokens"] and rec["completion_tokens"] == 2
    assert rec["latency_ms"] > 0
    assert "SECRET-PROMPT-MARKER" not in srv.output()  # prompts are not logged without --log-prompts


def _poll_log(srv, rid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in srv.log_records() if r.get("request_id") == rid and r.get("msg") == "request"]
        if recs or time.monotonic() > deadline:
            assert len(recs) == 1
            return recs[0]


def test_keys_never_appear_in_logs_or_metrics(srv, admin_key):
    metrics_text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {admin_key}"}).text
    out = srv.output()
    assert len(srv.keys) >= 5
    for name, k in srv.keys.items():
        assert k not in out, name
        assert k not in metrics_text and f'key="{name}"' not in metrics_text, name
        assert k[len("sk-servelm-"):][:16] not in out
    # the admin key is printed once, in the first-start banner, and nowhere else
    banner_end = out.index("=" * 80, out.index("created an admin API key"))
    assert admin_key not in out[banner_end:] and admin_key not in metrics_text
