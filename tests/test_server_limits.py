"""Backpressure, timeouts, graceful shutdown and Redis-shared rate limits, on real servers."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from server_harness import Server, create_key, fleet

MODEL = "SmolLM2-135M-Instruct"


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------ Redis: replicas share one budget
@pytest.fixture(scope="module")
def pair():
    f = fleet()
    return f.get("redis-a"), f.get("redis-b")


def test_two_replicas_sharing_redis_admit_exactly_the_limit(pair):
    a, b = pair
    key = a.keys["shared-rpm"]  # 10 requests per minute
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}

    async def run():
        async with httpx.AsyncClient(timeout=120, headers=_auth(key)) as h:
            return await asyncio.gather(*[h.post((a if i % 2 else b).url + "/v1/completions", json=body)
                                          for i in range(40)])

    rs = asyncio.run(run())
    statuses = [r.status_code for r in rs]
    assert set(statuses) <= {200, 429}
    assert abs(statuses.count(200) - 10) <= 1
    for r in rs:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-limit-requests"] == "10"
            assert r.json()["error"]["type"] == "rate_limit_error"
    # both replicas did refuse some: the budget really is shared
    hosts = {str(r.request.url.port) for r in rs if r.status_code == 429}
    assert len(hosts) == 2


def test_replicas_share_token_budget_with_real_counts(pair):
    a, b = pair
    key = a.keys["shared-tpm"]  # 400 tokens per minute
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 100, "temperature": 0,
            "stop": ["."]}
    r1 = httpx.post(a.url + "/v1/completions", json=body, headers=_auth(key), timeout=60)
    assert r1.status_code == 200
    used = r1.json()["usage"]["total_tokens"]
    reserve = r1.json()["usage"]["prompt_tokens"] + 100
    assert used < reserve
    r2 = httpx.post(b.url + "/v1/completions", json=body, headers=_auth(key), timeout=60)
    assert int(r2.headers["x-ratelimit-remaining-tokens"]) == 400 - used - reserve
    r3 = httpx.post(a.url + "/v1/completions", json={**body, "max_tokens": 395}, headers=_auth(key), timeout=60)
    assert r3.status_code == 429 and r3.json()["error"]["code"] == "rate_limit_tokens"


def test_ready_reports_redis(pair):
    assert httpx.get(pair[0].url + "/ready").status_code == 200


def test_rate_limit_headers_are_exact_for_30_concurrent_requests_on_redis(pair):
    a, b = pair
    key = create_key(fleet().shared_dir, "exact-headers", rpm=40)

    async def run():
        async with httpx.AsyncClient(timeout=120, headers=_auth(key)) as h:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
            return await asyncio.gather(*[h.post((a, b)[i % 2].url + "/v1/completions", json=body)
                                          for i in range(30)])

    rs = asyncio.run(run())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in rs)
    # each admitted request read its own count from the increment that admitted it: 39, 38, ..., 10
    assert remaining == list(range(10, 40))


# ------------------------------------------------------------------ backpressure and timeouts
@pytest.fixture(scope="module")
def small():
    return fleet().get("small")  # max_num_seqs 2, max_queue 2, --no-auth, --log-prompts


def test_overload_is_refused_fast_with_retry_after_and_service_recovers(small):
    key = small.keys["user"]
    body = {"model": MODEL, "prompt": "Tell me about rivers.", "max_tokens": 16, "ignore_eos": True}

    async def one(h):
        r = await h.post("/v1/completions", json=body)
        return r, time.monotonic()

    async def run():
        async with httpx.AsyncClient(base_url=small.url, timeout=120, headers=_auth(key)) as h:
            return await asyncio.gather(*[one(h) for _ in range(24)])

    results = asyncio.run(run())
    ok = [(r, t) for r, t in results if r.status_code == 200]
    refused = [(r, t) for r, t in results if r.status_code == 503]
    assert len(ok) + len(refused) == 24, [r.text for r, _ in results]  # every request got an answer
    assert len(ok) >= 4 and len(refused) >= 1
    for r, _ in refused:
        err = r.json()["error"]
        assert err["code"] == "server_overloaded" and r.headers["retry-after"] == "1"
    # refusals come back while admitted requests are still generating
    assert max(t for _, t in refused) < max(t for _, t in ok)
    again = httpx.post(small.url + "/v1/completions", json={**body, "max_tokens": 2}, headers=_auth(key),
                       timeout=60)
    assert again.status_code == 200
    m = small.metrics()
    assert m['servelm:rejected_requests_total{reason="overloaded"}'] == len(refused)
    assert m["servelm:num_requests_server_inflight"] == 0


def test_request_timeout_stops_generation_with_504(pair):
    b = pair[1]  # runs with --request-timeout 5
    r = httpx.post(b.url + "/v1/completions", headers=_auth(b.keys["unlimited"]), timeout=120,
                   json={"model": MODEL, "prompt": "Go", "max_tokens": 1500, "ignore_eos": True})
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
    deadline = time.monotonic() + 5
    while b.metrics()["servelm:num_requests_running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.metrics()["servelm:num_requests_running"] == 0


def test_no_auth_is_announced_and_log_prompts_logs_prompts(small):
    assert "authentication is OFF" in small.output()
    r = httpx.post(small.url + "/v1/completions", json={"prompt": "PROMPT-LOG-MARKER", "max_tokens": 1},
                   headers={"x-request-id": "nolog-1"}, timeout=60)
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while True:
        recs = [x for x in small.log_records() if x.get("request_id") == "nolog-1"]
        if recs or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert recs[0]["prompt"] == "PROMPT-LOG-MARKER" and recs[0]["key_name"] == "anonymous"


def test_graceful_shutdown_finishes_in_flight_stream(tmp_path):
    # a server of its own: the shared ones must outlive this test (later modules use them)
    small = Server("shutdown", str(tmp_path), "--no-auth", "--no-guard", "--no-embeddings", "--no-rag").wait_ready()
    try:
        body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 40, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", small.url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            for line in lines:
                if line:
                    events.append(line)
                    break
            small.proc.send_signal(signal.SIGTERM)  # like `docker stop`
            for line in lines:
                if line:
                    events.append(line)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks) >= 30  # the whole answer arrived
        # uvicorn re-raises the SIGTERM it handled once shutdown is complete
        assert small.proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(small.url + "/health", timeout=2)
    finally:
        small.stop(signal.SIGKILL, 10)
