"""OpenAI-shaped errors: one exception type, one body shape, handlers that never leak internals."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from servelm.engine import EngineDeadError, InvalidRequestError

log = logging.getLogger("servelm.server")

# Default OpenAI error "type" per HTTP status.
_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
    413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error the client gets as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "api_error")
        self.headers = headers or {}

    def body(self) -> dict:
        """Returns the OpenAI error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """Returns the JSON response carrying this error."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before the answer was ready; there is nobody to answer."""


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """Returns a 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)


def from_engine(exc: InvalidRequestError) -> APIError:
    """Returns the 400 for an engine-side validation failure."""
    return APIError(400, exc.message, param=exc.param, code="invalid_value")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Turns pydantic's error list into one plain sentence and the offending field."""
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    # pydantic adds the union member or validator name to loc (e.g. "str", "function-after[...]");
    # a user needs only the field path.
    loc = [p for p in loc if not (p.startswith(("function-", "tagged-union", "list[", "dict[")) or p in (
        "str", "int", "float", "bool", "list", "dict"))]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if err.get("type") == "missing" and param:
        return f"Missing required parameter: '{param}'.", param
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if param:
        return f"Invalid value for '{param}': {msg}.", param
    if err.get("type") in ("model_attributes_type", "dict_type"):
        return "The request body must be a JSON object.", None
    return f"{msg}.", None


def install_handlers(app: FastAPI) -> None:
    """Registers the handlers mapping every failure to an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(InvalidRequestError)
    async def _engine_invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return from_engine(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in ctype:
            return APIError(400, f"The request body must be JSON, sent with 'Content-Type: application/json' "
                                 f"(got '{ctype or 'none'}').", code="invalid_content_type").response()
        message, param = _validation_message(exc)
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown route: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message, code=getattr(exc, "code", None),
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return APIError(503, f"The engine is not running ({exc}); retry shortly.", code="engine_unavailable",
                        headers={"Retry-After": "5"}).response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; only the access log sees it

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request.scope.get("servelm", {}).get("request_id")
        log.exception("unhandled error", extra={"request_id": rid})
        return APIError(500, f"Internal server error (request id {rid}).", type="api_error").response()
