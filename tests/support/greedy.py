"""Greedy generation through the library's ``stream_generate``, as the model tests check it."""

from __future__ import annotations

from rwkv_cli.generate import GenerationChunk, Session, stream_generate
from rwkv_cli.sampling import SamplingParams, make_generator

GREEDY = SamplingParams(temperature=0)

# The prompt both official-package oracle suites continue: English, Chinese and code, so it takes
# tokens of every length; and how many tokens they compare.
ORACLE_PROMPT = (
    "The quick brown fox jumps over the lazy dog.\n\n你好，世界！ def f(x): return x ** 2"
)
ORACLE_CONTINUATION = 32


def greedy_chunks(
    model, tokenizer, prompt: str, max_tokens: int, session: Session | None = None
) -> list[GenerationChunk]:
    """Every chunk of a greedy generation of ``max_tokens`` after ``prompt`` (and ``session``)."""
    chunks = stream_generate(
        model,
        tokenizer,
        prompt,
        params=GREEDY,
        generator=make_generator(0)[0],
        max_tokens=max_tokens,
        session=session,
    )
    return list(chunks)


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
