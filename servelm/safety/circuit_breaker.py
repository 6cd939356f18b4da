"""A circuit breaker around an async engine call.

closed → (``failure_threshold`` consecutive failures) → open: calls fail fast with
:class:`CircuitOpenError` for ``reset_timeout_s`` → half-open: one trial call; success
closes the breaker, failure opens it again. Timeouts count as failures.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


class CircuitOpenError(RuntimeError):
    """The breaker is open: the engine is not called. ``retry_after_s``: seconds until it lets a trial through."""

    def __init__(self, message: str, retry_after_s: float = 0.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OverloadedError(RuntimeError):
    """The engine is over its configured queue limit (raised by callers' overload checks)."""


@dataclass(slots=True)
class BreakerConfig:
    failure_threshold: int = 3
    reset_timeout_s: float = 30.0
    call_timeout_s: float | None = 60.0


class CircuitBreaker:
    """Tracks failures of one dependency; ``clock`` is injectable for tests of the timing."""

    def __init__(self, name: str = "engine", config: BreakerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, on_state=None):
        self.name = name
        self.config = config or BreakerConfig()
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._trial_running = False
        self._on_state = on_state

    @property
    def state(self) -> str:
        """Return ``closed``, ``open`` or ``half_open``."""
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.config.reset_timeout_s:
            return "half_open"
        return "open"

    @property
    def retry_after_s(self) -> float:
        """Returns the seconds until an open breaker half-opens (0 unless open)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.config.reset_timeout_s - (self.clock() - self.opened_at))

    def _set_open(self, is_open: bool) -> None:
        self.opened_at = self.clock() if is_open else None
        if self._on_state:
            self._on_state(self.name, is_open)

    def record_success(self) -> None:
        """Note a successful call (closes a half-open breaker)."""
        self.failures = 0
        if self.opened_at is not None:
            self._set_open(False)

    def record_failure(self) -> None:
        """Note a failed call (may open the breaker)."""
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.config.failure_threshold:
            self._set_open(True)

    def before_call(self) -> None:
        """Raise :class:`CircuitOpenError` if a call must not go through now."""
        state = self.state
        if state == "open" or (state == "half_open" and self._trial_running):
            raise CircuitOpenError(f"circuit '{self.name}' is open after {self.failures} failures",
                                   self.retry_after_s or 1.0)
        self._trial_running = state == "half_open"

    async def call(self, fn: Callable[[], Awaitable[T]], timeout_s: float | None = None,
                   is_failure: Callable[[BaseException], bool] | None = None) -> T:
        """Return ``await fn()`` through the breaker.

        Raises :class:`CircuitOpenError` when open, ``asyncio.TimeoutError`` on timeout,
        or whatever ``fn`` raised (each counted as a failure unless ``is_failure`` says the
        error is the caller's, e.g. a bad request, which says nothing about the engine's health).
        """
        self.before_call()
        timeout = timeout_s if timeout_s is not None else self.config.call_timeout_s
        try:
            result = await asyncio.wait_for(fn(), timeout) if timeout else await fn()
        except asyncio.CancelledError:
            self._trial_running = False
            raise
        except BaseException as exc:
            self._trial_running = False
            if is_failure is None or is_failure(exc):
                self.record_failure()
            raise
        self._trial_running = False
        self.record_success()
        return result
