"""RAG through the real server (embedded SmolLM2 + all-MiniLM-L6-v2): collections, uploads with
per-file errors, grounded answers whose citations point into the cited chunks, streaming, the chat
``rag`` field through the OpenAI SDK, "not in the documents", scopes and deletion."""
from __future__ import annotations

import json
import os
import tempfile

import httpx
import pytest

from server_harness import Server, bootstrap_key, create_key, openai_client
from servelm.rag.answer import NO_ANSWER
from servelm.rag.loaders import load_bytes

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "rag")
FILES = ("sample.pdf", "page.html", "notes.md")
LIMIT = 4000  # --rag-max-file-bytes: every fixture fits, the 5000-byte file does not
ASK = "When was the Fenwick lighthouse built?"
OFF_TOPIC = "Who won the 1998 FIFA World Cup final?"


def read(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def srv():
    d = tempfile.mkdtemp(prefix="servelm-rag-server-")
    # --no-guard: the input guard's injection classifier flags short system messages now and then
    # (tests/test_server_guard.py covers the guard); this module checks what RAG adds.
    s = Server("rag", d, "--no-embeddings", "--no-guard", "--log-prompts", "--max-num-seqs", "4",
               "--rag-max-file-bytes", str(LIMIT))
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def keys(srv):
    admin = bootstrap_key(srv)  # printed on first start; creating keys before would suppress it
    return {"admin": admin, "chat": create_key(srv.data_dir, "reader", "chat"),
            "rag": create_key(srv.data_dir, "librarian", "rag"),
            "embed": create_key(srv.data_dir, "embedder", "embeddings")}


def call(srv, method, path, key, headers=None, **kw):
    return httpx.request(method, srv.url + path, headers={"Authorization": f"Bearer {key}", **(headers or {})},
                         timeout=120, **kw)


@pytest.fixture(scope="module")
def kb(srv, keys):
    r = call(srv, "POST", "/v1/collections", keys["rag"], json={"name": "kb"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "kb" and r.json()["dim"] == 384
    files = [("file", (f, read(f))) for f in FILES]
    r = call(srv, "POST", "/v1/collections/kb/documents", keys["rag"], files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["ingested"], body["failed"]) == (3, 0)
    assert [d["status"] for d in body["data"]] == ["added"] * 3 and all(d["chunks"] >= 1 for d in body["data"])
    return "kb"


def test_collection_listed_and_described(srv, keys, kb):
    r = call(srv, "GET", "/v1/collections", keys["chat"])
    assert r.status_code == 200 and [c["name"] for c in r.json()["data"]] == ["kb"]
    info = call(srv, "GET", "/v1/collections/kb", keys["chat"]).json()
    assert info["num_documents"] == 3 and info["num_chunks"] >= 3
    docs = call(srv, "GET", "/v1/collections/kb/documents", keys["chat"]).json()["data"]
    assert sorted(d["source"] for d in docs) == sorted(FILES)
    again = call(srv, "POST", "/v1/collections", keys["rag"], json={"name": "kb"})
    assert again.status_code == 409 and "kb" in again.json()["error"]["message"]
    bad = call(srv, "POST", "/v1/collections", keys["rag"], json={"name": "no spaces/please"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"


def test_bad_uploads_get_their_own_error_while_good_ones_ingest(srv, keys, kb):
    files = [("file", ("corrupt.pdf", read("corrupt.pdf"))), ("file", ("encrypted.pdf", read("encrypted.pdf"))),
             ("file", ("empty.txt", b"  \n")), ("file", ("big.txt", b"word " * 1000)),
             ("file", ("tool.exe", b"MZ\x90\x00")), ("file", ("extra.md", b"# Extra\n\nOtters hold hands asleep."))]
    r = call(srv, "POST", "/v1/collections/kb/documents", keys["rag"], files=files)
    assert r.status_code == 207, r.text
    res = {d["source"]: d for d in r.json()["data"]}
    assert res["extra.md"]["status"] == "added"
    want = {"corrupt.pdf": (400, "corrupt_file", "corrupt PDF"), "encrypted.pdf": (400, "encrypted_file", "encrypted"),
            "empty.txt": (400, "empty_file", "empty"), "big.txt": (413, "file_too_large", str(LIMIT)),
            "tool.exe": (415, "unsupported_file_type", ".exe")}
    for name, (status, code, words) in want.items():
        err = res[name]["error"]
        assert (res[name]["status"], err["status"], err["code"]) == ("error", status, code), res[name]
        assert name in err["message"] and words in err["message"]
    # A single bad file: the request carries that file's status and an OpenAI error body.
    one = call(srv, "POST", "/v1/collections/kb/documents", keys["rag"], files=[("file", ("x.exe", b"MZ"))])
    assert one.status_code == 415 and one.json()["error"]["code"] == "unsupported_file_type"
    nofile = call(srv, "POST", "/v1/collections/kb/documents", keys["rag"], data={"note": "x"})
    assert nofile.status_code == 400 and "file" in nofile.json()["error"]["message"]
    missing = call(srv, "POST", "/v1/collections/nope/documents", keys["rag"], files=[("file", ("a.md", b"hi"))])
    assert missing.status_code == 404


def _check_sources(srv, key, sources):
    """Every cited snippet lies in its chunk, and the chunk is the document's text at [start, end)."""
    assert sources
    for s in sources:
        assert set(s) >= {"source", "page", "start", "end", "snippet", "score"}
        chunk = call(srv, "GET", f"/v1/collections/kb/chunks/{s['chunk_id']}", key).json()
        assert s["snippet"] and s["snippet"] in chunk["text"]
        page = next(p for p in load_bytes(s["source"], read(s["source"])) if p.page == s["page"])
        assert page.text[s["start"]:s["end"]] == chunk["text"]


def test_query_answers_with_sources_inside_the_cited_chunks(srv, keys, kb):
    r = call(srv, "POST", "/v1/rag/query", keys["chat"], json={"collection": "kb", "query": ASK, "k": 3,
                                                               "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["found"] is True and body["answer"].strip()
    assert any(s["source"] == "sample.pdf" and s["page"] == 1 and "1873" in s["snippet"] for s in body["sources"])
    _check_sources(srv, keys["chat"], body["sources"])


def test_streamed_query_sends_deltas_then_the_sourced_answer(srv, keys, kb):
    events = []
    with httpx.stream("POST", srv.url + "/v1/rag/query", headers={"Authorization": f"Bearer {keys['chat']}"},
                      json={"collection": "kb", "query": ASK, "max_tokens": 8, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    deltas = [json.loads(e)["delta"] for e in events[:-2]]
    assert deltas and "".join(deltas) == final["answer"] and final["found"] is True
    _check_sources(srv, keys["chat"], final["sources"])


def test_question_the_documents_do_not_answer(srv, keys, kb):
    body = call(srv, "POST", "/v1/rag/query", keys["chat"], json={"collection": "kb", "query": OFF_TOPIC}).json()
    assert (body["answer"], body["sources"], body["found"]) == (NO_ANSWER, [], False)
    client = openai_client(srv, keys["chat"])
    chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=8,
                                          messages=[{"role": "user", "content": OFF_TOPIC}],
                                          extra_body={"rag": {"collection": "kb"}})
    assert chat.choices[0].message.content == NO_ANSWER and chat.model_extra["sources"] == []


def test_chat_completion_with_rag_returns_sources_and_fences_context(srv, keys, kb):
    client = openai_client(srv, keys["chat"])
    system = "You are terse."
    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=8, extra_headers={"x-request-id": "rag-chat-1"},
        messages=[{"role": "system", "content": system}, {"role": "user", "content": ASK}],
        extra_body={"rag": {"collection": "kb", "k": 2}})
    assert chat.choices[0].message.content is not None
    _check_sources(srv, keys["chat"], chat.model_extra["sources"])
    # The prompt the model saw (--log-prompts): documents fenced in the user turn, not the system message.
    rec = next(r for r in srv.log_records() if r.get("request_id") == "rag-chat-1" and "prompt" in r)
    prompt = rec["prompt"]
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert system in prompt[0]["content"]  # the client's own system message is kept
    assert "1873" not in prompt[0]["content"] and "<document index=" not in prompt[0]["content"]
    assert "<context>" in prompt[-1]["content"] and "1873" in prompt[-1]["content"] and ASK in prompt[-1]["content"]

    chunks = list(client.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=8, stream=True, messages=[{"role": "user", "content": ASK}],
        extra_body={"rag": {"collection": "kb", "k": 2}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and not chunks[-1].choices
    _check_sources(srv, keys["chat"], chunks[-1].model_extra["sources"])


def test_chat_rag_with_a_strategy_keeps_the_strategys_framing_and_the_numbered_context(srv, keys, kb):
    from servelm.prompts.strategies import ChainOfThought, GROUNDING_INSTRUCTION

    system, example = "You are terse.", {"input": "When was the bridge opened?", "output": "In 1901 [1]."}
    for rid, strategy, extra in (("rag-few-shot", "few_shot", {"examples": [example]}),
                                 ("rag-cot", "chain_of_thought", {})):
        r = call(srv, "POST", "/v1/chat/completions", keys["chat"], headers={"x-request-id": rid},
                 json={"messages": [{"role": "system", "content": system}, {"role": "user", "content": ASK}],
                       "max_tokens": 8, "strategy": strategy, "rag": {"collection": "kb", "k": 2}, **extra})
        assert r.status_code == 200, r.text
        _check_sources(srv, keys["chat"], r.json()["sources"])
        prompt = next(x for x in srv.log_records() if x.get("request_id") == rid and "prompt" in x)["prompt"]
        # system: the client's own text, the grounding rule and the strategy's instructions; no documents
        assert system in prompt[0]["content"] and GROUNDING_INSTRUCTION in prompt[0]["content"]
        assert "<document index=" not in prompt[0]["content"] and "1873" not in prompt[0]["content"]
        if strategy == "chain_of_thought":
            assert ChainOfThought.instructions in prompt[0]["content"]
            assert [m["role"] for m in prompt] == ["system", "user"]
        else:  # the example turns come between the system message and the question
            assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
            assert example["input"] in prompt[1]["content"] and prompt[2]["content"] == example["output"]
        last = prompt[-1]["content"]  # numbered context, then the question, fenced
        assert '<document index="1"' in last and "1873" in last
        assert last.index("<context>") < last.index("<question>") and ASK in last[last.index("<question>"):]
        assert last.count("<question>") == 1


def test_chat_rag_with_unknown_collection_is_404(srv, keys, kb):
    r = call(srv, "POST", "/v1/chat/completions", keys["chat"],
             json={"messages": [{"role": "user", "content": ASK}], "max_tokens": 4, "rag": {"collection": "nope"}})
    assert r.status_code == 404 and r.json()["error"]["param"] == "rag.collection"


def test_scopes(srv, keys, kb):
    # chat may read and ask, but not change collections
    for method, path, kw in (("POST", "/v1/collections", {"json": {"name": "x"}}),
                             ("DELETE", "/v1/collections/kb", {}),
                             ("POST", "/v1/collections/kb/documents", {"files": [("file", ("a.md", b"hi"))]})):
        r = call(srv, method, path, keys["chat"], **kw)
        assert r.status_code == 403 and "'rag'" in r.json()["error"]["message"], (method, path)
    # a key with neither chat nor rag may not even read or ask
    for method, path, kw in (("GET", "/v1/collections", {}),
                             ("POST", "/v1/rag/query", {"json": {"collection": "kb", "query": ASK}})):
        assert call(srv, method, path, keys["embed"], **kw).status_code == 403
    assert call(srv, "GET", "/v1/collections", "sk-servelm-wrong").status_code == 401
    # rag alone may ask as well; admin may do everything
    assert call(srv, "GET", "/v1/collections/kb", keys["rag"]).status_code == 200
    assert call(srv, "POST", "/v1/collections", keys["admin"], json={"name": "scratch"}).status_code == 201


def test_delete_collection(srv, keys, kb):
    assert call(srv, "POST", "/v1/collections", keys["rag"], json={"name": "gone"}).status_code == 201
    r = call(srv, "POST", "/v1/collections/gone/documents", keys["rag"], files=[("file", ("n.md", read("notes.md")))])
    assert r.status_code == 200
    r = call(srv, "DELETE", "/v1/collections/gone", keys["rag"])
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert call(srv, "GET", "/v1/collections/gone", keys["rag"]).status_code == 404
    q = call(srv, "POST", "/v1/rag/query", keys["chat"], json={"collection": "gone", "query": ASK})
    assert q.status_code == 404 and q.json()["error"]["code"] == "collection_not_found"
    assert "gone" not in [c["name"] for c in call(srv, "GET", "/v1/collections", keys["chat"]).json()["data"]]
