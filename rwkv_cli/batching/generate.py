"""Many completions at once: continuous batching in the library.

:class:`ContinuousBatch` runs requests through one :class:`~rwkv_cli.batching.engine.Batch` of
at most ``max_batch`` sequences, a round at a time; ``stream_batch`` drives it over a list of
requests, and a server (rwkv_cli/serve/) over the requests that arrive. A request joins as soon as
there is room: its prompt is read alone, in chunks (``generation.prefill``'s), between decode
steps, then it decodes together with the others, one token each per step. A finished sequence
leaves at once, and the next waiting request takes its place.

Each request samples with its own parameters, penalty counts, stop strings and seeded
generator, row by row from the batch's logits (``generation.TokenStream``, the same code that
``stream_generate`` runs). So a request gives the tokens it gives alone, whatever else is in
the batch: exactly when greedy or seeded, with one caveat. Two or more sequences step through
a batched matrix product whose float32 sums are ordered differently from the one-token kernels
(relative differences of order 1e-7 in the logits). Where two candidates' scores are that
close (a near-tie under greedy decoding, or a seeded draw that lands that close to the edge
between two tokens), a batched run can choose the other one, and from there the texts differ.
A batch of one runs the one-sequence path, bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from rwkv_cli.batching.engine import Batch
from rwkv_cli.errors import RwkvCliError
from rwkv_cli.generation import (
    PREFILL_CHUNK_LEN,
    GenerationChunk,
    Session,
    TokenStream,
    prefill,
    prompt_ids,
)
from rwkv_cli.models import Model
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.settings import DEFAULT_MAX_BATCH
from rwkv_cli.statecache import PrefixCache
from rwkv_cli.tokenizer.base import Tokenizer


@dataclass(frozen=True)
class BatchRequest:
    """One completion to generate: continue ``prompt`` (text, or token ids already encoded, as
    a chat's turns are) after ``session`` (None: a fresh document; a saved session, e.g. a
    system prompt read once, is shared, never changed).

    ``seed`` None draws a fresh one (reported in the result). ``ban`` lists token ids never
    sampled. The other fields mean what ``generation.stream_generate``'s options do.
    """

    prompt: str | tuple[int, ...]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    session: Session | None = None
    ban: tuple[int, ...] = ()
    logprobs: int | None = None  # each token's log-probability and this many alternatives
    then_read: tuple[int, ...] = ()  # read after the reply into its final session (a turn's end)


@dataclass(frozen=True)
class BatchChunk:
    """One record of one request: ``index`` is the request's position among the requests."""

    index: int
    seed: int  # the request's seed (drawn, when it gave none)
    chunk: GenerationChunk  # the last of a request has its finish reason and final session


@dataclass(frozen=True)
class BatchResult:
    """A finished request: ``index`` is its position among the requests."""

    index: int
    text: str
    finish_reason: str  # "stop" (a stop string), "length" (max_tokens) or "eos" (end of text)
    prompt_tokens: int
    completion_tokens: int
    seed: int
    session: Session  # after exactly ``text``: saves as a state file, resumes exactly


@dataclass(frozen=True)
class BatchFailure:
    """A request that could not go on (its prompt could not be read, or its logits could not be
    sampled): it left the batch, and the others went on. ``index`` is its position."""

    index: int
    seed: int | None  # the request's own seed; None where it gave none
    error: RwkvCliError


class ContinuousBatch:
    """Continuous batching one round at a time, for a caller that takes requests while it runs
    (a server) and may drop one at any time.

    ``join`` queues a request under the caller's ``key``; each ``step`` reads waiting prompts
    (about ``PREFILL_CHUNK_LEN`` tokens of them, a chunk at a time), then samples a token for
    every running sequence and runs the model once for all of them, so a long prompt never holds
    the running streams up for more than a chunk. A prompt's chunks start at fixed offsets
    (multiples of the chunk length from the start of the document, as ``generation.prefill``
    reads), whatever else is read beside it, so a request reads its prompt exactly as it would
    alone. ``cancel`` drops a request at once and frees its room.

    With a ``cache`` (statecache.PrefixCache), a request that starts a fresh document resumes
    from the state of the longest prefix of its prompt read before and reads only the rest; the
    states at its chunk boundaries and at the end of its prompt are kept for later requests (the
    next turn of a conversation begins with the last one's prompt). Resuming from a state read
    in other chunks can change logits by float rounding, so a near-tie may go the other way.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        max_batch: int = DEFAULT_MAX_BATCH,
        cache: PrefixCache | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.cache = cache
        self._batch = Batch(model)
        self._reading: dict[int, _Reading] = {}  # key -> prompt being read, oldest first
        self._running: dict[int, tuple[int, TokenStream, int]] = {}  # slot -> (key, stream, seed)

    def __len__(self) -> int:
        """Requests joined and not finished: reading their prompt or decoding."""
        return len(self._reading) + len(self._running)

    @property
    def has_room(self) -> bool:
        return len(self) < self.max_batch

    def join(self, key: int, request: BatchRequest) -> BatchFailure | None:
        """Queue ``request`` under ``key`` (its records' ``index``); its prompt is read by the
        next steps. A request that cannot start (a bad seed, say) is returned as a failure."""
        if not self.has_room:
            raise ValueError(f"the batch is full ({self.max_batch} requests)")
        try:
            self._reading[key] = _Reading.begin(self.tokenizer, request, self.cache)
        except RwkvCliError as error:
            return BatchFailure(key, request.seed, error)
        return None

    def cancel(self, key: int) -> bool:
        """Drop the request ``key`` wherever it is; whether it was there."""
        if self._reading.pop(key, None) is not None:
            return True
        for slot, (running_key, _, _) in self._running.items():
            if running_key == key:
                self._leave(slot)
                return True
        return False

    def step(self) -> list[BatchChunk | BatchFailure]:
        """One round: read up to a chunk of waiting prompts, sample the next token of every
        running request, run the model on those tokens; return the records, in order."""
        records: list[BatchChunk | BatchFailure] = []
        self._read_prompts(records)
        tokens = self._sample(records)
        if tokens:
            logits = self._batch.step(tokens)
            for slot, row in zip(self._batch.slots, logits, strict=True):
                self._running[slot][1].advance(row, self._batch.session(slot).state)
        return records

    def _read_prompts(self, records: list[BatchChunk | BatchFailure]) -> None:
        """Read chunks of the oldest prompts until a chunk's worth of tokens is read; a request
        whose prompt is read joins the running batch."""
        budget = PREFILL_CHUNK_LEN
        while self._reading and budget > 0:
            key, reading = next(iter(self._reading.items()))
            try:
                budget -= reading.read_chunk(self.model, self.cache)
            except RwkvCliError as error:  # e.g. a token id outside the vocabulary
                del self._reading[key]
                records.append(BatchFailure(key, reading.request.seed, error))
                continue
            if reading.done:
                del self._reading[key]
                stream = reading.stream(self.model, self.tokenizer)
                self._running[self._batch.add(stream.session)] = (key, stream, reading.seed)

    def _sample(self, records: list[BatchChunk | BatchFailure]) -> dict[int, int]:
        """Each running request's next record; the tokens of those that go on, by slot."""
        tokens = {}
        for slot, (key, stream, seed) in list(self._running.items()):
            try:
                chunk = stream.next_chunk()
            except RwkvCliError as error:  # e.g. this sequence's logits are not numbers
                chunk = None
                records.append(BatchFailure(key, seed, error))
            else:
                records.append(BatchChunk(key, seed, chunk))
            if chunk is not None and chunk.finish_reason is None:
                tokens[slot] = chunk.token
            else:
                self._leave(slot)
        return tokens

    def _leave(self, slot: int) -> None:
        self._batch.remove(slot)
        del self._running[slot]


@dataclass
class _Reading:
    """A request whose prompt is being read, a chunk per step."""

    request: BatchRequest
    tokens: list[int]
    session: Session
    generator: torch.Generator
    seed: int
    read: int = 0  # tokens read, or resumed from a cached state (those: ``cached``)
    cached: int = 0
    seconds: float = 0.0

    @classmethod
    def begin(
        cls, tokenizer: Tokenizer, request: BatchRequest, cache: PrefixCache | None
    ) -> _Reading:
        """The request's prompt, to read after its session, or after the longest cached
        prefix of it when it starts a fresh document."""
        session = request.session or Session()
        generator, seed = make_generator(request.seed)
        tokens = prompt_ids(tokenizer, request.prompt, session)
        reading = cls(request, tokens, session, generator, seed)
        found = cache.longest_prefix(tokens) if cache and request.session is None else None
        if found is not None:
            reading.session = Session(found.state, tokens_consumed=found.length)
            reading.read = reading.cached = found.length
        return reading

    @property
    def done(self) -> bool:
        return self.read >= len(self.tokens)

    def read_chunk(self, model: Model, cache: PrefixCache | None) -> int:
        """Read the prompt up to the next chunk boundary; how many tokens that was. A fresh
        document's states at chunk boundaries and at its prompt's end go into ``cache``."""
        end = (self.read // PREFILL_CHUNK_LEN + 1) * PREFILL_CHUNK_LEN
        chunk = self.tokens[self.read : end]
        started = time.perf_counter()
        self.session = prefill(model, chunk, self.session)
        self.seconds += time.perf_counter() - started
        self.read += len(chunk)
        if cache is not None and self.request.session is None:
            cache.put(self.tokens[: self.read], self.session.state)
        return len(chunk)

    def stream(self, model: Model, tokenizer: Tokenizer) -> TokenStream:
        """The request's generation, its prompt read."""
        request = self.request
        return TokenStream(
            model,
            tokenizer,
            self.session,
            params=request.params,
            generator=self.generator,
            max_tokens=request.max_tokens,
            stop=request.stop,
            ban=request.ban,
            logprobs=request.logprobs,
            prompt_tokens=len(self.tokens),
            prompt_seconds=self.seconds,
            cached_tokens=self.cached,
            then_read=request.then_read,
        )


def stream_batch(
    model: Model,
    tokenizer: Tokenizer,
    requests: Iterable[BatchRequest],
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Iterator[BatchChunk | BatchFailure]:
    """Generate every request, ``max_batch`` at a time; yield each record of each request as it
    comes, or a :class:`BatchFailure` for one that fails alone. Requests are read lazily, as room
    frees up."""
    batch = ContinuousBatch(model, tokenizer, max_batch)
    waiting = enumerate(requests)
    while True:
        while batch.has_room and (joining := next(waiting, None)) is not None:
            if (failure := batch.join(*joining)) is not None:
                yield failure
        if not batch:
            return
        yield from batch.step()


def generate_batch(
    model: Model,
    tokenizer: Tokenizer,
    requests: Iterable[BatchRequest],
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Iterator[BatchResult | BatchFailure]:
    """Generate every request (see ``stream_batch``); yield each one's result, or its failure,
    as it finishes, so in the order they finish, not the order given (``index`` says which
    request it is)."""
    texts: dict[int, list[str]] = {}
    for record in stream_batch(model, tokenizer, requests, max_batch):
        if isinstance(record, BatchFailure):
            texts.pop(record.index, None)
            yield record
            continue
        index, chunk = record.index, record.chunk
        texts.setdefault(index, []).append(chunk.text)
        if chunk.finish_reason is not None:
            yield BatchResult(
                index=index,
                text="".join(texts.pop(index)),
                finish_reason=chunk.finish_reason,
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.generated_tokens,
                seed=record.seed,
                session=_own(chunk.session),
            )


def _own(session: Session) -> Session:
    """``session`` with tensors of its own, not views that keep a whole batch's alive."""
    return Session(
        session.state.clone(),
        session.logits.clone(),
        None if session.counts is None else session.counts.clone(),
        session.tokens_consumed,
    )
