"""Bearer-key authentication and scope checks as FastAPI dependencies."""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from servelm.server.errors import APIError
from servelm.server.keys import SCOPES

_bearer = HTTPBearer(auto_error=False, description="An API key from `servelm keys create`.")


@dataclass(slots=True, frozen=True)
class Principal:
    """Who is calling: a key's name, scopes and per-minute limits (0 = unlimited), and ``label``: how
    metrics name the key (its id, or its name when the server's ``metrics_key_names`` asks)."""

    name: str
    scopes: tuple[str, ...]
    rpm: int = 0
    tpm: int = 0
    label: str = "anonymous"

    def allows(self, scope: str) -> bool:
        """Returns True when this caller holds ``scope`` (admin holds all)."""
        return scope in self.scopes or "admin" in self.scopes


def key_label(settings, key_id: int, name: str) -> str:
    """Returns how metrics name a key: ``key-<id>``, or its name when ``settings.metrics_key_names``."""
    return name if settings.metrics_key_names else f"key-{key_id}"


def require(scope: str, *alternatives: str, unless=None):
    """Returns a dependency resolving the caller's :class:`Principal`.

    The dependency raises APIError 401 for a missing/unknown/revoked key and 403 without ``scope``
    (or any of ``alternatives``). With ``unless(settings)`` true it checks nothing and returns None.
    """

    async def dependency(request: Request,
                         creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal | None:
        ctx = request.app.state.servelm
        info = request.scope.setdefault("servelm", {})
        if unless is not None and unless(ctx.settings):
            return None
        if ctx.settings.no_auth:
            p = Principal("anonymous", SCOPES, ctx.settings.default_rpm, ctx.settings.default_tpm)
            info["key_name"] = info["key_label"] = p.name
            return p
        if creds is None:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'. Create keys with "
                                "'servelm keys create'.", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        record = ctx.keys.verify(creds.credentials)
        if record is None:
            raise APIError(401, "Invalid API key (unknown or revoked).", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        info["key_name"] = record.name
        info["key_label"] = label = key_label(ctx.settings, record.id, record.name)
        p = Principal(record.name, record.scopes, record.rpm, record.tpm, label)
        if not any(p.allows(s) for s in (scope, *alternatives)):
            need = " or ".join(f"'{s}'" for s in (scope, *alternatives))
            raise APIError(403, f"The key '{record.name}' lacks the {need} scope.", code="insufficient_scope")
        return p

    return dependency
