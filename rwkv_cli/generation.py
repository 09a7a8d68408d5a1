"""Text generation: prefill a prompt, then sample token by token, streaming small records.

``stream_generate`` yields :class:`GenerationChunk` records (new text, token, counts, timings,
finish reason); ``generate`` joins them. Text is released only when it is whole UTF-8 and cannot
turn out to be the start of a stop string, so callers can print every chunk as it comes.

A :class:`Session` is where a text stream stands. The last record of a generation carries the
session after exactly the text that was released (a stop string is cut from the state too), so a
saved session resumes as if the run had never stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from rwkv_cli.models import Model
from rwkv_cli.sampling import (
    SamplingParams,
    apply_penalties,
    new_counts,
    sample_token,
    update_counts,
)
from rwkv_cli.state import State
from rwkv_cli.tokenizer.base import IncrementalDecoder, Tokenizer

PREFILL_CHUNK_LEN = 256  # tokens per forward call while reading a prompt; bounds peak memory
END_OF_TEXT = 0  # token id 0 ends a document in every RWKV vocabulary


@dataclass(frozen=True)
class Session:
    """Everything needed to continue a text stream exactly.

    ``state`` None means the model's zero state; ``logits`` None means no token has been read yet
    (a state-tuning initial state, or a fresh model). ``counts`` are the decayed occurrence counts
    of generated tokens that presence and frequency penalties use.
    """

    state: State | None = None
    logits: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    tokens_consumed: int = 0


@dataclass(frozen=True)
class GenerationChunk:
    """One step of a generation: the text it released and running statistics."""

    text: str
    token: int | None
    prompt_tokens: int
    generated_tokens: int
    prompt_seconds: float
    generation_seconds: float
    finish_reason: str | None = None  # "length", "eos" or "stop" on the last record
    session: Session | None = None  # on the last record: the session after the released text
    kept_tokens: tuple[int, ...] | None = None  # on the last record: the ids spelling that text

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        seconds = self.generation_seconds
        return self.generated_tokens / seconds if seconds > 0 else 0.0


def prefill(
    model: Model,
    tokens: Sequence[int],
    session: Session | None = None,
    chunk_len: int = PREFILL_CHUNK_LEN,
    on_progress: Callable[[int, int], None] | None = None,
) -> Session:
    """Feed ``tokens`` in chunks and return the session after them.

    ``on_progress(done, total)`` is called with the tokens consumed after each chunk.
    """
    session = session or Session()
    state, logits = session.state, session.logits
    for start in range(0, len(tokens), chunk_len):
        logits, state = model.forward(tokens[start : start + chunk_len], state)
        if on_progress is not None:
            on_progress(min(start + chunk_len, len(tokens)), len(tokens))
    return Session(state, logits, session.counts, session.tokens_consumed + len(tokens))


def _advance(model: Model, session: Session, token: int, decay: float) -> Session:
    """The session after one generated token (counted for penalties)."""
    logits, state = model.forward([token], session.state)
    counts = update_counts(_counts(session, model.vocab_size), token, decay)
    return Session(state, logits, counts, session.tokens_consumed + 1)


def _counts(session: Session, vocab_size: int) -> torch.Tensor:
    """The session's penalty counts; zeros, where its logits are, before any token was sampled."""
    if session.counts is not None:
        return session.counts
    return new_counts(vocab_size, device=session.logits.device)


class _StopMatcher:
    """Holds back text that might still grow into a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to release, whether a stop string was hit)."""
        self.pending += text
        hits = [index for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if hits:
            released, self.pending = self.pending[: min(hits)], ""
            return released, True
        keep = self._longest_stop_prefix_suffix()
        cut = len(self.pending) - keep
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return released, False

    def _longest_stop_prefix_suffix(self) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released


class _Rollback:
    """Sessions at token boundaries not yet known to be kept, to cut a stop string from the state.

    Each entry is (characters of generated text before the boundary, tokens generated before it,
    session there). Entries at or before the released text are dropped but the last: a stop
    string can only start after it.
    """

    def __init__(self, start: Session) -> None:
        self.points: list[tuple[int, int, Session]] = [(0, 0, start)]

    def add(self, chars: int, tokens: int, session: Session) -> None:
        self.points.append((chars, tokens, session))

    def prune(self, released_chars: int) -> None:
        while len(self.points) > 1 and self.points[1][0] <= released_chars:
            self.points.pop(0)

    def cut(
        self, model: Model, tokenizer: Tokenizer, text: str, ids: list[int], chars: int
    ) -> tuple[Session, tuple[int, ...]]:
        """The session after the first ``chars`` characters of the generated ``text`` (spelled by
        the generated ``ids``), and the token ids that spell exactly those characters."""
        base_chars, base_tokens, base = max(
            (point for point in self.points if point[0] <= chars), key=lambda point: point[0]
        )
        remainder = tokenizer.encode(text[base_chars:chars])
        session = prefill(model, remainder, base) if remainder else base
        return session, (*ids[:base_tokens], *remainder)


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    params: SamplingParams,
    generator: torch.Generator,
    max_tokens: int,
    stop: Sequence[str] = (),
    session: Session | None = None,
    ban: Sequence[int] = (),
    on_prefill: Callable[[int, int], None] | None = None,
) -> Iterator[GenerationChunk]:
    """Continue ``prompt`` (after ``session``, if given) and yield records as tokens are sampled.

    With nothing read yet and an empty prompt, generation starts from the end-of-text token,
    i.e. a fresh document. Tokens in ``ban`` are never sampled (chat bans end-of-text).
    ``on_prefill(done, total)`` follows the reading of the prompt (see ``prefill``).
    """
    session = session or Session()
    prompt_tokens = tokenizer.encode(prompt)
    if not prompt_tokens and session.logits is None:
        prompt_tokens = [END_OF_TEXT]
    started = time.perf_counter()
    session = prefill(model, prompt_tokens, session, on_progress=on_prefill)
    prompt_seconds = time.perf_counter() - started

    device = session.logits.device  # sampling works where the logits are (sampling.py)
    never_sample = torch.zeros(model.vocab_size, device=device)
    never_sample[tokenizer.token_count :] = -torch.inf  # vocabulary padding decodes to nothing
    never_sample[list(ban)] = -torch.inf
    decoder = IncrementalDecoder(tokenizer)
    matcher = _StopMatcher(stop)
    rollback = _Rollback(session)
    ids: list[int] = []
    text_so_far, released_chars = "", 0
    started = time.perf_counter()

    def record(text: str, token: int | None, finish=None, final=None, kept=None):
        return GenerationChunk(
            text=text,
            token=token,
            prompt_tokens=len(prompt_tokens),
            generated_tokens=len(ids),
            prompt_seconds=prompt_seconds,
            generation_seconds=time.perf_counter() - started,
            finish_reason=finish,
            session=final,
            kept_tokens=kept,
        )

    while len(ids) < max_tokens:
        logits = apply_penalties(session.logits, _counts(session, model.vocab_size), params)
        logits = logits + never_sample.to(logits.device)  # a resumed session may be elsewhere
        token = sample_token(logits, params, generator)
        if token == END_OF_TEXT:
            yield record(matcher.flush() + decoder.flush(), None, "eos", session, tuple(ids))
            return
        ids.append(token)
        decoded = decoder.feed(token)
        text_so_far += decoded
        released, stopped = matcher.push(decoded)
        released_chars += len(released)
        if stopped:
            kept, kept_ids = rollback.cut(model, tokenizer, text_so_far, ids, released_chars)
            yield record(released, token, "stop", kept, kept_ids)
            return
        yield record(released, token)
        session = _advance(model, session, token, params.penalty_decay)
        if not decoder.holding_back:
            rollback.add(len(text_so_far), len(ids), session)
        rollback.prune(released_chars)
    yield record(matcher.flush() + decoder.flush(), None, "length", session, tuple(ids))


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str,
    **options,
) -> str:
    """The whole completion of ``prompt`` as one string (see ``stream_generate``)."""
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, **options))
