"""Parity with BlinkDL's official ``rwkv`` package (a test-only oracle) on the same files."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from rwkv_cli.generation import stream_generate
from rwkv_cli.models import load_model
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.tokenizer.world import load_world_tokenizer

PROMPT = "The quick brown fox jumps over the lazy dog.\n\n你好，世界！ def f(x): return x ** 2"
CONTINUATION = 32


@pytest.fixture(scope="module")
def official_rwkv7_class():
    """The official RWKV-7 class; its module reads these switches once, at import."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    module = importlib.import_module("rwkv.model")
    return module.RWKV_x070


@pytest.fixture(scope="module")
def official(official_rwkv7_class, rwkv7_pth):
    return official_rwkv7_class(str(rwkv7_pth.with_suffix("")), "cpu fp32")  # it appends .pth


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_prompt_logits_and_state_match(official, rwkv7_pth) -> None:
    tokens = load_world_tokenizer().encode(PROMPT)
    ours = load_model(rwkv7_pth)
    our_logits, our_state = ours.forward(tokens)
    their_logits, their_state = official.forward(tokens, None)
    assert _relative_error(our_logits, their_logits) < 1e-5
    for index, layer in enumerate(our_state.layers):
        att_shift, wkv, ffn_shift = their_state[3 * index : 3 * index + 3]
        assert _relative_error(layer.att_shift, att_shift) < 1e-5
        assert _relative_error(layer.att_wkv, wkv) < 1e-5
        assert _relative_error(layer.ffn_shift, ffn_shift) < 1e-5


def test_greedy_continuation_matches(official, rwkv7_pth) -> None:
    tokenizer = load_world_tokenizer()
    tokens = tokenizer.encode(PROMPT)
    logits, state = official.forward(tokens, None)
    expected = []
    for _ in range(CONTINUATION):
        token = int(torch.argmax(logits))
        expected.append(token)
        logits, state = official.forward([token], state)

    chunks = list(
        stream_generate(
            load_model(rwkv7_pth),
            tokenizer,
            PROMPT,
            params=SamplingParams(temperature=0),
            generator=make_generator(0)[0],
            max_tokens=CONTINUATION,
        )
    )
    ours = [chunk.token for chunk in chunks if chunk.token is not None]
    assert 0 not in expected, "the fixture model should not end the text this early"
    assert ours == expected
    assert "".join(chunk.text for chunk in chunks) == tokenizer.decode(expected)
