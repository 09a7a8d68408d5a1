"""What every tokenizer offers (:class:`Tokenizer`), and a UTF-8-safe incremental decoder for
streaming text."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import Protocol

from rwkv_cli.errors import TokenizerError

EOS_ID = 0  # end-of-text: not in the file, decodes to b""


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


def require_fit(label: str, token_count: int, vocab_size: int) -> None:
    """TokenizerError unless a tokenizer of ``token_count`` tokens fits a model's vocabulary."""
    if token_count > vocab_size:
        raise TokenizerError(
            f"the {label} tokenizer has {token_count} tokens, more than the model's "
            f"vocabulary of {vocab_size}",
            hint="leave out --tokenizer to use the model's own (World for 65536 tokens, 20b for "
            "50277 and 50304)",
        )
