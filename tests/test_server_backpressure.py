"""One request can never hurt another, against a real server: bounded queues with 503/429 and Retry-After
on embeddings, a wait bound and time budget for generation, 64-bit integers everywhere, /metrics behind
a key and without key names, and private database files (exact rate-limit headers on Redis:
tests/test_server_limits.py)."""
from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
import time

import httpx
import pytest

from server_harness import Server, bootstrap_key, create_key, key_label

WAIT_BOUND_S = 1.0
EMBEDDING_QUEUE = 4
PER_KEY = 3
BIG = 2**63


@pytest.fixture(scope="module")
def srv():
    """Auth, guard and RAG on (every database file exists); one engine slot, a short wait bound and small
    per-key and embedding queues so the bounds are reached with few requests."""
    root = tempfile.mkdtemp(prefix="servelm-backpressure-tests-")
    s = Server("backpressure", root, "--max-num-seqs", "1", "--max-queue", "16",
               "--max-queue-wait-s", str(WAIT_BOUND_S), "--embedding-max-queue", str(EMBEDDING_QUEUE),
               "--max-inflight-per-key", str(PER_KEY))
    yield s.wait_ready()
    s.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def admin(srv):
    return bootstrap_key(srv)


def _auth(key):
    return {"Authorization": f"Bearer {key}"} if key else {}


def _refusal(r: httpx.Response, status: int, codes: tuple[str, ...]) -> None:
    assert r.status_code == status, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] in codes and err["message"]


# ------------------------------------------------------------------ embeddings: bounded, per key and overall
def test_concurrent_large_embedding_requests_are_bounded(srv):
    keys = [create_key(srv.data_dir, f"embedder-{i}", "embeddings") for i in range(2)]
    body = {"input": [f"passage {i}: " + "the quick brown fox jumps over the lazy dog " * 12 for i in range(64)]}

    async def one(h, key):
        t = time.monotonic()
        r = await h.post("/v1/embeddings", json=body, headers=_auth(key))
        return r, time.monotonic() - t

    async def burst():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=srv.url, timeout=300, limits=limits) as h:
            return await asyncio.gather(*[one(h, keys[i % 2]) for i in range(200)])

    results = asyncio.run(burst())
    with httpx.Client(base_url=srv.url, timeout=300) as h:
        t = time.monotonic()
        assert h.post("/v1/embeddings", json=body, headers=_auth(keys[0])).status_code == 200
        alone = time.monotonic() - t
    ok = [r for r, _ in results if r.status_code == 200]
    per_key = [r for r, _ in results if r.status_code == 429]  # over the key's share of the queue
    overall = [r for r, _ in results if r.status_code == 503]  # queue full, or the wait would pass the bound
    assert len(ok) + len(per_key) + len(overall) == 200
    # the queue holds 1 working + 4 waiting: from a burst this size most requests are refused at once
    assert 1 <= len(ok) and len(per_key) + len(overall) >= 150
    for r in per_key:
        _refusal(r, 429, ("too_many_concurrent_requests",))
    for r in overall:
        _refusal(r, 503, ("server_overloaded", "queue_timeout"))
    assert all(len(r.json()["data"]) == 64 for r in ok)
    # Nobody queues behind 199 others: the slowest answer took the wait bound plus a few requests'
    # service (unbounded, the last of 200 such requests waited minutes).
    assert max(took for _, took in results) < WAIT_BOUND_S + 6 * alone + 30


# ------------------------------------------------------------------ generation: a time budget that fits
def test_a_request_that_cannot_start_within_the_wait_bound_is_refused_at_once(srv, admin):
    key = create_key(srv.data_dir, "chatter", "chat")
    body = {"messages": [{"role": "user", "content": "Count to one hundred."}], "max_tokens": 96,
            "ignore_eos": True, "temperature": 0}
    # One served request teaches the server how long one takes (well over the 1 s wait bound here).
    assert httpx.post(srv.url + "/v1/chat/completions", json=body, headers=_auth(key), timeout=300).status_code == 200

    async def one(h):
        r = await h.post("/v1/chat/completions", json=body)
        return r, time.monotonic()

    async def burst():
        async with httpx.AsyncClient(base_url=srv.url, timeout=300, headers=_auth(key)) as h:
            return await asyncio.gather(*[one(h) for _ in range(6)])

    results = asyncio.run(burst())
    served = [(r, at) for r, at in results if r.status_code == 200]
    refused = [(r, at) for r, at in results if r.status_code != 200]
    assert served and refused
    for r, _ in refused:
        _refusal(r, 503, ("server_overloaded",))
        assert "wait" in r.json()["error"]["message"]
    # refused at the door, not after waiting: every refusal came back before the first answer
    assert max(at for _, at in refused) < min(at for _, at in served)


# ------------------------------------------------------------------ integers beyond 64 bits: always a 4xx
BODIES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 1},
    "/v1/responses": {"input": "Hi", "max_output_tokens": 1},
    "/v1/embeddings": {"input": "Hi"},
    "/generate": {"prompt": "Hi", "max_tokens": 1},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1]},
    "/v1/admin/keys": {"name": "int-bounds"},
    "/v1/rag/query": {"collection": "ints", "query": "What?"},
    "/v1/collections": {"name": "ints"},
}


def _resolve(spec, node):
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _integer_fields(spec, node, path=(), depth=0):
    """Yields (path, wrap) for each integer a body can carry: ``wrap(v)`` is the JSON that puts ``v`` there
    (``[v]`` for an array of integers)."""
    node = _resolve(spec, node)
    if depth > 4:
        return
    for alt in node.get("anyOf", []) + node.get("oneOf", []) + node.get("allOf", []):
        yield from _integer_fields(spec, alt, path, depth + 1)
    if node.get("type") == "integer":
        yield path, lambda v: v
    if node.get("type") == "array" and "items" in node:
        for p, wrap in _integer_fields(spec, node["items"], (), depth + 1):
            if p == ():
                yield path, lambda v, w=wrap: [w(v)]
    for name, sub in (node.get("properties") or {}).items():
        yield from _integer_fields(spec, sub, path + (name,), depth + 1)


def _put(body: dict, path: tuple, value) -> dict:
    out = dict(body)
    if len(path) == 1:
        out[path[0]] = value
    else:
        inner = out.get(path[0]) if isinstance(out.get(path[0]), dict) else {}
        if path[0] == "rag":
            inner = {"collection": "ints", **inner}
        out[path[0]] = _put(inner, path[1:], value)
    return out


def test_every_integer_field_and_parameter_at_2_to_the_63_gets_a_4xx(srv, admin):
    spec = httpx.get(srv.url + "/openapi.json").json()
    tried = 0
    with httpx.Client(base_url=srv.url, timeout=120, headers=_auth(admin)) as h:
        for route, methods in spec["paths"].items():
            for method, op in methods.items():
                fields = []
                body = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
                if body is not None:
                    fields = sorted({(p, w) for p, w in _integer_fields(spec, body) if p}, key=lambda f: f[0])
                params = [p for p in op.get("parameters", []) if _resolve(spec, p.get("schema", {})).get("type")
                          == "integer" or any(a.get("type") == "integer" for a in p.get("schema", {}).get("anyOf", []))]
                for value in (BIG, -BIG - 1, -BIG):
                    for path, wrap in fields:
                        r = h.request(method, route.replace("{name}", "ints"), json=_put(BODIES.get(route, {}), path,
                                                                                          wrap(value)))
                        tried += 1
                        assert r.status_code < 500, (route, path, value, r.text)
                        if value != -BIG:  # -2**63 is a 64-bit integer: fields that allow it (seed) take it
                            assert 400 <= r.status_code < 500 and r.json()["error"]["message"], (route, path, value)
                    for p in params:
                        url = route.replace("{name}", "ints").replace("{review_id}", "x")
                        if p["in"] == "path":
                            url = url.replace("{" + p["name"] + "}", str(value))
                            r = h.request(method, url)
                        else:
                            r = h.request(method, url, params={p["name"]: str(value)})
                        tried += 1
                        assert 400 <= r.status_code < 500, (route, p["name"], value, r.text)
    assert tried > 100  # the walk found the integer fields (seed, max_tokens, n, stop_token_ids, offset, ...)


def test_the_cli_refuses_a_limit_beyond_64_bits(srv):
    from server_harness import cli

    r = cli("create", "--name", "huge", "--rpm", str(BIG), data_dir=srv.data_dir)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "rpm and tpm must be between" in r.stderr


# ------------------------------------------------------------------ /metrics: behind a key, no key names
def test_metrics_need_a_metrics_key_and_never_name_keys(srv):
    chat = create_key(srv.data_dir, "alice-private-name", "chat")
    scraper = create_key(srv.data_dir, "scraper", "metrics")
    assert httpx.post(srv.url + "/v1/chat/completions", headers=_auth(chat), timeout=300,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).status_code == 200
    none = httpx.get(srv.url + "/metrics")
    assert none.status_code == 401 and none.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(srv.url + "/metrics", headers=_auth(chat)).status_code == 403
    r = httpx.get(srv.url + "/metrics", headers=_auth(scraper))
    assert r.status_code == 200
    assert "alice-private-name" not in r.text and "scraper" not in r.text
    assert f'key="{key_label(srv.data_dir, "alice-private-name")}"' in r.text


# ------------------------------------------------------------------ every database file is private
def test_every_database_file_and_its_wal_and_shm_are_0600(srv, admin):
    h = _auth(admin)
    assert httpx.post(srv.url + "/v1/collections", json={"name": "private"}, headers=h).status_code == 201
    r = httpx.post(srv.url + "/v1/collections/private/documents", headers=h, timeout=300,
                   files={"file": ("notes.txt", b"Servelm keeps its database files private.\n" * 20)})
    assert r.status_code == 200, r.text
    found = []
    for folder, _, files in os.walk(srv.data_dir):
        for name in files:
            if ".sqlite" in name:
                found.append(name)
                mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
                assert mode == 0o600, (name, oct(mode))
    for db in ("keys.sqlite3", "reviews.sqlite3", "store.sqlite", "embeddings.sqlite"):
        assert db in found and f"{db}-wal" in found, (db, found)
