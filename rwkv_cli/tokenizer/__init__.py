"""The tokenizers of RWKV models, and choosing one by name or by a model's vocabulary size.

Two vocabularies ship with rwkv-cli (``tokenizer_for_vocab`` picks by the model's vocabulary
size; ``tokenizer_by_name`` by a --tokenizer name):

- "World" (``rwkv_vocab_v20230424``, 65536 rows): World and G1 models (:mod:`.world`, a greedy
  longest match over UTF-8 bytes);
- the GPT-NeoX "20B" tokenizer (``20B_tokenizer.json``, 50277 ids, padded to 50304 by RWKV-7
  Pile models): RWKV-4 Pile/Raven and RWKV-7 Pile models (:mod:`.bpe`, run by the ``tokenizers``
  library).

A checkpoint may also bring its own byte-level BPE tokenizer, as ``tokenizer.json`` in its folder
(``bpe.bundled_tokenizer_path``; the demo model does), read by :class:`.bpe.BPETokenizer`.
All satisfy :class:`.base.Tokenizer`; :class:`.base.IncrementalDecoder` streams their text.
"""

from __future__ import annotations

from rwkv_cli.errors import TokenizerError, UnsupportedModelError
from rwkv_cli.settings import TOKENIZER_CHOICES
from rwkv_cli.tokenizer.base import Tokenizer, require_fit
from rwkv_cli.tokenizer.bpe import (
    BPE_NAME,
    NEOX_NAME,
    NEOX_PADDED_VOCAB,
    NEOX_TOKEN_COUNT,
    load_neox_tokenizer,
)
from rwkv_cli.tokenizer.world import VOCAB_NAME, VOCAB_SIZE, load_world_tokenizer

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
    if name.lower() not in TOKENIZER_ALIASES and not BPE_NAME.fullmatch(name.lower()):
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
        require_fit("World", tokenizer.token_count, vocab_size)
    return tokenizer


def _unknown_tokenizer(name: str) -> TokenizerError:
    return TokenizerError(
        f"unknown tokenizer {name!r}", hint=f"choose one of: {', '.join(TOKENIZER_CHOICES)}"
    )
