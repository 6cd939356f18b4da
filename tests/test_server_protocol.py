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
