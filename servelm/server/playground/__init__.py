"""The web playground: a static page served by the server itself, plus the small read-only API it needs.

``install(app)`` adds ``GET /playground`` (the page), ``GET /playground/static/{path}`` (its assets, all in
this package: no CDN), a redirect from ``/`` and the routes of :mod:`servelm.server.playground.api`. The
page talks to the server only through its public API, with the key the user types.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse

from servelm.server.errors import APIError
from servelm.server.playground import api

STATIC = Path(__file__).parent / "static"
# Everything the page loads comes from this origin: scripts, styles, fetches (connect-src), images.
CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
_ASSETS = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file() and p.name != "index.html"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/playground", status_code=307)


@router.get("/playground")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/playground/static/{path:path}")
async def asset(path: str) -> FileResponse:
    if path not in _ASSETS:  # only the files shipped in static/: no path from the URL reaches the disk
        raise APIError(404, f"Unknown playground file: {path}.")
    return FileResponse(_ASSETS[path], headers=HEADERS)


def install(app: FastAPI) -> None:
    """Adds the playground page, its assets and its API routes to ``app``."""
    app.include_router(router)
    app.include_router(api.router)
