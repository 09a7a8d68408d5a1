"""A cache of recurrent states by the token ids that led to them, for reuse across requests.

An RWKV state after reading tokens ``t[0:L]`` is all a model needs to continue after them, and it
has a fixed size whatever ``L`` is. A server that keeps the states of the prompts and replies it
has read can answer a request whose tokens begin with one of them by reading only the rest: the
next turn of a long conversation then costs its new tokens alone (issue #20, docs/DESIGN.md
"Serving").

``PrefixCache`` keeps states keyed by their token ids, finds the longest cached prefix of a
prompt in time linear in the prompt's length (rolling hashes of its prefixes, checked token by
token on a hit), and evicts the least recently used states once their bytes exceed a bound.
States are never updated in place (rwkv_cli/state.py), so the cache keeps references, not copies.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from rwkv_cli.state import State

_MODULUS = (1 << 61) - 1  # a Mersenne prime: prefix hashes stay exact Python integers
_BASE = 1_000_003


@dataclass(frozen=True)
class CachedPrefix:
    """A cached state and how many leading tokens of the prompt it stands for."""

    length: int
    state: State


class PrefixCache:
    """States by token prefix, least recently used out first, at most ``capacity`` bytes.

    Safe to share between threads. A state larger than the whole capacity is not kept.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, int], tuple[tuple[int, ...], State, int]] = (
            OrderedDict()
        )  # (length, prefix hash) -> (tokens, state, bytes), oldest use first
        self._lengths: dict[int, int] = {}  # length -> how many entries have it
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the states kept."""
        return self._bytes

    def put(self, tokens: Sequence[int], state: State) -> None:
        """Keep ``state`` as the state after ``tokens`` (replacing one kept for the same tokens),
        then drop the least recently used states until the cache fits its capacity."""
        size = state_bytes(state)
        if not tokens or size > self.capacity:
            return
        key = (len(tokens), prefix_hashes(tokens)[-1])
        with self._lock:
            self._discard(key)
            self._entries[key] = (tuple(tokens), state, size)
            self._lengths[len(tokens)] = self._lengths.get(len(tokens), 0) + 1
            self._bytes += size
            while self._bytes > self.capacity:
                self._discard(next(iter(self._entries)))

    def longest_prefix(self, tokens: Sequence[int]) -> CachedPrefix | None:
        """The cached state for the longest proper prefix of ``tokens`` (at least one token is
        always left to read: its logits choose the next token), marked as just used."""
        hashes = prefix_hashes(tokens)
        with self._lock:
            for length in sorted(self._lengths, reverse=True):
                if length >= len(tokens):
                    continue
                key = (length, hashes[length - 1])
                entry = self._entries.get(key)
                if entry is not None and entry[0] == tuple(tokens[:length]):
                    self._entries.move_to_end(key)
                    return CachedPrefix(length, entry[1])
        return None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._lengths.clear()
            self._bytes = 0

    def _discard(self, key: tuple[int, int]) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._bytes -= entry[2]
        length = key[0]
        self._lengths[length] -= 1
        if not self._lengths[length]:
            del self._lengths[length]


def prefix_hashes(tokens: Sequence[int]) -> list[int]:
    """``hashes[i]``: a polynomial hash of ``tokens[: i + 1]``, all of them in one pass."""
    hashes, value = [], 0
    for token in tokens:
        value = (value * _BASE + token + 1) % _MODULUS
        hashes.append(value)
    return hashes


def state_bytes(state: State) -> int:
    """Memory the state's tensors take."""
    if state.packed is not None:
        return state.packed.numel() * state.packed.element_size()
    return sum(tensor.numel() * tensor.element_size() for tensor in state.tensors())
