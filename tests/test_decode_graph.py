"""The logic of the one-token CUDA graphs that runs without a GPU: which graph (batch-size bucket) a
batch takes, and the graphs' buffers and step, run eagerly on the CPU. A graph replays exactly that
step; tests/test_cuda.py checks the replays on a GPU.

A batch of B runs in the graph of the smallest bucket that holds it, its rows padded: the padding
must change no real row's logits or state, whatever the padding rows hold; and sequences joining
and leaving move the batch between buckets, each captured once.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_cli.batching.states import stack_states
from rwkv_cli.models import MODEL_CLASSES, decode_graph
from tests.support.batch_runs import PROMPTS, joins_and_leaves
from tests.support.fixtures import GENERATIONS, generation_tensors
from tests.support.numerics import assert_states_close, relative_error

# Padded and unpadded steps compute each row alike on the CPU; the bound allows for a library
# that sums a matrix product's rows in an order that depends on their number.
TOLERANCE = 1e-6


def _model(generation: str):
    tensors = generation_tensors(generation, n_layer=2, seed=5)
    return MODEL_CLASSES[generation].from_tensors(tensors)


@pytest.mark.parametrize(
    ("sequences", "bucket"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (16, 16), (17, 32)]
)
def test_a_batch_takes_the_smallest_power_of_two_that_holds_it(sequences, bucket) -> None:
    assert decode_graph.batch_bucket(sequences) == bucket


def test_an_empty_batch_has_no_bucket() -> None:
    with pytest.raises(ValueError, match="at least one sequence"):
        decode_graph.batch_bucket(0)


def test_padding_tokens_fill_the_rows_after_the_sequences() -> None:
    padding = decode_graph.PADDING_TOKEN
    assert decode_graph.padded_tokens([5, 6, 7], 4) == [5, 6, 7, padding]
    assert decode_graph.padded_tokens([5], 1) == [5]


def _batched_state(model, sequences: int):
    return stack_states([model.forward(prompt)[1] for prompt in PROMPTS[:sequences]])


@pytest.mark.parametrize("sequences", [1, 3, 5])
@pytest.mark.parametrize("generation", GENERATIONS)
def test_padding_rows_change_no_real_row(generation, sequences) -> None:
    model = _model(generation)
    state = _batched_state(model, sequences)
    tokens = [40 + row for row in range(sequences)]
    expected_logits, expected_state = model.forward_batch(tokens, state)

    buffers = decode_graph.StepBuffers(model, decode_graph.batch_bucket(sequences))
    padding = buffers.buffer[sequences:]  # garbage, not a state: NaN and infinities among it
    padding.copy_(torch.randint(0, 256, padding.shape, generator=torch.Generator().manual_seed(0)))
    buffers.load(tokens, state)
    logits, new_state = buffers.results(buffers.step(model), sequences)

    assert logits.shape == expected_logits.shape
    assert relative_error(logits, expected_logits) < TOLERANCE
    assert_states_close(new_state, expected_state, TOLERANCE)


class EagerGraph:
    """Stands in for decode_graph.OneTokenGraph on the CPU: the same buffers and step, run
    instead of replayed."""

    def __init__(self, model, rows: int | None) -> None:
        self.model = model
        self.buffers = decode_graph.StepBuffers(model, rows)

    def __call__(self, tokens, state):
        self.buffers.load(tokens, state)
        return self.buffers.results(self.buffers.step(self.model), len(tokens))


@pytest.mark.parametrize("generation", ["4", "6", "7"])
def test_joins_and_leaves_move_a_batch_between_bucket_graphs(generation, monkeypatch) -> None:
    model = _model(generation)
    expected = joins_and_leaves(model)  # no graphs on the CPU
    assert model._graphs == {}

    captured = []

    def capture(model, rows=None):
        captured.append(rows)
        return EagerGraph(model, rows)

    monkeypatch.setattr(decode_graph, "graphs_enabled", lambda device: True)
    monkeypatch.setattr(decode_graph, "capture", capture)
    actual = joins_and_leaves(model)

    assert sorted(captured, key=str) == [2, 4, 8, None]  # each captured once
    assert set(model._graphs) == {("auto", rows) for rows in captured}
    for got, want in zip(actual, expected, strict=True):
        assert relative_error(got, want) < TOLERANCE
