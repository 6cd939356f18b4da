"""The API documentation pages, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served offline.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they are blank without internet. Here
their scripts and styles come from the pinned ``fastapi-standalone-docs`` wheel (the upstream
swagger-ui-dist and redoc bundles with their licences; its ReDoc asks for its logo next to the page,
not from cdn.redoc.ly) and are served by this server under ``/docs/static/``. Only the files are used:
the package's own set-up patches FastAPI globally.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from servelm.server.errors import APIError

STATIC = Path(str(files("fastapi_standalone_docs") / "static"))
_ASSETS = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}


async def asset(path: str) -> FileResponse:
    if path not in _ASSETS:  # only the wheel's files: no path from the URL reaches the disk
        raise APIError(404, f"Unknown documentation file: {path}.")
    return FileResponse(_ASSETS[path], headers={"Cache-Control": "public, max-age=86400"})


async def redoc_logo() -> FileResponse:
    return await asset("redoc/logo-mini.svg")


def install(app: FastAPI) -> None:
    """Adds ``/docs``, ``/docs/oauth2-redirect``, ``/redoc`` and their assets to ``app`` (created with
    ``docs_url=None, redoc_url=None``, so FastAPI's CDN pages are not there)."""
    title = f"{app.title} API"
    router = APIRouter(include_in_schema=False)  # per app: the pages read this app's openapi_url
    router.add_api_route("/docs/static/{path:path}", asset, methods=["GET"])
    router.add_api_route("/redoc/logo-mini.svg", redoc_logo, methods=["GET"])  # where the bundle looks for it

    @router.get("/docs")
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=title,
                                   oauth2_redirect_url="/docs/oauth2-redirect",
                                   swagger_js_url="/docs/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/static/swagger/swagger-ui.css",
                                   swagger_favicon_url="/docs/static/fastapi/favicon.png")

    @router.get("/docs/oauth2-redirect")
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=title, redoc_js_url="/docs/static/redoc/redoc.standalone.js",
                              redoc_favicon_url="/docs/static/fastapi/favicon.png", with_google_fonts=False)

    app.include_router(router)
