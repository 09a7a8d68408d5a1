"""`rwkv perplexity`: the score of a text equals what its logits give, read token by token or
in chunks, and the command reports it (tests on the demo model and its held-out text)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rwkv_cli.demo import HELDOUT_FILE, demo_dir
from rwkv_cli.loading.open import open_model
from rwkv_cli.perplexity import CHUNK_TOKENS, score_text
from tests.support.cli_in_process import rwkv_in_process
from tests.support.cli_runner import assert_one_line_error

HELDOUT = demo_dir() / HELDOUT_FILE


@pytest.fixture(scope="module")
def demo():
    return open_model("demo")


@pytest.fixture(scope="module")
def heldout_tokens(demo) -> list[int]:
    return demo.tokenizer.encode(HELDOUT.read_text(encoding="utf-8"))


def test_the_score_is_the_log_likelihood_of_each_token_read_one_by_one(demo) -> None:
    """Against an independent path: the one-token decode path, log-softmax in float64."""
    tokens = demo.tokenizer.encode("And the LORD said unto Moses, Stretch out thine hand.")
    expected, logits, state = 0.0, None, None
    for previous, token in zip([demo.tokenizer.eos_id, *tokens], tokens, strict=False):
        logits, state = demo.model.forward([previous], state)
        expected -= torch.log_softmax(logits.double(), -1)[token].item()
    result = score_text(demo.model, tokens, 55, demo.tokenizer.eos_id)
    assert result.tokens == len(tokens)
    assert result.negative_log_likelihood == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected / len(tokens)), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / math.log(2) / 55, rel=1e-5)


def test_chunks_score_a_long_text_as_one_pass_would(demo, heldout_tokens) -> None:
    tokens = heldout_tokens[: 2 * CHUNK_TOKENS + 17]  # three chunks, the last one partial
    inputs = [demo.tokenizer.eos_id, *tokens[:-1]]
    with torch.inference_mode():
        logits, _ = demo.model.sequence_logits(inputs)
    one_pass = torch.nn.functional.cross_entropy(
        logits.double(), torch.tensor(tokens), reduction="sum"
    )
    result = score_text(demo.model, tokens, 1, demo.tokenizer.eos_id)
    assert result.negative_log_likelihood == pytest.approx(one_pass.item(), rel=1e-6)


def test_the_command_reports_the_score(demo, heldout_tokens) -> None:
    text_bytes = HELDOUT.stat().st_size
    expected = score_text(demo.model, heldout_tokens, text_bytes, demo.tokenizer.eos_id)
    result = rwkv_in_process("perplexity", HELDOUT, "-m", "demo", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["model"], report["architecture"], report["dtype"]) == (
        "demo",
        "RWKV-7 L6 D192",
        "fp32",
    )
    assert (report["tokens"], report["text_bytes"]) == (len(heldout_tokens), text_bytes)
    assert report["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)
    assert report["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-9)
    assert 13 < report["perplexity"] < 15  # README: 14.1 on this excerpt

    piped = rwkv_in_process("perplexity", "-", "-m", "demo", stdin=HELDOUT.read_bytes())
    lines = piped.stdout.decode().splitlines()
    assert piped.returncode == 0 and lines[0] == "model: RWKV-7 L6 D192 · cpu fp32"
    assert lines[1] == f"perplexity: {expected.perplexity:.4f}"
    assert lines[2] == f"bits per byte: {expected.bits_per_byte:.4f}"
    assert lines[3].startswith(f"tokens: {len(heldout_tokens)} ({text_bytes} bytes), scored in")


def test_int8_weights_score_within_a_percent_of_fp32() -> None:
    scores = {}
    for dtype in ("fp32", "int8"):
        result = rwkv_in_process("perplexity", HELDOUT, "-m", "demo", "--dtype", dtype, "--json")
        scores[dtype] = json.loads(result.stdout)["perplexity"]
    assert scores["int8"] == pytest.approx(scores["fp32"], rel=0.01)


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (b"caf\xe9", "is not valid UTF-8 (byte 0xe9 at offset 3)"),
        (b"", "holds no text to score"),
        (None, "cannot read"),
    ],
)
def test_unreadable_text_is_a_one_line_error(tmp_path, contents, message) -> None:
    path = tmp_path / "text.txt"
    if contents is not None:
        path.write_bytes(contents)
    assert_one_line_error(rwkv_in_process("perplexity", path, "-m", "demo"), 1, message)
