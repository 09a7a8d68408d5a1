"""The World tokenizer (``rwkv_vocab_v20230424``, 65536 rows) of World and G1 models: a greedy
longest match over UTF-8 bytes.

The vocabulary file ``rwkv_vocab_v20230424.txt`` has one entry per line,
``<id> <literal> <length>``: the literal is a Python ``str`` (standing for its UTF-8 bytes) or
``bytes``, and the length is its size in bytes. Ids 1-256 are the single bytes (id = byte + 1), so
any input can be encoded. Id 0 is end-of-text and decodes to nothing. The model's output layer has
65536 rows; the ids after the last entry are unused padding.

Encoding walks a byte trie from each position and takes the longest vocabulary entry found there.
Every trie node records the longest entry that is a prefix of its path, so the walk only has to go
as deep as the input allows and then read one value.
"""

from __future__ import annotations

import ast
import functools
import os
from collections.abc import Iterable
from importlib import resources
from typing import Any

from rwkv_cli.errors import TokenizerError
from rwkv_cli.tokenizer.base import EOS_ID

VOCAB_NAME = "rwkv_vocab_v20230424"
VOCAB_FILE = f"{VOCAB_NAME}.txt"
VOCAB_SIZE = 65536  # rows in the model's embedding and head; ids after LAST_ID are padding
LAST_ID = 65529  # the highest id in the vocabulary file

# Trie nodes are dicts keyed by the next byte (0-255). The extra key 256 holds the longest
# vocabulary entry that is a prefix of the node's path, as (token_id, length in bytes).
_LONGEST = 256
_TrieNode = dict[int, Any]

_VOCAB_HINT = (
    f"the World vocabulary ships with rwkv-cli as rwkv_cli/data/{VOCAB_FILE}; "
    "reinstalling rwkv-cli restores a damaged copy"
)


class WorldTokenizer:
    """Encode text to RWKV World token ids and decode ids back to bytes or text.

    Instances are read-only once built, so one can be shared freely (see ``load_world_tokenizer``).
    """

    name = VOCAB_NAME
    vocab_size = VOCAB_SIZE
    token_count = LAST_ID + 1  # ids 0..LAST_ID decode; a model must never emit the padding ids
    eos_id = EOS_ID

    def __init__(self, token_bytes_by_id: dict[int, bytes]) -> None:
        """Build from the vocabulary entries (ids 1..LAST_ID); ``from_file`` is the usual way in."""
        _check_vocabulary(token_bytes_by_id)
        self._bytes_by_id = {EOS_ID: b"", **token_bytes_by_id}
        self._trie = _build_trie(token_bytes_by_id)
        self._max_token_length = max(map(len, token_bytes_by_id.values()))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> WorldTokenizer:
        """Load a vocabulary file in the ``<id> <literal> <length>`` format."""
        try:
            with open(path, encoding="utf-8") as file:
                entries = _parse_vocabulary(file, source=os.fspath(path))
        except OSError as error:
            reason = error.strerror or str(error)
            raise TokenizerError(
                f"cannot read the tokenizer vocabulary {os.fspath(path)!r}: {reason}",
                hint=_VOCAB_HINT,
            ) from error
        except UnicodeDecodeError as error:
            raise TokenizerError(
                f"the tokenizer vocabulary {os.fspath(path)!r} is not UTF-8 text",
                hint=_VOCAB_HINT,
            ) from error
        return cls(entries)

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text`` (its UTF-8 bytes, greedy longest match)."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids for raw bytes, which need not be valid UTF-8."""
        root = self._trie
        window = self._max_token_length
        ids: list[int] = []
        start = 0
        while start < len(data):
            # Every byte is a child of the root, so the walk always moves at least one step.
            node = root
            for byte in data[start : start + window]:
                if byte not in node:
                    break
                node = node[byte]
            token_id, length = node[_LONGEST]
            ids.append(token_id)
            start += length
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (``b""`` for end-of-text)."""
        try:
            return self._bytes_by_id[token_id]
        except KeyError:
            raise _unknown_id_error(token_id) from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated bytes of ``ids``; end-of-text contributes nothing."""
        try:
            return b"".join([self._bytes_by_id[token_id] for token_id in ids])
        except KeyError as error:
            raise _unknown_id_error(error.args[0]) from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


@functools.cache
def load_world_tokenizer() -> WorldTokenizer:
    """The World tokenizer from the vocabulary shipped with rwkv-cli, loaded once per process."""
    vocab = resources.files("rwkv_cli").joinpath("data", VOCAB_FILE)
    with resources.as_file(vocab) as path:
        return WorldTokenizer.from_file(path)


def _parse_vocabulary(lines: Iterable[str], source: str) -> dict[int, bytes]:
    """Map id -> bytes for every entry, failing on the first malformed line."""
    entries: dict[int, bytes] = {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            token_id, token = _parse_line(line)
        except ValueError as error:
            raise TokenizerError(
                f"bad entry in the tokenizer vocabulary {source!r}, line {line_number}: {error}",
                hint=_VOCAB_HINT,
            ) from None
        if token_id in entries:
            raise TokenizerError(
                f"bad entry in the tokenizer vocabulary {source!r}, line {line_number}: "
                f"id {token_id} appears twice",
                hint=_VOCAB_HINT,
            )
        entries[token_id] = token
    return entries


def _parse_line(line: str) -> tuple[int, bytes]:
    """Split ``<id> <literal> <length>`` and check the size; a ValueError says what is wrong."""
    id_text, _, rest = line.strip().partition(" ")
    literal_text, _, length_text = rest.rpartition(" ")
    if not (_is_ascii_number(id_text) and _is_ascii_number(length_text) and literal_text):
        raise ValueError("expected '<id> <literal> <length>'")
    try:
        # literal_eval accepts only literals: a hostile file cannot run code here.
        token = ast.literal_eval(literal_text)
    except (SyntaxError, ValueError):
        raise ValueError(f"{literal_text[:40]!r} is not a string or bytes literal") from None
    if isinstance(token, str):
        token = token.encode("utf-8")
    if not isinstance(token, bytes):
        raise ValueError(f"{literal_text[:40]!r} is not a string or bytes literal")
    if len(token) != int(length_text):
        raise ValueError(f"entry is {len(token)} bytes long but the line says {length_text}")
    return int(id_text), token


def _is_ascii_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _check_vocabulary(token_bytes_by_id: dict[int, bytes]) -> None:
    """Fail unless the entries are exactly the World vocabulary's shape."""
    expected_ids = range(1, LAST_ID + 1)
    if len(token_bytes_by_id) != len(expected_ids) or not all(
        token_id in token_bytes_by_id for token_id in expected_ids
    ):
        raise TokenizerError(
            f"the tokenizer vocabulary has {len(token_bytes_by_id)} entries; "
            f"the World vocabulary has ids 1 to {LAST_ID}",
            hint=_VOCAB_HINT,
        )
    for byte in range(256):
        if token_bytes_by_id[byte + 1] != bytes([byte]):
            raise TokenizerError(
                f"the tokenizer vocabulary's id {byte + 1} should be the single byte {byte:#04x}",
                hint=_VOCAB_HINT,
            )
    if len(set(token_bytes_by_id.values())) != len(token_bytes_by_id):
        raise TokenizerError(
            "the tokenizer vocabulary lists the same token under two ids", hint=_VOCAB_HINT
        )


def _build_trie(token_bytes_by_id: dict[int, bytes]) -> _TrieNode:
    """A byte trie whose every node knows the longest entry that is a prefix of its path."""
    root: _TrieNode = {}
    # Shortest first: when a node is created, every entry shorter than the one being inserted is
    # already in place, so the parent's longest match is final and the new node can inherit it.
    for token_id, token in sorted(token_bytes_by_id.items(), key=lambda item: len(item[1])):
        node = root
        for byte in token:
            child = node.get(byte)
            if child is None:
                child = {_LONGEST: node[_LONGEST]} if _LONGEST in node else {}
                node[byte] = child
            node = child
        node[_LONGEST] = (token_id, len(token))
    return root


def _unknown_id_error(token_id: object) -> TokenizerError:
    return TokenizerError(
        f"token id {token_id!r} is not in the World vocabulary "
        f"(valid ids are {EOS_ID} to {LAST_ID}; {LAST_ID + 1} to {VOCAB_SIZE - 1} are unused)",
        hint="the ids must come from the World tokenizer (rwkv_vocab_v20230424)",
    )
