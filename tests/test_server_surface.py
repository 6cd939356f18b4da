"""The server's surface beyond chat: embeddings by token ids and their length limit, CORS, vLLM's
/tokenize, /detokenize, /version and vllm:* metrics, who may list models, and a taken port.

All through the suite's main server (embedded SmolLM2, all-MiniLM-L6-v2, auth and guard on)."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

import servelm
from server_harness import ENV, ROOT, create_key

MODEL = "SmolLM2-135M-Instruct"
EMB = "all-MiniLM-L6-v2"
TEXT = "The quick brown fox jumps over the lazy dog."
LONG = "word " * 600  # 602 MiniLM tokens with [CLS]/[SEP]; the model reads 256


@pytest.fixture(scope="module")
def key(srv):
    return create_key(srv.data_dir, "surface")


@pytest.fixture(scope="module")
def minilm():
    """The embedding model's own tokenizer, as a client would load it."""
    from transformers import AutoTokenizer

    from servelm.server.settings import default_embedding_model

    return AutoTokenizer.from_pretrained(default_embedding_model())


def post(srv, path, body, key, **headers):
    return httpx.post(srv.url + path, json=body, timeout=120, headers={"Authorization": f"Bearer {key}", **headers})


def embed(srv, key, **body) -> httpx.Response:
    return post(srv, "/v1/embeddings", body, key)


def vectors(r: httpx.Response) -> list[list[float]]:
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


def close(a, b, tol=1e-5) -> bool:
    return max(abs(x - y) for x, y in zip(a, b)) < tol


def error(r: httpx.Response, status: int, param=None, code=None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["code"] == code, err
    return err["message"]


# ------------------------------------------------------------------ embeddings
def test_embedding_token_ids_give_the_texts_vector(srv, key, minilm):
    bare = minilm(TEXT, add_special_tokens=False)["input_ids"]
    full = minilm(TEXT)["input_ids"]  # with [CLS] ... [SEP]: taken as they are, not wrapped twice
    other = minilm("cats", add_special_tokens=False)["input_ids"]
    text_vec, cats_vec = vectors(embed(srv, key, input=[TEXT, "cats"]))
    r = embed(srv, key, input=bare)  # one list of ids = one input (OpenAI's "array of integers")
    assert close(vectors(r)[0], text_vec) and r.json()["usage"]["prompt_tokens"] == len(full)
    a, b, c = vectors(embed(srv, key, input=[bare, full, other]))
    assert close(a, text_vec) and close(b, text_vec) and close(c, cats_vec)
    msg = error(embed(srv, key, input=[[15339, 1917], [100277]]), 400, "input", "invalid_value")
    assert "input[1]" in msg and "100277" in msg and "check_embedding_ctx_length=False" in msg
    error(embed(srv, key, input=[True, 2]), 400, "input", "invalid_value")
    error(embed(srv, key, input=[[]]), 400, "input", "invalid_value")
    error(embed(srv, key, input=""), 400, "input", "invalid_value")


def test_long_embedding_input_is_refused_unless_truncation_is_asked(srv, key):
    msg = error(embed(srv, key, input=["short", LONG]), 400, "input", "context_length_exceeded")
    assert "input[1]" in msg and "602" in msg and "256" in msg and "truncate_prompt_tokens" in msg
    first = embed(srv, key, input=LONG + "zebra giraffe elephant", truncate=True)  # TEI: keeps the first tokens
    last = embed(srv, key, input="zebra giraffe elephant " + LONG, truncate_prompt_tokens=-1)  # vLLM: the last
    assert first.json()["usage"]["prompt_tokens"] == last.json()["usage"]["prompt_tokens"] == 256
    assert close(vectors(first)[0], vectors(last)[0])  # both read [CLS] + 254 x "word" + [SEP]
    r = embed(srv, key, input=LONG, truncate_prompt_tokens=10)
    assert r.json()["usage"]["prompt_tokens"] == 10
    error(embed(srv, key, input=LONG, truncate_prompt_tokens=300), 400, "truncate_prompt_tokens", "invalid_value")
    r = embed(srv, key, input="x", encoding_format=None)
    assert isinstance(vectors(r)[0][0], float)
    assert "Token indices sequence length" not in srv.output()  # logs stay JSON lines


# ------------------------------------------------------------------ CORS
def test_cors_preflight_and_cross_origin_get(srv, key):
    origin = "http://example.com"
    r = httpx.options(srv.url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})  # no key: preflights carry none
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.get(srv.url + "/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = httpx.get(srv.url + "/v1/models", headers={"Origin": origin})  # a browser can read the 401 too
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"


# ------------------------------------------------------------------ vLLM's extra routes
def test_tokenize_detokenize_and_version(srv, key, tokenizer):
    r = post(srv, "/tokenize", {"model": MODEL, "prompt": TEXT, "return_token_strs": True}, key)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tokenizer.encode(TEXT) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 8192 and len(body["token_strs"]) == body["count"]
    r = post(srv, "/detokenize", {"tokens": body["tokens"]}, key)
    assert r.status_code == 200 and r.json() == {"prompt": TEXT}
    # messages count exactly what a chat completion is charged for
    msgs = [{"role": "user", "content": "Name three colors."}]
    count = post(srv, "/tokenize", {"messages": msgs}, key).json()["count"]
    chat = post(srv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1}, key).json()
    assert count == chat["usage"]["prompt_tokens"]
    bare = post(srv, "/tokenize", {"messages": msgs, "add_generation_prompt": False}, key).json()["count"]
    assert 0 < bare < count
    error(post(srv, "/detokenize", {"tokens": [1, 10**7]}, key), 400, "tokens", "invalid_value")
    error(post(srv, "/tokenize", {"prompt": "x", "messages": msgs}, key), 400, None, "invalid_value")
    error(post(srv, "/tokenize", {"model": "gpt-4", "prompt": "x"}, key), 404, "model", "model_not_found")
    assert httpx.post(srv.url + "/tokenize", json={"prompt": "x"}).status_code == 401
    emb_only = create_key(srv.data_dir, "surface-embed-only", scopes="embeddings")
    error(post(srv, "/tokenize", {"prompt": "x"}, emb_only), 403, None, "insufficient_scope")
    assert httpx.get(srv.url + "/version").json() == {"version": servelm.__version__}


def test_any_valid_key_lists_models(srv):
    chat_only = create_key(srv.data_dir, "surface-chat-only", scopes="chat")
    r = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {chat_only}"})
    assert r.status_code == 200 and {m["id"] for m in r.json()["data"]} == {MODEL, EMB}


# ------------------------------------------------------------------ metrics under vLLM's names
def test_vllm_metric_names_mirror_servelm_ones(srv, key):
    assert post(srv, "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, key).status_code == 200
    m = srv.metrics()
    label = f'{{model_name="{MODEL}"}}'
    for name in ("prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
                 "e2e_request_latency_seconds_count", "num_requests_running", "num_requests_waiting",
                 "kv_cache_usage_perc", "num_preemptions_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total"):
        assert m[f"vllm:{name}{label}"] == m[f"servelm:{name}"], name
    assert m[f"vllm:prompt_tokens_total{label}"] > 0 and 0 <= m[f"vllm:kv_cache_usage_perc{label}"] <= 1
    finished = f'vllm:request_success_total{{finished_reason="length",model_name="{MODEL}"}}'
    assert m[finished] == m['servelm:request_success_total{finished_reason="length"}'] >= 1


# ------------------------------------------------------------------ startup
def test_a_taken_port_fails_before_the_model_loads(srv):
    p = subprocess.run([sys.executable, "-m", "servelm.server", "serve", "--port", str(srv.port), "--no-auth",
                        "--data-dir", srv.data_dir], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert p.returncode != 0
    assert f"cannot listen on 127.0.0.1:{srv.port}" in p.stderr and "already in use" in p.stderr.lower()
    assert '"ready"' not in p.stderr + p.stdout
