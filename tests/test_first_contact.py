"""What a new user meets first: the start banner (every start), its Python snippet pasted into
``python3``, the API docs offline in a real browser, ``servelm chat``/``generate`` through a running
server (Ctrl-C stopping only the answer), and the CLI's help.

One real server (embedded SmolLM2, auth on, empty key store) and a second one started later on the
same data directory, as a restart would.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

from server_harness import ENV, ROOT, Server, bootstrap_key

CHROMIUM = "/usr/bin/chromium"
CLIENT_ENV = {k: v for k, v in ENV.items() if k not in ("SERVELM_API_KEY", "OPENAI_API_KEY")}
FLAGS = ("--no-embeddings", "--no-rag", "--no-guard", "--max-num-seqs", "4")


@pytest.fixture(scope="module")
def data_dir():
    d = tempfile.mkdtemp(prefix="servelm-first-contact-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def srv(data_dir):
    s = Server("first", data_dir, *FLAGS)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def key(srv):
    return bootstrap_key(srv)


@pytest.fixture(scope="module")
def restarted(srv, key, data_dir):
    """A second start on the same data directory, once the first made its key (a restart, as far as the
    key store can tell)."""
    s = Server("second", data_dir, *FLAGS)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def banner(server: Server) -> str:
    out = server.output()
    start = out.index("servelm: serving ")
    return out[start:out.index("=" * 80, start)]


# ------------------------------------------------------------------ the start banner
def test_first_start_banner_has_the_urls_the_model_and_the_key_once(srv, key):
    b = banner(srv)
    for text in (f"{srv.url}/v1", f"{srv.url}/playground", f"{srv.url}/docs", "SmolLM2-135M-Instruct", key):
        assert text in b, text
    assert srv.output().count("created an admin API key") == 1
    assert not any(key in str(rec) for rec in srv.log_records())  # printed, never logged


def test_banner_python_snippet_runs_as_pasted(srv, key):
    lines = banner(srv).splitlines()
    first = lines.index("from openai import OpenAI")
    snippet = "\n".join(lines[first:first + 4])
    assert snippet.splitlines()[-1].startswith("print(")
    r = subprocess.run([sys.executable, "-"], input=snippet, capture_output=True, text=True, env=CLIENT_ENV,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_banner_curl_runs_as_pasted(srv, key):
    line = next(x for x in banner(srv).splitlines() if x.startswith("curl "))
    r = subprocess.run(["bash", "-c", line + " -sS --fail-with-body"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and '"chat.completion"' in r.stdout, r.stdout + r.stderr


def test_a_restart_prints_the_banner_with_how_to_make_a_key(restarted, key, data_dir):
    b = banner(restarted)
    assert f"{restarted.url}/playground" in b and f"{restarted.url}/docs" in b
    assert key not in restarted.output() and "created an admin API key" not in restarted.output()
    command = next(x for x in b.splitlines() if x.startswith("servelm keys"))
    assert data_dir in command
    made = servelm(*command.replace("NAME", "bob").split()[1:])  # the command, with a name filled in
    new_key = re.findall(r"sk-servelm-\S+", made.stdout)
    assert made.returncode == 0 and new_key
    r = httpx.get(restarted.url + "/v1/models", headers={"Authorization": f"Bearer {new_key[0]}"}, timeout=60)
    assert r.status_code == 200


# ------------------------------------------------------------------ API docs, offline
def test_docs_and_redoc_render_offline_in_a_browser(srv):
    from playwright.sync_api import expect, sync_playwright

    assert os.path.exists(CHROMIUM), "Debian's Chromium is needed: apt-get install -y chromium"
    asked = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            page.on("request", lambda r: asked.append(r.url))
            page.goto(srv.url + "/docs")
            ops = page.locator(".opblock-summary-path")
            expect(ops.filter(has_text="/v1/chat/completions").first).to_be_visible(timeout=60_000)
            assert ops.count() >= 10
            page.goto(srv.url + "/redoc")
            expect(page.get_by_text("/v1/chat/completions").first).to_be_attached(timeout=60_000)
        finally:
            browser.close()
    elsewhere = [u for u in asked if not u.startswith((srv.url, f"blob:{srv.url}"))]  # blob: ReDoc's worker
    assert asked and not elsewhere, elsewhere


# ------------------------------------------------------------------ servelm generate / chat --url
def servelm(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "servelm", *args], capture_output=True, text=True, env=CLIENT_ENV,
                          cwd=ROOT, timeout=300, **kw)


def test_generate_through_a_server_answers_what_the_server_answers(srv, key):
    prompt = "The capital of France is"
    r = servelm("generate", prompt, "--url", srv.url, "--api-key", key, "--max-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "loading" not in r.stderr  # no model of its own
    direct = httpx.post(srv.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                        json={"prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
    assert r.stdout.rstrip("\n") == direct["choices"][0]["text"]


def test_chat_through_a_server_without_a_key_says_how_to_get_one(srv):
    r = servelm("chat", "--url", srv.url, input="")
    assert r.returncode == 2
    assert "needs an API key" in r.stderr and "servelm keys create" in r.stderr and "Traceback" not in r.stderr


class Terminal:
    """``servelm chat`` in a subprocess; ``interrupt()`` is the Ctrl-C a terminal sends (SIGINT)."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "servelm", "chat", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=CLIENT_ENV, cwd=ROOT)
        self.text = ""
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 4096):
            with self.changed:
                self.text += chunk.decode(errors="replace")
                self.changed.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 300) -> None:
        """Returns once ``pattern`` (a regex) occurs ``count`` times in the output; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(re.findall(pattern, self.text)) < count:
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, f"waiting for {pattern!r} x{count}:\n{self.text}"
                self.changed.wait(min(left, 1.0))

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def interrupt_at_prompt(self, timeout: float = 60) -> None:
        """Ctrl-C once the chat waits in its read of the next line. A SIGINT that lands between the prompt
        being written and the read starting is only acted on when a line comes (CPython checks signals when
        the read returns): a person cannot be that quick, a test can."""
        deadline = time.monotonic() + timeout
        while not open(f"/proc/{self.proc.pid}/wchan").read().endswith("pipe_read"):
            assert time.monotonic() < deadline, "chat never waited for input"
        self.interrupt()


def test_chat_ctrl_c_stops_the_answer_not_the_chat(srv, key):
    t = Terminal("--url", srv.url, "--api-key", key, "--max-tokens", "2000", "--temperature", "0")
    try:
        t.wait_for(r"you> ")
        t.send("Count from 1 to 500, one number per line, with no other text.")
        t.wait_for(r"assistant> \s*\d")  # the answer is streaming
        t.interrupt()
        t.wait_for(r"\[stopped\]")
        t.wait_for(r"you> ", 2)  # still chatting
        # the server stopped generating when the client let go
        m = srv.poll_metrics(lambda m: m["servelm:num_requests_running"] == 0, timeout=60)
        assert m["servelm:num_requests_running"] == 0
        t.send("Say hi.")
        t.wait_for(r"you> ", 3)  # a second answer, in the same conversation
        assert t.text.count("assistant> ") == 2
        t.interrupt_at_prompt()  # Ctrl-C at the prompt: a hint...
        t.wait_for(r"Ctrl-C again")
        t.interrupt_at_prompt()  # ...and the second one quits
        assert t.proc.wait(60) == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


def test_chat_ctrl_d_quits(srv, key):
    r = servelm("chat", "--url", srv.url, "--api-key", key, "--max-tokens", "4", input="Hello\n")
    assert r.returncode == 0, r.stderr
    assert "assistant> " in r.stdout and "Traceback" not in r.stderr


# ------------------------------------------------------------------ CLI help
def _options():
    from servelm.cli import build_parser

    def walk(parser: argparse.ArgumentParser, name: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")
            elif not isinstance(action, argparse._HelpAction):
                yield name, action

    return list(walk(build_parser(), "servelm"))


def test_every_option_has_help_and_says_its_default():
    missing = []
    for command, a in _options():
        if a.help == argparse.SUPPRESS:
            continue  # an old spelling kept working (e.g. --kv-cache-memory)
        label = f"{command} {'/'.join(a.option_strings) or a.dest}"
        if not a.help:
            missing.append(f"{label}: no help")
        elif a.option_strings and a.nargs != 0 and not a.required and "default" not in a.help:
            missing.append(f"{label}: no default in {a.help!r}")
    assert not missing, "\n".join(missing)


def test_one_name_per_setting_across_commands():
    visible = {}
    for command, a in _options():
        if a.option_strings and a.help != argparse.SUPPRESS:
            visible.setdefault(command, set()).update(a.option_strings)
    everywhere = set().union(*visible.values())
    assert "--kv-cache-memory-bytes" in visible["servelm chat"] and "--kv-cache-memory-bytes" in visible["servelm serve"]
    assert "--kv-cache-memory" not in everywhere and "--pg-dsn" not in everywhere
    assert "--pg-url" in visible["servelm ingest"] and "--model" in visible["servelm quantize"]


def test_old_spellings_still_work():
    from servelm.cli import build_parser

    p = build_parser()
    assert p.parse_args(["chat", "--kv-cache-memory", "1024"]).kv_cache_memory_bytes == 1024
    assert p.parse_args(["serve", "--kv-cache-memory", "1024"]).kv_cache_memory_bytes == 1024
    assert p.parse_args(["ingest", "x", "--collection", "c", "--pg-dsn", "postgresql://h/d"]).pg_dsn == \
        "postgresql://h/d"


def test_quantize_alone_prints_the_report():
    r = servelm("quantize")
    assert r.returncode == 0, r.stderr
    assert "SmolLM2" in r.stdout and re.search(r"^INT4\s", r.stdout, re.M) and re.search(r"^NF4-DQ\s", r.stdout, re.M)
