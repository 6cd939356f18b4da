"""Backpressure: bounded work per route and per key, refused at the door with 503/429 and Retry-After.

Generation requests (chat, completions, RAG answers) are counted here and queue inside the engine;
embedding, RAG-retrieval and upload requests wait here, in a :class:`Lane` each. Both refuse a request
at once when it would wait longer than the server's wait bound, judged from the queue ahead of it and
the recent service time per request (an EWMA), rather than letting it time out minutes later.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from contextlib import asynccontextmanager

from servelm.server.errors import APIError


class ServiceTime:
    """An exponentially weighted mean of recent per-request service times (seconds; 0 until one is seen)."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.mean = 0.0

    def observe(self, seconds: float) -> None:
        """Adds one request's service time."""
        self.mean = seconds if self.mean == 0.0 else self.mean + self.alpha * (seconds - self.mean)

    def expected_wait(self, ahead: int, parallel: int) -> float:
        """Returns the seconds until a request with ``ahead`` requests in front of it can start when
        ``parallel`` run at once: one place frees every ``mean / parallel`` seconds on average."""
        return ahead * self.mean / max(1, parallel)


def _shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; retry on another replica.", code="shutting_down",
                    headers={"Retry-After": "5"})


def _too_slow(what: str, expected: float, bound: float) -> APIError:
    return APIError(503, f"The server is busy: {what} would wait about {expected:.0f} s to start, longer than "
                         f"its wait bound of {bound:g} s; retry later.", code="server_overloaded",
                    headers={"Retry-After": str(max(1, math.ceil(expected - bound)))})


class Admission:
    """Counts generation requests in flight; refuses beyond ``running + queue`` with a fast 503, and
    sooner when the queue ahead would take longer than ``max_wait_s`` to clear or the request could not
    be served within ``timeout_s`` (the queue ahead plus one service time).

    The engine runs ``max_running`` at once; ``max_queue`` more may wait. Refusing at the door
    (instead of queueing without bound) keeps latency for admitted requests predictable and tells
    clients and load balancers to retry elsewhere. ``lanes`` are the work queues of the other routes.
    """

    def __init__(self, max_running: int, max_queue: int, max_wait_s: float = math.inf,
                 timeout_s: float = math.inf, lanes: dict[str, "Lane"] | None = None):
        self.running = max_running
        self.capacity = max_running + max_queue
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.inflight = 0
        self.draining = False
        self.service = ServiceTime()
        self.on_refuse = None  # on_refuse(reason): a lane refused a request ("overloaded", "shutting_down", ...)
        self.lanes = lanes or {}
        for lane in self.lanes.values():
            lane.admission = self

    def expected_wait(self) -> float:
        """Returns the seconds a generation admitted now would wait for an engine slot (0 with one free)."""
        return self.service.expected_wait(max(0, self.inflight + 1 - self.running), self.running)

    def enter(self) -> None:
        """Admits one request. Raises APIError(503) with Retry-After when full, when it could not start
        within the wait bound, or when shutting down."""
        if self.draining:
            raise _shutting_down()
        if self.inflight >= self.capacity:
            raise APIError(503, f"The server is overloaded ({self.inflight} requests in flight, "
                                f"limit {self.capacity}); retry shortly.",
                           code="server_overloaded", headers={"Retry-After": "1"})
        expected = self.expected_wait()
        if expected > self.max_wait_s:
            raise _too_slow("this request", expected, self.max_wait_s)
        if expected > 0 and expected + self.service.mean > self.timeout_s:
            raise APIError(503, f"The server is busy: this request would wait about {expected:.0f} s to start and "
                                f"then need about {self.service.mean:.0f} s, past the request timeout of "
                                f"{self.timeout_s:g} s; retry later.", code="server_overloaded",
                           headers={"Retry-After": str(max(1, math.ceil(expected + self.service.mean
                                                                        - self.timeout_s)))})
        self.inflight += 1

    def leave(self, service_s: float | None = None) -> None:
        """Releases one admitted request; ``service_s`` is how long the engine worked on it, if it ran."""
        self.inflight = max(0, self.inflight - 1)
        if service_s is not None:
            self.service.observe(service_s)


class Lane:
    """``running`` requests of one kind at once, ``max_queue`` more waiting; each key at most ``per_key``
    waiting or running (0: no per-key bound). A waiting request never waits past the wait bound."""

    def __init__(self, what: str, running: int, max_queue: int, per_key: int = 0, max_wait_s: float = math.inf):
        self.what = what
        self.running = running
        self.capacity = running + max_queue
        self.per_key = per_key
        self.max_wait_s = max_wait_s
        self.inflight = 0
        self.by_key: Counter[str] = Counter()
        self.service = ServiceTime()
        self.admission: Admission | None = None
        self._slots = asyncio.Semaphore(running)

    def _check(self, key: str) -> None:
        try:
            self._refusal(key)
        except APIError as e:
            if self.admission is not None and self.admission.on_refuse is not None:
                self.admission.on_refuse({"server_overloaded": "overloaded"}.get(e.code, e.code))
            raise

    def _refusal(self, key: str) -> None:
        if self.admission is not None and self.admission.draining:
            raise _shutting_down()
        if self.per_key and self.by_key[key] >= self.per_key:
            raise APIError(429, f"Too many {self.what} requests at once for this key ({self.by_key[key]} in flight, "
                                f"limit {self.per_key}); wait for one to finish.", code="too_many_concurrent_requests",
                           headers={"Retry-After": str(max(1, math.ceil(self.service.mean)))})
        if self.inflight >= self.capacity:
            raise APIError(503, f"The server is overloaded ({self.inflight} {self.what} requests in flight, "
                                f"limit {self.capacity}); retry shortly.", code="server_overloaded",
                           headers={"Retry-After": str(max(1, math.ceil(self.service.mean)))})
        expected = self.service.expected_wait(max(0, self.inflight + 1 - self.running), self.running)
        if expected > self.max_wait_s:
            raise _too_slow(f"this {self.what} request", expected, self.max_wait_s)

    @asynccontextmanager
    async def slot(self, key: str):
        """Holds one of the ``running`` places for ``key`` while the block runs (its time feeds the EWMA);
        yields ``release()``, which gives the place back early (e.g. when a RAG query's retrieval is done
        and its answer is generated under the engine's admission).

        Raises APIError 429 when ``key`` has ``per_key`` requests here, 503 with Retry-After when the
        lane is full, would not start within the wait bound, or did not within it while waiting."""
        self._check(key)
        self._count(key, 1)
        try:
            async with asyncio.timeout(None if math.isinf(self.max_wait_s) else self.max_wait_s):
                await self._slots.acquire()
        except BaseException as e:  # the wait bound passed, or the client left while waiting
            self._count(key, -1)
            if isinstance(e, TimeoutError):
                if self.admission is not None and self.admission.on_refuse is not None:
                    self.admission.on_refuse("queue_timeout")
                raise APIError(503, f"The server is busy: this {self.what} request waited {self.max_wait_s:g} s "
                                    "(the wait bound) without starting; retry later.", code="queue_timeout",
                               headers={"Retry-After": str(max(1, math.ceil(self.service.mean)))}) from None
            raise
        start, held = time.monotonic(), True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._slots.release()
                self.service.observe(time.monotonic() - start)
                self._count(key, -1)

        try:
            yield release
        finally:
            release()

    def _count(self, key: str, delta: int) -> None:
        self.inflight += delta
        self.by_key[key] += delta
        if self.by_key[key] <= 0:
            del self.by_key[key]
