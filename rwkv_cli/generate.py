"""Text generation: prefill a prompt, then sample token by token, streaming small records.

``stream_generate`` yields :class:`GenerationChunk` records (new text, token, counts, timings,
finish reason); ``generate`` joins them. Text is released only when it is whole UTF-8 and cannot
turn out to be the start of a stop string, so callers can print every chunk as it comes.
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
from rwkv_cli.tokenizer import IncrementalDecoder, WorldTokenizer

PREFILL_CHUNK_LEN = 256  # tokens per forward call while reading a prompt; bounds peak memory
END_OF_TEXT = 0  # token id 0 ends a document in every RWKV vocabulary


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
    state: State | None = None,
    chunk_len: int = PREFILL_CHUNK_LEN,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, State]:
    """Feed ``tokens`` in chunks; return the logits after the last one and the new state.

    ``on_progress`` is called with the number of tokens consumed after each chunk.
    """
    if not tokens:
        raise ValueError("prefill() needs at least one token")
    logits = None
    for start in range(0, len(tokens), chunk_len):
        logits, state = model.forward(tokens[start : start + chunk_len], state)
        if on_progress is not None:
            on_progress(min(start + chunk_len, len(tokens)))
    return logits, state


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


def stream_generate(
    model: Model,
    tokenizer: WorldTokenizer,
    prompt: str,
    *,
    params: SamplingParams,
    generator: torch.Generator,
    max_tokens: int,
    stop: Sequence[str] = (),
    state: State | None = None,
) -> Iterator[GenerationChunk]:
    """Continue ``prompt`` (after ``state``, if given) and yield records as tokens are sampled.

    An empty prompt with no state starts from the end-of-text token, i.e. a fresh document.
    """
    prompt_tokens = tokenizer.encode(prompt)
    if not prompt_tokens and state is None:
        prompt_tokens = [END_OF_TEXT]
    started = time.perf_counter()
    logits = None
    if prompt_tokens:
        logits, state = prefill(model, prompt_tokens, state)
    prompt_seconds = time.perf_counter() - started
    if logits is None:
        raise ValueError("stream_generate() with an empty prompt needs the state's logits")

    never_sample = torch.zeros(model.vocab_size)
    never_sample[tokenizer.token_count :] = -torch.inf  # vocabulary padding decodes to nothing
    decoder = IncrementalDecoder(tokenizer)
    matcher = _StopMatcher(stop)
    counts = new_counts(model.vocab_size)
    generated = 0
    started = time.perf_counter()

    def record(text: str, token: int | None, finish: str | None = None) -> GenerationChunk:
        return GenerationChunk(
            text=text,
            token=token,
            prompt_tokens=len(prompt_tokens),
            generated_tokens=generated,
            prompt_seconds=prompt_seconds,
            generation_seconds=time.perf_counter() - started,
            finish_reason=finish,
        )

    while generated < max_tokens:
        adjusted = apply_penalties(logits, counts, params) + never_sample
        token = sample_token(adjusted, params, generator)
        if token == END_OF_TEXT:
            yield record(matcher.flush() + decoder.flush(), None, "eos")
            return
        generated += 1
        text, stopped = matcher.push(decoder.feed(token))
        if stopped:
            yield record(text, token, "stop")
            return
        yield record(text, token)
        counts = update_counts(counts, token, params.penalty_decay)
        if generated < max_tokens:  # the last token needs no forward pass
            logits, state = model.forward([token], state)
    yield record(matcher.flush() + decoder.flush(), None, "length")


def generate(
    model: Model,
    tokenizer: WorldTokenizer,
    prompt: str,
    **options,
) -> str:
    """The whole completion of ``prompt`` as one string (see ``stream_generate``)."""
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, **options))
