"""stream_generate: records, stop strings, end-of-text and UTF-8 safety, on a scripted model."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli.generation import END_OF_TEXT, _StopMatcher, generate, stream_generate
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.state import State
from rwkv_cli.tokenizer.world import load_world_tokenizer

GREEDY = SamplingParams(temperature=0)


class ScriptedModel:
    """Emits a fixed token sequence under greedy sampling and records what it was fed."""

    generation = "test"
    dtype = torch.float32
    vocab_size = 65536

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.fed: list[list[int]] = []

    def describe(self) -> str:
        return "scripted"

    def new_state(self) -> State:
        return State(generation="test", layers=[])

    def forward(self, tokens, state=None):
        self.fed.append(list(tokens))
        position = sum(len(batch) for batch in self.fed[1:])  # tokens generated so far
        logits = torch.zeros(self.vocab_size)
        logits[self.script[min(position, len(self.script) - 1)]] = 10.0
        return logits, state or self.new_state()


def _byte_tokens(text: str) -> list[int]:
    return [byte + 1 for byte in text.encode("utf-8")]  # ids 1-256 are single bytes


def _run(script: list[int], **options):
    model = ScriptedModel(script)
    options = {"params": GREEDY, "generator": make_generator(0)[0], "max_tokens": 100, **options}
    chunks = list(stream_generate(model, load_world_tokenizer(), "prompt", **options))
    return model, chunks


def test_records_carry_text_tokens_and_counts() -> None:
    script = load_world_tokenizer().encode("Hello world")
    _, chunks = _run(script, max_tokens=len(script))
    assert [chunk.token for chunk in chunks[:-1]] == script
    assert "".join(chunk.text for chunk in chunks) == "Hello world"
    assert [chunk.generated_tokens for chunk in chunks[:-1]] == list(range(1, len(script) + 1))
    assert chunks[-1].finish_reason == "length"
    assert all(chunk.finish_reason is None for chunk in chunks[:-1])
    assert chunks[-1].prompt_tokens == len(load_world_tokenizer().encode("prompt"))


def test_the_final_session_has_read_every_generated_token() -> None:
    model, chunks = _run(_byte_tokens("abcdef"), max_tokens=3)
    assert model.fed[1:] == [[ord("a") + 1], [ord("b") + 1], [ord("c") + 1]]
    prompt_tokens = chunks[-1].prompt_tokens
    assert chunks[-1].session.tokens_consumed == prompt_tokens + 3
    assert all(chunk.session is None for chunk in chunks[:-1])


def test_end_of_text_finishes_without_text() -> None:
    _, chunks = _run([*_byte_tokens("done"), END_OF_TEXT])
    assert "".join(chunk.text for chunk in chunks) == "done"
    assert chunks[-1].finish_reason == "eos"
    assert chunks[-1].generated_tokens == 4


def test_banned_tokens_are_never_sampled() -> None:
    _, chunks = _run(
        [*_byte_tokens("ab"), END_OF_TEXT, *_byte_tokens("cd")], ban=[END_OF_TEXT], max_tokens=4
    )
    assert END_OF_TEXT not in [chunk.token for chunk in chunks]
    assert chunks[-1].finish_reason == "length"


def test_the_last_record_names_the_tokens_spelling_the_text() -> None:
    script = _byte_tokens("kept|cut")
    _, chunks = _run(script, stop=["|"])
    assert chunks[-1].kept_tokens == tuple(_byte_tokens("kept"))


def test_zero_max_tokens_generates_nothing() -> None:
    _, chunks = _run(_byte_tokens("abc"), max_tokens=0)
    assert [(chunk.text, chunk.finish_reason) for chunk in chunks] == [("", "length")]


def test_stop_string_is_cut_and_never_released() -> None:
    _, chunks = _run(_byte_tokens("Hi there\n\nUser: more"), stop=["\n\nUser:"])
    texts = [chunk.text for chunk in chunks]
    assert "".join(texts) == "Hi there"
    assert chunks[-1].finish_reason == "stop"
    assert not any("\n" in text for text in texts)


def test_text_that_only_looks_like_a_stop_is_released() -> None:
    _, chunks = _run(_byte_tokens("a\nb\n\nc"), stop=["\n\nUser:"], max_tokens=6)
    assert "".join(chunk.text for chunk in chunks) == "a\nb\n\nc"
    assert chunks[-1].finish_reason == "length"


def test_earliest_of_several_stops_wins() -> None:
    _, chunks = _run(_byte_tokens("one two three"), stop=["three", "two"])
    assert "".join(chunk.text for chunk in chunks) == "one "


def test_multibyte_characters_are_never_split() -> None:
    _, chunks = _run(_byte_tokens("你好🙂"), max_tokens=len("你好🙂".encode()))
    texts = [chunk.text for chunk in chunks if chunk.text]
    assert texts == ["你", "好", "🙂"]


def test_generate_joins_the_stream() -> None:
    model = ScriptedModel(_byte_tokens("xyz"))
    text = generate(
        model,
        load_world_tokenizer(),
        "p",
        params=GREEDY,
        generator=make_generator(0)[0],
        max_tokens=3,
    )
    assert text == "xyz"


def test_empty_prompt_starts_a_new_document() -> None:
    model = ScriptedModel(_byte_tokens("x"))
    generate(
        model,
        load_world_tokenizer(),
        "",
        params=GREEDY,
        generator=make_generator(0)[0],
        max_tokens=1,
    )
    assert model.fed[0] == [END_OF_TEXT]


def test_long_prompts_are_prefilled_in_chunks() -> None:
    model = ScriptedModel(_byte_tokens("x"))
    prompt = "word " * 600  # about 600 tokens
    generate(
        model,
        load_world_tokenizer(),
        prompt,
        params=GREEDY,
        generator=make_generator(0)[0],
        max_tokens=1,
    )
    prompt_chunks = model.fed[:-1]  # the last call reads the generated token
    assert sum(map(len, prompt_chunks)) == len(load_world_tokenizer().encode(prompt))
    assert max(map(len, prompt_chunks)) == 256


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["ab", "c"], ["bcd"], [("a", False), ("", False)]),
        (["ab", "cd"], ["bcd"], [("a", False), ("", True)]),
        (["xx"], [""], [("xx", False)]),
        (["aaa"], ["aab"], [("a", False)]),
    ],
)
def test_stop_matcher_holds_back_only_possible_stops(pieces, stops, expected) -> None:
    matcher = _StopMatcher(stops)
    assert [matcher.push(piece) for piece in pieces] == expected
