"""Text generation: prefill a prompt, then sample token by token, streaming small records.

``stream_generate`` yields :class:`GenerationChunk` records (new text, token, counts, timings,
finish reason); ``generate`` joins them. Text is released only when it is whole UTF-8 and cannot
turn out to be the start of a stop string, so callers can print every chunk as it comes.
``stream_generate`` runs a :class:`TokenStream`: one generation's sampling without the forward
pass, which is how a batch (rwkv_cli/batching/) runs many generations with one forward a step.

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
    token_logprobs,
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
class TokenLogprob:
    """How likely a sampled token was: its log-probability under the distribution it was drawn
    from before temperature and filters (the model's, after penalties and bans), and the most
    probable tokens with theirs, most probable first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    logprob: TokenLogprob | None = None  # the sampled token's, when asked for (``logprobs``)
    cached_tokens: int = 0  # of the prompt's tokens, those resumed from a cached state, not read

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


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int], session: Session) -> list[int]:
    """The token ids to read for ``prompt`` (text, or ids already encoded) after ``session``:
    with nothing read yet, an empty prompt reads the end-of-text token (a fresh document)."""
    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not tokens and session.logits is None:
        tokens = [END_OF_TEXT]
    return tokens


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


class TokenStream:
    """One generation after its prompt was read, a token at a time: sample from the session's
    logits, release text, then move on once the caller has run the model on the token.

    The forward pass is the caller's, so that many streams can share one (batching/generate.py);
    ``stream_generate`` is one stream running the model itself. Start one with ``start``.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        session: Session,
        *,
        params: SamplingParams,
        generator: torch.Generator,
        max_tokens: int,
        stop: Sequence[str] = (),
        ban: Sequence[int] = (),
        logprobs: int | None = None,
        prompt_tokens: int = 0,
        prompt_seconds: float = 0.0,
        cached_tokens: int = 0,
        then_read: Sequence[int] = (),
    ) -> None:
        self.model, self.tokenizer, self.session = model, tokenizer, session
        self.params, self.generator, self.max_tokens = params, generator, max_tokens
        self.logprobs = logprobs  # None: none; N: each token's and the N most probable
        self.prompt_tokens, self.prompt_seconds = prompt_tokens, prompt_seconds
        self.cached_tokens = cached_tokens
        self.then_read = tuple(then_read)  # read after the reply, into the final session
        device = session.logits.device  # sampling works where the logits are (sampling.py)
        self._never_sample = torch.zeros(model.vocab_size, device=device)
        self._never_sample[tokenizer.token_count :] = -torch.inf  # padding decodes to nothing
        self._never_sample[list(ban)] = -torch.inf
        self._decoder = IncrementalDecoder(tokenizer)
        self._matcher = _StopMatcher(stop)
        self._rollback = _Rollback(session)
        self.ids: list[int] = []
        self._text, self._released_chars = "", 0
        self._started = time.perf_counter()

    @classmethod
    def start(
        cls,
        model: Model,
        tokenizer: Tokenizer,
        prompt: str | Sequence[int],
        session: Session | None = None,
        on_prefill: Callable[[int, int], None] | None = None,
        **options,
    ) -> TokenStream:
        """Read ``prompt`` (text, or token ids already encoded) after ``session`` (see
        ``stream_generate``); ``options`` are the constructor's sampling and stopping options."""
        session = session or Session()
        tokens = prompt_ids(tokenizer, prompt, session)
        started = time.perf_counter()
        session = prefill(model, tokens, session, on_progress=on_prefill)
        seconds = time.perf_counter() - started
        return cls(
            model, tokenizer, session, prompt_tokens=len(tokens), prompt_seconds=seconds, **options
        )

    def next_chunk(self) -> GenerationChunk:
        """Sample the next token and return its record. A record with a finish reason is the
        last; after any other, call ``advance`` with the model's output for its token."""
        ids = self.ids
        if len(ids) >= self.max_tokens:
            return self._final("length", self.session, tuple(ids))
        counts = _counts(self.session, self.model.vocab_size)
        logits = apply_penalties(self.session.logits, counts, self.params)
        logits = logits + self._never_sample.to(logits.device)  # a resumed session may be elsewhere
        token = sample_token(logits, self.params, self.generator)
        if token == END_OF_TEXT:
            return self._final("eos", self.session, tuple(ids))
        ids.append(token)
        logprob = None
        if self.logprobs is not None:
            logprob = TokenLogprob(token, *token_logprobs(logits, token, self.logprobs))
        decoded = self._decoder.feed(token)
        self._text += decoded
        released, stopped = self._matcher.push(decoded)
        self._released_chars += len(released)
        if stopped:
            cut = self._rollback.cut(
                self.model, self.tokenizer, self._text, ids, self._released_chars
            )
            return self._record(released, token, "stop", *cut, logprob=logprob)
        return self._record(released, token, logprob=logprob)

    def advance(self, logits: torch.Tensor, state: State) -> None:
        """Take the model's output after the last sampled token: its logits (V,) and state."""
        token = self.ids[-1]
        counts = update_counts(
            _counts(self.session, self.model.vocab_size), token, self.params.penalty_decay
        )
        self.session = Session(state, logits, counts, self.session.tokens_consumed + 1)
        if not self._decoder.holding_back:
            self._rollback.add(len(self._text), len(self.ids), self.session)
        self._rollback.prune(self._released_chars)

    def _final(self, reason: str, session: Session, kept: tuple[int, ...]) -> GenerationChunk:
        text = self._matcher.flush() + self._decoder.flush()
        return self._record(text, None, reason, session, kept)

    def _record(
        self, text, token, finish=None, final=None, kept=None, logprob=None
    ) -> GenerationChunk:
        if final is not None and self.then_read:  # e.g. a chat turn's end after the reply
            final = prefill(self.model, self.then_read, final)
        return GenerationChunk(
            text=text,
            token=token,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=len(self.ids),
            prompt_seconds=self.prompt_seconds,
            generation_seconds=time.perf_counter() - self._started,
            finish_reason=finish,
            session=final,
            kept_tokens=kept,
            logprob=logprob,
            cached_tokens=self.cached_tokens,
        )


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
    stream = TokenStream.start(
        model,
        tokenizer,
        prompt,
        session,
        on_prefill,
        params=params,
        generator=generator,
        max_tokens=max_tokens,
        stop=stop,
        ban=ban,
    )
    while True:
        chunk = stream.next_chunk()
        yield chunk
        if chunk.finish_reason is not None:
            return
        stream.advance(*model.forward([chunk.token], stream.session.state))


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str,
    **options,
) -> str:
    """The whole completion of ``prompt`` as one string (see ``stream_generate``)."""
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, **options))
