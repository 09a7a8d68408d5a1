"""Tests for rwkv_cli.tokenizer: parity with the official tokenizer, decoding, bad vocab files.

The official implementation (``rwkv`` 0.8.32, ``TRIE_TOKENIZER`` loading its own copy of the
vocabulary) is the oracle for encoding; it is slow to load, so it is built once per module.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from rwkv_cli.errors import TokenizerError
from rwkv_cli.tokenizer.base import IncrementalDecoder
from rwkv_cli.tokenizer.world import WorldTokenizer, load_world_tokenizer

LAST_ID = 65529
PACKAGED_VOCAB = Path(__file__).parents[1] / "rwkv_cli" / "data" / "rwkv_vocab_v20230424.txt"

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. It's a well-known pangram, isn't it? "
    "RWKV is an RNN with transformer-level performance; it can be trained in parallel, "
    "and at inference time the state has a fixed size. Numbers: 3.14159, 2,718, -42, 1e-9, 0x7F. "
    'She said, "Hello, world!" (and then left). E-mail: someone@example.com; '
    "URL: https://example.com/path?q=1&r=two#frag.\n"
)
PYTHON_CODE = (
    "def fibonacci(n: int) -> list[int]:\n"
    '    """Return the first n Fibonacci numbers."""\n'
    "    values = [0, 1]\n"
    "    while len(values) < n:\n"
    "        values.append(values[-1] + values[-2])\n"
    "    return values[:n]\n"
    "\n"
    "\tif __name__ == '__main__':\n"
    "\t\tprint({'a': 1, \"b\": [2, 3]}, end='\\n')\n"
)
CHINESE = "人工智能是计算机科学的一个分支。你好，世界！我们今天学习语言模型。"
JAPANESE = "これは日本語の文章です。カタカナ、ひらがな、漢字が混ざっています。"
KOREAN = "안녕하세요, 세계! 한국어 문장도 토큰화해야 합니다."
EMOJI = "🙂😀👍🏽👍🏿👩🏿‍💻👨‍👩‍👧‍👦🏳️‍🌈🇯🇵🇫🇷❤️‍🔥🧑🏻‍🤝‍🧑🏾 "  # skin tones, ZWJ sequences, flags
COMBINING = "e\u0301 n\u0303 a\u0308\u0304 Z̴̡̛͓a̷l̶g̵o̸ नमस्ते สวัสดี مرحبا שלום Ελληνικά Кириллица"
CONTROL = "\x00\x01\x07\x08\x0b\x0c\x1b[31mred\x1b[0m\x7f\x80\x85\x9f\u200b\u2028\ufeff"
WHITESPACE = "a\tb\t\tc\r\nd\r\n\r\ne\rf\n\n\n   \t \u00a0\u3000"
FRAGMENTS = (ENGLISH, PYTHON_CODE, CHINESE, JAPANESE, KOREAN, EMOJI, COMBINING, CONTROL, WHITESPACE)


def random_code_point(rng: random.Random) -> str:
    """Any Unicode scalar value (surrogates are not encodable, so they are skipped)."""
    while True:
        code_point = rng.randrange(0x110000)
        if not 0xD800 <= code_point <= 0xDFFF:
            return chr(code_point)


def mixed_text(size: int, seed: int) -> str:
    """Deterministic text of about ``size`` characters covering many scripts and odd characters."""
    rng = random.Random(seed)
    pieces: list[str] = []
    length = 0
    while length < size:
        kind = rng.randrange(6)
        if kind == 0:
            piece = rng.choice(FRAGMENTS)
        elif kind == 1:  # a slice of a fragment, so boundaries land mid-word and mid-sequence
            fragment = rng.choice(FRAGMENTS)
            start = rng.randrange(len(fragment))
            piece = fragment[start : start + rng.randrange(1, 40)]
        elif kind == 2:  # long runs that the vocabulary has long tokens for
            piece = rng.choice(" -=_*#\n\t.") * rng.randrange(1, 300)
        elif kind == 3:
            piece = "".join(random_code_point(rng) for _ in range(rng.randrange(1, 20)))
        elif kind == 4:
            piece = " ".join(rng.choice(ENGLISH.split()) for _ in range(rng.randrange(1, 30)))
        else:
            piece = rng.choice(FRAGMENTS[:5]).upper()
        pieces.append(piece)
        length += len(piece)
    return "".join(pieces)


@pytest.fixture(scope="module")
def tokenizer() -> WorldTokenizer:
    return load_world_tokenizer()


@pytest.fixture(scope="module")
def official():
    """The official TRIE_TOKENIZER, built from the vocabulary inside the ``rwkv`` package."""
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    return rwkv_tokenizer.TRIE_TOKENIZER(
        str(Path(rwkv_tokenizer.__file__).with_name("rwkv_vocab_v20230424.txt"))
    )


@pytest.fixture(scope="module")
def big_text() -> str:
    return mixed_text(size=100_000, seed=1)


# --- parity with the official tokenizer -------------------------------------------------------


def test_mixed_text_is_large_and_varied(big_text: str) -> None:
    assert len(big_text.encode("utf-8")) > 100_000
    for fragment in (ENGLISH, PYTHON_CODE, CHINESE, EMOJI, CONTROL):
        assert fragment in big_text


def test_encode_matches_official_on_mixed_text(
    tokenizer: WorldTokenizer, official, big_text: str
) -> None:
    ours = tokenizer.encode(big_text)
    assert ours == official.encode(big_text)
    assert len(ours) > 10_000


@pytest.mark.parametrize(
    "fragment",
    FRAGMENTS,
    ids=[
        "english",
        "python",
        "chinese",
        "japanese",
        "korean",
        "emoji",
        "combining",
        "control",
        "ws",
    ],
)
def test_encode_matches_official_per_script(tokenizer: WorldTokenizer, official, fragment) -> None:
    text = fragment * 3
    assert tokenizer.encode(text) == official.encode(text)


def test_encode_matches_official_on_concatenated_tokens(
    tokenizer: WorldTokenizer, official
) -> None:
    # Gluing random tokens together makes longer matches across the joins, which greedy
    # matching must find; the result is also mostly invalid UTF-8.
    rng = random.Random(7)
    data = tokenizer.decode_bytes(rng.randrange(1, LAST_ID + 1) for _ in range(20_000))
    assert tokenizer.encode_bytes(data) == official.encodeBytes(data)


def test_encode_matches_official_on_random_bytes(tokenizer: WorldTokenizer, official) -> None:
    data = random.Random(3).randbytes(20_000)
    assert tokenizer.encode_bytes(data) == official.encodeBytes(data)


def test_decode_matches_official(tokenizer: WorldTokenizer, official) -> None:
    ids = random.Random(11).choices(range(1, LAST_ID + 1), k=20_000)
    assert tokenizer.decode_bytes(ids) == official.decodeBytes(ids)


def test_pipeline_oracle_agrees(tokenizer: WorldTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    utils = pytest.importorskip("rwkv.utils")
    # PIPELINE puts the rwkv package directory at the front of sys.path; undo that afterwards.
    monkeypatch.setattr(sys, "path", list(sys.path))
    pipeline = utils.PIPELINE(None, "rwkv_vocab_v20230424")
    text = mixed_text(size=5_000, seed=2)
    ids = tokenizer.encode(text)
    assert ids == pipeline.encode(text)
    assert tokenizer.decode(ids) == pipeline.decode(ids) == text


# --- encoding and decoding ---------------------------------------------------------------------


def test_known_ids(tokenizer: WorldTokenizer) -> None:
    assert tokenizer.encode("\n") == [11]
    assert tokenizer.encode("\n\n") == [261]
    assert tokenizer.encode("") == []
    assert tokenizer.name == "rwkv_vocab_v20230424"
    assert tokenizer.vocab_size == 65536
    assert tokenizer.eos_id == 0


def test_single_bytes_are_ids_1_to_256(tokenizer: WorldTokenizer) -> None:
    for byte in range(256):
        assert tokenizer.encode_bytes(bytes([byte])) == [byte + 1]
        assert tokenizer.token_bytes(byte + 1) == bytes([byte])


def test_every_token_encodes_to_itself(tokenizer: WorldTokenizer) -> None:
    # A token's own bytes have no longer match than the token itself.
    mismatches = [
        token_id
        for token_id in range(1, LAST_ID + 1)
        if tokenizer.encode_bytes(tokenizer.token_bytes(token_id)) != [token_id]
    ]
    assert mismatches == []


@pytest.mark.parametrize(
    "text", ["", "a", "\r", "\x00", " " * 500, "-" * 129, "👨‍👩‍👧‍👦", "e\u0301", CHINESE + EMOJI]
)
def test_round_trip_edge_cases(tokenizer: WorldTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_mixed_text(tokenizer: WorldTokenizer, big_text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(big_text)) == big_text


def test_long_runs_use_long_tokens(tokenizer: WorldTokenizer) -> None:
    # Greedy longest match must not fall back to one token per byte.
    assert len(tokenizer.encode(" " * 512)) < 20
    assert len(tokenizer.encode("-" * 512)) < 20


def test_end_of_text_decodes_to_nothing(tokenizer: WorldTokenizer) -> None:
    assert tokenizer.token_bytes(0) == b""
    assert tokenizer.decode_bytes([0]) == b""
    assert tokenizer.decode([0, 11, 0, 11, 0]) == "\n\n"


def test_decode_replaces_invalid_utf8(tokenizer: WorldTokenizer) -> None:
    invalid = [0xFF + 1, ord("A") + 1, 0xE4 + 1]  # a stray 0xff, "A", a truncated 3-byte start
    assert tokenizer.decode_bytes(invalid) == b"\xffA\xe4"
    assert tokenizer.decode(invalid) == "\ufffdA\ufffd"


@pytest.mark.parametrize("bad_id", [-1, LAST_ID + 1, 65535, 65536, 10**9])
def test_unknown_id_raises(tokenizer: WorldTokenizer, bad_id: int) -> None:
    with pytest.raises(TokenizerError, match=str(bad_id)):
        tokenizer.decode_bytes([11, bad_id])
    with pytest.raises(TokenizerError, match=str(bad_id)):
        tokenizer.decode([bad_id])
    with pytest.raises(TokenizerError, match=str(bad_id)):
        tokenizer.token_bytes(bad_id)


def test_load_is_cached() -> None:
    assert load_world_tokenizer() is load_world_tokenizer()


# --- incremental decoding ----------------------------------------------------------------------


def byte_tokens(data: bytes) -> list[int]:
    """One single-byte token per byte (id = byte + 1)."""
    return [byte + 1 for byte in data]


def test_incremental_holds_back_split_characters(tokenizer: WorldTokenizer) -> None:
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.feed(token_id) for token_id in byte_tokens("你好🙂".encode())]
    # 3 + 3 + 4 bytes: each character appears only when its last byte arrives.
    assert pieces == ["", "", "你", "", "", "好", "", "", "", "🙂"]
    assert decoder.flush() == ""


def test_incremental_matches_whole_decode(tokenizer: WorldTokenizer, big_text: str) -> None:
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.feed(token_id) for token_id in tokenizer.encode(big_text)]
    assert decoder.flush() == ""
    assert "".join(pieces) == big_text
    assert not any("\ufffd" in piece for piece in pieces)


def test_incremental_invalid_bytes_become_replacement(tokenizer: WorldTokenizer) -> None:
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.feed(0xFF + 1) == "\ufffd"
    assert decoder.feed(0xE4 + 1) == ""  # could still become a character
    assert decoder.feed(0xBD + 1) == ""
    assert decoder.feed(ord("A") + 1) == "\ufffdA"  # it did not
    assert decoder.feed(0) == ""


def test_incremental_flush_returns_incomplete_tail(tokenizer: WorldTokenizer) -> None:
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.feed(ord("x") + 1) == "x"
    assert decoder.feed(0xF0 + 1) == ""
    assert decoder.feed(0x9F + 1) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""
    # Reusable after a flush.
    assert [decoder.feed(token_id) for token_id in byte_tokens("é".encode())] == ["", "é"]


def test_incremental_equals_one_shot_decode_on_random_bytes(tokenizer: WorldTokenizer) -> None:
    rng = random.Random(5)
    for _ in range(50):
        # Bytes biased towards UTF-8 lead and continuation bytes, so sequences break in many ways.
        data = bytes(
            rng.choice([rng.randrange(0x80, 0xC0), rng.randrange(0xC0, 0x100), 0x41])
            for _ in range(rng.randrange(1, 40))
        )
        decoder = IncrementalDecoder(tokenizer)
        streamed = "".join(decoder.feed(token_id) for token_id in byte_tokens(data))
        assert streamed + decoder.flush() == data.decode("utf-8", errors="replace")


def test_incremental_unknown_id_raises(tokenizer: WorldTokenizer) -> None:
    with pytest.raises(TokenizerError):
        IncrementalDecoder(tokenizer).feed(LAST_ID + 1)


# --- bad vocabulary files ----------------------------------------------------------------------


def write_vocab(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("2 'abc 3", "not a string or bytes literal"),
        ("2 'abc'", "expected '<id> <literal> <length>'"),
        ("two 'abc' 3", "expected '<id> <literal> <length>'"),
        ("2 'abc' 4", "3 bytes long but the line says 4"),
        ("2 'é' 1", "2 bytes long but the line says 1"),
        ("2 123 3", "not a string or bytes literal"),
        ("1 'abc' 3", "id 1 appears twice"),
    ],
)
def test_bad_line_raises_with_line_number(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = write_vocab(tmp_path / "vocab.txt", ["1 '\\x00' 1", bad_line, "3 b'\\xff' 1"])
    with pytest.raises(TokenizerError) as caught:
        WorldTokenizer.from_file(path)
    assert "line 2" in caught.value.message
    assert reason in caught.value.message
    assert str(path) in caught.value.message
    assert caught.value.hint


def test_literal_is_never_evaluated_as_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_vocab(tmp_path / "vocab.txt", ["1 __import__('pathlib').Path('PWNED').touch() 1"])
    with pytest.raises(TokenizerError, match="line 1"):
        WorldTokenizer.from_file(path)
    assert not (tmp_path / "PWNED").exists()


def corrupted_copy(tmp_path: Path, edit) -> Path:
    """The packaged vocabulary with ``edit`` applied to its list of lines."""
    lines = PACKAGED_VOCAB.read_text(encoding="utf-8").splitlines()
    return write_vocab(tmp_path / "vocab.txt", edit(lines))


def test_packaged_vocab_loads_from_file() -> None:
    tokenizer = WorldTokenizer.from_file(PACKAGED_VOCAB)
    assert tokenizer.encode("Hello\n\n") == load_world_tokenizer().encode("Hello\n\n")


def test_truncated_vocab_raises(tmp_path: Path) -> None:
    path = corrupted_copy(tmp_path, lambda lines: lines[:-1])
    with pytest.raises(TokenizerError, match="65528 entries"):
        WorldTokenizer.from_file(path)


def test_vocab_with_wrong_single_byte_raises(tmp_path: Path) -> None:
    def replace_a(lines: list[str]) -> list[str]:
        assert lines[65] == "66 'A' 1"
        return [*lines[:65], "66 'Ω' 2", *lines[66:]]

    with pytest.raises(TokenizerError, match="id 66 should be the single byte 0x41"):
        WorldTokenizer.from_file(corrupted_copy(tmp_path, replace_a))


def test_vocab_with_duplicate_token_raises(tmp_path: Path) -> None:
    def duplicate(lines: list[str]) -> list[str]:
        first_id, literal_and_length = lines[1000].split(" ", 1)
        return [*lines[:1001], f"{int(first_id) + 1} {literal_and_length}", *lines[1002:]]

    with pytest.raises(TokenizerError, match="same token under two ids"):
        WorldTokenizer.from_file(corrupted_copy(tmp_path, duplicate))


def test_missing_vocab_raises(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="cannot read") as caught:
        WorldTokenizer.from_file(tmp_path / "nope.txt")
    assert "nope.txt" in caught.value.message
    assert caught.value.hint


def test_non_utf8_vocab_raises(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"1 '\xff' 1\n")
    with pytest.raises(TokenizerError, match="not UTF-8"):
        WorldTokenizer.from_file(path)
