"""Real servelm servers (and a real redis-server) in subprocesses for the server tests.

All servers the suite needs start together on first use, since loading the model dominates; each
test module then waits only for the ones it uses. Output goes to a file per server so tests can
search what the server printed and logged.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from servelm.server.keys import KeyStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
ENV.pop("SERVELM_MAX_QUEUE", None)
SMALL_KV = str(256 * 1024 * 1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, data_dir: str) -> subprocess.CompletedProcess:
    """Runs ``python -m servelm.server keys --data-dir D ...``."""
    return subprocess.run([sys.executable, "-m", "servelm.server", "keys", "--data-dir", data_dir, *args],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)


def create_key(data_dir: str, name: str, scopes: str = "chat,embeddings,models", rpm: int = 0, tpm: int = 0) -> str:
    """Returns a new key written to the server's key store (as ``servelm keys create`` does; running
    servers see it on their next request)."""
    store = KeyStore(os.path.join(data_dir, "keys.sqlite3"))
    try:
        return store.create(name, scopes, rpm, tpm)[0]
    finally:
        store.close()


def key_label(data_dir: str, name: str) -> str:
    """Returns how /metrics names the key called ``name`` (by id: metrics never show key names)."""
    store = KeyStore(os.path.join(data_dir, "keys.sqlite3"))
    try:
        return f"key-{store.get(name).id}"
    finally:
        store.close()


class Redis:
    """A private redis-server on a free port."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
                                      "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def wait(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Server:
    """``python -m servelm.server serve`` on a free port; ``output()`` is everything it printed."""

    def __init__(self, name: str, data_dir: str, *flags: str):
        self.name = name
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(data_dir, f"{name}.out")
        self.keys: dict[str, str] = {}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "servelm.server", "serve", "--port", str(self.port),
                                      "--data-dir", data_dir, "--kv-cache-memory-bytes", SMALL_KV, *flags],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        self._ready = False

    def wait_ready(self, timeout: float = 240.0) -> "Server":
        """Polls /ready until 200; raises with the server's output if it dies or never gets ready."""
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.name} not ready:\n{self.output()[-3000:]}")
            try:
                self._ready = httpx.get(self.url + "/ready", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                pass
            if not self._ready:
                time.sleep(0.1)
        return self

    def output(self) -> str:
        self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def log_records(self) -> list[dict]:
        """Returns the JSON log lines the server wrote."""
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def metrics_key(self) -> str | None:
        """Returns a key that may read /metrics: one of ``keys`` with the metrics or admin scope, else the
        admin key printed on the first start, else None (a --no-auth server)."""
        store = KeyStore(os.path.join(self.data_dir, "keys.sqlite3"))
        try:
            for key in self.keys.values():
                record = store.verify(key)
                if record is not None and record.allows("metrics"):
                    return key
        finally:
            store.close()
        printed = re.findall(r"sk-servelm-[A-Za-z0-9_\-]+", self.output())
        return printed[0] if printed else None

    def metrics(self) -> dict[str, float]:
        """Returns ``{series: value}`` from /metrics (series with labels as printed)."""
        if not hasattr(self, "_metrics_key"):
            self._metrics_key = self.metrics_key()
        key = self._metrics_key
        r = httpx.get(self.url + "/metrics", timeout=10, headers={"Authorization": f"Bearer {key}"} if key else {})
        r.raise_for_status()
        text = r.text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                out[series] = float(value)
        return out

    def poll_metrics(self, cond, timeout: float = 1.0) -> dict[str, float]:
        """Returns the metrics once ``cond(metrics)`` holds, or the last ones after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if cond(m) or time.monotonic() > deadline:
                return m

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Fleet:
    """Every server the suite uses, started together on first use."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="servelm-server-tests-")
        self.redis = Redis()
        d = lambda name: os.makedirs(os.path.join(self.root, name), exist_ok=True) or os.path.join(self.root, name)
        # main: auth on, empty key store (the bootstrap admin key), embeddings, room for 32 streams;
        # no RAG (tests/test_server_rag.py runs its own server), so 'rag' there is an unsupported extension
        self.main_dir = d("main")
        # redis pair: one shared key store and one shared Redis
        self.shared_dir = d("shared")
        self.shared_keys = {"shared-rpm": create_key(self.shared_dir, "shared-rpm", rpm=10),
                            "shared-tpm": create_key(self.shared_dir, "shared-tpm", tpm=400),
                            "unlimited": create_key(self.shared_dir, "unlimited"),
                            "scraper": create_key(self.shared_dir, "scraper", "metrics")}
        self.small_dir = d("small")
        self.small_keys = {"user": create_key(self.small_dir, "user")}
        self.redis.wait()
        common = ("--no-embeddings", "--no-rag")
        self.servers = {
            "main": Server("main", self.main_dir, "--max-num-seqs", "32", "--max-queue", "16", "--no-rag"),
            # small: a tiny admission bound, no auth, prompts logged; no guardrails, since its tests count
            # stream chunks (an output guard batches them) and send marker prompts (tests/test_server_guard.py
            # covers the guard)
            "small": Server("small", self.small_dir, "--max-num-seqs", "2", "--max-queue", "2", "--no-auth",
                            "--log-prompts", "--no-guard", *common),
            "redis-a": Server("redis-a", self.shared_dir, "--redis-url", self.redis.url, *common),
            "redis-b": Server("redis-b", self.shared_dir, "--redis-url", self.redis.url, "--request-timeout", "5",
                              *common),
        }
        self.servers["small"].keys = self.small_keys
        self.servers["redis-a"].keys = self.servers["redis-b"].keys = self.shared_keys

    def get(self, name: str) -> Server:
        """Returns the named server once it is ready."""
        return self.servers[name].wait_ready()

    def stop(self) -> None:
        for s in self.servers.values():
            s.stop(signal.SIGTERM, 10)
        self.redis.stop()
        shutil.rmtree(self.root, ignore_errors=True)


_FLEET: Fleet | None = None


def fleet() -> Fleet:
    """Returns the suite's servers, starting them all on the first call."""
    global _FLEET
    if _FLEET is None:
        _FLEET = Fleet()
        atexit.register(_FLEET.stop)
    return _FLEET


def bootstrap_key(server: Server) -> str:
    """Returns the admin key the server printed on its first start."""
    keys = re.findall(r"sk-servelm-[A-Za-z0-9_\-]+", server.output())
    assert keys, "no admin key printed on first start"
    return keys[0]


def openai_client(server: Server, key: str, asynchronous: bool = False):
    """An OpenAI SDK client (``AsyncOpenAI`` with ``asynchronous``) for ``server``'s ``/v1`` with ``key``:
    no retries, so a test sees the first answer, and a timeout long enough for a cold CPU engine."""
    import openai

    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)
