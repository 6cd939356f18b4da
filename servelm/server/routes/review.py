"""Human review over HTTP: admins list/approve/reject/edit held items and read the audit log; a client
fetches its approved answer by review id. Plus the test-only engine fault switch."""
from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from servelm.safety import ReviewError
from servelm.server.auth import Principal, require
from servelm.server.context import get_context
from servelm.server.errors import APIError
from servelm.server.schemas import INT64_MAX, _Request

router = APIRouter()
admin = APIRouter(prefix="/v1/admin", tags=["review"])


class Decision(_Request):
    text: str | None = Field(None, description="Approve with this answer instead of the held one.")


class Edit(_Request):
    text: str = Field(..., description="The answer to hold instead (the item stays pending).")


class Fault(_Request):
    engine: str = Field(..., pattern="^(stop|start)$", description="stop or start the engine's step loop.")


def _queue(request: Request):
    g = get_context(request).guarding
    if g is None or g.guard is None or g.guard.review_queue is None:
        raise APIError(404, "Human review is off (the server runs with --no-guard).", code="review_disabled")
    return g.guard.review_queue


async def _do(fn, *args):
    try:
        return fn(*args)
    except ReviewError as e:
        code = {404: "review_not_found", 409: "review_already_decided"}.get(e.status, "invalid_value")
        raise APIError(e.status, e.message, code=code) from None


@admin.get("/reviews", summary="List review items (default: pending, oldest first)")
async def list_reviews(request: Request, status: str = Query("pending", pattern="^(pending|approved|rejected|all)$"),
                       limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=INT64_MAX),
                       _: Principal = Depends(require("admin"))) -> dict:
    """Returns ``{"data": [items], "pending": depth}``."""
    q = _queue(request)
    items = await _do(q.list, None if status == "all" else status, limit, offset)
    return {"object": "list", "data": [asdict(i) for i in items], "pending": q.depth()}


@admin.get("/reviews/{review_id}", summary="One review item with its prompt and held response")
async def get_review(review_id: str, request: Request, _: Principal = Depends(require("admin"))) -> dict:
    """Returns the item; 404 when unknown."""
    return asdict(await _do(_queue(request).get, review_id))


@admin.post("/reviews/{review_id}/approve", summary="Approve (optionally with an edited answer)")
async def approve(review_id: str, body: Decision, request: Request,
                  principal: Principal = Depends(require("admin"))) -> dict:
    """Returns the decided item; 409 when already decided."""
    return asdict(await _do(_queue(request).approve, review_id, principal.name, body.text))


@admin.post("/reviews/{review_id}/reject", summary="Reject: nothing is released")
async def reject(review_id: str, request: Request, principal: Principal = Depends(require("admin"))) -> dict:
    """Returns the decided item; 409 when already decided."""
    return asdict(await _do(_queue(request).reject, review_id, principal.name))


@admin.post("/reviews/{review_id}/edit", summary="Replace the held answer; the item stays pending")
async def edit(review_id: str, body: Edit, request: Request, principal: Principal = Depends(require("admin"))) -> dict:
    """Returns the edited item; 409 when already decided."""
    return asdict(await _do(_queue(request).edit, review_id, principal.name, body.text))


@admin.get("/audit", summary="The review audit log (every submission and decision)")
async def audit(request: Request, review_id: str | None = None, _: Principal = Depends(require("admin"))) -> dict:
    """Returns ``{"data": [entries]}`` oldest first, for all items or one."""
    return {"object": "list", "data": await _do(_queue(request).audit_log, review_id)}


def _fault_injection_on(request: Request) -> None:
    """Raises 404 (as for any unknown route) unless the server enabled fault injection. A dependency of the
    route, so it runs before the key and the body are checked: a disabled route reveals nothing."""
    if not get_context(request).settings.enable_fault_injection:
        raise APIError(404, f"Unknown route: {request.method} {request.url.path}.")


@admin.post("/fault", include_in_schema=False, dependencies=[Depends(_fault_injection_on)],
            summary="TEST ONLY: stop or start the engine (needs --enable-fault-injection)")
async def fault(body: Fault, request: Request, _: Principal = Depends(require("admin"))) -> dict:
    """Returns ``{"engine": "stopped"|"running"}``; 404 unless the server enabled fault injection."""
    ctx = get_context(request)
    if body.engine == "stop":
        await ctx.engine.shutdown()
        return {"engine": "stopped"}
    await ctx.engine.start()
    return {"engine": "running"}


@router.get("/v1/reviews/{review_id}", tags=["review"], summary="Fetch the answer of a held request by review id")
async def fetch(review_id: str, request: Request, principal: Principal = Depends(require("chat"))) -> dict:
    """Returns ``{id, status, answer}``; ``answer`` is set once approved. Only the key that made the request
    (or an admin) sees the item; others get 404, so ids reveal nothing."""
    q = _queue(request)
    try:
        item = q.get(review_id)
    except ReviewError:
        item = None
    if item is None or not (principal.allows("admin") or item.api_key_id == principal.name):
        raise APIError(404, f"No review {review_id!r} for this key.", param="review_id", code="review_not_found")
    return {"object": "review", "id": item.id, "status": item.status,
            "answer": item.final_text if item.status == "approved" else None}


router.include_router(admin)
