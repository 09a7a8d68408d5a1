"""The server's ASGI application (Starlette): routes, the API key, body limits and errors.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (``stream``: server-sent events ending in ``data: [DONE]``), and
``/v1/states`` (serve/states.py). Every
error is answered OpenAI-shaped (serve/errors.py), unknown routes and a failing request included;
the request that failed gets a 500 and the server goes on. A client that goes away cancels its
request: its place in the batch is free before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rwkv_cli.batching.generate import BatchChunk, BatchFailure
from rwkv_cli.chat import template_for
from rwkv_cli.generation import GenerationChunk
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.replies import ReplySplitter
from rwkv_cli.serve.errors import ApiError, BadRequest, NotFound, ServerError
from rwkv_cli.serve.gate import Gate
from rwkv_cli.serve.protocol import ApiRequest, engine_request, parse_chat, parse_completion
from rwkv_cli.serve.responses import DONE_EVENT, Reply, event
from rwkv_cli.serve.scheduler import Record, Scheduler, Ticket
from rwkv_cli.serve.states import StateRoutes
from rwkv_cli.statestore import StateStore

logger = logging.getLogger(__name__)

# The largest request body read. A prompt of the most tokens a request may have (32768) is about
# 150 KB of text, and a long conversation in JSON a few times that: 4 MiB leaves room for both.
MAX_BODY_BYTES = 4 * 1024 * 1024
CLIENT_GONE = 499  # the status logged for a request whose client left first (nginx's convention)


def create_app(
    loaded: LoadedModel,
    scheduler: Scheduler,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    store: StateStore | None = None,
) -> Starlette:
    """The application serving ``loaded`` through ``scheduler``, which it starts and closes
    with itself; with ``api_key``, ``/v1`` routes need ``Authorization: Bearer <key>``. Named
    states live in ``store`` (None: a temporary one, removed when the application stops)."""
    own_store = store is None
    store = store or StateStore(loaded)
    api = _Api(loaded, scheduler, Gate(api_key, max_body_bytes), store)
    states = api.states

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.close)
            if own_store:
                store.close()

    return Starlette(
        routes=[
            Route("/health", api.health, methods=["GET"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/states", states.listing, methods=["GET"]),
            Route("/v1/states", states.create, methods=["POST"]),
            Route("/v1/states/{state_id}", states.download, methods=["GET"]),
            Route("/v1/states/{state_id}", states.upload, methods=["PUT"]),
            Route("/v1/states/{state_id}", states.delete, methods=["DELETE"]),
        ],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        lifespan=lifespan,
    )


class _Api:
    """The routes' handlers, around one model and its scheduler."""

    def __init__(
        self, loaded: LoadedModel, scheduler: Scheduler, gate: Gate, store: StateStore
    ) -> None:
        self.loaded, self.scheduler, self.gate = loaded, scheduler, gate
        self.template = template_for(loaded)
        self.states = StateRoutes(loaded, scheduler, store, gate, self.template)
        self.model_id = loaded.spec
        self.created = int(time.time())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        self.gate.authorize(request)
        model = {"id": self.model_id, "object": "model", "created": self.created}
        return JSONResponse({"object": "list", "data": [model | {"owned_by": "rwkv-cli"}]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat)

    async def _generate(self, request: Request, parse: Callable[[Any], ApiRequest]) -> Response:
        self.gate.authorize(request)
        wanted = parse(await self.gate.read_json(request))
        if wanted.model is not None and wanted.model != self.model_id:
            raise NotFound(
                f"the model {wanted.model!r} is not served here; GET /v1/models lists the one "
                "that is",
                param="model",
                code="model_not_found",
            )
        tokenizer = self.loaded.tokenizer
        splitter = ReplySplitter.for_template(self.template, wanted.think)
        spelling = tokenizer if wanted.logprobs is not None else None
        reply = Reply(self.model_id, splitter if wanted.is_chat else None, spelling)
        session = await self.states.session_for(wanted.state) if wanted.state else None
        ticket = self.scheduler.submit(engine_request(wanted, tokenizer, self.template, session))
        if wanted.stream:
            events = self._events(ticket, reply, wanted.include_usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await self._whole(request, ticket, reply)

    async def _events(
        self, ticket: Ticket, reply: Reply, include_usage: bool
    ) -> AsyncIterator[str]:
        """The reply as server-sent events; leaving early (the client went away) cancels it."""
        try:
            if (opening := reply.opening()) is not None:
                yield event(opening)
            while reply.finish_reason is None:
                new = reply.add(await self._next(ticket, reply))
                if (chunk := reply.chunk(*new)) is not None:
                    yield event(chunk)
            if include_usage:
                yield event(reply.usage_chunk())
        except ApiError as error:  # the headers are sent: the error is the stream's last event
            logger.error("a streaming request failed: %s", error.message)
            yield event(error.body())
        finally:
            if reply.finish_reason is None:
                self.scheduler.cancel(ticket)
        yield DONE_EVENT

    async def _whole(self, request: Request, ticket: Ticket, reply: Reply) -> Response:
        """The reply as one response, or nothing if the client goes away first (which
        cancels it)."""
        collecting = asyncio.ensure_future(self._collect(ticket, reply))
        leaving = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
            if not collecting.done():
                collecting.cancel()
                self.scheduler.cancel(ticket)
        if collecting.cancelled():
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(collecting.result())

    async def _collect(self, ticket: Ticket, reply: Reply) -> dict[str, Any]:
        while reply.finish_reason is None:
            reply.add(await self._next(ticket, reply))
        return reply.body()

    async def _next(self, ticket: Ticket, reply: Reply) -> GenerationChunk | None:
        """The request's next record; the state after a finished reply is kept first, so that
        its last chunk can name it (``state_id``)."""
        generation = _generation(await ticket.records.get())
        if generation is not None and generation.session is not None:
            reply.state_id = await self.states.keep_reply(generation.session)
        return generation


def _generation(record: Record) -> GenerationChunk | None:
    """A record's generation chunk (None: the server cut the reply short); a failed request
    raises its 500."""
    if isinstance(record, BatchChunk):
        return record.chunk
    if isinstance(record, BatchFailure):
        raise ServerError(record.error.message, code="generation_failed")
    if record.error is not None:
        raise ServerError(f"the engine failed: {record.error}", code="engine_failed")
    return None


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the body is read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


async def _http_error(request: Request, error: Exception) -> Response:
    """Starlette's own errors (no such route, a method the route does not take)."""
    assert isinstance(error, HTTPException)
    kind = NotFound if error.status_code == 404 else BadRequest
    wrapped = kind(f"{request.method} {request.url.path}: {error.detail}")
    wrapped.status = error.status_code  # 404, or 405 for a method the route does not take
    return await _api_error(request, wrapped)


async def _unexpected_error(request: Request, error: Exception) -> Response:
    """A bug met by one request: a 500 for it (the traceback goes to the log)."""
    return await _api_error(
        request, ServerError(f"unexpected {type(error).__name__}: {error}", code="internal_error")
    )
