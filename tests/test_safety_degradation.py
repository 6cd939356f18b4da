"""Graceful degradation: the breaker opens on engine failures and a marked fallback answers."""
import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from servelm.safety import (
    BreakerConfig, CachedFallback, CircuitBreaker, CircuitOpenError, ModelFallback, ResilientCaller, StaticFallback,
)
from servelm.safety.metrics import GuardMetrics


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Engine:
    """An engine callable we can stop and restart (stands for AsyncEngine.generate collected to text)."""

    def __init__(self):
        self.up = True
        self.calls = 0

    async def answer(self, prompt: str) -> str:
        self.calls += 1
        if not self.up:
            raise ConnectionError("engine stopped")
        return f"engine says: {prompt}"


async def test_breaker_opens_and_fallback_answers_then_recovers():
    clock, engine, reg = Clock(), Engine(), CollectorRegistry()
    breaker = CircuitBreaker("engine", BreakerConfig(failure_threshold=2, reset_timeout_s=10), clock=clock)
    caller = ResilientCaller(breaker, [CachedFallback(), StaticFallback("Busy, try later.")],
                             metrics=GuardMetrics.get(reg))
    ok = await caller.call("hi", lambda: engine.answer("hi"), request_id="r0")
    assert ok.text == "engine says: hi" and not ok.fallback

    engine.up = False
    r1 = await caller.call("hi", lambda: engine.answer("hi"), request_id="r1")
    assert r1.fallback and r1.kind == "cache" and r1.text == "engine says: hi" and r1.reason == "error"
    r2 = await caller.call("other", lambda: engine.answer("other"), request_id="r2")
    assert r2.fallback and r2.kind == "static" and r2.text == "Busy, try later."
    assert breaker.state == "open"
    calls = engine.calls
    r3 = await caller.call("other", lambda: engine.answer("other"), request_id="r3")
    assert r3.reason == "circuit_open" and engine.calls == calls  # open: the engine is not touched
    text = generate_latest(reg).decode()
    assert 'servelm_fallbacks_total{kind="static",reason="circuit_open"} 1.0' in text
    assert 'servelm_circuit_breaker_open{name="engine"} 1.0' in text

    engine.up = True
    clock.t = 11  # half-open: one trial call goes through and closes the breaker
    r4 = await caller.call("again", lambda: engine.answer("again"), request_id="r4")
    assert not r4.fallback and breaker.state == "closed"
    assert 'servelm_circuit_breaker_open{name="engine"} 0.0' in generate_latest(reg).decode()


async def test_timeout_and_overload_use_model_fallback():
    async def slow():
        await asyncio.sleep(5)
        return "late"

    async def small_model(prompt):
        return f"small model: {prompt}"

    reg = CollectorRegistry()
    overloaded = {"v": False}
    caller = ResilientCaller(CircuitBreaker("engine", BreakerConfig(failure_threshold=5)),
                             [ModelFallback(small_model)], metrics=GuardMetrics.get(reg),
                             overloaded=lambda: overloaded["v"])
    r = await caller.call("q", slow, timeout_s=0.05)
    assert r.fallback and r.kind == "model" and r.reason == "timeout" and r.text == "small model: q"
    overloaded["v"] = True
    r = await caller.call("q2", slow)
    assert r.reason == "overloaded" and r.text == "small model: q2"


async def test_no_fallback_answer_reraises():
    async def broken():
        raise ConnectionError("down")

    async def broken_model(prompt):
        raise RuntimeError("also down")

    caller = ResilientCaller(CircuitBreaker(), [CachedFallback(), ModelFallback(broken_model)],
                             metrics=GuardMetrics.get(CollectorRegistry()))
    with pytest.raises(ConnectionError):
        await caller.call("x", broken)


async def test_half_open_allows_one_trial_only():
    clock = Clock()
    b = CircuitBreaker("e", BreakerConfig(failure_threshold=1, reset_timeout_s=1), clock=clock)

    async def fail():
        raise ValueError("x")

    with pytest.raises(ValueError):
        await b.call(fail)
    with pytest.raises(CircuitOpenError):
        await b.call(fail)
    clock.t = 2
    assert b.state == "half_open"
    with pytest.raises(ValueError):
        await b.call(fail)  # the trial fails: open again
    assert b.state == "open"


async def test_fallbacks_answer_only_the_reasons_asked_for_and_the_open_breaker_says_when_to_retry():
    clock, engine = Clock(), Engine()
    breaker = CircuitBreaker("engine", BreakerConfig(failure_threshold=1, reset_timeout_s=10), clock=clock)
    caller = ResilientCaller(breaker, [StaticFallback("Busy.")], metrics=GuardMetrics.get(CollectorRegistry()),
                             answer_on=frozenset({"error"}))
    engine.up = False
    r = await caller.call("hi", lambda: engine.answer("hi"))
    assert r.fallback and r.reason == "error" and breaker.state == "open"
    clock.t = 4
    with pytest.raises(CircuitOpenError) as e:  # "circuit_open" was not asked for: the error, not a text
        await caller.call("hi", lambda: engine.answer("hi"))
    assert e.value.retry_after_s == pytest.approx(6) and breaker.retry_after_s == pytest.approx(6)
