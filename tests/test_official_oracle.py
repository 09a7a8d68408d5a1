"""Parity with BlinkDL's official ``rwkv`` package (a test-only oracle) on the same files."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from rwkv_cli.models import load_model
from rwkv_cli.tokenizer.world import load_world_tokenizer
from tests.support.generation import ORACLE_CONTINUATION, ORACLE_PROMPT, assert_greedy_continuation
from tests.support.numerics import relative_error


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


def test_prompt_logits_and_state_match(official, rwkv7_pth) -> None:
    tokens = load_world_tokenizer().encode(ORACLE_PROMPT)
    ours = load_model(rwkv7_pth)
    our_logits, our_state = ours.forward(tokens)
    their_logits, their_state = official.forward(tokens, None)
    assert relative_error(our_logits, their_logits) < 1e-5
    for index, layer in enumerate(our_state.layers):
        att_shift, wkv, ffn_shift = their_state[3 * index : 3 * index + 3]
        assert relative_error(layer.att_shift, att_shift) < 1e-5
        assert relative_error(layer.att_wkv, wkv) < 1e-5
        assert relative_error(layer.ffn_shift, ffn_shift) < 1e-5


def test_greedy_continuation_matches(official, rwkv7_pth) -> None:
    tokenizer = load_world_tokenizer()
    tokens = tokenizer.encode(ORACLE_PROMPT)
    logits, state = official.forward(tokens, None)
    expected = []
    for _ in range(ORACLE_CONTINUATION):
        token = int(torch.argmax(logits))
        expected.append(token)
        logits, state = official.forward([token], state)

    assert_greedy_continuation(
        load_model(rwkv7_pth), tokenizer, ORACLE_PROMPT, ORACLE_CONTINUATION, expected
    )
