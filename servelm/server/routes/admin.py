"""Key management over HTTP for holders of the admin scope (the CLI does the same locally)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from servelm.server.auth import require
from servelm.server.context import get_context
from servelm.server.errors import APIError, invalid
from servelm.server.keys import DEFAULT_SCOPES
from servelm.server.schemas import INT64_MAX, _Request

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require("admin"))])


class KeyCreate(_Request):
    name: str = Field(..., min_length=1, max_length=64)
    scopes: list[str] = list(DEFAULT_SCOPES)
    rpm: int = Field(0, ge=0, le=INT64_MAX, description="Requests per minute; 0 = unlimited.")
    tpm: int = Field(0, ge=0, le=INT64_MAX, description="Tokens per minute; 0 = unlimited.")


def _store(request: Request):
    store = get_context(request).keys
    if store is None:
        raise APIError(404, "Key management is off (the server runs with --no-auth).", code="auth_disabled")
    return store


@router.get("/keys", summary="List API keys (never the keys themselves)")
async def list_keys(request: Request) -> dict:
    """Returns ``{"data": [key records]}``."""
    return {"object": "list", "data": [r.public() for r in _store(request).list()]}


@router.post("/keys", summary="Create an API key; the key is returned once")
async def create_key(body: KeyCreate, request: Request) -> dict:
    """Returns the new record with its ``key`` (shown only in this response)."""
    try:
        key, rec = _store(request).create(body.name, body.scopes, body.rpm, body.tpm)
    except ValueError as e:
        raise invalid(str(e), "name" if "exists" in str(e) or "name" in str(e) else "scopes") from None
    return rec.public() | {"key": key}


@router.delete("/keys/{name}", summary="Revoke an API key")
async def revoke_key(name: str, request: Request) -> dict:
    """Returns ``{"revoked": name}``; 404 when no live key has that name."""
    if not _store(request).revoke(name):
        raise APIError(404, f"No live key named '{name}'.", param="name", code="key_not_found")
    return {"revoked": name}
