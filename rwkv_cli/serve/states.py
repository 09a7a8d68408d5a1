"""``/v1/states``: named states a client keeps on the server and continues by id (an extension).

- ``POST /v1/states`` ``{"text": ...}`` or ``{"messages": [...]}`` (whole turns), optional
  ``"id"``: the text is read once and its state kept; answers the state's description.
- ``GET /v1/states``: every state kept; ``GET /v1/states/{id}``: the state file itself, as
  ``rwkv save-state`` writes it (``rwkv load-state`` and ``--state`` read it).
- ``PUT /v1/states/{id}``: a state file (body: its bytes) to keep under ``id``, checked against
  the model exactly as ``--state`` checks one; ``DELETE /v1/states/{id}``.

A completion or chat request's ``"state": "<id>"`` starts it from that state, and every
response names the state after its reply (``"state_id"``: for a chat, after the turn's end too),
so a client goes on by id without sending the history again. States live in a
:class:`StateStore` (files in ``--state-dir``, or a temporary folder); only the newest 100
reply states are kept.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rwkv_cli.batching.generate import BatchChunk, BatchRequest
from rwkv_cli.errors import StateFileError
from rwkv_cli.generation import Session
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.serve.errors import ApiError, BadRequest, NotFound, ServerError
from rwkv_cli.serve.gate import Gate
from rwkv_cli.serve.protocol import MAX_PROMPT_TOKENS, parse_state, written_messages
from rwkv_cli.serve.scheduler import Scheduler
from rwkv_cli.statecache import state_bytes
from rwkv_cli.statestore import StateStore, StoredState, StoreFullError, UnknownStateError
from rwkv_cli.templates import Template

# Beyond its recurrent state a state file holds the next-token logits, the penalty counts (one
# float32 per vocabulary entry each), a sampler's state and metadata: room for those.
FILE_OVERHEAD_BYTES = 1 << 20


class InsufficientStorage(ApiError):
    status, type = 507, "server_error"


class StateRoutes:
    """The handlers of ``/v1/states``, and ``session_for`` for requests that name a state."""

    def __init__(
        self,
        loaded: LoadedModel,
        scheduler: Scheduler,
        store: StateStore,
        gate: Gate,
        template: Template,
    ) -> None:
        self.loaded, self.scheduler, self.store = loaded, scheduler, store
        self.gate, self.template = gate, template
        vocabulary = loaded.model.vocab_size * 4  # float32 logits, and as many counts
        self.max_file_bytes = (
            state_bytes(loaded.model.new_state()) + 2 * vocabulary + FILE_OVERHEAD_BYTES
        )

    async def keep_reply(self, session: Session) -> str:
        """Keep the state after a reply; its new id."""
        return await self._stored(self.store.keep_reply, session)

    async def session_for(self, state_id: str) -> Session:
        """The session kept under ``state_id``: 404 if there is none, 400 if it does not fit."""
        return await self._stored(self.store.session, state_id)

    async def create(self, request: Request) -> Response:
        self.gate.authorize(request)
        content = parse_state(await self.gate.read_json(request))
        tokenizer = self.loaded.tokenizer
        written = written_messages(content.messages, self.template)
        pieces = self.template.turns(written) if content.messages else [content.prompt]
        prompt = tuple(token for piece in pieces for token in tokenizer.encode(piece))
        if len(prompt) > MAX_PROMPT_TOKENS:
            raise BadRequest(
                f"the text is {len(prompt)} tokens; this server reads at most {MAX_PROMPT_TOKENS}",
                param="messages" if content.messages else "text",
                code="context_length_exceeded",
            )
        ticket = self.scheduler.submit(BatchRequest(prompt, max_tokens=0))
        record = await ticket.records.get()  # reading a prompt with no reply gives one record
        if not isinstance(record, BatchChunk):
            raise ServerError("the text could not be read", code="generation_failed")
        session, tail = record.chunk.session, content.prompt or content.messages[-1][1]
        state_id = await self._stored(self.store.add, session, content.state_id, tail)
        return JSONResponse(await self._described(state_id), status_code=201)

    async def listing(self, request: Request) -> Response:
        self.gate.authorize(request)
        described = [await self._described(state_id) for state_id in self.store.ids()]
        return JSONResponse({"object": "list", "data": described})

    async def download(self, request: Request) -> Response:
        self.gate.authorize(request)
        state_id = request.path_params["state_id"]
        data = await self._stored(self.store.file_bytes, state_id)
        headers = {"Content-Disposition": f'attachment; filename="{state_id}.rwkvstate"'}
        return Response(data, media_type="application/octet-stream", headers=headers)

    async def upload(self, request: Request) -> Response:
        self.gate.authorize(request)
        data = await self.gate.read_bytes(request, self.max_file_bytes)
        stored = await self._stored(self.store.upload, request.path_params["state_id"], data)
        return JSONResponse(_description(stored))

    async def delete(self, request: Request) -> Response:
        self.gate.authorize(request)
        state_id = request.path_params["state_id"]
        await self._stored(self.store.delete, state_id)
        return JSONResponse({"id": state_id, "object": "state.deleted", "deleted": True})

    async def _described(self, state_id: str) -> dict[str, Any]:
        return _description(await self._stored(self.store.info, state_id))

    async def _stored(self, action, *arguments):
        """``action(*arguments)`` on the store (files: off the event loop), its errors as the
        API answers them."""
        try:
            return await run_in_threadpool(action, *arguments)
        except UnknownStateError as error:
            raise NotFound(error.message, param="state", code="state_not_found") from None
        except StoreFullError as error:
            raise InsufficientStorage(error.message, code="too_many_states") from None
        except StateFileError as error:
            hint = f" ({error.hint})" if error.hint else ""
            raise BadRequest(error.message + hint, param="state", code="invalid_state") from None


def _description(stored: StoredState) -> dict[str, Any]:
    return {
        "id": stored.id,
        "object": "state",
        "created": int(stored.created.timestamp()),
        "tokens": stored.tokens,
        "bytes": stored.bytes,
    }
