"""Typed failures of a request, in OpenAI's error shape (every protocol servelm speaks reports errors so).

``servelm.server.errors`` turns any :class:`ServingError` into an HTTP response in one place; code here
raises the precise kind (:class:`BadInput`, :class:`Refused`) and never builds a response itself.
"""
from __future__ import annotations

# OpenAI's error "type" per status
_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
    413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
    504: "timeout_error",
}


class ServingError(Exception):
    """A failure the client is told about as ``{"error": {message, type, param, code}}``; ``status`` is its
    class in HTTP terms (400 the request, 404 unknown, 429 limits, 503/504 the server)."""

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


class BadInput(ServingError):
    """The request cannot be served as sent; the message says what to change (400)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(400, message, param=param, code=code)


class Refused(ServingError):
    """The input guard refused the request (400, code ``content_filter``, or ``context_length_exceeded``
    when only its length is the problem); the message names the scanner and its reason."""

    def __init__(self, message: str, param: str | None = None, code: str = "content_filter"):
        super().__init__(400, message, param=param, code=code)


class ClientGone(Exception):
    """The client disconnected before the answer was ready; there is nobody to answer."""
