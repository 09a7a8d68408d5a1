"""A reply as the OpenAI API writes it: the generation's records in, response bodies and stream
events out, for ``/v1/completions`` (``text``) and ``/v1/chat/completions`` (``message`` or
``delta``, with G1's thought as ``reasoning_content``)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from rwkv_cli.generation import GenerationChunk, TokenLogprob
from rwkv_cli.replies import ReplySplitter
from rwkv_cli.tokenizer.base import Tokenizer

# The engine's finish reasons as the API names them: the end of the text is a natural stop.
FINISH_REASONS = {"stop": "stop", "eos": "stop", "length": "length"}
CUT_SHORT = "length"  # a reply the server ended early (it is stopping): cut as by max_tokens
DONE_EVENT = "data: [DONE]\n\n"


def event(data: dict[str, Any]) -> str:
    """One server-sent event carrying ``data`` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Reply:
    """One request's reply as it grows. ``splitter`` (chat) splits out G1's thought; without
    one (completions) the text is returned as the model wrote it. With ``tokenizer``, each
    choice carries the logprobs of its tokens (the request asked for them)."""

    def __init__(
        self,
        model_id: str,
        splitter: ReplySplitter | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.model_id, self.splitter = model_id, splitter
        self.tokenizer = tokenizer  # spells the tokens of logprobs, where asked for
        self.logprobs: list[TokenLogprob] = []
        self._logprobs_sent = 0
        prefix = "chatcmpl" if self.is_chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.thought, self.text = [], []
        self.finish_reason: str | None = None
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.state_id: str | None = None  # the state after the reply, once it is kept

    @property
    def is_chat(self) -> bool:
        return self.splitter is not None

    def add(self, chunk: GenerationChunk | None) -> tuple[str, str]:
        """Take the next record (None: the reply was cut short); return the new (thought, text)."""
        final = chunk is None or chunk.finish_reason is not None
        raw = "" if chunk is None else chunk.text
        thought, text = self.splitter.feed(raw, final) if self.is_chat else ("", raw)
        self.thought.append(thought)
        self.text.append(text)
        if chunk is None:
            self.finish_reason = CUT_SHORT
            return thought, text
        if chunk.logprob is not None:
            self.logprobs.append(chunk.logprob)
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.generated_tokens
        self.cached_tokens = chunk.cached_tokens
        if final:
            self.finish_reason = FINISH_REASONS[chunk.finish_reason]
        return thought, text

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def body(self) -> dict[str, Any]:
        """The whole reply, as a non-streaming response."""
        text = "".join(self.text)
        if self.is_chat:
            message = {"role": "assistant", "content": text}
            thought = "".join(self.thought)
            if thought:
                message["reasoning_content"] = thought
            choice = self._choice({"message": message})
        else:
            choice = self._choice({"text": text})
        return self._envelope("chat.completion" if self.is_chat else "text_completion") | {
            "choices": [choice],
            "usage": self.usage(),
            **self._state(),
        }

    def opening(self) -> dict[str, Any] | None:
        """The first stream chunk of a chat (the assistant's role); None for a completion."""
        return self._chunk({"role": "assistant", "content": ""}, "") if self.is_chat else None

    def chunk(self, thought: str, text: str) -> dict[str, Any] | None:
        """The stream chunk for new text (and the finish reason, on the last); None where
        there is nothing to send."""
        fresh = len(self.logprobs) > self._logprobs_sent
        if not thought and not text and not fresh and self.finish_reason is None:
            return None
        delta = {}
        if thought:
            delta["reasoning_content"] = thought
        if text or not self.is_chat:
            delta["content"] = text
        return self._chunk(delta, text)

    def usage_chunk(self) -> dict[str, Any]:
        """The stream's last chunk with ``include_usage``: no choices, the usage."""
        return self._envelope(self._chunk_object) | {"choices": [], "usage": self.usage()}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.is_chat else "text_completion"

    def _chunk(self, delta: dict[str, Any], text: str) -> dict[str, Any]:
        choice = self._choice({"delta": delta} if self.is_chat else {"text": text})
        return self._envelope(self._chunk_object) | {"choices": [choice], **self._state()}

    def _state(self) -> dict[str, Any]:
        """``state_id`` (an extension), on the whole reply and on a stream's last chunk."""
        return {} if self.state_id is None else {"state_id": self.state_id}

    def _choice(self, content: dict[str, Any]) -> dict[str, Any]:
        """A choice with the logprobs of the tokens not sent yet, where asked for."""
        entries = self.logprobs[self._logprobs_sent :]
        self._logprobs_sent = len(self.logprobs)
        logprobs = None if self.tokenizer is None else self._logprobs(entries)
        return {"index": 0, **content, "finish_reason": self.finish_reason, "logprobs": logprobs}

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """``entries`` as the chat API (``content``) or the completions API writes them."""
        if self.is_chat:
            return {"content": [self._chat_entry(entry) for entry in entries], "refusal": None}
        return {
            "tokens": [self._spell(entry.token) for entry in entries],
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [
                {self._spell(token): logprob for token, logprob in entry.top} for entry in entries
            ],
        }

    def _chat_entry(self, entry: TokenLogprob) -> dict[str, Any]:
        top = [self._chat_token(token, logprob) for token, logprob in entry.top]
        return self._chat_token(entry.token, entry.logprob) | {"top_logprobs": top}

    def _chat_token(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self.tokenizer.token_bytes(token)
        return {"token": self._spell(token), "logprob": logprob, "bytes": list(raw)}

    def _spell(self, token: int) -> str:
        """A token's text (a token that holds part of a character shows U+FFFD for it)."""
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}
