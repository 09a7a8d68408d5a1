"""Many completions at once: continuous batching in the library.

``stream_batch`` runs requests through one :class:`~rwkv_cli.batching.engine.Batch` of at most
``max_batch`` sequences. A request joins as soon as there is room: its prompt is read alone, in
chunks (``generation.prefill``), then it decodes together with the others, one token each per
step. A finished sequence leaves at once, and the next waiting request takes its place.

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

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from rwkv_cli.batching.engine import Batch
from rwkv_cli.errors import RwkvCliError
from rwkv_cli.generation import GenerationChunk, Session, TokenStream
from rwkv_cli.models import Model
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.settings import DEFAULT_MAX_BATCH
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


def stream_batch(
    model: Model,
    tokenizer: Tokenizer,
    requests: Iterable[BatchRequest],
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Iterator[BatchChunk | BatchFailure]:
    """Generate every request, ``max_batch`` at a time; yield each record of each request as it
    comes, or a :class:`BatchFailure` for one that fails alone. Requests are read lazily, as room
    frees up."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    waiting = enumerate(requests)
    batch = Batch(model)
    running: dict[int, tuple[int, TokenStream, int]] = {}  # slot -> (index, stream, seed)
    while True:
        while len(running) < max_batch and (joining := next(waiting, None)) is not None:
            index, request = joining
            try:
                stream, seed = _start(model, tokenizer, request)
            except RwkvCliError as error:
                yield BatchFailure(index, request.seed, error)
                continue
            running[batch.add(stream.session)] = (index, stream, seed)
        if not running:
            return
        tokens = {}
        for slot, (index, stream, seed) in list(running.items()):
            try:
                chunk = stream.next_chunk()
            except RwkvCliError as error:  # e.g. this sequence's logits are not numbers
                chunk, failure = None, BatchFailure(index, seed, error)
            else:
                failure = None
                yield BatchChunk(index, seed, chunk)
            if chunk is not None and chunk.finish_reason is None:
                tokens[slot] = chunk.token
            else:
                batch.remove(slot)
                del running[slot]
            if failure is not None:
                yield failure
        if tokens:
            logits = batch.step(tokens)
            for slot, row in zip(batch.slots, logits, strict=True):
                running[slot][1].advance(row, batch.session(slot).state)


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


def _start(model: Model, tokenizer: Tokenizer, request: BatchRequest) -> tuple[TokenStream, int]:
    """A request's stream after its prompt was read alone, and its seed."""
    generator, seed = make_generator(request.seed)
    stream = TokenStream.start(
        model,
        tokenizer,
        request.prompt,
        request.session,
        params=request.params,
        generator=generator,
        max_tokens=request.max_tokens,
        stop=request.stop,
        ban=request.ban,
    )
    return stream, seed


def _own(session: Session) -> Session:
    """``session`` with tensors of its own, not views that keep a whole batch's alive."""
    return Session(
        session.state.clone(),
        session.logits.clone(),
        None if session.counts is None else session.counts.clone(),
        session.tokens_consumed,
    )
