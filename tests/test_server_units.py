"""Server parts that need no model: settings, key store, limiter, logs, pipeline, CLI."""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3

import pytest
from pydantic import ValidationError

from pydantic import BaseModel

from server_harness import cli
from servelm.server.errors import APIError
from servelm.server.keys import KeyStore, hash_key
from servelm.server.logs import JsonFormatter
from servelm.serving.pipeline import ChatTurn, RequestPipeline
from servelm.server.rate_limit import RateLimiter
from servelm.server.schemas import RagOptions
from servelm.server.settings import ServerSettings


def test_settings_precedence_flags_over_env_over_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "servelm.yaml"
    cfg.write_text("port: 9001\nmax_queue: 3\nhost: 0.0.0.0\n")
    monkeypatch.setenv("SERVELM_MAX_QUEUE", "5")
    monkeypatch.setenv("SERVELM_NO_AUTH", "true")
    s = ServerSettings.load(str(cfg), host="127.0.0.2")
    assert (s.port, s.max_queue, s.host, s.no_auth) == (9001, 5, "127.0.0.2", True)


def test_settings_reject_typos_and_bad_values(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("prot: 9001\n")
    with pytest.raises(ValidationError, match="prot"):
        ServerSettings.load(str(cfg))
    with pytest.raises(ValidationError, match="port"):
        ServerSettings(port=70000)
    with pytest.raises(FileNotFoundError):
        ServerSettings.load(str(tmp_path / "missing.yaml"))


def test_serve_flags_reach_the_engine_settings(tmp_path):
    import argparse

    from servelm.server.cli import _settings, register

    fields = tuple(ServerSettings.model_fields)

    calib = tmp_path / "calib.txt"
    calib.write_text("Some calibration text.")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--quantization", "nf4-dq", "--quant-calibration", str(calib),
                              "--tensor-parallel-size", "2", "--max-queue-wait-s", "2.5", "--no-metrics-auth"])
    s = _settings(args, fields)
    assert (s.quantization, s.quant_calibration, s.tensor_parallel_size) == ("nf4-dq", str(calib), 2)
    # settings without a hand-written flag get one from their declaration in settings.py
    assert (s.max_queue_wait_s, s.metrics_auth, s.queue_wait_bound_s) == (2.5, False, 2.5)
    default = _settings(parser.parse_args(["serve"]), fields)
    assert default.quant_calibration is None and default.metrics_auth is True
    assert default.queue_wait_bound_s == default.request_timeout_s


def test_key_store_keeps_only_hashes(tmp_path):
    store = KeyStore(str(tmp_path / "k.sqlite3"))
    key, rec = store.create("bob", "chat,models", rpm=7, tpm=100)
    assert key.startswith("sk-servelm-") and len(key) > 40
    assert store.verify(key).name == "bob" and store.verify(key + "x") is None
    assert rec.allows("chat") and not rec.allows("embeddings") and (rec.rpm, rec.tpm) == (7, 100)
    raw = sqlite3.connect(tmp_path / "k.sqlite3").execute("SELECT * FROM api_keys").fetchall()
    assert key not in repr(raw) and hash_key(key) in repr(raw)
    assert store.revoke("bob") and store.verify(key) is None and not store.revoke("bob")
    with pytest.raises(ValueError, match="scope"):
        store.create("eve", "chat,root")
    store.create("carol")
    with pytest.raises(ValueError, match="exists"):
        store.create("carol")


def test_keys_cli_create_and_list(tmp_path):
    d = str(tmp_path)
    r = cli("create", "--name", "ci", "--scopes", "chat", "--rpm", "3", "--json", data_dir=d)
    rec = json.loads(r.stdout)
    assert r.returncode == 0 and rec["rpm"] == 3 and rec["key"].startswith("sk-servelm-")
    listing = cli("list", data_dir=d).stdout
    assert "ci" in listing and rec["key"] not in listing


def test_memory_limiter_refunds_refused_and_corrects_reservations():
    async def run():
        rl = RateLimiter(None)
        res = await rl.acquire("k", rpm=0, tpm=100, tokens=60)
        with pytest.raises(APIError) as e:
            await rl.acquire("k", rpm=0, tpm=100, tokens=60)
        assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
        await rl.settle(res, 10)  # only 10 were used: 50 come back
        again = await rl.acquire("k", rpm=0, tpm=100, tokens=60)
        assert again.headers["x-ratelimit-remaining-tokens"] == "30"
        for _ in range(2):
            await rl.acquire("r", rpm=2, tpm=0, tokens=0)
        with pytest.raises(APIError) as e:
            await rl.acquire("r", rpm=2, tpm=0, tokens=0)
        assert e.value.headers["x-ratelimit-remaining-requests"] == "0"

    asyncio.run(run())


def test_json_log_lines():
    rec = logging.LogRecord("servelm.access", logging.INFO, "", 0, "request", (), None)
    rec.request_id, rec.status = "abc", 200
    line = json.loads(JsonFormatter().format(rec))
    assert line["msg"] == "request" and line["request_id"] == "abc" and line["status"] == 200 and "ts" in line


def test_pipeline_refuses_extensions_nobody_handles_and_runs_stages():
    async def run():
        turn = ChatTurn([{"role": "user", "content": "hi"}], None, RagOptions(collection="docs"), "k", "r1")
        with pytest.raises(APIError) as e:
            await RequestPipeline().before(turn)
        assert e.value.status == 400 and e.value.param == "rag"

        async def add_context(t: ChatTurn):
            t.messages.insert(0, {"role": "system", "content": f"context from {t.rag.collection}"})

        async def shout(t, text):
            return text.upper()

        p = RequestPipeline(pre=[add_context], post=[shout], features=frozenset({"rag"}))
        await p.before(turn)
        assert turn.messages[0]["content"] == "context from docs"
        assert await p.after(turn, "ok") == "OK"

    asyncio.run(run())


class EchoBody(BaseModel):
    text: str


def test_body_limit_applies_to_chunked_bodies_too():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from servelm.server.errors import install_handlers
    from servelm.server.middleware import RequestMiddleware

    app = FastAPI()
    install_handlers(app)

    @app.post("/echo")
    async def echo(body: EchoBody) -> dict:
        return {"n": len(body.text)}

    app.add_middleware(RequestMiddleware, max_body_bytes=1024, get_metrics=lambda: None)
    client = TestClient(app)
    assert client.post("/echo", json={"text": "ok"}).json() == {"n": 2}
    big = b'{"text": "' + b"x" * 5000 + b'"}'
    r = client.post("/echo", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunks = (big[i:i + 500] for i in range(0, len(big), 500))  # no Content-Length: chunked
    r = client.post("/echo", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "x-request-id" in r.headers


def test_ingest_and_server_keep_collections_in_one_place(tmp_path, monkeypatch):
    from servelm.rag import cli as ingest_cli
    from servelm.rag.config import RagConfig

    monkeypatch.setenv("SERVELM_DATA_DIR", str(tmp_path / "default"))
    assert ServerSettings().rag_dir == str(tmp_path / "default" / "rag") == RagConfig().resolved().data_dir
    doc = tmp_path / "note.md"
    doc.write_text("# Note\n\nThe lighthouse was built in 1873.\n")
    assert ingest_cli.main([str(doc), "--collection", "kb", "--data-dir", str(tmp_path / "d"), "--no-progress"]) == 0
    served = ServerSettings(data_dir=str(tmp_path / "d")).rag_dir  # what `servelm serve --data-dir d` opens
    assert (tmp_path / "d" / "rag" / "store.sqlite").exists() and served == str(tmp_path / "d" / "rag")


# ------------------------------------------------------------------ tokenizer details the API exposes
def _hf_tokenizer(model, decoder=None, template: str | None = None):
    """A real transformers fast tokenizer over a tiny vocabulary built with the tokenizers library."""
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    backend = Backend(model)
    if decoder is not None:
        backend.decoder = decoder
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>")
    hf.chat_template = template
    return hf


def test_token_bytes_of_sentencepiece_byte_fallback_tokens():
    from tokenizers import decoders, models

    from servelm.engine.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "\u2581hi": 1, "<0xF0>": 2, "<0x9F>": 3, "<0x8C>": 4, "<0x8D>": 5}
    tok = Tokenizer(_hf_tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True),
                                  decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                                     decoders.Fuse()])))
    assert tok.decode([2]) == "\ufffd"  # alone, a byte of the emoji is not text ...
    assert [tok.token_bytes(i) for i in range(1, 6)] == [b" hi", b"\xf0", b"\x9f", b"\x8c", b"\x8d"]
    assert b"".join(tok.token_bytes(i) for i in range(2, 6)).decode() == tok.decode([2, 3, 4, 5]) == "\U0001F30D"


def test_tools_reach_a_chat_template_that_renders_them():
    from tokenizers import models

    from servelm.engine.tokenizer import Tokenizer
    from servelm.server.routes.chat import render_prompt

    template = ("{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    tok = Tokenizer(_hf_tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"), template=template))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.renders_tools and render_prompt(tok, msgs, tools) == "TOOLS: get_weatheruser: hi\n"
    assert render_prompt(tok, msgs) == "user: hi\n"


def test_presidio_loads_only_where_pii_filtering_runs():
    """Start-up pays for Presidio and spaCy only when some policy runs the pii scanner (docs/performance.md)."""
    import subprocess
    import sys

    from server_harness import ENV, ROOT

    code = ("import sys; import servelm.server.app; from servelm.safety import Guard\n"
            "g = Guard.from_policy({'scanners': {'pii': {'enabled': False}}}); g.warmup()\n"
            "d = g.check_output('Mail anna.lee@mail.org'); assert d.text.endswith('mail.org'), d\n"
            "print(sorted(m for m in ('presidio_analyzer', 'spacy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_admission_refuses_at_once_what_could_not_start_in_time():
    from servelm.server.admission import Admission
    from servelm.server.errors import APIError

    a = Admission(max_running=2, max_queue=10, max_wait_s=5.0)
    a.service.observe(4.0)  # recent requests took 4 s to serve; with 2 slots one frees every 2 s
    for _ in range(4):
        a.enter()  # 2 start at once, then waits of about 2 and 4 s: within the 5 s bound
    with pytest.raises(APIError) as e:
        a.enter()  # would wait about 6 s
    assert e.value.status == 503 and e.value.code == "server_overloaded" and e.value.headers["Retry-After"] == "1"
    assert a.inflight == 4
    # with no explicit bound, a request that would start but not finish within the request timeout is refused
    b = Admission(max_running=2, max_queue=10, timeout_s=5.0)
    b.service.observe(4.0)
    b.enter(), b.enter()
    with pytest.raises(APIError) as e:
        b.enter()  # about 2 s of wait + 4 s of service > 5 s
    assert "request timeout" in e.value.message and e.value.headers["Retry-After"] == "1"


def test_a_lane_bounds_each_key_and_everyone():
    from servelm.server.admission import Lane
    from servelm.server.errors import APIError

    async def scenario():
        lane = Lane("embedding", running=1, max_queue=2, per_key=2)
        release = asyncio.Event()
        entered = []

        async def job(key):
            try:
                async with lane.slot(key):
                    entered.append(key)
                    await release.wait()
                return 200
            except APIError as e:
                assert int(e.headers["Retry-After"]) >= 1
                return e.status

        tasks = [asyncio.ensure_future(job(k)) for k in ("a", "a", "a", "b", "c")]
        while lane.inflight < 3:
            await asyncio.sleep(0)
        # the third of key a is over its share (429); c finds the lane full (1 working + 2 waiting: 503)
        done = [await t for t in tasks[2:3] + tasks[4:]]
        release.set()
        return done + [await t for t in tasks[:2] + tasks[3:4]], entered, lane.inflight

    statuses, entered, left = asyncio.run(scenario())
    assert statuses == [429, 503, 200, 200, 200] and sorted(entered) == ["a", "a", "b"] and left == 0
