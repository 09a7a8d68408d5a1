"""What every request passes before a route runs it: the API key and the body's size."""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.requests import Request

from rwkv_cli.serve.errors import BadRequest, TooLarge, Unauthorized


class Gate:
    """Checks a request's ``Authorization: Bearer <key>`` (when the server has a key; compared
    in constant time) and reads its body no further than a limit."""

    def __init__(self, api_key: str | None, max_body_bytes: int) -> None:
        self.api_key, self.max_body_bytes = api_key, max_body_bytes

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.api_key.encode()):
            raise Unauthorized(
                "a valid API key is needed: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, read no further than the size limit."""
        body = await self.read_bytes(request, self.max_body_bytes)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadRequest(f"the body is not JSON: {error}") from None

    async def read_bytes(self, request: Request, limit: int) -> bytes:
        """The body, read no further than ``limit`` bytes (413 beyond)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise _too_large(limit)
        return bytes(body)


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"the request body is over {limit} bytes", code="body_too_large")
