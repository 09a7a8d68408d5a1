"""Errors as the OpenAI API writes them: ``{"error": {"message", "type", "param", "code"}}`` with
the HTTP status that says who is at fault (4xx the client, 5xx the server)."""

from __future__ import annotations

from typing import Any

# Seconds a client is asked to wait (Retry-After) when the queue is full: about the time a few
# replies take to finish on a CPU and free their places.
RETRY_AFTER_SECONDS = 2


class ApiError(Exception):
    """A request answered with an error: its status, message, the field at fault and a code."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ApiError):
    """400: the body is not a request this server can run as asked."""


class Unauthorized(ApiError):
    status, type = 401, "authentication_error"


class NotFound(ApiError):
    status, type = 404, "not_found_error"


class TooLarge(ApiError):
    status = 413


class ServerError(ApiError):
    status, type = 500, "server_error"


class Overloaded(ApiError):
    """503: the queue is full, or the server is stopping; the client may try again later."""

    status, type = 503, "server_error"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}
