"""Conversations: turn templates and a chat session whose model state always equals its transcript.

A :class:`Chat` keeps the transcript as messages, each with the exact token ids the model read for
it, and the model session after the last one. Replaying the messages' tokens from the starting
session gives the same state, which is how ``/undo`` and ``/system`` recompute when no snapshot is
at hand; recent snapshots make ``/retry`` and ``/undo`` instant.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from rwkv_cli.batching.generate import BatchRequest
from rwkv_cli.generation import END_OF_TEXT, GenerationChunk, Session, prefill, stream_generate
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.sampling import SamplingParams
from rwkv_cli.settings import CHAT_SAMPLING, MAX_REPLY_TOKENS
from rwkv_cli.templates import TEMPLATES, Template
from rwkv_cli.tokenizer.base import Tokenizer

SNAPSHOTS_KEPT = 8  # sessions remembered for /retry and /undo; older ones are replayed


def template_for(loaded: LoadedModel) -> Template:
    """G1 for G1 models (named so on the Hub), World for other World models, Pile otherwise."""
    if loaded.tokenizer.vocab_size != 65536:
        return TEMPLATES["pile"]
    names = f"{loaded.spec} {loaded.resolved}".lower()
    return TEMPLATES["g1"] if re.search(r"(^|[^a-z])g1", names) else TEMPLATES["world"]


def reply_request(
    tokenizer: Tokenizer,
    template: Template,
    messages: Sequence[tuple[str, str]],
    *,
    think: bool = False,
    session: Session | None = None,
    stop: tuple[str, ...] = (),
    **options,
) -> BatchRequest:
    """The request for the reply to a conversation given as (role, text) pairs, written out as
    ``Chat`` writes it: it stops where the template's turn ends (and at ``stop``), never ends the
    text, and counts penalties afresh, as a chat's replies do. ``options`` are the request's
    other fields (max_tokens, params, seed)."""
    pieces = template.turns(messages, think)
    tokens = tuple(token for piece in pieces for token in tokenizer.encode(piece))
    if session is not None:
        session = replace(session, counts=None)
    return BatchRequest(
        tokens,
        stop=(*template.stops, *stop),
        session=session,
        ban=(END_OF_TEXT,),
        **options,
    )


@dataclass(frozen=True)
class Message:
    """One turn of the transcript: its role, its text, and the token ids the model read for it."""

    role: str  # "system", "user" or "assistant"
    text: str
    tokens: tuple[int, ...]


@dataclass
class Chat:
    """A conversation with a model; ``session`` is always the state after ``messages``."""

    loaded: LoadedModel
    template: Template
    params: SamplingParams = CHAT_SAMPLING
    generator: torch.Generator = field(default_factory=torch.Generator)
    max_reply_tokens: int = MAX_REPLY_TOKENS
    think: bool = False
    start: Session = field(default_factory=Session)  # before the first message
    messages: list[Message] = field(default_factory=list)
    session: Session | None = None
    _snapshots: dict[int, Session] = field(default_factory=dict)  # message count -> session

    def __post_init__(self) -> None:
        if self.session is None:
            self.session = self._replay(self.messages)
        self._remember()

    @property
    def thinking_ignored(self) -> str | None:
        """Why thinking is switched on to no effect (the template has no thinking part)."""
        if self.think and not self.template.supports_thinking:
            return (
                f"thinking works with the g1 template only; the {self.template.name} template "
                "has no thinking part"
            )
        return None

    # --- turns ---------------------------------------------------------------------------------

    def send(
        self, text: str, on_prefill: Callable[[int, int], None] | None = None
    ) -> Iterator[GenerationChunk]:
        """Add a user message and stream the reply; the reply joins the transcript at the end.
        The message is read before this returns; ``on_prefill(done, total)`` follows that."""
        turn = self.template.user_turn(text, self.think)
        message = Message("user", text, tuple(self.loaded.tokenizer.encode(turn)))
        self._append(message, on_prefill)
        return self._reply()

    def retry(self) -> Iterator[GenerationChunk]:
        """A new sample for the last reply, from the session before it (nothing recomputed)."""
        if not self.messages or self.messages[-1].role != "assistant":
            raise ValueError("there is no reply to retry")
        self._truncate(len(self.messages) - 1)
        return self._reply()

    def undo(self) -> None:
        """Drop the last exchange (the user's message and the reply)."""
        users = [index for index, message in enumerate(self.messages) if message.role == "user"]
        if not users:
            raise ValueError("there is nothing to undo")
        self._truncate(users[-1])

    def reset(self) -> None:
        """Forget the conversation but keep the system prompt."""
        self._truncate(1 if self.messages and self.messages[0].role == "system" else 0)

    def set_system(self, text: str) -> None:
        """Replace the system prompt (empty: remove it); the conversation is read again after it."""
        rest = [message for message in self.messages if message.role != "system"]
        if text.strip():
            turn = self.template.system_turn(text)
            rest.insert(0, Message("system", text, tuple(self.loaded.tokenizer.encode(turn))))
        session = self._replay(rest)  # first: Ctrl-C while it runs changes nothing
        self.messages, self.session = rest, session
        self._snapshots.clear()
        self._remember()

    @property
    def system(self) -> str | None:
        first = self.messages[0] if self.messages else None
        return first.text if first is not None and first.role == "system" else None

    # --- persistence ---------------------------------------------------------------------------

    def to_metadata(self) -> dict:
        """The ``chat`` entry of a state file: template, thinking switch and transcript."""
        return {
            "template": self.template.name,
            "think": self.think,
            "messages": [
                {"role": m.role, "text": m.text, "tokens": list(m.tokens)} for m in self.messages
            ],
        }

    @staticmethod
    def messages_from_metadata(chat: dict) -> list[Message]:
        return [Message(m["role"], m["text"], tuple(m["tokens"])) for m in chat["messages"]]

    # --- internals -----------------------------------------------------------------------------

    def _reply(self) -> Iterator[GenerationChunk]:
        before = replace(self.session, counts=None)  # penalties count each reply afresh
        text, kept_tokens, last = [], None, None
        try:
            for last in stream_generate(
                self.loaded.model,
                self.loaded.tokenizer,
                "",
                params=self.params,
                generator=self.generator,
                max_tokens=self.max_reply_tokens,
                stop=self.template.stops,
                session=before,
                ban=(END_OF_TEXT,),
            ):
                text.append(last.text)
                yield last
            kept_tokens = last.kept_tokens
        finally:  # also on Ctrl-C or an abandoned stream: keep what was shown
            self._close_reply(before, "".join(text), kept_tokens, last)

    def _close_reply(self, before: Session, text: str, kept, last) -> None:
        """Append the reply and the turn's end; the state follows exactly that text."""
        tokenizer = self.loaded.tokenizer
        end = tuple(tokenizer.encode(self.template.reply_end()))
        if kept is None:  # interrupted: spell the text shown so far afresh
            body = tuple(tokenizer.encode(text))
            session = prefill(self.loaded.model, body + end, before)
        else:
            body = kept
            session = prefill(self.loaded.model, end, last.session)
        self.messages.append(Message("assistant", text, body + end))
        self.session = replace(session, counts=None)
        self._remember()

    # Each change computes the new session before it touches the transcript, so a Ctrl-C while
    # the model reads leaves the chat as it was.

    def _append(
        self, message: Message, on_prefill: Callable[[int, int], None] | None = None
    ) -> None:
        session = prefill(self.loaded.model, message.tokens, self.session, on_progress=on_prefill)
        self.messages.append(message)
        self.session = session
        self._remember()

    def _truncate(self, count: int) -> None:
        kept = self.messages[:count]
        snapshot = self._snapshots.get(count)
        self.session = snapshot if snapshot is not None else self._replay(kept)
        self.messages = kept
        self._snapshots = {n: s for n, s in self._snapshots.items() if n <= count}
        self._remember()

    def _replay(self, messages: list[Message]) -> Session:
        session = self.start
        for message in messages:
            session = prefill(self.loaded.model, message.tokens, session)
        return replace(session, counts=None)

    def _remember(self) -> None:
        self._snapshots[len(self.messages)] = self.session
        for count in sorted(self._snapshots)[:-SNAPSHOTS_KEPT]:
            del self._snapshots[count]
