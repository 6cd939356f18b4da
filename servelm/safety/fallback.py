"""Graceful degradation: when the engine fails, is overloaded or times out, a fallback answers.

Fallbacks, tried in order until one answers:

* :class:`StaticFallback` - a fixed message ("The service is busy, please retry.").
* :class:`CachedFallback` - the last good answer to the same prompt (filled on success).
* :class:`ModelFallback` - a smaller model: any ``async (prompt) -> str`` callable.

Answers are marked (``FallbackResult.fallback=True`` with the kind and reason) so the
server can say so in the response (e.g. a ``x-servelm-fallback`` header and a field).
"""
from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

from servelm.safety.circuit_breaker import CircuitBreaker, CircuitOpenError, OverloadedError
from servelm.safety.metrics import GuardMetrics, log_event


@dataclass(slots=True)
class FallbackResult:
    text: str
    fallback: bool = False
    kind: str | None = None  # "static" | "cache" | "model"
    reason: str | None = None  # "circuit_open" | "timeout" | "overloaded" | "error"


class StaticFallback:
    kind = "static"

    def __init__(self, message: str = "The service is temporarily unavailable; please retry shortly."):
        self.message = message

    async def answer(self, prompt: str) -> str | None:
        """Return the fixed message."""
        return self.message


class CachedFallback:
    """An LRU of recent good answers keyed by prompt hash."""

    kind = "cache"

    def __init__(self, max_items: int = 1024):
        self.max_items = max_items
        self._items: OrderedDict[str, str] = OrderedDict()

    @staticmethod
    def _key(prompt: str) -> str:
        return hashlib.sha256(prompt.encode("utf-8", "replace")).hexdigest()

    def remember(self, prompt: str, answer: str) -> None:
        """Store ``answer`` for ``prompt``."""
        k = self._key(prompt)
        self._items[k] = answer
        self._items.move_to_end(k)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    async def answer(self, prompt: str) -> str | None:
        """Return the cached answer for ``prompt`` or None."""
        return self._items.get(self._key(prompt))


class ModelFallback:
    """A smaller model behind any async callable ``(prompt) -> str``."""

    kind = "model"

    def __init__(self, generate: Callable[[str], Awaitable[str]], timeout_s: float = 30.0):
        self.generate, self.timeout_s = generate, timeout_s

    async def answer(self, prompt: str) -> str | None:
        """Return the fallback model's answer (None if it fails too)."""
        try:
            return await asyncio.wait_for(self.generate(prompt), self.timeout_s)
        except Exception as e:  # a failing fallback must not mask the chain's next option
            log_event("fallback_model_error", error=repr(e))
            return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CircuitOpenError):
        return "circuit_open"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, OverloadedError):
        return "overloaded"
    return "error"


class ResilientCaller:
    """Calls the engine through a breaker; on failure asks the fallbacks in order.

        caller = ResilientCaller(breaker, [CachedFallback(), StaticFallback()])
        result = await caller.call(prompt, lambda: generate_text(prompt), request_id=rid)
    """

    def __init__(self, breaker: CircuitBreaker, fallbacks: list, metrics: GuardMetrics | None = None,
                 overloaded: Callable[[], bool] | None = None,
                 is_failure: Callable[[BaseException], bool] | None = None,
                 answer_on: frozenset[str] | None = None):
        self.breaker = breaker
        # The reasons ("error", "circuit_open", "timeout", "overloaded") the fallbacks answer; None: all.
        # For the others the error is re-raised (after counting against the breaker), so the client gets
        # an error status instead of a canned text.
        self.answer_on = answer_on
        # Errors for which is_failure is False (bad input, rate limits, a client that left) are re-raised
        # as they are: neither counted against the engine nor answered by a fallback.
        self.is_failure = is_failure
        self.fallbacks = list(fallbacks)
        self.metrics = metrics or GuardMetrics.get()
        self.overloaded = overloaded
        self.cache = next((f for f in self.fallbacks if isinstance(f, CachedFallback)), None)
        breaker._on_state = lambda name, is_open: self.metrics.breaker_state.labels(name).set(int(is_open))

    async def call(self, prompt: str, fn: Callable[[], Awaitable[str]], request_id: str | None = None,
                   timeout_s: float | None = None) -> FallbackResult:
        """Return the engine's answer, or a marked fallback answer; re-raises if no fallback answers (or
        ``answer_on`` leaves the failure's reason out)."""
        try:
            if self.overloaded is not None and self.overloaded():
                raise OverloadedError("engine queue is over its limit")
            text = await self.breaker.call(fn, timeout_s, self.is_failure)
        except Exception as exc:  # any engine failure degrades to the fallbacks
            if self.is_failure is not None and not self.is_failure(exc):
                raise
            reason = _reason(exc)
            if self.answer_on is not None and reason not in self.answer_on:
                raise
            for fb in self.fallbacks:
                answer = await fb.answer(prompt)
                if answer is not None:
                    self.metrics.fallbacks.labels(reason, fb.kind).inc()
                    log_event("fallback", request_id, reason=reason, kind=fb.kind, error=repr(exc))
                    return FallbackResult(answer, True, fb.kind, reason)
            log_event("fallback_exhausted", request_id, reason=reason, error=repr(exc))
            raise
        if self.cache is not None:
            self.cache.remember(prompt, text)
        return FallbackResult(text)
