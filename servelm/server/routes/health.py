"""GET /health (liveness), /ready (readiness), /version and /metrics (Prometheus).

Only /metrics needs a key (the metrics or admin scope) unless the server opens it (``metrics_auth: false``)."""
from __future__ import annotations

import math

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import servelm
from servelm.server.auth import require
from servelm.server.context import ServerContext, get_context

router = APIRouter(tags=["operations"])


def engine_problem(ctx: ServerContext) -> str | None:
    """Returns why the engine cannot serve (stopped, step loop unhealthy, no stats), or None."""
    try:
        if not ctx.engine.is_running:
            return "engine not running"
        if not ctx.engine.stats().healthy:
            return "engine unhealthy"
    except Exception:
        return "engine unavailable"
    return None


def _unavailable(message: str, code: str, retry_after_s: int = 2) -> JSONResponse:
    body = {"error": {"message": message, "type": "service_unavailable", "param": None, "code": code}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(retry_after_s)})


def _breaker(ctx: ServerContext):
    """Returns the engine's circuit breaker, or None (``fallback: none`` runs without one)."""
    caller = getattr(ctx.guarding, "caller", None)
    return caller.breaker if caller is not None else None


@router.get("/health", summary="Liveness: the process answers and its engine runs")
async def health(request: Request):
    """Returns ``{"status": "ok"}``, or 503 with an OpenAI error body when the engine is dead or unhealthy
    (a liveness probe then restarts the server). A draining server, or one whose circuit breaker is open,
    stays healthy (a restart would not help; the breaker closes by itself): see /ready."""
    problem = engine_problem(get_context(request))
    if problem:
        return _unavailable(f"Unhealthy: {problem}.", "engine_unavailable")
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: model loaded, engine stepping, breaker closed, not draining")
async def ready(request: Request):
    """Returns 200 when the server can take requests, else 503 with Retry-After and the reason (starting,
    draining, engine stopped, the engine's circuit breaker open, Redis unreachable)."""
    ctx = get_context(request)
    reason = None
    if not ctx.ready:
        reason = "starting"
    elif ctx.admission.draining:
        reason = "shutting down"
    else:
        reason = engine_problem(ctx)
        breaker = _breaker(ctx)
        if reason is None and breaker is not None and breaker.state == "open":
            # drained by load balancers until the breaker half-opens and lets a trial request through
            reason = "the engine's circuit breaker is open after repeated engine failures"
            return _unavailable(f"Not ready: {reason}.", "not_ready", max(1, math.ceil(breaker.retry_after_s)))
        if reason is None and ctx.limiter.backend == "redis" and not await ctx.limiter.check_storage():
            reason = "rate-limit store (Redis) unreachable"
    if reason:
        return _unavailable(f"Not ready: {reason}.", "not_ready")
    return {"status": "ready", "model": ctx.model_name, "inflight": ctx.inflight}


@router.get("/version", summary="The servelm version (vLLM's /version)")
async def version() -> dict:
    """Returns ``{"version": servelm.__version__}``."""
    return {"version": servelm.__version__}


@router.get("/metrics", summary="Prometheus metrics (a key with the metrics or admin scope)", response_class=Response,
            dependencies=[Depends(require("metrics", unless=lambda s: not s.metrics_auth))])
async def metrics(request: Request) -> Response:
    """Returns the Prometheus text exposition of every server and engine metric; 401/403 without a key
    holding the metrics (or admin) scope, unless the server runs with ``metrics_auth: false``."""
    ctx = get_context(request)
    refresh = getattr(ctx.engine, "refresh_stats", None)  # an engine on several replicas gathers their figures
    if refresh is not None:
        await refresh()
    return Response(get_context(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
