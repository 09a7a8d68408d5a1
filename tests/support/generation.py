"""Generation through the library's ``stream_generate``, as the tests run and check it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rwkv_cli.generation import GenerationChunk, Session, stream_generate
from rwkv_cli.sampling import SamplingParams, make_generator

GREEDY = SamplingParams(temperature=0)

# The prompt both official-package oracle suites continue: English, Chinese and code, so it takes
# tokens of every length; and how many tokens they compare.
ORACLE_PROMPT = (
    "The quick brown fox jumps over the lazy dog.\n\n你好，世界！ def f(x): return x ** 2"
)
ORACLE_CONTINUATION = 32

if TYPE_CHECKING:
    from rwkv_cli.loading.loaded import LoadedModel


def generation_chunks(
    model,
    tokenizer,
    prompt: str,
    params: SamplingParams,
    generator: torch.Generator,
    max_tokens: int,
    session: Session | None = None,
) -> list[GenerationChunk]:
    """Every chunk ``stream_generate`` yields after ``prompt`` (and ``session``)."""
    chunks = stream_generate(
        model,
        tokenizer,
        prompt,
        params=params,
        generator=generator,
        max_tokens=max_tokens,
        session=session,
    )
    return list(chunks)


def completed_text(
    loaded: LoadedModel,
    prompt: str,
    session: Session | None,
    params: SamplingParams,
    generator: torch.Generator,
    max_tokens: int,
) -> tuple[str, Session]:
    """The text ``loaded`` generates after ``prompt`` (and ``session``), and the session after."""
    chunks = generation_chunks(
        loaded.model, loaded.tokenizer, prompt, params, generator, max_tokens, session
    )
    return "".join(chunk.text for chunk in chunks), chunks[-1].session


def greedy_chunks(
    model, tokenizer, prompt: str, max_tokens: int, session: Session | None = None
) -> list[GenerationChunk]:
    """Every chunk of a greedy generation of ``max_tokens`` after ``prompt`` (and ``session``)."""
    generator = make_generator(0)[0]
    return generation_chunks(model, tokenizer, prompt, GREEDY, generator, max_tokens, session)


def generated_tokens(chunks: list[GenerationChunk]) -> list[int]:
    return [chunk.token for chunk in chunks if chunk.token is not None]


def assert_greedy_continuation(
    model, tokenizer, prompt: str, max_tokens: int, expected: list[int]
) -> None:
    """Our ``max_tokens`` greedy tokens after ``prompt``, and their text, are the oracle's."""
    chunks = greedy_chunks(model, tokenizer, prompt, max_tokens)
    assert 0 not in expected, "the fixture model should not end the text this early"
    assert generated_tokens(chunks) == expected
    assert "".join(chunk.text for chunk in chunks) == tokenizer.decode(expected)
