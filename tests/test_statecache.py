"""The prefix cache of states (rwkv_cli/statecache.py): lookup, recency, the byte bound, and
that resuming from a cached prefix reads the rest of a prompt exactly as reading it whole."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch

from rwkv_cli.generation import Session, prefill
from rwkv_cli.loading.open import open_model
from rwkv_cli.state import State
from rwkv_cli.statecache import PrefixCache, prefix_hashes, state_bytes
from tests.support.numerics import assert_states_close, relative_error


@dataclass
class _Layer:
    values: torch.Tensor


def _state(fill: float) -> State:
    """A stand-in state: one layer of 10 float32 values (40 bytes)."""
    return State("test", [_Layer(torch.full((10,), float(fill)))])


def _fill(state: State) -> float:
    return state.layers[0].values[0].item()


def test_the_longest_cached_proper_prefix_is_found() -> None:
    cache = PrefixCache(capacity=1000)
    cache.put([1, 2], _state(2))
    cache.put([1, 2, 3, 4], _state(4))
    cache.put([1, 9, 9], _state(9))
    found = cache.longest_prefix([1, 2, 3, 4, 5, 6])
    assert found.length == 4 and _fill(found.state) == 4
    assert cache.longest_prefix([1, 2, 3, 7]).length == 2
    # A whole prompt cached still leaves its last token to read, for its logits.
    assert cache.longest_prefix([1, 2, 3, 4]).length == 2
    assert cache.longest_prefix([5, 1, 2]) is None
    assert cache.longest_prefix([1]) is None and cache.longest_prefix([]) is None


def test_a_hash_match_with_other_tokens_is_no_hit(monkeypatch) -> None:
    cache = PrefixCache(capacity=1000)
    cache.put([1, 2, 3], _state(3))
    monkeypatch.setattr("rwkv_cli.statecache.prefix_hashes", lambda tokens: [7] * len(tokens))
    cache.put([4, 5, 6], _state(6))  # every prefix now hashes alike
    assert _fill(cache.longest_prefix([4, 5, 6, 0]).state) == 6
    assert cache.longest_prefix([8, 8, 8, 0]) is None


def test_least_recently_used_states_leave_first_within_the_byte_bound() -> None:
    cache = PrefixCache(capacity=100)  # two 40-byte states fit, three do not
    cache.put([1], _state(1))
    cache.put([2], _state(2))
    assert cache.longest_prefix([1, 0]).length == 1  # [1] is now the most recent
    cache.put([3], _state(3))
    assert len(cache) == 2 and cache.nbytes == 80
    assert cache.longest_prefix([2, 0]) is None  # the least recently used went
    assert cache.longest_prefix([1, 0]) and cache.longest_prefix([3, 0])


def test_putting_the_same_tokens_again_replaces_the_state() -> None:
    cache = PrefixCache(capacity=1000)
    cache.put([1, 2], _state(1))
    cache.put([1, 2], _state(5))
    assert len(cache) == 1 and cache.nbytes == 40
    assert _fill(cache.longest_prefix([1, 2, 3]).state) == 5


def test_a_state_larger_than_the_cache_is_not_kept() -> None:
    cache = PrefixCache(capacity=39)
    cache.put([1], _state(1))
    assert len(cache) == 0 and cache.nbytes == 0
    cache.clear()
    assert cache.longest_prefix([1, 2]) is None


def test_prefix_hashes_differ_by_order_and_length() -> None:
    assert prefix_hashes([1, 2]) != prefix_hashes([2, 1])
    assert prefix_hashes([0])[-1] != prefix_hashes([0, 0])[-1]
    assert prefix_hashes([3, 4, 5])[:2] == prefix_hashes([3, 4])


def test_threads_may_share_the_cache() -> None:
    cache = PrefixCache(capacity=40 * 50)

    def work(offset: int) -> None:
        for i in range(200):
            cache.put([offset, i], _state(i))
            cache.longest_prefix([offset, i, 0])

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 50 and cache.nbytes == 40 * 50


@pytest.fixture(scope="module")
def demo():
    return open_model("demo")


def test_resuming_from_a_cached_prefix_reads_the_rest_as_a_whole_prompt_would(demo) -> None:
    model, tokenizer = demo.model, demo.tokenizer
    history = tokenizer.encode("User: What is a river?\n\nAssistant: Water that flows.\n\n")
    turn = history + tokenizer.encode("User: And a lake?\n\nAssistant:")
    cache = PrefixCache(capacity=1 << 30)
    cache.put(history, prefill(model, history).state)

    found = cache.longest_prefix(turn)
    assert found.length == len(history)
    resumed = prefill(model, turn[found.length :], Session(state=found.state))
    whole = prefill(model, turn)
    assert relative_error(resumed.logits, whole.logits) < 1e-5
    assert_states_close(resumed.state, whole.state, 1e-5)
    assert state_bytes(found.state) == sum(t.numel() * 4 for t in whole.state.tensors())
