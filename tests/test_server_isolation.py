"""One request can never hurt another, against a real server: token ids outside the vocabulary get a 400
naming the field before they reach the engine, a request that fails inside the engine step fails alone
while its batch-mates finish token-exactly, and while the circuit breaker is open /ready is 503 and
answers are 503 with Retry-After, not a 200 canned text."""
from __future__ import annotations

import asyncio
import json
import tempfile

import httpx
import pytest

from server_harness import Server

VOCAB = 49152  # the embedded SmolLM2's vocabulary size
PROMPTS = ["Count: one, two,", "The capital of France is", "def add(a, b):", "Colours of the rainbow:",
           "Once upon a time", "The three primary colours are"]


@pytest.fixture(scope="module")
def env():
    """A server of its own: fault injection on (the x-servelm-fault header and the engine switch), no auth."""
    root = tempfile.mkdtemp(prefix="servelm-isolation-")
    s = Server("isolation", root, "--no-auth", "--no-guard", "--no-embeddings", "--no-rag",
               "--enable-fault-injection", "--max-num-seqs", "16")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


async def _stream(client: httpx.AsyncClient, prompt: str, headers: dict | None = None) -> tuple[str, dict | None]:
    """Returns (the streamed text, the error event or None) of a greedy completions stream."""
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True}
    text, error = "", None
    async with client.stream("POST", "/v1/completions", json=body, headers=headers or {}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
            else:
                text += event["choices"][0]["text"]
    return text, error


BAD = [  # (route, body, the field the 400 must name)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "min_tokens": 4,
                              "stop_token_ids": [1_000_000], "max_tokens": 8}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {str(VOCAB): 5}, "max_tokens": 8}, "logit_bias"),
    ("/v1/completions", {"prompt": [1, VOCAB], "max_tokens": 8}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "min_tokens": 2,
                              "stop_token_ids": [-100000], "max_tokens": 8}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "Hi", "allowed_token_ids": [5, VOCAB], "max_tokens": 8}, "allowed_token_ids"),
]


def test_bad_token_ids_get_a_400_and_a_failing_request_fails_alone(env):
    async def run(with_bad: bool):
        async with httpx.AsyncClient(base_url=env.url, timeout=300) as c:
            streams = [_stream(c, p) for p in PROMPTS]
            if not with_bad:
                return await asyncio.gather(*streams), [], None
            bad = [c.post(route, json=body) for route, body, _ in BAD]
            faulty = _stream(c, "Hello there", {"x-servelm-fault": "sample:3"})
            results = await asyncio.gather(*streams, faulty, *bad)
            return results[:len(PROMPTS)], results[len(PROMPTS) + 1:], results[len(PROMPTS)]

    alone, _, _ = asyncio.run(run(False))
    mixed, bad, (fault_text, fault_error) = asyncio.run(run(True))
    for r, (route, _, param) in zip(bad, BAD):
        assert r.status_code == 400, (route, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert fault_error is not None and fault_error["code"] == "request_failed", fault_error
    assert fault_text  # it streamed its first tokens, then failed inside the step
    assert [t for t, _ in mixed] == [t for t, _ in alone]  # the six are token-exact
    assert all(e is None for _, e in mixed)
    assert httpx.get(env.url + "/ready").status_code == 200  # nothing of this counted against the breaker
    assert env.metrics()['servelm_circuit_breaker_open{name="engine"}'] == 0.0
    assert httpx.get(env.url + "/health").json() == {"status": "ok"}


def test_a_request_failing_in_the_step_unstreamed_is_a_500_naming_the_failure(env):
    r = httpx.post(env.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 8}, headers={"x-servelm-fault": "sample"},
                   timeout=120)
    assert r.status_code == 500 and r.json()["error"]["code"] == "request_failed", r.text
    assert "fault injected" in r.json()["error"]["message"]
    assert httpx.post(env.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                      timeout=120).status_code == 200


# Leaves the breaker open for the rest of this server's life (30 s): keep it the module's last test.
def test_while_the_breaker_is_open_ready_is_503_and_answers_are_503(env):
    u = env.url
    assert httpx.post(u + "/v1/admin/fault", json={"engine": "stop"}).json() == {"engine": "stopped"}
    try:
        for _ in range(3):  # three engine failures open the breaker; none gets a canned 200
            r = httpx.post(u + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
    finally:
        assert httpx.post(u + "/v1/admin/fault", json={"engine": "start"}).json() == {"engine": "running"}
    r = httpx.get(u + "/ready")
    assert r.status_code == 503 and "circuit breaker is open" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert httpx.get(u + "/health").status_code == 200  # liveness: a restart would not help
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for route, body in [("/v1/chat/completions", chat), ("/v1/chat/completions", {**chat, "stream": True}),
                        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                        ("/generate", {"prompt": "Hi", "max_tokens": 2}),
                        ("/v1/responses", {"input": "Hi", "max_output_tokens": 16})]:
        r = httpx.post(u + route, json=body, timeout=60)
        assert r.status_code == 503, (route, r.status_code, r.text)
        assert r.json()["error"]["code"] == "circuit_open" and int(r.headers["retry-after"]) >= 1
        assert "x-servelm-fallback" not in r.headers
    assert env.metrics()['servelm_circuit_breaker_open{name="engine"}'] == 1.0


def test_disabled_fault_route_is_404_before_key_or_body_are_checked():
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from servelm.server.errors import install_handlers
    from servelm.server.routes import review
    from servelm.server.settings import ServerSettings

    app = FastAPI()
    install_handlers(app)
    app.include_router(review.router)
    app.state.servelm = SimpleNamespace(settings=ServerSettings(enable_fault_injection=False))
    client = TestClient(app)
    for body in ({}, {"engine": "stop"}, {"engine": "explode"}):  # no key, then a bad body: still 404
        r = client.post("/v1/admin/fault", json=body)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", r.text
