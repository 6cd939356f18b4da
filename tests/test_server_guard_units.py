"""The guard composition without a model: which engine errors the fallback answers, settings checks, answers."""
from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from servelm.engine import EngineDeadError, RequestFailedError
from servelm.prompts import UnknownStrategyError
from servelm.safety import CircuitOpenError, FallbackResult, PolicyError
from servelm.server.errors import APIError, ClientGone
from servelm.serving.guard import build_guarding, call_engine
from servelm.serving.pipeline import Answer, ChatTurn, RequestPipeline
from servelm.server.settings import ServerSettings


def guarding(tmp_path, **kw):
    settings = ServerSettings(data_dir=str(tmp_path), no_guard=True, fallback_message="FB", **kw)
    reg = CollectorRegistry()
    return build_guarding(settings, reg), reg


def run(coro):
    return asyncio.run(coro)


def raiser(exc):
    async def fn():
        raise exc
    return fn


@pytest.mark.parametrize("exc", [APIError(400, "bad"), APIError(429, "slow down", code="rate_limit_requests"),
                                 APIError(503, "busy", code="server_overloaded"),
                                 APIError(504, "late", code="request_timeout"), ClientGone()])
def test_client_errors_pass_through_and_never_open_the_breaker(tmp_path, exc):
    g, _ = guarding(tmp_path)
    for _ in range(5):
        with pytest.raises(type(exc)):
            run(call_engine(g, "r", raiser(exc)))
    assert g.caller.breaker.state == "closed" and g.caller.breaker.failures == 0


def test_engine_failures_keep_their_error_then_the_breaker_opens_and_says_when_to_retry(tmp_path):
    g, reg = guarding(tmp_path, breaker_reset_s=20)
    for _ in range(3):
        with pytest.raises(EngineDeadError):
            run(call_engine(g, "r", raiser(EngineDeadError("stopped"))))
    with pytest.raises(CircuitOpenError) as e:
        run(call_engine(g, "r", raiser(EngineDeadError("stopped"))))
    assert 0 < e.value.retry_after_s <= 20 and g.caller.breaker.state == "open"
    text = generate_latest(reg).decode()
    assert 'servelm_circuit_breaker_open{name="engine"} 1.0' in text and "servelm_fallbacks_total{" not in text


def test_a_request_the_engine_failed_alone_never_counts_against_the_breaker(tmp_path):
    g, _ = guarding(tmp_path, fallback_on=["engine_error", "circuit_open"])
    for _ in range(5):
        with pytest.raises(RequestFailedError):
            run(call_engine(g, "r", raiser(RequestFailedError("Boom: its logits processor raised"))))
    assert g.caller.breaker.state == "closed" and g.caller.breaker.failures == 0


def test_engine_failure_gets_the_marked_static_fallback_then_the_breaker_opens(tmp_path):
    g, reg = guarding(tmp_path, fallback_on=["engine_error", "circuit_open"])
    reasons = [run(call_engine(g, "r", raiser(EngineDeadError("stopped")))).reason for _ in range(4)]
    assert reasons == ["error", "error", "error", "circuit_open"]
    r = run(call_engine(g, "r", raiser(EngineDeadError("stopped"))))
    assert isinstance(r, FallbackResult) and r.fallback and r.kind == "static" and r.text == "FB"
    text = generate_latest(reg).decode()
    assert 'servelm_fallbacks_total{kind="static",reason="error"} 3.0' in text
    assert 'servelm_circuit_breaker_open{name="engine"} 1.0' in text


def test_timeouts_and_overload_degrade_only_when_configured(tmp_path):
    g, _ = guarding(tmp_path, fallback_on=["engine_error", "timeout", "overloaded"])
    assert run(call_engine(g, "r", raiser(APIError(504, "late", code="request_timeout")))).reason == "timeout"
    assert run(call_engine(g, "r", raiser(APIError(503, "busy", code="server_overloaded")))).reason == "overloaded"


def test_fallback_none_keeps_the_engine_error(tmp_path):
    g, _ = guarding(tmp_path, fallback="none")
    with pytest.raises(EngineDeadError):
        run(call_engine(g, "r", raiser(EngineDeadError("stopped"))))


def test_success_returns_the_engine_result_unchanged(tmp_path):
    g, _ = guarding(tmp_path)

    async def ok():
        return ("gen", ["choice"])
    assert run(call_engine(g, "r", ok)) == ("gen", ["choice"])


def test_bad_policy_and_strategy_fail_at_start_naming_what_to_fix(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("scanners: {pii: {action: shred}}\n")
    with pytest.raises(PolicyError, match="scanners.pii.action"):
        build_guarding(ServerSettings(data_dir=str(tmp_path), policy=str(bad)), CollectorRegistry())
    with pytest.raises(UnknownStrategyError, match="tree_of_thought"):
        build_guarding(ServerSettings(data_dir=str(tmp_path), no_guard=True, default_strategy="tree_of_thought"),
                       CollectorRegistry())


def test_pipeline_answer_merges_stage_answers_and_stops_after_a_filter():
    async def upper(turn, text):
        return text.upper()

    async def filt(turn, text):
        return Answer("", "content_filter", servelm={"content_filter": {"scanner": "pii"}})

    async def leak(turn, text):
        return "LEAKED"

    turn = ChatTurn([{"role": "user", "content": "q"}], None, None, "k", "r")
    a = run(RequestPipeline(post=[upper, filt, leak]).answer(turn, "hi"))
    assert a.text == "" and a.finish_reason == "content_filter" and a.servelm["content_filter"]["scanner"] == "pii"
    assert run(RequestPipeline(post=[upper]).after(turn, "hi")) == "HI"
