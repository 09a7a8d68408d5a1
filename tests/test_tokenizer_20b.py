"""The 20B (GPT-NeoX) tokenizer of Pile models: exactly the ``tokenizers`` library's encoding and
decoding, exact token bytes for UTF-8-safe streaming, and choice by vocabulary size or name."""

from __future__ import annotations

import hashlib
import random
from importlib import resources

import pytest
import tokenizers
import torch

from rwkv_cli.errors import TokenizerError, UnsupportedModelError
from rwkv_cli.generation import stream_generate
from rwkv_cli.models.rwkv7 import RWKV7
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.tokenizer import tokenizer_by_name, tokenizer_for_vocab
from rwkv_cli.tokenizer.base import IncrementalDecoder
from rwkv_cli.tokenizer.bpe import (
    NEOX_FILE,
    NEOX_PADDED_VOCAB,
    NEOX_TOKEN_COUNT,
    NeoXTokenizer,
    load_neox_tokenizer,
)
from rwkv_cli.tokenizer.world import WorldTokenizer
from tests.support.fixtures import rwkv7_tensors

SHA256 = "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"  # as in data/NOTICE
TEXTS = [
    "Hello world!",
    "The quick brown fox\n\njumps over the lazy dog.\r\n",
    "    four spaces, then          ten, and a\ttab",
    "Emoji 😀🎉👩‍👩‍👧, accents café naïve, CJK 日本語のテキスト, Cyrillic Привет, Arabic مرحبا",
    "def f(x):\n    return x ** 2  # code\n",
    "",
]


@pytest.fixture(scope="module")
def library() -> tokenizers.Tokenizer:
    with resources.as_file(resources.files("rwkv_cli").joinpath("data", NEOX_FILE)) as path:
        return tokenizers.Tokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def tokenizer() -> NeoXTokenizer:
    return load_neox_tokenizer()


def test_shipped_file_is_the_recorded_one() -> None:
    data = resources.files("rwkv_cli").joinpath("data", NEOX_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256
    notice = resources.files("rwkv_cli").joinpath("data", "NOTICE").read_text()
    assert NEOX_FILE in notice and SHA256 in notice


def test_attributes(tokenizer) -> None:
    assert (tokenizer.name, tokenizer.vocab_size, tokenizer.token_count) == (
        "20B_tokenizer",
        50277,
        50277,
    )
    assert tokenizer.eos_id == 0


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_library_parity(tokenizer, library, text) -> None:
    ids = tokenizer.encode(text)
    assert ids == library.encode(text).ids
    assert tokenizer.decode(ids) == text == library.decode(ids)


def test_every_token_has_the_librarys_bytes(tokenizer, library) -> None:
    singles = library.decode_batch([[token_id] for token_id in range(NEOX_TOKEN_COUNT)])
    for token_id, text in enumerate(singles):
        assert tokenizer.token_bytes(token_id).decode("utf-8", errors="replace") == text


def test_random_id_sequences_decode_like_the_library(tokenizer, library) -> None:
    rng = random.Random(0)
    sequences = [[rng.randrange(NEOX_TOKEN_COUNT) for _ in range(16)] for _ in range(500)]
    assert [tokenizer.decode(ids) for ids in sequences] == library.decode_batch(sequences)


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.encode("<|endoftext|>") == [0]
    assert tokenizer.token_bytes(0) == tokenizer.token_bytes(1) == b""  # end-of-text, padding
    assert tokenizer.token_bytes(50276) == b"  "  # added tokens are runs of spaces
    assert tokenizer.decode([0, 12092, 1]) == "Hello"


def test_unknown_id_is_refused(tokenizer) -> None:
    with pytest.raises(TokenizerError, match="not in the 20B vocabulary"):
        tokenizer.token_bytes(NEOX_TOKEN_COUNT)


def test_streaming_never_splits_a_character(tokenizer) -> None:
    text = "😀🎉 naïve 日本語"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.token_bytes(token_id) for token_id in ids]
    assert any(_incomplete_utf8(piece) for piece in pieces), "some token must hold partial bytes"
    decoder = IncrementalDecoder(tokenizer)
    streamed = [decoder.feed(token_id) for token_id in ids]
    assert "".join(streamed) + decoder.flush() == text
    assert "\ufffd" not in "".join(streamed)


def _incomplete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_tokenizer_is_chosen_from_the_vocabulary_size() -> None:
    assert isinstance(tokenizer_for_vocab(65536), WorldTokenizer)
    pile = tokenizer_for_vocab(NEOX_TOKEN_COUNT)
    padded = tokenizer_for_vocab(NEOX_PADDED_VOCAB)
    assert isinstance(pile, NeoXTokenizer) and isinstance(padded, NeoXTokenizer)
    assert (pile.vocab_size, padded.vocab_size, padded.token_count) == (50277, 50304, 50277)
    assert padded.encode("Hello world") == pile.encode("Hello world")
    with pytest.raises(UnsupportedModelError, match="no known tokenizer has a vocabulary of 1000"):
        tokenizer_for_vocab(1000)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("world", "rwkv_vocab_v20230424"),
        ("rwkv_vocab_v20230424", "rwkv_vocab_v20230424"),
        ("20b", "20B_tokenizer"),
        ("20B_tokenizer", "20B_tokenizer"),
        ("NeoX", "20B_tokenizer"),
    ],
)
def test_tokenizer_by_name(name, expected) -> None:
    assert tokenizer_by_name(name).name == expected


def test_tokenizer_by_name_checks_the_model_vocabulary() -> None:
    assert tokenizer_by_name("20b", vocab_size=65536).vocab_size == 65536
    with pytest.raises(TokenizerError, match="more than the model's vocabulary of 50277"):
        tokenizer_by_name("world", vocab_size=50277)
    with pytest.raises(TokenizerError, match="more than the model's vocabulary of 1000"):
        tokenizer_by_name("20b", vocab_size=1000)
    with pytest.raises(TokenizerError, match="unknown tokenizer 'gpt2'"):
        tokenizer_by_name("gpt2")


def test_padded_pile_model_never_samples_padding() -> None:
    """RWKV-7 Pile models have 50304 rows, 27 of them padding: make padding the argmax."""
    tensors = rwkv7_tensors(n_layer=1, n_embd=64, vocab_size=NEOX_PADDED_VOCAB)
    model = RWKV7.from_tensors(tensors)
    tokenizer = tokenizer_for_vocab(model.vocab_size)
    logits, _ = model.forward(tokenizer.encode("Hello"))
    best = int(torch.argmax(logits))
    tensors["head.weight"][NEOX_TOKEN_COUNT:] = tensors["head.weight"][best] * 4
    model = RWKV7.from_tensors(tensors)
    assert int(torch.argmax(model.forward(tokenizer.encode("Hello"))[0])) >= NEOX_TOKEN_COUNT
    chunks = list(
        stream_generate(
            model,
            tokenizer,
            "Hello",
            params=SamplingParams(temperature=0),
            generator=make_generator(0)[0],
            max_tokens=4,
        )
    )
    tokens = [chunk.token for chunk in chunks if chunk.token is not None]
    assert tokens and all(token < NEOX_TOKEN_COUNT for token in tokens)
