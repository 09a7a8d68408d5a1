"""The tokenizers of RWKV models, and a UTF-8-safe incremental decoder for streaming.

Two vocabularies ship with rwkv-cli (chosen from the model's vocabulary size,
``tokenizer_for_vocab``):

- "World" (``rwkv_vocab_v20230424``, 65536 rows): World and G1 models, described below;
- the GPT-NeoX "20B" tokenizer (``20B_tokenizer.json``, 50277 ids, padded to 50304 by RWKV-7
  Pile models): RWKV-4 Pile/Raven and RWKV-7 Pile models, run by the ``tokenizers`` library.

A checkpoint may also bring its own byte-level BPE tokenizer, as ``tokenizer.json`` in its folder
(``bundled_tokenizer_path``; the demo model does): :class:`BPETokenizer` reads any such file, and
the 20B tokenizer is one (:class:`NeoXTokenizer`).

All satisfy :class:`Tokenizer`. The World tokenizer is a greedy longest match over UTF-8 bytes.

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
import codecs
import copy
import functools
import hashlib
import os
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import tokenizers

from rwkv_cli.errors import TokenizerError, UnsupportedModelError
from rwkv_cli.settings import TOKENIZER_CHOICES

VOCAB_NAME = "rwkv_vocab_v20230424"
VOCAB_FILE = f"{VOCAB_NAME}.txt"
VOCAB_SIZE = 65536  # rows in the model's embedding and head; ids after LAST_ID are padding
LAST_ID = 65529  # the highest id in the vocabulary file
EOS_ID = 0  # end-of-text: not in the file, decodes to b""

# Trie nodes are dicts keyed by the next byte (0-255). The extra key 256 holds the longest
# vocabulary entry that is a prefix of the node's path, as (token_id, length in bytes).
_LONGEST = 256
_TrieNode = dict[int, Any]

_VOCAB_HINT = (
    f"the World vocabulary ships with rwkv-cli as rwkv_cli/data/{VOCAB_FILE}; "
    "reinstalling rwkv-cli restores a damaged copy"
)

NEOX_NAME = "20B_tokenizer"
NEOX_FILE = f"{NEOX_NAME}.json"
NEOX_TOKEN_COUNT = 50277  # ids 0..50276: 50254 BPE entries and 23 added runs of spaces
NEOX_PADDED_VOCAB = 50304  # RWKV-7 Pile models pad their head to a multiple of 64 rows
# A checkpoint may come with its own byte-level BPE tokenizer, in this file in its folder (the
# demo model does); state files record it as "bpe-" and this many hex digits of its SHA-256.
BUNDLED_TOKENIZER_FILE = "tokenizer.json"
BPE_NAME_DIGITS = 12
_BPE_NAME = re.compile(rf"bpe-[0-9a-f]{{{BPE_NAME_DIGITS}}}")

_NEOX_HINT = (
    f"the 20B tokenizer ships with rwkv-cli as rwkv_cli/data/{NEOX_FILE}; "
    "reinstalling rwkv-cli restores a damaged copy"
)


class Tokenizer(Protocol):
    """What generation and chat need from a tokenizer (both vocabularies provide it)."""

    name: str  # recorded in state files
    vocab_size: int  # rows of the model's embedding and head it serves
    token_count: int  # ids below this decode; the rest, up to vocab_size, are padding
    eos_id: int  # end-of-text

    def encode(self, text: str) -> list[int]: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...

    def decode(self, ids: Iterable[int]) -> str: ...


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


class IncrementalDecoder:
    """Turn a stream of token ids into text without ever splitting a UTF-8 character.

    A multi-byte character can be spread over several tokens; ``feed`` holds its first bytes back
    until the rest arrives. Bytes that can never form a character come out as U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """The text completed by this token (possibly empty)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    @property
    def holding_back(self) -> bool:
        """Whether part of a multi-byte character is waiting for its remaining bytes."""
        return bool(self._utf8.getstate()[0])

    def flush(self) -> str:
        """Whatever is held back, as U+FFFD if incomplete; the decoder can then be reused."""
        return self._utf8.decode(b"", final=True)


@functools.cache
def load_world_tokenizer() -> WorldTokenizer:
    """The World tokenizer from the vocabulary shipped with rwkv-cli, loaded once per process."""
    vocab = resources.files("rwkv_cli").joinpath("data", VOCAB_FILE)
    with resources.as_file(vocab) as path:
        return WorldTokenizer.from_file(path)


class BPETokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) read from a ``tokenizers`` JSON file.

    Encoding and decoding are exactly the library's (as the official ``rwkv`` package uses it);
    ``token_bytes`` gives each token's raw bytes, so streamed text can be cut at UTF-8 character
    boundaries. Special tokens (id 0 must be end-of-text) decode to nothing. Used for the 20B
    tokenizer and for tokenizers shipped beside a checkpoint (``BUNDLED_TOKENIZER_FILE``).
    """

    eos_id = EOS_ID

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, name: str, vocab_size: int | None = None
    ) -> None:
        """Wrap a loaded tokenizer called ``name`` for a model with ``vocab_size`` rows (default:
        exactly its token count)."""
        self.name = name
        self._tokenizer = tokenizer
        self._bytes_by_id = _byte_level_token_bytes(tokenizer, self.label)
        self.token_count = len(self._bytes_by_id)
        if self.token_count == 0 or self._bytes_by_id[EOS_ID] != b"":
            raise TokenizerError(
                f"the {self.label} tokenizer's id {EOS_ID} is not a special end-of-text token"
            )
        self.vocab_size = self.token_count if vocab_size is None else vocab_size
        _require_fit(self.label, self.token_count, self.vocab_size)

    @property
    def label(self) -> str:
        """How messages call this tokenizer."""
        return self.name

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], name: str | None = None, vocab_size: int | None = None
    ) -> BPETokenizer:
        """Load a ``tokenizers`` JSON file; ``name`` defaults to ``bpe_name(path)``."""
        try:
            tokenizer = tokenizers.Tokenizer.from_file(os.fspath(path))
        except Exception as error:  # the library raises plain Exception for bad files
            raise TokenizerError(
                f"cannot read the tokenizer {os.fspath(path)!r}: {str(error).strip()[:200]}"
            ) from error
        if not isinstance(tokenizer.decoder, tokenizers.decoders.ByteLevel):
            raise TokenizerError(
                f"the tokenizer {os.fspath(path)!r} is not a byte-level BPE tokenizer",
                hint="rwkv-cli reads byte-level BPE tokenizer.json files (GPT-2 style) only",
            )
        return cls(tokenizer, name or bpe_name(path), vocab_size)

    def with_vocab_size(self, vocab_size: int) -> BPETokenizer:
        """The same tokenizer for a model whose head has ``vocab_size`` rows (padding unused)."""
        _require_fit(self.label, self.token_count, vocab_size)
        padded = copy.copy(self)  # shares the loaded vocabulary
        padded.vocab_size = vocab_size
        return padded

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``."""
        return self._tokenizer.encode(text).ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (``b""`` for the special tokens)."""
        if not 0 <= token_id < self.token_count:
            raise TokenizerError(
                f"token id {token_id!r} is not in the {self.label} vocabulary "
                f"(valid ids are 0 to {self.token_count - 1})",
                hint=f"the ids must come from the {self.label} tokenizer",
            )
        return self._bytes_by_id[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated bytes of ``ids``; special tokens contribute nothing."""
        return b"".join([self.token_bytes(token_id) for token_id in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class NeoXTokenizer(BPETokenizer):
    """GPT-NeoX's "20B" tokenizer of RWKV-4 Pile/Raven and RWKV-7 Pile models."""

    label = "20B"

    def __init__(self, tokenizer: tokenizers.Tokenizer, vocab_size: int = NEOX_TOKEN_COUNT) -> None:
        """Wrap a loaded ``20B_tokenizer.json`` for a model with ``vocab_size`` rows."""
        if tokenizer.get_vocab_size(with_added_tokens=True) != NEOX_TOKEN_COUNT:
            raise TokenizerError(
                f"the 20B tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} "
                f"tokens; expected {NEOX_TOKEN_COUNT}",
                hint=_NEOX_HINT,
            )
        super().__init__(tokenizer, NEOX_NAME, vocab_size)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], vocab_size: int = NEOX_TOKEN_COUNT
    ) -> NeoXTokenizer:
        """Load a ``tokenizers`` JSON file such as ``20B_tokenizer.json``."""
        try:
            tokenizer = tokenizers.Tokenizer.from_file(os.fspath(path))
        except Exception as error:  # the library raises plain Exception for bad files
            raise TokenizerError(
                f"cannot read the tokenizer {os.fspath(path)!r}: {str(error).strip()[:200]}",
                hint=_NEOX_HINT,
            ) from error
        return cls(tokenizer, vocab_size)


def bpe_name(path: str | os.PathLike[str]) -> str:
    """The name a tokenizer file is known by in state files: ``bpe-`` and the start of its
    SHA-256, so a state made with one tokenizer is never resumed with another."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return f"bpe-{digest[:BPE_NAME_DIGITS]}"


def bundled_tokenizer_path(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The ``tokenizer.json`` in a checkpoint's folder, if there is one."""
    path = Path(checkpoint).parent / BUNDLED_TOKENIZER_FILE
    return path if path.is_file() else None


def _byte_level_characters() -> dict[str, int]:
    """Byte-level BPE (GPT-2, GPT-NeoX) spells every byte as one printable character: the
    printable Latin-1 bytes stand for themselves, the other 68 bytes (controls, space, 0x7F-0xA0,
    0xAD) for U+0100 onwards, in byte order. Returns character -> byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    characters = {byte: chr(byte) for byte in printable}
    others = (byte for byte in range(256) if byte not in characters)
    characters.update({byte: chr(0x100 + index) for index, byte in enumerate(others)})
    return {character: byte for byte, character in characters.items()}


def _byte_level_token_bytes(tokenizer: tokenizers.Tokenizer, label: str) -> list[bytes]:
    """Each id's bytes, as the library's decoder produces them: special tokens are skipped,
    BPE tokens are byte-level spellings, other added tokens (the 20B tokenizer's runs of spaces)
    are their own text."""
    byte_of = _byte_level_characters()
    added = tokenizer.get_added_tokens_decoder()
    vocabulary = tokenizer.get_vocab(with_added_tokens=True)
    by_id: list[bytes | None] = [None] * len(vocabulary)
    for text, token_id in vocabulary.items():
        if token_id >= len(by_id):
            raise TokenizerError(f"the {label} tokenizer's ids are not contiguous ({token_id})")
        token = added.get(token_id)
        if token is not None and token.special:
            by_id[token_id] = b""
        elif token is None and all(character in byte_of for character in text):
            by_id[token_id] = bytes(byte_of[character] for character in text)
        else:
            by_id[token_id] = text.encode("utf-8")
    return [token if token is not None else b"" for token in by_id]


@functools.cache
def load_neox_tokenizer(vocab_size: int = NEOX_TOKEN_COUNT) -> NeoXTokenizer:
    """The 20B tokenizer shipped with rwkv-cli, for a model with ``vocab_size`` rows."""
    if vocab_size != NEOX_TOKEN_COUNT:
        return load_neox_tokenizer().with_vocab_size(vocab_size)
    data = resources.files("rwkv_cli").joinpath("data", NEOX_FILE)
    with resources.as_file(data) as path:
        return NeoXTokenizer.from_file(path)


# Names accepted by tokenizer_by_name (case-insensitive), for a --tokenizer option.
TOKENIZER_ALIASES = {
    "world": VOCAB_NAME,
    VOCAB_NAME.lower(): VOCAB_NAME,
    "20b": NEOX_NAME,
    "neox": NEOX_NAME,
    "gpt-neox": NEOX_NAME,
    NEOX_NAME.lower(): NEOX_NAME,
}


def tokenizer_for_vocab(vocab_size: int) -> Tokenizer:
    """The tokenizer a model with ``vocab_size`` output rows was trained with."""
    if vocab_size == VOCAB_SIZE:
        return load_world_tokenizer()
    if vocab_size in (NEOX_TOKEN_COUNT, NEOX_PADDED_VOCAB):
        return load_neox_tokenizer(vocab_size)
    raise UnsupportedModelError(
        f"no known tokenizer has a vocabulary of {vocab_size}",
        hint="choose one with --tokenizer (world or 20b)",
    )


def check_tokenizer_name(name: str) -> None:
    """TokenizerError unless ``name`` can name a tokenizer: world, 20b (or another name of
    theirs), or the ``bpe-`` name of a model's own tokenizer.json (see ``bpe_name``)."""
    if name.lower() not in TOKENIZER_ALIASES and not _BPE_NAME.fullmatch(name.lower()):
        raise _unknown_tokenizer(name)


def tokenizer_by_name(name: str, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer called ``name`` ("world", "20b" or a full name), for a model with
    ``vocab_size`` rows when given: it must not have more tokens than the model has rows."""
    canonical = TOKENIZER_ALIASES.get(name.lower())
    if canonical is None:
        raise _unknown_tokenizer(name)
    if canonical == NEOX_NAME:
        return load_neox_tokenizer(vocab_size or NEOX_TOKEN_COUNT)
    tokenizer = load_world_tokenizer()
    if vocab_size is not None:
        _require_fit("World", tokenizer.token_count, vocab_size)
    return tokenizer


def _unknown_tokenizer(name: str) -> TokenizerError:
    return TokenizerError(
        f"unknown tokenizer {name!r}", hint=f"choose one of: {', '.join(TOKENIZER_CHOICES)}"
    )


def _require_fit(label: str, token_count: int, vocab_size: int) -> None:
    """TokenizerError unless a tokenizer of ``token_count`` tokens fits a model's vocabulary."""
    if token_count > vocab_size:
        raise TokenizerError(
            f"the {label} tokenizer has {token_count} tokens, more than the model's "
            f"vocabulary of {vocab_size}",
            hint="leave out --tokenizer to use the model's own (World for 65536 tokens, 20b for "
            "50277 and 50304)",
        )


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
