"""OpenAI-shaped errors over HTTP: every failure (a ``servelm.serving.errors.ServingError`` or an engine error)
becomes one JSON body shape in the handlers here, which never leak internals."""
from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from servelm.engine import EngineDeadError, InvalidRequestError, RequestFailedError
from servelm.safety import CircuitOpenError
from servelm.serving.errors import BadInput, ClientGone, ServingError  # noqa: F401 (ClientGone: re-exported)

log = logging.getLogger("servelm.server")

# The serving layer's error is the API's: one type, one body shape (servelm.serving.errors); here it meets HTTP.
APIError = ServingError


def error_response(exc: ServingError) -> JSONResponse:
    """Returns the JSON response carrying ``exc`` (its status, OpenAI error body and headers)."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> BadInput:
    """Returns a 400 ``invalid_request_error`` (``code`` ``invalid_value`` unless a more precise one is given)."""
    return BadInput(message, param, code)


def from_engine(exc: InvalidRequestError) -> BadInput:
    """Returns the 400 for an engine-side validation failure (the engine's own wording, as given)."""
    return BadInput(exc.message, exc.param)


def circuit_open(exc: CircuitOpenError) -> APIError:
    """Returns the 503 (with Retry-After: when the breaker lets a trial request through) while the engine's
    circuit breaker is open after repeated engine failures."""
    return APIError(503, "The engine failed repeatedly and is resting; retry after the Retry-After delay.",
                    code="circuit_open", headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})


def request_failed(exc: RequestFailedError) -> APIError:
    """Returns the 500 for a request the engine failed alone (other requests were served)."""
    return APIError(500, f"Generation failed inside the engine for this request ({exc}); other requests are "
                         "unaffected. Change the request's parameters or report the error.",
                    code="request_failed", type="server_error")


# pydantic's type errors (the JSON value has the wrong type) -> what OpenAI's message says was expected
_EXPECTED = {"bool_type": "a boolean", "bool_parsing": "a boolean", "int_type": "an integer",
             "int_parsing": "an integer", "int_from_float": "an integer", "float_type": "a number",
             "float_parsing": "a number", "string_type": "a string", "list_type": "an array",
             "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object"}


def _json_type(value) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """Turns pydantic's error list into one plain sentence, the offending field and OpenAI's error code."""
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None, "invalid_value"
    err = errors[0]
    kind = err.get("type")
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    # pydantic adds the union member or validator name to loc (e.g. "str", "function-after[...]",
    # "literal['none','auto']"); a user needs only the field path.
    loc = [p for p in loc if not (p.startswith(("function-", "tagged-union", "list[", "dict[", "literal[")) or p in (
        "str", "int", "float", "bool", "list", "dict", "constrained-str", "constrained-int"))]
    param = ".".join(loc) or None
    if kind == "json_invalid":
        return "The request body is not valid JSON.", None, "invalid_json"
    if kind == "unsupported_parameter":  # raised by a schema for a field servelm refuses
        return f"{err['msg']}", err["ctx"]["param"], "unsupported_parameter"
    if kind == "integer_out_of_range":  # a schema's 64-bit bound on every integer (schemas.first_wide_int)
        where = ".".join(p for p in (*loc, err["ctx"]["param"]) if p != "body")
        return f"Invalid value for '{where}': integers must lie between -2**63 and 2**63-1.", where, "invalid_value"
    if kind == "missing" and not param:
        return "The request body is empty; send a JSON object.", None, "invalid_value"
    if param and (kind == "missing" or (err.get("input", 0) is None and kind in _EXPECTED)):
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"  # absent or null
    if kind in _EXPECTED and param:
        return (f"Invalid type for '{param}': expected {_EXPECTED[kind]}, but got {_json_type(err.get('input'))} "
                "instead.", param, "invalid_type")
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if param:
        return f"Invalid value for '{param}': {msg}.", param, "invalid_value"
    if kind in ("model_attributes_type", "dict_type", "model_type"):
        return "The request body must be a JSON object.", None, "invalid_type"
    return f"{msg}.", None, "invalid_value"


def install_handlers(app: FastAPI) -> None:
    """Registers the handlers mapping every failure to an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(InvalidRequestError)
    async def _engine_invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(from_engine(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in ctype:
            return error_response(BadInput("The request body must be JSON, sent with 'Content-Type: "
                                           f"application/json' (got '{ctype or 'none'}').", code="invalid_content_type"))
        message, param, code = _validation_message(exc)
        return error_response(BadInput(message, param, code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None)
        if exc.status_code == 404:
            message = f"Unknown route: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's words for a body json.loads gave up on (e.g. nested too deep)
            message, code = "The request body is not valid JSON.", "invalid_json"
        else:
            message = str(exc.detail)
        return error_response(APIError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(APIError(503, f"The engine is not running ({exc}); retry shortly.", code="engine_unavailable",
                        headers={"Retry-After": "5"}))

    @app.exception_handler(CircuitOpenError)
    async def _circuit_open(request: Request, exc: CircuitOpenError) -> JSONResponse:
        return error_response(circuit_open(exc))

    @app.exception_handler(RequestFailedError)
    async def _request_failed(request: Request, exc: RequestFailedError) -> JSONResponse:
        return error_response(request_failed(exc))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; only the access log sees it

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request.scope.get("servelm", {}).get("request_id")
        log.exception("unhandled error", extra={"request_id": rid})
        return error_response(APIError(500, f"Internal server error (request id {rid}).", type="api_error"))
