"""Pure-ASGI middleware: request id, body-size limit, one access-log line and request counter per request.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses and client disconnects pass through untouched.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException

from servelm.server.errors import APIError, error_response

access_log = logging.getLogger("servelm.access")
_RID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
_UPLOAD = re.compile(r"^/v1/collections/[^/]+/documents/?$")  # document uploads may exceed max_body_bytes


class RequestMiddleware:
    """Wraps every HTTP request; see module docstring."""

    def __init__(self, app, max_body_bytes: int, get_metrics, upload_max_bytes: int | None = None):
        self.app = app
        self.max_body = max_body_bytes
        self.upload_max = upload_max_bytes
        self.get_metrics = get_metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID.match(given) else uuid.uuid4().hex
        info = scope["servelm"] = {"request_id": rid}
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        limit = self.upload_max if self.upload_max and _UPLOAD.match(scope["path"]) else self.max_body
        try:
            if length > limit:
                await error_response(_too_large(limit, length))(scope, receive, send_wrapper)
                return
            seen = 0

            async def receive_wrapper():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:  # chunked bodies carry no Content-Length
                        raise BodyTooLarge(413, f"Request body too large; the limit is {limit} bytes.")
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            latency = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            key = info.get("key_name", "none")
            metrics = self.get_metrics()
            if metrics is not None and endpoint not in ("/metrics", "/health"):
                metrics.requests.labels(endpoint=endpoint, status=str(status), key=info.get("key_label", "none")).inc()
            fields = {"request_id": rid, "method": scope["method"], "path": scope["path"], "status": status,
                      "latency_ms": round(latency * 1000, 2), "key_name": key}
            fields.update({k: v for k, v in info.items() if k not in ("request_id", "key_name", "key_label")})
            access_log.info("request", extra=fields)


class BodyTooLarge(HTTPException):
    """Raised while reading a chunked body past the limit (an HTTPException so FastAPI passes it on)."""

    code = "request_too_large"


def _too_large(limit: int, length: int | None) -> APIError:
    size = f" ({length} bytes)" if length is not None else ""
    return APIError(413, f"Request body too large{size}; the limit is {limit} bytes.",
                    code="request_too_large")
