"""GET /health (liveness), /ready (readiness) and /metrics (Prometheus); none needs a key."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from servelm.server.context import get_context

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict:
    """Returns ``{"status": "ok"}`` while the process is up."""
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: model loaded, engine stepping, not draining")
async def ready(request: Request):
    """Returns 200 when the server can take requests, else 503 with Retry-After and the reason."""
    ctx = get_context(request)
    reason = None
    if not ctx.ready:
        reason = "starting"
    elif ctx.admission.draining:
        reason = "shutting down"
    else:
        try:
            if not ctx.engine.stats().healthy:
                reason = "engine unhealthy"
        except Exception:
            reason = "engine unavailable"
        if reason is None and ctx.limiter.backend == "redis" and not await ctx.limiter.check_storage():
            reason = "rate-limit store (Redis) unreachable"
    if reason:
        body = {"error": {"message": f"Not ready: {reason}.", "type": "service_unavailable", "param": None,
                          "code": "not_ready"}}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
    return {"status": "ready", "model": ctx.model_name, "inflight": ctx.inflight}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Returns the Prometheus text exposition of every server and engine metric."""
    return Response(get_context(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
