"""Byte-level BPE tokenizers (GPT-2 style) read with the ``tokenizers`` library: GPT-NeoX's "20B"
tokenizer (``20B_tokenizer.json``, 50277 ids, padded to 50304 by RWKV-7 Pile models) of RWKV-4
Pile/Raven and RWKV-7 Pile models, and a ``tokenizer.json`` that a checkpoint brings in its folder
(the demo model does)."""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import tokenizers

from rwkv_cli.errors import TokenizerError
from rwkv_cli.tokenizer.base import EOS_ID, require_fit

NEOX_NAME = "20B_tokenizer"
NEOX_FILE = f"{NEOX_NAME}.json"
NEOX_TOKEN_COUNT = 50277  # ids 0..50276: 50254 BPE entries and 23 added runs of spaces
NEOX_PADDED_VOCAB = 50304  # RWKV-7 Pile models pad their head to a multiple of 64 rows
# A checkpoint may come with its own byte-level BPE tokenizer, in this file in its folder (the
# demo model does); state files record it as "bpe-" and this many hex digits of its SHA-256.
BUNDLED_TOKENIZER_FILE = "tokenizer.json"
BPE_NAME_DIGITS = 12
BPE_NAME = re.compile(rf"bpe-[0-9a-f]{{{BPE_NAME_DIGITS}}}")

_NEOX_HINT = (
    f"the 20B tokenizer ships with rwkv-cli as rwkv_cli/data/{NEOX_FILE}; "
    "reinstalling rwkv-cli restores a damaged copy"
)


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
        require_fit(self.label, self.token_count, self.vocab_size)

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
        require_fit(self.label, self.token_count, vocab_size)
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
